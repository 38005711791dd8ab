"""Engine → wire → engine: a master engine forwards a conn, the records it
queues travel as v1 messages (pylvs.sync.wire), a backup engine installs
them, and then forwards that conn's next frames exactly as the master
does. Both engines, and across them (a C master and a Python backup, and
the other way), since the wire is all they share."""

from __future__ import annotations

import numpy as np
import pytest

from engine_kit import CIP, IMPLS, RIP, RIP2, RMAC, RS_PORT, SMAC, VIP, Env, ip, tcp, udp, v
from pylvs.engine import tables
from pylvs.engine.sync import SYNC_DTYPE
from pylvs.sync import wire

PAIRS = [(m, b) for m in IMPLS for b in IMPLS]


def flow_nat_tcp():
    """A NAT TCP conn to svc 0 (RIP:8080): the 3rd client packet announces it."""
    c = dict(src=CIP, dst=VIP, sport=40000, dport=80)
    r = dict(src=RIP, dst=CIP, sport=8080, dport=40000, smac=RMAC, dmac=SMAC)
    before = [(tcp(flags="S", seq=1, **c), 0), (tcp(flags="SA", seq=9, ack=2, **r), RS_PORT),
              (tcp(flags="A", seq=2, ack=10, **c), 0),
              (tcp(flags="PA", seq=2, ack=10, payload=b"GET /", **c), 0)]
    after = [(tcp(flags="PA", seq=7, ack=10, payload=b"more", **c), 0),
             (tcp(flags="PA", seq=10, ack=11, payload=b"reply", **r), RS_PORT)]
    return before, after


def flow_dr_tcp():
    """A DR TCP conn to svc 3 (RIP2:82): client packets only."""
    c = dict(src=CIP, dst=VIP, sport=40001, dport=82)
    before = [(tcp(flags="S", seq=1, **c), 0), (tcp(flags="A", seq=2, ack=10, **c), 0),
              (tcp(flags="PA", seq=2, ack=10, payload=b"GET /", **c), 0)]
    after = [(tcp(flags="PA", seq=7, ack=10, payload=b"more", **c), 0)]
    return before, after


def flow_nat_udp():
    """A NAT UDP conn to svc 1 (RIP:5353): the 3rd datagram announces it."""
    c = dict(src=CIP, dst=VIP, sport=40002, dport=53)
    before = [(udp(payload=b"q%d" % i, **c), 0) for i in range(3)]
    after = [(udp(payload=b"q3", **c), 0),
             (udp(src=RIP, dst=CIP, sport=5353, dport=40002, smac=RMAC, dmac=SMAC,
                  payload=b"answer"), RS_PORT)]
    return before, after


FLOWS = {"NAT TCP": flow_nat_tcp, "DR TCP": flow_dr_tcp, "NAT UDP": flow_nat_udp}


def drain(env: Env) -> np.ndarray:
    out = np.zeros(64, dtype=SYNC_DTYPE)
    n = env.engine.sync_drain(out)
    return out[:n].copy()


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("master_impl,backup_impl", PAIRS, ids=[f"{m}->{b}" for m, b in PAIRS])
def test_a_conn_synced_over_the_wire_forwards_as_on_the_master(flow, master_impl, backup_impl):
    before, after = FLOWS[flow]()
    master, backup = Env(master_impl), Env(backup_impl)
    master.engine.set_sync_master(True)
    for frame, port in before:
        verdict, _p, _f = master.send(v(frame), in_port=port, now=1.0)
        assert verdict == tables.V_TX, flow
    records = drain(master)
    assert len(records) >= 1, flow
    msgs = wire.encode(records, syncid=3)
    counts = wire.new_counts()
    got = np.concatenate([wire.decode(m, 3, counts) for m in msgs])
    assert sum(counts.values()) == 0 and got.tolist() == records.tolist()
    assert backup.engine.sync_install(got, 1.5) >= 1
    assert backup.conn(proto=int(records[0]["proto"]), cport=int(records[0]["cport"])) is not None
    for frame, port in after:
        m = master.send(v(frame), in_port=port, now=2.0)
        b = backup.send(v(frame), in_port=port, now=2.0)
        assert m == b, (flow, frame)
        assert m[0] == tables.V_TX


