"""A small world for engine tests: one director, its services and dests.

Addresses (LVS words): the client CIP talks to the VIP; the director
rewrites toward real servers RIP (and RIP2). Port 0 faces the clients, port 1
the real servers. Each service slot has its scheduling behaviour fixed in
``SCHEDULE`` so tables of frames can reach every verdict.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from pylvs.engine import new_engine, tables
from pylvs.engine.checksum import fold, pseudo_header_sum

IMPLS = ["python", "c"]

CIP, CIP2 = "10.0.0.2", "10.0.0.3"
VIP, VIP2 = "10.0.0.1", "10.0.0.9"
RIP, RIP2 = "192.168.1.2", "192.168.1.3"
CMAC = "02:00:00:00:00:02"       # the client (or its router)
LMAC = "02:00:00:00:00:01"       # the director, client side (the VIP's MAC)
SMAC = "02:00:00:00:01:01"       # the director, real-server side
RMAC = "02:00:00:00:01:02"       # the real server
CLIENT_PORT, RS_PORT = 0, 1


def ip(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


# svc slot -> (proto, vaddr, vport); dest slot -> (svc, daddr, dport, fwd, flags)
SERVICES = {
    0: (tables.PROTO_TCP, VIP, 80),
    1: (tables.PROTO_UDP, VIP, 53),
    2: (tables.PROTO_TCP, VIP, 81),   # its dest's MAC is not resolved
    3: (tables.PROTO_TCP, VIP, 82),   # its dest is DR
    4: (tables.PROTO_TCP, VIP, 83),   # the scheduler finds nothing
    5: (tables.PROTO_TCP, VIP, 84),   # the scheduler raises
    6: (tables.PROTO_TCP, VIP, 85),   # the scheduler answers another service's dest
    7: (tables.PROTO_TCP, VIP2, 80),  # its dest is dest 0's RIP:port too
    8: (tables.PROTO_UDP, VIP, 82),   # its dest is DR
    9: (tables.PROTO_TCP, VIP, 86),   # a DR dest whose MAC is not resolved
    10: (tables.PROTO_TCP, VIP, 87),  # a DR dest not on a connected network
    11: (tables.PROTO_TCP, VIP, 88),  # its dest is Tun (not forwarded yet)
}
RESOLVED = tables.DEST_F_USED | tables.DEST_F_RESOLVED
DESTS = {
    0: (0, RIP, 8080, tables.FWD_MASQ, RESOLVED),
    1: (1, RIP, 5353, tables.FWD_MASQ, RESOLVED),
    2: (2, RIP2, 8081, tables.FWD_MASQ, tables.DEST_F_USED),
    3: (3, RIP2, 82, tables.FWD_ROUTE, RESOLVED),
    4: (7, RIP, 8080, tables.FWD_MASQ, RESOLVED),
    10: (8, RIP2, 82, tables.FWD_ROUTE, RESOLVED),
    11: (9, RIP2, 86, tables.FWD_ROUTE, tables.DEST_F_USED),
    12: (10, RIP2, 87, tables.FWD_ROUTE, RESOLVED | tables.DEST_F_NO_ROUTE),
    13: (11, RIP2, 88, tables.FWD_TUNNEL, RESOLVED),
}


class SchedError(RuntimeError):
    pass


def _sched_fixed(svc: int, caddr: int, cport: int) -> int:
    if svc == 5:
        raise SchedError("the scheduler broke")
    return {0: 0, 1: 1, 2: 2, 3: 3, 4: -1, 6: 0, 7: 4, 8: 10, 9: 11, 10: 12, 11: 13}[svc]


def build_tables(services=SERVICES, dests=DESTS, gone=()) -> tuple[np.ndarray, np.ndarray]:
    """Service and dest arrays; dest rows may carry a sixth item, the weight."""
    svc = tables.empty_services(max(services) + 1)
    for s, (proto, vaddr, vport) in services.items():
        svc[s] = (ip(vaddr), vport, proto, tables.SVC_F_USED, 0, 0)
    dst = tables.empty_dests(max(dests) + 1)
    for d, (s, daddr, dport, fwd, flags, *weight) in dests.items():
        dst[d]["daddr"] = ip(daddr)
        dst[d]["dport"] = dport
        dst[d]["svc"] = s
        dst[d]["weight"] = weight[0] if weight else 1
        dst[d]["fwd"] = fwd
        dst[d]["flags"] = 0 if d in gone else flags
        dst[d]["out_port"] = RS_PORT
        dst[d]["dmac"] = np.frombuffer(mac(RMAC), np.uint8)
        dst[d]["smac"] = np.frombuffer(mac(SMAC), np.uint8)
    return svc, dst


class Env:
    """One engine with its counters, fed one frame at a time."""

    def __init__(self, impl: str, capacity: int = 64,
                 schedule: Callable[[int, int, int], int] = _sched_fixed,
                 timeouts: np.ndarray | None = None,
                 make_schedule: Callable[[tables.Counters], Callable] | None = None,
                 services=SERVICES, dests=DESTS):
        self.impl = impl
        self.counters = tables.Counters(max_services=16, max_dests=32)
        if make_schedule is not None:
            schedule = make_schedule(self.counters)
        self.engine = new_engine(impl, capacity, counters=self.counters, schedule=schedule,
                                 timeouts=timeouts, key=bytes(range(16)))
        self.engine.set_tables(*build_tables(services, dests))
        self.batch = tables.Batch(size=64, slot=4096)
        self.emitted: list[tuple[int, bytes]] = []

    def send(self, frame: bytes, in_port: int = CLIENT_PORT, now: float = 0.0):
        """Process one frame: (verdict, out_port, the frame afterwards).
        What the engine made (ICMP, RST, fragments) is left in ``self.emitted``
        as (port, frame) pairs."""
        b = self.batch
        b.clear()
        b.append(frame, in_port)
        self.engine.process(b, now)
        self.emitted = b.emitted()
        return int(b.verdict[0]), int(b.out_port[0]), b.frame(0)

    def send_many(self, frames, now: float = 0.0):
        b = self.batch
        b.clear()
        for frame, in_port in frames:
            b.append(frame, in_port)
        tx = self.engine.process(b, now)
        self.emitted = b.emitted()
        return tx, [(int(b.verdict[i]), int(b.out_port[i]) if b.verdict[i] == tables.V_TX else 0,
                     b.frame(i)) for i in range(b.count)]

    def stats(self) -> dict[str, int]:
        return {k: v for k, v in self.counters.named().items() if v}

    def conn(self, proto=tables.PROTO_TCP, caddr=CIP, cport=1000):
        for c in self.engine.conns():
            if c[0] == proto and c[1] == ip(caddr) and c[2] == cport:
                return c
        return None


# --- frames ------------------------------------------------------------------

IN_TTL = 64
OUT_TTL = IN_TTL - 1   # every forwarded packet leaves one hop older


def tcp(src=CIP, dst=VIP, sport=1000, dport=80, flags="S", smac=CMAC, dmac=LMAC,
        payload=b"", seq=1000, ack=0, options=None, ip_id=7, ip_flags=0, ttl=IN_TTL, **ipkw):
    """A TCP frame (Ethernet, no vnet header) with correct checksums."""
    ipl = IP(src=src, dst=dst, id=ip_id, ttl=ttl, flags=ip_flags, **ipkw)
    if options is not None:
        ipl.options = options
    p = Ether(src=smac, dst=dmac) / ipl / TCP(sport=sport, dport=dport, flags=flags,
                                               seq=seq, ack=ack, window=8192)
    if payload:
        p = p / Raw(payload)
    return raw(p)


def udp(src=CIP, dst=VIP, sport=1000, dport=53, smac=CMAC, dmac=LMAC,
        payload=b"query", chksum=None, ip_id=7, options=None, ttl=IN_TTL, **ipkw):
    ipl = IP(src=src, dst=dst, id=ip_id, ttl=ttl, **ipkw)
    if options is not None:
        ipl.options = options
    p = (Ether(src=smac, dst=dmac) / ipl
         / UDP(sport=sport, dport=dport, chksum=chksum) / Raw(payload))
    return raw(p)


def tcp_out(**kw) -> bytes:
    """A TCP frame as the director forwards it: TTL one less (tcp's other defaults)."""
    return tcp(ttl=OUT_TTL, **kw)


def udp_out(**kw) -> bytes:
    """A UDP frame as the director forwards it: TTL one less."""
    return udp(ttl=OUT_TTL, **kw)


def v(frame: bytes, **kw) -> bytes:
    """The frame as the engine gets it: behind a virtio_net_hdr."""
    return tables.with_vnet(frame, **kw)


def l4_offsets(frame: bytes) -> tuple[int, int, int, int]:
    """(ip offset, l4 offset, l4 length, proto) of an Ethernet frame."""
    ihl = (frame[14] & 15) * 4
    totlen = int.from_bytes(frame[16:18], "big")
    return 14, 14 + ihl, totlen - ihl, frame[23]


def with_partial(frame: bytes) -> bytes:
    """The frame as a sender with checksum offload leaves it: the L4 checksum
    field holds the un-complemented pseudo-header sum."""
    _, l4, plen, proto = l4_offsets(frame)
    at = l4 + (16 if proto == tables.PROTO_TCP else 6)
    saddr = int.from_bytes(frame[26:30], "big")
    daddr = int.from_bytes(frame[30:34], "big")
    ps = fold(pseudo_header_sum(saddr, daddr, proto, plen))
    return frame[:at] + ps.to_bytes(2, "big") + frame[at + 2:]


def partial_vnet(frame: bytes, gso_type: int = tables.VNET_GSO_NONE, gso_size: int = 0) -> bytes:
    _, l4, _, proto = l4_offsets(frame)
    hdr_len = l4 + ((frame[l4 + 12] >> 4) * 4 if proto == tables.PROTO_TCP else 8)
    return tables.with_vnet(with_partial(frame), flags=tables.VNET_F_NEEDS_CSUM,
                            gso_type=gso_type, hdr_len=hdr_len if gso_type else 0,
                            gso_size=gso_size, csum_start=l4,
                            csum_offset=16 if proto == tables.PROTO_TCP else 6)


class UnraisableCatcher:
    """Collects what engines report through sys.unraisablehook."""

    def __init__(self):
        self.seen: list = []

    def __call__(self, args):
        self.seen.append((args.exc_type, args.exc_value))

    def __enter__(self):
        self._old = sys.unraisablehook
        sys.unraisablehook = self
        return self

    def __exit__(self, *exc):
        sys.unraisablehook = self._old


@dataclass
class Row:
    """One packet test: the frame, what comes out, which counters moved.

    ``before`` runs first: (frame, in_port, now) tuples, or callables taking
    the Env (to change tables). ``counters`` is the exact change of the
    global counters for the frame under test.
    """

    desc: str
    frame: bytes
    in_port: int
    expect: bytes | None
    verdict: int
    counters: dict[str, int]
    before: list = field(default_factory=list)
    now: float = 0.0
    capacity: int = 64
    out_port: int | None = None  # None: the other side's port
    emitted: list = field(default_factory=list)  # (port, frame) the engine must make

    def want_port(self) -> int:
        if self.out_port is not None:
            return self.out_port
        return RS_PORT if self.in_port == CLIENT_PORT else CLIENT_PORT


def delta(*names: str) -> dict[str, int]:
    """The counter change of one frame: rx_frames plus each name once."""
    d = {"rx_frames": 1}
    for n in names:
        d[n] = d.get(n, 0) + 1
    return d


def diff_bytes(got: bytes, want: bytes) -> str:
    """Where two frames differ, for a readable assertion message."""
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    at = [i for i in range(len(got)) if got[i] != want[i]]
    return "bytes differ at " + ", ".join(
        f"{i} (vnet+{i})" if i < 10 else f"{i} (eth+{i - 10}): {got[i]:02x} != {want[i]:02x}"
        for i in at[:16])


def scapy_rebuild(eth: bytes) -> bytes:
    """The Ethernet frame rebuilt by scapy from its own header fields with the
    IPv4 and TCP/UDP checksum fields deleted (so scapy computes them);
    Ethernet padding is appended as it was."""
    ihl = (eth[14] & 15) * 4
    tot = int.from_bytes(eth[16:18], "big")
    seg = eth[14 + ihl:14 + tot]
    ipl = IP(eth[14:14 + ihl])
    del ipl.chksum
    if eth[23] == tables.PROTO_TCP:
        doff = (seg[12] >> 4) * 4
        l4 = TCP(seg[:doff])
        body = seg[doff:]
    else:
        l4 = UDP(seg[:8])
        body = seg[8:]
    del l4.chksum
    p = Ether(eth[:14]) / ipl / l4
    if body:
        p = p / Raw(body)
    return raw(p) + eth[14 + tot:]


# --- random traffic ------------------------------------------------------------

FLAG_CHOICES = ["S"] * 5 + ["A"] * 5 + ["PA"] * 3 + ["SA", "F", "FA", "R", "RA", "", "SR", "SF"]
OPTION_CHOICES = [None] * 6 + [[IPOption(b"\x01\x01\x01\x00")],
                               [IPOption(b"\x07\x07\x04" + b"\0" * 5)]]


def random_frame(rng, proto, src, dst, sport, dport, smac, dmac, offload=True,
                 ttl=IN_TTL) -> bytes:
    """A well-formed TCP/UDP frame with random flags, payload, IP options,
    Ethernet padding and checksum mode (full, partial, GSO; UDP none)."""
    payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 1, 2, 3, 17, 60, 333])))
    opts = rng.choice(OPTION_CHOICES)
    ip_id = rng.randrange(65536)
    if proto == tables.PROTO_TCP:
        f = tcp(src, dst, sport, dport, rng.choice(FLAG_CHOICES), smac, dmac, payload,
                seq=rng.randrange(2**32), ack=rng.randrange(2**32), options=opts, ip_id=ip_id,
                ttl=ttl)
    else:
        f = udp(src, dst, sport, dport, smac, dmac, payload or b"u",
                chksum=0 if rng.random() < 0.15 else None, ip_id=ip_id, options=opts, ttl=ttl)
    pad = bytes(rng.randrange(256) for _ in range(rng.choice([0, 0, 0, 2, 6])))
    mode = rng.random() if offload else 0.0
    if mode < 0.6:
        return v(f) + pad
    if mode < 0.85:
        return partial_vnet(f) + pad
    gso = tables.VNET_GSO_TCPV4 if proto == tables.PROTO_TCP else tables.VNET_GSO_UDP_L4
    return partial_vnet(f, gso_type=gso, gso_size=1448) + pad


