"""Where to send a real server's frames: egress port and MACs, from the kernel.

The director forwards in user space, but the kernel still owns routing and
ARP. For a dest address the Resolver asks the kernel (netlink, pyroute2):
``route get`` gives the egress interface and gateway, the neighbour table the
next hop's MAC. A next hop the kernel does not hold REACHABLE is "used"
with NTF_USE, which runs the kernel's neighbour state machine as a transmit
would (neigh_event_send, net/core/neighbour.c): a missing or FAILED entry
goes INCOMPLETE and the kernel broadcasts ARP, a STALE one goes DELAY then
PROBE. That is how kernel IPVS, whose transmits go through the same state
machine, learns that a real server changed its MAC; the new lladdr is
published through ``on_change``. The caller gets None and retries, or waits
for ``on_change``.

All netlink traffic happens in the Resolver's own thread: pyroute2 does not
work on the uvloop event loop the control plane runs on. ``resolve`` only
reads a cache, so it is safe to call from anywhere.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("pylvs.neighbors")

RTN_UNICAST = 1
RTN_LOCAL, RTN_BROADCAST = 2, 3
RT_TABLE_LOCAL = 255
NTF_USE = 0x01
# NUD states whose lladdr can be used.
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE = 0x02, 0x04, 0x08, 0x10
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT

Answer = tuple[int, bytes, bytes]  # (out_port, dmac, smac)


def poke(ipr, oif: int, hop: str) -> bool:
    """Have the kernel resolve ``hop`` on ``oif`` as a transmit would
    (NTF_USE: neigh_event_send); False, logged, if netlink refused."""
    try:
        ipr.neigh("replace", dst=hop, ifindex=oif, flags=NTF_USE, state=0)
        return True
    except Exception as e:
        log.warning("NTF_USE for %s on ifindex %d failed: %s", hop, oif, e)
        return False


class Resolver:
    """``resolve(daddr) -> (out_port, dmac, smac) | None`` for the backend's ports.

    ``on_change(daddr)`` (if set) is called from the resolver thread when an
    address gets an answer or its answer changes (new MAC, new route): the
    control plane then rebuilds its dest table.
    """

    def __init__(self, ports, *, interval: float = 0.1, refresh: float = 2.0,
                 max_backoff: float = 30.0,
                 on_change: Optional[Callable[[int], None]] = None):
        self.ports = list(ports)
        self._by_ifindex = {p.ifindex: p for p in self.ports}
        self.interval = interval
        self.refresh = refresh
        self.max_backoff = max_backoff
        self.on_change = on_change
        # Thread state: backoff of unanswered addresses, last full round.
        self._delay: dict[int, float] = {}
        self._next_try: dict[int, float] = {}
        # Backoff of pokes for answered addresses whose next hop the kernel
        # lost (FAILED): every refresh, then doubling to max_backoff.
        self._fail_delay: dict[int, float] = {}
        self._fail_next: dict[int, float] = {}
        self._last_refresh = float("-inf")
        self.lookups = 0   # route lookups made
        self.pokes = 0     # NTF_USE requests (each makes the kernel ARP)
        self._cache: dict[int, Answer] = {}
        # daddr -> its route's next hop is daddr itself (a directly
        # connected network), from the last route lookup.
        self._direct: dict[int, bool] = {}
        self._moved: set[int] = set()   # resolver thread: direct changed, not reported yet
        # Addresses whose last route lookup found no way out through our
        # ports (unreachable, local, another interface).
        self._no_route: set[int] = set()
        self._wanted: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        # The namespace's own IPv4 addresses, refreshed by the thread: the
        # steering rules must not steal replies addressed to the director.
        self.local: frozenset[str] = frozenset()
        # The broadcast addresses of their subnets (host-order ints), and
        # the local routing table's RTN_LOCAL routes as (prefix, mask)
        # host-order ints (127.0.0.0/8, each address /32): what the
        # kernel's inet_addr_type calls RTN_BROADCAST and RTN_LOCAL, which
        # IPVS refuses, or delivers locally, as a real server.
        self.broadcasts: frozenset[int] = frozenset()
        self.local_nets: tuple[tuple[int, int], ...] = ()
        self.on_local_change: Optional[Callable[[frozenset[str]], None]] = None

    # --- any thread ---------------------------------------------------------

    def resolve(self, daddr: int) -> Answer | None:
        daddr = int(daddr)
        with self._lock:
            ans = self._cache.get(daddr)
            if daddr not in self._wanted:
                self._wanted.add(daddr)
                self._wake.set()
        if ans is None:
            self.start()
        return ans

    def connected(self, daddr: int) -> bool | None:
        """Whether the kernel's route to ``daddr`` is a directly connected
        network (no gateway: what VS-DR needs); None before the first
        lookup. ``on_change`` reports a change of it for an address that
        has an answer."""
        with self._lock:
            return self._direct.get(int(daddr))

    def no_route(self, daddr: int) -> bool:
        """Whether the last route lookup of ``daddr`` found no unicast route
        through one of our ports (unreachable, blackhole, a local address,
        another interface): it gets no answer until the routes change, so
        start-up does not wait for it."""
        with self._lock:
            return int(daddr) in self._no_route

    def forget(self, daddr: int) -> None:
        """No dest uses ``daddr`` any more: stop resolving it."""
        with self._lock:
            self._wanted.discard(int(daddr))
            self._cache.pop(int(daddr), None)
            self._direct.pop(int(daddr), None)
            self._no_route.discard(int(daddr))

    def wait(self, daddr: int, timeout: float) -> Answer | None:
        """Block until daddr resolves (tests, start-up); never on an event loop."""
        deadline = time.monotonic() + timeout
        while True:
            ans = self.resolve(daddr)
            if ans is not None or time.monotonic() >= deadline:
                return ans
            time.sleep(min(self.interval, 0.05))

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="pylvs-neighbors", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    # --- the resolver thread ------------------------------------------------

    def _run(self) -> None:
        from pyroute2 import IPRoute

        ipr = IPRoute()
        try:
            while not self._stop.is_set():
                wait = self._cycle(ipr, time.monotonic())
                self._wake.wait(max(0.01, wait))
                self._wake.clear()
        finally:
            ipr.close()

    def _cycle(self, ipr, now: float) -> float:
        """One round of netlink work; returns the seconds until the next.

        An address without an answer is tried at once, then after 0.1,
        0.2, 0.4 ... seconds, at most every ``max_backoff``: a real server
        that does not answer ARP costs a few requests a minute, not ten a
        second. Addresses with an answer are re-checked every ``refresh``
        seconds (one neighbour dump per interface for all of them), and
        poked only when the kernel's entry is no longer REACHABLE, which
        is when the kernel itself would probe a neighbour in use; one whose
        entry is FAILED keeps its last answer and is poked again after
        ``refresh``, then twice as long each time, at most every
        ``max_backoff``. An address ``forget`` dropped is never looked at
        again."""
        with self._lock:
            wanted = set(self._wanted)
            missing = wanted - self._cache.keys()
        for a in list(self._delay):
            if a not in missing:
                del self._delay[a], self._next_try[a]
        for a in list(self._fail_delay):
            if a not in wanted:
                del self._fail_delay[a], self._fail_next[a]
        todo = [a for a in sorted(missing) if self._next_try.get(a, 0.0) <= now]
        for a in todo:
            self._delay[a] = min(self._delay.get(a, self.interval / 2) * 2, self.max_backoff)
            self._next_try[a] = now + self._delay[a]
        if now - self._last_refresh >= self.refresh:
            self._last_refresh = now
            self._refresh_local(ipr)
            todo += sorted(wanted - missing)
        if todo:
            for daddr, ans in self._lookup_many(ipr, todo, now):
                self._store(daddr, ans)
            # Moved between a connected and a routed network with the same
            # answer: still a change for whoever reads ``connected``.
            for daddr in sorted(self._moved):
                self._changed(daddr)
        due = [self._next_try[a] for a in missing if a in self._next_try]
        return min([self._last_refresh + self.refresh, *due]) - now

    def refresh_local(self) -> None:
        """Read the local addresses now, from the calling thread (start-up,
        before the event loop runs: the rules of ``pylvs run -c`` are
        checked against them)."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            self._refresh_local(ipr)

    def _refresh_local(self, ipr) -> None:
        try:
            msgs = list(ipr.get_addr(family=2))
            addrs = frozenset(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS") for a in msgs)
            broadcasts = {int(ipaddress.IPv4Address(b)) for b in (
                a.get_attr("IFA_BROADCAST") for a in msgs) if b}
            nets = set()
            # An address added without `brd +` has no IFA_BROADCAST, but the
            # kernel still adds the subnet's broadcast route (fib_add_ifaddr).
            for r in ipr.get_routes(family=2, table=RT_TABLE_LOCAL):
                if (r.get_attr("RTA_TABLE") or r["table"]) != RT_TABLE_LOCAL:
                    continue
                dst = r.get_attr("RTA_DST")
                if dst is None:
                    continue
                a, plen = int(ipaddress.IPv4Address(dst)), r["dst_len"]
                if r["type"] == RTN_BROADCAST and plen == 32:
                    broadcasts.add(a)
                elif r["type"] == RTN_LOCAL:
                    mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
                    nets.add((a & mask, mask))
            self.broadcasts = frozenset(broadcasts)
            self.local_nets = tuple(sorted(nets))
        except Exception as e:
            self.errors += 1
            log.warning("listing local addresses failed: %s", e)
            return
        if addrs == self.local:
            return
        self.local = addrs
        cb = self.on_local_change
        if cb is not None:
            try:
                cb(addrs)
            except Exception:
                log.exception("on_local_change callback failed")

    def _store(self, daddr: int, ans: Answer | None) -> None:
        with self._lock:
            if daddr not in self._wanted:
                return
            old = self._cache.get(daddr)
            if ans is None:
                # Keep the last good answer: a neighbour entry the kernel
                # garbage-collected (we bypass its use) is re-probed, and the
                # real server has not moved because of that.
                return
            if ans == old:
                return
            self._cache[daddr] = ans
        log.info("dest %s via port %d mac %s", ipaddress.IPv4Address(daddr), ans[0], ans[1].hex(":"))
        self._changed(daddr)

    def _changed(self, daddr: int) -> None:
        self._moved.discard(daddr)
        cb = self.on_change
        if cb is not None:
            try:
                cb(daddr)
            except Exception:
                log.exception("on_change callback failed")

    def _lookup_many(self, ipr, addrs: list[int], now: float = 0.0):
        """(daddr, answer or None) for each address: a route lookup each, one
        neighbour dump per egress interface, and NTF_USE for a next hop the
        kernel does not hold REACHABLE (it then sends the ARP request)."""
        hops = {}
        for daddr in addrs:
            try:
                hops[daddr] = self._route(ipr, daddr)
            except Exception as e:  # a netlink hiccup must not kill the thread
                self.errors += 1
                log.warning("route lookup of %s failed: %s", ipaddress.IPv4Address(daddr), e)
        with self._lock:
            for daddr, h in hops.items():
                if daddr not in self._wanted:
                    continue
                if h is None:
                    self._no_route.add(daddr)
                    continue
                self._no_route.discard(daddr)
                direct = h[1] == str(ipaddress.IPv4Address(daddr))
                if self._direct.get(daddr, direct) != direct and daddr in self._cache:
                    self._moved.add(daddr)
                self._direct[daddr] = direct
        neigh: dict[tuple[int, str], tuple[str | None, int]] = {}
        for oif in {h[0] for h in hops.values() if h is not None}:
            try:
                for n in ipr.neigh("dump", ifindex=oif):
                    neigh[(oif, n.get_attr("NDA_DST"))] = (n.get_attr("NDA_LLADDR"), n["state"])
            except Exception as e:
                self.errors += 1
                log.warning("neighbour dump on ifindex %d failed: %s", oif, e)
        poked = set()
        for daddr, h in hops.items():
            if h is None:
                yield daddr, None
                continue
            oif, hop = h
            lladdr, state = neigh.get((oif, hop), (None, 0))
            usable = lladdr is not None and state & NUD_VALID
            if usable or daddr not in self._cache:
                self._fail_delay.pop(daddr, None)
                self._fail_next.pop(daddr, None)
            if not state & (NUD_REACHABLE | NUD_PERMANENT | NUD_NOARP) and (oif, hop) not in poked:
                if not usable and daddr in self._cache:
                    if now < self._fail_next.get(daddr, now):
                        yield daddr, None
                        continue
                    delay = min(self._fail_delay.get(daddr, self.refresh / 2) * 2, self.max_backoff)
                    self._fail_delay[daddr], self._fail_next[daddr] = delay, now + delay
                poked.add((oif, hop))
                self._poke(ipr, oif, hop)
            if not usable:
                yield daddr, None
            else:
                yield daddr, (self._by_ifindex[oif].index,
                              bytes.fromhex(lladdr.replace(":", "")), self._by_ifindex[oif].mac)

    def _poke(self, ipr, oif: int, hop: str) -> None:
        """Have the kernel resolve ``hop`` as if it transmitted to it.

        "replace" (NLM_F_CREATE | NLM_F_REPLACE) rather than "add": neigh_add
        answers EEXIST to NLM_F_EXCL before looking at NTF_USE, so "add"
        only ever worked for a missing entry and left a STALE or FAILED one
        (a real server that changed its MAC) untouched. With NTF_USE the
        kernel calls neigh_event_send and ignores the state and lladdr of
        the request, so nothing is overwritten."""
        self.pokes += 1
        if not poke(ipr, oif, hop):
            self.errors += 1

    def _route(self, ipr, daddr: int) -> tuple[int, str] | None:
        """(egress ifindex, next hop) of a dest the director can forward to."""
        dst = str(ipaddress.IPv4Address(daddr))
        self.lookups += 1
        routes = ipr.route("get", dst=dst)
        if not routes:
            return None
        r = routes[0]
        if r["type"] != RTN_UNICAST:
            return None  # local, unreachable, blackhole...
        oif = r.get_attr("RTA_OIF")
        if oif not in self._by_ifindex:
            return None  # reached through an interface pylvs does not drive
        return oif, r.get_attr("RTA_GATEWAY") or dst
