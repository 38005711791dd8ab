"""What `pylvs check` asks the network: routes, addresses, sysctls, and probes
sent from the director's namespace with bounded waits.

Probes are whole Ethernet frames written to an AF_PACKET socket bound to
one interface (so a probe may carry a source address that is not the
director's, which is the point of the NAT probe), and answers are read from
one AF_PACKET socket opened on every interface *before* the probe leaves.
A packet socket is a tap (``ptype_all``), served before the tc and nftables
ingress hooks where ``pylvs run`` steers, so answers are seen even when the
director's own steering or the kernel drops them afterwards. A socket
filter (``answer_filter``) lets in only the frames a probe waits for, and
frames the director itself sends (PACKET_OUTGOING) are ignored.

Every wait is bounded by a deadline (``wait`` seconds, 1.0 by default);
nothing here retries on its own. Raises OSError when the caller may not
open packet sockets (not root, no CAP_NET_RAW).
"""

from __future__ import annotations

import ipaddress
import os
import random
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..control.ports import effective_rp_filter, read_sysctl
from ..io import bpf
from ..io.afpacket import attach_filter

ETH_P_ALL, ETH_P_IP, ETH_P_ARP = 0x0003, 0x0800, 0x0806
PACKET_HOST, PACKET_OUTGOING = 0, 4
BROADCAST = "ff:ff:ff:ff:ff:ff"
RTAX_MTU = 2


@dataclass(frozen=True)
class Route:
    """The kernel's answer to ``ip route get DST``: egress interface, next
    hop (``gateway`` None when DST is on a directly connected network), the
    source address it would pick, and the MTU toward DST (the route's
    ``mtu`` metric, else the interface's)."""

    dst: str
    oif: int
    ifname: str
    gateway: str | None
    prefsrc: str | None
    mtu: int


@dataclass
class Answer:
    """One frame caught during a probe: the interface, packet type
    (PACKET_HOST: to this director's MAC) and the parsed scapy packet."""

    ifname: str
    pkttype: int
    pkt: object = field(repr=False)


