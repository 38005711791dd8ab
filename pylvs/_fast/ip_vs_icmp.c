/* Frames the engine makes and the NAT of ICMP errors (see ip_vs_icmp.h).
 *
 * Rules come from the kernel: net/ipv4/icmp.c (icmp_send),
 * net/ipv4/tcp_ipv4.c (tcp_v4_send_reset), net/ipv4/ip_output.c
 * (ip_do_fragment), net/ipv4/ip_options.c (ip_options_fragment) and
 * net/netfilter/ipvs/ip_vs_core.c (ip_vs_in_icmp, ip_vs_out_icmp,
 * ip_vs_nat_icmp). pylvs/engine/icmp.py is the Python twin: change both.
 */
#include "ip_vs_icmp.h"

#include <string.h>

#include "csum.h"

#define VNET_LEN 10
#define ETH_LEN 14
#define IP_LEN 20
#define ICMP_LEN 8
#define TCP_LEN 20
#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10
#define IPOPT_END 0
#define IPOPT_NOOP 1
#define IPOPT_COPIED 0x80

uint8_t *pylvs_emit_reserve(struct pylvs_emit *em, uint32_t len, uint16_t port)
{
    if (em == NULL || em->n >= em->max || len > em->cap - em->used)
        return NULL;
    uint8_t *p = em->buf + em->used;
    em->off[em->n] = em->used;
    em->len[em->n] = len;
    em->port[em->n] = port;
    em->used += len;
    em->n++;
    return p;
}

/* Version 4, 5 <= IHL, IHL*4 <= ip_len: the header length, else 0. */
static uint32_t ip_hlen(const uint8_t *ip, uint32_t ip_len)
{
    if (ip_len < IP_LEN || (ip[0] >> 4) != 4 || (ip[0] & 15) < 5)
        return 0;
    uint32_t hl = (uint32_t)(ip[0] & 15) * 4;
    return hl <= ip_len ? hl : 0;
}

/* The kernel's icmp_pointers[].error: every type but the informational ones
 * (echo, timestamp, info, address mask); unknown types count as errors. */
static int icmp_is_error(uint8_t type)
{
    switch (type) {
    case 0: case 8: case 13: case 14: case 15: case 16: case 17: case 18:
        return 0;
    default:
        return 1;
    }
}

/* RFC 1122 3.2.2: no ICMP error (nor reset) about a packet whose source is
 * not one host or whose destination is a group or limited broadcast. The
 * subnet-directed broadcast is the caller's to know (its routes). */
static int bogus_pair(uint32_t saddr, uint32_t daddr)
{
    uint8_t s = (uint8_t)(saddr >> 24), d = (uint8_t)(daddr >> 24);
    if (s == 0 || s == 127 || s >= 224)
        return 1;
    return (d >= 224 && d < 240) || daddr == 0xffffffffu || daddr == 0;
}

static void ip_set_check(uint8_t *ip, uint32_t hl)
{
    pylvs_wr16(ip + 10, 0);
    pylvs_wr16(ip + 10, (uint16_t)~pylvs_csum_bytes(ip, hl));
}

/* vnet header (zero), Ethernet header of a reply to `eth`, and a 20-byte IP
 * header without checksum; returns the IP header. */
static uint8_t *reply_headers(uint8_t *f, const uint8_t *eth, uint32_t ip_total, uint8_t tos,
                              uint16_t id, uint16_t frag, uint8_t proto, uint32_t saddr,
                              uint32_t daddr)
{
    memset(f, 0, VNET_LEN);
    uint8_t *e = f + VNET_LEN;
    memcpy(e, eth + 6, 6);
    memcpy(e + 6, eth, 6);
    e[12] = 0x08;
    e[13] = 0x00;
    uint8_t *ip = e + ETH_LEN;
    ip[0] = 0x45;
    ip[1] = tos;
    pylvs_wr16(ip + 2, (uint16_t)ip_total);
    pylvs_wr16(ip + 4, id);
    pylvs_wr16(ip + 6, frag);
    ip[8] = PYLVS_EMIT_TTL;
    ip[9] = proto;
    pylvs_wr32(ip + 12, saddr);
    pylvs_wr32(ip + 16, daddr);
    ip_set_check(ip, IP_LEN);
    return ip;
}

