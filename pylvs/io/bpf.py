"""Classic BPF socket filters that let only virtual-service traffic into user space.

The director's AF_PACKET sockets are taps (ETH_P_ALL): without a filter every
frame on the wire (SSH, ARP, health checks, ...) would be copied into the ring.
The filter accepts a frame addressed to this host's MAC (packet type
PACKET_HOST) carrying IPv4 when

- TCP/UDP and (proto, daddr, dport) is a service (client -> VIP traffic), or
- TCP/UDP and (proto, saddr, sport) is a VS-NAT dest (real server replies), or
- an ICMP error (destination unreachable, source quench, time exceeded: the
  types ip_vs_in_icmp / ip_vs_out_icmp handle) whose daddr is a VIP or whose
  saddr is a VS-NAT dest's address (the engine translates those quoting a
  NAT conn and passes the rest), or, while a VS-Tun dest exists, whose daddr
  is one of the director's own addresses (``own_addrs``: the sources of its
  tunnel packets, to which a router on a tunnel's path reports a smaller
  path MTU; the engine learns it, docs/engine.md "Tunnel path MTU"),

and rejects everything else, including non-first fragments (no ports to
match; the engine would drop them anyway). Programs are built here in Python
and attached with SO_ATTACH_FILTER, which swaps the old one atomically.

Frames of another packet type (another host's MAC, broadcast, multicast)
are refused here because IPVS never sees them: ip_vs_in_hook ignores any
skb whose pkt_type is not PACKET_HOST. The refusal is counted by the
steering table (``not_host`` counter, pylvs/control/steering.py), which
sees the same frames at ingress.

Offsets are from the Ethernet header: AF_PACKET runs socket filters with the
MAC header pushed back on.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Iterable

import numpy as np

from .. import forward
from ..engine import tables

# Opcodes (linux/filter.h, linux/bpf_common.h).
LD, LDX, ST, STX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X = 0x00, 0x08
RET_A = 0x10
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, MOD = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x90
TAX, TXA = 0x00, 0x80

BPF_MAXINSNS = 4096
ACCEPT_LEN = 0x40000  # snap length: more than a 64 KiB GSO frame

# Ancillary loads (linux/filter.h): `ld [SKF_AD_OFF + SKF_AD_PKTTYPE]` reads
# skb->pkt_type (linux/if_packet.h PACKET_HOST 0, BROADCAST 1, MULTICAST 2,
# OTHERHOST 3).
SKF_AD_OFF = 0xFFFFF000
SKF_AD_PROTOCOL = 0  # skb->protocol, the ethertype in host order
SKF_AD_PKTTYPE = 4
PACKET_HOST = 0

PROTO_ICMP = 1
# ICMP errors IPVS relates to a conn (ip_vs_in_icmp / ip_vs_out_icmp).
ICMP_ERRORS = (3, 4, 11)  # destination unreachable, source quench, time exceeded

Insn = tuple[int, int, int, int]  # (code, jt, jf, k)

# A key: (proto, addr as host-order int, port).
Key = tuple[int, int, int]


# Keys packed into one uint64 each, proto << 48 | addr << 16 | port: the
# numeric order is the tuples' order, so a sort deduplicates 10,000s of rows
# in a millisecond, and counting distinct addrs or (proto, addr) pairs is a
# shift and another sort.
_U = np.uint64


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a sort: numpy 2's hashing np.unique is ten
    times slower at these sizes)."""
    values = np.sort(values)
    if values.size < 2:
        return values
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def _pack(proto, addr, port) -> np.ndarray:
    """Sorted distinct packed keys of three parallel arrays."""
    return _distinct((np.asarray(proto, _U) << _U(48)) | (np.asarray(addr, _U) << _U(16))
                     | np.asarray(port, _U))


