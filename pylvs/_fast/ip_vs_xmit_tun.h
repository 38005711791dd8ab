/* VS-Tun: IPIP and GUE encapsulation into the emit area, software
 * segmentation of GSO frames (no virtio GSO type describes IPIP), and the
 * completion of a partial checksum.
 *
 * The pure-Python twins, byte for byte the same, are in
 * pylvs/engine/tunnel.py; tests/test_tunnel.py holds both to scapy and to
 * each other. Conventions as in ip_vs_icmp.h: `ip` points at an IPv4
 * header with `ip_len` readable bytes (the packet's total length);
 * addresses and ports are host order, fields written network order; an
 * emitted frame is a 10-byte all-zero virtio_net_hdr and a complete
 * Ethernet frame with every checksum full. `vnet` points at the frame's
 * 10-byte virtio_net_hdr (little-endian fields: flags u8, gso_type u8,
 * hdr_len, gso_size, csum_start, csum_offset; csum_start and hdr_len
 * count from the Ethernet header).
 */
#ifndef PYLVS_IP_VS_XMIT_TUN_H
#define PYLVS_IP_VS_XMIT_TUN_H

#include <stdint.h>

#include "ip_vs_icmp.h"

/* Tunnel types, numbered as ipvsadm's IP_VS_CONN_F_TUNNEL_TYPE_* (the
 * dest row's tun_type). GRE (2) is not built: pylvs_tun_overhead says 0. */
#define PYLVS_TUN_IPIP 0
#define PYLVS_TUN_GUE 1
/* Bytes a tunnel adds in front of the inner packet: outer IPv4 (20), and
 * for GUE a UDP header (8) and a 4-byte GUE header. */
#define PYLVS_IPIP_OVERHEAD 20
#define PYLVS_GUE_OVERHEAD 32
#define PYLVS_IPPROTO_IPIP 4

/* The tunnel of one Tun dest, as the engine reads it from the dest row. */
struct pylvs_tun {
    uint8_t type;            /* PYLVS_TUN_IPIP or PYLVS_TUN_GUE */
    uint8_t csum;            /* GUE: 1 = UDP checksum computed (--tun-csum), 0 = none */
    uint16_t sport, dport;   /* GUE: UDP source (a flow hash) and tun_port */
    uint32_t saddr, daddr;   /* outer: the egress port's address, the RIP */
    uint8_t nodf;            /* 1: the outer DF is clear whatever the inner's (pmtu_disc 0) */
};

/* 20 (IPIP), 32 (GUE), or 0 for a type not built. */
uint32_t pylvs_tun_overhead(uint8_t type);

/* uint32_t pylvs_tun_encap(struct pylvs_emit *em, uint16_t port,
 *         const uint8_t *eth_out, const uint8_t *ip, uint32_t ip_len,
 *         const struct pylvs_tun *t, uint16_t ip_id);
 *
 * Emit on `port` the packet at `ip` encapsulated as the kernel's
 * ip_vs_tunnel_xmit does (and ipvs_gue_encap for GUE): zero vnet header,
 * the 14 bytes at eth_out, outer IPv4 (version 4, IHL 5, TOS = the inner
 * TOS byte, ID ip_id, DF copied from the inner header (clear with t->nodf:
 * the kernel's pmtu_disc 0), MF and
 * offset 0, TTL = the inner TTL (already decremented by the caller),
 * protocol 4 (IPIP) or 17 (GUE), t->saddr -> t->daddr, header checksum);
 * GUE: UDP t->sport -> t->dport, length 12 + ip_len, checksum over the
 * pseudo header when t->csum (0 becomes 0xffff) else 0 (udp_set_csum), and
 * the GUE header 00 04 00 00 (variant 0, C 0, hlen 0, proto 4 = IPv4
 * inside, flags 0; draft-ietf-intarea-gue); then the inner bytes
 * unchanged. Returns the frame length, or 0 with nothing emitted: no room,
 * a type not built, an inner header that is not IPv4 with 5 <= IHL and
 * IHL*4 <= ip_len or whose total length is not ip_len, or an outer packet
 * over 65535 bytes. */
uint32_t pylvs_tun_encap(struct pylvs_emit *em, uint16_t port, const uint8_t *eth_out,
                         const uint8_t *ip, uint32_t ip_len, const struct pylvs_tun *t,
                         uint16_t ip_id);

/* pylvs_tun_encap with an IPIP tunnel saddr -> daddr. */
uint32_t pylvs_ipip_encap(struct pylvs_emit *em, uint16_t port, const uint8_t *eth_out,
                          const uint8_t *ip, uint32_t ip_len, uint32_t saddr, uint32_t daddr,
                          uint16_t ip_id);

/* pylvs_tun_encap with a GUE tunnel saddr:sport -> daddr:dport; csum != 0
 * computes the UDP checksum. */
uint32_t pylvs_gue_encap(struct pylvs_emit *em, uint16_t port, const uint8_t *eth_out,
                         const uint8_t *ip, uint32_t ip_len, uint32_t saddr, uint32_t daddr,
                         uint16_t sport, uint16_t dport, int csum, uint16_t ip_id);

