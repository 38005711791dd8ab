"""IPIP and GUE decapsulation for a VS-Tun real server (pure functions).

:func:`decapsulate` takes one IPv4 packet as an ``AF_PACKET``/``SOCK_DGRAM``
socket bound to ``ETH_P_IP`` delivers it (the link-layer header already
removed, Ethernet padding possibly still attached) and says what to do with
it: hand the inner packet to the kernel, ignore it (not a tunnel packet for
this host: the kernel's stack handles it) or drop it, and which counter
records that.

The checks are those the kernel's receive path makes before a packet reaches
``ipip_rcv`` / ``fou_udp_recv`` / ``gue_udp_recv``, because the decapsulator
takes the packets away from that path (``ip_rcv_core`` in
net/ipv4/ip_input.c for both IP headers, ``__udp4_lib_rcv`` for the UDP
length and checksum, net/ipv4/fou_core.c for the GUE header, whose layout is
draft-ietf-intarea-gue section 3.1):

- outer IPv4: version 4, IHL >= 5, total length within the packet, header
  checksum; an outer fragment is dropped (the kernel would reassemble it
  before decapsulating; the decapsulator does not reassemble, see
  docs/realserver.md), destination one of ``local`` (this host's addresses);
- GUE: UDP to ``gue_port``, UDP length and (non-zero) checksum; GUE
  version 0, not a control message, protocol 4 (IPIP), no flags but the
  private-data flag, and no remote checksum offload (its inner checksum is
  left incomplete for the receiver; not supported);
- inner IPv4: version 4, IHL >= 5, total length within what the outer packet
  carries (bytes beyond it are trimmed, as ``ip_rcv_core`` trims), header
  checksum, destination one of ``vips``. Inner fragments pass: the kernel
  reassembles them after the TUN device.

Addresses are 4-byte network-order ``bytes``; nothing here raises on any
input.
"""

from __future__ import annotations

from pylvs.engine.checksum import checksum, pseudo_header_sum

IPPROTO_IPIP = 4
IPPROTO_UDP = 17
# fou_core.c / draft-ietf-intarea-gue: flag bits of the 16-bit flags field and
# the private-data bit that announces remote checksum offload.
GUE_FLAG_PRIV = 0x0001
GUE_PFLAG_REMCSUM = 0x80000000

ACCEPT = ("decap_ipip", "decap_gue")
IGNORE = "not_tunnel"
DROPS = (
    "drop_outer_header",     # outer IHL < 5 or longer than the packet
    "drop_outer_length",     # outer total length shorter than its header or than the packet holds
    "drop_outer_checksum",
    "drop_outer_fragment",
    "drop_gue_truncated",    # UDP/GUE header or its extension beyond the packet, bad UDP length
    "drop_gue_udp_checksum",
    "drop_gue_version",
    "drop_gue_control",
    "drop_gue_proto",
    "drop_gue_flags",
    "drop_gue_remcsum",
    "drop_inner_truncated",  # fewer than 20 bytes inside
    "drop_inner_version",
    "drop_inner_header",
    "drop_inner_length",
    "drop_inner_checksum",
    "drop_inner_not_vip",
)
#: Every counter the decapsulator keeps, in report order. ``rx`` counts
#: packets read, ``tx`` inner packets written to the TUN device,
#: ``drop_tun_write`` inner packets the TUN device refused,
#: ``drop_overrun`` packets the kernel dropped because the socket's receive
#: buffer was full (PACKET_STATISTICS tp_drops: the decapsulator fell behind),
#: ``error_link`` receive errors the interface caused (it went down or was
#: deleted: ENETDOWN and the like; the decapsulator carries on),
#: ``reattach`` times the tap was bound again to a re-created interface.
COUNTER_NAMES = ("rx", IGNORE, *ACCEPT, "tx", *DROPS, "drop_tun_write", "drop_overrun",
                 "error_link", "reattach")


def _ipv4_header(pkt: memoryview) -> tuple[int, int] | str:
    """(header length, total length) of a packet at least 20 bytes long, or a reason."""
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < 20 or ihl > len(pkt):
        return "header"
    tot = int.from_bytes(pkt[2:4], "big")
    if tot < ihl or tot > len(pkt):
        return "length"
    if checksum(pkt[:ihl]) != 0:
        return "checksum"
    return ihl, tot


