/* The engine's private layouts, constants and small helpers, shared by its
 * C files (the split follows the kernel's net/netfilter/ipvs):
 *
 *   ip_vs_conn.c      the conn table: slab, index, removal, expiry
 *   ip_vs_core.c      the per-frame pipeline and the miss path
 *   ip_vs_xmit_nat.h  the NAT rewrite and checksum fix-up (inlined)
 *   ip_vs_xmit_dr.h   the DR (route) rewrite: MACs and TTL only (inlined)
 *   engine_type.c     the Python type around them
 *
 * engine.h stays the interface for the rest of the extension (afpacket.c);
 * only the engine's own files include this header.
 */
#ifndef PYLVS_IP_VS_H
#define PYLVS_IP_VS_H

#include "engine.h"

#include <pthread.h>
#include <string.h>

#include "csum.h"
#include "ip_vs_accept.h"
#include "ip_vs_icmp.h"
#include "ip_vs_sched.h"
#include "siphash.h"

/* --- layouts shared with pylvs/engine/tables.py and states.py ------------ */

#define SVC_F_USED 1
#define SVC_F_ONE_PACKET 4 /* -o: the kernel's IP_VS_SVC_F_ONEPACKET */
#define DEST_F_USED 1
#define DEST_F_RESOLVED 2
#define DEST_F_NO_ROUTE 4
#define FWD_MASQ 0
#define FWD_LOCAL 1
#define FWD_TUNNEL 2
#define FWD_ROUTE 3
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17

#define N_DIRS 3
#define N_EVENTS 4
#define N_TCP_STATES 11
#define UDP_STATE N_TCP_STATES
#define N_TIMEOUTS (N_TCP_STATES + 1)
#define S_NONE 0
#define S_ESTABLISHED 1
#define S_SYN_RECV 3
#define S_FIN_WAIT 4 /* states.*, the kernel's numbering */
#define S_TIME_WAIT 5
#define S_CLOSE 6
#define S_CLOSE_WAIT 7
#define S_SYNACK 10
#define S_SYN_SENT 2
/* The TCP states a conn counts as active in (its dest's activeconns): the
 * kernel's tcp_state_active_table (ip_vs_proto_tcp.c, since Linux 4.8's
 * "count pre-established TCP states as active"), so least-connection
 * schedulers see handshakes in progress. Every other state, and UDP, is
 * inactive. */
#define ACTIVE_STATES ((1u << S_ESTABLISHED) | (1u << S_SYN_SENT) | (1u << S_SYN_RECV) | \
                       (1u << S_SYNACK))
#define DIR_INPUT 0
#define DIR_OUTPUT 1
#define DIR_INPUT_ONLY 2
#define EV_SYN 0
#define EV_FIN 1
#define EV_ACK 2
#define EV_RST 3
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

#define N_TRAFFIC 5
#define T_CONNS 0
#define T_INPKTS 1
#define T_OUTPKTS 2
#define T_INBYTES 3
#define T_OUTBYTES 4
#define C_ACTIVE 0
#define C_INACTIVE 1

#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4

#define IP_DF 0x4000
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_FRAG_NEEDED 4
#define ICMP_SOURCE_QUENCH 4
#define IP_OFFSET_MASK 0x1fff
#define ICMP_TIME_EXCEEDED 11
#define ICMP_EXC_TTL 0

/* SERVICE_DTYPE (align=True) */
typedef struct {
    uint32_t vaddr;
    uint16_t vport;
    uint8_t proto;
    uint8_t flags;
    uint32_t timeout; /* persistence: template timeout in s, 0 = not persistent */
    uint32_t netmask; /* persistence granularity (-M), host order */
} svc_row;

/* DEST_DTYPE (align=True) */
typedef struct {
    uint32_t daddr;
    uint16_t dport;
    uint16_t svc;
    uint32_t weight;
    uint8_t fwd;
    uint8_t flags;
    uint16_t out_port;
    uint8_t dmac[6];
    uint8_t smac[6];
    uint8_t tun_type;
    uint8_t tun_flags;
    uint16_t tun_port;
} dest_row;