uint32_t pylvs_icmp_error(struct pylvs_emit *em, uint16_t port, const uint8_t *eth,
                          const uint8_t *ip, uint32_t ip_len, uint8_t type, uint8_t code,
                          uint32_t info, uint32_t saddr, uint16_t ip_id)
{
    uint32_t hl = ip_hlen(ip, ip_len);
    if (hl == 0 || (pylvs_rd16(ip + 6) & IP_OFFSET) != 0)
        return 0;
    uint32_t osaddr = pylvs_rd32(ip + 12);
    if (bogus_pair(osaddr, pylvs_rd32(ip + 16)))
        return 0;
    if (icmp_is_error(type) && ip[9] == PROTO_ICMP && (hl >= ip_len || icmp_is_error(ip[hl])))
        return 0;
    uint32_t quote = ip_len;
    if (quote > PYLVS_ICMP_ERR_MAX - IP_LEN - ICMP_LEN)
        quote = PYLVS_ICMP_ERR_MAX - IP_LEN - ICMP_LEN;
    uint32_t total = IP_LEN + ICMP_LEN + quote;
    uint8_t *f = pylvs_emit_reserve(em, VNET_LEN + ETH_LEN + total, port);
    if (f == NULL)
        return 0;
    uint8_t tos = (uint8_t)((ip[1] & 0x1e) | 0xc0);
    uint8_t *rip = reply_headers(f, eth, total, tos, ip_id, 0, PROTO_ICMP, saddr, osaddr);
    uint8_t *icmp = rip + IP_LEN;
    icmp[0] = type;
    icmp[1] = code;
    pylvs_wr16(icmp + 2, 0);
    pylvs_wr32(icmp + 4, info);
    memcpy(icmp + ICMP_LEN, ip, quote);
    pylvs_wr16(icmp + 2, (uint16_t)~pylvs_csum_bytes(icmp, ICMP_LEN + quote));
    return VNET_LEN + ETH_LEN + total;
}

static uint16_t pseudo_sum(uint32_t saddr, uint32_t daddr, uint8_t proto, uint32_t len)
{
    return pylvs_fold((uint64_t)(saddr >> 16) + (saddr & 0xffff) + (daddr >> 16) +
                      (daddr & 0xffff) + proto + len);
}

uint32_t pylvs_tcp_reset(struct pylvs_emit *em, uint16_t port, const uint8_t *eth,
                         const uint8_t *ip, const uint8_t *tcp, uint32_t tcp_len)
{
    if (tcp_len < TCP_LEN)
        return 0;
    uint8_t flags = tcp[13];
    uint32_t doff = (uint32_t)(tcp[12] >> 4) * 4;
    if ((flags & TH_RST) || doff < TCP_LEN || doff > tcp_len)
        return 0;
    uint32_t osaddr = pylvs_rd32(ip + 12), odaddr = pylvs_rd32(ip + 16);
    if (bogus_pair(osaddr, odaddr))
        return 0;
    uint32_t flen = VNET_LEN + ETH_LEN + IP_LEN + TCP_LEN;
    uint8_t *f = pylvs_emit_reserve(em, flen, port);
    if (f == NULL)
        return 0;
    uint8_t *rip = reply_headers(f, eth, IP_LEN + TCP_LEN, (uint8_t)(ip[1] & 0xfc), 0, IP_DF,
                                 PROTO_TCP, odaddr, osaddr);
    uint8_t *th = rip + IP_LEN;
    memset(th, 0, TCP_LEN);
    memcpy(th, tcp + 2, 2);
    memcpy(th + 2, tcp, 2);
    if (flags & TH_ACK) {
        memcpy(th + 4, tcp + 8, 4);
        th[13] = TH_RST;
    } else {
        uint32_t ack = pylvs_rd32(tcp + 4) + (tcp_len - doff) + !!(flags & TH_SYN) +
                       !!(flags & TH_FIN);
        pylvs_wr32(th + 8, ack);
        th[13] = TH_RST | TH_ACK;
    }
    th[12] = (TCP_LEN / 4) << 4;
    uint16_t sum = pylvs_csum_bytes(th, TCP_LEN);
    pylvs_wr16(th + 16, (uint16_t)~pylvs_fold((uint64_t)sum +
                                              pseudo_sum(odaddr, osaddr, PROTO_TCP, TCP_LEN)));
    return flen;
}