/* What pylvs_gso_parse finds in a GSO super-frame: enough to write any
 * segment i < nseg straight where it is to go. */
struct pylvs_gso {
    const uint8_t *ip;
    uint32_t hl;        /* IP header bytes */
    uint32_t l4hl;      /* TCP data offset * 4, or 8 for UDP */
    uint32_t payload;   /* bytes after the L4 header */
    uint32_t mss;       /* gso_size: payload bytes of every segment but the last */
    uint32_t nseg;      /* ceil(payload / mss); 1 when there is no payload */
    uint8_t proto;      /* 6 or 17 */
};

#define PYLVS_VNET_GSO_TCPV4 1
#define PYLVS_VNET_GSO_UDP_L4 5
#define PYLVS_VNET_GSO_ECN 0x80

/* uint32_t pylvs_gso_parse(struct pylvs_gso *g, const uint8_t *vnet,
 *         const uint8_t *ip, uint32_t ip_len);
 *
 * nseg (and *g filled) when the frame is a GSO super-frame pylvs can
 * segment: vnet flags NEEDS_CSUM; gso_type TCPV4 (the ECN bit 0x80 allowed)
 * with IP protocol 6 and a TCP header of data offset >= 5 within ip_len, or
 * UDP_L4 (5) with protocol 17 and 8 bytes of UDP header; gso_size > 0;
 * csum_start = 14 + IHL*4 and csum_offset 16 (TCP) or 6 (UDP); hdr_len not
 * beyond the frame (14 + ip_len); the IP header version 4, 5 <= IHL, total
 * length = ip_len, not a fragment (MF and offset 0). 0 otherwise (g
 * undefined). */
uint32_t pylvs_gso_parse(struct pylvs_gso *g, const uint8_t *vnet, const uint8_t *ip,
                         uint32_t ip_len);

/* IP total length of segment i (< g->nseg). */
uint32_t pylvs_gso_seg_len(const struct pylvs_gso *g, uint32_t i);

/* Write segment i (< g->nseg), pylvs_gso_seg_len(g, i) bytes, at `out`, as
 * the kernel's inet_gso_segment with tcp_gso_segment / __udp_gso_segment
 * make it: the IP header (options too) with total length, ID = the
 * super-frame's ID + i (mod 2^16) and a fresh checksum; TCP: seq + i*mss,
 * FIN and PSH only on the last segment, CWR only on the first, the other
 * header bytes (options) as they were; UDP: length 8 + payload; the
 * TCP/UDP checksum full over the pseudo header (UDP 0 becomes 0xffff). */
void pylvs_gso_seg_write(const struct pylvs_gso *g, uint32_t i, uint8_t *out);

/* uint32_t pylvs_gso_segments(struct pylvs_emit *em, uint16_t port,
 *         const uint8_t *eth_out, const uint8_t *vnet, const uint8_t *ip,
 *         uint32_t ip_len, const struct pylvs_tun *t, uint16_t ip_id);
 *
 * Segment the super-frame (pylvs_gso_parse) and emit every segment on
 * `port`, each written once, straight into its emit frame: with t NULL as
 * a plain frame (zero vnet header, eth_out, the segment); else
 * encapsulated as pylvs_tun_encap does, the outer ID of segment i being
 * ip_id + i. All or nothing: returns the number of frames emitted (the
 * caller's IP ID counter moves on by that much when t is set), or 0 with
 * nothing emitted when they do not all fit or the frame is refused by
 * pylvs_gso_parse (or the tunnel type is not built). */
uint32_t pylvs_gso_segments(struct pylvs_emit *em, uint16_t port, const uint8_t *eth_out,
                            const uint8_t *vnet, const uint8_t *ip, uint32_t ip_len,
                            const struct pylvs_tun *t, uint16_t ip_id);

/* int pylvs_csum_complete(uint8_t *vnet, uint8_t *ip, uint32_t ip_len);
 *
 * Complete in place the partial TCP/UDP checksum of a frame that is not
 * GSO (the kernel's skb_checksum_help, for TP_STATUS_CSUMNOTREADY frames):
 * the checksum field gets the full checksum over the pseudo header and the
 * segment (UDP 0 becomes 0xffff) and the vnet flags byte is cleared.
 * Returns 1 when done; 0, nothing changed, when the vnet flags lack
 * NEEDS_CSUM; -1, nothing changed, when it cannot be done: a GSO frame,
 * an IP header that is not version 4 with 5 <= IHL, IHL*4 <= ip_len, a
 * fragment, not TCP or UDP, an L4 header cut short, or csum_start /
 * csum_offset not that header's checksum field. */
int pylvs_csum_complete(uint8_t *vnet, uint8_t *ip, uint32_t ip_len);

/* Test hooks _tun_encap, _gso_segments, _csum_complete (pylvs/_fast.pyi). */
int pylvs_tun_register(PyObject *module);

#endif
