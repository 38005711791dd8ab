"""The health checks' scheduler: keepalived's check daemon on the control
loop (asyncio), driving the Balancer's health overlay.

Rules, from keepalived (check_api.c, check_*.c epilogs, ipwrapper.c) and
keepalived.conf(5):

- One probe per (real server address, port, CheckSpec): services sharing a
  real server with an equal checker share its probe and its verdict.
- A probe first runs after a random delay in [0, ``warmup``) (at once with
  warmup 0), then every ``delay_loop``. A checker that is up and fails is
  retried ``retry`` times, ``delay_before_retry`` apart, before it goes
  down; one success brings it up. A down checker is tried every
  ``delay_loop``. So a real server that dies is out within ``delay_loop +
  retry * (delay_before_retry + connect_timeout) + connect_timeout``.
- A checker starts up, or down with ``alpha``. A real server is alive when
  all its checkers are up (no checker: always alive); MISC_CHECK with
  ``misc_dynamic`` sets its weight (exit status - 2).
- A dead real server leaves the service (Balancer.set_dest_health: out of
  the tables as after -d), or stays with weight 0 with
  ``inhibit_on_failure``; alive, it is back with its weight.
- Quorum: the sum of the alive real servers' weights. It is gained when
  the sum reaches ``quorum + hysteresis`` and lost when it falls below
  ``quorum - hysteresis`` (or to 0). Losing it with a ``sorry_server``
  takes every real server out and puts the sorry server in (weight 1);
  gaining it back does the reverse. ``sorry_server_inhibit`` keeps the
  sorry server in with weight 0 while quorum holds. ``quorum_up`` /
  ``quorum_down`` and the real servers' ``notify_up`` / ``notify_down``
  commands run on those changes (split into words, no shell), one after
  another in the order of the changes.
- A reload (``configure``) keeps what did not change; a checker whose
  timings alone changed keeps its verdict (keepalived's migrate_checkers).

Every method runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import shlex
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

from ..config.model import FWD, CheckSpec, RealServer, VirtualServer, dest_port
from ..control.balancer import BalancerError
from . import check_http, check_misc, check_ping, check_tcp, check_udp
from .check_api import Result, within

log = logging.getLogger("pylvs.health")

CHECKERS = {
    "TCP_CHECK": check_tcp.check,
    "HTTP_GET": check_http.check,
    "SSL_GET": check_http.check,
    "UDP_CHECK": check_udp.check,
    "MISC_CHECK": check_misc.check,
    "PING_CHECK": check_ping.check,
}
NOTIFY_TIMEOUT = 30.0
# omega's commands at the director's stop are killed after this long
# (keepalived's do_rs_notifies/do_vs_notifies when stopping: TIMER_HZ).
OMEGA_TIMEOUT = 1.0


def _is_sorry_server(vs: VirtualServer, rs: RealServer) -> bool:
    """Is ``rs`` the same dest as ``vs``'s sorry server (keepalived's
    s_svr_duplicates_rs)?"""
    s = vs.sorry_server
    return (s is not None and s.addr == rs.addr
            and dest_port(vs, s.port, s.lvs_method) == dest_port(vs, rs.port, rs.lvs_method))


_TIMINGS = {"delay_loop": 0.0, "connect_timeout": 0.0, "retry": 0, "delay_before_retry": 0.0,
            "warmup": 0.0, "alpha": False, "misc_timeout": None}


def _same_target(key: tuple) -> tuple:
    """A probe key with the checker's timings left out: what it checks."""
    addr, port, spec = key
    return (addr, port, replace(spec, **_TIMINGS))


def service_name(key: tuple) -> str:
    """'TCP 10.0.0.1:80' or 'FWM 7' for a VirtualServer.key."""
    proto, vaddr, vport, fwmark = key
    return f"FWM {fwmark}" if fwmark else f"{proto} {vaddr}:{vport}"


def verdict_budget(spec: CheckSpec) -> float:
    """The longest one probe may take (s), whatever the server does: each
    checker bounds every connect and read by connect_timeout (MISC_CHECK
    by misc_timeout, a regex search by check_http.REGEX_TIMEOUT), and a
    server sending its answer slowly enough to pass each read is cut off
    here."""
    longest = max(spec.delay_loop, spec.connect_timeout, spec.misc_timeout or 0.0)
    if spec.kind == "MISC_CHECK":
        longest += check_misc.TERM_GRACE    # a command past its timeout is stopped gently
    # A url's regex search ends on its own timeout, and its result says
    # so: the budget does not cut it short with a vaguer one. Twice the
    # timeout: the regex module looks at its clock only every so many
    # steps, later still on a loaded machine.
    longest += sum(2 * check_http.REGEX_TIMEOUT for u in spec.urls if u.regex is not None)
    return longest + spec.connect_timeout


