"""`pylvs run` hands the engine its ports, routes, local addresses and
sysctls, between two forward calls, and logs lost frames without -v."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import numpy as np
import pytest

import pylvs.engine
from pylvs.control import ports as P
from pylvs.engine import tables
from pylvs.io.bpf import ip
from pylvs.io.memory import MemoryBackend
from pylvs.runtime import daemon as D


class RecordingEngine:
    """Records the set_* calls the daemon makes (the engine's own behaviour
    with these tables is tested on the engines)."""

    conn_count, capacity, memory = 3, 100, 6400

    def __init__(self, *args, **kw):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        if not name.startswith("set_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, *args))

    def named(self, name):
        return [c[1:] for c in self.calls if c[0] == name]


class Steering:
    def apply(self, *a):
        pass

    def remove(self):
        pass


class Resolver:
    on_change = on_local_change = None

    def resolve(self, daddr):
        return None

    def start(self):
        pass

    def close(self):
        pass


class Watch:
    state = None
    on_change = None
    started = closed = False

    def start(self):
        self.started = True

    def close(self):
        self.closed = True


def state(mtu=1500, routes=((ip("10.0.0.0"), 24, 0),), local=(ip("10.0.0.2"),)):
    ports = np.zeros(2, P.PORT_DTYPE)
    ports["mtu"] = mtu
    r = np.zeros(len(routes), P.ROUTE_DTYPE)
    for i, (prefix, plen, port) in enumerate(routes):
        r[i]["prefix"], r[i]["plen"], r[i]["port"] = prefix, plen, port
    return P.NetState(ports, r, np.array(local, dtype=np.uint32))


@pytest.fixture
def daemon(monkeypatch):
    monkeypatch.setattr(pylvs.engine, "new_engine", lambda *a, **kw: RecordingEngine())
    d = D.Daemon(D.Options(ifaces=["a", "b"], engine="python"), backend=MemoryBackend(["a", "b"]),
                 steering=Steering(), resolver=Resolver())
    d._netwatch = Watch()
    d._netwatch.state = state()   # as if read at start: no netlink here
    d._build()
    yield d
    d._shutdown()


def services(*vips):
    s = tables.empty_services(4)
    for i, v in enumerate(vips):
        s[i] = (ip(v), 80, 6, tables.SVC_F_USED, 0, 0)
    s[3] = (ip("10.0.9.9"), 80, 6, 0, 0, 0)   # a free slot is no VIP
    return s


def test_ports_routes_and_vips_reach_the_engine(daemon):
    e, st = daemon.engine, state()
    assert daemon.netwatch.on_change == daemon._net_changed and daemon.netwatch.started
    daemon._net_changed(st)
    assert e.named("set_ports") == [(st.ports,)]
    (routes, local), = e.named("set_routes")
    assert routes is st.routes and list(local) == [ip("10.0.0.2")]
    # A VIP is one of the director's own addresses, configured or not.
    daemon.publish(services("10.0.0.1", "10.0.0.2"), tables.empty_dests(2))
    assert [list(c[1]) for c in e.named("set_routes")][-1] == [ip("10.0.0.1"), ip("10.0.0.2")]
    n = len(e.named("set_routes"))
    daemon.publish(services("10.0.0.1"), tables.empty_dests(2))   # same local set
    assert len(e.named("set_routes")) == n
    daemon._net_changed(state(routes=((0, 0, 1),)))
    assert e.named("set_routes")[-1][0]["plen"][0] == 0
    values = np.arange(6, dtype=np.int64)
    daemon.balancer.publish_sysctls(values)
    assert e.named("set_sysctls") == [(values,)]
    daemon._shutdown()
    assert daemon.netwatch.closed


def test_changes_wait_for_the_data_thread_and_the_last_one_wins(daemon):
    e = daemon.engine
    w, = daemon.workers
    stop = threading.Event()
    w.thread = threading.Thread(target=stop.wait)
    w.thread.start()
    try:
        before = len(e.calls)
        daemon._net_changed(state(mtu=1400))
        daemon._net_changed(state(mtu=1300))
        daemon.balancer.publish_sysctls(np.ones(6, dtype=np.int64))
        assert len(e.calls) == before   # nothing while a forward call may run
        w.take_pending()                # what the worker does between calls
        new = e.calls[before:]
        assert sorted(c[0] for c in new) == ["set_ports", "set_routes", "set_sysctls"]
        assert e.named("set_ports")[-1][0]["mtu"][0] == 1300
        assert w.pending_io == {}
    finally:
        stop.set()
        w.thread.join()


def test_losses_are_logged_at_most_once_per_period(daemon, monkeypatch, caplog):
    io = dict(tx_errors=0, tx_emsgsize=0, emit_errors=0, rx_frames=0)
    daemon.backend.stats = lambda: dict(io)
    monkeypatch.setattr(D, "LOG_EVERY", 0.25)

    async def run():
        task = asyncio.ensure_future(daemon._watch(period=0.01))
        for _ in range(30):   # 0.3 s of growth: one line, then one more
            io["tx_emsgsize"] += 2
            io["rx_frames"] += 100
            daemon.counters.parts[0].stats[tables.STAT_INDEX["drop_table_full"]] += 1
            await asyncio.sleep(0.01)
        task.cancel()

    with caplog.at_level(logging.WARNING, logger="pylvs"):
        t0 = time.monotonic()
        asyncio.run(run())
        elapsed = time.monotonic() - t0
    lines = [r.getMessage() for r in caplog.records]
    emsg = [m for m in lines if "tx_emsgsize" in m]
    full = [m for m in lines if "drop_table_full" in m]
    # One line at once, then at most one per LOG_EVERY of the time it took
    # (0.3 s on an idle machine: 2 lines; more only on a slow one).
    most = 1 + int(elapsed / 0.25)
    assert 1 <= len(emsg) <= most and 1 <= len(full) <= most, (elapsed, lines)
    # Each line says what the counter grew by since the previous line.
    got = [tuple(map(int, re.fullmatch(r"data path: tx_emsgsize \+(\d+) \(total (\d+)\)", m).groups()))
           for m in emsg]
    if len(got) == 2:
        assert got[1][1] - got[0][1] == got[1][0]
    assert not any("rx_frames" in m or "tx_errors" in m for m in lines), lines


class CountingSteering(Steering):
    """not_host as Steering's: a blocking call (nft) that may hang or fail."""

    def __init__(self, packets=0, delay=0.0, error=None):
        self.packets, self.delay, self.error = packets, delay, error
        self.threads = []

    def not_host(self):
        self.threads.append(threading.current_thread())
        time.sleep(self.delay)
        if self.error:
            raise self.error
        return self.packets