class Net:
    """The director namespace's network, read through pyroute2 and /proc.

    Use as a context manager (it holds a netlink socket)."""

    def __init__(self, sysctl_root: str = "/proc/sys/net/ipv4"):
        from pyroute2 import IPRoute
        self.ipr = IPRoute()
        self.sysctl_root = sysctl_root
        self.links = {}
        for msg in self.ipr.get_links():
            self.links[msg["index"]] = (msg.get_attr("IFLA_IFNAME"),
                                        (msg.get_attr("IFLA_ADDRESS") or "").lower(),
                                        int(msg.get_attr("IFLA_MTU") or 0))

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> "Net":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- facts -------------------------------------------------------------

    def ifname(self, index: int) -> str:
        return self.links.get(index, (f"if{index}", "", 0))[0]

    def mac(self, ifname: str) -> str:
        return next((mac for name, mac, _ in self.links.values() if name == ifname), "")

    def macs(self) -> set[str]:
        """Every MAC of this namespace's interfaces (the director's own)."""
        return {mac for _, mac, _ in self.links.values() if mac}

    def addresses(self) -> dict[str, str]:
        """IPv4 address -> interface name, every address of the namespace."""
        out = {}
        for msg in self.ipr.get_addr(family=socket.AF_INET):
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                out[addr] = self.ifname(msg["index"])
        return out

    def route(self, dst: str) -> Route | None:
        """``ip route get DST`` (main lookup, as the kernel routes the
        director's own packets); None when there is no usable route."""
        try:
            msg = self.ipr.route("get", dst=dst)[0]
        except Exception:  # noqa: BLE001 - pyroute2 raises NetlinkError for "unreachable"
            return None
        if msg["type"] != 1:   # RTN_UNICAST; local, blackhole, unreachable...
            return None
        oif = msg.get_attr("RTA_OIF")
        mtu = 0
        metrics = msg.get_attr("RTA_METRICS")
        if metrics is not None:
            mtu = int(metrics.get_attr("RTAX_MTU") or 0)
        ifname = self.ifname(oif)
        return Route(dst, oif, ifname, msg.get_attr("RTA_GATEWAY"),
                     msg.get_attr("RTA_PREFSRC"), mtu or self.links.get(oif, ("", "", 0))[2])

    def broadcasts(self) -> set[str]:
        """The addresses the kernel treats as broadcasts here (the local
        table's broadcast routes: each subnet's broadcast address)."""
        return {m.get_attr("RTA_DST") for m in self.ipr.get_routes(family=socket.AF_INET,
                                                                    table=255)
                if m["type"] == 3}   # RTN_BROADCAST

    def has_default_route(self) -> bool:
        """A unicast default route in the main table."""
        return any(m["type"] == 1 for m in self.ipr.get_routes(family=socket.AF_INET, dst_len=0,
                                                                 table=254))

    def neighbour_macs(self) -> dict[str, str]:
        """MAC -> IPv4 address from the kernel's neighbour table."""
        out = {}
        for msg in self.ipr.get_neighbours(family=socket.AF_INET):
            mac, dst = msg.get_attr("NDA_LLADDR"), msg.get_attr("NDA_DST")
            if mac and dst:
                out[mac.lower()] = dst
        return out

    def sysctl(self, path: str) -> int | None:
        """/proc/sys/net/ipv4/PATH as an int, None when it does not exist."""
        try:
            with open(os.path.join(self.sysctl_root, path)) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def rp_filter(self, ifname: str) -> int:
        """The effective rp_filter of an interface: max(all, IF) as the kernel."""
        root = os.path.join(self.sysctl_root, "conf")
        return effective_rp_filter(read_sysctl("rp_filter", "all", root),
                                   read_sysctl("rp_filter", ifname, root))

    # --- probes ------------------------------------------------------------

    def arp(self, ifname: str, targets: Iterable[str], wait: float = 1.0) -> list[tuple[str, str]]:
        """Broadcast ARP who-has for each target on IF and collect every
        reply for ``wait`` seconds: a list of (sender IP, sender MAC), one
        per reply (several hosts may answer for one address). The request's
        sender is the interface's own address (0.0.0.0 if it has none, an
        RFC 5227 probe)."""
        from scapy.layers.l2 import ARP, Ether
        targets = list(dict.fromkeys(targets))
        mac = self.mac(ifname)
        src = next((a for a, i in self.addresses().items() if i == ifname), "0.0.0.0")
        frames = [bytes(Ether(dst=BROADCAST, src=mac) / ARP(op=1, hwsrc=mac, psrc=src, pdst=t))
                  for t in targets]

        def match(a: Answer):
            p = a.pkt
            if ARP in p and p[ARP].op == 2 and p[ARP].psrc in targets and a.ifname == ifname:
                return (p[ARP].psrc, p[ARP].hwsrc.lower())
            return None
        return self.exchange(ifname, frames, match, ETH_P_ARP, wait)

    def resolve(self, ifname: str, addr: str, wait: float = 1.0) -> str | None:
        """The MAC of a neighbour on IF by ARP (the first answer), or None."""
        for _, mac in self.arp(ifname, [addr], wait):
            return mac
        return None

    def exchange(self, ifname: str, frames: list[bytes], match: Callable[[Answer], object],
                 proto: int = ETH_P_IP, wait: float = 1.0, first: bool = False,
                 sources: Iterable[str] = (), icmp: bool = False) -> list:
        """Send FRAMES on IF, then for ``wait`` seconds collect ``match(answer)``
        for every frame of ethertype PROTO (untagged) arriving on any interface
        (None results are dropped). ``first``: return at the first match.
        ``sources``: for IPv4, only packets from these addresses are read
        (a socket filter keeps a busy director's traffic out of Python);
        ``icmp``: ICMP from any address is read too."""
        from scapy.layers.l2 import Ether
        # ETH_P_ALL: a tap (ptype_all) runs before the ingress hooks, where
        # `pylvs run`'s steering drops replies of real servers that are
        # not for the director; a socket for ETH_P_IP alone would be served
        # after that hook and miss them.
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        want = proto.to_bytes(2, "big")
        attach_filter(rx, answer_filter(proto, sources, icmp))
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            rx.setblocking(False)
            tx.bind((ifname, 0))
            for f in frames:
                tx.send(f)
            found = []
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([rx], [], [], left)[0]:
                    break
                while True:
                    try:
                        data, addr = rx.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if addr[2] == PACKET_OUTGOING or data[12:14] != want:
                        continue
                    m = match(Answer(addr[0], addr[2], Ether(data)))
                    if m is not None:
                        found.append(m)
                        if first:
                            return found
            return found
        finally:
            rx.close()
            tx.close()


def answer_filter(proto: int, sources: Iterable[str] = (), icmp: bool = False) -> list[bpf.Insn]:
    """A classic BPF program (offsets from the Ethernet header) that accepts
    untagged frames of ethertype PROTO: for ARP only replies (op 2), for
    IPv4 only packets whose source is one of SOURCES (all when empty and
    not ``icmp``) and, with ``icmp``, every ICMP packet (a router's error
    about a probe comes from an address nobody can name in advance)."""
    ok = (bpf.RET | bpf.K, 0, 0, bpf.ACCEPT_LEN)
    drop = (bpf.RET | bpf.K, 0, 0, 0)
    if proto == ETH_P_ARP:
        tests = [((bpf.LD | bpf.H | bpf.ABS, 0, 0, 20), 2)]   # ARP operation: reply
    else:
        tests = [((bpf.LD | bpf.B | bpf.ABS, 0, 0, 23), 1)] if icmp else []  # IPv4 protocol
        tests += [((bpf.LD | bpf.W | bpf.ABS, 0, 0, 26), bpf.ip(a)) for a in sources]
    prog = [(bpf.LD | bpf.H | bpf.ABS, 0, 0, 12)]
    if not tests:
        return [*prog, (bpf.JMP | bpf.JEQ | bpf.K, 0, 1, proto), ok, drop]
    k = len(tests)
    # Each test is a load and a compare that jumps to ok; the last falls to drop.
    prog.append((bpf.JMP | bpf.JEQ | bpf.K, 0, 2 * k, proto))
    for i, (load, value) in enumerate(tests):
        prog += [load, (bpf.JMP | bpf.JEQ | bpf.K, 2 * (k - i) - 1, 0, value)]
    return [*prog, drop, ok]


def ephemeral_port() -> int:
    """A random source port from the kernel's default ephemeral range."""
    return random.randint(32768, 60999)


def is_ipv4(a: str) -> bool:
    try:
        ipaddress.IPv4Address(a)
        return True
    except ValueError:
        return False