class Probe:
    """One checker of one real server, run on a timer; shared by every
    service that has that real server with an equal CheckSpec."""

    def __init__(self, addr: str, port: int, spec: CheckSpec, changed):
        self.addr, self.port, self.spec = addr, port, spec
        self.check = CHECKERS[spec.kind]
        self._changed = changed
        self.up = not spec.alpha
        self.has_run = False
        self.retry_it = 0
        self.weight: int | None = None
        self.text = "not run yet"
        self.since = time.time()
        self.last = None            # unix time of the last result
        self.task: asyncio.Task | None = None
        self._stopped = False

    @property
    def key(self) -> tuple:
        return (self.addr, self.port, self.spec)

    def inherit(self, old: "Probe | None") -> None:
        """Take the verdict of ``old``, the same check with other timings,
        and the retries it has used (keepalived's migrate_checkers): a
        server failing its retries when the reload comes is not given a
        fresh set, but keeps one failure short of down at most, so a new
        ``retry`` below the count used does not take it out unheard."""
        if old is not None and old.has_run:
            self.up, self.has_run, self.weight = old.up, True, old.weight
            self.text, self.since, self.last = old.text, old.since, old.last
            if old.retry_it and self.spec.retry:
                self.retry_it = min(old.retry_it, self.spec.retry - 1)

    def start(self) -> None:
        if self.task is None:
            self._stopped = False
            self.task = asyncio.ensure_future(self._run())

    def cancel(self) -> None:
        """Stop probing (from synchronous code; the task ends on the loop).
        The flag as well as the cancel: before Python 3.12, asyncio.wait_for
        may swallow a cancel that meets its inner future's completion, and
        the loop must end all the same."""
        self._stopped = True
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def stop(self) -> None:
        task = self.task
        self.cancel()
        while task is not None and not task.done():
            await asyncio.wait({task}, timeout=0.1)
            task.cancel()

    async def _run(self) -> None:
        if self.spec.warmup > 0:
            await asyncio.sleep(random.uniform(0, self.spec.warmup))
        budget = verdict_budget(self.spec)
        loop = asyncio.get_running_loop()
        while not self._stopped:
            started = loop.time()
            try:
                r = await within(self.check(self.spec, self.addr, self.port), budget)
            except asyncio.TimeoutError:
                # A server trickling its answer a byte per connect_timeout.
                r = Result(False, f"no verdict within {budget:g} s")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a checker bug costs one result, not the loop
                log.exception("%s of %s:%d failed", self.spec.kind, self.addr, self.port)
                r = Result(False, f"internal error: {type(e).__name__}: {e}")
            if self._stopped:
                return
            delay = self.result(r)
            if self.spec.kind == "MISC_CHECK":
                # keepalived's misc_check_child_thread times the next run
                # from this one's start: a slow command does not stretch
                # the delay_loop (the other checkers' epilogs time it
                # from the result).
                delay -= loop.time() - started
            await asyncio.sleep(max(0.0, delay))

    def result(self, r: Result) -> float:
        """Take one result (keepalived's checker epilog); the delay before
        the next probe."""
        self.text, self.last = r.text, time.time()
        delay = self.spec.delay_loop
        changed = False
        if r.ok and r.weight != self.weight:
            self.weight, changed = r.weight, True
        if r.ok or ((self.up or not self.has_run) and self.retry_it >= self.spec.retry):
            self.retry_it = 0
            if r.ok != self.up:
                self.up, self.since, changed = r.ok, time.time(), True
                log.info("%s of %s:%d %s: %s", self.spec.kind, self.addr, self.port,
                         "up" if r.ok else "down", r.text)
        elif self.up:
            self.retry_it += 1
            delay = self.spec.delay_before_retry
        self.has_run = True
        if changed:
            self._changed(self)
        return delay


@dataclass
class Member:
    """A real server of one service, with its probes."""

    vs: VirtualServer
    rs: RealServer
    probes: list[Probe]
    alive: bool | None = None     # as last applied (None: not yet)

    def is_alive(self) -> bool:
        return all(p.up for p in self.probes)

    def weight(self) -> int:
        """misc_dynamic's weight when a MISC_CHECK gave one, else the configured."""
        for p in self.probes:
            if p.weight is not None and p.spec.misc_dynamic:
                return p.weight
        return self.rs.weight

    def dynamic_weight(self) -> int | None:
        w = self.weight()
        return None if w == self.rs.weight else w