def _pack_keys(keys: list[Key]) -> np.ndarray:
    """Packed keys of (proto, addr, port) tuples; ValueError for a field out
    of its range (it would alias another key once packed)."""
    if not keys:
        return np.zeros(0, _U)
    proto, addr, port = (np.asarray(col, np.int64) for col in zip(*keys))
    for col, top, what in ((proto, 0xFF, "proto"), (addr, 0xFFFFFFFF, "addr"),
                           (port, 0xFFFF, "port")):
        if col.min() < 0 or col.max() > top:
            raise ValueError(f"socket filter key: {what} out of range 0..{top}")
    return _pack(proto, addr, port)


def _unpack(packed: np.ndarray) -> list[Key]:
    return list(zip((packed >> _U(48)).tolist(),
                    ((packed >> _U(16)) & _U(0xFFFFFFFF)).tolist(),
                    (packed & _U(0xFFFF)).tolist()))


def _packed_services(services: np.ndarray) -> np.ndarray:
    # A standby service (its VIP not local, pylvs/control/vipfollow.py) is
    # not taken; its dests' replies still are (_packed_dests).
    flags = services["flags"]
    rows = services[((flags & tables.SVC_F_USED) != 0) & ((flags & tables.SVC_F_STANDBY) == 0)]
    return _pack(rows["proto"], rows["vaddr"], rows["vport"])


def _packed_dests(services: np.ndarray, dests: np.ndarray) -> np.ndarray:
    # DEST_F_REPLIES without DEST_F_USED: a deleted dest whose conns live.
    used = dests[(((dests["flags"] & tables.DEST_F_USED) != 0)
                  & np.isin(dests["fwd"], forward.REPLY_FWDS))
                 | ((dests["flags"] & tables.DEST_F_REPLIES) != 0)]
    svc = used["svc"].astype(np.intp)
    used, svc = used[svc < len(services)], svc[svc < len(services)]
    owner = services[svc]
    live = (owner["flags"] & tables.SVC_F_USED) != 0
    return _pack(owner["proto"][live], used["daddr"][live], used["dport"][live])


def keys_of(table, kind: str) -> list[Key]:
    """(proto, addr, port) of the used rows of a SERVICE_DTYPE / DEST_DTYPE array,
    or of an iterable of such tuples.

    Dests carry no protocol: pass (services, dests) to ``dest_keys`` instead.
    """
    if isinstance(table, np.ndarray):
        if kind == "svc":
            return _unpack(_packed_services(table))
        raise ValueError("dest keys need the services: use dest_keys()")
    return sorted({(int(p), int(a), int(port)) for p, a, port in table})


def dest_keys(services, dests) -> list[Key]:
    """(proto, daddr, dport) of used dests whose method has replies come back
    through the director (forward.REPLY_FWDS: VS-NAT), or whose conns made
    under such a method may still live (DEST_F_REPLIES); proto comes from
    their service.

    DR and TUN real servers answer clients directly, so their traffic is
    none of ours.
    """
    if not isinstance(dests, np.ndarray):
        return sorted({(int(p), int(a), int(port)) for p, a, port in dests})
    return _unpack(_packed_dests(services, dests))


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


def _head(a: _Asm, l4: str, icmp: str) -> None:
    """PACKET_HOST, IPv4, not a non-first fragment; then TCP/UDP go to `l4`,
    ICMP errors to `icmp` with X = IP header length, the rest to "reject"."""
    a.op(LD | W | ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)
    a.if_eq(PACKET_HOST, "host")
    a.jump("reject")
    a.label("host")
    a.op(LD | H | ABS, 12)               # ethertype
    a.if_eq(0x0800, "ipv4")
    a.jump("reject")
    a.label("ipv4")
    a.op(LD | H | ABS, 20)               # flags + fragment offset
    a.if_set(0x1FFF, "reject")
    a.op(LDX | B | MSH, 14)              # X = IP header length
    a.op(LD | B | ABS, 23)               # IP protocol
    a.if_eq(tables.PROTO_TCP, l4)
    a.if_eq(tables.PROTO_UDP, l4)
    a.if_eq(PROTO_ICMP, "icmp_type")
    a.jump("reject")
    a.label("icmp_type")
    a.op(LD | B | IND, 14)               # ICMP type
    for t in ICMP_ERRORS:
        a.if_eq(t, icmp)
    a.jump("reject")


