"""The director's own IPv4 host behind TAP ports: addresses, ARP, echo, neighbours.

Behind a TAP port there is no kernel stack of the director's own: every frame
the kernel's bridge delivers to the TAP reaches pylvs only. So pylvs must do,
in user space and for its own addresses only, the little a host does:

- own its addresses: one DIP per port (``pylvs run --addr DIP/PLEN``) and every
  service's VIP (from the published tables), and announce each new one with a
  gratuitous ARP request (as the kernel does when an address comes up,
  ``inetdev_event`` → ``arp_send`` of ARPOP_REQUEST sip = tip);
- answer ARP requests for them (kernel ``arp_process``: a request whose
  target is a local address gets a reply to the sender's hardware address; a
  duplicate-address probe, sender 0.0.0.0, gets one too);
- answer ICMP echo requests to them (kernel ``icmp_echo``);
- resolve the next hops of real servers and of the gateway with ARP, keeping
  a small neighbour table with the kernel's timings (``neigh_params`` of
  ``arp_tbl``: reachable for ``base_reachable_time`` 30 s, then up to
  ``ucast_probes`` 3 unicast probes ``retrans_time`` 1 s apart; an unknown
  address gets ``mcast_probes`` 3 broadcast requests 1 s apart);
- give the engine its ports and routes (``NetState``): the connected prefix of
  each ``--addr`` through its port, and a default route through the port
  whose prefix holds ``--gateway``.

``TapHost`` plays both roles the kernel's netlink plays for the AF_PACKET
backend: it is the Balancer's resolver (``resolve``, ``connected``,
``forget``, ``on_change``; pylvs/control/neighbors.py has the same methods)
and the daemon's network watcher (``state``, ``start``, ``close``;
pylvs/control/ports.py). Frames go out through ``send(port, frame)``, a frame
being a 10-byte virtio_net_hdr and an Ethernet frame, as everywhere in pylvs.

One TapHost serves all the workers of a director: each hands it the frames
its engine passed (``handle``, from the worker's thread, several at once),
so the neighbour table and the counters are under locks.

Rules that differ from the kernel's, on purpose: an answer (ARP reply, echo
reply) leaves on the port the request came in on, to the request's Ethernet
source, as the engine's own answers do (docs/engine.md, "The emit area"),
rather than through a route lookup; ARP from hosts we have no entry for
creates none (the kernel creates one for the sender of a request it
answers): the director never sends to them except in answer.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..engine.tables import (PORT_DTYPE, PORT_F_CHECK_MAC, PORT_F_USED, ROUTE_DTYPE,
                             VNET_HDR_LEN, SVC_F_USED)

log = logging.getLogger("pylvs.tap")

ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
ARPHRD_ETHER, ARPOP_REQUEST, ARPOP_REPLY = 1, 1, 2
ICMP_ECHOREPLY, ICMP_ECHO = 0, 8
BROADCAST = b"\xff" * 6
ZERO_VNET = bytes(VNET_HDR_LEN)
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # after the Ethernet header: 28 bytes

# arp_tbl's neigh_params (net/ipv4/arp.c): seconds and counts.
REACHABLE_TIME = 30.0
RETRANS_TIME = 1.0
PROBES = 3
MAX_BACKOFF = 30.0      # an address that never answers: one request this often
# Entry states (a subset of the kernel's NUD_*).
INCOMPLETE, REACHABLE, PROBE = "incomplete", "reachable", "probe"

# Counters of stats(), in the order they are listed.
COUNTERS = ("arp_replies_sent", "arp_requests_sent", "arp_learned", "arp_failed",
            "echo_replies_sent", "host_bad_frames", "host_ignored", "host_send_errors")


def ip_str(a: int) -> str:
    return str(ipaddress.IPv4Address(a))


def _mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data, as the value to store."""
    if len(data) % 2:
        data += b"\0"
    s = int(np.frombuffer(data, dtype=">u2").sum(dtype=np.uint64))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass(frozen=True)