@dataclass
class ServiceState:
    vs: VirtualServer
    members: list[Member] = field(default_factory=list)
    quorum_up: bool | None = None   # None: not yet computed
    sorry_on: bool = False


class HealthManager:
    """``configure(virtual_servers)`` then ``await start()``; ``await
    stop()`` at the end. ``status()`` is the status view's rows."""

    def __init__(self, balancer):
        self.balancer = balancer
        self._probes: dict[tuple, Probe] = {}
        self._services: dict[tuple, ServiceState] = {}
        self._by_probe: dict[tuple, list[Member]] = {}
        self._running = False
        self._pending: set[tuple] = set()    # services whose probes changed, not yet applied
        self._pending_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_notify: asyncio.Task | None = None

    # --- configuration -------------------------------------------------------

    def configure(self, virtual_servers: Sequence[VirtualServer]) -> None:
        """Apply a configuration: unchanged (service, real server, check)
        keep their state and timers, new ones start, removed ones stop.
        Call after the services and dests are in the Balancer."""
        wanted: dict[tuple, Probe] = {}
        old_services = self._services
        # A checker whose timings alone changed keeps its verdict (as
        # keepalived's migrate_checkers): a dead server stays out.
        migrated = {_same_target(k): p for k, p in self._probes.items()}
        services: dict[tuple, ServiceState] = {}
        by_probe: dict[tuple, list[Member]] = {}
        fresh: set[tuple] = set()       # probes with no verdict of their own yet
        for vs in virtual_servers:
            if vs.fwmark:
                log.warning("health checks of fwmark service %d are not run: the director "
                            "has no fwmark services yet", vs.fwmark)
                continue
            old = self._services.get(vs.key)
            st = services[vs.key] = ServiceState(vs)
            if old is not None:
                st.quorum_up, st.sorry_on = old.quorum_up, old.sorry_on
            for rs in vs.real_servers:
                probes = []
                for spec in rs.checks:
                    key = (rs.addr, rs.port, spec)
                    p = wanted.get(key) or self._probes.get(key)
                    if p is None:
                        p = Probe(rs.addr, rs.port, spec, self._probe_changed)
                        p.inherit(migrated.get(_same_target(key)))
                        if not p.has_run:
                            fresh.add(key)
                    wanted[key] = p
                    probes.append(p)
                m = Member(vs, rs, probes)
                if old is not None:
                    m.alive = next((o.alive for o in old.members
                                    if (o.rs.addr, o.rs.port) == (rs.addr, rs.port)), None)
                st.members.append(m)
                self._one_failure_enough(m, fresh)
                for p in probes:
                    by_probe.setdefault(p.key, []).append(m)
        for key, p in self._probes.items():
            if key not in wanted:
                p.cancel()
        self._probes, self._services, self._by_probe = wanted, services, by_probe
        with self._held():
            self._forget(old_services, services)
            for st in services.values():
                self._apply(st)
        if self._running:
            for p in wanted.values():
                p.start()

    @staticmethod
    def _one_failure_enough(m: "Member", fresh: set[tuple]) -> None:
        """A reload's new checker of a real server that is down (another of
        its checkers failed, or it was dead and none has run) goes down on
        its first failure, without retries (keepalived's migrate_checkers):
        the server it may bring back for a moment leaves again at once."""
        failed = any(p.has_run and not p.up for p in m.probes)
        ran = any(p.has_run for p in m.probes)
        if failed or (m.alive is False and not ran):
            for p in m.probes:
                if p.key in fresh:
                    p.retry_it = p.spec.retry

    def _forget(self, old_services: dict[tuple, ServiceState],
                services: dict[tuple, ServiceState]) -> None:
        """Hand back to the operator what the checks no longer watch: dests
        taken out come back, a sorry server no longer configured goes."""
        for key, old in old_services.items():
            new = services.get(key)
            keep = {(m.rs.addr, m.rs.port) for m in new.members} if new else set()
            for m in old.members:
                if (m.rs.addr, m.rs.port) not in keep:
                    self._set(old.vs, m.rs, True, False, None)
            s = old.vs.sorry_server
            if s is not None and (new is None or new.vs.sorry_server != s):
                self._sorry(old.vs, "off")

    # --- running ---------------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        for p in self._probes.values():
            p.start()

    async def stop(self) -> None:
        """Stop the probes and the notify commands still running; then,
        for each service with ``omega``, run what keepalived runs as it
        shuts down: the notify_down of each real server in the pool and
        the service's quorum_down, together, each killed after
        OMEGA_TIMEOUT s."""
        self._running = False
        await asyncio.gather(*(p.stop() for p in self._probes.values()),
                             return_exceptions=True)
        if self._pending_handle is not None:
            self._pending_handle.cancel()
            self._apply_pending()
        notifies = list(self._tasks)
        for t in notifies:
            t.cancel()
        # Their cancel kills their commands only as they run again: wait for
        # that here, not on a later turn of the loop that may never come.
        await asyncio.gather(*notifies, return_exceptions=True)
        last = []
        for st in self._services.values():
            if st.vs.omega:
                if not st.sorry_on:     # out of the pool already, as keepalived's rs->set
                    last += [m.rs.notify_down for m in st.members if m.alive]
                last.append(st.vs.quorum_down)
        await asyncio.gather(*(_run_notify(c, None, OMEGA_TIMEOUT) for c in last if c))

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _held(self):
        """The Balancer's one-publish scope (Balancer.held), if it has one."""
        held = getattr(self.balancer, "held", None)
        return held() if held is not None else contextlib.nullcontext()

    def _probe_changed(self, probe: Probe) -> None:
        self._pending.update(m.vs.key for m in self._by_probe.get(probe.key, ()))
        if not self._running:
            self._apply_pending()   # driven by hand (configure, tests): at once
        elif self._pending_handle is None:
            # The verdicts of one turn of the loop in one publish: a
            # publish costs tens of ms (every worker's tables and
            # filters), so 200 real servers behind a dead switch, their
            # probes failing together, must not hold the loop (status,
            # reload, the other probes' timeouts) for 200 publishes.
            self._pending_handle = asyncio.get_running_loop().call_soon(self._apply_pending)

    def _apply_pending(self) -> None:
        self._pending_handle = None
        keys, self._pending = self._pending, set()
        with self._held():
            for key in keys:
                st = self._services.get(key)
                if st is not None:
                    self._apply(st)

    # --- keepalived's ipwrapper rules ---------------------------------------------

    def _apply(self, st: ServiceState) -> None:
        vs = st.vs
        alive = [m for m in st.members if m.is_alive()]
        total = sum(m.weight() for m in alive)
        was = st.quorum_up
        if was is None:
            up = total >= vs.quorum + vs.hysteresis
        elif was:
            up = not (total == 0 or total < vs.quorum - vs.hysteresis)
        else:
            up = total >= vs.quorum + vs.hysteresis
        st.quorum_up = up
        if was is not None and up != was:
            log.info("%s quorum for %s: %d alive weight, quorum %d hysteresis %d",
                     "gained" if up else "lost", service_name(vs.key), total, vs.quorum,
                     vs.hysteresis)
        sorry = vs.sorry_server is not None and not up
        if sorry:
            self._sorry(vs, "on")   # in before the real servers leave
        for m in st.members:
            now = m.is_alive()
            if m.alive is not None and now != m.alive:
                self._notify(m.rs.notify_up if now else m.rs.notify_down)
            m.alive = now
            if sorry and _is_sorry_server(vs, m.rs):
                # A sorry server that is also a real server: keepalived
                # takes it out with the others and adds it back as the
                # sorry server (weight 1, whatever its checks say).
                self._set(vs, m.rs, True, False, 1)
            else:
                self._set(vs, m.rs, now and not sorry, m.rs.inhibit_on_failure,
                          m.dynamic_weight())
        if not sorry and vs.sorry_server is not None:
            self._sorry(vs, "inhibit" if vs.sorry_server.inhibit else "off")
        st.sorry_on = sorry
        if was is not None and up != was:
            # After the real server's own, as ipwrapper.c's perform_svr_state.
            self._notify(vs.quorum_up if up else vs.quorum_down)

    def _set(self, vs: VirtualServer, rs: RealServer, up: bool, inhibit: bool,
             weight: int | None) -> None:
        port = dest_port(vs, rs.port, rs.lvs_method)
        try:
            self.balancer.set_dest_health(vs.protocol, vs.vaddr, vs.vport, rs.addr, port, up,
                                          inhibit=inhibit, weight=weight)
        except BalancerError as e:
            # The operator deleted it (or it was never added): nothing to steer.
            log.debug("health of %s:%d in %s: %s", rs.addr, port, service_name(vs.key), e)

    def _sorry(self, vs: VirtualServer, state: str) -> None:
        s = vs.sorry_server
        method = s.lvs_method or vs.lvs_method
        try:
            self.balancer.set_sorry_server(vs.protocol, vs.vaddr, vs.vport, s.addr,
                                           dest_port(vs, s.port, method), FWD.get(method, "masq"),
                                           state)
        except BalancerError as e:
            log.warning("sorry server %s:%d of %s: %s", s.addr, s.port, service_name(vs.key), e)

    def _notify(self, command: str | None) -> None:
        # One after another, in the order of the changes: a real server's
        # notify_down ends before its notify_up starts.
        if command:
            self._last_notify = self._spawn(_run_notify(command, self._last_notify))

    # --- the status view ---------------------------------------------------------

    def _in_table(self):
        """A predicate ``(vs, rs=None) -> bool``: is the service (and its
        real server) in the Balancer's tables now? The operator may have
        deleted it by hand (``-D``, ``-d``); its checks go on, and their
        say applies when it is added again (Balancer.set_dest_health)."""
        table = {s.key: s for s in self.balancer.services()}

        def listed(vs: VirtualServer, rs: RealServer | None = None) -> bool:
            svc = table.get(self.balancer._svc_key(vs.protocol, vs.vaddr, vs.vport))
            if svc is None or rs is None:
                return svc is not None
            d = svc.dests.get((int(ipaddress.IPv4Address(rs.addr)),
                               dest_port(vs, rs.port, rs.lvs_method)))
            return d is not None and not d.sorry
        return listed

    def view(self) -> dict:
        """The control socket's "health" answer (`pylvs status`):
        {"checks": status(), "services": services(), "not_in_table":
        names of the configured services ('TCP 10.0.0.1:80') and real
        servers ('TCP 10.0.0.1:80 -> 10.0.1.2:80') the operator deleted
        by hand, left out of the other two}."""
        listed = self._in_table()
        gone = []
        for st in self._services.values():
            if not listed(st.vs):
                gone.append(service_name(st.vs.key))
                continue
            gone += [f"{service_name(st.vs.key)} -> {m.rs.addr}:{m.rs.port}"
                     for m in st.members if not listed(st.vs, m.rs)]
        return {"checks": self.status(listed), "services": self.services(listed),
                "not_in_table": gone}

    def status(self, listed=None) -> list[dict]:
        """One row per (service, real server, check): "service" ('TCP
        10.0.0.1:80'), "real_server" ('10.0.1.2:80'), "kind", "state"
        ("up"/"down"), "result" (the last result's text), "since" (unix
        time of the last change of state), "checked" (unix time of the
        last result, None before the first), "shared" (services sharing
        this probe). ``listed``: view()'s filter (default: every row)."""
        rows = []
        for st in self._services.values():
            if listed is not None and not listed(st.vs):
                continue
            for m in st.members:
                if listed is not None and not listed(st.vs, m.rs):
                    continue
                for p in m.probes:
                    rows.append({
                        "service": service_name(st.vs.key),
                        "real_server": f"{m.rs.addr}:{m.rs.port}",
                        "kind": p.spec.kind, "state": "up" if p.up else "down",
                        "result": p.text, "since": p.since, "checked": p.last,
                        "shared": len({x.vs.key for x in self._by_probe.get(p.key, ())}),
                    })
        return rows

    def services(self, listed=None) -> list[dict]:
        """Per service: "service", "quorum" ("up"/"down"), "alive_weight",
        "quorum_needed", "sorry_server" ('addr:port' or None) and
        "sorry_active". ``listed``: as status()."""
        out = []
        for st in self._services.values():
            vs = st.vs
            if listed is not None and not listed(vs):
                continue
            s = vs.sorry_server
            out.append({
                "service": service_name(vs.key),
                "quorum": "up" if st.quorum_up else "down",
                "alive_weight": sum(m.weight() for m in st.members if m.is_alive()),
                "quorum_needed": vs.quorum, "hysteresis": vs.hysteresis,
                "sorry_server": f"{s.addr}:{s.port}" if s else None,
                "sorry_active": st.sorry_on,
            })
        return out


async def _run_notify(command: str, after: asyncio.Task | None,
                      timeout: float = NOTIFY_TIMEOUT) -> None:
    if after is not None:
        await asyncio.wait({after})
    try:
        argv = shlex.split(command)
        if not argv:    # the parser refuses it; a HealthManager fed by hand may not
            raise ValueError("no command")
        # Its own process group: what it starts is killed with it.
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True)
    except (OSError, ValueError) as e:
        log.warning("notify %r: %s", command, e)
        return
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        check_misc.kill_group(proc)
        await proc.wait()
        log.warning("notify %r: killed after %g s", command, timeout)
    except asyncio.CancelledError:
        # The manager stops (HealthManager.stop): no command outlives it.
        check_misc.kill_group(proc)
        raise
