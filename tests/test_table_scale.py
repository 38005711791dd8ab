"""The C conn table at scale: two million conns made, found, expired by the
million and made again, with the index checked against the slab
(Engine._check) at each step and the memory per conn as stated
(docs/engine.md, "Conn table": 64 bytes of slab, 3 to 6 index buckets of 8
bytes). The 10-million-conn figures are bench engine --scenario table-scale.
"""

from __future__ import annotations

import numpy as np

from bench.engine import NOW, RIPS, make_conns, tables_for_bench
from bench.flowgen import FrameMaker, flow_tuples
from pylvs.engine import new_engine, states, tables

HALF = 1 << 20
EST_TIMEOUT = states.DEFAULT_TIMEOUTS["ESTABLISHED"]


def _engine(capacity: int):
    counters = tables.Counters()
    calls = [0]

    def schedule(svc, caddr, cport):
        calls[0] += 1
        return calls[0] % len(RIPS)

    e = new_engine("c", capacity=capacity, counters=counters, schedule=schedule)
    e.set_tables(*tables_for_bench())
    return e, counters, calls


def _established(e, counters, index: np.ndarray, now: float) -> tuple[int, set[int]]:
    """Send an established data frame of each flow in `index`: (frames sent,
    the daddrs they left for)."""
    fm = FrameMaker(0x18, b"x" * 16)
    batch = tables.Batch(len(index), 128)
    fm.fill(batch.buf, *flow_tuples(index))
    batch.length[:len(index)] = fm.length
    batch.count = len(index)
    tx0 = counters.stat("tx_frames")
    e.process(batch, now)
    ip = tables.VNET_HDR_LEN + 14
    sent = batch.verdict[:len(index)] == tables.V_TX
    daddrs = {int.from_bytes(bytes(batch.buf[i, ip + 16:ip + 20]), "big")
              for i in np.flatnonzero(sent)}
    assert counters.stat("tx_frames") - tx0 == int(sent.sum())
    return int(sent.sum()), daddrs


def test_two_million_conns_made_found_expired_and_made_again():
    e, counters, calls = _engine(2 * HALF)
    rng = np.random.default_rng(8)
    # Two generations of a million NAT conns each, a second apart in ESTABLISHED.
    make_conns(e, HALF, start=0, now=NOW)
    make_conns(e, HALF, start=HALF, now=NOW + 1)
    assert e.conn_count == 2 * HALF and calls[0] == 2 * HALF
    e._check()
    # 64 bytes of slab a conn (2 MiB units) and 2^23 buckets: 3 x 2 M rounded up.
    assert e.memory == 2 * HALF * 64 + (1 << 23) * 8
    assert e.memory / e.conn_count == 96.0

    # Every established flow is found, wherever its conn and bucket lie.
    sample = rng.choice(2 * HALF, 4096, replace=False)
    sent, daddrs = _established(e, counters, sample, NOW + 2)
    assert sent == 4096 and daddrs == set(RIPS)

    # The first generation times out, but for the conns the sample just
    # refreshed: a million removals by backward shift.
    old = sample[sample < HALF]
    e.expire(NOW + 1 + EST_TIMEOUT - 0.5, 4 * HALF)
    assert e.conn_count == HALF + len(old)
    e._check()
    assert _established(e, counters, sample, NOW + 3)[0] == len(sample)
    # An ACK of a flow whose conn is gone makes no conn and is not forwarded.
    gone = np.setdiff1d(rng.choice(HALF, 2048, replace=False), old)
    assert _established(e, counters, gone, NOW + 3)[0] == 0
    assert e.conn_count == HALF + len(old)

    # A million new conns take the freed slots: the table does not grow.
    memory = e.memory
    make_conns(e, HALF - len(old), start=2 * HALF, now=NOW + 4)
    assert e.conn_count == 2 * HALF and e.memory == memory
    e._check()
    third = rng.choice(HALF - len(old), 1024, replace=False) + 2 * HALF
    assert _established(e, counters, third, NOW + 5)[0] == 1024