/* ip_options_fragment: options without the copied flag become NOOPs; a
 * malformed option stops the walk (the rest stays as it is). */
static void options_fragment(uint8_t *opt, uint32_t len)
{
    uint32_t i = 0;
    while (i < len) {
        if (opt[i] == IPOPT_END)
            return;
        if (opt[i] == IPOPT_NOOP) {
            i++;
            continue;
        }
        if (i + 1 >= len)
            return;
        uint32_t olen = opt[i + 1];
        if (olen < 2 || olen > len - i)
            return;
        if (!(opt[i] & IPOPT_COPIED))
            memset(opt + i, IPOPT_NOOP, olen);
        i += olen;
    }
}

uint32_t pylvs_ip_fragment(struct pylvs_emit *em, uint16_t port, const uint8_t *eth,
                           const uint8_t *ip, uint32_t ip_len, uint32_t mtu)
{
    uint32_t hl = ip_hlen(ip, ip_len);
    if (hl == 0 || mtu < 68 || ip_len <= mtu || (pylvs_rd16(ip + 6) & (IP_DF | IP_MF | IP_OFFSET)))
        return 0;
    if (em == NULL)
        return 0;
    uint32_t step = (mtu - hl) & ~7u;
    uint32_t data = ip_len - hl;
    uint32_t saved_n = em->n, saved_used = em->used;
    uint8_t later_hdr[60];
    memcpy(later_hdr, ip, hl);
    options_fragment(later_hdr + IP_LEN, hl - IP_LEN);
    uint32_t count = 0;
    for (uint32_t off = 0; off < data; off += step) {
        uint32_t chunk = data - off > step ? step : data - off;
        uint8_t *f = pylvs_emit_reserve(em, VNET_LEN + ETH_LEN + hl + chunk, port);
        if (f == NULL) {
            em->n = saved_n;
            em->used = saved_used;
            return 0;
        }
        memset(f, 0, VNET_LEN);
        memcpy(f + VNET_LEN, eth, ETH_LEN);
        uint8_t *fip = f + VNET_LEN + ETH_LEN;
        memcpy(fip, off == 0 ? ip : later_hdr, hl);
        pylvs_wr16(fip + 2, (uint16_t)(hl + chunk));
        pylvs_wr16(fip + 6, (uint16_t)((off >> 3) | (off + chunk < data ? IP_MF : 0)));
        ip_set_check(fip, hl);
        memcpy(fip + hl, ip + hl + off, chunk);
        count++;
    }
    return count;
}