def _inner(inner: memoryview, vips: frozenset[bytes]) -> tuple[str, memoryview | None]:
    if len(inner) < 20:
        return "drop_inner_truncated", None
    if inner[0] >> 4 != 4:
        return "drop_inner_version", None
    h = _ipv4_header(inner)
    if isinstance(h, str):
        return f"drop_inner_{h}", None
    if bytes(inner[16:20]) not in vips:
        return "drop_inner_not_vip", None
    return "", inner[:h[1]]


def _gue(outer: memoryview, ihl: int) -> tuple[str, memoryview | None]:
    udp = outer[ihl:]
    if len(udp) < 12:
        return "drop_gue_truncated", None
    ulen = int.from_bytes(udp[4:6], "big")
    if ulen < 12 or ulen > len(udp):
        return "drop_gue_truncated", None
    udp = udp[:ulen]
    if int.from_bytes(udp[6:8], "big"):
        # RFC 768: zero means no checksum; otherwise it covers the pseudo header.
        ph = pseudo_header_sum(int.from_bytes(outer[12:16], "big"),
                               int.from_bytes(outer[16:20], "big"), IPPROTO_UDP, ulen)
        if checksum(udp, ph) != 0:
            return "drop_gue_udp_checksum", None
    b0, proto = udp[8], udp[9]
    flags = int.from_bytes(udp[10:12], "big")
    if b0 >> 6 != 0:
        return "drop_gue_version", None
    if b0 & 0x20:
        return "drop_gue_control", None
    ext = (b0 & 0x1F) * 4
    if 12 + ext > ulen:
        return "drop_gue_truncated", None
    if proto != IPPROTO_IPIP:
        return "drop_gue_proto", None
    if flags & ~GUE_FLAG_PRIV:
        return "drop_gue_flags", None
    if flags & GUE_FLAG_PRIV:
        if ext < 4:
            return "drop_gue_truncated", None
        if int.from_bytes(udp[12:16], "big") & GUE_PFLAG_REMCSUM:
            return "drop_gue_remcsum", None
    return "decap_gue", udp[12 + ext:]


def decapsulate(pkt: bytes | bytearray | memoryview, local: frozenset[bytes],
                vips: frozenset[bytes], gue_port: int | None
                ) -> tuple[str, memoryview | None]:
    """Classify one received IPv4 packet; return (counter name, inner packet).

    ``local``: this host's IPv4 addresses, ``vips``: the VIPs inner packets
    may be addressed to (both sets of 4-byte network-order addresses);
    ``gue_port``: the GUE UDP port (host order) or None for IPIP only.
    The counter name is one of :data:`ACCEPT` (the inner packet, trimmed to
    its total length, is returned), :data:`IGNORE` (not an IPIP/GUE packet
    to this host) or one of :data:`DROPS` (returned inner is None).
    """
    outer = memoryview(pkt)
    if len(outer) < 20 or outer[0] >> 4 != 4:
        return IGNORE, None
    proto = outer[9]
    if bytes(outer[16:20]) not in local:
        return IGNORE, None
    frag = int.from_bytes(outer[6:8], "big")
    if proto == IPPROTO_IPIP:
        kind = "decap_ipip"
    elif proto == IPPROTO_UDP and gue_port is not None:
        # Only a first fragment (offset 0) shows the UDP port; the others
        # are not recognisable as GUE and are left to the kernel.
        ihl = (outer[0] & 0x0F) * 4
        if (frag & 0x1FFF or ihl < 20 or len(outer) < ihl + 4
                or int.from_bytes(outer[ihl + 2:ihl + 4], "big") != gue_port):
            return IGNORE, None
        kind = "decap_gue"
    else:
        return IGNORE, None
    h = _ipv4_header(outer)
    if isinstance(h, str):
        return f"drop_outer_{h}", None
    ihl, tot = h
    # MF set or a non-zero offset: a fragment (RFC 791).
    if frag & 0x3FFF:
        return "drop_outer_fragment", None
    outer = outer[:tot]
    if kind == "decap_gue":
        kind, inner = _gue(outer, ihl)
        if inner is None:
            return kind, None
    else:
        inner = outer[ihl:]
    why, inner = _inner(inner, vips)
    return (why or kind), inner
