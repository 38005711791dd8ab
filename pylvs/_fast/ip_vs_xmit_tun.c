/* VS-Tun encapsulation, GSO segmentation, partial checksums (see
 * ip_vs_xmit_tun.h).
 *
 * Rules come from the kernel: net/netfilter/ipvs/ip_vs_xmit.c
 * (ip_vs_tunnel_xmit, ipvs_gue_encap, ip_vs_prepare_tunneled_skb),
 * net/ipv4/af_inet.c (inet_gso_segment), net/ipv4/tcp_offload.c
 * (tcp_gso_segment), net/ipv4/udp_offload.c (__udp_gso_segment),
 * include/linux/virtio_net.h and net/core/dev.c (skb_checksum_help).
 * pylvs/engine/tunnel.py is the Python twin: change both.
 */
#include "ip_vs_xmit_tun.h"

#include <string.h>

#include "csum.h"

#define VNET_LEN 10
#define ETH_LEN 14
#define IP_LEN 20
#define UDP_LEN 8
#define GUE_LEN 4
#define TCP_LEN 20
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define PROTO_TCP 6
#define PROTO_UDP 17
#define VNET_F_NEEDS_CSUM 1
#define TH_FIN 0x01
#define TH_PSH 0x08
#define TH_CWR 0x80

/* Version 4, 5 <= IHL, IHL*4 <= ip_len: the header length, else 0. */
static uint32_t ip_hlen(const uint8_t *ip, uint32_t ip_len)
{
    if (ip_len < IP_LEN || (ip[0] >> 4) != 4 || (ip[0] & 15) < 5)
        return 0;
    uint32_t hl = (uint32_t)(ip[0] & 15) * 4;
    return hl <= ip_len ? hl : 0;
}

static void ip_set_check(uint8_t *ip, uint32_t hl)
{
    pylvs_wr16(ip + 10, 0);
    pylvs_wr16(ip + 10, (uint16_t)~pylvs_csum_bytes(ip, hl));
}

/* The full TCP/UDP checksum of the segment at l4 (l4len bytes, its
 * checksum field already zero) behind the IP header at ip; UDP never
 * sends 0 (RFC 768: 0 means no checksum). */
static uint16_t l4_check(const uint8_t *ip, const uint8_t *l4, uint32_t l4len, uint8_t proto)
{
    uint32_t s = pylvs_rd32(ip + 12), d = pylvs_rd32(ip + 16);
    uint64_t sum = (uint64_t)pylvs_csum_bytes(l4, l4len) + (s >> 16) + (s & 0xffff) +
                   (d >> 16) + (d & 0xffff) + proto + l4len;
    uint16_t c = (uint16_t)~pylvs_fold(sum);
    return (c == 0 && proto == PROTO_UDP) ? 0xffff : c;
}

static uint16_t vnet16(const uint8_t *vnet, uint32_t at)
{
    return (uint16_t)(vnet[at] | (vnet[at + 1] << 8));
}

uint32_t pylvs_tun_overhead(uint8_t type)
{
    switch (type) {
    case PYLVS_TUN_IPIP:
        return PYLVS_IPIP_OVERHEAD;
    case PYLVS_TUN_GUE:
        return PYLVS_GUE_OVERHEAD;
    default:
        return 0;
    }
}

/* Fill the vnet header, Ethernet header and tunnel headers of frame f whose
 * inner packet (inner_len bytes) is already in place after them. */
static void tun_headers(uint8_t *f, const uint8_t *eth_out, const struct pylvs_tun *t,
                        uint32_t inner_len, uint16_t ip_id)
{
    uint32_t ovh = pylvs_tun_overhead(t->type);
    memset(f, 0, VNET_LEN);
    memcpy(f + VNET_LEN, eth_out, ETH_LEN);
    uint8_t *o = f + VNET_LEN + ETH_LEN;
    const uint8_t *in = o + ovh;
    o[0] = 0x45;
    o[1] = in[1];
    pylvs_wr16(o + 2, (uint16_t)(ovh + inner_len));
    pylvs_wr16(o + 4, ip_id);
    pylvs_wr16(o + 6, t->nodf ? 0 : pylvs_rd16(in + 6) & IP_DF);
    o[8] = in[8];
    o[9] = t->type == PYLVS_TUN_GUE ? PROTO_UDP : PYLVS_IPPROTO_IPIP;
    pylvs_wr32(o + 12, t->saddr);
    pylvs_wr32(o + 16, t->daddr);
    ip_set_check(o, IP_LEN);
    if (t->type != PYLVS_TUN_GUE)
        return;
    uint8_t *u = o + IP_LEN;
    uint32_t ulen = UDP_LEN + GUE_LEN + inner_len;
    pylvs_wr16(u, t->sport);
    pylvs_wr16(u + 2, t->dport);
    pylvs_wr16(u + 4, (uint16_t)ulen);
    pylvs_wr16(u + 6, 0);
    u[8] = 0;
    u[9] = PYLVS_IPPROTO_IPIP;
    pylvs_wr16(u + 10, 0);
    if (t->csum)
        pylvs_wr16(u + 6, l4_check(o, u, ulen, PROTO_UDP));
}

