/* The VS-DR (route) transmitter, the kernel's ip_vs_dr_xmit: the IP packet
 * leaves unchanged but for its TTL, in an Ethernet frame addressed to the
 * real server's MAC from the director's MAC on the real server's network.
 * The real server holds the VIP itself (on a non-ARPing interface) and
 * answers the client directly, so nothing comes back this way. Static
 * inline: it runs in the established path, which must stay one function.
 */
#ifndef PYLVS_IP_VS_XMIT_DR_H
#define PYLVS_IP_VS_XMIT_DR_H

#include "ip_vs.h"

/* Client -> real server (the TTL already decremented). Returns the egress
 * port. */
HOT uint16_t dr_xmit(PylvsEngine *e, const dest_row *dest, uint8_t *frame, uint8_t *eth,
                     uint8_t *ip, uint8_t *l4, uint32_t l4len, uint8_t proto)
{
    memcpy(eth, dest->dmac, 6);
    memcpy(eth + 6, dest->smac, 6);
    /* No address or port changed: a GSO frame's partial sum stays right. */
    if (frame[0] & VNET_F_NEEDS_CSUM) {
        if (frame[1] != 0)
            e->stats[ST_GSO_FRAMES]++;
        else
            csum_complete(e, frame, ip, l4, l4len, proto);
    }
    return dest->out_port;
}

#endif
