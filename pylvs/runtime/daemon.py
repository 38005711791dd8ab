"""`pylvs run`: the director process.

The work is shared by:

- the workers (pylvs/runtime/worker.py, ``--workers N``): each a thread
  running its own engine over its own backend instance (``forward``) and the
  conn expiry clock hand, with new tables swapped in between calls;
- the main thread runs the control plane on uvloop: the RPC server for
  ``pylvs adm`` and the Balancer, whose every change is *published*: new
  engine tables, a new socket filter, new steering sets.

Neighbour resolution runs in a third thread (pyroute2 stays off uvloop) and
wakes the Balancer when a real server's MAC becomes known.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..control.text import ascii_int, quoted
from ..engine import tables

log = logging.getLogger("pylvs")

# Counters `pylvs run` logs when they grow (at most once per LOG_EVERY s each).
WATCHED_IO = ("rx_dropped", "tx_errors", "tx_emsgsize", "emit_errors", "tx_bad_port",
              "sock_errors", "rx_truncated", "rx_vlan", "rx_oversize",
              "pcap_dropped", "pcap_write_errors")
WATCHED_ENGINE = ("drop_table_full", "emit_overflow")
LOG_EVERY = 10.0
SIGHUP_MESSAGE = "SIGHUP: no configuration file (-c) to reload; still running"
# How long `pylvs stats` waits for the steering table's not_host counter
# (an nft subprocess, run in a worker thread); after that it shows null.
NOT_HOST_TIMEOUT = 5.0
# At start, "ready" waits at most this long (seconds) for the MACs of the
# dests configured so far, then at most as long for every worker to take
# the tables carrying them.
READY_WAIT = 2.0


def default_interfaces() -> list[str]:
    """Every Ethernet interface of this namespace that is up (loopback excluded)."""
    from ..io.afpacket import up_ethernet_interfaces

    return up_ethernet_interfaces()


def local_addresses() -> frozenset[str]:
    """The namespace's IPv4 addresses. Called before the event loop starts."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return frozenset(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                         for a in ipr.get_addr(family=socket.AF_INET))


