/* What the kernel's receive path would not take in (docs/engine.md steps 7
 * and 9): frames for another host's MAC or a broadcast MAC, bad IPv4 header
 * checksums, malformed options and source routes, martian sources and the
 * reverse-path check of rp_filter.
 *
 * IPVS only ever sees packets the kernel accepted as addressed to this host
 * (ip_rcv_core, ip_route_input_slow, fib_validate_source); pylvs taps the
 * frames before the kernel, so it applies the same rules itself. The per-port
 * facts and the routes come from the control plane (pylvs/control/ports.py)
 * as tables; nothing here reads the kernel.
 */
#ifndef PYLVS_IP_VS_ACCEPT_H
#define PYLVS_IP_VS_ACCEPT_H

#include <stdint.h>
#include <string.h>

#include "csum.h"
#include "engine.h"

#define PORT_F_USED 1
#define PORT_F_CHECK_MAC 2
/* The loopback port: frames of clients on the director itself (docs/io.md,
 * "Clients on the director"); their local source is not a martian. */
#define PORT_F_LOCAL 4
#define ROUTE_NO_PORT 0xffff

/* PORT_DTYPE (align=True) */
typedef struct {
    uint32_t addr;
    uint32_t mtu;
    uint8_t mac[6];
    uint8_t flags;
    uint8_t rp_filter;
} port_row;

#define ROUTE_F_MAC 1 /* tables.ROUTE_F_MAC: `mac` is the next hop's */

/* ROUTE_DTYPE (align=True) */
typedef struct {
    uint32_t prefix;
    uint8_t plen;
    uint8_t pad_;
    uint16_t port;
    uint8_t mac[6];
    uint8_t flags;
    uint8_t pad2_;
} route_row;

_Static_assert(sizeof(port_row) == 16, "PORT_DTYPE is 16 bytes");
_Static_assert(sizeof(route_row) == 16, "ROUTE_DTYPE is 16 bytes");

/* The network facts the engine holds (copies: the control plane may drop
 * its arrays once published). */
struct pylvs_net {
    port_row *ports;
    uint32_t nports;
    route_row *routes; /* longest prefix first */
    uint32_t nroutes;
    /* The leading /32 rows when in ascending prefix order (control's host
     * rows for on-link neighbours): searched by bisection, so a new flow's
     * reverse-path check does not walk them. */
    uint32_t nhost;
    int have_routes;   /* set_routes was called: the reverse path is checked */
    uint32_t *local;   /* ascending */
    uint32_t nlocal;
};

static inline const port_row *pylvs_port(const struct pylvs_net *n, uint16_t port)
{
    if (port < n->nports && (n->ports[port].flags & PORT_F_USED))
        return &n->ports[port];
    return NULL;
}

/* Is the option at `o` (type, length `len` >= 2, within the header)
 * malformed the way the kernel's ip_options_compile refuses on receive?
 * Record route and source routes need a pointer >= 4 and room for the
 * next address; a timestamp a pointer >= 5, room for its entry kind, or an
 * overflow count below 15 once full. */
static inline int pylvs_option_malformed(const uint8_t *o, uint32_t len)
{
    switch (o[0]) {
    case 7:   /* RR */
    case 131: /* LSRR */
    case 137: /* SSRR */
        if (len < 3 || o[2] < 4)
            return 1;
        return o[0] == 7 && o[2] <= len && o[2] + 3u > len;
    case 68: /* TIMESTAMP */
        if (len < 4 || o[2] < 5)
            return 1;
        if (o[2] <= len) {
            uint8_t kind = o[3] & 0x0f;
            if (kind == 0)
                return o[2] + 3u > len;
            if (kind == 1 || kind == 3)
                return o[2] + 7u > len;
            return 0;
        }
        return (o[3] >> 4) == 0x0f;
    }
    return 0;
}

/* The IPv4 header options of step 7 (ihl > 20): ST_DROP_BAD_IP for a
 * malformed one, ST_DROP_SOURCE_ROUTE for LSRR/SSRR, or -1. */