@pytest.mark.parametrize("impl", IMPLS)
def test_bulk_chunks_cover_the_table_over_the_wire(impl):
    """sync_chunk's whole table, encoded and installed elsewhere, lists the same conns."""
    master, backup = Env(impl, capacity=512), Env(impl, capacity=512)
    for i in range(100):
        master.send(v(tcp(src=CIP, dst=VIP, sport=20000 + i, dport=80, flags="S")), now=1.0)
    out = np.zeros(16, dtype=SYNC_DTYPE)
    msgs, start = [], 0
    while start >= 0:
        n, start = master.engine.sync_chunk(start, out)
        msgs += wire.encode(out[:n], 0, maxlen=8 + 36 * 7)
    recs = np.concatenate([wire.decode(m, 0) for m in msgs])
    assert len(recs) == 100
    backup.engine.sync_install(recs, 1.0)
    key = lambda c: (c[0], c[1], c[2], c[3], c[4], c[5], c[6])  # noqa: E731
    assert sorted(map(key, backup.engine.conns())) == sorted(map(key, master.engine.conns()))


# --- the daemons over real engines, one per worker ---------------------------

def _workers(impl: str, n: int) -> tuple[list[Env], list]:
    """n engines (Envs) and the workers the daemons see (engine, lock)."""
    import threading
    from types import SimpleNamespace

    envs = [Env(impl, capacity=512) for _ in range(n)]
    return envs, [SimpleNamespace(engine=e.engine, lock=threading.Lock()) for e in envs]


def _daemon(kind, ws, syncid=5):
    from pylvs.sync import daemon as sd

    engines = sd._Engines(lambda: ws, lambda: np.zeros(0, dtype=tables.SERVICE_DTYPE))
    cfg = sd.SyncConfig.from_request({"state": kind.__name__.lower(), "mcast_ifn": "lo",
                                      "syncid": syncid})
    return kind(cfg, engines, 1, None, 1500)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 2])
def test_backup_daemon_puts_each_conn_in_its_client_s_worker_engine(impl, n):
    from pylvs.sync import daemon as sd

    _envs, ws = _workers(impl, n)
    b = _daemon(sd.Backup, ws)
    clients = [0x0A000000 + 977 * i for i in range(60)]
    recs = np.zeros(len(clients), dtype=SYNC_DTYPE)
    recs["proto"], recs["state"], recs["flags"] = tables.PROTO_TCP, 1, tables.FWD_MASQ
    recs["caddr"], recs["cport"] = clients, 40000
    recs["vaddr"], recs["vport"] = ip(VIP), 80
    recs["daddr"], recs["dport"] = ip(RIP), 8080
    recs["timeout"] = 900
    for m in wire.encode(recs, 5):
        b.receive(m, now=1.0)
    want = sd.worker_of(recs["caddr"], np.zeros(0, dtype=tables.SERVICE_DTYPE), n)
    for i, w in enumerate(ws):
        got = sorted(c[1] for c in w.engine.conns())
        assert got == sorted(recs["caddr"][want == i].tolist())
    assert b.stats["installed"] == len(clients)


@pytest.mark.parametrize("impl", IMPLS)
def test_master_daemon_drains_every_worker_engine(impl):
    from pylvs.sync import daemon as sd

    envs, ws = _workers(impl, 2)
    m = _daemon(sd.Master, ws)
    for w in ws:
        w.engine.set_sync_master(True)
    sent = []
    for i, env in enumerate(envs):   # each worker's own conns, three client packets each
        for k in range(3):
            sport = 30000 + 10 * i + k
            c = dict(src=CIP, dst=VIP, sport=sport, dport=82)   # svc 3: DR, client side only
            for f in (tcp(flags="S", seq=1, **c), tcp(flags="A", seq=2, ack=10, **c),
                      tcp(flags="PA", seq=2, ack=10, payload=b"x", **c)):
                env.send(v(f), now=1.0)
            sent.append(sport)
    msgs = m.drain(now=1.0) + m.drain(now=3.5)   # the partial message after 2 s
    got = np.concatenate([wire.decode(x, 5) for x in msgs])
    assert sorted(got["cport"].tolist()) == sorted(sent)
    assert set(got["daddr"].tolist()) == {ip(RIP2)}