/* The structural half of pylvs_icmp_inner: everything but the checksum. */
static int icmp_parse(const uint8_t *ip, uint32_t ip_len, struct pylvs_icmp_inner *o)
{
    uint32_t hl = ip_hlen(ip, ip_len);
    if (hl == 0 || ip[9] != PROTO_ICMP || (pylvs_rd16(ip + 6) & (IP_MF | IP_OFFSET)))
        return 0;
    if (ip_len < hl + ICMP_LEN + IP_LEN)
        return 0;
    const uint8_t *icmp = ip + hl;
    if (icmp[0] != 3 && icmp[0] != 4 && icmp[0] != 11)
        return 0;
    uint32_t inner_off = hl + ICMP_LEN;
    const uint8_t *in = ip + inner_off;
    uint32_t ihl = ip_hlen(in, ip_len - inner_off);
    if (ihl == 0 || (pylvs_rd16(in + 6) & IP_OFFSET) || (in[9] != PROTO_TCP && in[9] != PROTO_UDP))
        return 0;
    uint32_t l4_off = inner_off + ihl;
    if (ip_len - l4_off < 8)
        return 0;
    o->type = icmp[0];
    o->code = icmp[1];
    o->proto = in[9];
    o->saddr = pylvs_rd32(in + 12);
    o->daddr = pylvs_rd32(in + 16);
    o->sport = pylvs_rd16(ip + l4_off);
    o->dport = pylvs_rd16(ip + l4_off + 2);
    o->icmp_off = hl;
    o->inner_off = inner_off;
    o->l4_off = l4_off;
    return 1;
}

int pylvs_icmp_inner(const uint8_t *ip, uint32_t ip_len, struct pylvs_icmp_inner *out)
{
    if (!icmp_parse(ip, ip_len, out))
        return 0;
    /* a correct checksum makes the ones' complement sum all ones */
    return pylvs_csum_bytes(ip + out->icmp_off, ip_len - out->icmp_off) == 0xffff;
}

int pylvs_nat_icmp(uint8_t *ip, uint32_t ip_len, int out, uint32_t addr, uint16_t port)
{
    struct pylvs_icmp_inner o;
    if (!icmp_parse(ip, ip_len, &o))
        return 0;
    uint8_t *in = ip + o.inner_off, *l4 = ip + o.l4_off;
    uint32_t old_addr;
    uint16_t old_port;
    if (out) {
        pylvs_wr32(ip + 12, addr);
        old_addr = o.daddr;
        old_port = o.dport;
        pylvs_wr32(in + 16, addr);
        pylvs_wr16(l4 + 2, port);
    } else {
        pylvs_wr32(ip + 16, addr);
        old_addr = o.saddr;
        old_port = o.sport;
        pylvs_wr32(in + 12, addr);
        pylvs_wr16(l4, port);
    }
    /* The quote is usually cut short, so its L4 checksum cannot be
     * recomputed; updated, it becomes the one of the packet the peer sent. */
    uint32_t check_at = o.proto == PROTO_TCP ? 16 : 6;
    if (o.l4_off + check_at + 2 <= ip_len) {
        uint16_t c = pylvs_rd16(l4 + check_at);
        if (o.proto == PROTO_TCP || c != 0) {
            c = pylvs_csum_update(c, pylvs_delta32(old_addr, addr) + pylvs_delta16(old_port, port));
            if (o.proto == PROTO_UDP && c == 0)
                c = 0xffff;
            pylvs_wr16(l4 + check_at, c);
        }
    }
    ip_set_check(in, o.l4_off - o.inner_off);
    ip_set_check(ip, o.icmp_off);
    uint8_t *icmp = ip + o.icmp_off;
    pylvs_wr16(icmp + 2, 0);
    pylvs_wr16(icmp + 2, (uint16_t)~pylvs_csum_bytes(icmp, ip_len - o.icmp_off));
    return 1;
}

/* --- test hooks ----------------------------------------------------------- */

static void emit_close(struct pylvs_emit_views *ev)
{
    for (int i = 0; i < ev->nv; i++)
        PyBuffer_Release(&ev->v[i]);
    ev->nv = 0;
}