_Static_assert(sizeof(svc_row) == 16, "SERVICE_DTYPE is 16 bytes");
_Static_assert(sizeof(dest_row) == 32, "DEST_DTYPE is 32 bytes");

/* How a conn's packets leave, bound once when the conn is made from its
 * dest's fwd (the kernel's ip_vs_bind_xmit); frames switch on it and never
 * look at the dest to decide again. */
#define XMIT_NAT 0  /* FWD_MASQ: rewritten both ways; the only kind with an OUT key */
#define XMIT_DR 1   /* FWD_ROUTE: MACs and TTL only */
#define XMIT_NONE 2 /* not supported yet (FWD_LOCAL, GRE tunnels): drop_fwd_method */
#define XMIT_TUN 3  /* FWD_TUNNEL, IPIP or GUE: encapsulated into the emit area */
#define TUN_F_CSUM 1 /* dest tun_flags: pylvs.forward.tunnel.TUN_F_CSUM (--tun-csum) */
/* Scratch room for the fragments of one packet before they are encapsulated. */
#define SCRATCH_BYTES (64u * 1024 + 4096)

/* --- conns and the index -------------------------------------------------- */

/* One cache line per conn: an established frame touches one index entry and
 * one line here. */
struct conn {
    uint32_t caddr, vaddr, daddr;
    uint16_t cport, vport, dport;
    uint8_t proto, state;
    /* Client packets (the kernel's in_pkts, an atomic_t: it wraps), read by
     * drop_entry's todrop_entry and the sync rule's pkts; a template's
     * counts the sync calls of the conns it controls. */
    uint32_t in_pkts;
    double expires;
    uint32_t dest;
    uint16_t svc;
    uint16_t in_port;
    uint8_t fwd;
    uint8_t used;
    /* The kernel's sync_endtime: now + timeout when last sent, in whole
     * seconds mod 2^16 (ip_vs_sync.c). */
    uint16_t sync_end;
    union {
        struct {
            uint8_t cmac[6];
            uint8_t lmac[6];
        };
        uint32_t tpl_timeout; /* a template's timeout in s (it has no MACs) */
    };
    uint8_t replied; /* an OUTPUT-direction packet was seen (the kernel's !NOOUTPUT) */
    uint8_t xmit;    /* XMIT_*, bound at creation */
    /* The sync rule's memory (ip_vs_sync.c): the state last sent (the
     * kernel's old_state) in the low 4 bits, the refresh retries in bits 4-5. */
    uint8_t sync_old;
    uint8_t flags;   /* CONN_F_* */
    /* A conn: its template's slot + 1 (0: none; the kernel's cp->control).
     * A template: the conns it controls (the kernel's n_control). */
    uint32_t control;
} __attribute__((aligned(64)));
_Static_assert(sizeof(struct conn) == 64, "a conn is one cache line");
_Static_assert(offsetof(struct conn, expires) == 24 && offsetof(struct conn, control) == 60,
               "the sync fields fill holes: no field moved");

/* Persistence templates (docs/engine.md, "Persistence"; kernel
 * ip_vs_sched_persist): a template is a conn in the same table with
 * CONN_F_TEMPLATE, indexed under its IN key with TPL_PROTO or'ed into the
 * protocol, so that no frame's tuple (TCP or UDP) can reach it. The
 * template state (`state`) is CTPL_S_*. */
#define CONN_F_TEMPLATE 1
#define CONN_F_UNHASHED 2 /* an invalidated template: out of the index until it expires */
#define CONN_F_SYNCED 4   /* installed by sync_install (the kernel's IP_VS_CONN_F_SYNC) */
#define CONN_F_NO_L2 8    /* installed by sync: the client's MAC and port are learnt from
                           * its first frame; replies wait for it (drop_sync_no_mac) */