uint32_t pylvs_tun_encap(struct pylvs_emit *em, uint16_t port, const uint8_t *eth_out,
                         const uint8_t *ip, uint32_t ip_len, const struct pylvs_tun *t,
                         uint16_t ip_id)
{
    uint32_t ovh = pylvs_tun_overhead(t->type);
    if (ovh == 0 || ip_hlen(ip, ip_len) == 0 || pylvs_rd16(ip + 2) != ip_len ||
        ip_len + ovh > 0xffff)
        return 0;
    uint32_t flen = VNET_LEN + ETH_LEN + ovh + ip_len;
    uint8_t *f = pylvs_emit_reserve(em, flen, port);
    if (f == NULL)
        return 0;
    memcpy(f + VNET_LEN + ETH_LEN + ovh, ip, ip_len);
    tun_headers(f, eth_out, t, ip_len, ip_id);
    return flen;
}

uint32_t pylvs_ipip_encap(struct pylvs_emit *em, uint16_t port, const uint8_t *eth_out,
                          const uint8_t *ip, uint32_t ip_len, uint32_t saddr, uint32_t daddr,
                          uint16_t ip_id)
{
    struct pylvs_tun t = {.type = PYLVS_TUN_IPIP, .saddr = saddr, .daddr = daddr};
    return pylvs_tun_encap(em, port, eth_out, ip, ip_len, &t, ip_id);
}

uint32_t pylvs_gue_encap(struct pylvs_emit *em, uint16_t port, const uint8_t *eth_out,
                         const uint8_t *ip, uint32_t ip_len, uint32_t saddr, uint32_t daddr,
                         uint16_t sport, uint16_t dport, int csum, uint16_t ip_id)
{
    struct pylvs_tun t = {.type = PYLVS_TUN_GUE, .csum = csum != 0, .sport = sport,
                          .dport = dport, .saddr = saddr, .daddr = daddr};
    return pylvs_tun_encap(em, port, eth_out, ip, ip_len, &t, ip_id);
}

/* The checksum field's offset in the L4 header of proto (TCP or UDP). */
static uint32_t check_at(uint8_t proto)
{
    return proto == PROTO_TCP ? 16 : 6;
}

uint32_t pylvs_gso_parse(struct pylvs_gso *g, const uint8_t *vnet, const uint8_t *ip,
                         uint32_t ip_len)
{
    uint8_t gso = vnet[1];
    uint8_t proto;
    if (!(vnet[0] & VNET_F_NEEDS_CSUM))
        return 0;
    if ((gso & ~PYLVS_VNET_GSO_ECN) == PYLVS_VNET_GSO_TCPV4)
        proto = PROTO_TCP;
    else if (gso == PYLVS_VNET_GSO_UDP_L4)
        proto = PROTO_UDP;
    else
        return 0;
    uint32_t hl = ip_hlen(ip, ip_len);
    if (hl == 0 || pylvs_rd16(ip + 2) != ip_len || (pylvs_rd16(ip + 6) & (IP_MF | IP_OFFSET)) ||
        ip[9] != proto)
        return 0;
    uint32_t l4hl = UDP_LEN;
    if (proto == PROTO_TCP) {
        if (ip_len - hl < TCP_LEN)
            return 0;
        l4hl = (uint32_t)(ip[hl + 12] >> 4) * 4;
        if (l4hl < TCP_LEN)
            return 0;
    }
    uint32_t mss = vnet16(vnet, 4);
    if (l4hl > ip_len - hl || mss == 0 || vnet16(vnet, 2) > ETH_LEN + ip_len ||
        vnet16(vnet, 6) != ETH_LEN + hl || vnet16(vnet, 8) != check_at(proto))
        return 0;
    g->ip = ip;
    g->hl = hl;
    g->l4hl = l4hl;
    g->payload = ip_len - hl - l4hl;
    g->mss = mss;
    g->nseg = g->payload == 0 ? 1 : (g->payload + mss - 1) / mss;
    g->proto = proto;
    return g->nseg;
}