def _tail(a: _Asm) -> list[Insn]:
    a.label("reject")
    a.op(RET | K, 0)
    a.label("accept")
    a.op(RET | K, ACCEPT_LEN)
    return a.assemble()


def accept_ipv4_l4() -> list[Insn]:
    """Coarse fallback for tables too big for one program: every IPv4
    TCP/UDP frame and ICMP error addressed to this host's MAC."""
    a = _Asm()
    _head(a, "accept", "accept")
    return _tail(a)


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
            _port_tests(a, by_addr[addr][proto], "accept")
            a.jump(nxt)


def _port_tests(a: _Asm, ports: set[int], hit: str) -> None:
    """Jump to `hit` when A is one of `ports`; port 0 (a port-0 service, or
    a dest given port 0 under one: the kernel's ip_vs_service_find falls
    back to it for every port) matches any. Two instructions a port, as
    `_match_len` counts, the port-0 ones an unconditional jump."""
    for port in sorted(ports):
        if port == 0:
            a.jump(hit)
            a.jump(hit)
        else:
            a.if_eq(port, hit)


def _match_addr(a: _Asm, addrs: list[int], off: int, nxt: str) -> None:
    a.op(LD | W | ABS, off)
    for addr in addrs:
        a.if_eq(addr, "accept")
    a.jump(nxt)


# Instructions of each piece of `program` (a conditional jump is two: the
# test and its `ja`); tests/test_bpf.py checks program_length against the
# programs built.
_HEAD_LEN = 28      # _head: 12 single ops + 8 two-instruction tests
_TAIL_LEN = 2       # reject, accept


def _match_len(packed: np.ndarray) -> int:
    """Length of `_match` for these keys: a load and a final `ja`, a test per
    addr, then per addr a load, a test per proto and a `ja`, and per
    (addr, proto) a load, a test per port and a `ja`."""
    addrs = _distinct((packed >> _U(16)) & _U(0xFFFFFFFF)).size
    proto_addrs = _distinct(packed >> _U(16)).size
    return 2 + 4 * addrs + 4 * proto_addrs + 2 * packed.size


def _icmp_to(svc: np.ndarray, own: Iterable[int]) -> np.ndarray:
    """Sorted distinct addresses whose ICMP errors are taken: the VIPs and
    `own` (host-order ints; ValueError when one is not an IPv4 address)."""
    own = np.asarray(sorted(set(int(a) for a in own)), np.int64)
    if own.size and (own.min() < 0 or own.max() > 0xFFFFFFFF):
        raise ValueError("socket filter: an own address out of range 0..0xFFFFFFFF")
    return _distinct(np.concatenate(((svc >> _U(16)) & _U(0xFFFFFFFF), own.astype(_U))))


def _packed_length(svc: np.ndarray, dst: np.ndarray, icmp_to: np.ndarray,
                   from_svc: bool = False) -> int:
    if not svc.size and not dst.size:
        return len(reject_all())
    n_rs = _distinct((dst >> _U(16)) & _U(0xFFFFFFFF)).size
    return (_HEAD_LEN + _match_len(svc) + _match_len(dst) + (_match_len(svc) if from_svc else 0)
            + (2 + 2 * icmp_to.size) + (2 + 2 * n_rs) + _TAIL_LEN)


def program_length(svc_keys: Iterable[Key], dst_keys: Iterable[Key],
                   own_addrs: Iterable[int] = ()) -> int:
    """Instructions `program` would emit for these keys, computed from the
    counts alone (no program built): how `program` and `for_tables` know
    they must fall back before spending time on a program the kernel
    refuses (sk_chk_filter: at most BPF_MAXINSNS)."""
    svc = _pack_keys(list(svc_keys))
    return _packed_length(svc, _pack_keys(list(dst_keys)), _icmp_to(svc, own_addrs))


