/* The NAT rewrite of a frame that belongs to a conn, one function per
 * direction, and the checksum fix-up after it (the kernel's
 * ip_vs_nat_xmit and the protocols' snat/dnat handlers). Static inline:
 * they run in the established path, which must stay one function.
 */
#ifndef PYLVS_IP_VS_XMIT_NAT_H
#define PYLVS_IP_VS_XMIT_NAT_H

#include "ip_vs.h"

/* Checksums after one address and one port of the packet changed, and
 * the other header words whose delta is `ip_delta` (the TTL's, or 0): one
 * update of each checksum field. */
HOT void fix_csums(PylvsEngine *e, uint8_t *frame, uint8_t *ip, uint8_t *l4,
                   uint32_t l4len, uint8_t proto, uint32_t oaddr, uint32_t naddr,
                   uint16_t oport, uint16_t nport, uint64_t ip_delta)
{
    uint64_t daddr_delta = pylvs_delta32(oaddr, naddr);
    pylvs_wr16(ip + 10, pylvs_csum_update(pylvs_rd16(ip + 10), daddr_delta + ip_delta));

    uint8_t *field = l4 + (proto == PROTO_TCP ? 16 : 6);
    if (frame[0] & VNET_F_NEEDS_CSUM) {
        if (frame[1] != 0) {
            /* GSO: the field is the plain pseudo-header sum; the ports are
             * summed by whoever segments the frame. */
            pylvs_wr16(field, pylvs_fold((uint64_t)pylvs_rd16(field) + daddr_delta));
            e->stats[ST_GSO_FRAMES]++;
        } else {
            csum_complete(e, frame, ip, l4, l4len, proto);
        }
        return;
    }
    uint16_t old = pylvs_rd16(field);
    if (proto == PROTO_UDP && old == 0)
        return; /* no checksum was sent: none to keep right */
    uint16_t c = pylvs_csum_update(old, daddr_delta + pylvs_delta16(oport, nport));
    if (c == 0 && proto == PROTO_UDP)
        c = 0xffff;
    pylvs_wr16(field, c);
}


/* Client -> real server: daddr:dport become the dest's, the Ethernet
 * header the one towards the dest; with `dec_ttl` the TTL drops by one
 * here too (the caller has checked it is > 1), in the same checksum
 * update. Returns the egress port. */
HOT uint16_t nat_xmit_in(PylvsEngine *e, const struct conn *c, const dest_row *dest,
                         uint8_t *frame, uint8_t *eth, uint8_t *ip, uint8_t *l4,
                         uint32_t l4len, uint8_t proto, uint32_t daddr, uint16_t dport,
                         int dec_ttl)
{
    pylvs_wr32(ip + 16, c->daddr);
    pylvs_wr16(l4 + 2, c->dport);
    memcpy(eth, dest->dmac, 6);
    memcpy(eth + 6, dest->smac, 6);
    if (dec_ttl)
        ip[8]--;
    fix_csums(e, frame, ip, l4, l4len, proto, daddr, c->daddr, dport, c->dport,
              dec_ttl ? PYLVS_TTL_DEC_DELTA : 0);
    return dest->out_port;
}

/* Real server -> client: saddr:sport become the VIP's, the Ethernet header
 * the reverse of the client's first frame. Returns the egress port. */
HOT uint16_t nat_xmit_out(PylvsEngine *e, const struct conn *c, uint8_t *frame, uint8_t *eth,
                          uint8_t *ip, uint8_t *l4, uint32_t l4len, uint8_t proto,
                          uint32_t saddr, uint16_t sport)
{
    pylvs_wr32(ip + 12, c->vaddr);
    pylvs_wr16(l4, c->vport);
    memcpy(eth, c->cmac, 6);
    memcpy(eth + 6, c->lmac, 6);
    fix_csums(e, frame, ip, l4, l4len, proto, saddr, c->vaddr, sport, c->vport, 0);
    return c->in_port;
}

#endif