#define TPL_PROTO 0x80
#define CTPL_S_ASSURED 1
#define TPL_LATE_TIMEOUT 60 /* s: a template expiring while it controls conns
                             * waits this long again (ip_vs_conn_expire) */
#define FTP_PORT 21
#define CONN_F_TEMPLATE_TUPLE 0x1000 /* the tuple's fwd bit: tables.CONN_F_TEMPLATE */

/* The free list threads through free slots in their `dest` field. */
#define NO_SLOT UINT32_MAX

/* ref 0 is an empty bucket; otherwise ref - 1 = conn slot << 1 | direction.
 * tag holds the low 32 bits of the key's hash: the home bucket is tag & mask,
 * and comparing tags first keeps most foreign entries from costing a conn
 * cache miss. */
struct bucket {
    uint32_t tag;
    uint32_t ref;
};

/* Frames between prefetching a conn and using it; its index bucket is
 * prefetched BUCKET_DISTANCE frames ahead. Measured in interleaved rounds
 * (bench/README.md): 16 beat 8 and 4 (median per-round ratios 0.95 and
 * 0.93), and 16/48, 8/32 and 12/24 (conn/bucket) were no better than
 * 16/32. */
#ifndef PREFETCH_DISTANCE
#define PREFETCH_DISTANCE 16
#endif
#ifndef BUCKET_DISTANCE
#define BUCKET_DISTANCE (2 * PREFETCH_DISTANCE)
#endif

/* From this many index buckets (16 MiB of index, some 350 k to 700 k conns
 * and a table past the L3 cache) the lookup pipeline prefetches a parse
 * group at a time (pylvs_engine_run). */
#ifndef GROUPED_MIN_BUCKETS
#define GROUPED_MIN_BUCKETS (1u << 21)
#endif

#define N_BATCH_ARRAYS 10

#define KEY_IN 0
#define KEY_OUT 1
#define MAX_CAPACITY (1u << 26)

/* A token bucket for the messages the engine makes on its own
 * (docs/engine.md, rate limits): full at first use. */
struct rate_bucket {
    double tokens, last;
    int primed;
};

/* The slab is reserved as address space for `capacity` conns and made
 * usable in units of SLAB_UNIT bytes (one huge page) as slots come into use;
 * a table smaller than a unit is made usable whole, rounded to SLAB_PAGE.
 * The index starts at INDEX_MIN buckets and doubles while INDEX_PER_CONN x
 * conns would exceed it: at most two keys per conn, so a load <= 2/3 (a
 * successful linear probe reads 2 buckets on average, a failed one 5, all
 * 8-byte buckets, mostly one cache line). At 10 M conns that is 2^25
 * buckets, 256 MiB, where 4 per conn (load <= 1/2) took 512 MiB: a
 * lookup's random reads range over less, and at that size their cost is
 * mostly address translation, which follows the range (bench/README.md,
 * "table-scale"). docs/engine.md, Conn table. */
#define SLAB_UNIT (2u << 20)
#define SLAB_PAGE 4096u
#define INDEX_MIN 16u
#define INDEX_PER_CONN 3
/* Slots drawn at the limit to find a conn to replace (docs/engine.md). */
#define EVICT_SAMPLES 32

/* One destination's ICMP error allowance (inet_peer's rate_tokens, in ms). */
#define ICMP_PEERS 1024
struct icmp_peer {
    uint32_t addr;
    int used;
    double tokens, last;
};

/* Path MTUs learned from routers on tunnel paths (docs/engine.md, "Tunnel
 * path MTU"), one per real-server address as the kernel keeps one in the
 * route to the RIP. A fixed open-addressed cache, slot
 * (daddr * 0x9E3779B1 mod 2^32) >> 24, a newcomer replacing whoever holds
 * its slot: entries are only made for RIPs with a live Tun conn, so the
 * cache stays small, costs no allocation or probing on the data path, and
 * forged errors cannot grow it; a RIP pushed out just falls back to the
 * port MTU until its path's router says so again. */
