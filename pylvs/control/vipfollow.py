"""VIP following: a service's traffic is taken only while its VIP is an
address of this host (docs/failover.md).

IPVS sees a client's packet at the LOCAL_IN hook (net/netfilter/ipvs/
ip_vs_core.c, ``ip_vs_in_hook``): only packets the routing decision delivers
locally, that is packets to one of the host's own addresses. A director
whose VIP is moved away (keepalived's VRRP on the other director took it)
stops serving the VIP's clients at once, without any change to its IPVS
rules, and starts again when the address comes back. pylvs takes frames
before the kernel routes them, so it follows the addresses itself:

- ``AddrWatcher`` listens to the kernel's address notifications
  (RTMGRP_IPV4_IFADDR) and reads the namespace's IPv4 addresses again on
  each, so a change reaches the director within milliseconds (a second
  at most: it also re-reads every ``period`` s, in case a notification
  was lost to a full socket buffer).
- ``standby_view`` marks the services whose VIP is not local with
  ``tables.SVC_F_STANDBY`` in a copy of the published table. That copy is
  what the socket filter (and with ``--io xdp`` the XDP redirect) is
  built from (pylvs/io/bpf.py leaves standby services out of the
  "services" and "vips" keys), so pylvs does not see a standby VIP's
  frames. The engines keep the full tables: their conns stay (the kernel
  keeps its conns too, and a backup director installs synced conns for
  services whose VIP it does not hold yet), and the frames of a VIP that
  comes back meet them again.
- The steering (tcx / nft drop) keeps the full tables: the kernel never
  gets a service's frames, a standby VIP's included. keepalived adds the
  VIP and announces it at once; pylvs takes it a few milliseconds later.
  Frames arriving in between would meet a kernel that holds the VIP and
  no socket, and get a RST, breaking the conns the backup holds by sync;
  dropped, they are retransmitted. Where the VIP is not local the kernel
  would have dropped them too (not local, ``ip_forward=0``); a director
  with ``ip_forward=1`` no longer routes them onwards.
- The reply side is not affected: IPVS handles a VS-NAT real server's
  replies at FORWARD (``ip_vs_out_hook``), whatever the VIP, so the
  "realservers" keys stay as they were.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import select
import socket
import threading
import time
from typing import Callable, Iterable, Optional

import numpy as np

from ..engine import tables

log = logging.getLogger("pylvs")

# rtnetlink multicast group bit of IPv4 address changes (linux/rtnetlink.h).
RTMGRP_IPV4_IFADDR = 0x10
# Re-read this often even without a notification (seconds).
PERIOD = 1.0
# The longest the thread sleeps between checks of its stop flag (seconds).
TICK = 0.2
# The longest start() waits for the thread's pyroute2 socket (seconds).
OPEN_TIMEOUT = 5.0

PROTO_NAMES = {tables.PROTO_TCP: "TCP", tables.PROTO_UDP: "UDP", 132: "SCTP"}


def _addr_int(a) -> int:
    """An IPv4 address, dotted string or host-order int, as a host-order int."""
    return int(ipaddress.IPv4Address(a))


def standby_view(services: np.ndarray, local: Iterable) -> np.ndarray:
    """The services table (SERVICE_DTYPE) with ``tables.SVC_F_STANDBY`` set
    on every used row whose vaddr is not in ``local`` (addresses as strings
    or host-order ints); ``services`` itself when no row is standby, a copy
    otherwise (the published table is never written)."""
    own = np.fromiter((_addr_int(a) for a in local), dtype=np.uint32)
    used = (services["flags"] & tables.SVC_F_USED) != 0
    off = used & ~np.isin(services["vaddr"].astype(np.uint32), own)
    if not off.any():
        return services
    view = services.copy()
    view["flags"][off] |= tables.SVC_F_STANDBY
    return view


def vip_services(services: np.ndarray) -> dict[int, list[str]]:
    """{vaddr: ["TCP 10.0.0.100:80", ...]} of the used rows, for the log."""
    out: dict[int, list[str]] = {}
    for row in services[(services["flags"] & tables.SVC_F_USED) != 0]:
        a = int(row["vaddr"])
        name = PROTO_NAMES.get(int(row["proto"]), str(int(row["proto"])))
        out.setdefault(a, []).append(f"{name} {ipaddress.IPv4Address(a)}:{int(row['vport'])}")
    return out


def changes(services: np.ndarray, before: Iterable, after: Iterable) -> list[str]:
    """Log lines for the VIPs of ``services`` that became local or stopped
    being local between two address sets (strings or host-order ints)."""
    was = {_addr_int(a) for a in before}
    now = {_addr_int(a) for a in after}
    lines = []
    for vip, names in sorted(vip_services(services).items()):
        if vip in now and vip not in was:
            lines.append(f"VIP {ipaddress.IPv4Address(vip)} is an address of this host: "
                         f"forwarding {', '.join(names)}")
        elif vip in was and vip not in now:
            lines.append(f"VIP {ipaddress.IPv4Address(vip)} left this host: not forwarding "
                         f"{', '.join(names)} (IPVS sees only packets delivered locally)")
    return lines


def read_addresses(ipr) -> frozenset[str]:
    """The namespace's IPv4 addresses through a pyroute2 IPRoute."""
    return frozenset(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                     for a in ipr.get_addr(family=socket.AF_INET))


