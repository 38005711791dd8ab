/* cfloor: the floor of an AF_PACKET user-space forwarder, for `bench e2e`.
 *
 * The least a director built like pylvs must do per frame, and nothing
 * more: a TPACKET_V3 receive ring on the client-side interface behind a
 * classic BPF filter (IPv4 UDP to VIP:PORT, not a fragment), no conn table,
 * the real server chosen statelessly by a hash of the UDP source port, the
 * rewrite of the forwarding method, and sendmmsg() batches with
 * PACKET_QDISC_BYPASS out of the egress interface. One thread, one core
 * (the bench pins it with taskset, as it pins `pylvs run`).
 *
 *   nat: daddr := RIP, the IP and UDP checksums updated incrementally
 *        (RFC 1624), TTL - 1, MACs of the egress port and the real server.
 *   dr:  TTL - 1, MACs: the real server's, from the egress port's.
 *   tun: TTL - 1, then a 20-byte IPIP header (protocol 4) in front: saddr
 *        --saddr, daddr RIP, TOS, DF and TTL copied from the inner header,
 *        a fresh ID, full header checksum; MACs of the egress port and the
 *        next hop (--dest's MAC: the router's for a RIP behind it).
 *
 * It assumes the bench's traffic (full checksums, no IP options on the way
 * out for tun, TTL > 1 and frames that fit the egress MTU once encapsulated)
 * and drops and counts anything else the filter lets through. The kernel
 * must not also handle the frames: the bench installs an nft netdev ingress
 * drop for VIP:PORT in the director's namespace, as pylvs's steering does.
 *
 * usage: cfloor --in IF --out IF --mode nat|dr|tun --vip A --port P
 *               [--saddr A] --dest RIP,MAC [--dest RIP,MAC ...]
 * Prints "ready" once it receives; on SIGTERM or SIGINT one JSON line of
 * counters, then exits 0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define BLOCK_SIZE (1u << 17) /* the ring of pylvs/io/afpacket.py */
#define BLOCK_NR 64u
#define FRAME_SIZE 2048u
#define RETIRE_MS 1u
#define BATCH 256
#define MAX_DESTS 64
#define ETH_HLEN_ 14
#define IPIP_HLEN 20

enum mode { NAT, DR, TUN };

struct dest {
    uint32_t rip; /* network order */
    uint8_t mac[6];
};

static volatile sig_atomic_t stop;
static struct dest dests[MAX_DESTS];
static unsigned n_dests;
static enum mode mode;
static uint32_t vip, saddr; /* network order */
static uint16_t port;       /* host order */
static uint8_t out_mac[6];
static uint16_t ip_id;
static unsigned long long n_rx, n_tx, n_drop_bad, n_tx_err;

static void on_signal(int sig) { (void)sig; stop = 1; }

static void die(const char *what)
{
    fprintf(stderr, "cfloor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void)
{
    fprintf(stderr, "usage: cfloor --in IF --out IF --mode nat|dr|tun --vip A --port P "
                    "[--saddr A] --dest RIP,MAC [--dest RIP,MAC ...]\n");
    exit(2);
}

static uint16_t fold(uint32_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for one 16-bit word. */
static uint16_t csum_replace16(uint16_t hc, uint16_t from, uint16_t to)
{
    return (uint16_t)~fold((uint32_t)(uint16_t)~hc + (uint16_t)~from + to);
}

static uint16_t csum_replace32(uint16_t hc, uint32_t from, uint32_t to)
{
    hc = csum_replace16(hc, (uint16_t)(from >> 16), (uint16_t)(to >> 16));
    return csum_replace16(hc, (uint16_t)from, (uint16_t)to);
}

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }
static void put32(uint8_t *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, (uint16_t)v); }

static void decrease_ttl(uint8_t *ip)
{
    uint16_t old = get16(ip + 8);
    ip[8]--;
    put16(ip + 10, csum_replace16(get16(ip + 10), old, get16(ip + 8)));
}

/* Knuth's multiplicative hash of the source port: stateless, and spreads a
 * run of consecutive ports evenly. */
static const struct dest *pick(uint16_t sport)
{
    return &dests[((uint32_t)sport * 2654435761u >> 16) % n_dests];
}

/* Rewrites the frame in place (nat, dr) or into out (tun); returns the frame
 * to send and its length in *len, or NULL to drop. */
static uint8_t *rewrite(uint8_t *f, unsigned *len, uint8_t *out)
{
    uint8_t *ip = f + ETH_HLEN_;
    unsigned ihl = (ip[0] & 0x0f) * 4u;
    if (*len < ETH_HLEN_ + 28u || ihl < 20 || *len < ETH_HLEN_ + ihl + 8 || ip[8] <= 1)
        return NULL;
    uint8_t *udp = ip + ihl;
    const struct dest *d = pick(get16(udp));
    decrease_ttl(ip);
    switch (mode) {
    case NAT: {
        uint32_t from = get32(ip + 16), to = ntohl(d->rip);
        put32(ip + 16, to);
        put16(ip + 10, csum_replace32(get16(ip + 10), from, to));
        uint16_t uc = get16(udp + 6);
        if (uc) { /* 0: no checksum (RFC 768) stays none */
            uc = csum_replace32(uc, from, to);
            put16(udp + 6, uc ? uc : 0xffff);
        }
    }
        __attribute__((fallthrough)); /* then the MACs, as dr */
    case DR:
        memcpy(f, d->mac, 6);
        memcpy(f + 6, out_mac, 6);
        return f;
    case TUN: {
        unsigned iplen = get16(ip + 2);
        if (iplen > *len - ETH_HLEN_ || iplen + IPIP_HLEN > 1500u)
            return NULL;
        memcpy(out, d->mac, 6);
        memcpy(out + 6, out_mac, 6);
        put16(out + 12, ETHERTYPE_IP);
        uint8_t *o = out + ETH_HLEN_;
        o[0] = 0x45;
        o[1] = ip[1];
        put16(o + 2, (uint16_t)(iplen + IPIP_HLEN));
        put16(o + 4, ip_id++);
        put16(o + 6, get16(ip + 6) & 0x4000); /* DF copied, no fragment */
        o[8] = ip[8];
        o[9] = 4; /* IPPROTO_IPIP */
        put16(o + 10, 0);
        memcpy(o + 12, &saddr, 4);
        memcpy(o + 16, &d->rip, 4);
        uint32_t s = 0;
        for (int i = 0; i < IPIP_HLEN; i += 2)
            s += get16(o + i);
        put16(o + 10, (uint16_t)~fold(s));
        memcpy(o + IPIP_HLEN, ip, iplen);
        *len = ETH_HLEN_ + IPIP_HLEN + iplen;
        return out;
    }
    }
    return NULL;
}

static int packet_socket(int proto)
{
    int fd = socket(AF_PACKET, SOCK_RAW, proto);
    if (fd < 0)
        die("socket(AF_PACKET)");
    int one = 1;
    if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one) < 0)
        die("PACKET_QDISC_BYPASS");
    return fd;
}