#define TUN_PMTU_SLOTS 256
#define TUN_PMTU_EXPIRES 600.0 /* net.ipv4.route.mtu_expires, s */
#define TUN_PMTU_MIN 552u      /* net.ipv4.route.min_pmtu */
struct tun_pmtu {
    uint32_t daddr;
    uint32_t mtu; /* 0: empty */
    double expires;
};

struct pylvs_engine {
    PyObject_HEAD
    uint32_t capacity; /* the limit */
    uint32_t conn_count;
    struct conn *conns;
    uint32_t high;      /* slots [0, high) have been used */
    uint32_t free_head; /* LIFO list of freed slots below high, NO_SLOT if none */
    size_t slab_ready;  /* bytes of the slab made usable */
    size_t slab_size;   /* bytes reserved (capacity conns, rounded up) */
    void *slab_map;     /* the reservation as mapped (aligned within) */
    size_t slab_map_len;
    struct bucket *index;
    uint32_t mask;
    uint32_t hand; /* the expiry clock hand over [0, high) */
    uint64_t rng;  /* splitmix64 state for eviction samples, from k0 ^ k1 */
    uint64_t k0, k1;
    int64_t sysctl[SYS__COUNT]; /* tables.SYSCTL_NAMES */
    uint8_t trans[N_DIRS][N_EVENTS][N_TCP_STATES];
    double timeouts[N_TIMEOUTS];
    int busy; /* inside the scheduler upcall: the tables must stay put */
    uint64_t upcalls; /* scheduler upcalls made: Python ran, frames may have changed */
    /* Workers (docs/io.md): forward() runs the engine without the GIL,
     * holding `mu` for its batch; every method called from Python takes
     * `mu` too, so control may read conns or swap tables from any thread.
     * `nogil` is the forward caller's saved thread state while the GIL is
     * let go: the scheduler upcall takes the GIL back with it. */
    pthread_mutex_t mu;
    pthread_t owner; /* the thread holding mu (valid while it is held) */
    PyThreadState *nogil;

    PyObject *schedule;
    PyObject *counters;
    Py_buffer stats_view, svc_stats_view, dest_stats_view, dest_conns_view, dest_persist_view;
    uint64_t *stats;
    uint64_t (*svc_stats)[N_TRAFFIC];
    uint64_t (*dest_stats)[N_TRAFFIC];
    int32_t (*dest_conns)[2];
    int32_t *dest_persist; /* templates per dest (persistconns), shared like dest_conns */
    uint32_t max_services, max_dests;

    int have_tables;
    Py_buffer services_view, dests_view;
    const svc_row *services;
    const dest_row *dests;
    uint32_t nservices, ndests;
    int32_t *svc_hash; /* open addressing over used services: slot, or -1 */
    uint32_t nullsvc;  /* used services of port 0: find_service falls back to them */
    uint32_t svc_mask;

    int batch_cached;
    Py_buffer batch_views[N_BATCH_ARRAYS];

    struct pylvs_net net;          /* ports, routes, local addresses (copies) */
    struct rate_bucket icmp_rl, rst_rl;
    struct icmp_peer peers[ICMP_PEERS]; /* the per-destination ICMP limit */
    struct tun_pmtu pmtu[TUN_PMTU_SLOTS]; /* learned tunnel path MTUs */
    uint16_t ip_id;                /* the next IP ID of a packet the engine makes */
    uint8_t *scratch;              /* SCRATCH_BYTES, made on first use */

    /* The upcall limit (docs/engine.md, "Upcall limit"): while `pressure`
     * is set by the backend, each scheduler upcall draws `upcall_cost`
     * seconds (control measures it) from the `upcall` bucket, which refills
     * at upcall_share percent of `now`'s pace up to UPCALL_WINDOW's worth. */
    int pressure;
    double upcall_cost;
    struct rate_bucket upcall;
    struct rate_bucket pressure_rl; /* pressure_conn_rate's bucket, in conns */

