"""Internet checksum helpers (RFC 1071, RFC 1624) for the reference engine.

Two kinds of 16-bit values appear in headers:

- a *checksum*: the ones' complement of the folded ones' complement sum
  (IPv4 header, TCP/UDP with a full checksum);
- a *partial sum*: the folded sum itself, not complemented, which a sender
  with checksum offload leaves in the TCP/UDP field (the pseudo-header sum)
  for the NIC or the kernel to complete.

Every ones' complement sum of the same words is congruent modulo 0xFFFF, so
any correct way of adding (16-bit or 32-bit words, any order, folded early or
late) gives the same folded value; the C engine may add differently and still
match bit for bit. The one representation choice, 0x0000 versus 0xFFFF for a
folded sum of zero, only arises when every word added is zero.
"""

from __future__ import annotations


def fold(s: int) -> int:
    """Fold a non-negative sum of 16-bit words to 16 bits with end-around carry."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The folded ones' complement sum of ``data`` as big-endian 16-bit words.

    An odd trailing byte is padded with a zero byte (RFC 1071).
    """
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    n = int.from_bytes(b, "big")
    # 2**16 == 1 (mod 0xFFFF), so the whole number is congruent to the sum of
    # its 16-bit words; the folded sum is that residue, with 0xFFFF standing
    # for 0 unless every word was zero.
    r = n % 0xFFFF
    if r == 0 and n:
        return 0xFFFF
    return r


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of ``data`` plus an un-complemented ``initial`` sum."""
    return ~fold(ones_sum(data) + initial) & 0xFFFF


def pseudo_header_sum(saddr: int, daddr: int, proto: int, length: int) -> int:
    """Folded sum of the IPv4 pseudo header (addresses are host-order ints)."""
    s = (saddr >> 16) + (saddr & 0xFFFF) + (daddr >> 16) + (daddr & 0xFFFF)
    s += proto + length
    return fold(s)


def l4_checksum(saddr: int, daddr: int, proto: int, segment: bytes | bytearray | memoryview) -> int:
    """Full TCP/UDP checksum of ``segment`` (its checksum field must read zero).

    A UDP result of 0 is returned as 0xFFFF (RFC 768: 0 means no checksum).
    """
    c = checksum(segment, pseudo_header_sum(saddr, daddr, proto, len(segment)))
    if proto == 17 and c == 0:
        return 0xFFFF
    return c


def update16(check: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: a checksum after one 16-bit word changed old -> new."""
    return ~fold((~check & 0xFFFF) + (~old & 0xFFFF) + new) & 0xFFFF


def update32(check: int, old: int, new: int) -> int:
    """A checksum after a 32-bit field (an address) changed old -> new."""
    s = (~check & 0xFFFF) + (~old >> 16 & 0xFFFF) + (~old & 0xFFFF) + (new >> 16) + (new & 0xFFFF)
    return ~fold(s) & 0xFFFF


def sum_update32(partial: int, old: int, new: int) -> int:
    """An un-complemented partial sum after a 32-bit field changed old -> new.

    This is what a pseudo-header sum left by checksum offload needs when NAT
    changes an address: the field is the sum, so it is adjusted without the
    complement steps of ``update32``.
    """
    return fold(partial + (~old >> 16 & 0xFFFF) + (~old & 0xFFFF) + (new >> 16) + (new & 0xFFFF))