def notify_ready() -> None:
    """sd_notify(READY=1) when started by systemd (Type=notify)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(b"READY=1")
    except OSError as e:
        log.warning("could not notify %s: %s", os.environ["NOTIFY_SOCKET"], e)


@dataclass
class Options:
    ifaces: list[str] = field(default_factory=list)
    control: str | None = None
    config: str | None = None
    config_id: str | None = None      # keepalived's -i: the @ID lines taken
    capacity: int = 1 << 16      # conn limit; `pylvs run` passes --conn-max
    engine: str = "c"
    # Embedded directors (tests, labs) keep tables.Counters' small default
    # tables; `pylvs run` passes --max-services and --max-dests.
    max_services: int = 256
    max_dests: int = 4096
    sysctls: dict = field(default_factory=dict)   # --sysctl NAME=VALUE
    poll_timeout: float = 0.02   # the data thread's longest sleep
    expire_budget: int = 512     # conn slots the clock hand visits per loop
    # False (--no-qdisc-bypass): send through the qdisc layer, so tcpdump on
    # the director sees what pylvs transmits (slower; docs/io.md).
    qdisc_bypass: bool = True
    pcap: str | None = None      # --pcap FILE: every frame sent, written there too
    ring: str | None = None      # --ring auto|v2|v3: AF_PACKET rings (None: the default)
    # --tap NAME ... (pylvs/io/tap.py): TAP ports instead of interfaces, the
    # director's addresses given here (--addr DIP/PLEN per TAP, --gateway).
    tap: list[str] = field(default_factory=list)
    tap_addrs: list[str] = field(default_factory=list)
    gateway: str | None = None
    mac: str | None = None
    # --workers: data-path threads, each with its engine and sockets
    # (capacity is split among them); 1 is the single data thread of old.
    workers: int = 1
    # --steering: "bpf", "nft", or None (bpf, nft where tcx cannot attach);
    # pylvs/control/steering.py.
    steering: str | None = None
    # --io: "afpacket" or "xdp" (AF_XDP, AF_PACKET where XDP cannot attach;
    # pylvs/io/xdp.py).
    io: str = "afpacket"
    # Clients on the director itself are balanced (pylvs/io/local.py;
    # not with --tap); --no-local-clients leaves them to the kernel.
    local_clients: bool = True
    # --sched-impl: "c", the engines run rr, wrr, lc, wlc, sed, nq, fo, ovf,
    # sh, dh and mh themselves; "python", every new conn asks the Python scheduler.
    sched_impl: str = "c"
    # --vips: "local", a service's frames are taken only while its VIP is an
    # address of this host, as IPVS (pylvs/control/vipfollow.py); "all",
    # whatever the addresses. A TAP director owns its VIPs: always "all".
    vips: str = "local"
    # --start-daemon master|backup at start (docs/sync.md): start_daemon
    # requests, as `pylvs adm --start-daemon` sends them.
    sync: list = field(default_factory=list)


class Daemon:
    """The director process; ``run()`` returns the exit status."""

    def __init__(self, opts: Options, *, backend=None, steering=None, resolver=None,
                 on_start=None):
        # on_start(balancer), run on the event loop before "ready": for
        # embedding (tests, labs) without a config file.
        self.on_start = on_start
        self.opts = opts
        self.ifaces = opts.tap or opts.ifaces or default_interfaces()
        if not self.ifaces:
            raise SystemExit("pylvs run: no interface is up in this network namespace; use --iface")
        for i, name in enumerate(self.ifaces):
            if name in self.ifaces[:i]:
                raise SystemExit(f"pylvs run: --iface {name} given twice")
        if not opts.tap and _is_loopback(self.ifaces):
            raise SystemExit("pylvs run: --iface: the loopback interface is not a port to "
                             "forward on (clients on the director itself are balanced "
                             "through it already; docs/io.md, \"Clients on the director\")")
        if opts.workers < 1:
            raise SystemExit("pylvs run: --workers must be at least 1")
        if opts.workers > 1 and opts.engine != "c":
            raise SystemExit("pylvs run: --workers above 1 needs the C engine (--engine c)")
        # backend: one instance, or a list of one per worker (embedding).
        if backend is not None and not isinstance(backend, (list, tuple)):
            backend = [backend]
        if backend is not None and len(backend) != opts.workers:
            raise SystemExit(f"pylvs run: {len(backend)} backend(s) given for {opts.workers} workers")
        self._backends, self._steering, self._resolver = backend, steering, resolver
        self._filter_lock = threading.Lock()
        self.workers: list = []
        self._stop = threading.Event()
        self._services = tables.empty_services(0)
        self._dests = tables.empty_dests(0)
        self._local: frozenset[str] = frozenset()
        self._reloads: set = set()   # SIGHUP reloads running (asyncio tasks)

    @property
    def loops(self) -> int:
        """forward calls made by all workers."""
        return sum(w.loops for w in self.workers)

    @property
    def _data_error(self) -> BaseException | None:
        return next((w.error for w in self.workers if w.error is not None), None)

    # --- publishing tables (control thread) ---------------------------------

    def publish(self, services, dests) -> None:
        """The Balancer's publish callback: one consistent change everywhere.

        Every worker's engine gets the tables first (each worker swaps them
        in between two of its forward calls; this waits for all of them, at
        most about one poll timeout), so by the time the filter and steering
        send a new service's frames to user space and away from the kernel,
        every engine knows the service and the first SYN is not lost.
        """
        old = getattr(self, "_dests", None)
        self._services, self._dests = services, dests
        for w in self.workers:
            w.offer_tables(services, dests)
        deadline = time.monotonic() + max(0.2, 5 * self.opts.poll_timeout)
        for w in self.workers:
            w.tables_taken.wait(max(0.0, deadline - time.monotonic()))
        if self.balancer.sysctls()["expire_nodest_conn"] and tables.dests_gone(old, dests):
            # The kernel queues ip_vs_expire_nodest_conn_flush when a dest
            # is deleted: its conns go at once, not at their next packet.
            self._engine_call("expire_nodest")
        self._apply_filter()
        self._steer()
        self._push_routes()
        self._local_sources()

    def _apply_filter(self) -> None:
        """The socket filter for the latest tables and ports: the ports'
        addresses are the sources of VS-Tun's outer packets, to which a
        router on a tunnel's path reports a smaller path MTU (bpf.for_tables
        takes them while a Tun dest exists). Called by the control thread
        (tables) and the NetWatcher thread (ports): under one lock, the last
        call sees both."""
        with self._filter_lock:
            net = getattr(self, "_net", None)
            own = () if net is None else [int(a) for a in net.ports["addr"] if a]
            view = self._taken()
            for b in self.backends:
                b.set_filter(view, self._dests, own_addrs=own)

    def _local_changed(self, addrs: frozenset[str]) -> None:
        # Resolver thread: hand over to the event loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._apply_local, addrs)

    def _apply_local(self, addrs: frozenset[str]) -> None:
        if addrs != self._local:
            old, self._local = self._local, addrs
            log.info("local addresses: %s", ", ".join(sorted(addrs)) or "none")
            if self._follow_vips():
                from ..control.vipfollow import changes

                for line in changes(self._services, old, addrs):
                    log.info("%s", line)
                self._apply_filter()
            self._steer()
            self._local_vips = None   # a VIP's interface or addresses may have changed
            self._local_sources()

    # --- VIP following (pylvs/control/vipfollow.py) ---------------------------

    def _follow_vips(self) -> bool:
        return self.opts.vips == "local" and not self.opts.tap

    def _taken(self):
        """The services table the socket filter and steering are built
        from: standby rows marked while their VIP is not local."""
        if not self._follow_vips():
            return self._services
        from ..control.vipfollow import standby_view

        key = (self._services, self._local)
        cached = getattr(self, "_taken_cache", None)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] != key[1]:
            cached = self._taken_cache = (key, standby_view(*key))
        return cached[1]

    def _steer(self) -> None:
        """Steering keeps the kernel from every service's frames, a standby
        VIP's too: the frames that reach the director in the moment between
        keepalived adding the VIP (and announcing it) and pylvs taking it
        are dropped, and retransmitted, instead of answered with the
        kernel's RST (the conns a backup holds by sync would break). Only
        what is taken (the socket filter, the XDP redirect) follows the
        VIPs."""
        view = self._taken()
        if view is self._services:
            self.steering.apply(self._services, self._dests, self._local)
        else:
            self.steering.apply(self._services, self._dests, self._local, view)
            self._log_vips_away()

    def _watch_addrs(self) -> None:
        """Local addresses from kernel notifications, not the resolver's
        2 s refresh, so a VIP that comes or goes is followed at once."""
        from ..control.vipfollow import AddrWatcher

        self._addrwatch = AddrWatcher(self._local_changed, on_fail=self._addrs_unwatched)
        self.resolver.on_local_change = None
        try:
            self._addrwatch.start()
        except OSError as e:
            log.warning("address notifications: %s; following the VIPs every 2 s", e)
            self._addrwatch = None
            self._addrs_unwatched()

    def _addrs_unwatched(self) -> None:
        # The AddrWatcher failed (its thread, or start-up): the resolver's
        # 2 s refresh follows the addresses again, from its last reading.
        self.resolver.on_local_change = self._local_changed
        self._local_changed(self.resolver.local)

    def _log_vips_away(self) -> None:
        """Name each VIP of a new service that is not local, once."""
        from ..control.vipfollow import vip_services

        own = {int(ipaddress.IPv4Address(a)) for a in self._local}
        away = {v: n for v, n in vip_services(self._services).items() if v not in own}
        for vip in sorted(away.keys() - getattr(self, "_away_logged", set())):
            log.info("VIP %s is not an address of this host: %s wait(s) for it "
                     "(pylvs run --vips all takes them anyway)",
                     ipaddress.IPv4Address(vip), ", ".join(away[vip]))
        self._away_logged = set(away)

    # --- ports, routes, sysctls: what the engine knows of the namespace --------

    def _io_hooks(self) -> None:
        """Wire the NetWatcher (ports, routes, local addresses) and the
        Balancer's sysctls to the engine; read the namespace once now, so
        the engine has its ports before the first frame."""
        self._pending_io: dict[str, tuple] = {}
        self._io_lock = threading.Lock()
        self._net = None
        self._routes_sent: tuple | None = None
        self.balancer.publish_sysctls = lambda values: self._engine_call("set_sysctls", values)
        if getattr(self, "_netwatch", None) is None:
            from ..control.ports import NetWatcher

            self._netwatch = NetWatcher(self.backend.ports)
        self.netwatch = self._netwatch
        self.netwatch.on_change = self._net_changed
        if self.netwatch.state is None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:   # the event loop does not run yet
                self.netwatch.poll(ipr)
        self.netwatch.start()

    def _net_changed(self, state) -> None:
        # NetWatcher thread (or start-up).
        old = getattr(self, "_net", None)
        self._net = state
        self._engine_call("set_ports", state.ports)
        if old is None or old.ports["addr"].tobytes() != state.ports["addr"].tobytes():
            self._apply_filter()
        self._push_routes()

    def _push_routes(self) -> None:
        """engine.set_routes(routes, local) when either changed; local is the
        namespace's addresses and every service's VIP (the VIPs are the
        director's own addresses even when no interface carries them)."""
        net = self._net
        if net is None:
            return
        svcs = self._services
        vips = svcs["vaddr"][(svcs["flags"] & tables.SVC_F_USED) != 0].astype(np.uint32)
        local = np.union1d(net.local, vips).astype(np.uint32)
        with self._io_lock:
            sent = self._routes_sent
            if (sent is not None and sent[0] is net.routes
                    and sent[1].tobytes() == local.tobytes()):
                return
            self._routes_sent = (net.routes, local)
        self._engine_call("set_routes", net.routes, local)

    def _local_sources(self) -> None:
        """Preferred sources for local connects to the services' VIPs
        (pylvs/io/local.py); control thread."""
        src = getattr(self, "_local_src", None)
        if src is None:
            return
        svcs = self._services
        vips = frozenset(int(v) for v in svcs["vaddr"][(svcs["flags"] & tables.SVC_F_USED) != 0])
        if vips == getattr(self, "_local_vips", None):
            return
        try:
            src.apply(vips)
            self._local_vips = vips
        except OSError as e:
            log.error("local clients: %s", e)

    def _engine_call(self, name: str, *args) -> None:
        """engine.<name>(*args) on every worker's engine, between two of its
        forward calls (the latest call of each name wins), or at once when
        it is not running."""
        for w in self.workers:
            w.call(name, *args)

    def _io_stats(self) -> list[dict]:
        """Each worker's backend counters ({} for a backend without)."""
        return [b.stats() if hasattr(b, "stats") else {} for b in self.backends]

    def _watched(self) -> dict[str, int]:
        """The counters _watch logs (summed over workers): I/O losses and
        the engine's refusals that mean a limit was hit."""
        io = _sum_dicts(self._io_stats())
        out = {k: int(io.get(k, 0)) for k in WATCHED_IO if k in io}
        named = self.counters.named()
        out.update({k: named[k] for k in WATCHED_ENGINE if k in named})
        return out

    # --- the workers ----------------------------------------------------------

    def _set_timeouts(self, timeouts) -> None:
        for w in self.workers:
            w.set_timeouts(timeouts)

    def _conns(self) -> list:
        """Every worker's conns (``-L -c``), each tuple ending with the
        index of the worker that holds it."""
        return [t + (w.index,) for w in self.workers for t in w.conns()]

    def _worker_failed(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stop_event.set)

    # --- start-up and shut-down --------------------------------------------

    def _build(self) -> None:
        from ..engine import new_engine
        from ..io.xdp import open_backends
        from .worker import LockedEngine, UpcallMeter, Worker

        if self._backends is None and self.opts.tap:
            self._build_tap()   # one worker where its queues cannot be steered
            self.opts.workers = len(self._backends)
        n = self.opts.workers
        self.counters = tables.CounterSum(self.opts.max_services, self.opts.max_dests, n)
        if self._backends is None:   # --io xdp falls back to afpacket (docs/io.md)
            # Clients on the director come in by an AF_PACKET loopback port
            # (with --io xdp: one of the taps beside the XSKs).
            local = self._open_local()
            self._backends = open_backends(self.ifaces, self.opts.io, n,
                                           qdisc_bypass=self.opts.qdisc_bypass, pcap=self.opts.pcap,
                                           **({"ring": self.opts.ring} if self.opts.ring else {}),
                                           **({"local": True} if local else {}))
        self.backends = list(self._backends)
        self.backend = self.backends[0]
        if self._resolver is None:
            from ..control.neighbors import Resolver
            self._resolver = Resolver(self.backend.ports)
        self.resolver = self._resolver
        if self._steering is None:
            from ..control.steering import SteeringError, open_steering
            try:
                self._steering = open_steering([p.name for p in self.backend.ports],
                                               self.opts.steering,
                                               max_services=self.opts.max_services,
                                               max_dests=self.opts.max_dests)
            except SteeringError as e:
                raise SystemExit(f"pylvs run: --steering {self.opts.steering}: {e}") from None
            steer = getattr(self.backend, "steer", None)   # XDP: its sets follow steering's
            if steer is not None:
                self._steering = steer(self._steering)
        self.steering = self._steering
        if getattr(self, "_local_src", None) is not None and getattr(self.steering, "kind", "") == "nft":
            log.warning("local clients: the nft steering table passes NAT replies to local "
                        "clients to the kernel, which resets them; only DR/Tun ones work")
        try:
            from ..control.balancer import Balancer
        except ImportError as e:
            raise SystemExit(f"pylvs run: the control plane is missing ({e})") from e
        self.balancer = Balancer(self.counters, resolver=self.resolver, publish=self.publish)
        # --conn-max is split: each worker's table holds its clients' conns.
        capacity = -(-self.opts.capacity // n)
        for i, (part, backend) in enumerate(zip(self.counters.parts, self.backends)):
            meter = UpcallMeter(self.balancer.schedule)
            engine = new_engine(self.opts.engine, capacity, counters=part, schedule=meter)
            lock = threading.Lock()
            fwd = engine if _is_c_engine(engine) else LockedEngine(engine, lock)
            self.workers.append(Worker(i, engine, backend, part, fwd_engine=fwd, lock=lock,
                                       meter=meter))
        self.engine = self.workers[0].engine
        self._io_hooks()
        # A resolved MAC changes the dest table: the Balancer re-publishes.
        refresh = (getattr(self.balancer, "on_resolved", None)
                   or getattr(self.balancer, "refresh", None))
        if refresh is not None:
            self.resolver.on_change = lambda daddr: self._call_in_loop(refresh, daddr)
        self.resolver.on_local_change = self._local_changed
        self.balancer.on_timeouts = self._set_timeouts
        self._control_hooks()
        self.balancer.conns_source = self._conns
        self.balancer.clock = time.monotonic  # the time base forward() is given

    def _open_local(self) -> bool:
        """Clients on the director itself (pylvs/io/local.py): their source
        routes' anchor, if --no-local-clients or --steering nft (whose table
        cannot tell their replies from the director's own) does not say no."""
        self._local_src = None
        if not self.opts.local_clients or self.opts.steering == "nft":
            return False
        from ..io.local import LocalSource

        try:
            self._local_src = LocalSource()
        except OSError as e:
            log.warning("local clients: not balanced (%s)", e)
            return False
        log.info("local clients: connects from this host to a virtual service are balanced "
                 "(loopback port, source routes through %s)", self._local_src.name)
        return True

    def _build_tap(self) -> None:
        """The TAP backend brings its own resolver (user-space ARP), network
        state (ports and routes from --addr/--gateway) and no steering (its
        queues' steering program follows the tables through set_filter)."""
        from ..io import tap

        try:
            self._backends = tap.open_workers(self.opts.tap, self.opts.workers,
                                              addrs=self.opts.tap_addrs, gateway=self.opts.gateway,
                                              mac=self.opts.mac, max_services=self.opts.max_services,
                                              max_dests=self.opts.max_dests)
        except (ValueError, OSError) as e:
            raise SystemExit(f"pylvs run: {e}") from None
        host = self._backends[0].host
        self._resolver, self._steering, self._netwatch = host, tap.NoSteering(), host.net
        self._local = host.local
        host.announce_all()

    def _control_hooks(self) -> None:
        """`pylvs stats` reads the engine; --sysctl values go in at start
        (through publish_sysctls, wired by _io_hooks)."""
        self.balancer.engine_info = self._engine_info
        self.balancer.publish_sched = lambda *t: self._engine_call("set_sched", *t)
        self.balancer.c_sched = self.opts.sched_impl == "c"
        try:
            self.balancer.set_sysctls(self.opts.sysctls)
        except Exception as e:  # BalancerError: the message names the knob
            raise SystemExit(f"pylvs run: --sysctl: {e}") from None

    def _engine_info(self) -> dict:
        """The conn tables of all workers, summed (memory: None when an
        engine does not say)."""
        infos = [w.info() for w in self.workers]
        mem = [i["memory"] for i in infos]
        return {"conn_count": sum(i["conn_count"] for i in infos),
                "capacity": sum(i["capacity"] for i in infos),
                "memory": None if None in mem else sum(mem)}

    async def _stats_extra(self) -> dict:
        """What `pylvs stats` adds to the Balancer's answer (docs/control.md):
        "io", the backends' counters summed over ports and workers
        (`stats()`; {} for a backend without counters), "steering",
        {"not_host": packets or None when nft did not answer within
        NOT_HOST_TIMEOUT s or failed}, "workers": per worker, in worker
        order, its "engine" counters, "conns" and "io" (the sums' parts), and
        "tap": the TAP ports of a ``--tap`` director ([] otherwise).
        nft runs in the loop's default executor, never on the loop."""
        per_io = self._io_stats()
        io = _sum_dicts(per_io)
        not_host = None
        read = getattr(self.steering, "not_host", None)
        if read is not None:
            try:
                not_host = int(await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(None, read), NOT_HOST_TIMEOUT))
            except asyncio.TimeoutError:
                log.warning("pylvs stats: nft gave no not_host counter within %g s",
                            NOT_HOST_TIMEOUT)
            except Exception as e:  # SteeringError, nft missing: the rest still answers
                log.warning("pylvs stats: not_host: %s", e)
        workers = [{"engine": w.counters.named(), "conns": w.info(),
                    "io": {k: int(v) for k, v in wio.items()}}
                   for w, wio in zip(self.workers, per_io)]
        return {"io": {k: int(v) for k, v in io.items()}, "steering": {"not_host": not_host},
                "workers": workers, "tap": list(self.opts.tap),
                "sync": self.sync.stats() if getattr(self, "sync", None) else {}}

    async def _health_extra(self) -> dict:
        """What `pylvs status` shows: the HealthManager's checks and
        services (docs/health.md)."""
        return self.health.view()

    def _call_in_loop(self, fn, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def call():
            try:
                r = fn(*args) if _takes_args(fn, len(args)) else fn()
                if inspect.isawaitable(r):
                    asyncio.ensure_future(r)
            except Exception:
                log.exception("%s failed", getattr(fn, "__name__", fn))

        loop.call_soon_threadsafe(call)

    # --- the configuration file (-c): applied at start, SIGHUP, `pylvs reload`
    # (pylvs.config.apply.ConfigFile; docs/config.md)

    async def _apply_config(self) -> None:
        if self._config is not None:
            await self._config.apply(self._apply_ops)
            self._configure_health()

    async def _apply_ops(self, ops: list[dict]) -> list[dict]:
        # Held: published by _configure_health together with the health
        # state, so an `alpha` dest (down until its checks pass) never
        # forwards in between.
        results = self.balancer.apply_many(ops, hold=True)
        if inspect.isawaitable(results):
            results = await results
        return list(results or [])

    def _configure_health(self) -> None:
        # Contract 1 (PLAN-issue9.md): after the services and dests exist.
        try:
            if getattr(self, "health", None):
                self.health.configure(self._config.loaded.virtual_servers)
        finally:
            self.balancer.flush()

    async def reload(self, _req: dict | None = None) -> dict:
        """Re-read the -c file and apply only the difference (SIGHUP, and
        the control op "reload" of `pylvs reload`); BalancerError when
        there is no file or it does not parse (nothing changed then)."""
        from ..config.keepalived import ConfigError
        from ..control.balancer import BalancerError

        if self._config is None:
            raise BalancerError("no configuration file to reload (pylvs run -c FILE)")
        try:
            result = await self._config.reload(self._apply_ops)
        except ConfigError as e:
            raise BalancerError(str(e)) from None   # refused before any operation
        except BaseException:
            self.balancer.flush()   # what was applied still goes out
            raise
        self._configure_health()
        return result

    def _sighup(self) -> None:
        if self._config is None:
            log.warning(SIGHUP_MESSAGE)
            return
        from ..control.balancer import BalancerError

        async def run() -> None:
            try:
                await self.reload()
            except BalancerError:
                pass   # logged; the running configuration is kept
            except Exception:
                log.exception("reload failed; the running configuration is kept")
        # The loop keeps only a weak reference to a task: hold it until done.
        task = asyncio.ensure_future(run())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _await_dests(self, timeout: float = READY_WAIT, step: float = 0.01) -> None:
        """Hold "ready" until the data path can forward to every dest known
        now: each one's next hop resolved (or found to have no route
        through our ports, or ``timeout`` s passed: the log names the
        rest), and the tables carrying those answers taken by every worker
        (at most ``timeout`` s more). The resolver's answers reach the
        tables through a deferred publish (Balancer.on_resolved) that may
        still be on its way to the loop, so rows the resolver can answer
        but the published table does not carry are re-published here.
        Without dests it returns at once."""
        resolve = getattr(self.resolver, "resolve", None)
        dests = self.balancer.dests_table
        daddrs = sorted({int(a) for a in dests["daddr"][(dests["flags"] & tables.DEST_F_USED) != 0]})
        if resolve is None or not daddrs:
            return
        no_route = getattr(self.resolver, "no_route", lambda daddr: False)

        def waiting() -> list[int]:
            return [a for a in daddrs if resolve(a) is None and not no_route(a)]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        left = waiting()
        while left and loop.time() < deadline:
            await asyncio.sleep(step)
            left = waiting()
        if left:
            log.warning("%d dest(s) still unresolved after %g s: %s; their packets are "
                        "dropped (drop_unresolved) until the MAC is known", len(left), timeout,
                        ", ".join(str(ipaddress.IPv4Address(a)) for a in left))
        for a in self._stale_daddrs(resolve):
            self.balancer.on_resolved(a)
        self.balancer.flush()
        deadline = loop.time() + timeout
        while not all(w.tables_taken.is_set() for w in self.workers):
            if loop.time() >= deadline:
                log.warning("not every worker took the latest tables within %g s", timeout)
                break
            await asyncio.sleep(step)

    def _stale_daddrs(self, resolve) -> set[int]:
        """Dest addresses whose published rows lack the resolver's answer."""
        stale = set()
        for row in self.balancer.dests_table:
            if not row["flags"] & tables.DEST_F_USED:
                continue
            ans = resolve(int(row["daddr"]))
            if ans is None:
                continue
            if (not row["flags"] & tables.DEST_F_RESOLVED or int(row["out_port"]) != ans[0]
                    or row["dmac"].tobytes() != bytes(ans[1])):
                stale.add(int(row["daddr"]))
        return stale

    async def _watch(self, period: float = 1.0) -> None:
        # Losses and refusals the data path counts are logged without -v,
        # each counter at most once per LOG_EVERY seconds (with what it grew
        # by since its last line), so a loss is never silent and a flood
        # does not flood the log.
        base = self._watched()
        last_log: dict[str, float] = {}
        ticks = 0
        while True:
            await asyncio.sleep(period)
            ticks += 1
            now, cur = time.monotonic(), self._watched()
            if ticks % 5 == 0 and log.isEnabledFor(logging.DEBUG):
                log.debug("stats %s", _sum_dicts(self._io_stats()))
            for k, v in cur.items():
                if v > base.get(k, 0) and now - last_log.get(k, -LOG_EVERY) >= LOG_EVERY:
                    log.warning("data path: %s +%d (total %d)", k, v - base.get(k, 0), v)
                    base[k], last_log[k] = v, now

    def _defense(self):
        """drop_entry, drop_packet, secure_tcp once a second (control/defense.py):
        available memory counts the free conn slots of every worker's engine."""
        from ..control.defense import Defense

        def room() -> int:
            return sum(int(w.engine.capacity) - int(w.engine.conn_count) for w in self.workers)

        return Defense(self.balancer, self._engine_call, room)

    async def _main(self) -> int:
        from ..control import rpc

        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._follow_vips():
            self._watch_addrs()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop_event.set)
        # SIGHUP re-reads the -c file (without one, its default action would
        # kill the process without the clean-up below: an nft steering
        # table would stay and black-hole the VIPs).
        self._loop.add_signal_handler(signal.SIGHUP, self._sighup)

        path = self.opts.control or rpc.default_path()
        # Health checks (pylvs.health): configured by a keepalived.conf's
        # checkers (HealthManager.configure), shown by `pylvs status`.
        from ..health.manager import HealthManager
        self.health = HealthManager(self.balancer)
        self._sync_block()
        server = await rpc.start_server(path, self.balancer,
                                        extras={"stats": self._stats_extra,
                                                "health": self._health_extra},
                                        handlers={"reload": self.reload,
                                                  **self.sync.handlers()})
        for w in self.workers:
            w.start(self._stop, self.opts.poll_timeout, self.opts.expire_budget,
                    self._worker_failed)
        self.resolver.start()
        watch = asyncio.ensure_future(self._watch())
        defense = asyncio.ensure_future(self._defense().run())
        try:
            self.balancer.republish()  # the engine starts with (empty) tables
            await self._apply_config()
            if getattr(self, "_hup_pending", False):
                self._sighup()
            if self.on_start is not None:
                r = self.on_start(self.balancer)
                if inspect.isawaitable(r):
                    await r
            await self._await_dests()
            await self.health.start()
            await self._sync_start()
            pcap = getattr(self.backend, "pcap", None)
            log.info("ready: %d port(s) %s, engine %s, %d worker(s), control %s%s%s",
                     len(self.backend.ports), " ".join(p.name for p in self.backend.ports),
                     self.opts.engine, len(self.workers), path,
                     "" if getattr(self.backend, "qdisc_bypass", True)
                     else ", sending through the qdisc (visible to tcpdump)",
                     f", frames sent copied to {pcap.path}" if pcap else "")
            notify_ready()
            await self._stop_event.wait()
        finally:
            log.info("stopping")
            await self.health.stop()
            await self.sync.close()
            watch.cancel()
            defense.cancel()
            self._stop.set()
            close = getattr(server, "close", None)
            if close is not None:
                close()
                wait_closed = getattr(server, "wait_closed", None)
                if wait_closed is not None:
                    try:
                        await asyncio.wait_for(wait_closed(), 2)
                    except (asyncio.TimeoutError, Exception):
                        pass
            def join() -> None:
                for w in self.workers:
                    if w.thread is not None:
                        w.thread.join(5)
            await asyncio.get_running_loop().run_in_executor(None, join)
        return 1 if self._data_error else 0

    # --- connection sync (pylvs/sync/daemon.py, docs/sync.md) -------------

    def _sync_block(self) -> None:
        """The sync daemons: each worker's engine, steered by the published
        services (a received conn goes to the worker its client reaches)."""
        from ..sync.daemon import SyncDaemons

        self.sync = SyncDaemons(lambda: self.workers, lambda: self._services,
                                lambda: self._dests)

    async def _sync_start(self) -> None:
        """--start-daemon of `pylvs run`: a refusal stops the start."""
        from ..sync.daemon import SyncError

        for req in self.opts.sync:
            try:
                await self.sync.start(req)
            except SyncError as e:
                raise SystemExit(f"pylvs run: --start-daemon {req['state']}: {e}") from None

    def _read_config(self) -> None:
        # Parsed before anything starts: a typo fails the start, not later.
        from ..config import apply as config_apply

        self._config = None
        if self.opts.config:
            try:
                self._config = config_apply.ConfigFile(self.opts.config, self.opts.config_id)
            except config_apply.ConfigError as e:
                raise SystemExit(f"pylvs run: -c {e}") from None

    def _claim_netns(self) -> None:
        # One director per network namespace: each owns "table netdev pylvs",
        # and a second one would replace the first's table at start and
        # delete it at exit. The lock goes with the process, crash included.
        import fcntl

        from ..control import rpc

        self._netns_lock = None
        if self._steering is not None:
            return  # embedded with its own steering: no nft table of ours
        os.makedirs(rpc.RUN_DIR, mode=0o700, exist_ok=True)
        path = f"{rpc.RUN_DIR}/netns-{rpc.netns_id()}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SystemExit("pylvs run: another pylvs director runs in this network namespace"
                             + (f" (pid {owner})" if owner else "")) from None
        if os.fstat(fd).st_ino != _inode(path):
            # A stopping director unlinked the file between our open and our
            # lock: the lock we hold guards nothing; take the new file.
            os.close(fd)
            return self._claim_netns()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._netns_lock = fd
        self._netns_lock_path = path

    def run(self) -> int:
        self._loop = None
        # A SIGHUP before the loop handles it (a reload sent right after a
        # start) neither kills the director half set up nor is lost: the
        # file is re-read once the start's configuration is in (_main).
        # The same after the loop (closing, it gives SIGHUP its default
        # action back): a reload sent while stopping must not cut the
        # steering's removal short.
        self._hup_pending = False
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            prev_hup = signal.signal(signal.SIGHUP,
                                     lambda *_: setattr(self, "_hup_pending", True))
        try:
            return self._run()
        finally:
            if main_thread:
                signal.signal(signal.SIGHUP, prev_hup)

    def _run(self) -> int:
        self._read_config()
        raise_nofile_limit()
        self._claim_netns()
        self._local = frozenset() if self.opts.tap else local_addresses()
        try:
            self._build()
            # The -c rules are checked against the namespace's addresses
            # (local and broadcast real servers are refused): read them now,
            # not when the resolver thread first gets to it.
            refresh_local = getattr(self.resolver, "refresh_local", None)
            if refresh_local is not None:
                refresh_local()
            # The table goes in before any socket reads: a stale table from a
            # crashed run is replaced here.
            self._steer()
            try:
                import uvloop
                runner = uvloop.run
            except ImportError:
                runner = asyncio.run
            return runner(self._main())
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self._shutdown()

    def _shutdown(self) -> None:
        self._stop.set()
        for what, meth in (("addrwatch", "close"), ("steering", "remove"),
                           ("local_src", "close"), ("resolver", "close"),
                           ("netwatch", "close"), ("backends", "close")):
            objs = getattr(self, "_" + what, None)
            if objs is None:
                continue
            # Worker 0's backend last: it owns the pcap file of them all.
            for obj in (objs[::-1] if what == "backends" else [objs]):
                try:
                    getattr(obj, meth)()
                except Exception as e:
                    log.error("closing %s: %s", what, e)
        lock = getattr(self, "_netns_lock", None)
        if lock is not None:
            self._netns_lock = None
            # Removed while still held, so no other director can be holding
            # it; a director killed outright leaves its file, and the next
            # one takes it over (the lock died with the process).
            try:
                os.unlink(self._netns_lock_path)
            except OSError:
                pass
            os.close(lock)
        log.info("stopped")


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every `pylvs adm` client
    holds a descriptor, and the director must keep accepting them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the file descriptor limit to %s: %s", hard, e)