    /* Defence (docs/engine.md, "Defence"), set by control once a second as
     * the kernel's defense_work: drop_packet's rate and countdown
     * (ip_vs_todrop), drop_entry's per-in_pkts countdowns (todrop_entry). */
    int64_t drop_rate, drop_counter;
    int8_t todrop_counter[9];
    /* A one-packet (-o) conn made by the frame being processed: removed once
     * the frame is done (the kernel's ip_vs_conn_put of an OPS conn). */
    uint32_t ops_slot;

    /* Schedulers in C and the overload flag (ip_vs_sched.h): the shared
     * counters.dest_flags and .sched_state, and the tables set_sched took
     * (nsched_svc 0: every service asks Python). */
    Py_buffer dest_flags_view, sched_state_view, sched_svc_view, sched_dest_view, thresh_view,
        sched_table_view;
    uint8_t *dest_flags;
    int32_t (*sched_state)[SCHED_STATE_WORDS];
    const sched_svc_row *sched_svc;
    const sched_dest_row *sched_dest;
    const dest_thresh_row *thresh;
    const int32_t *sched_table; /* sh/dh/mh buckets: indices into the service's run, -1 none */
    uint32_t nsched_svc, nthresh;

    /* Sync master (ip_vs_sync.c): records queued by the frame path for
     * sync_drain, a ring of sync_cap; NULL while master mode is off. */
    struct sync_rec *sync_q;
    uint32_t sync_cap, sync_head, sync_len;
};

/* The upcall limit's bucket holds this many seconds of `now` at the share:
 * 10 ms at 50% lets 5 ms of upcalls through at once when pressure starts. */
#define UPCALL_WINDOW 0.01
/* s: pressure_conn_rate's burst (ip_vs_core.c pressure_admits). */
#define PRESSURE_WINDOW 0.01

/* The established path is one function: GCC would otherwise leave these
 * out of line in a function as large as engine_frame. */
#define HOT static inline __attribute__((always_inline))

static inline int state_active(uint8_t state)
{
    return state < N_TCP_STATES && (ACTIVE_STATES >> state) & 1u;
}

/* dest_conns is ONE array shared by every worker's engine (the kernel's
 * atomic_t activeconns/inactconns): the scheduler reads the sum as is. */
static inline void dest_conns_add(PylvsEngine *e, uint32_t dest, int col, int32_t v)
{
    __atomic_fetch_add(&e->dest_conns[dest][col], v, __ATOMIC_RELAXED);
}

static inline void dest_persist_add(PylvsEngine *e, uint32_t dest, int32_t v)
{
    __atomic_fetch_add(&e->dest_persist[dest], v, __ATOMIC_RELAXED);
}

/* SipHash-1-3 of the 13-byte tuple laid out as it sits in registers: the
 * message is a1, a2 (4 bytes each), p1, p2 (2 bytes each), proto, all
 * little-endian host-order values, read as SipHash's two little-endian
 * words, so no byte is swapped or moved to build them.
 *
 * Why SipHash and not the kernel IPVS's jhash_3words with a random seed
 * (ip_vs_conn.c, ip_vs_conn_hashkey): the conn table is filled by
 * clients' choice of caddr and cport, and a seeded non-cryptographic mix
 * offers no bound on how well an attacker who probes it can aim keys at
 * one probe run; SipHash is a keyed PRF (Aumasson and Bernstein, 2012)
 * and with a 128-bit random key per engine its outputs cannot be
 * predicted. Netfilter made the same move for the conntrack and NAT
 * tables ("netfilter: conntrack: switch to siphash", Linux 5.15), and
 * SipHash-1-3 is what CPython keys its str hashes with. One hash is ~75
 * instructions; the batch path (pylvs_engine_run) hashes eight tuples at
 * once in AVX-512 lanes where the CPU has them (pylvs_siphash13_2w_x8,
 * ~11 instructions a frame; bench/README.md, "Where the engine's
 * nanoseconds go"), a pipeline stage ahead of their use. */