int pylvs_emit_open(PyObject *arrays, struct pylvs_emit *em, struct pylvs_emit_views *ev)
{
    static const Py_ssize_t itemsize[5] = {1, 4, 4, 2, 4};
    ev->nv = 0;
    if (!PyTuple_Check(arrays) || PyTuple_GET_SIZE(arrays) != 5) {
        PyErr_SetString(PyExc_TypeError, "emit must be (buf, off, len, port, n)");
        return -1;
    }
    for (int i = 0; i < 5; i++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(arrays, i), &ev->v[i],
                               PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
            emit_close(ev);
            return -1;
        }
        ev->nv++;
        if (ev->v[i].itemsize != itemsize[i]) {
            PyErr_Format(PyExc_ValueError, "emit array %d: item size %zd, expected %zd", i,
                         ev->v[i].itemsize, itemsize[i]);
            emit_close(ev);
            return -1;
        }
    }
    Py_ssize_t max = ev->v[1].len / 4;
    if (ev->v[2].len / 4 < max)
        max = ev->v[2].len / 4;
    if (ev->v[3].len / 2 < max)
        max = ev->v[3].len / 2;
    ev->n = ev->v[4].buf;
    if (ev->v[4].len < 8 || ev->v[0].len > UINT32_MAX || max > UINT32_MAX ||
        ev->n[0] > max || ev->n[1] > ev->v[0].len) {
        PyErr_SetString(PyExc_ValueError, "emit area: n or bytes used out of range");
        emit_close(ev);
        return -1;
    }
    em->buf = ev->v[0].buf;
    em->cap = (uint32_t)ev->v[0].len;
    em->used = ev->n[1];
    em->n = ev->n[0];
    em->max = (uint32_t)max;
    em->off = ev->v[1].buf;
    em->len = ev->v[2].buf;
    em->port = ev->v[3].buf;
    return 0;
}

void pylvs_emit_done(struct pylvs_emit *em, struct pylvs_emit_views *ev)
{
    ev->n[0] = em->n;
    ev->n[1] = em->used;
    emit_close(ev);
}

/* An Ethernet frame whose IP packet of ip_len bytes starts at byte 14. */
static int frame_ok(const Py_buffer *frame, unsigned int ip_len)
{
    if ((size_t)frame->len < ETH_LEN + (size_t)ip_len) {
        PyErr_SetString(PyExc_ValueError, "frame shorter than 14 + ip_len");
        return 0;
    }
    return 1;
}

static PyObject *hook_icmp_error(PyObject *mod, PyObject *args)
{
    PyObject *arrays;
    Py_buffer frame;
    unsigned short port, ip_id;
    unsigned int ip_len;
    unsigned char type, code;
    unsigned long info, saddr;
    if (!PyArg_ParseTuple(args, "OHy*IbbkkH:_icmp_error", &arrays, &port, &frame, &ip_len, &type,
                          &code, &info, &saddr, &ip_id))
        return NULL;
    struct pylvs_emit em;
    struct pylvs_emit_views ev;
    PyObject *res = NULL;
    if (frame_ok(&frame, ip_len) && pylvs_emit_open(arrays, &em, &ev) == 0) {
        const uint8_t *f = frame.buf;
        uint32_t r = pylvs_icmp_error(&em, port, f, f + ETH_LEN, ip_len, type, code,
                                      (uint32_t)info, (uint32_t)saddr, ip_id);
        pylvs_emit_done(&em, &ev);
        res = PyLong_FromUnsignedLong(r);
    }
    PyBuffer_Release(&frame);
    return res;
}

static PyObject *hook_tcp_reset(PyObject *mod, PyObject *args)
{
    PyObject *arrays;
    Py_buffer frame;
    unsigned short port;
    unsigned int ip_len;
    if (!PyArg_ParseTuple(args, "OHy*I:_tcp_reset", &arrays, &port, &frame, &ip_len))
        return NULL;
    struct pylvs_emit em;
    struct pylvs_emit_views ev;
    PyObject *res = NULL;
    if (frame_ok(&frame, ip_len)) {
        const uint8_t *f = frame.buf;
        uint32_t hl = ip_hlen(f + ETH_LEN, ip_len);
        if (hl == 0)
            PyErr_SetString(PyExc_ValueError, "bad IPv4 header");
        else if (pylvs_emit_open(arrays, &em, &ev) == 0) {
            uint32_t r = pylvs_tcp_reset(&em, port, f, f + ETH_LEN, f + ETH_LEN + hl, ip_len - hl);
            pylvs_emit_done(&em, &ev);
            res = PyLong_FromUnsignedLong(r);
        }
    }
    PyBuffer_Release(&frame);
    return res;
}