def setup_logging(verbose: bool) -> None:
    """INFO for everyone; -v turns DEBUG on for pylvs's own loggers only.
    Third-party libraries (pyroute2 logs every netlink message at DEBUG)
    stay at WARNING whatever the root logger does."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s pylvs[%(process)d] %(levelname)s %(message)s")
    logging.getLogger("pylvs").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


THIRD_PARTY_LOGGERS = ("pyroute2", "asyncio", "uvloop", "scapy")


def _is_c_engine(engine) -> bool:
    try:
        from .._fast import Engine
    except ImportError:
        return False
    return isinstance(engine, Engine)


def _sum_dicts(dicts: list[dict]) -> dict:
    """Counters of several workers as one: sums, except *_max_* (the max)."""
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if k in out and "max" in k:
                out[k] = max(out[k], v)
            else:
                out[k] = out.get(k, 0) + v
    return out


def _takes_args(fn, n: int) -> bool:
    try:
        inspect.signature(fn).bind(*range(n))
        return True
    except (TypeError, ValueError):
        return False


def _is_loopback(ifnames: list[str]) -> bool:
    """Is one of these this namespace's loopback interface (ifindex 1)?"""
    import socket

    try:
        return socket.if_indextoname(1) in ifnames
    except OSError:
        return False


def _sysctl_arg(text: str) -> tuple[str, str]:
    import argparse

    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {quoted(text)}")
    return name.strip(), value.strip()


