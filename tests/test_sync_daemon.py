"""The sync daemons' logic without the network (pylvs/sync/daemon.py): the
master drains every worker's engine and sends by the kernel's flush rule,
answers a bulk request by walking every engine; the backup installs each
received conn into the engine of the worker its client's frames reach
(the rule bpf.steer_index writes out), and counts what it drops. The
engines here are stand-ins written to contract 3 (PLAN-issue9.md); the
real engines meet the daemons in tests/netns/test_sync.py."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from pylvs.cli import adm
from pylvs.control import listing
from pylvs.control.balancer import Balancer
from pylvs.engine.sync import SYNC_DTYPE
from pylvs.engine.tables import Counters
from pylvs.io import bpf
from pylvs.sync import daemon as sd
from pylvs.sync import wire


class StandInEngine:
    """set_sync_master / sync_drain / sync_install / sync_chunk as contract
    3 words them, over a Python list (tests only)."""

    def __init__(self, queued=()):
        self.queue = list(queued)
        self.table: list[tuple] = []
        self.master = None

    def set_sync_master(self, on: bool) -> None:
        self.master = on

    def sync_drain(self, out: np.ndarray) -> int:
        if not self.master:
            return 0
        n = min(len(out), len(self.queue))
        for i in range(n):
            out[i] = self.queue[i]
        del self.queue[:n]
        return n

    def sync_install(self, records: np.ndarray, now: float) -> int:
        self.table.extend(records.tolist())
        return len(records)

    def sync_chunk(self, start: int, out: np.ndarray, now: float | None = None) -> tuple[int, int]:
        self.chunk_now = now
        part = self.table[start:start + len(out)]
        for i, row in enumerate(part):
            out[i] = row
        nxt = start + len(part)
        return len(part), (nxt if nxt < len(self.table) else -1)


def workers(n: int, **kw) -> list:
    return [SimpleNamespace(engine=StandInEngine(**kw), lock=threading.Lock()) for _ in range(n)]


def rows(n: int, base: int = 0x0A000001) -> list[tuple]:
    return [(6, 1, 0, base + i, 10000 + i, 0x0A000A02, 80, 0xC0A80102, 8080, 0, 900)
            for i in range(n)]


def cfg(role: str, **kw) -> sd.SyncConfig:
    return sd.SyncConfig.from_request({"state": role, "mcast_ifn": "lo", **kw})


def daemon(kind, ws, services=None, **kw):
    engines = sd._Engines(lambda: ws, lambda: services)
    return kind(cfg(kind.__name__.lower(), **kw), engines, 1, None, 1500)


def capturing_master(monkeypatch, *tables: list[tuple], **kw):
    """A Master (syncid 4) over one stand-in worker per table, and the list
    its sends land in instead of a socket."""
    ws = workers(len(tables))
    for w, table in zip(ws, tables):
        w.engine.table = table
    m = daemon(sd.Master, ws, syncid=4, **kw)
    sent: list[bytes] = []

    async def capture(sock, msgs, key=""):
        sent.extend(msgs)
    monkeypatch.setattr(m, "_send", capture)
    return m, sent


def test_master_drains_every_worker_and_flushes_by_the_kernel_rule():
    ws = workers(2)
    ws[0].engine.queue = rows(30)
    ws[1].engine.queue = rows(25, base=0x0B000001)
    m = daemon(sd.Master, ws, syncid=4)
    for w in ws:
        w.engine.set_sync_master(True)
    full = m.drain(now=100.0)
    assert [msg[4] for msg in full] == [40]            # one full message at once
    assert m.drain(now=101.9) == []                    # 15 wait ...
    (late,) = m.drain(now=102.0)                       # ... until 2 s old
    sent = np.concatenate([wire.decode(x, 4) for x in full + [late]])
    assert sent["caddr"].tolist() == [r[3] for r in rows(30) + rows(25, base=0x0B000001)]
    assert m.stats["drained"] == 55


@pytest.mark.parametrize("given", [1, 10, 43])
def test_master_with_a_sync_maxlen_below_one_conn_sends_one_conn_a_message(given):
    """`--start-daemon master --sync-maxlen 10` is accepted by ipvsadm and
    the kernel (a master's range is 1..65507): it used to fail with an
    internal error; the kernel sends one conn per message then."""
    ws = workers(1)
    ws[0].engine.queue = rows(3)
    m = daemon(sd.Master, ws, syncid=4, sync_maxlen=given)
    assert m.describe()["sync_maxlen"] == given          # what -L --daemon shows
    ws[0].engine.set_sync_master(True)
    msgs = m.drain(now=100.0)
    assert [(len(x), x[4]) for x in msgs] == [(44, 1)] * 3   # full at once: 1 conn each
    sent = np.concatenate([wire.decode(x, 4) for x in msgs])
    assert sent["caddr"].tolist() == [r[3] for r in rows(3)]


def test_master_bulk_walk_sends_every_engine_then_end(monkeypatch):
    m, sent = capturing_master(monkeypatch, rows(1500), rows(700, base=0x0C000001))
    monkeypatch.setattr(sd, "BULK_RATE", 10 ** 6)

    async def go():
        task = asyncio.ensure_future(m._bulk())
        assert m.request(wire.control_message(wire.BULK_REQUEST, 4, 77))
        assert not m.request(wire.control_message(wire.BULK_REQUEST, 5, 78))   # other syncid
        assert not m.request(wire.encode(np.array(rows(1), SYNC_DTYPE), 4)[0])
        for _ in range(200):
            await asyncio.sleep(0.005)
            if sent and wire.parse_control(sent[-1]):
                break
        task.cancel()
    asyncio.run(go())
    assert wire.parse_control(sent[-1]) == (wire.BULK_END, 4, 77)
    got = np.concatenate([wire.decode(x, 4) for x in sent[:-1]])
    assert len(got) == 2200 and all(len(x) <= 1472 for x in sent)
    assert m.stats["bulk_requests"] == 1 and m.stats["bulk_requests_other_syncid"] == 1
    # The walk asks for the time each conn has left, on the engines' clock.
    assert all(abs(w.engine.chunk_now - time.monotonic()) < 60 for w in m.engines.workers())


def _services(persist_netmask: str | None):
    b = Balancer(Counters(64, 64))
    b.add_service("tcp", "10.0.10.2", 80, sched="rr",
                  **({"persistent": 300, "netmask": persist_netmask} if persist_netmask else {}))
    b.add_dest("tcp", "10.0.10.2", 80, "192.168.1.2", 8080, fwd="masq")
    return b.services_table, b.dests_table


@pytest.mark.parametrize("netmask", [None, "255.255.255.0"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_worker_of_is_the_steering_rule(n, netmask):
    svcs, dests = _services(netmask)
    clients = [0x0A000000 + 7919 * i for i in range(200)]
    got = sd.worker_of(np.array(clients, dtype=np.uint32), svcs, n)
    for c, g in zip(clients, got):
        cip = ".".join(str((c >> s) & 255) for s in (24, 16, 8, 0))
        frame = bytes(Ether() / IP(src=cip, dst="10.0.10.2") / TCP(sport=1234, dport=80))
        assert bpf.steer_index(frame, n, svcs, dests) == g


@pytest.mark.parametrize("n", [1, 2])
def test_backup_installs_each_conn_in_its_client_s_worker(n):
    svcs, _ = _services(None)
    ws = workers(n)
    b = daemon(sd.Backup, ws, services=svcs, syncid=4)
    recs = np.array(rows(100), SYNC_DTYPE)
    for msg in wire.encode(recs, 4):
        b.receive(msg, now=1.0)
    want = sd.worker_of(recs["caddr"], svcs, n)
    for i, w in enumerate(ws):
        assert [r[3] for r in w.engine.table] == recs["caddr"][want == i].tolist()
    assert b.stats["installed"] == 100 and sum(b.drops.values()) == 0


def test_backup_counts_bad_messages_and_installs_nothing():
    ws = workers(2)
    b = daemon(sd.Backup, ws, services=_services(None)[0], syncid=4)
    good = wire.encode(np.array(rows(3), SYNC_DTYPE), 4)[0]
    for bad in (good[:-1], good[:4], b"", wire.encode(np.array(rows(3), SYNC_DTYPE), 5)[0],
                bytes([1]) + good[1:], good[:5] + b"\x02" + good[6:]):
        assert b.receive(bad, now=1.0) == 0
    assert all(not w.engine.table for w in ws)
    assert {k: v for k, v in b.drops.items() if v} == {
        "bad_size": 2, "short": 1, "wrong_syncid": 1, "v0": 1, "bad_version": 1}


def test_backup_bulk_end_is_its_own_only():
    b = daemon(sd.Backup, workers(1), syncid=4)
    b.receive(wire.control_message(wire.BULK_END, 4, b.nonce ^ 1), 1.0)
    assert not b.bulk_done.is_set()
    b.receive(wire.control_message(wire.BULK_END, 4, b.nonce), 1.0)
    assert b.bulk_done.is_set() and b.stats["bulk_done"] == 1


@pytest.mark.parametrize("req,error", [
    ({"state": "slave", "mcast_ifn": "lo"}, "Invalid operation"),
    ({"state": "master", "mcast_ifn": "nosuchif0"}, "No such device"),
    ({"state": "master", "mcast_ifn": "lo", "syncid": 256}, "Invalid argument"),
    ({"state": "master", "mcast_ifn": "lo", "mcast_group": "10.0.0.1"},
     "invalid IPv4 mcast-group `10.0.0.1'"),
    ({"state": "backup", "mcast_ifn": "lo", "mcast_port": 0}, "Invalid argument"),
])
def test_start_refusals(req, error):
    async def go():
        ds = sd.SyncDaemons(lambda: workers(1), lambda: None)
        with pytest.raises(sd.SyncError, match=error.replace("(", r"\(")):
            await ds.start(req)
        assert ds.list() == []
    asyncio.run(go())


def test_backup_receive_buffer_passes_rmem_max_when_privileged():
    """A bulk walk arrives at 2000 messages a second: the backup asks for
    a buffer beyond net.core.rmem_max (SO_RCVBUFFORCE) when it may (root,
    as the test suite runs; CAP_NET_ADMIN), else takes the rmem_max cap."""
    import os
    import socket as so

    rmem_max = int(open("/proc/sys/net/core/rmem_max").read())
    want = 2 * rmem_max
    with so.socket(so.AF_INET, so.SOCK_DGRAM) as s:
        got = sd.set_rcvbuf(s, want)
        assert got == s.getsockopt(so.SOL_SOCKET, so.SO_RCVBUF)
    assert got == (2 * want if os.geteuid() == 0 else 2 * rmem_max)


def test_stop_without_a_daemon():
    async def go():
        ds = sd.SyncDaemons(lambda: workers(1), lambda: None)
        with pytest.raises(sd.SyncError, match="No daemon is running"):
            await ds.stop({"state": "backup"})
    asyncio.run(go())


def test_engine_without_sync_is_refused(caplog):
    """The refusal is the only word: the start that never turned the
    engines' queueing on does not try to turn it off (an error in the log
    about set_sync_master, for an engine that has none)."""
    caplog.set_level("DEBUG", logger="pylvs.sync")

    async def go():
        ds = sd.SyncDaemons(lambda: [SimpleNamespace(engine=object(), lock=threading.Lock())],
                            lambda: None)
        for role in sd.ROLES:
            with pytest.raises(sd.SyncError, match="no connection sync"):
                await ds.start({"state": role, "mcast_ifn": "lo"})
        assert ds.list() == []
    asyncio.run(go())
    assert [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"] == []


def test_list_daemon_is_ipvsadm_s_line():
    rows_ = [{"state": "master", "mcast_ifn": "eth1", "syncid": 3, "sync_maxlen": 1472,
              "mcast_group": "224.0.0.81", "mcast_port": 8848, "mcast_ttl": 1},
             {"state": "backup", "mcast_ifn": "eth1", "syncid": 0, "sync_maxlen": 8972,
              "mcast_group": "224.0.0.81", "mcast_port": 8848, "mcast_ttl": 1}]
    assert listing.daemons(rows_) == (
        "master sync daemon (mcast=eth1, syncid=3, maxlen=1472, group=224.0.0.81, "
        "port=8848, ttl=1)\n"
        "backup sync daemon (mcast=eth1, syncid=0, maxlen=8972, group=224.0.0.81, "
        "port=8848, ttl=1)\n")
    assert listing.daemons([]) == ""


class Recorder:
    def __init__(self, answer=None):
        self.calls: list[dict] = []
        self.answer = answer

    def call(self, req: dict):
        self.calls.append(req)
        return self.answer


def run_adm(argv, answer=None):
    rec = Recorder(answer)
    out, err = io.StringIO(), io.StringIO()
    rc = adm.main(argv, stdout=out, stderr=err, client_factory=lambda _p: rec)
    return rc, out.getvalue(), err.getvalue(), rec.calls


# (argv, exit status, stderr, the operation sent)
ADM = [
    (["--start-daemon", "master", "--mcast-interface", "eth1", "--syncid", "5"], 0, "",
     {"op": "start_daemon", "state": "master", "mcast_ifn": "eth1", "syncid": 5}),
    (["--start-daemon", "backup", "--mcast-interface=eth1", "--mcast-group", "239.1.2.3",
      "--mcast-port", "9000", "--mcast-ttl", "4", "--sync-maxlen", "1400"], 0, "",
     {"op": "start_daemon", "state": "backup", "mcast_ifn": "eth1", "mcast_group": "239.1.2.3",
      "mcast_port": 9000, "mcast_ttl": 4, "sync_maxlen": 1400}),
    (["--start-daemon", "master", "--mcast-interface", "a-very-long-interface-name"], 0, "",
     {"op": "start_daemon", "state": "master", "mcast_ifn": "a-very-long-int"}),
    (["--stop-daemon", "backup"], 0, "", {"op": "stop_daemon", "state": "backup"}),
    (["--start-daemon", "primary"], 2, "illegal start-daemon parameter specified\n", None),
    (["--start-daemon", "master", "--syncid", "256"], 2, "illegal syncid specified\n", None),
    (["--start-daemon", "master", "--mcast-group", "10.1.1.1"], 2,
     "invalid IPv4 mcast-group `10.1.1.1'\n", None),
    (["--start-daemon", "master", "--mcast-port", "0"], 2, "illegal mcast-port specified\n", None),
    (["--start-daemon", "master", "--mcast-ttl", "256"], 2, "illegal mcast-ttl specified\n", None),
    (["--start-daemon", "master", "--sync-maxlen", "65508"], 2,
     "illegal sync-maxlen specified\n", None),
    (["--stop-daemon", "master", "--mcast-interface", "eth0"], 2,
     "Illegal 'mcast-interface' option with the 'stop-daemon' command\n", None),
]


@pytest.mark.parametrize("argv,rc,err,op", ADM, ids=[" ".join(a[0]) for a in ADM])
def test_adm_daemon_commands(argv, rc, err, op):
    got_rc, _out, got_err, calls = run_adm(argv)
    assert (got_rc, got_err) == (rc, err)
    assert calls == ([op] if op else [])


def test_adm_list_daemon():
    answer = [{"state": "backup", "mcast_ifn": "veth0", "syncid": 9, "sync_maxlen": 1472,
               "mcast_group": "224.0.0.81", "mcast_port": 8848, "mcast_ttl": 1}]
    rc, out, _err, calls = run_adm(["-L", "--daemon"], answer)
    assert rc == 0 and calls == [{"op": "daemons"}]
    assert out == ("backup sync daemon (mcast=veth0, syncid=9, maxlen=1472, "
                   "group=224.0.0.81, port=8848, ttl=1)\n")


def test_pylvs_stats_text_lists_the_sync_counters():
    from pylvs.cli.tools import format_stats

    st = {"conns": {"count": 0, "limit": 1, "memory": None}, "services": {"count": 0, "limit": 1},
          "dests": {"count": 0, "limit": 1}, "engine": {"pkts": 1}, "counters": {},
          "sync": {"backup": {"messages": 3, "installed": 80,
                              "dropped": {"bad_size": 1, "v0": 0}, "bulk_complete": True}}}
    text = format_stats(st)
    assert "\nsync.backup.messages          3\n" in text
    assert "sync.backup.dropped.bad_size  1\n" in text
    assert "sync.backup.bulk_complete     True\n" in text


RUN_REFUSALS = [
    (["--start-daemon", "master", "--start-daemon", "master"], "master or backup given twice"),
    (["--start-daemon", "primary"], "invalid choice: 'primary'"),
    (["--syncid", "256"], "256 is out of range (0..255)"),
    (["--mcast-group", "10.1.2.3"], "--mcast-group: invalid IPv4 mcast-group `10.1.2.3'"),
    (["--mcast-port", "0"], "0 is out of range (1..65535)"),
    (["--sync-maxlen", "65508"], "65508 is out of range (1..65507)"),
    # ipvsadm takes the daemon options only with --start-daemon; ignored,
    # a forgotten --start-daemon would leave the director without sync
    (["--mcast-interface", "eth1", "--syncid", "0"],
     "--mcast-interface, --syncid: only with --start-daemon master|backup"),
    (["--sync-maxlen", "1400"], "--sync-maxlen: only with --start-daemon master|backup"),
]


@pytest.mark.parametrize("argv,want", RUN_REFUSALS, ids=[r[1] for r in RUN_REFUSALS])
def test_pylvs_run_refuses_bad_sync_options(argv, want, capsys):
    from pylvs.runtime.daemon import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err, err


def test_backup_warns_about_drops_at_most_every_10_s(caplog, monkeypatch):
    b = daemon(sd.Backup, workers(1), syncid=4)
    clock = [100.0]
    monkeypatch.setattr(sd.time, "monotonic", lambda: clock[0])
    caplog.set_level("WARNING", logger="pylvs.sync")
    for when, buf in ((100.0, b"\0\4"), (101.0, b"\0\4"), (105.0, bytes(8)), (111.0, b"")):
        clock[0] = when
        b.receive(buf, when)
        b._log_drops("10.77.0.1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "sync backup: dropped short +1 (last from 10.77.0.1; pylvs stats: sync.backup.dropped)",
        "sync backup: dropped bad_size +1, short +2 (last from 10.77.0.1; pylvs stats: "
        "sync.backup.dropped)"]


def test_backup_names_both_syncids_when_it_drops_another(caplog):
    """A master at syncid 51 and a backup at 52 (one director's mistake):
    the warning says which syncid was heard and which this backup takes,
    so the operator need not capture the traffic to find out."""
    b = daemon(sd.Backup, workers(1), syncid=52)
    caplog.set_level("WARNING", logger="pylvs.sync")
    msg = wire.encode(np.array(rows(2), SYNC_DTYPE), 51)[0]
    b.receive(msg, 100.0)
    b._log_drops("10.77.1.2", msg)
    assert [r.getMessage() for r in caplog.records] == [
        "sync backup: dropped wrong_syncid +1 (last from 10.77.1.2, syncid 51; this backup "
        "takes syncid 52 (0: any); pylvs stats: sync.backup.dropped)"]


class Rules:
    """A director's rules as `pylvs run` publishes them: a Balancer's tables,
    handed to every worker's real engine at each change."""

    def __init__(self, impl: str, n: int):
        from pylvs.engine import new_engine

        self.balancer = Balancer(Counters(64, 64))
        self.workers = [SimpleNamespace(engine=new_engine(impl, 256, counters=Counters(64, 64),
                                                          schedule=lambda s, c, p: -1,
                                                          key=bytes(range(16))),
                                        lock=threading.Lock()) for _ in range(n)]
        self.services, self.dests = self.balancer.services_table, self.balancer.dests_table
        self.publish()

    def publish(self) -> None:
        self.services, self.dests = self.balancer.services_table, self.balancer.dests_table
        for w in self.workers:
            w.engine.set_tables(self.services, self.dests)

    def conns(self) -> int:
        return sum(len(w.engine.conns()) for w in self.workers)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("impl", ["python", "c"])
def test_backup_started_before_its_rules_asks_again_once_they_are_there(impl, n, monkeypatch):
    """`pylvs run --start-daemon backup` and the rules only afterwards
    (`pylvs adm -R`): the first bulk answer installs nothing (no such
    service here); once services and dests arrive and rest a second, the
    backup asks again (a new nonce, at most every REASK_EVERY s) and the
    answer installs. Rules that only shrink, or change when nothing went
    uninstalled, ask nothing."""
    clock = [100.0]
    monkeypatch.setattr(sd.time, "monotonic", lambda: clock[0])
    d = Rules(impl, n)
    sent: list[bytes] = []

    async def go():
        b = sd.Backup(cfg("backup", syncid=4),
                      sd._Engines(lambda: d.workers, lambda: d.services, lambda: d.dests),
                      1, None, 1500)

        async def capture(sock, msgs, key=""):
            sent.extend(msgs)
        b._send, b.ask = capture, None   # the socket start() would make
        first = b.nonce
        table = wire.encode(np.array(rows(60), SYNC_DTYPE), 4)   # the master's bulk answer
        for msg in table + [wire.control_message(wire.BULK_END, 4, first)]:
            b.receive(msg, now=100.0)
        assert d.conns() == 0 and b.bulk_done.is_set() and b.missed
        assert not b.rules_tick(106.0)                       # no rules yet: nothing to ask

        d.balancer.add_service("tcp", "10.0.10.2", 80, sched="rr")
        d.publish()
        assert not b.rules_tick(106.5)                       # a service, no dest yet
        d.balancer.add_dest("tcp", "10.0.10.2", 80, "192.168.1.2", 8080, fwd="masq")
        d.publish()
        assert b.engines.rules() == {(6, 0x0A000A02, 80), (6, 0x0A000A02, 80, 0xC0A80102, 8080)}
        assert not b.rules_tick(107.0) and not b.rules_tick(107.9)   # resting
        assert b.rules_tick(108.0)
        b.reask(108.0)
        await asyncio.sleep(0)
        assert b.nonce != first and not b.bulk_done.is_set() and not b.missed
        assert wire.parse_control(sent[-1]) == (wire.BULK_REQUEST, 4, b.nonce)
        assert b.stats["bulk_reasks"] == 1
        for msg in table + [wire.control_message(wire.BULK_END, 4, first)]:
            b.receive(msg, now=108.1)
        assert d.conns() == 60 and not b.bulk_done.is_set()   # the old END answers nothing
        b.receive(wire.control_message(wire.BULK_END, 4, b.nonce), now=108.1)
        assert b.bulk_done.is_set()

        # All installed since: a new dest asks nothing.
        d.balancer.add_dest("tcp", "10.0.10.2", 80, "192.168.1.3", 8080, fwd="masq")
        d.publish()
        assert not any(b.rules_tick(t) for t in (109.0, 111.0, 120.0))
        # A record of a service this backup lacks, then a dest removed
        # (health check): rules shrank, nothing to ask.
        other = [(6, 1, 0, 0x0A000001, 9, 0x0A000A09, 80, 0xC0A80102, 80, 0, 900)]
        b.receive(wire.encode(np.array(other, SYNC_DTYPE), 4)[0], now=121.0)
        assert b.missed
        d.balancer.del_dest("tcp", "10.0.10.2", 80, "192.168.1.3", 8080)
        d.publish()
        assert not any(b.rules_tick(t) for t in (122.0, 125.0, 130.0))
        # The service arrives: asked again (5 s after the last request
        # at the earliest, which is long past).
        d.balancer.add_service("tcp", "10.0.10.9", 80, sched="rr")
        d.balancer.add_dest("tcp", "10.0.10.9", 80, "192.168.1.2", 80, fwd="masq")
        d.publish()
        assert not b.rules_tick(131.0) and b.rules_tick(132.0)
        b.reask(132.0)
        # Rules added again at once: the next request waits REASK_EVERY s.
        b.missed = True
        d.balancer.add_dest("tcp", "10.0.10.9", 80, "192.168.1.4", 80, fwd="masq")
        d.publish()
        assert not b.rules_tick(133.5) and not b.rules_tick(136.9) and b.rules_tick(137.0)
        await b.close()
    asyncio.run(go())


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("impl", ["python", "c"])
def test_backup_asks_again_when_a_dest_it_lacked_comes_back(impl, n, monkeypatch):
    """The rules were whole when the backup asked; a real server is then
    taken out on the backup alone (`pylvs adm -d`, its health check) while
    the master keeps sending its conns, which go uninstalled; when it
    comes back the backup asks again (docs/sync.md: records uninstalled
    since the last request, then a dest added). Comparing with the rules
    at the request, which held that dest, it never asked."""
    clock = [100.0]
    monkeypatch.setattr(sd.time, "monotonic", lambda: clock[0])
    d = Rules(impl, n)
    d.balancer.add_service("tcp", "10.0.10.2", 80, sched="rr")
    d.balancer.add_dest("tcp", "10.0.10.2", 80, "192.168.1.2", 8080, fwd="masq")
    d.publish()

    async def go():
        b = sd.Backup(cfg("backup", syncid=4),
                      sd._Engines(lambda: d.workers, lambda: d.services, lambda: d.dests),
                      1, None, 1500)

        async def capture(sock, msgs, key=""):
            pass
        b._send, b.ask = capture, None
        d.balancer.del_dest("tcp", "10.0.10.2", 80, "192.168.1.2", 8080)
        d.publish()
        for msg in wire.encode(np.array(rows(10), SYNC_DTYPE), 4):
            b.receive(msg, now=101.0)
        assert d.conns() == 0 and b.missed
        assert not any(b.rules_tick(t) for t in (102.0, 104.0))    # shrunk: nothing to ask
        d.balancer.add_dest("tcp", "10.0.10.2", 80, "192.168.1.2", 8080, fwd="masq")
        d.publish()
        assert not b.rules_tick(105.0) and b.rules_tick(106.0)
        await b.close()
    asyncio.run(go())


def test_master_answers_at_most_bulk_pending_requests_a_walk(monkeypatch):
    """A flood of bulk requests with distinct nonces (a host lying on the
    sync link): one walk, at most BULK_PENDING ENDs, the rest counted."""
    m, sent = capturing_master(monkeypatch, rows(5))

    async def go():
        for nonce in range(10_000):
            m.request(wire.control_message(wire.BULK_REQUEST, 4, nonce))
        # A pending request asked again (a backup's retry) is not dropped.
        assert m.request(wire.control_message(wire.BULK_REQUEST, 4, 5))
        task = asyncio.ensure_future(m._bulk())
        for _ in range(200):
            await asyncio.sleep(0.005)
            if m.stats["bulk_walks"]:
                break
        task.cancel()
    asyncio.run(go())
    ends = [wire.parse_control(x) for x in sent if wire.parse_control(x)]
    assert ends == [(wire.BULK_END, 4, n) for n in range(sd.BULK_PENDING)]
    assert m.stats["bulk_walks"] == 1 and len(sent) == 1 + sd.BULK_PENDING
    assert m.stats["bulk_requests"] == 10_001
    assert m.stats["bulk_requests_dropped"] == 10_000 - sd.BULK_PENDING


def test_a_retry_during_its_walk_does_not_start_a_second_walk(monkeypatch):
    """A backup re-asks with the same nonce after 1 s without an END; a
    master walking a table too large to send in that second (here: 400
    conns at 100 messages a second) answers the retry with the END of the
    walk in progress, not with a second walk of the whole table."""
    m, sent = capturing_master(monkeypatch, rows(400))
    monkeypatch.setattr(sd, "BULK_RATE", 100)
    ask = wire.control_message(wire.BULK_REQUEST, 4, 77)

    async def go():
        task = asyncio.ensure_future(m._bulk())
        assert m.request(ask)
        for _ in range(200):            # the walk has begun
            await asyncio.sleep(0.005)
            if sent:
                break
        assert not m.request(ask)       # the backup's retry
        for _ in range(400):
            await asyncio.sleep(0.005)
            if wire.parse_control(sent[-1]):
                break
        queued, woken = dict(m.requests), m.bulk_wake.is_set()
        task.cancel()
        return queued, woken
    queued, woken = asyncio.run(go())
    assert wire.parse_control(sent[-1]) == (wire.BULK_END, 4, 77)
    assert queued == {} and not woken               # no second walk due
    assert len(np.concatenate([wire.decode(x, 4) for x in sent[:-1]])) == 400
    assert m.stats["bulk_requests"] == 2 and m.stats["bulk_requests_in_walk"] == 1


def test_backup_keeps_asking_until_a_master_answers(monkeypatch, caplog):
    """The backup's bulk request: at once, after 1, 2, 4 and 8 s, then
    every 10 s (a master daemon started minutes after the backup, as an
    operator enabling sync on a running director), until the END with its
    nonce; then no more. Once the back-off is over unanswered the log says
    so, once (a master of another syncid ignores the request: nothing
    else would tell the operator before the first conn)."""
    caplog.set_level("INFO", logger="pylvs.sync")
    waits: list[float] = []
    real_wait_for = asyncio.wait_for

    async def clocked_wait_for(aw, timeout):   # the back-off without the wait
        waits.append(timeout)
        if len(waits) == 8:
            b.receive(wire.control_message(wire.BULK_END, 4, b.nonce), 1.0)
        return await real_wait_for(aw, 0 if len(waits) < 8 else 1)
    monkeypatch.setattr(sd.asyncio, "wait_for", clocked_wait_for)
    b = daemon(sd.Backup, workers(1), syncid=4)
    sent: list[bytes] = []

    async def capture(sock, msgs, key=""):
        sent.extend(msgs)
    b._send, b.ask = capture, None   # the socket start() would make
    asyncio.run(b._ask())
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    assert sent == [wire.control_message(wire.BULK_REQUEST, 4, b.nonce)] * 8
    assert [r.getMessage() for r in caplog.records] == [
        "sync backup: no master answered the bulk request for syncid 4 in 15 s; asking "
        "every 10 s (a pylvs master daemon of that syncid answers; an IPVS master never "
        "does)"]
    assert b.bulk_done.is_set()


def test_counters_name_conns_only_for_sync_messages():
    """`pylvs stats` lists sync.backup.bulk_request_messages and _bytes,
    not a bulk_request_conns that is always 0 (nor bulk_end_conns)."""
    import socket as so

    async def go():
        b = daemon(sd.Backup, workers(1), syncid=4)
        m = daemon(sd.Master, workers(1), syncid=4)
        a, z = so.socketpair(so.AF_UNIX, so.SOCK_DGRAM)
        with a, z:
            a.setblocking(False)
            await b._send(a, [wire.control_message(wire.BULK_REQUEST, 4, 1)], "bulk_request_")
            await m._send(a, [wire.control_message(wire.BULK_END, 4, 1)], "bulk_end_")
            await m._send(a, wire.encode(np.array(rows(3), SYNC_DTYPE), 4), "bulk_")
        return b, m
    b, m = asyncio.run(go())
    assert "bulk_request_conns" not in b.stats and "bulk_end_conns" not in m.stats
    assert {k: v for k, v in b.stats.items() if v} == {"bulk_request_messages": 1,
                                                        "bulk_request_bytes": 20}
    assert {k: v for k, v in m.stats.items() if v} == {
        "bulk_end_messages": 1, "bulk_end_bytes": 20, "bulk_messages": 1,
        "bulk_bytes": 8 + 3 * 36, "bulk_conns": 3}


def test_stats_list_every_documented_counter_from_the_start():
    """`pylvs stats | grep sync.master.send_errors` (or a scraper) finds
    each counter docs/sync.md names at 0 before its first event, not
    only once it happened."""
    d = sd.SyncDaemons(lambda: workers(1), lambda: None)
    d.running = {"master": daemon(sd.Master, workers(1)), "backup": daemon(sd.Backup, workers(1))}
    st = d.stats()
    assert {k: v for k, v in st["master"].items()} == dict.fromkeys((
        "drained", "messages", "bytes", "conns", "send_errors", "bulk_requests",
        "bulk_requests_other_syncid", "bulk_requests_dropped", "bulk_requests_in_walk",
        "bulk_walks", "bulk_messages", "bulk_bytes", "bulk_conns", "bulk_end_messages",
        "bulk_end_bytes"), 0)
    backup = dict(st["backup"])
    assert backup.pop("dropped") == wire.new_counts() and backup.pop("bulk_complete") is False
    assert backup == dict.fromkeys((
        "messages", "bytes", "conns", "installed", "install_errors", "send_errors",
        "bulk_request_messages", "bulk_request_bytes", "bulk_reasks", "bulk_done"), 0)


def test_backup_names_a_message_longer_than_its_sync_maxlen(caplog):
    """A master with --sync-maxlen 4000 and a backup at 1472: the read cuts
    the datagram; the backup counts it as too_long (not a bogus size) and
    says once what to do, and still installs the messages that fit."""
    import socket as so

    ws = workers(1)
    b = daemon(sd.Backup, ws, services=_services(None)[0], syncid=4)
    caplog.set_level("WARNING", logger="pylvs.sync")
    big = wire.encode(np.array(rows(100), SYNC_DTYPE), 4, 4000)[0]
    fits = wire.encode(np.array(rows(3), SYNC_DTYPE), 4)[0]
    assert len(big) > b.maxlen == 1472
    b.inp, peer = so.socketpair(so.AF_UNIX, so.SOCK_DGRAM)
    with b.inp, peer:
        b.inp.setblocking(False)
        for m in (big, fits, big):
            peer.send(m)
        b._on_readable()
    assert {k: v for k, v in b.drops.items() if v} == {"too_long": 2}
    assert b.stats["messages"] == 3 and len(ws[0].engine.table) == 3
    warned = [r.getMessage() for r in caplog.records if "longer" in r.getMessage()]
    assert len(warned) == 1 and "sync_maxlen 1472" in warned[0]
    assert "--sync-maxlen" in warned[0]