static __attribute__((noinline)) int pylvs_options_refusal(const uint8_t *ip, uint32_t ihl)
{
    for (uint32_t i = 20; i < ihl;) {
        uint8_t t = ip[i];
        if (t == 0)
            break;
        if (t == 1) {
            i++;
            continue;
        }
        if (i + 1 >= ihl || ip[i + 1] < 2 || i + ip[i + 1] > ihl)
            return ST_DROP_BAD_IP;
        int bad = pylvs_option_malformed(ip + i, ip[i + 1]);
        if (bad)
            return ST_DROP_BAD_IP;
        if (t == 131 || t == 137) /* LSRR, SSRR */
            return ST_DROP_SOURCE_ROUTE;
        i += ip[i + 1];
    }
    return -1;
}

/* Is the IPv4 header checksum right (ip_fast_csum == 0)? The common
 * 20-byte header as five native 32-bit words, one fold. */
PYLVS_INLINE int pylvs_ip_csum_ok(const uint8_t *ip, uint32_t ihl)
{
    if (ihl != 20)
        return pylvs_fold(pylvs_csum_bytes(ip, ihl)) == 0xffff;
    uint32_t w[5];
    memcpy(w, ip, 20);
    return pylvs_fold((uint64_t)w[0] + w[1] + w[2] + w[3] + w[4]) == 0xffff;
}

/* The verdict counter refusing a frame of ours at step 7, or -1. `eth` is
 * the Ethernet header, `ip` the IPv4 header of `ihl` bytes (validated).
 * Inline: every frame passes here. */
PYLVS_INLINE int pylvs_refusal(const struct pylvs_net *n, const uint8_t *eth,
                               const uint8_t *ip, uint32_t ihl, uint16_t in_port)
{
    const port_row *p = pylvs_port(n, in_port);
    if (p != NULL && (p->flags & PORT_F_CHECK_MAC)) {
        if (eth[0] & 1)
            return ST_DROP_L2_BCAST;
        if (memcmp(eth, p->mac, 6) != 0)
            return ST_DROP_L2_OTHER_HOST;
    }
    if (!pylvs_ip_csum_ok(ip, ihl))
        return ST_DROP_BAD_IP_CSUM;
    return ihl > 20 ? pylvs_options_refusal(ip, ihl) : -1;
}

static inline int pylvs_is_local(const struct pylvs_net *n, uint32_t addr)
{
    uint32_t lo = 0, hi = n->nlocal;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (n->local[mid] < addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n->nlocal && n->local[lo] == addr;
}

/* The first (longest) route matching addr, or NULL (the kernel's fib_lookup
 * over the main table as control copied it). */
static inline const route_row *pylvs_route(const struct pylvs_net *n, uint32_t addr)
{
    uint32_t lo = 0, hi = n->nhost;
    while (lo < hi) { /* the first host row >= addr */
        uint32_t mid = lo + (hi - lo) / 2;
        if (n->routes[mid].prefix < addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < n->nhost && n->routes[lo].prefix == addr)
        return &n->routes[lo];
    for (uint32_t i = n->nhost; i < n->nroutes; i++) {
        const route_row *r = &n->routes[i];
        uint32_t mask = r->plen == 0 ? 0 : 0xffffffffu << (32 - r->plen);
        if ((addr & mask) == (r->prefix & mask))
            return r;
    }
    return NULL;
}

/* The verdict counter refusing a new flow's source at step 9, or -1. */
static inline int pylvs_martian(const struct pylvs_net *n, uint32_t saddr, uint16_t in_port)
{
    const port_row *p = pylvs_port(n, in_port);
    uint32_t top = saddr >> 24;
    /* Sent by this host: the kernel's LOCAL_OUT hook (ip_vs_local_request4)
     * sees it before any route input, which is what refuses these; but a
     * loopback source never leaves for a real server (every dest here is
     * remote): ip_vs_xmit.c, "Stopping traffic from loopback address". */
    if (p != NULL && (p->flags & PORT_F_LOCAL))
        return top == 127 ? ST_DROP_MARTIAN : -1;
    if (top == 0 || top == 127 || (saddr >> 28) == 14 || saddr == 0xffffffffu ||
        pylvs_is_local(n, saddr))
        return ST_DROP_MARTIAN;
    if (p != NULL && p->rp_filter && n->have_routes) {
        const route_row *r = pylvs_route(n, saddr);
        int back = r != NULL ? r->port : -1;
        if (back < 0 || (p->rp_filter == 1 && back != in_port))
            return ST_DROP_RP_FILTER;
    }
    return -1;
}

#endif