static uint32_t seg_payload(const struct pylvs_gso *g, uint32_t i)
{
    uint32_t off = i * g->mss;
    return g->payload - off < g->mss ? g->payload - off : g->mss;
}

uint32_t pylvs_gso_seg_len(const struct pylvs_gso *g, uint32_t i)
{
    return g->hl + g->l4hl + seg_payload(g, i);
}

void pylvs_gso_seg_write(const struct pylvs_gso *g, uint32_t i, uint8_t *out)
{
    uint32_t chunk = seg_payload(g, i), hdrs = g->hl + g->l4hl;
    memcpy(out, g->ip, hdrs);
    memcpy(out + hdrs, g->ip + hdrs + i * g->mss, chunk);
    pylvs_wr16(out + 2, (uint16_t)(hdrs + chunk));
    pylvs_wr16(out + 4, (uint16_t)(pylvs_rd16(g->ip + 4) + i));
    ip_set_check(out, g->hl);
    uint8_t *l4 = out + g->hl;
    uint32_t l4len = g->l4hl + chunk;
    if (g->proto == PROTO_TCP) {
        pylvs_wr32(l4 + 4, pylvs_rd32(l4 + 4) + i * g->mss);
        if (i + 1 < g->nseg)
            l4[13] &= (uint8_t)~(TH_FIN | TH_PSH);
        if (i > 0)
            l4[13] &= (uint8_t)~TH_CWR;
    } else {
        pylvs_wr16(l4 + 4, (uint16_t)l4len);
    }
    uint8_t *field = l4 + check_at(g->proto);
    pylvs_wr16(field, 0);
    pylvs_wr16(field, l4_check(out, l4, l4len, g->proto));
}

uint32_t pylvs_gso_segments(struct pylvs_emit *em, uint16_t port, const uint8_t *eth_out,
                            const uint8_t *vnet, const uint8_t *ip, uint32_t ip_len,
                            const struct pylvs_tun *t, uint16_t ip_id)
{
    struct pylvs_gso g;
    uint32_t ovh = t == NULL ? 0 : pylvs_tun_overhead(t->type);
    if (em == NULL || (t != NULL && ovh == 0) || pylvs_gso_parse(&g, vnet, ip, ip_len) == 0)
        return 0;
    uint32_t saved_n = em->n, saved_used = em->used;
    for (uint32_t i = 0; i < g.nseg; i++) {
        uint32_t len = pylvs_gso_seg_len(&g, i);
        uint8_t *f = pylvs_emit_reserve(em, VNET_LEN + ETH_LEN + ovh + len, port);
        if (f == NULL) {
            em->n = saved_n;
            em->used = saved_used;
            return 0;
        }
        pylvs_gso_seg_write(&g, i, f + VNET_LEN + ETH_LEN + ovh);
        if (t != NULL) {
            tun_headers(f, eth_out, t, len, (uint16_t)(ip_id + i));
        } else {
            memset(f, 0, VNET_LEN);
            memcpy(f + VNET_LEN, eth_out, ETH_LEN);
        }
    }
    return g.nseg;
}

int pylvs_csum_complete(uint8_t *vnet, uint8_t *ip, uint32_t ip_len)
{
    if (!(vnet[0] & VNET_F_NEEDS_CSUM))
        return 0;
    uint32_t hl = ip_hlen(ip, ip_len);
    if (vnet[1] != 0 || hl == 0 || (pylvs_rd16(ip + 6) & (IP_MF | IP_OFFSET)))
        return -1;
    uint8_t proto = ip[9];
    if (proto != PROTO_TCP && proto != PROTO_UDP)
        return -1;
    uint32_t l4len = ip_len - hl;
    if (l4len < (proto == PROTO_TCP ? TCP_LEN : UDP_LEN) || vnet16(vnet, 6) != ETH_LEN + hl ||
        vnet16(vnet, 8) != check_at(proto))
        return -1;
    uint8_t *l4 = ip + hl, *field = l4 + check_at(proto);
    pylvs_wr16(field, 0);
    pylvs_wr16(field, l4_check(ip, l4, l4len, proto));
    vnet[0] = 0;
    return 1;
}

/* --- test hooks ----------------------------------------------------------- */

/* A Python (type, csum, sport, dport, saddr, daddr[, nodf]) tuple, as
 * pylvs.engine.tunnel.Tun, into *t; -1 with TypeError otherwise. */