static PyObject *hook_ip_fragment(PyObject *mod, PyObject *args)
{
    PyObject *arrays;
    Py_buffer frame;
    unsigned short port;
    unsigned int ip_len, mtu;
    if (!PyArg_ParseTuple(args, "OHy*II:_ip_fragment", &arrays, &port, &frame, &ip_len, &mtu))
        return NULL;
    struct pylvs_emit em;
    struct pylvs_emit_views ev;
    PyObject *res = NULL;
    if (frame_ok(&frame, ip_len) && pylvs_emit_open(arrays, &em, &ev) == 0) {
        const uint8_t *f = frame.buf;
        uint32_t r = pylvs_ip_fragment(&em, port, f, f + ETH_LEN, ip_len, mtu);
        pylvs_emit_done(&em, &ev);
        res = PyLong_FromUnsignedLong(r);
    }
    PyBuffer_Release(&frame);
    return res;
}

static PyObject *hook_icmp_inner(PyObject *mod, PyObject *args)
{
    Py_buffer ip;
    unsigned int ip_len;
    if (!PyArg_ParseTuple(args, "y*I:_icmp_inner", &ip, &ip_len))
        return NULL;
    PyObject *res = NULL;
    struct pylvs_icmp_inner o;
    if ((size_t)ip.len < ip_len)
        PyErr_SetString(PyExc_ValueError, "ip shorter than ip_len");
    else if (!pylvs_icmp_inner(ip.buf, ip_len, &o))
        res = Py_NewRef(Py_None);
    else
        res = Py_BuildValue("(BBBkHkHIII)", o.type, o.code, o.proto, (unsigned long)o.saddr,
                            o.sport, (unsigned long)o.daddr, o.dport, o.icmp_off, o.inner_off,
                            o.l4_off);
    PyBuffer_Release(&ip);
    return res;
}

static PyObject *hook_nat_icmp(PyObject *mod, PyObject *args)
{
    Py_buffer ip;
    unsigned int ip_len;
    int out;
    unsigned long addr;
    unsigned short port;
    if (!PyArg_ParseTuple(args, "w*IpkH:_nat_icmp", &ip, &ip_len, &out, &addr, &port))
        return NULL;
    PyObject *res = NULL;
    if ((size_t)ip.len < ip_len)
        PyErr_SetString(PyExc_ValueError, "ip shorter than ip_len");
    else
        res = PyBool_FromLong(pylvs_nat_icmp(ip.buf, ip_len, out, (uint32_t)addr, port));
    PyBuffer_Release(&ip);
    return res;
}

static PyMethodDef icmp_functions[] = {
    {"_icmp_error", hook_icmp_error, METH_VARARGS,
     "_icmp_error(emit, port, frame, ip_len, type, code, info, saddr, ip_id) -> int (tests)"},
    {"_tcp_reset", hook_tcp_reset, METH_VARARGS,
     "_tcp_reset(emit, port, frame, ip_len) -> int (tests)"},
    {"_ip_fragment", hook_ip_fragment, METH_VARARGS,
     "_ip_fragment(emit, port, frame, ip_len, mtu) -> int (tests)"},
    {"_icmp_inner", hook_icmp_inner, METH_VARARGS,
     "_icmp_inner(ip, ip_len) -> tuple | None (tests)"},
    {"_nat_icmp", hook_nat_icmp, METH_VARARGS,
     "_nat_icmp(ip, ip_len, out, addr, port) -> bool (tests)"},
    {NULL, NULL, 0, NULL},
};

int pylvs_icmp_register(PyObject *module)
{
    return PyModule_AddFunctions(module, icmp_functions);
}