class Iface:
    """What ``--addr`` gives a port: its address, prefix length, MTU and MAC."""

    addr: int
    plen: int
    mtu: int
    mac: bytes

    @property
    def net(self) -> int:
        return self.addr & _mask(self.plen)

    @property
    def broadcast(self) -> int:
        return self.net | (~_mask(self.plen) & 0xFFFFFFFF)

    def holds(self, a: int) -> bool:
        return self.plen > 0 and (a & _mask(self.plen)) == self.net


@dataclass
class Neigh:
    port: int
    mac: Optional[bytes] = None
    state: str = INCOMPLETE
    confirmed: float = 0.0      # last ARP answer
    next_probe: float = 0.0     # when the thread sends the next request
    probes: int = 0             # requests sent in the current state
    backoff: float = RETRANS_TIME


class HostState:
    """The NetState the daemon's network watcher would give (ports.NetState):
    built once from the options, it never changes. ``start`` reports it to
    ``on_change`` (the daemon sets that first), as NetWatcher reports its
    first reading."""

    def __init__(self, state):
        self.state = state
        self.on_change = None
        self._started = False

    def start(self) -> None:
        if not self._started and self.on_change is not None:
            self._started = True
            self.on_change(self.state)

    def close(self) -> None:
        pass

    def poll(self, _ipr=None):
        return None