def program(svc_keys: Iterable[Key], dst_keys: Iterable[Key],
            own_addrs: Iterable[int] = ()) -> list[Insn]:
    """The filter for these service and dest keys (ICMP errors to the
    services' addresses and from the dests' addresses included, and to
    `own_addrs`, host-order ints); the coarse `accept_ipv4_l4` when that
    filter would pass BPF_MAXINSNS."""
    svc = _pack_keys(list(svc_keys))
    return _program(svc, _pack_keys(list(dst_keys)), _icmp_to(svc, own_addrs))


def _program(svc: np.ndarray, dst: np.ndarray, icmp_to: np.ndarray,
             from_svc: bool = False) -> list[Insn]:
    """`program` of packed keys: sized first, built only when it fits.
    ``from_svc``: also TCP/UDP frames whose (proto, saddr, sport) is a
    service (`for_tables`)."""
    if not svc.size and not dst.size:
        return reject_all()
    if _packed_length(svc, dst, icmp_to, from_svc) > BPF_MAXINSNS:
        return accept_ipv4_l4()
    svc_keys, dst_keys = _unpack(svc), _unpack(dst)
    a = _Asm()
    _head(a, "l4", "icmp")
    a.label("l4")
    _match(a, svc_keys, 30, 14 + 2, "s", "dests")   # daddr, dport
    a.label("dests")
    _match(a, dst_keys, 26, 14 + 0, "d", "from_svc" if from_svc else "reject")  # saddr, sport
    if from_svc:
        a.label("from_svc")
        _match(a, svc_keys, 26, 14 + 0, "v", "reject")   # saddr, sport: from a VIP
    a.label("icmp")
    _match_addr(a, icmp_to.tolist(), 30, "icmp_from")                            # to a VIP, own
    a.label("icmp_from")
    _match_addr(a, sorted({addr for _, addr, _ in dst_keys}), 26, "reject")     # from a dest
    return _tail(a)


def _has_tun_dest(services: np.ndarray, dests: np.ndarray) -> bool:
    used = dests[((dests["flags"] & tables.DEST_F_USED) != 0)
                 & (dests["fwd"] == tables.FWD_TUNNEL)]
    svc = used["svc"].astype(np.intp)
    svc = svc[svc < len(services)]
    return bool(((services[svc]["flags"] & tables.SVC_F_USED) != 0).any())


def for_tables(services, dests, own_addrs: Iterable[int] = (), *,
               from_services: bool = False) -> list[Insn]:
    """The filter for a published (services, dests) pair of tables (or
    of (proto, addr, port) lists, as `keys_of` and `dest_keys` take them).

    ``own_addrs``: the director's own addresses (host-order ints, e.g. its
    ports' addresses); ICMP errors to them are let in while the tables hold
    a VS-Tun dest (always, for key lists, which carry no method).

    ``from_services``: also let in TCP/UDP frames sent from a service's
    (proto, vaddr, vport): a VS-DR/Tun real server's replies to a client on
    the director itself, which the engine hands to the local stack
    (docs/io.md, "Clients on the director").

    Sized on the packed keys first: tables too big for one program (10,000
    services) cost a few numpy calls, not a program built and thrown away.
    """
    svc = (_packed_services(services) if isinstance(services, np.ndarray)
           else _pack_keys(keys_of(services, "svc")))
    dst = (_packed_dests(services, dests) if isinstance(dests, np.ndarray)
           else _pack_keys(dest_keys(services, dests)))
    if isinstance(dests, np.ndarray) and isinstance(services, np.ndarray) \
            and not _has_tun_dest(services, dests):
        own_addrs = ()
    return _program(svc, dst, _icmp_to(svc, own_addrs), from_services)


