"""Engine → wire → engine: a master engine forwards a conn, the records it
queues travel as v1 messages (pylvs.sync.wire), a backup engine installs
them, and then forwards that conn's next frames exactly as the master
does. Both engines, and across them (a C master and a Python backup, and
the other way), since the wire is all they share."""

from __future__ import annotations

import numpy as np
import pytest

from engine_kit import CIP, CMAC, IMPLS, LMAC, RIP, RIP2, RMAC, RS_PORT, SMAC, VIP, Env, tcp, udp, v
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