def stats_extra(daemon, steering):
    daemon.steering = steering
    ticks, took = [], []

    async def run():
        async def tick():   # the event loop must keep turning meanwhile
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)
        t = asyncio.ensure_future(tick())
        t0 = time.monotonic()
        try:
            return await daemon._stats_extra()
        finally:
            took.append(time.monotonic() - t0)
            t.cancel()
    return asyncio.run(run()), ticks, took[0]


def test_stats_adds_the_io_counters_and_not_host_read_off_the_loop(daemon):
    daemon.backend.stats = lambda: {"tx_emsgsize": np.uint64(3), "rx_dropped": 5}
    steering = CountingSteering(packets=42, delay=0.1)
    st, ticks, _ = stats_extra(daemon, steering)
    assert st["io"] == {"tx_emsgsize": 3, "rx_dropped": 5}
    assert st["steering"] == {"not_host": 42}
    (w,) = st["workers"]
    assert w["io"] == st["io"] and w["conns"] == {"conn_count": 3, "capacity": 100, "memory": 6400,
                                                  "upcall_cost": None}
    assert type(st["io"]["tx_emsgsize"]) is int   # JSON-ready
    assert steering.threads[0] is not threading.main_thread()
    assert len(ticks) >= 5   # 0.1 s of nft did not stop the loop


def test_stats_without_an_nft_answer_shows_no_not_host(daemon, monkeypatch, caplog):
    monkeypatch.setattr(D, "NOT_HOST_TIMEOUT", 0.2)
    st, ticks, took = stats_extra(daemon, CountingSteering(delay=1.0))   # nft hangs
    assert took < 0.9 and st["steering"] == {"not_host": None}
    assert st["io"] == {}   # MemoryBackend keeps no ring counters
    assert len(ticks) >= 10
    from pylvs.control.steering import SteeringError
    st, _, _ = stats_extra(daemon, CountingSteering(error=SteeringError("nft: no such table")))
    assert st["steering"] == {"not_host": None}
    msgs = [r.getMessage() for r in caplog.records]
    assert any("within 0.2 s" in m for m in msgs) and any("no such table" in m for m in msgs)


def test_config_rules_refused_at_start_are_logged_by_file_line(daemon, tmp_path, caplog):
    """`pylvs run -c FILE`: a rule the director refuses is logged as -R
    reports it, ``FILE line N: <ipvsadm message>``; the others apply."""
    path = tmp_path / "rules"
    path.write_text("# rules\n-A -t 10.0.0.1:80\n\n-A -t 10.0.0.1:80\n-A -t 10.0.0.2:80\n")
    daemon.opts.config = str(path)
    daemon._read_config()
    with caplog.at_level(logging.INFO, logger="pylvs"):
        asyncio.run(daemon._apply_config())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"{path} line 4: Service already exists"]
    assert f"applied 2 of 3 rules from {path}" in caplog.text
    assert len(daemon.balancer.services()) == 2