static int tun_from_tuple(PyObject *o, struct pylvs_tun *t)
{
    unsigned char type, csum, nodf = 0;
    unsigned short sport, dport;
    unsigned long saddr, daddr;
    if (!PyTuple_Check(o) || !PyArg_ParseTuple(o, "bbHHkk|b", &type, &csum, &sport, &dport,
                                               &saddr, &daddr, &nodf)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError,
                            "tun must be (type, csum, sport, dport, saddr, daddr)");
        return -1;
    }
    *t = (struct pylvs_tun){.type = type, .csum = csum, .sport = sport, .dport = dport,
                            .saddr = (uint32_t)saddr, .daddr = (uint32_t)daddr,
                            .nodf = nodf};
    return 0;
}

static int eth_ok(const Py_buffer *eth)
{
    if (eth->len < ETH_LEN) {
        PyErr_SetString(PyExc_ValueError, "eth_out shorter than 14 bytes");
        return 0;
    }
    return 1;
}

/* _tun_encap and _gso_segments take the same arguments (emit, port,
 * eth_out, data, ip_len, tun, ip_id): data is the inner IPv4 packet for
 * the first, a vnet header and Ethernet frame for the second (which also
 * takes tun None: plain segments). */
static PyObject *tun_hook(PyObject *args, int gso)
{
    PyObject *arrays, *tun;
    Py_buffer eth, data;
    unsigned short port, ip_id;
    unsigned int ip_len;
    if (!PyArg_ParseTuple(args, gso ? "OHy*y*IOH:_gso_segments" : "OHy*y*IOH:_tun_encap",
                          &arrays, &port, &eth, &data, &ip_len, &tun, &ip_id))
        return NULL;
    size_t head = gso ? VNET_LEN + ETH_LEN : 0;
    struct pylvs_emit em;
    struct pylvs_emit_views ev;
    struct pylvs_tun t;
    PyObject *res = NULL;
    if ((size_t)data.len < head + ip_len)
        PyErr_Format(PyExc_ValueError, "data shorter than %zu + ip_len", head);
    else if (eth_ok(&eth) && ((gso && tun == Py_None) || tun_from_tuple(tun, &t) == 0) &&
             pylvs_emit_open(arrays, &em, &ev) == 0) {
        const uint8_t *d = data.buf;
        uint32_t r;
        if (gso)
            r = pylvs_gso_segments(&em, port, eth.buf, d, d + head, ip_len,
                                   tun == Py_None ? NULL : &t, ip_id);
        /* through the two named entry points, so both are what is tested */
        else if (t.type == PYLVS_TUN_IPIP)
            r = pylvs_ipip_encap(&em, port, eth.buf, d, ip_len, t.saddr, t.daddr, ip_id);
        else if (t.type == PYLVS_TUN_GUE)
            r = pylvs_gue_encap(&em, port, eth.buf, d, ip_len, t.saddr, t.daddr, t.sport,
                                t.dport, t.csum, ip_id);
        else
            r = pylvs_tun_encap(&em, port, eth.buf, d, ip_len, &t, ip_id);
        pylvs_emit_done(&em, &ev);
        res = PyLong_FromUnsignedLong(r);
    }
    PyBuffer_Release(&eth);
    PyBuffer_Release(&data);
    return res;
}

static PyObject *hook_tun_encap(PyObject *mod, PyObject *args)
{
    return tun_hook(args, 0);
}

static PyObject *hook_gso_segments(PyObject *mod, PyObject *args)
{
    return tun_hook(args, 1);
}

static PyObject *hook_csum_complete(PyObject *mod, PyObject *args)
{
    Py_buffer frame;
    unsigned int ip_len;
    if (!PyArg_ParseTuple(args, "w*I:_csum_complete", &frame, &ip_len))
        return NULL;
    PyObject *res = NULL;
    if ((size_t)frame.len < VNET_LEN + ETH_LEN + (size_t)ip_len)
        PyErr_SetString(PyExc_ValueError, "frame shorter than 24 + ip_len");
    else {
        uint8_t *f = frame.buf;
        res = PyLong_FromLong(pylvs_csum_complete(f, f + VNET_LEN + ETH_LEN, ip_len));
    }
    PyBuffer_Release(&frame);
    return res;
}

static PyMethodDef tun_functions[] = {
    {"_tun_encap", hook_tun_encap, METH_VARARGS,
     "_tun_encap(emit, port, eth_out, ip, ip_len, tun, ip_id) -> int (tests)"},
    {"_gso_segments", hook_gso_segments, METH_VARARGS,
     "_gso_segments(emit, port, eth_out, frame, ip_len, tun | None, ip_id) -> int (tests)"},
    {"_csum_complete", hook_csum_complete, METH_VARARGS,
     "_csum_complete(frame, ip_len) -> int (tests)"},
    {NULL, NULL, 0, NULL},
};

int pylvs_tun_register(PyObject *module)
{
    return PyModule_AddFunctions(module, tun_functions);
}
