"""Where to send a real server's frames: egress port and MACs, from the kernel.

The director forwards in user space, but the kernel still owns routing and
ARP. For a dest address the Resolver asks the kernel (netlink, pyroute2):
``route get`` gives the egress interface and gateway, the neighbour table the
next hop's MAC. A missing neighbour entry is created with NTF_USE, which
makes the kernel send the ARP request itself; the caller gets None and
retries, or waits for ``on_change``.

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
NTF_USE = 0x01
# NUD states whose lladdr can be used.
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE = 0x02, 0x04, 0x08, 0x10
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT

Answer = tuple[int, bytes, bytes]  # (out_port, dmac, smac)


class Resolver:
    """``resolve(daddr) -> (out_port, dmac, smac) | None`` for the backend's ports.

    ``on_change(daddr)`` (if set) is called from the resolver thread when an
    address gets an answer or its answer changes (new MAC, new route): the
    control plane then rebuilds its dest table.
    """

    def __init__(self, ports, *, interval: float = 0.1, refresh: float = 2.0,
                 on_change: Optional[Callable[[int], None]] = None):
        self.ports = list(ports)
        self._by_ifindex = {p.ifindex: p for p in self.ports}
        self.interval = interval
        self.refresh = refresh
        self.on_change = on_change
        self._cache: dict[int, Answer] = {}
        self._wanted: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        # The namespace's own IPv4 addresses, refreshed by the thread: the
        # steering rules must not steal replies addressed to the director.
        self.local: frozenset[str] = frozenset()
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

    def forget(self, daddr: int) -> None:
        with self._lock:
            self._wanted.discard(int(daddr))
            self._cache.pop(int(daddr), None)

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
        # A real server that does not answer ARP is asked less and less
        # often (interval doubling up to `refresh`), not ten times a second.
        delay: dict[int, float] = {}
        next_try: dict[int, float] = {}
        try:
            last_refresh = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                with self._lock:
                    wanted = sorted(self._wanted)
                    missing = [a for a in wanted if a not in self._cache]
                for a in list(delay):
                    if a not in missing:
                        del delay[a], next_try[a]
                if now - last_refresh >= self.refresh:
                    last_refresh = now
                    self._refresh_local(ipr)
                    todo = wanted
                else:
                    todo = [a for a in missing if next_try.get(a, 0.0) <= now]
                for a in missing:
                    if a in todo:
                        delay[a] = min(delay.get(a, self.interval / 2) * 2, self.refresh)
                        next_try[a] = now + delay[a]
                for daddr in todo:
                    try:
                        ans = self._lookup(ipr, daddr, poke=True)
                    except Exception as e:  # a netlink hiccup must not kill the thread
                        self.errors += 1
                        log.warning("neighbour lookup of %s failed: %s",
                                    ipaddress.IPv4Address(daddr), e)
                        continue
                    self._store(daddr, ans)
                due = [t for a, t in next_try.items() if a in missing]
                wait = min([self.refresh - (time.monotonic() - last_refresh), *[
                    t - time.monotonic() for t in due]])
                self._wake.wait(max(0.01, wait))
                self._wake.clear()
        finally:
            ipr.close()

    def _refresh_local(self, ipr) -> None:
        try:
            addrs = frozenset(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                              for a in ipr.get_addr(family=2))
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
        cb = self.on_change
        if cb is not None:
            try:
                cb(daddr)
            except Exception:
                log.exception("on_change callback failed")

    def _lookup(self, ipr, daddr: int, poke: bool) -> Answer | None:
        dst = str(ipaddress.IPv4Address(daddr))
        routes = ipr.route("get", dst=dst)
        if not routes:
            return None
        r = routes[0]
        if r["type"] != RTN_UNICAST:
            return None  # local, unreachable, blackhole...
        oif = r.get_attr("RTA_OIF")
        port = self._by_ifindex.get(oif)
        if port is None:
            return None  # reached through an interface pylvs does not drive
        hop = r.get_attr("RTA_GATEWAY") or dst
        lladdr, state = None, 0
        for n in ipr.neigh("dump", ifindex=oif):
            if n.get_attr("NDA_DST") == hop:
                lladdr, state = n.get_attr("NDA_LLADDR"), n["state"]
                break
        if poke and not (state & (NUD_REACHABLE | NUD_PERMANENT | NUD_NOARP)):
            # Missing, failed or stale: have the kernel (re)send ARP itself.
            try:
                ipr.neigh("add", dst=hop, ifindex=oif, flags=NTF_USE, state=0)
            except Exception as e:
                log.debug("NTF_USE for %s: %s", hop, e)
        if lladdr is None or not (state & NUD_VALID):
            return None
        return (port.index, bytes.fromhex(lladdr.replace(":", "")), port.mac)