HOT uint64_t key_word0(uint32_t a1, uint32_t a2)
{
    return (uint64_t)a1 | (uint64_t)a2 << 32;
}

HOT uint64_t key_word1(uint8_t proto, uint16_t p1, uint16_t p2)
{
    return (uint64_t)p1 | (uint64_t)p2 << 16 | (uint64_t)proto << 32 | (uint64_t)13 << 56;
}

HOT uint64_t key_hash(const PylvsEngine *e, uint8_t proto, uint32_t a1,
                      uint16_t p1, uint32_t a2, uint16_t p2)
{
    return pylvs_siphash13_2w(e->k0, e->k1, key_word0(a1, a2), key_word1(proto, p1, p2));
}

/* Only NAT conns are indexed under their OUT key: the replies of the others
 * never pass the director (the kernel hashes only NAT dests for replies). */
static inline int conn_has_out_key(const struct conn *c)
{
    return c->xmit == XMIT_NAT;
}

/* The state table of client packets: DIR_INPUT for NAT, else DIR_INPUT_ONLY
 * (the kernel's IP_VS_CONN_F_NOOUTPUT conns). */
static inline int conn_in_dir(const struct conn *c)
{
    return c->xmit == XMIT_NAT ? DIR_INPUT : DIR_INPUT_ONLY;
}

static inline uint64_t conn_key_hash(const PylvsEngine *e, const struct conn *c, int dir)
{
    if (dir == KEY_IN)
        return key_hash(e, c->proto, c->caddr, c->cport, c->vaddr, c->vport);
    return key_hash(e, c->proto, c->daddr, c->dport, c->caddr, c->cport);
}

/* The service hash's key: the 7-byte (proto, vaddr, vport), keyed too, so
 * that service addresses cannot be chosen to collide. */
HOT uint64_t svc_key_hash(const PylvsEngine *e, uint8_t proto, uint32_t vaddr, uint16_t vport)
{
    return key_hash(e, proto, vaddr, vport, 0, 0);
}

HOT int conn_matches(const struct conn *c, int dir, uint8_t proto, uint32_t a1,
                     uint16_t p1, uint32_t a2, uint16_t p2)
{
    if (c->proto != proto)
        return 0;
    if (dir == KEY_IN)
        return c->caddr == a1 && c->cport == p1 && c->vaddr == a2 && c->vport == p2;
    return c->daddr == a1 && c->dport == p1 && c->caddr == a2 && c->cport == p2;
}

/* The bucket holding the key, or NULL. */
HOT struct bucket *index_find(PylvsEngine *e, uint64_t h, uint8_t proto,
                              uint32_t a1, uint16_t p1, uint32_t a2, uint16_t p2)
{
    uint32_t tag = (uint32_t)h;
    uint32_t i = tag & e->mask;
    for (;;) {
        struct bucket *b = &e->index[i];
        if (b->ref == 0)
            return NULL;
        if (b->tag == tag) {
            uint32_t r = b->ref - 1;
            if (conn_matches(&e->conns[r >> 1], r & 1, proto, a1, p1, a2, p2))
                return b;
        }
        i = (i + 1) & e->mask;
    }
}

HOT int finish(PylvsEngine *e, int stat, int verdict)
{
    e->stats[stat]++;
    return verdict;
}

/* The state table's event for a segment's flags, the first of RST, SYN,
 * FIN, ACK that is set, or -1: a table over those four bits (FIN, SYN and
 * RST are bits 0-2, ACK is bit 4, moved to bit 3). */