def _bounded(lo: int, hi: int):
    import argparse

    def parse(text: str) -> int:
        v = ascii_int(text)
        if v is None:
            raise argparse.ArgumentTypeError(f"not an integer: {quoted(text)}")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range ({lo}..{hi})")
        return v
    return parse


# --conn-max: at 20,000 new short conns a second, each held 120 s in
# TIME_WAIT (issue 5), 2.4 million conns live; the default leaves room.
DEFAULT_CONN_MAX = 1 << 22
MAX_CONN_MAX = 1 << 26  # the engine's limit (ENGINE_MAX_CAPACITY)


def _default_ring() -> str:
    from ..io.afpacket import DEFAULT_RING
    return DEFAULT_RING


def _help_formatter():
    import argparse

    class Help(argparse.ArgumentDefaultsHelpFormatter):
        # Every option says its default; one that words it itself keeps it.
        def _get_help_string(self, action):
            h = action.help or ""
            return h if "default:" in h else super()._get_help_string(action)
    return Help


# `pylvs run`'s sync daemon options besides --start-daemon (argparse dests).
SYNC_OPTIONS = ("mcast_interface", "syncid", "mcast_group", "mcast_port", "mcast_ttl",
                "sync_maxlen")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..control import balancer as bal
    from ..engine import IMPLS

    ap = argparse.ArgumentParser(prog="pylvs run", description="Run the pylvs director.",
                                 formatter_class=_help_formatter())
    ap.add_argument("--iface", action="extend", nargs="+", default=[], metavar="IF",
                    help="interfaces to serve (default: every Ethernet interface that is up)")
    ap.add_argument("--control", metavar="PATH",
                    help="control socket (default: /run/pylvs/ctl-<netns inode>.sock)")
    ap.add_argument("-c", "--config", metavar="FILE",
                    help="a keepalived.conf (its virtual_server blocks) or pylvs adm -S rules, "
                         "told apart by the first word; applied at start, re-read on SIGHUP "
                         "and `pylvs reload` (docs/config.md; default: none)")
    ap.add_argument("-i", "--config-id", metavar="ID",
                    help="as keepalived -i: the -c FILE's lines '@ID ...' are read, other "
                         "'@...' lines skipped, '@^ID' the other way round (default: the node "
                         "name up to its first dot, as keepalived)")
    ap.add_argument("-t", "--config-test", action="store_true",
                    help="as keepalived -t: check the -c FILE (warnings and errors with their "
                         "file:line on stderr, a summary on stdout), start nothing; exit status "
                         "0 when all of it would apply, 1 otherwise")
    ap.add_argument("--conn-max", type=_bounded(1, MAX_CONN_MAX), default=DEFAULT_CONN_MAX,
                    metavar="N", help="most conns at once; the conn table grows with use up "
                    "to this, 88 to 112 bytes per conn; split evenly among the --workers "
                    "(each worker's table holds N/workers, rounded up)")
    ap.add_argument("--capacity", type=_bounded(1, MAX_CONN_MAX), dest="conn_max",
                    help=argparse.SUPPRESS)   # the old name of --conn-max
    ap.add_argument("--max-services", type=_bounded(1, bal.MAX_SERVICES_LIMIT), metavar="N",
                    default=bal.DEFAULT_MAX_SERVICES, help="most virtual services")
    ap.add_argument("--max-dests", type=_bounded(1, 1 << 22), metavar="N",
                    default=bal.DEFAULT_MAX_DESTS, help="most real servers (all services)")
    ap.add_argument("--sysctl", type=_sysctl_arg, action="append", default=[],
                    metavar="NAME=VALUE", help="set a knob at start (repeatable; default: "
                    + ", ".join(f"{n}={v}" for n, v in bal.sysctl_defaults().items()) + ")")
    ap.add_argument("--engine", choices=IMPLS, default="c", help="data path engine")
    ap.add_argument("--sched-impl", choices=("c", "python"), default="c",
                    help="c: the engine runs rr, wrr, lc, wlc, sed, nq, fo, ovf, sh, dh and mh "
                    "itself (lblc, lblcr and twos always call Python); "
                    "python: every new conn calls the Python scheduler (the reference; "
                    "docs/engine.md, \"Schedulers in C\")")
    ap.add_argument("--workers", type=_bounded(1, 256), metavar="N", default=None,
                    help="data-path threads, each with its own engine, conn table and sockets "
                    "(frames steered by client address, docs/io.md); --conn-max is split "
                    "evenly among them (default: one per CPU this process may use; 1 with "
                    "--engine python)")
    ap.add_argument("--no-qdisc-bypass", dest="qdisc_bypass", action="store_false",
                    help="send through the kernel's qdisc layer instead of straight to the "
                    "driver, so tcpdump on the director also sees the frames pylvs "
                    "transmits (and tc qdiscs apply); slower (default: bypass, "
                    "tcpdump shows only what arrives)")
    ap.add_argument("--ring", choices=("auto", "v2", "v3"),
                    help="AF_PACKET receive ring: v2 hands each frame over as soon as it "
                    "arrives, v3 in blocks retired when full or by a timer of at least one "
                    "jiffy (4 ms at HZ=250), auto has both and moves frames to v3 above "
                    "60k frames/s per worker and back to v2 below 20k "
                    "(default: %s; docs/io.md)" % _default_ring())
    ap.add_argument("--pcap", metavar="FILE",
                    help="also write every frame pylvs sends (forwarded and made: ICMP "
                    "errors, RSTs, fragments, tunnel packets) to FILE, classic pcap, "
                    "Ethernet; read it with tcpdump -r (default: none)")
    ap.add_argument("--steering", choices=("bpf", "nft"),
                    help="how the kernel is kept away from the frames pylvs takes: bpf, a tcx "
                    "program the kernel detaches when pylvs dies; nft, a netdev table that "
                    "stays (dropping the VIPs' traffic) after a kill -9 until the next start "
                    "(default: bpf, nft where the kernel cannot attach tcx programs)")
    ap.add_argument("--io", choices=("afpacket", "xdp"), default="afpacket",
                    help="how frames reach the engine: afpacket, TPACKET_V3 rings of "
                    "AF_PACKET taps; xdp, AF_XDP sockets fed by an XDP program that takes "
                    "only the virtual services' traffic and drops excess load before the "
                    "kernel builds socket buffers (falls back to afpacket "
                    "with a warning where XDP cannot attach)")
    ap.add_argument("--no-local-clients", dest="local_clients", action="store_false",
                    help="leave connects from the director itself to a virtual service to its "
                    "kernel (default: pylvs balances them, docs/io.md \"Clients on the director\")")
    ap.add_argument("--vips", choices=("local", "all"), default=None,
                    help="local: take a service's traffic only while its VIP is an address of "
                    "this host, starting and stopping as the address comes and goes (keepalived "
                    "moving it), as IPVS, which sees only packets delivered locally; all: "
                    "whatever the host's addresses (default: local; all with --tap, whose "
                    "director owns its VIPs; docs/failover.md)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="debug logging of pylvs itself, not of the libraries it uses (default: off)")
    ap.add_argument("--tap", action="append", default=[], metavar="NAME",
                    help="serve TAP device NAME instead of interfaces (created if missing; "
                    "repeatable, one --addr each): pylvs owns the director's addresses "
                    "there and answers ARP and ping itself (docs/io.md, netns-labs/tap)")
    ap.add_argument("--addr", action="append", default=[], metavar="DIP/PLEN", dest="tap_addrs",
                    help="with --tap: the director's address and prefix on the TAP of the "
                    "same rank (the source of its ARP requests and of VS-Tun packets)")
    ap.add_argument("--gateway", metavar="GW", help="with --tap: the default route's next hop, "
                    "inside one --addr prefix (default: none, only the prefixes are reached)")
    ap.add_argument("--mac", metavar="MAC", help="with --tap: the director's MAC on the first "
                    "TAP, +1 per further TAP (default: random, locally administered)")
    sync = ap.add_argument_group("connection sync (docs/sync.md; as ipvsadm --start-daemon)")
    sync.add_argument("--start-daemon", action="append", choices=("master", "backup"),
                      default=[], metavar="master|backup",
                      help="start this sync daemon with the director (repeatable: both); "
                      "`pylvs adm --start-daemon` starts one later (default: none)")
    sync.add_argument("--mcast-interface", metavar="IF", help="the sync daemons' interface "
                      "(default: eth0, as ipvsadm)")
    sync.add_argument("--syncid", type=_bounded(0, 255), default=None, metavar="N",
                      help="the sync id sent (master) and accepted (backup; 0: any)")
    sync.add_argument("--mcast-group", default=None, metavar="ADDR",
                      help="multicast group (default: 224.0.0.81)")
    sync.add_argument("--mcast-port", type=_bounded(1, 65535), default=None, metavar="PORT",
                      help="UDP port (default: 8848)")
    sync.add_argument("--mcast-ttl", type=_bounded(1, 255), default=None, metavar="TTL",
                      help="multicast TTL (default: 1)")
    sync.add_argument("--sync-maxlen", type=_bounded(1, 65535 - 28), default=None, metavar="N",
                      help="largest sync message, UDP payload bytes (default: 1472 for a "
                      "master, the interface MTU - 28 for a backup)")
    a = ap.parse_args(argv)
    if a.config_test:
        if not a.config:
            ap.error("-t checks the -c FILE: give one")
        from ..config.apply import config_test
        return config_test(a.config, sys.stdout, sys.stderr, a.max_services, a.max_dests,
                           a.config_id)
    if len(set(a.start_daemon)) != len(a.start_daemon):
        ap.error("--start-daemon: master or backup given twice")
    if a.mcast_group is not None:
        from ..sync.daemon import SyncConfig, SyncError
        try:
            SyncConfig.from_request({"state": "master", "mcast_group": a.mcast_group})
        except SyncError as e:
            ap.error(f"--mcast-group: {e}")
    # ipvsadm refuses the daemon options without --start-daemon; taken and
    # ignored, a forgotten --start-daemon would leave the director without
    # sync while its command line says otherwise.
    alone = [f"--{k.replace('_', '-')}" for k in SYNC_OPTIONS if getattr(a, k) is not None]
    if alone and not a.start_daemon:
        ap.error(f"{', '.join(alone)}: only with --start-daemon master|backup")
    sync_reqs = [{"state": role, "mcast_ifn": a.mcast_interface, "syncid": a.syncid or 0,
                  "mcast_group": a.mcast_group, "mcast_port": a.mcast_port,
                  "mcast_ttl": a.mcast_ttl, "sync_maxlen": a.sync_maxlen}
                 for role in a.start_daemon]
    if a.tap:
        from ..io import tap as tapmod

        if a.vips == "local":
            ap.error("--vips local goes without --tap: a TAP director owns its VIPs (no host "
                     "address to follow)")
        if a.iface or a.pcap or a.steering or a.ring or a.io != "afpacket":
            ap.error("--tap goes with none of --iface, --pcap, --steering, --ring, --io (nothing "
                     "to steer behind a TAP, no AF_PACKET ring; capture on the TAP itself: "
                     "tcpdump -i NAME sees both ways)")
        for i, name in enumerate(a.tap):
            if name in a.tap[:i]:
                ap.error(f"--tap {name} given twice")
        try:
            if len(a.tap_addrs) != len(a.tap):
                raise ValueError(f"{len(a.tap)} --tap but {len(a.tap_addrs)} --addr: "
                                 "give one DIP/PLEN per TAP")
            for text in a.tap_addrs:
                tapmod.parse_addr(text)
            if a.mac:
                tapmod.parse_mac(a.mac)
            if a.gateway:
                import ipaddress
                try:
                    ipaddress.IPv4Address(a.gateway)
                except ValueError:
                    raise ValueError(f"--gateway {a.gateway!r}: not an IPv4 address") from None
        except ValueError as e:
            ap.error(str(e))
    elif a.tap_addrs or a.gateway or a.mac:
        ap.error("--addr, --gateway and --mac go with --tap")
    try:  # a typo in a knob fails here, before anything starts
        bal.Balancer(tables.Counters(1, 1)).set_sysctls(dict(a.sysctl))
    except bal.BalancerError as e:
        ap.error(f"--sysctl: {e}")
    setup_logging(a.verbose)
    from .worker import default_workers

    workers = a.workers or (default_workers() if a.engine == "c" else 1)
    if workers > 1 and a.engine != "c":
        ap.error("--workers above 1 needs --engine c")
    opts = Options(ifaces=a.iface, control=a.control, config=a.config, config_id=a.config_id,
                   capacity=a.conn_max, engine=a.engine, max_services=a.max_services,
                   max_dests=a.max_dests, sysctls=dict(a.sysctl),
                   qdisc_bypass=a.qdisc_bypass, pcap=a.pcap, ring=a.ring, workers=workers,
                   steering=a.steering, tap=a.tap, tap_addrs=a.tap_addrs, gateway=a.gateway,
                   mac=a.mac, io=a.io, local_clients=a.local_clients, sched_impl=a.sched_impl,
                   vips=a.vips or ("all" if a.tap else "local"), sync=sync_reqs)
    try:
        return Daemon(opts).run()
    except SystemExit:
        raise
    except Exception as e:
        log.error("%s", e)
        log.debug("details", exc_info=True)
        return 1