class TapHost:
    """The director's IPv4 host on TAP ports (module docstring).

    ``ifaces[i]``: port i's Iface (every port needs one: the DIP is the
    source of ARP requests and of VS-Tun's outer packets). ``gateway``: the
    next hop of the default route (host order), inside one port's prefix,
    or None. ``send(port, frame)`` writes one frame; ``clock`` gives the
    time base of the neighbour timers, which run in a thread of their own
    started by the first ``resolve`` (``thread=False``: the caller calls
    ``tick``). Raises ValueError for a gateway no prefix holds.
    """

    def __init__(self, ifaces: list[Iface], gateway: int | None = None, *,
                 send: Callable[[int, bytes], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, rp_filter: int = 1,
                 thread: bool = True):
        self.ifaces = list(ifaces)
        self.gateway = gateway
        self.gw_port = None
        if gateway is not None:
            self.gw_port = next((i for i, f in enumerate(self.ifaces) if f.holds(gateway)), None)
            if self.gw_port is None:
                raise ValueError(f"gateway {ip_str(gateway)} is in no --addr prefix")
        self.send = send
        self.clock = clock
        self.rp_filter = rp_filter
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.vips: frozenset[int] = frozenset()
        self._neigh: dict[tuple[int, int], Neigh] = {}
        self._wanted: dict[int, tuple[int, int]] = {}   # daddr -> (port, next hop)
        self._ip_id = int.from_bytes(os.urandom(2), "little")
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not thread:
            self._stop.set()
        self.on_change: Optional[Callable[[int], None]] = None
        self.on_local_change: Optional[Callable[[frozenset[str]], None]] = None
        self.net = HostState(self._net_state())

    # --- what the kernel's netlink gives the AF_PACKET backend -------------------

    @property
    def addrs(self) -> frozenset[int]:
        """Every address the director owns: the DIPs and the VIPs."""
        return frozenset(f.addr for f in self.ifaces) | self.vips

    @property
    def local(self) -> frozenset[str]:
        return frozenset(ip_str(a) for a in self.addrs)

    @property
    def broadcasts(self) -> frozenset[int]:
        return frozenset(f.broadcast for f in self.ifaces if f.plen < 31)

    @property
    def local_nets(self) -> tuple[tuple[int, int], ...]:
        # What the kernel's local table would hold: 127/8 and each DIP /32
        # (the Balancer refuses them as real servers, as IPVS does).
        return tuple(sorted({(0x7F000000, _mask(8))} |
                            {(f.addr, 0xFFFFFFFF) for f in self.ifaces}))

    def refresh_local(self) -> None:
        pass  # the addresses are the options' and the services': nothing to read

    def _net_state(self):
        from ..control.ports import NetState

        ports = np.zeros(len(self.ifaces), dtype=PORT_DTYPE)
        for i, f in enumerate(self.ifaces):
            ports[i]["addr"], ports[i]["mtu"] = f.addr, f.mtu
            ports[i]["mac"] = np.frombuffer(f.mac, dtype=np.uint8)
            ports[i]["flags"] = PORT_F_USED | PORT_F_CHECK_MAC
            ports[i]["rp_filter"] = self.rp_filter
        rows = sorted(((f.net, f.plen, i) for i, f in enumerate(self.ifaces)),
                      key=lambda r: -r[1])
        if self.gw_port is not None:
            rows.append((0, 0, self.gw_port))
        routes = np.zeros(len(rows), ROUTE_DTYPE)
        for i, (net, plen, port) in enumerate(rows):
            routes[i]["prefix"], routes[i]["plen"], routes[i]["port"] = net, plen, port
        # Martian sources: our DIPs and the subnet broadcasts (the daemon
        # adds the VIPs itself).
        local = sorted({f.addr for f in self.ifaces} | set(self.broadcasts))
        return NetState(ports=ports, routes=routes, local=np.array(local, dtype=np.uint32))

    def route(self, daddr: int) -> tuple[int, int, bool] | None:
        """(port, next hop, directly connected) for daddr, longest prefix
        first; None for our own addresses and when no route covers it."""
        if daddr in self.addrs:
            return None
        best = max(((f.plen, i) for i, f in enumerate(self.ifaces) if f.holds(daddr)),
                   default=None)
        if best is not None:
            return best[1], daddr, True
        if self.gw_port is not None:
            return self.gw_port, self.gateway, False
        return None

    def set_vips(self, vips) -> None:
        """The services' VIPs (host order); a new one is announced on every
        port with a gratuitous ARP request."""
        vips = frozenset(int(v) for v in vips)
        new = vips - self.vips - {f.addr for f in self.ifaces}
        changed, self.vips = vips != self.vips, vips
        for v in sorted(new):
            for port in range(len(self.ifaces)):
                self._announce(port, v)
        if changed:
            cb = self.on_local_change
            if cb is not None:
                cb(self.local)

    def announce_all(self) -> None:
        """A gratuitous ARP for each DIP on its port (start-up)."""
        for port, f in enumerate(self.ifaces):
            self._announce(port, f.addr)

    def _announce(self, port: int, addr: int) -> None:
        self._out(port, self._arp(port, ARPOP_REQUEST, BROADCAST, addr, bytes(6), addr))

    # --- the Balancer's resolver ---------------------------------------------

    def resolve(self, daddr: int) -> tuple[int, bytes, bytes] | None:
        """(out_port, next hop MAC, our MAC) or None while unknown (an ARP
        request goes out; ``on_change(daddr)`` reports the answer)."""
        daddr = int(daddr)
        r = self.route(daddr)
        if r is None:
            with self._lock:
                self._wanted.pop(daddr, None)
            return None
        port, hop, _ = r
        with self._lock:
            self._wanted[daddr] = (port, hop)
            n = self._neigh.get((port, hop))
            if n is None:
                n = self._neigh[(port, hop)] = Neigh(port, next_probe=self.clock())
                self._wake.set()
            mac = n.mac
        if mac is None:
            self.start()
            return None
        return port, mac, self.ifaces[port].mac

    def connected(self, daddr: int) -> bool | None:
        r = self.route(int(daddr))
        return None if r is None else r[2]

    def forget(self, daddr: int) -> None:
        with self._lock:
            key = self._wanted.pop(int(daddr), None)
            if key is not None and key not in self._wanted.values():
                self._neigh.pop(key, None)

    def wait(self, daddr: int, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            ans = self.resolve(daddr)
            if ans is not None or time.monotonic() >= deadline:
                return ans
            time.sleep(0.05)

    def neighbours(self) -> list[tuple[int, int, bytes | None, str]]:
        """(port, address, MAC or None, state) of every entry."""
        with self._lock:
            return [(p, a, n.mac, n.state) for (p, a), n in sorted(self._neigh.items())]

    # --- the neighbour timers ----------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set() or self.send is None:
                return
            self._thread = threading.Thread(target=self._run, name="pylvs-tap-arp", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.tick(self.clock())
            self._wake.wait(max(0.01, min(wait, 1.0)))
            self._wake.clear()

    def tick(self, now: float) -> float:
        """Send the ARP requests that are due and age the entries; returns
        the seconds until the next thing is due. An INCOMPLETE entry gets
        PROBES broadcast requests RETRANS_TIME apart, then one each
        doubled interval up to MAX_BACKOFF while a dest wants it; a
        REACHABLE one older than REACHABLE_TIME goes to PROBE: PROBES
        unicast requests to its MAC, and without an answer it fails (its
        MAC is forgotten: the dests behind it are unresolved again, as a
        kernel neighbour in NUD_FAILED) and starts over as INCOMPLETE."""
        requests, failed = [], []
        due = now + REACHABLE_TIME
        with self._lock:
            for (port, hop), n in self._neigh.items():
                if n.state == REACHABLE and now - n.confirmed >= REACHABLE_TIME:
                    n.state, n.probes, n.next_probe = PROBE, 0, now
                if n.state == REACHABLE:
                    due = min(due, n.confirmed + REACHABLE_TIME)
                    continue
                if n.next_probe > now:
                    due = min(due, n.next_probe)
                    continue
                if n.state == PROBE and n.probes >= PROBES:
                    n.state, n.mac, n.probes, n.backoff = INCOMPLETE, None, 0, RETRANS_TIME
                    failed.append((port, hop))
                dmac = n.mac if n.state == PROBE else BROADCAST
                requests.append((port, hop, dmac))
                n.probes += 1
                if n.state == INCOMPLETE and n.probes >= PROBES:
                    n.backoff = min(n.backoff * 2, MAX_BACKOFF)
                n.next_probe = now + (n.backoff if n.state == INCOMPLETE else RETRANS_TIME)
                due = min(due, n.next_probe)
            affected = [d for d, key in self._wanted.items() if key in failed]
            self._count("arp_failed", len(failed))
        for port, hop in failed:
            log.warning("neighbour %s on port %d does not answer ARP: forgotten",
                        ip_str(hop), port)
        for port, hop, dmac in requests:
            self._count("arp_requests_sent")
            self._out(port, self._arp(port, ARPOP_REQUEST, dmac, self.ifaces[port].addr,
                                      bytes(6), hop))
        self._report(affected)
        return due - now

    def _report(self, daddrs) -> None:
        cb = self.on_change
        for d in sorted(daddrs):
            if cb is not None:
                try:
                    cb(d)
                except Exception:
                    log.exception("on_change callback failed")

    # --- frames the engine passed (V_PASS) -----------------------------------

    def handle(self, frame, port: int) -> int:
        """Take one frame (virtio_net_hdr + Ethernet) the engine passed on
        ``port``; answer it if it is ARP or an ICMP echo request for one of
        our addresses. Returns the frames sent. Malformed frames count
        ``host_bad_frames``, the rest that is not for us ``host_ignored``."""
        frame = bytes(frame)
        if len(frame) < VNET_HDR_LEN + 14 or port >= len(self.ifaces):
            self._count("host_bad_frames")
            return 0
        eth = frame[VNET_HDR_LEN:]
        dst = eth[:6]
        # What the kernel would see as PACKET_OTHERHOST (the bridge floods
        # unknown unicast): arp_rcv and ip_rcv drop it.
        if dst != self.ifaces[port].mac and not dst[0] & 1:
            self._count("host_ignored")
            return 0
        etype = int.from_bytes(eth[12:14], "big")
        if etype == ETH_P_ARP:
            return self._handle_arp(eth, port)
        if etype == ETH_P_IP and dst == self.ifaces[port].mac:
            return self._handle_ip(frame, eth, port)
        self._count("host_ignored")
        return 0

    def _handle_arp(self, eth: bytes, port: int) -> int:
        if len(eth) < 14 + _ARP.size:
            self._count("host_bad_frames")
            return 0
        htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = _ARP.unpack_from(eth, 14)
        if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, 6, 4) or op not in (1, 2):
            self._count("host_bad_frames")
            return 0
        sip, tip = int.from_bytes(spa, "big"), int.from_bytes(tpa, "big")
        if sha[0] & 1 or sip >> 28 == 0xE or sip >> 24 == 0x7F:
            # arp_process: multicast senders and loopback/multicast addresses.
            self._count("host_bad_frames")
            return 0
        self._learn(port, sip, sha)
        if op == ARPOP_REQUEST and tip in self.addrs and sip != tip:
            self._count("arp_replies_sent")
            self._out(port, self._arp(port, ARPOP_REPLY, sha, tip, sha, sip))
            return 1
        return 0

    def _learn(self, port: int, sip: int, sha: bytes) -> None:
        with self._lock:
            n = self._neigh.get((port, sip))
            if n is None or sha == b"\0" * 6:
                return
            changed = n.mac != sha
            n.mac, n.state, n.confirmed, n.probes, n.backoff = (sha, REACHABLE, self.clock(),
                                                               0, RETRANS_TIME)
            affected = [d for d, key in self._wanted.items() if key == (port, sip)]
        if changed:
            self._count("arp_learned")
            for d in affected:
                log.info("dest %s via port %d mac %s", ip_str(d), port, sha.hex(":"))
            self._report(affected)

    def _handle_ip(self, frame: bytes, eth: bytes, port: int) -> int:
        ip = eth[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[0] & 15 < 5:
            self._count("host_bad_frames")
            return 0
        ihl = (ip[0] & 15) * 4
        tot = int.from_bytes(ip[2:4], "big")
        if tot < ihl or tot > len(ip) or checksum(ip[:ihl]) != 0:
            self._count("host_bad_frames")
            return 0
        daddr = int.from_bytes(ip[16:20], "big")
        frag = int.from_bytes(ip[6:8], "big") & 0x3FFF
        if ip[9] != 1 or daddr not in self.addrs or frag:
            # Not ICMP, not ours, or a fragment (nothing here reassembles).
            self._count("host_ignored")
            return 0
        icmp = ip[ihl:tot]
        if len(icmp) < 8 or (frame[0] & 1 == 0 and checksum(icmp) != 0):
            # vnet flag NEEDS_CSUM: the sum is partial, the kernel trusts it.
            self._count("host_bad_frames")
            return 0
        if icmp[0] != ICMP_ECHO or icmp[1] != 0:
            self._count("host_ignored")
            return 0
        # icmp_reply: the request's TOS, DF clear (the ICMP socket's
        # IP_PMTUDISC_DONT), TTL 64 (sysctl_ip_default_ttl), no options.
        body = bytes([ICMP_ECHOREPLY, 0, 0, 0]) + icmp[4:]
        body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, ip[1], 20 + len(body), self._ip_id, 0, 64, 1,
                          0, ip[16:20], ip[12:16])
        hdr = hdr[:10] + checksum(hdr).to_bytes(2, "big") + hdr[12:]
        out = ZERO_VNET + eth[6:12] + self.ifaces[port].mac + ETH_P_IP.to_bytes(2, "big")
        self._count("echo_replies_sent")
        self._out(port, out + hdr + body)
        return 1

    # --- frames ------------------------------------------------------------

    def _arp(self, port: int, op: int, dmac: bytes, sip: int, tha: bytes, tip: int) -> bytes:
        mac = self.ifaces[port].mac
        body = _ARP.pack(ARPHRD_ETHER, ETH_P_IP, 6, 4, op, mac, sip.to_bytes(4, "big"), tha,
                         tip.to_bytes(4, "big"))
        # Padded to the 60-byte Ethernet minimum, as the kernel's ARP is.
        return ZERO_VNET + dmac + mac + ETH_P_ARP.to_bytes(2, "big") + body + bytes(18)

    def _count(self, name: str, n: int = 1) -> None:
        # Worker threads answer at once (each the frames of its queue).
        with self._count_lock:
            self.counters[name] += n

    def _out(self, port: int, frame: bytes) -> None:
        if self.send is None:
            return
        try:
            self.send(port, frame)
        except OSError as e:
            self._count("host_send_errors")
            log.debug("sending on port %d: %s", port, e)


def vips_of(services) -> list[int]:
    """The VIPs of a SERVICE_DTYPE table's used slots."""
    return [int(v) for v in services["vaddr"][(services["flags"] & SVC_F_USED) != 0]]