static void bind_to(int fd, int ifindex, int proto)
{
    struct sockaddr_ll a = {.sll_family = AF_PACKET, .sll_protocol = (uint16_t)proto,
                            .sll_ifindex = ifindex};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
}

/* IPv4, UDP, daddr VIP, dport PORT, not a fragment: accept; else nothing. */
static void attach_filter(int fd)
{
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 12),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ETHERTYPE_IP, 0, 9),
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, ETH_HLEN_ + 9),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 17, 0, 7),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ETH_HLEN_ + 16),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ntohl(vip), 0, 5),
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, ETH_HLEN_ + 6),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 0x3fff, 3, 0),
        BPF_STMT(BPF_LDX | BPF_B | BPF_MSH, ETH_HLEN_),
        BPF_STMT(BPF_LD | BPF_H | BPF_IND, ETH_HLEN_ + 2),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, port, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, 0),
        BPF_STMT(BPF_RET | BPF_K, 0xffff),
    };
    struct sock_fprog prog = {.len = sizeof code / sizeof code[0], .filter = code};
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) < 0)
        die("SO_ATTACH_FILTER");
}

static int parse_mac(const char *s, uint8_t mac[6])
{
    unsigned m[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) != 6)
        return -1;
    for (int i = 0; i < 6; i++)
        mac[i] = (uint8_t)m[i];
    return 0;
}

static void mac_of(int fd, const char *ifname, uint8_t mac[6])
{
    struct ifreq r = {0};
    snprintf(r.ifr_name, sizeof r.ifr_name, "%s", ifname);
    if (ioctl(fd, SIOCGIFHWADDR, &r) < 0)
        die("SIOCGIFHWADDR");
    memcpy(mac, r.ifr_hwaddr.sa_data, 6);
}

static struct mmsghdr msgs[BATCH];
static struct iovec iovs[BATCH];
static uint8_t txbuf[BATCH][FRAME_SIZE];
static struct sockaddr_ll to;

static void flush(int fd, unsigned n)
{
    unsigned i = 0;
    while (i < n) {
        int s = sendmmsg(fd, msgs + i, n - i, MSG_DONTWAIT);
        if (s > 0) {
            n_tx += (unsigned)s;
            i += (unsigned)s;
        } else if (!(s < 0 && errno == EINTR)) {
            /* The frame at i was refused (the peer's backlog full: ENOBUFS):
             * lose it, as a full NIC queue would, and go on with the rest. */
            n_tx_err++;
            i++;
        }
    }
}