class AnsweringResolver(Resolver):
    """Answers what the test puts in ``answers``, without calling
    on_change: as when the resolver's callback is still on its way to the
    control loop."""

    def __init__(self):
        self.answers: dict[int, tuple] = {}
        self.unroutable: set[int] = set()

    def resolve(self, daddr):
        return self.answers.get(int(daddr))

    def no_route(self, daddr):
        return int(daddr) in self.unroutable


RS_MAC, OWN_MAC = b"\x02\x00\x00\x00\x00\x0b", b"\x02\x00\x00\x00\x00\x01"


def udp_service(daemon, *rips):
    r = AnsweringResolver()
    daemon.resolver = daemon.balancer.resolver = r
    daemon.balancer.add_service("udp", "10.0.0.100", 53, sched="rr")
    for rip in rips:
        daemon.balancer.add_dest("udp", "10.0.0.100", 53, rip, 53, fwd="masq")
    return r


def timed_start(daemon, timeout):
    t0 = time.monotonic()
    asyncio.run(daemon._await_dests(timeout=timeout))
    return time.monotonic() - t0


def test_start_waits_for_the_dests_macs_and_the_tables_carrying_them(daemon):
    r = udp_service(daemon, "10.0.1.11")
    late = threading.Timer(0.1, r.answers.__setitem__, (ip("10.0.1.11"), (1, RS_MAC, OWN_MAC)))
    late.start()
    took = timed_start(daemon, 2.0)
    late.join()
    assert 0.1 <= took < 1.0
    _, dests = daemon.engine.named("set_tables")[-1]
    row = dests[dests["daddr"] == ip("10.0.1.11")][0]
    assert row["flags"] & tables.DEST_F_RESOLVED
    assert (row["out_port"], row["dmac"].tobytes()) == (1, RS_MAC)


def test_start_waits_no_longer_than_the_bound_nor_for_a_dest_without_route(daemon, caplog):
    r = udp_service(daemon, "10.0.1.11", "10.0.1.12")
    r.unroutable.add(ip("10.0.1.12"))
    with caplog.at_level(logging.WARNING, logger="pylvs"):
        took = timed_start(daemon, 0.3)
    assert 0.3 <= took < 1.0
    assert "1 dest(s) still unresolved after 0.3 s: 10.0.1.11;" in caplog.text
    r.unroutable.add(ip("10.0.1.11"))
    assert timed_start(daemon, 2.0) < 0.2


def test_start_without_dests_does_not_wait(daemon):
    n = len(daemon.engine.calls)
    assert timed_start(daemon, 2.0) < 0.05
    assert len(daemon.engine.calls) == n


def test_tables_taken_only_once_the_latest_offer_is_in(daemon):
    """A publish made while the data thread swaps in the previous tables
    is not "taken" until the thread took it too."""
    e = daemon.engine
    w, = daemon.workers
    stop = threading.Event()
    w.thread = threading.Thread(target=stop.wait)
    w.thread.start()
    swapped = []

    def set_tables(services, dests):
        swapped.append(services)
        if services == "old":
            w.offer_tables("new", "new")   # control, during the swap

    e.set_tables = set_tables
    try:
        w.offer_tables("old", "old")
        assert not w.tables_taken.is_set()
        w.take_pending()
        assert swapped == ["old"] and not w.tables_taken.is_set()
        w.take_pending()
        assert swapped == ["old", "new"] and w.tables_taken.is_set()
    finally:
        stop.set()
        w.thread.join()


@pytest.mark.parametrize("impl,kind", [("c", tables.SCHED_KINDS["wrr"]), ("python", 0)])
def test_sched_impl_decides_what_the_engines_schedule(monkeypatch, impl, kind):
    """--sched-impl c (the default): the engines get the service's wrr in
    their scheduler tables; python: every service asks the upcall."""
    monkeypatch.setattr(pylvs.engine, "new_engine", lambda *a, **kw: RecordingEngine())
    d = D.Daemon(D.Options(ifaces=["a", "b"], engine="python", sched_impl=impl),
                 backend=MemoryBackend(["a", "b"]), steering=Steering(), resolver=Resolver())
    d._netwatch = Watch()
    d._netwatch.state = state()
    d._build()
    try:
        slot = d.balancer.add_service("tcp", "10.0.0.1", 80, sched="wrr")
        d.balancer.add_dest("tcp", "10.0.0.1", 80, "10.0.0.5", 80, fwd="masq", weight=2)
        svcs, dests, thresholds, table = d.engine.named("set_sched")[-1]
        assert int(svcs[slot]["kind"]) == kind and int(svcs[slot]["count"]) == 1
    finally:
        d._shutdown()


def test_sched_impl_choices(capsys):
    with pytest.raises(SystemExit):
        D.main(["--sched-impl", "rust"])
    assert "--sched-impl: invalid choice: 'rust' (choose from 'c', 'python')" in capsys.readouterr().err