class AddrWatcher:
    """Calls ``on_change(addrs: frozenset[str])`` from its own thread each
    time the namespace's IPv4 addresses change (module docstring), the
    first reading included. ``addrs`` is the last set read (None before).

    ``start()`` opens the notification socket and the thread's pyroute2
    socket; OSError (and no thread left running) when netlink refuses
    either. ``close()`` stops it (idempotent). Should the thread fail
    later, it logs why and calls ``on_fail()`` (from that thread), so
    the caller can follow the addresses another way."""

    def __init__(self, on_change: Optional[Callable[[frozenset[str]], None]] = None, *,
                 period: float = PERIOD, on_fail: Optional[Callable[[], None]] = None):
        self.on_change = on_change
        self.on_fail = on_fail
        self.period = period
        self.addrs: frozenset[str] | None = None
        self.errors = 0
        self.events = 0   # notification batches read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._opened = threading.Event()
        self._open_error: BaseException | None = None

    def start(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        # A bare netlink socket, only as a wake-up: a pyroute2 socket made
        # here, on the control loop's thread, binds itself to the running
        # uvloop and fails there (DESIGN.md, traps). The addresses are read
        # with pyroute2 in the watcher's own thread, which says here
        # whether it could open its socket.
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                          socket.NETLINK_ROUTE)
        try:
            s.bind((0, RTMGRP_IPV4_IFADDR))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self._sock = s
        self._thread = threading.Thread(target=self._run, name="pylvs-addrs", daemon=True)
        self._thread.start()
        if not self._opened.wait(OPEN_TIMEOUT) or self._open_error is not None:
            why = self._open_error or f"no netlink socket within {OPEN_TIMEOUT:g} s"
            self.close()
            raise OSError(f"reading addresses with pyroute2: {why}")

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _drain(self) -> bool:
        """Read every pending notification; True if there was any. ENOBUFS
        (a full buffer: notifications were lost) counts as one, something
        changed unseen; any other error ends the read (a closed socket
        fails every recv: retrying it would spin)."""
        got = False
        while True:
            try:
                if not self._sock.recv(65536):
                    return got
                got = True
            except BlockingIOError:
                return got
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    self.errors += 1
                    return got
                got = True

    def poll(self, ipr) -> None:
        """Read the addresses once; report them if they changed."""
        try:
            addrs = read_addresses(ipr)
        except Exception as e:  # a netlink hiccup must not kill the thread
            self.errors += 1
            log.warning("listing local addresses failed: %s", e)
            return
        if addrs == self.addrs:
            return
        self.addrs = addrs
        cb = self.on_change
        if cb is not None:
            try:
                cb(addrs)
            except Exception:
                log.exception("address change callback failed")

    def _run(self) -> None:
        try:
            from pyroute2 import IPRoute

            ipr = IPRoute()
        except BaseException as e:
            self._open_error = e
            self._opened.set()
            return
        self._opened.set()
        try:
            with ipr:
                self._watch(ipr)
        except Exception:
            if self._stop.is_set():   # close() took the socket away: the end anyway
                return
            log.exception("following local addresses failed")
            if self.on_fail is not None:
                self.on_fail()

    def _watch(self, ipr) -> None:
        self.poll(ipr)
        last = time.monotonic()
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], TICK)
            if ready and self._drain():
                self.events += 1
            elif time.monotonic() - last < self.period:
                continue
            self.poll(ipr)
            last = time.monotonic()
