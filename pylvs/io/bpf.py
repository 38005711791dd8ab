"""Classic BPF socket filters that let only virtual-service traffic into user space.

The director's AF_PACKET sockets are taps (ETH_P_ALL): without a filter every
frame on the wire (SSH, ARP, health checks, ...) would be copied into the ring.
The filter accepts an IPv4 TCP/UDP frame when

- (proto, daddr, dport) is a service (client -> VIP traffic), or
- (proto, saddr, sport) is a dest (real server -> client replies, VS-NAT),

and rejects everything else, including non-first fragments (no ports to
match; the engine would drop them anyway). Programs are built here in Python
and attached with SO_ATTACH_FILTER, which swaps the old one atomically.

Offsets are from the Ethernet header: AF_PACKET runs socket filters with the
MAC header pushed back on.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Iterable

import numpy as np

from ..engine import tables

# Opcodes (linux/filter.h, linux/bpf_common.h).
LD, LDX, ST, STX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X = 0x00, 0x08
RET_A = 0x10

BPF_MAXINSNS = 4096
ACCEPT_LEN = 0x40000  # snap length: more than a 64 KiB GSO frame

Insn = tuple[int, int, int, int]  # (code, jt, jf, k)

# A key: (proto, addr as host-order int, port).
Key = tuple[int, int, int]


def keys_of(table, kind: str) -> list[Key]:
    """(proto, addr, port) of the used rows of a SERVICE_DTYPE / DEST_DTYPE array,
    or of an iterable of such tuples.

    Dests carry no protocol: pass (services, dests) to ``dest_keys`` instead.
    """
    if isinstance(table, np.ndarray):
        if kind == "svc":
            rows = table[(table["flags"] & tables.SVC_F_USED) != 0]
            return sorted({(int(r["proto"]), int(r["vaddr"]), int(r["vport"])) for r in rows})
        raise ValueError("dest keys need the services: use dest_keys()")
    return sorted({(int(p), int(a), int(port)) for p, a, port in table})


def dest_keys(services, dests) -> list[Key]:
    """(proto, daddr, dport) of used VS-NAT dests; proto comes from their service.

    Only NAT replies come back through the director: DR and TUN real servers
    answer clients directly, so their traffic is none of ours.
    """
    if not isinstance(dests, np.ndarray):
        return sorted({(int(p), int(a), int(port)) for p, a, port in dests})
    out = set()
    used = dests[((dests["flags"] & tables.DEST_F_USED) != 0)
                 & (dests["fwd"] == tables.FWD_MASQ)]
    for d in used:
        s = int(d["svc"])
        if s < len(services) and services[s]["flags"] & tables.SVC_F_USED:
            out.add((int(services[s]["proto"]), int(d["daddr"]), int(d["dport"])))
    return sorted(out)


class _Asm:
    """A tiny assembler with labels.

    cBPF conditional jumps reach at most 255 instructions ahead, so every
    conditional jump here is "if true, take the `ja` that follows; else skip
    it": `ja` has a 32-bit offset and any program length stays valid.
    """

    def __init__(self) -> None:
        self.code: list[list] = []  # [code, jt, jf, k | label]
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0) -> None:
        self.code.append([code, 0, 0, k])

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def jump(self, name: str) -> None:
        self.code.append([JMP | JA, 0, 0, name])

    def if_eq(self, k: int, target: str) -> None:
        self.code.append([JMP | JEQ | K, 0, 1, k])
        self.jump(target)

    def if_set(self, k: int, target: str) -> None:
        self.code.append([JMP | JSET | K, 0, 1, k])
        self.jump(target)

    def assemble(self) -> list[Insn]:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            if isinstance(k, str):
                k = self.labels[k] - (i + 1)
                if k < 0:
                    raise AssertionError("backward jump")
            out.append((code, jt, jf, k & 0xFFFFFFFF))
        return out


def reject_all() -> list[Insn]:
    return [(RET | K, 0, 0, 0)]


def accept_ipv4_l4() -> list[Insn]:
    """Coarse fallback for tables too big for one program: all IPv4 TCP/UDP."""
    a = _Asm()
    a.op(LD | H | ABS, 12)
    a.if_eq(0x0800, "ip")
    a.op(RET | K, 0)
    a.label("ip")
    a.op(LD | B | ABS, 23)
    a.if_eq(tables.PROTO_TCP, "yes")
    a.if_eq(tables.PROTO_UDP, "yes")
    a.op(RET | K, 0)
    a.label("yes")
    a.op(RET | K, ACCEPT_LEN)
    return a.assemble()


def _match(a: _Asm, keys: list[Key], addr_off: int, port_off: int, tag: str, nxt: str) -> None:
    """Accept when (proto, addr at addr_off, port at X + port_off) is in keys."""
    by_addr: dict[int, dict[int, set[int]]] = {}
    for proto, addr, port in keys:
        by_addr.setdefault(addr, {}).setdefault(proto, set()).add(port)
    a.op(LD | W | ABS, addr_off)
    for addr in sorted(by_addr):
        a.if_eq(addr, f"{tag}a{addr}")
    a.jump(nxt)
    for addr in sorted(by_addr):
        a.label(f"{tag}a{addr}")
        a.op(LD | B | ABS, 23)
        for proto in sorted(by_addr[addr]):
            a.if_eq(proto, f"{tag}a{addr}p{proto}")
        a.jump(nxt)
        for proto in sorted(by_addr[addr]):
            a.label(f"{tag}a{addr}p{proto}")
            a.op(LD | H | IND, port_off)
            for port in sorted(by_addr[addr][proto]):
                a.if_eq(port, "accept")
            a.jump(nxt)


def program(svc_keys: Iterable[Key], dst_keys: Iterable[Key]) -> list[Insn]:
    """The filter for these service and dest keys."""
    svc_keys, dst_keys = sorted(set(svc_keys)), sorted(set(dst_keys))
    if not svc_keys and not dst_keys:
        return reject_all()
    a = _Asm()
    a.op(LD | H | ABS, 12)               # ethertype
    a.if_eq(0x0800, "ipv4")
    a.jump("reject")
    a.label("ipv4")
    a.op(LD | B | ABS, 23)               # IP protocol
    a.if_eq(tables.PROTO_TCP, "l4")
    a.if_eq(tables.PROTO_UDP, "l4")
    a.jump("reject")
    a.label("l4")
    a.op(LD | H | ABS, 20)               # flags + fragment offset
    a.if_set(0x1FFF, "reject")
    a.op(LDX | B | MSH, 14)              # X = IP header length
    _match(a, svc_keys, 30, 14 + 2, "s", "dests")   # daddr, dport
    a.label("dests")
    _match(a, dst_keys, 26, 14 + 0, "d", "reject")  # saddr, sport
    a.label("reject")
    a.op(RET | K, 0)
    a.label("accept")
    a.op(RET | K, ACCEPT_LEN)
    prog = a.assemble()
    if len(prog) > BPF_MAXINSNS:
        return accept_ipv4_l4()
    return prog


def for_tables(services, dests) -> list[Insn]:
    """The filter for a published (services, dests) pair of tables."""
    return program(keys_of(services, "svc"), dest_keys(services, dests))


def pack(prog: list[Insn]) -> bytes:
    """struct sock_filter[] as the kernel reads it."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def run(prog: list[Insn], pkt: bytes) -> int:
    """Interpret a program on a packet the way the kernel does (the subset
    used here plus the usual loads); returns the accept length (0 = drop)."""
    acc = idx = 0
    mem = [0] * 16
    pc = 0
    n = len(pkt)
    for _ in range(len(prog) + 1):
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls in (LD, LDX):
            mode, size = code & 0xE0, code & 0x18
            width = {W: 4, H: 2, B: 1}[size]
            if mode == IMM:
                v = k
            elif mode == LEN:
                v = n
            elif mode == MEM:
                v = mem[k]
            elif mode == MSH:
                if k >= n:
                    return 0
                v = (pkt[k] & 0x0F) * 4
            else:
                off = k + (idx if mode == IND else 0)
                if off + width > n:
                    return 0  # out of bounds: the kernel drops the packet
                v = int.from_bytes(pkt[off:off + width], "big")
            if cls == LD:
                acc = v
            else:
                idx = v
        elif cls == ST:
            mem[k] = acc
        elif cls == STX:
            mem[k] = idx
        elif cls == JMP:
            op = code & 0xF0
            src = idx if code & X else k
            if op == JA:
                pc += k
                continue
            cond = {JEQ: acc == src, JGT: acc > src, JGE: acc >= src, JSET: bool(acc & src)}[op]
            pc += jt if cond else jf
        elif cls == RET:
            return acc if code & 0x18 == RET_A else k
        elif cls == MISC:
            if code & 0xF8 == 0:  # TAX
                idx = acc
            else:
                acc = idx
        elif cls == ALU:
            raise NotImplementedError("ALU not used by these programs")
    raise AssertionError("program ran off its end")


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))
