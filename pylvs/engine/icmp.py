"""Frames the engine makes, and the NAT of ICMP errors: the Python twin.

Byte for byte the same as pylvs/_fast/ip_vs_icmp.c (the C engine's); change
both. The rules are the kernel's: ``icmp_send`` (net/ipv4/icmp.c),
``tcp_v4_send_reset`` (net/ipv4/tcp_ipv4.c), ``ip_do_fragment`` and
``ip_options_fragment`` (net/ipv4/ip_output.c, ip_options.c), and
``ip_vs_in_icmp`` / ``ip_vs_out_icmp`` / ``ip_vs_nat_icmp``
(net/netfilter/ipvs/ip_vs_core.c).

Conventions of every function:

- ``ip`` is a bytes-like object starting at an IPv4 header with at least
  ``ip_len`` bytes (the packet's total length, already checked against the
  frame by the engine); ``eth`` starts at the 14-byte Ethernet header.
- Addresses and ports are host-order ints; fields written are big-endian.
- An emitted frame is a 10-byte all-zero virtio_net_hdr and a complete
  Ethernet frame with every checksum full, appended to an :class:`Emit`.
- A function that emits returns the frame length (or fragment count) and
  0 when nothing was emitted (no room, or a packet it must not answer).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple, Union

import numpy as np

from pylvs.engine.checksum import checksum, fold, ones_sum, pseudo_header_sum

VNET_LEN = 10
ETH_LEN = 14
IP_LEN = 20
ICMP_LEN = 8
TCP_LEN = 20
ICMP_ERR_MAX = 576  # whole ICMP error datagram (icmp_send, RFC 1812 4.3.2.3)
EMIT_TTL = 64
MIN_MTU = 68        # RFC 791: every host takes a 68-byte datagram unfragmented

IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFSET = 0x1FFF
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
TH_FIN, TH_SYN, TH_RST, TH_ACK = 0x01, 0x02, 0x04, 0x10
ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_TIME_EXCEEDED = 3, 4, 11
ICMP_PORT_UNREACH = 3    # code of ICMP_DEST_UNREACH
ICMP_FRAG_NEEDED = 4     # code of ICMP_DEST_UNREACH
IPOPT_END, IPOPT_NOOP, IPOPT_COPIED = 0, 1, 0x80

# The kernel's icmp_pointers[].error is false only for these; unknown types
# count as errors.
_ICMP_INFO_TYPES = frozenset((0, 8, 13, 14, 15, 16, 17, 18))

_IP_HDR = struct.Struct("!BBHHHBBH4s4s")

# Packet bytes: read-only for the functions that only read them.
Bytes = Union[bytes, bytearray, memoryview]
WBytes = Union[bytearray, memoryview]


class Emit:
    """The emit area: frames the engine creates, one after another in ``buf``.

    Frame i is ``buf[off[i]:off[i] + len[i]]``, leaving on ``port[i]``;
    ``n`` = [frames, bytes used]. The arrays are Batch's ``emit_buf``,
    ``emit_off``, ``emit_len``, ``emit_port``, ``emit_n`` (``Emit.of``) or
    fresh ones (``Emit.new``); the C engine fills the same arrays.
    """

    def __init__(self, buf: np.ndarray, off: np.ndarray, length: np.ndarray,
                 port: np.ndarray, n: np.ndarray):
        self.buf = buf
        self.off = off
        self.len = length
        self.port = port
        self.n = n
        self.max = min(len(off), len(length), len(port))
        self._view = memoryview(buf).cast("B")

    @classmethod
    def new(cls, nbytes: int = 256 * 1024, max_frames: int = 1024) -> Emit:
        return cls(np.zeros(nbytes, np.uint8), np.zeros(max_frames, np.uint32),
                   np.zeros(max_frames, np.uint32), np.zeros(max_frames, np.uint16),
                   np.zeros(2, np.uint32))

    @classmethod
    def of(cls, batch: Any) -> Emit:
        """The emit area of a Batch (its ``emit_*`` arrays)."""
        return cls(batch.emit_buf, batch.emit_off, batch.emit_len, batch.emit_port, batch.emit_n)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """(buf, off, len, port, n): what the C test hooks take."""
        return (self.buf, self.off, self.len, self.port, self.n)

    def reserve(self, length: int, port: int) -> memoryview | None:
        """Room for one frame of ``length`` bytes (vnet header included) on ``port``.

        None, and nothing changed, when the buffer or the frame slots are full.
        """
        n, used = int(self.n[0]), int(self.n[1])
        if n >= self.max or length > len(self.buf) - used:
            return None
        self.off[n] = used
        self.len[n] = length
        self.port[n] = port
        self.n[0] = n + 1
        self.n[1] = used + length
        return self._view[used:used + length]

    def frames(self) -> list[tuple[int, bytes]]:
        """(port, frame bytes) of every frame emitted so far."""
        spans = ((int(self.off[i]), int(self.len[i]), int(self.port[i]))
                 for i in range(int(self.n[0])))
        return [(port, bytes(self._view[off:off + n])) for off, n, port in spans]

    def clear(self) -> None:
        self.n[:] = 0


def _ip_hlen(ip: Bytes, ip_len: int) -> int:
    """Version 4, IHL >= 5 and IHL*4 <= ip_len: the header length, else 0."""
    if ip_len < IP_LEN or ip[0] >> 4 != 4 or ip[0] & 15 < 5:
        return 0
    hl = (ip[0] & 15) * 4
    return hl if hl <= ip_len else 0


def _rd16(b: Bytes, i: int) -> int:
    return b[i] << 8 | b[i + 1]


def _rd32(b: Bytes, i: int) -> int:
    return int.from_bytes(bytes(b[i:i + 4]), "big")


def _wr16(b: WBytes, i: int, v: int) -> None:
    b[i:i + 2] = v.to_bytes(2, "big")


def _wr32(b: WBytes, i: int, v: int) -> None:
    b[i:i + 4] = v.to_bytes(4, "big")


def _bogus_pair(saddr: int, daddr: int) -> bool:
    """RFC 1122 3.2.2: the source is not one host, or the destination a group
    or limited broadcast (the subnet broadcast is the caller's to know)."""
    s, d = saddr >> 24, daddr >> 24
    if s == 0 or s == 127 or s >= 224:
        return True
    return 224 <= d < 240 or daddr in (0xFFFFFFFF, 0)


def _set_ip_check(b: WBytes, at: int, hl: int) -> None:
    _wr16(b, at + 10, 0)
    _wr16(b, at + 10, checksum(b[at:at + hl]))


def _reply_headers(f: memoryview, eth: Bytes, ip_total: int, tos: int, ip_id: int, frag: int,
                   proto: int, saddr: int, daddr: int) -> int:
    """vnet header, Ethernet header of a reply to ``eth``, 20-byte IP header;
    returns the IP header's offset in ``f``."""
    f[:VNET_LEN] = bytes(VNET_LEN)
    e = VNET_LEN
    f[e:e + 6] = bytes(eth[6:12])
    f[e + 6:e + 12] = bytes(eth[0:6])
    f[e + 12:e + 14] = b"\x08\x00"
    at = e + ETH_LEN
    f[at:at + IP_LEN] = _IP_HDR.pack(0x45, tos, ip_total, ip_id, frag, EMIT_TTL, proto, 0,
                                     saddr.to_bytes(4, "big"), daddr.to_bytes(4, "big"))
    _set_ip_check(f, at, IP_LEN)
    return at


def icmp_error(em: Emit, port: int, eth: Bytes, ip: Bytes, ip_len: int, icmp_type: int, code: int,
               info: int, saddr: int, ip_id: int) -> int:
    """Emit on ``port`` an ICMP error about the IPv4 packet ``ip``; C: pylvs_icmp_error.

    From ``saddr`` to the packet's source; ``info`` is the 32-bit word after
    the checksum (frag-needed: the next-hop MTU in its low 16 bits,
    RFC 1191). IP: ID ``ip_id``, TTL 64, DF clear, TOS (orig & 0x1e) | 0xc0,
    no options (the kernel would echo a record-route or timestamp option);
    quotes the packet's first bytes so the IP datagram is at most
    576 bytes (icmp_send). Ethernet dst = eth's src, src = eth's dst.
    Returns the frame length, or 0: no room, a malformed header, or what the
    kernel never answers (icmp_send, RFC 1122 3.2.2): a non-first fragment;
    an ICMP error or truncated ICMP header when ``icmp_type`` is an error; a
    destination multicast, 255.255.255.255 or 0.0.0.0; a source not one host
    (0/8, 127/8, 224/3).
    """
    hl = _ip_hlen(ip, ip_len)
    if not hl or _rd16(ip, 6) & IP_OFFSET:
        return 0
    osaddr = _rd32(ip, 12)
    if _bogus_pair(osaddr, _rd32(ip, 16)):
        return 0
    if (icmp_type not in _ICMP_INFO_TYPES and ip[9] == PROTO_ICMP
            and (hl >= ip_len or ip[hl] not in _ICMP_INFO_TYPES)):
        return 0
    quote = min(ip_len, ICMP_ERR_MAX - IP_LEN - ICMP_LEN)
    total = IP_LEN + ICMP_LEN + quote
    f = em.reserve(VNET_LEN + ETH_LEN + total, port)
    if f is None:
        return 0
    tos = (ip[1] & 0x1E) | 0xC0
    at = _reply_headers(f, eth, total, tos, ip_id, 0, PROTO_ICMP, saddr, osaddr) + IP_LEN
    f[at:at + 8] = struct.pack("!BBHI", icmp_type, code, 0, info & 0xFFFFFFFF)
    f[at + 8:at + 8 + quote] = bytes(ip[:quote])
    _wr16(f, at + 2, checksum(f[at:at + ICMP_LEN + quote]))
    return VNET_LEN + ETH_LEN + total


def tcp_reset(em: Emit, port: int, eth: Bytes, ip: Bytes, tcp: Bytes, tcp_len: int) -> int:
    """Emit on ``port`` the RST for a segment no socket takes; C: pylvs_tcp_reset.

    As the kernel's tcp_v4_send_reset: ``tcp`` is the segment (tcp_len =
    IP total length - IHL*4). ACK set: seq = seg.ack, flags RST; else seq 0,
    flags RST|ACK, ack = seg.seq + payload + SYN + FIN. Addresses and ports
    swapped, window 0, no options; IP ID 0, DF, TTL 64, TOS orig & ~3.
    Returns 64 (the frame length) or 0: no room, the segment is a RST, its
    data offset is < 5 or beyond tcp_len, or its addresses are not unicast
    hosts (as icmp_error).
    """
    if tcp_len < TCP_LEN:
        return 0
    flags = tcp[13]
    doff = (tcp[12] >> 4) * 4
    if flags & TH_RST or doff < TCP_LEN or doff > tcp_len:
        return 0
    osaddr, odaddr = _rd32(ip, 12), _rd32(ip, 16)
    if _bogus_pair(osaddr, odaddr):
        return 0
    flen = VNET_LEN + ETH_LEN + IP_LEN + TCP_LEN
    f = em.reserve(flen, port)
    if f is None:
        return 0
    at = _reply_headers(f, eth, IP_LEN + TCP_LEN, ip[1] & 0xFC, 0, IP_DF, PROTO_TCP,
                        odaddr, osaddr) + IP_LEN
    if flags & TH_ACK:
        seq, ack, rflags = _rd32(tcp, 8), 0, TH_RST
    else:
        ack = (_rd32(tcp, 4) + tcp_len - doff + bool(flags & TH_SYN) + bool(flags & TH_FIN))
        seq, ack, rflags = 0, ack & 0xFFFFFFFF, TH_RST | TH_ACK
    th = struct.pack("!HHIIBBHHH", _rd16(tcp, 2), _rd16(tcp, 0), seq, ack,
                     (TCP_LEN // 4) << 4, rflags, 0, 0, 0)
    csum = checksum(th, pseudo_header_sum(odaddr, osaddr, PROTO_TCP, TCP_LEN))
    f[at:at + TCP_LEN] = th[:16] + csum.to_bytes(2, "big") + th[18:]
    return flen


def _options_fragment(opt: bytearray) -> None:
    """ip_options_fragment: options without the copied flag become NOOPs; a
    malformed option stops the walk, leaving the rest as it is."""
    i, n = 0, len(opt)
    while i < n:
        if opt[i] == IPOPT_END:
            return
        if opt[i] == IPOPT_NOOP:
            i += 1
            continue
        if i + 1 >= n:
            return
        olen = opt[i + 1]
        if olen < 2 or olen > n - i:
            return
        if not opt[i] & IPOPT_COPIED:
            opt[i:i + olen] = bytes([IPOPT_NOOP]) * olen
        i += olen


def ip_fragment(em: Emit, port: int, eth: Bytes, ip: Bytes, ip_len: int, mtu: int) -> int:
    """RFC 791 fragments of ``ip`` of at most ``mtu`` bytes; C: pylvs_ip_fragment.

    As the kernel's ip_do_fragment: every fragment but the last carries
    (mtu - IHL*4) & ~7 payload bytes; same ID; MF and offset set, other flag
    bits clear; the first keeps the options, later ones have the options
    without the copied flag overwritten by NOOPs (ip_options_fragment), so
    the IHL stays; header checksum per fragment; eth's Ethernet header on
    each. All or nothing: returns the number of fragments emitted, or 0 with
    nothing emitted when they do not all fit, or the packet is not
    fragmentable: DF set, already a fragment, ip_len <= mtu, mtu < 68, or a
    malformed header.
    """
    hl = _ip_hlen(ip, ip_len)
    if not hl or mtu < MIN_MTU or ip_len <= mtu or _rd16(ip, 6) & (IP_DF | IP_MF | IP_OFFSET):
        return 0
    step = (mtu - hl) & ~7
    data = ip_len - hl
    saved = (int(em.n[0]), int(em.n[1]))
    first_hdr = bytearray(ip[:hl])
    later_hdr = bytearray(first_hdr)
    opts = bytearray(later_hdr[IP_LEN:])
    _options_fragment(opts)
    later_hdr[IP_LEN:] = opts
    eth_hdr = bytes(eth[:ETH_LEN])
    count = 0
    for off in range(0, data, step):
        chunk = min(step, data - off)
        f = em.reserve(VNET_LEN + ETH_LEN + hl + chunk, port)
        if f is None:
            em.n[0], em.n[1] = saved
            return 0
        hdr = bytearray(first_hdr if off == 0 else later_hdr)
        _wr16(hdr, 2, hl + chunk)
        _wr16(hdr, 6, off >> 3 | (IP_MF if off + chunk < data else 0))
        _set_ip_check(hdr, 0, hl)
        at = VNET_LEN + ETH_LEN
        f[:at] = bytes(VNET_LEN) + eth_hdr
        f[at:at + hl] = hdr
        f[at + hl:at + hl + chunk] = bytes(ip[hl + off:hl + off + chunk])
        count += 1
    return count


class IcmpInner(NamedTuple):
    """An ICMP error's type and code and its quoted packet's tuple (host order);
    offsets count from the outer IP header. C: struct pylvs_icmp_inner."""

    type: int
    code: int
    proto: int
    saddr: int
    sport: int
    daddr: int
    dport: int
    icmp_off: int   # the ICMP header (outer IHL*4)
    inner_off: int  # the quoted IP header (icmp_off + 8)
    l4_off: int     # the quoted TCP/UDP header


def _icmp_parse(ip: Bytes, ip_len: int) -> IcmpInner | None:
    """Everything icmp_inner checks but the ICMP checksum."""
    hl = _ip_hlen(ip, ip_len)
    if not hl or ip[9] != PROTO_ICMP or _rd16(ip, 6) & (IP_MF | IP_OFFSET):
        return None
    if ip_len < hl + ICMP_LEN + IP_LEN:
        return None
    if ip[hl] not in (ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_TIME_EXCEEDED):
        return None
    inner = hl + ICMP_LEN
    ihl = _ip_hlen(ip[inner:], ip_len - inner)
    if not ihl or _rd16(ip, inner + 6) & IP_OFFSET or ip[inner + 9] not in (PROTO_TCP, PROTO_UDP):
        return None
    l4 = inner + ihl
    if ip_len - l4 < 8:
        return None
    return IcmpInner(ip[hl], ip[hl + 1], ip[inner + 9], _rd32(ip, inner + 12), _rd16(ip, l4),
                     _rd32(ip, inner + 16), _rd16(ip, l4 + 2), hl, inner, l4)


def icmp_inner(ip: Bytes, ip_len: int) -> IcmpInner | None:
    """The quoted flow of an ICMP error IPVS translates; C: pylvs_icmp_inner.

    An IcmpInner when ``ip`` is an ICMP error of type 3, 4 or 11
    (ip_vs_in_icmp / ip_vs_out_icmp) that is not itself a fragment, whose
    quoted header is version 4 with IHL >= 5 and complete, not a non-first
    fragment (MF alone is fine), TCP or UDP with 8 bytes of its header
    quoted, and whose ICMP checksum over ip[IHL*4:ip_len] is right. None
    otherwise: such a packet is left to the kernel. The quoted packet is one
    the director sent, so its conn is found under the reversed tuple (proto,
    daddr, dport, saddr, sport): an OUT-key hit is an error from the
    real-server side (``nat_icmp`` out=True with the conn's vaddr:vport), an
    IN-key hit one from the client side (out=False with daddr:dport).
    """
    r = _icmp_parse(ip, ip_len)
    if r is None or ones_sum(ip[r.icmp_off:ip_len]) != 0xFFFF:
        return None
    return r


def nat_icmp(ip: WBytes, ip_len: int, out: bool, addr: int, port: int) -> bool:
    """Translate in place (``ip`` writable) an ICMP error; C: pylvs_nat_icmp.

    As the kernel's ip_vs_nat_icmp. out=True (from the real-server side, to
    the client): outer saddr -> addr (the VIP), quoted daddr:dport ->
    addr:port (VIP:vport). out=False (from the client side, to the real
    server): outer daddr -> addr (the RIP), quoted saddr:sport -> addr:port.
    Every checksum is right afterwards: both IP headers recomputed, the
    quoted TCP/UDP checksum updated for the change (RFC 1624) when its field
    is within the quote (UDP 0 stays 0; the kernel leaves it stale), the
    ICMP checksum recomputed. False, nothing changed, when ``icmp_inner``'s
    structural checks fail (the checksum is not checked again).
    """
    r = _icmp_parse(ip, ip_len)
    if r is None:
        return False
    inner, l4 = r.inner_off, r.l4_off
    if out:
        _wr32(ip, 12, addr)
        old_addr, old_port = r.daddr, r.dport
        _wr32(ip, inner + 16, addr)
        _wr16(ip, l4 + 2, port)
    else:
        _wr32(ip, 16, addr)
        old_addr, old_port = r.saddr, r.sport
        _wr32(ip, inner + 12, addr)
        _wr16(ip, l4, port)
    # Usually cut short, the quote's L4 checksum cannot be recomputed;
    # updated, it becomes the one of the packet the peer sent.
    at = l4 + (16 if r.proto == PROTO_TCP else 6)
    if at + 2 <= ip_len:
        c = _rd16(ip, at)
        if r.proto == PROTO_TCP or c:
            s = ((~c & 0xFFFF) + (~old_addr >> 16 & 0xFFFF) + (~old_addr & 0xFFFF)
                 + (addr >> 16) + (addr & 0xFFFF) + (~old_port & 0xFFFF) + port)
            c = ~fold(s) & 0xFFFF
            if r.proto == PROTO_UDP and c == 0:
                c = 0xFFFF
            _wr16(ip, at, c)
    _set_ip_check(ip, inner, l4 - inner)
    _set_ip_check(ip, 0, r.icmp_off)
    _wr16(ip, r.icmp_off + 2, 0)
    _wr16(ip, r.icmp_off + 2, checksum(ip[r.icmp_off:ip_len]))
    return True
