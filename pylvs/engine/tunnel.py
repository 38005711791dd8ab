"""VS-Tun encapsulation, GSO segmentation and partial checksums: the Python twin.

Byte for byte the same as pylvs/_fast/ip_vs_xmit_tun.c (the C engine's);
change both. The rules are the kernel's: ``ip_vs_tunnel_xmit``,
``ipvs_gue_encap`` and ``ip_vs_prepare_tunneled_skb``
(net/netfilter/ipvs/ip_vs_xmit.c), ``inet_gso_segment`` (net/ipv4/af_inet.c),
``tcp_gso_segment`` (net/ipv4/tcp_offload.c), ``__udp_gso_segment``
(net/ipv4/udp_offload.c) and ``skb_checksum_help`` (net/core/dev.c); the GUE
header is draft-ietf-intarea-gue's variant 0.

Conventions as in :mod:`pylvs.engine.icmp`: ``ip`` starts at an IPv4 header
with at least ``ip_len`` bytes (its total length); addresses and ports are
host-order ints, fields written big-endian; an emitted frame is a 10-byte
all-zero virtio_net_hdr and a complete Ethernet frame with every checksum
full, appended to an :class:`~pylvs.engine.icmp.Emit`. ``vnet`` is a
frame's 10-byte virtio_net_hdr (``tables.VNET_HDR``: little-endian flags,
gso_type, hdr_len, gso_size, csum_start, csum_offset; csum_start and
hdr_len count from the Ethernet header).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

from pylvs.engine import tables
from pylvs.engine.checksum import l4_checksum
from pylvs.engine.icmp import (ETH_LEN, IP_DF, IP_LEN, IP_MF, IP_OFFSET, PROTO_TCP, PROTO_UDP,
                               TCP_LEN, VNET_LEN, Bytes, Emit, WBytes, _ip_hlen, _rd16, _rd32,
                               _set_ip_check, _wr16, _wr32)

TUN_IPIP = 0   # ipvsadm's IP_VS_CONN_F_TUNNEL_TYPE_IPIP (the dest row's tun_type)
TUN_GUE = 1    # IP_VS_CONN_F_TUNNEL_TYPE_GUE; GRE (2) is not built
IPIP_OVERHEAD = 20               # outer IPv4
GUE_OVERHEAD = 20 + 8 + 4        # outer IPv4, UDP, GUE header
IPPROTO_IPIP = 4
UDP_LEN = 8
VNET_GSO_ECN = 0x80
TH_FIN, TH_PSH, TH_CWR = 0x01, 0x08, 0x80


class Tun(NamedTuple):
    """The tunnel of one Tun dest; C: struct pylvs_tun (and the _fast hooks' tuple)."""

    type: int          # TUN_IPIP or TUN_GUE
    csum: int = 0      # GUE: 1 = UDP checksum computed (--tun-csum), 0 = none
    sport: int = 0     # GUE: UDP source port (a flow hash)
    dport: int = 0     # GUE: tun_port
    saddr: int = 0     # outer source: the egress port's address
    daddr: int = 0     # outer destination: the RIP
    nodf: int = 0      # 1: the outer DF is clear whatever the inner's (pmtu_disc 0)


def tun_overhead(tun_type: int) -> int:
    """Bytes a tunnel adds before the inner packet: 20 (IPIP), 32 (GUE), 0 (not built)."""
    return {TUN_IPIP: IPIP_OVERHEAD, TUN_GUE: GUE_OVERHEAD}.get(tun_type, 0)


def _tun_headers(f: memoryview, eth_out: Bytes, t: Tun, inner_len: int, ip_id: int) -> None:
    """vnet, Ethernet and tunnel headers of frame ``f`` whose inner packet
    (``inner_len`` bytes) is already in place after them."""
    ovh = tun_overhead(t.type)
    f[:VNET_LEN] = bytes(VNET_LEN)
    f[VNET_LEN:VNET_LEN + ETH_LEN] = bytes(eth_out[:ETH_LEN])
    o = VNET_LEN + ETH_LEN
    inner = o + ovh
    gue = t.type == TUN_GUE
    f[o:o + IP_LEN] = (bytes((0x45, f[inner + 1])) + (ovh + inner_len).to_bytes(2, "big")
                       + ip_id.to_bytes(2, "big")
                       + (0 if t.nodf else _rd16(f, inner + 6) & IP_DF).to_bytes(2, "big")
                       + bytes((f[inner + 8], PROTO_UDP if gue else IPPROTO_IPIP)) + bytes(2)
                       + t.saddr.to_bytes(4, "big") + t.daddr.to_bytes(4, "big"))
    _set_ip_check(f, o, IP_LEN)
    if not gue:
        return
    u = o + IP_LEN
    ulen = UDP_LEN + 4 + inner_len
    f[u:u + 12] = (t.sport.to_bytes(2, "big") + t.dport.to_bytes(2, "big")
                   + ulen.to_bytes(2, "big") + bytes(2) + bytes((0, IPPROTO_IPIP, 0, 0)))
    if t.csum:
        _wr16(f, u + 6, l4_checksum(t.saddr, t.daddr, PROTO_UDP, f[u:u + ulen]))


def tun_encap(em: Emit, port: int, eth_out: Bytes, ip: Bytes, ip_len: int, t: Tun,
              ip_id: int) -> int:
    """Emit on ``port`` the packet ``ip`` in tunnel ``t``; C: pylvs_tun_encap.

    As the kernel's ip_vs_tunnel_xmit (and ipvs_gue_encap): zero vnet
    header, ``eth_out`` (14 bytes), outer IPv4 (IHL 5, TOS = the inner TOS
    byte, ID ``ip_id``, DF copied from the inner header, TTL = the inner TTL
    (the caller has decremented it), protocol 4 or 17, t.saddr -> t.daddr,
    checksum); GUE: UDP t.sport -> t.dport, length 12 + ip_len, checksum
    over the pseudo header when t.csum (0 becomes 0xffff) else 0, then the
    GUE header 00 04 00 00 (variant 0, C 0, hlen 0, proto 4, flags 0); then
    the inner bytes unchanged. Returns the frame length, or 0 with nothing
    emitted: no room, a tunnel type not built, an inner header not IPv4
    with 5 <= IHL, IHL*4 <= ip_len, or total length != ip_len, or an outer
    packet over 65535 bytes.
    """
    ovh = tun_overhead(t.type)
    if not ovh or not _ip_hlen(ip, ip_len) or _rd16(ip, 2) != ip_len or ip_len + ovh > 0xFFFF:
        return 0
    flen = VNET_LEN + ETH_LEN + ovh + ip_len
    f = em.reserve(flen, port)
    if f is None:
        return 0
    at = VNET_LEN + ETH_LEN + ovh
    f[at:at + ip_len] = bytes(ip[:ip_len])
    _tun_headers(f, eth_out, t, ip_len, ip_id)
    return flen


def ipip_encap(em: Emit, port: int, eth_out: Bytes, ip: Bytes, ip_len: int, saddr: int,
               daddr: int, ip_id: int) -> int:
    """``tun_encap`` through an IPIP tunnel saddr -> daddr; C: pylvs_ipip_encap."""
    return tun_encap(em, port, eth_out, ip, ip_len, Tun(TUN_IPIP, 0, 0, 0, saddr, daddr), ip_id)


def gue_encap(em: Emit, port: int, eth_out: Bytes, ip: Bytes, ip_len: int, saddr: int,
              daddr: int, sport: int, dport: int, csum: bool, ip_id: int) -> int:
    """``tun_encap`` through a GUE tunnel saddr:sport -> daddr:dport; C: pylvs_gue_encap."""
    return tun_encap(em, port, eth_out, ip, ip_len,
                     Tun(TUN_GUE, int(bool(csum)), sport, dport, saddr, daddr), ip_id)


class Gso(NamedTuple):
    """A GSO super-frame ``gso_parse`` accepted; C: struct pylvs_gso."""

    ip: Bytes
    hl: int        # IP header bytes
    l4hl: int      # TCP data offset * 4, or 8 (UDP)
    payload: int   # bytes after the L4 header
    mss: int       # gso_size
    nseg: int      # ceil(payload / mss), 1 without payload
    proto: int


def _check_at(proto: int) -> int:
    return 16 if proto == PROTO_TCP else 6


def gso_parse(vnet: Bytes, ip: Bytes, ip_len: int) -> Gso | None:
    """The super-frame ``ip`` behind ``vnet`` when pylvs can segment it; C: pylvs_gso_parse.

    Needs: vnet flags NEEDS_CSUM; gso_type TCPV4 (ECN bit 0x80 allowed) with
    IP protocol 6 and a TCP header of data offset >= 5 within ip_len, or
    UDP_L4 (5) with protocol 17 and an 8-byte UDP header; gso_size > 0;
    csum_start = 14 + IHL*4 and csum_offset 16 (TCP) / 6 (UDP); hdr_len not
    beyond the frame (14 + ip_len); an IPv4 header with 5 <= IHL, total
    length = ip_len, not a fragment. None otherwise.
    """
    flags, gso, hdr_len, mss, csum_start, csum_offset = tables.VNET_HDR.unpack_from(
        bytes(vnet[:VNET_LEN]))
    if not flags & tables.VNET_F_NEEDS_CSUM:
        return None
    if gso & ~VNET_GSO_ECN == tables.VNET_GSO_TCPV4:
        proto = PROTO_TCP
    elif gso == tables.VNET_GSO_UDP_L4:
        proto = PROTO_UDP
    else:
        return None
    hl = _ip_hlen(ip, ip_len)
    if not hl or _rd16(ip, 2) != ip_len or _rd16(ip, 6) & (IP_MF | IP_OFFSET) or ip[9] != proto:
        return None
    l4hl = UDP_LEN
    if proto == PROTO_TCP:
        if ip_len - hl < TCP_LEN:
            return None
        l4hl = (ip[hl + 12] >> 4) * 4
        if l4hl < TCP_LEN:
            return None
    if (l4hl > ip_len - hl or mss == 0 or hdr_len > ETH_LEN + ip_len
            or csum_start != ETH_LEN + hl or csum_offset != _check_at(proto)):
        return None
    payload = ip_len - hl - l4hl
    return Gso(ip, hl, l4hl, payload, mss, -(-payload // mss) if payload else 1, proto)


def _seg_payload(g: Gso, i: int) -> int:
    return min(g.mss, g.payload - i * g.mss)


def gso_seg_len(g: Gso, i: int) -> int:
    """IP total length of segment ``i``; C: pylvs_gso_seg_len."""
    return g.hl + g.l4hl + _seg_payload(g, i)


def gso_seg_write(g: Gso, i: int, out: WBytes) -> None:
    """Write segment ``i`` at ``out`` (``gso_seg_len`` bytes); C: pylvs_gso_seg_write.

    As inet_gso_segment with tcp_gso_segment / __udp_gso_segment: the IP
    header (options too) with total length, ID = the super-frame's + i
    (mod 2**16) and a fresh checksum; TCP: seq + i*mss, FIN and PSH only on
    the last segment, CWR only on the first, options as they were; UDP:
    length 8 + payload; TCP/UDP checksum full (UDP 0 becomes 0xffff).
    """
    chunk, hdrs = _seg_payload(g, i), g.hl + g.l4hl
    src = g.ip
    out[:hdrs] = bytes(src[:hdrs])
    start = hdrs + i * g.mss
    out[hdrs:hdrs + chunk] = bytes(src[start:start + chunk])
    _wr16(out, 2, hdrs + chunk)
    _wr16(out, 4, (_rd16(src, 4) + i) & 0xFFFF)
    _set_ip_check(out, 0, g.hl)
    l4, l4len = g.hl, g.l4hl + chunk
    if g.proto == PROTO_TCP:
        _wr32(out, l4 + 4, (_rd32(out, l4 + 4) + i * g.mss) & 0xFFFFFFFF)
        if i + 1 < g.nseg:
            out[l4 + 13] &= ~(TH_FIN | TH_PSH) & 0xFF
        if i:
            out[l4 + 13] &= ~TH_CWR & 0xFF
    else:
        _wr16(out, l4 + 4, l4len)
    field = l4 + _check_at(g.proto)
    _wr16(out, field, 0)
    _wr16(out, field, l4_checksum(_rd32(out, 12), _rd32(out, 16), g.proto, out[l4:l4 + l4len]))


def gso_iter(g: Gso) -> Iterator[bytes]:
    """Every segment of ``g`` as a complete IPv4 packet, in order."""
    for i in range(g.nseg):
        seg = bytearray(gso_seg_len(g, i))
        gso_seg_write(g, i, seg)
        yield bytes(seg)


def gso_segments(em: Emit, port: int, eth_out: Bytes, vnet: Bytes, ip: Bytes, ip_len: int,
                 t: Tun | None, ip_id: int) -> int:
    """Segment a GSO super-frame into the emit area; C: pylvs_gso_segments.

    Every segment (``gso_parse``, ``gso_seg_write``) is written straight into
    its frame on ``port``: plain (zero vnet header, ``eth_out``, the segment)
    when ``t`` is None, else encapsulated as ``tun_encap`` with outer ID
    ``ip_id + i``. All or nothing: the number of frames emitted (the ID
    counter moves on by as much when ``t`` is set), or 0 with nothing
    emitted when they do not all fit, the frame is refused by ``gso_parse``,
    or the tunnel type is not built.
    """
    ovh = 0 if t is None else tun_overhead(t.type)
    if t is not None and not ovh:
        return 0
    g = gso_parse(vnet, ip, ip_len)
    if g is None:
        return 0
    saved = (int(em.n[0]), int(em.n[1]))
    head = VNET_LEN + ETH_LEN + ovh
    for i in range(g.nseg):
        n = gso_seg_len(g, i)
        f = em.reserve(head + n, port)
        if f is None:
            em.n[0], em.n[1] = saved
            return 0
        gso_seg_write(g, i, f[head:head + n])
        if t is not None:
            _tun_headers(f, eth_out, t, n, (ip_id + i) & 0xFFFF)
        else:
            f[:VNET_LEN + ETH_LEN] = bytes(VNET_LEN) + bytes(eth_out[:ETH_LEN])
    return g.nseg


def csum_complete(vnet: WBytes, ip: WBytes, ip_len: int) -> int:
    """Complete a partial TCP/UDP checksum in place; C: pylvs_csum_complete.

    For a frame that is not GSO (skb_checksum_help; AF_PACKET's
    TP_STATUS_CSUMNOTREADY): the checksum field gets the full checksum over
    the pseudo header and the segment (UDP 0 becomes 0xffff) and the vnet
    flags byte is cleared. Returns 1 when done; 0, nothing changed, without
    NEEDS_CSUM; -1, nothing changed, when it cannot be done: a GSO frame, an
    IP header not version 4 with 5 <= IHL, IHL*4 <= ip_len, a fragment, not
    TCP or UDP, the L4 header cut short, or csum_start / csum_offset not
    that header's checksum field.
    """
    if not vnet[0] & tables.VNET_F_NEEDS_CSUM:
        return 0
    hl = _ip_hlen(ip, ip_len)
    if vnet[1] or not hl or _rd16(ip, 6) & (IP_MF | IP_OFFSET):
        return -1
    proto = ip[9]
    if proto not in (PROTO_TCP, PROTO_UDP):
        return -1
    l4len = ip_len - hl
    csum_start = vnet[6] | vnet[7] << 8
    csum_offset = vnet[8] | vnet[9] << 8
    if (l4len < (TCP_LEN if proto == PROTO_TCP else UDP_LEN) or csum_start != ETH_LEN + hl
            or csum_offset != _check_at(proto)):
        return -1
    field = hl + _check_at(proto)
    _wr16(ip, field, 0)
    _wr16(ip, field, l4_checksum(_rd32(ip, 12), _rd32(ip, 16), proto, ip[hl:ip_len]))
    vnet[0] = 0
    return 1