HOT int tcp_event(uint8_t flags)
{
    static const int8_t ev[16] = {
        -1,     EV_FIN, EV_SYN, EV_SYN, EV_RST, EV_RST, EV_RST, EV_RST,
        EV_ACK, EV_FIN, EV_SYN, EV_SYN, EV_RST, EV_RST, EV_RST, EV_RST,
    };
    return ev[(flags & (TH_FIN | TH_SYN | TH_RST)) | (flags & TH_ACK) >> 1];
}

/* --- shared by the transmitters ------------------------------------------ */

/* TTL - 1 with the header checksum updated (RFC 1624), as every forwarded
 * packet (kernel ip_decrease_ttl); the caller has checked TTL > 1. */
HOT void ip_decrease_ttl(uint8_t *ip)
{
    ip[8]--;
    pylvs_wr16(ip + 10, pylvs_csum_update(pylvs_rd16(ip + 10), PYLVS_TTL_DEC_DELTA));
}

/* A partial L4 checksum without GSO (TP_STATUS_CSUMNOTREADY) completed
 * over pseudo header and segment; the vnet flags cleared. */
HOT void csum_complete(PylvsEngine *e, uint8_t *frame, const uint8_t *ip, uint8_t *l4,
                       uint32_t l4len, uint8_t proto)
{
    uint8_t *field = l4 + (proto == PROTO_TCP ? 16 : 6);
    pylvs_wr16(field, 0);
    uint64_t s = (uint64_t)pylvs_csum_bytes(l4, l4len) + (pylvs_rd32(ip + 12) >> 16) +
                 (pylvs_rd32(ip + 12) & 0xffff) + (pylvs_rd32(ip + 16) >> 16) +
                 (pylvs_rd32(ip + 16) & 0xffff) + proto + l4len;
    uint16_t c = (uint16_t)~pylvs_fold(s);
    if (c == 0 && proto == PROTO_UDP)
        c = 0xffff;
    pylvs_wr16(field, c);
    frame[0] = 0;
    e->stats[ST_CSUM_PARTIAL_FIXED]++;
}

/* --- ip_vs_conn.c -------------------------------------------------------- */

/* A template that controls conns: it never leaves the table (its expiry
 * waits, it is never evicted), so a conn's `control` stays valid. */
static inline int tpl_held(const struct conn *c)
{
    return (c->flags & CONN_F_TEMPLATE) && c->control != 0;
}

/* An empty table for up to `capacity` conns: 0, or -1 with MemoryError set. */
int conn_table_init(PylvsEngine *e, uint32_t capacity);
void conn_table_free(PylvsEngine *e);
void index_insert(PylvsEngine *e, uint64_t h, uint32_t slot, int dir);
/* Take the conn in `slot` out of the index and its dest's counts, free the
 * slot, and count it under `stat` (ST_CONNS_EXPIRED, _EVICTED, _REUSED). */
void conn_remove(PylvsEngine *e, uint32_t slot, int stat);
/* Take an invalidated template out of the index (ip_vs_check_template): it
 * shows cport 0, vport and dport 65535, as the kernel rehashes it there,
 * until its timer removes it. */
void conn_unhash(PylvsEngine *e, uint32_t slot);
/* Bytes the conn table holds now (slab made usable + index). */
size_t conn_table_memory(const PylvsEngine *e);

static inline int conn_table_full(const PylvsEngine *e)
{
    return e->conn_count >= e->capacity;
}

/* At the limit: the slot of a conn a new one may replace, or -1 (none may
 * be; the caller refuses with drop_table_full). Draws from e->rng. */
int64_t conn_victim(PylvsEngine *e, double now);
/* A slot for a new conn, ready for index_insert: when the table is full,
 * `victim` (from conn_victim, same `now`) is removed first. Grows the slab
 * and the index as needed. NO_SLOT when memory runs out. */
uint32_t conn_alloc(PylvsEngine *e, int64_t victim, double now);
/* drop_entry: the kernel's ip_vs_random_dropentry over ceil(high / 32)
 * random slots; returns the conns removed (conns_dropped). */
