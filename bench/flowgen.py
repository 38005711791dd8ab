"""Client -> VIP TCP frames for millions of flows at once, built with numpy.

``tcp_frame`` builds one frame in Python (~10 us); the
table-scale and new-conn scenarios need tens of millions. Here one frame is
built as a template with caddr and cport zero, and the frames of many flows
are copies of it with caddr (IP source) and cport (TCP source port) written
in and both checksums fixed by adding the new words to the template's sum
(one's complement sums commute: RFC 1071; RFC 1624 for the update). The
result equals ``tcp_frame`` byte for byte (tests/lab/test_lab_units.py).

Flows are numbered 0..n-1; flow i's (caddr, cport) comes from
``flow_tuples`` (distinct for every i < 2**32 / 64512 * 64512).
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np

from pylvs.engine import tables
from pylvs.io.taphost import checksum as _csum

VIP = int(ipaddress.IPv4Address("10.0.0.100"))
VPORT = 80
CMAC = bytes.fromhex("020000000002")
LMAC = bytes.fromhex("020000000001")

IP_OFF = tables.VNET_HDR_LEN + 14
TCP_OFF = IP_OFF + 20
CLIENT_BASE = 0x0A400000  # 10.64.0.0: clients fill 10.64.0.0/10 and beyond
PORTS = 64512             # source ports 1024..65535 per client address


def tcp_frame(caddr: int, cport: int, flags: int, payload: bytes = b"") -> bytes:
    """One client -> VIP:VPORT TCP frame with its virtio_net_hdr, full
    checksums (IPv4 with DF, TTL 64; seq 1000, ack 1 when ACK is set)."""
    tcp = struct.pack("!HHIIBBHHH", cport, VPORT, 1000, 1 if flags & 0x10 else 0,
                      5 << 4, flags, 65535, 0, 0) + payload
    pseudo = struct.pack("!IIBBH", caddr, VIP, 0, 6, len(tcp))
    c = _csum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, caddr, VIP)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    eth = LMAC + CMAC + b"\x08\x00"
    return tables.with_vnet(eth + ip + tcp)


def flow_tuples(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(caddr, cport) of the flows numbered `index` (host order, uint32 and
    uint16 arrays): 64,512 flows per client address, so 10 M flows use 156
    addresses; consecutive flows differ in port."""
    index = np.asarray(index, dtype=np.uint64)
    caddr = (CLIENT_BASE + index // PORTS).astype(np.uint32)
    cport = (1024 + index % PORTS).astype(np.uint16)
    return caddr, cport


def _fold(s: np.ndarray) -> np.ndarray:
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return s


class FrameMaker:
    """Frames of one kind (TCP flags, payload) for arrays of flows."""

    def __init__(self, flags: int, payload: bytes = b""):
        t = np.frombuffer(tcp_frame(0, 0, flags, payload), dtype=np.uint8)
        self.template = t
        self.length = len(t)
        # The template's checksums as sums (complemented fields) to add to.
        self.ip_sum = ~int.from_bytes(t[IP_OFF + 10:IP_OFF + 12].tobytes(), "big") & 0xFFFF
        self.tcp_sum = ~int.from_bytes(t[TCP_OFF + 16:TCP_OFF + 18].tobytes(), "big") & 0xFFFF

    def fill(self, out: np.ndarray, caddr: np.ndarray, cport: np.ndarray,
             width: int | None = None) -> None:
        """Write the frames of flows (caddr[i], cport[i]) into out[i, :width]
        (width = the frame's length by default; less keeps only the first
        bytes, e.g. the headers)."""
        n = len(caddr)
        w = self.length if width is None else width
        out[:n, :w] = self.template[:w]
        ca = caddr.astype(np.uint64)
        cp = cport.astype(np.uint64)
        hi, lo = ca >> 16, ca & 0xFFFF
        ip_c = ~_fold(self.ip_sum + hi + lo) & 0xFFFF
        tcp_c = ~_fold(self.tcp_sum + hi + lo + cp) & 0xFFFF
        for col, val in ((IP_OFF + 12, hi), (IP_OFF + 14, lo), (IP_OFF + 10, ip_c),
                         (TCP_OFF, cp), (TCP_OFF + 16, tcp_c)):
            if col + 2 <= w:
                out[:n, col] = (val >> 8).astype(np.uint8)
                out[:n, col + 1] = (val & 0xFF).astype(np.uint8)

    def frames(self, caddr: np.ndarray, cport: np.ndarray) -> np.ndarray:
        out = np.empty((len(caddr), self.length), dtype=np.uint8)
        self.fill(out, caddr, cport)
        return out