int main(int argc, char **argv)
{
    const char *in = NULL, *outif = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--in"))
            in = v;
        else if (!strcmp(k, "--out"))
            outif = v;
        else if (!strcmp(k, "--mode"))
            mode = !strcmp(v, "nat") ? NAT : !strcmp(v, "dr") ? DR : !strcmp(v, "tun") ? TUN : 99;
        else if (!strcmp(k, "--vip")) {
            if (inet_pton(AF_INET, v, &vip) != 1)
                usage();
        } else if (!strcmp(k, "--saddr")) {
            if (inet_pton(AF_INET, v, &saddr) != 1)
                usage();
        } else if (!strcmp(k, "--port"))
            port = (uint16_t)atoi(v);
        else if (!strcmp(k, "--dest")) {
            char buf[64];
            snprintf(buf, sizeof buf, "%s", v);
            char *comma = strchr(buf, ',');
            if (!comma || n_dests == MAX_DESTS)
                usage();
            *comma = 0;
            if (inet_pton(AF_INET, buf, &dests[n_dests].rip) != 1 ||
                parse_mac(comma + 1, dests[n_dests].mac))
                usage();
            n_dests++;
        } else
            usage();
    }
    if (!in || !outif || (unsigned)mode > TUN || !vip || !port || !n_dests ||
        (mode == TUN && !saddr))
        usage();
    int in_idx = (int)if_nametoindex(in), out_idx = (int)if_nametoindex(outif);
    if (!in_idx || !out_idx)
        die("if_nametoindex");

    /* Protocol 0 until the filter and the ring are in place, as pylvs does. */
    int rx = packet_socket(0);
    attach_filter(rx);
    int one = 1, v3 = TPACKET_V3;
    if (setsockopt(rx, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) < 0)
        die("PACKET_IGNORE_OUTGOING");
    if (setsockopt(rx, SOL_PACKET, PACKET_VERSION, &v3, sizeof v3) < 0)
        die("PACKET_VERSION");
    struct tpacket_req3 req = {.tp_block_size = BLOCK_SIZE, .tp_block_nr = BLOCK_NR,
                               .tp_frame_size = FRAME_SIZE,
                               .tp_frame_nr = BLOCK_SIZE / FRAME_SIZE * BLOCK_NR,
                               .tp_retire_blk_tov = RETIRE_MS};
    if (setsockopt(rx, SOL_PACKET, PACKET_RX_RING, &req, sizeof req) < 0)
        die("PACKET_RX_RING");
    uint8_t *ring = mmap(NULL, (size_t)BLOCK_SIZE * BLOCK_NR, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_LOCKED, rx, 0);
    if (ring == MAP_FAILED)
        ring = mmap(NULL, (size_t)BLOCK_SIZE * BLOCK_NR, PROT_READ | PROT_WRITE, MAP_SHARED, rx, 0);
    if (ring == MAP_FAILED)
        die("mmap");
    bind_to(rx, in_idx, htons(ETH_P_ALL));
    /* Same interface both ways (dr, tun): send from the receiving socket. */
    int tx = rx;
    if (out_idx != in_idx) {
        tx = packet_socket(0);
        bind_to(tx, out_idx, 0);
    }
    mac_of(tx, outif, out_mac);
    to = (struct sockaddr_ll){.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_IP),
                              .sll_ifindex = out_idx, .sll_halen = 6};
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr = (struct msghdr){.msg_name = &to, .msg_namelen = sizeof to,
                                          .msg_iov = &iovs[i], .msg_iovlen = 1};
    }

    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("ready\n");
    fflush(stdout);

    struct pollfd pfd = {.fd = rx, .events = POLLIN | POLLERR};
    unsigned cur = 0;
    while (!stop) {
        struct tpacket_block_desc *b = (void *)(ring + (size_t)cur * BLOCK_SIZE);
        if (!(__atomic_load_n(&b->hdr.bh1.block_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER)) {
            poll(&pfd, 1, 100);
            continue;
        }
        unsigned n = 0, np = b->hdr.bh1.num_pkts;
        struct tpacket3_hdr *h = (void *)((uint8_t *)b + b->hdr.bh1.offset_to_first_pkt);
        for (unsigned k = 0; k < np; k++) {
            struct sockaddr_ll *ll = (void *)((uint8_t *)h + TPACKET_ALIGN(sizeof *h));
            unsigned len = h->tp_snaplen;
            uint8_t *f = (uint8_t *)h + h->tp_mac;
            uint8_t *s = NULL;
            n_rx++;
            if (ll->sll_pkttype == PACKET_HOST && len == h->tp_len)
                s = rewrite(f, &len, txbuf[n]);
            if (s) {
                iovs[n] = (struct iovec){.iov_base = s, .iov_len = len};
                if (++n == BATCH) {
                    flush(tx, n);
                    n = 0;
                }
            } else
                n_drop_bad++;
            h = (void *)((uint8_t *)h + h->tp_next_offset);
        }
        if (n)
            flush(tx, n); /* before the block (the frames sent in place) goes back */
        __atomic_store_n(&b->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        cur = (cur + 1) % BLOCK_NR;
    }
    struct tpacket_stats_v3 st = {0};
    socklen_t sl = sizeof st;
    getsockopt(rx, SOL_PACKET, PACKET_STATISTICS, &st, &sl);
    printf("{\"rx\": %llu, \"tx\": %llu, \"drop_bad\": %llu, \"tx_error\": %llu, "
           "\"ring_dropped\": %u, \"ring_freezes\": %u}\n",
           n_rx, n_tx, n_drop_bad, n_tx_err, st.tp_drops, st.tp_freeze_q_cnt);
    return 0;
}