long conn_drop_entries(PylvsEngine *e, double now);
/* Verify the index against the slab: 0, or -1 with AssertionError set. */
int conn_table_check(PylvsEngine *e);

/* --- ip_vs_sync.c -------------------------------------------------------- */

/* pylvs.engine.sync.SYNC_DTYPE (align=True), host order. */
struct sync_rec {
    uint8_t proto;
    uint16_t state;
    uint32_t flags;
    uint32_t caddr;
    uint16_t cport;
    uint32_t vaddr;
    uint16_t vport;
    uint32_t daddr;
    uint16_t dport;
    uint32_t fwmark;
    uint32_t timeout;
};
_Static_assert(sizeof(struct sync_rec) == 40, "SYNC_DTYPE is 40 bytes");

/* Whole seconds (floor) mod 2^16: the clock of sync_end. */
static inline uint16_t sync_sec16(double t)
{
    int64_t s = (int64_t)t;
    return (uint16_t)(s - ((double)s > t));
}

/* A new conn's or template's sync memory (the kernel's ip_vs_conn_new:
 * old_state 0, sync_endtime now). */
static inline void sync_conn_init(struct conn *c, double now)
{
    c->sync_old = 0;
    c->sync_end = sync_sec16(now);
}

/* The master's hook, for every client frame of a conn (the kernel's
 * ip_vs_in_hook -> ip_vs_sync_conn): queue the conn and its template as the
 * sync rule says. `ops`: a one-packet conn (never sent itself). */
void sync_conn(PylvsEngine *e, struct conn *c, int ops, double now);
/* The first client frame of a conn installed by sync: its MACs and port. */
void sync_learn_l2(struct conn *c, const uint8_t *eth, uint16_t in_port);
/* A conn installed by sync that must send toward a client it has not heard
 * (a NAT reply, an error relayed to the client): the kernel routes it (FIB,
 * neighbour table); here the route to caddr, when control gave it the next
 * hop's MAC (ROUTE_F_MAC), binds the client side as a first frame would.
 * 1: bound (sync_l2_routed), 0: no such route, the caller drops as before. */
int sync_route_l2(PylvsEngine *e, struct conn *c);
void sync_free(PylvsEngine *e);
PyObject *pylvs_sync_set_master(PylvsEngine *e, PyObject *arg);
PyObject *pylvs_sync_drain(PylvsEngine *e, PyObject *arg);
PyObject *pylvs_sync_install(PylvsEngine *e, PyObject *args);
PyObject *pylvs_sync_chunk(PylvsEngine *e, PyObject *args);

/* --- ip_vs_core.c -------------------------------------------------------- */

/* The used service slot for (proto, vaddr, vport), else the port-0 service
 * of (proto, vaddr), or -1 (the kernel's ip_vs_service_find). */
int find_service(const PylvsEngine *e, uint8_t proto, uint32_t vaddr, uint16_t vport);
/* The transmitter of a conn to this dest (the kernel's ip_vs_bind_xmit). */
uint8_t conn_bind_xmit(const dest_row *dest);

/* expire_nodest_conn's flush (the kernel's ip_vs_expire_nodest_conn_flush,
 * queued when a dest is deleted): every conn whose dest is gone is
 * expired; returns how many. */
long conn_expire_nodest(PylvsEngine *e);

/* Run the frames of one pylvs_engine_run (engine.h) through the
 * pipeline; lens[i] are their lengths (within their buffers). Returns the
 * V_TX count. */

/* Run `count` frames of a batch (slots of `slot` bytes; every lens[i] was
 * checked against it) through the pipeline; returns the V_TX count. */
long engine_batch(PylvsEngine *e, uint8_t *frames, Py_ssize_t slot, const uint32_t *lens,
                  const uint16_t *ports, uint8_t *verdicts, uint16_t *outs, Py_ssize_t count,
                  double now, struct pylvs_emit *em);

#endif