def mangle(rng, frame: bytes) -> bytes:
    """A frame cut short or with a byte of its headers changed."""
    if rng.random() < 0.5:
        return frame[:rng.randrange(len(frame) + 1)]
    b = bytearray(frame)
    i = rng.randrange(min(len(b), 10 + 14 + 60))
    b[i] = rng.randrange(256)
    return bytes(b)


# --- what the engine must make: answers built independently with scapy ----------

FIRST_ICMP_ID = 0x0100  # the low 16 bits of Env's key bytes 0..7 read little-endian


def rst_for(frame: bytes) -> bytes:
    """The RST (with its zero vnet header) the kernel's tcp_v4_send_reset sends
    for the Ethernet frame's TCP segment that matches no socket."""
    p = Ether(frame)
    ipl, t = p[IP], p[TCP]
    payload = len(bytes(t.payload))
    if "A" in t.flags:
        seg = TCP(sport=t.dport, dport=t.sport, seq=t.ack, ack=0, flags="R", window=0)
    else:
        ack = (t.seq + payload + ("S" in t.flags) + ("F" in t.flags)) & 0xFFFFFFFF
        seg = TCP(sport=t.dport, dport=t.sport, seq=0, ack=ack, flags="RA", window=0)
    out = (Ether(src=p.dst, dst=p.src)
           / IP(src=ipl.dst, dst=ipl.src, id=0, flags="DF", ttl=64, tos=ipl.tos & 0xFC) / seg)
    return tables.with_vnet(raw(out))


def icmp_error_for(frame: bytes, type_: int, code: int, src: str, ip_id: int = FIRST_ICMP_ID,
                   mtu: int = 0) -> bytes:
    """The ICMP error the kernel's icmp_send makes about the Ethernet frame's
    IP packet: quoted up to 576 bytes of ICMP datagram, TOS 0xc0 | the
    packet's, TTL 64."""
    p = Ether(frame)
    ipl = p[IP]
    tot = ipl.len
    quote = frame[14:14 + tot][:576 - 28]
    icmp = ICMP(type=type_, code=code, nexthopmtu=mtu) if mtu else ICMP(type=type_, code=code)
    out = (Ether(src=p.dst, dst=p.src)
           / IP(src=src, dst=ipl.src, id=ip_id, ttl=64, tos=(ipl.tos & 0x1E) | 0xC0)
           / icmp / Raw(quote))
    return tables.with_vnet(raw(out))