def for_local(services) -> list[Insn]:
    """The filter of the loopback port (pylvs/io/local.py): only frames to
    a service (proto, daddr, dport), the requests of clients on the
    director itself; the replies pylvs hands to the local stack there are
    not taken back."""
    svc = (_packed_services(services) if isinstance(services, np.ndarray)
           else _pack_keys(keys_of(services, "svc")))
    empty = np.zeros(0, _U)
    return _program(svc, empty, empty)


def pack(prog: list[Insn]) -> bytes:
    """struct sock_filter[] as the kernel reads it."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def run(prog: list[Insn], pkt: bytes, pkttype: int = PACKET_HOST, protocol: int = 0x0800) -> int:
    """Interpret a program on a packet the way the kernel does (the subset
    used here plus the usual loads); returns the accept length (0 = drop).
    ``pkttype`` and ``protocol`` are what the ancillary loads SKF_AD_PKTTYPE
    and SKF_AD_PROTOCOL read."""
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
            elif mode == ABS and k >= SKF_AD_OFF:
                ancillary = {SKF_AD_PKTTYPE: pkttype, SKF_AD_PROTOCOL: protocol}
                if k - SKF_AD_OFF not in ancillary:
                    raise NotImplementedError(f"ancillary load {k - SKF_AD_OFF}")
                v = ancillary[k - SKF_AD_OFF]
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
            op, src = code & 0xF0, idx if code & X else k
            if op in (DIV, MOD) and src == 0:
                return 0  # the kernel ends the program, returning 0
            acc = {ADD: lambda: acc + src, SUB: lambda: acc - src, MUL: lambda: acc * src,
                   DIV: lambda: acc // src, MOD: lambda: acc % src, OR: lambda: acc | src,
                   AND: lambda: acc & src, LSH: lambda: acc << (src & 31),
                   RSH: lambda: acc >> (src & 31)}[op]() & 0xFFFFFFFF
    raise AssertionError("program ran off its end")


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


# --- the fanout program: which worker gets a frame (docs/io.md, "Workers") ---
#
# PACKET_FANOUT_CBPF runs this on every frame reaching an interface's group
# of sockets (one per worker) and delivers it to member ret % members
# (net/packet/af_packet.c fanout_demux_bpf). It returns a mix of the frame's
# *client address*, so both directions of a conn, and all conns of a client,
# meet on one worker (its engine holds the conn).

FANOUT_MIX = 0x9E3779B1  # Knuth's multiplicative constant, 2^32 / phi
PROTO_IPIP = 4
# Scratch memory slots of the program: the header being keyed, unpacked.
_M_PROTO, _M_SADDR, _M_DADDR, _M_SPORT, _M_DPORT = range(5)
# Above this many instructions the (proto, addr, port) sets fall back to
# their addresses alone, then to "saddr" (docs/io.md).
FANOUT_FULL, FANOUT_ADDRS, FANOUT_SADDR = "keys", "addrs", "saddr"


def fanout_mix(addr: int) -> int:
    """The 16-bit mix of a client address (host-order int) the program
    returns: (addr * FANOUT_MIX mod 2^32) >> 16."""
    return ((addr * FANOUT_MIX) & 0xFFFFFFFF) >> 16


def _fanout_sets(services, dests) -> tuple[np.ndarray, np.ndarray]:
    """Packed keys S (services) and F (services and the dests whose replies
    pass the director) of published tables or of key lists."""
    svc = (_packed_services(services) if isinstance(services, np.ndarray)
           else _pack_keys(keys_of(services, "svc")))
    dst = (_packed_dests(services, dests) if isinstance(dests, np.ndarray)
           else _pack_keys(dest_keys(services, dests)))
    return svc, _distinct(np.concatenate((svc, dst)))


def _addr_set(packed: np.ndarray) -> np.ndarray:
    return _distinct((packed >> _U(16)) & _U(0xFFFFFFFF))


_FANOUT_HEAD_LEN = 64  # everything but the two matches (tests/test_fanout.py checks it)
_FANOUT_LANES_LEN = 3  # what lanes=(workers, lane) adds to it


def client_mask(services) -> int:
    """The mask every steering rule ANDs the client address with before
    mixing it (host order): the AND of the -M netmasks of the persistent
    services of a published SERVICE_DTYPE table, so that all clients one
    template covers (caddr & netmask) reach the worker holding it; /32
    when no service is persistent (and for key lists, which carry no
    persistence)."""
    if not isinstance(services, np.ndarray):
        return 0xFFFFFFFF
    rows = services[((services["flags"] & tables.SVC_F_USED) != 0) & (services["timeout"] > 0)]
    if not rows.size:
        return 0xFFFFFFFF
    return int(np.bitwise_and.reduce(rows["netmask"].astype(np.uint32)))


def _fanout_mode(svc: np.ndarray, frm: np.ndarray, lanes: bool = False) -> str:
    head = _FANOUT_HEAD_LEN + (_FANOUT_LANES_LEN if lanes else 0)
    if head + _match_len(svc) + _match_len(frm) <= BPF_MAXINSNS:
        return FANOUT_FULL
    if head + 4 + 2 * (_addr_set(svc).size + _addr_set(frm).size) <= BPF_MAXINSNS:
        return FANOUT_ADDRS
    return FANOUT_SADDR


def _mem_match(a: _Asm, packed: np.ndarray, mode: str, addr_m: int, port_m: int, tag: str,
               hit: str, miss: str) -> None:
    """Jump to `hit` when (proto, M[addr_m], M[port_m]) is in the packed set
    (mode FANOUT_ADDRS: when M[addr_m] is one of its addresses)."""
    if mode == FANOUT_ADDRS:
        a.op(LD | MEM, addr_m)
        for addr in _addr_set(packed).tolist():
            a.if_eq(addr, hit)
        a.jump(miss)
        return
    by_addr: dict[int, dict[int, set[int]]] = {}
    for proto, addr, port in _unpack(packed):
        by_addr.setdefault(addr, {}).setdefault(proto, set()).add(port)
    a.op(LD | MEM, addr_m)
    for addr in sorted(by_addr):
        a.if_eq(addr, f"{tag}a{addr}")
    a.jump(miss)
    for addr in sorted(by_addr):
        a.label(f"{tag}a{addr}")
        a.op(LD | MEM, _M_PROTO)
        for proto in sorted(by_addr[addr]):
            a.if_eq(proto, f"{tag}a{addr}p{proto}")
        a.jump(miss)
        for proto in sorted(by_addr[addr]):
            a.label(f"{tag}a{addr}p{proto}")
            a.op(LD | MEM, port_m)
            _port_tests(a, by_addr[addr][proto], hit)
            a.jump(miss)


def fanout_program(services, dests, *, lanes: tuple[int, int] | None = None) -> list[Insn]:
    """The PACKET_FANOUT_CBPF program for published tables (or key lists,
    as `for_tables` takes them); `steer_index` is its Python twin.

    The client address of an IPv4 frame (any other frame: 0):

    - an ICMP error (types 3, 4, 11) is keyed by the IP header it quotes,
      and when that header is an IPIP tunnel packet, by the inner header
      (an error about a VS-Tun packet concerns the client's packet inside);
    - of the header keyed (proto, saddr, sport, daddr, dport; ports only
      for TCP/UDP, else 0): saddr when (proto, daddr, dport) is a service
      (client to VIP); else daddr when (proto, saddr, sport) is a service
      or a dest whose replies pass the director (a NAT reply, or a quoted
      reply from the VIP); else saddr. A key of port 0 (a port-0 service,
      a dest given port 0 under one) matches every port.

    The kernel runs it on the IP packet (fanout demux sees the skb at its
    network header, unlike socket filters): offsets are from the IP header
    and the ethertype comes from SKF_AD_PROTOCOL. A load beyond the packet
    ends the program with 0, as in the kernel.
    Returned: `fanout_mix(client & client_mask(services))` (the mask
    keeps every client of one persistence template on one worker); the
    kernel takes it modulo the group's
    member count. With ``lanes=(workers, lane)`` (the adaptive ring: each
    worker has two members, its V3 ring then its V2 lane, af_packet.c
    numbering members in join order), the member itself:
    ``(fanout_mix(client) % workers) * 2 + lane``; a frame it cannot key
    (not IPv4, or cut short) still gets 0: worker 0's V3 ring. Tables too big for BPF_MAXINSNS compare addresses only
    (a client that is itself a VIP or NAT real-server address may then be
    split), and beyond that key every frame by saddr (NAT replies then
    reach an arbitrary worker): `fanout_plan` says which.
    """
    svc, frm = _fanout_sets(services, dests)
    mode = _fanout_mode(svc, frm, lanes is not None)
    a = _Asm()
    if lanes is not None and (lanes[0] < 1 or lanes[1] not in (0, 1)):
        raise ValueError(f"lanes must be (workers >= 1, lane 0 or 1), not {lanes!r}")
    a.op(LD | W | ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)
    a.if_eq(0x0800, "ipv4")
    a.op(RET | K, 0)
    a.label("ipv4")
    a.op(LD | IMM, 0)
    a.op(MISC | TAX)                       # X = the header keyed
    a.op(LD | B | ABS, 9)
    a.if_eq(PROTO_ICMP, "icmp")
    a.jump("header")
    a.label("icmp")
    a.op(LDX | B | MSH, 0)                 # X = outer IHL
    a.op(LD | B | IND, 0)                  # ICMP type
    for t in ICMP_ERRORS:
        a.if_eq(t, "quoted")
    a.op(LD | IMM, 0)
    a.op(MISC | TAX)
    a.jump("header")
    a.label("quoted")
    a.op(MISC | TXA)
    a.op(ALU | ADD | K, 8)
    a.op(MISC | TAX)                       # X = the quoted IP header
    a.op(LD | B | IND, 9)
    a.if_eq(PROTO_IPIP, "inner")
    a.jump("header")
    a.label("inner")
    _skip_ip_header(a)                     # X = the tunnelled header
    a.label("header")
    a.op(LD | B | IND, 9)
    a.op(ST, _M_PROTO)
    a.op(LD | W | IND, 12)
    a.op(ST, _M_SADDR)
    a.op(LD | W | IND, 16)
    a.op(ST, _M_DADDR)
    a.op(LD | IMM, 0)
    a.op(ST, _M_SPORT)
    a.op(ST, _M_DPORT)
    a.op(LD | MEM, _M_PROTO)
    a.if_eq(tables.PROTO_TCP, "ports")
    a.if_eq(tables.PROTO_UDP, "ports")
    a.jump("match")
    a.label("ports")
    _skip_ip_header(a)                     # X = the L4 header
    a.op(LD | H | IND, 0)
    a.op(ST, _M_SPORT)
    a.op(LD | H | IND, 2)
    a.op(ST, _M_DPORT)
    a.label("match")
    if mode == FANOUT_SADDR:
        a.jump("saddr")
    else:
        _mem_match(a, svc, mode, _M_DADDR, _M_DPORT, "s", "saddr", "from")
        a.label("from")
        _mem_match(a, frm, mode, _M_SADDR, _M_SPORT, "f", "daddr", "saddr")
    a.label("daddr")
    a.op(LD | MEM, _M_DADDR)
    a.jump("mix")
    a.label("saddr")
    a.op(LD | MEM, _M_SADDR)
    a.label("mix")
    a.op(ALU | AND | K, client_mask(services))
    a.op(ALU | MUL | K, FANOUT_MIX)
    a.op(ALU | RSH | K, 16)
    if lanes is not None:
        a.op(ALU | MOD | K, lanes[0])
        a.op(ALU | MUL | K, 2)
        a.op(ALU | ADD | K, lanes[1])
    a.op(RET | RET_A)
    return a.assemble()


def _skip_ip_header(a: "_Asm") -> None:
    """X += the IHL * 4 of the IP header at X (the header after it)."""
    a.op(LD | B | IND, 0)
    a.op(ALU | AND | K, 0x0F)
    a.op(ALU | LSH | K, 2)
    a.op(ALU | ADD | X)
    a.op(MISC | TAX)


def fanout_plan(services, dests, lanes: bool = False) -> str:
    """How `fanout_program` keys these tables (``lanes``: built with
    lanes=, three instructions longer): FANOUT_FULL, FANOUT_ADDRS or
    FANOUT_SADDR (see there)."""
    return _fanout_mode(*_fanout_sets(services, dests), lanes)


def _client_of(frame: bytes, base: int, svc: set, frm: set, svc_a: set, frm_a: set,
               mode: str) -> int | None:
    def get(off: int, width: int) -> int | None:
        if off + width > len(frame):
            return None
        return int.from_bytes(frame[off:off + width], "big")

    proto, saddr, daddr = get(base + 9, 1), get(base + 12, 4), get(base + 16, 4)
    if proto is None or saddr is None or daddr is None:
        return None
    sport = dport = 0
    if proto in (tables.PROTO_TCP, tables.PROTO_UDP):
        vihl = get(base, 1)
        l4 = base + (vihl & 0x0F) * 4
        sport, dport = get(l4, 2), get(l4 + 2, 2)
        if sport is None or dport is None:
            return None
    if mode == FANOUT_SADDR:
        return saddr
    if mode == FANOUT_ADDRS:
        return saddr if daddr in svc_a else daddr if saddr in frm_a else saddr
    if (proto, daddr, dport) in svc or (proto, daddr, 0) in svc:
        return saddr
    return daddr if (proto, saddr, sport) in frm or (proto, saddr, 0) in frm else saddr


def steer_index(frame: bytes, workers: int, services, dests,
                plan: str = FANOUT_FULL) -> int:
    """The worker (0..workers-1) this Ethernet frame (no vnet header) goes
    to with these tables: the steering rule (docs/io.md, "Workers") written
    out in Python, for tests and tools. ``plan``: FANOUT_FULL, the rule the
    eBPF programs follow whatever the tables' size (the AF_PACKET fanout
    program pylvs/bpf/fanout.bpf.c, the XDP and TAP programs); the classic
    fanout program (`fanout_program`, the fallback without eBPF) keys by
    `fanout_plan(services, dests)`. ValueError for workers < 1."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    svc_p, frm_p = _fanout_sets(services, dests)
    mode = plan
    if len(frame) < 14 or frame[12:14] != b"\x08\x00":
        return 0
    frame = frame[14:]   # the program sees the IP packet
    svc, frm = set(_unpack(svc_p)), set(_unpack(frm_p))
    svc_a, frm_a = set(_addr_set(svc_p).tolist()), set(_addr_set(frm_p).tolist())
    base = 0
    if len(frame) < 10:
        return 0
    if frame[9] == PROTO_ICMP:
        ihl = (frame[0] & 0x0F) * 4
        if ihl >= len(frame):
            return 0
        if frame[ihl] in ICMP_ERRORS:
            base = ihl + 8
            if base + 9 >= len(frame):
                return 0
            if frame[base + 9] == PROTO_IPIP:
                base += (frame[base] & 0x0F) * 4
                if base >= len(frame):
                    return 0
    client = _client_of(frame, base, svc, frm, svc_a, frm_a, mode)
    return 0 if client is None else fanout_mix(client & client_mask(services)) % workers
