"""The upcall limit and pressure_conn_rate (docs/engine.md, "Upcall
limit"), on both engines.

While a backend says its receive ring is backed up (``engine.pressure``),
new flows may spend only ``upcall_share`` percent of the time in the Python
scheduler, each upcall taking ``upcall_cost`` seconds (control measures
it); the rest are dropped and counted (``drop_upcall_limit``), so the
frames of established conns waiting behind them are still forwarded.
"""

from __future__ import annotations

import pytest

from engine_kit import CLIENT_PORT, IMPLS, Env, _sched_fixed, tcp, udp, v
from pylvs.engine import tables

TX, DROP = tables.V_TX, tables.V_DROP
COST = 0.002  # seconds one upcall takes (engine.upcall_cost)
WINDOW = 0.01  # the bucket holds this much `now` at the share (ip_vs.h UPCALL_WINDOW)


class Sched:
    def __init__(self):
        self.calls = 0

    def __call__(self, svc, caddr, cport):
        self.calls += 1
        return _sched_fixed(svc, caddr, cport)


def make(impl: str, share: int | None = None, rate: int = 0) -> tuple[Env, Sched]:
    """An engine whose new flows go to Python; ``rate``: pressure_conn_rate
    (0, the default here: off, the upcall limit alone)."""
    sched = Sched()
    env = Env(impl, capacity=256, schedule=sched)
    env.engine.upcall_cost = COST
    vals = tables.default_sysctls()
    if share is not None:
        vals[tables.SYSCTL_INDEX["upcall_share"]] = share
    vals[tables.SYSCTL_INDEX["pressure_conn_rate"]] = rate
    env.engine.set_sysctls(vals)
    return env, sched


def syns(first: int, n: int) -> list:
    return [(v(tcp(flags="S", sport=first + i)), CLIENT_PORT) for i in range(n)]


def established(env: Env) -> bytes:
    """A UDP conn made before the flood (no pressure): its next datagram is
    the established frame that must get through."""
    assert env.send(v(udp(sport=4000)), CLIENT_PORT, 0.0)[0] == TX
    return v(udp(sport=4000))


@pytest.mark.parametrize("impl", IMPLS)
def test_under_pressure_new_flows_get_the_share_established_flow_goes_on(impl):
    env, sched = make(impl)  # the default share: 50%
    est = established(env)
    env.engine.pressure = True
    assert env.engine.pressure is True
    calls = sched.calls
    _, rows = env.send_many(syns(5000, 20) + [(est, CLIENT_PORT)], now=1.0)
    # 50% of 10 ms is 5 ms of upcalls; each takes 2 ms and may start while
    # any time is left: 3 (5 -> 3 -> 1 -> -1).
    allowed = sched.calls - calls
    assert allowed == 3
    verdicts = [r[0] for r in rows]
    assert verdicts[:allowed] == [TX] * allowed
    assert verdicts[allowed:20] == [DROP] * (20 - allowed)
    assert verdicts[20] == TX, "the established conn's frame is forwarded"
    st = env.stats()
    assert st["drop_upcall_limit"] == 20 - allowed
    assert st["conns_created"] == 1 + allowed
    # 0.1 s later the bucket is full again (its cap, not 50 ms): 3 again.
    calls = sched.calls
    env.send_many(syns(6000, 20), now=1.1)
    assert sched.calls - calls == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_without_pressure_every_new_flow_is_scheduled(impl):
    env, sched = make(impl)
    _, rows = env.send_many(syns(5000, 12), now=1.0)
    assert sched.calls == 12 and [r[0] for r in rows] == [TX] * 12
    assert "drop_upcall_limit" not in env.stats()


@pytest.mark.parametrize("impl", IMPLS)
def test_share_100_is_no_limit_and_0_refuses_every_upcall(impl):
    env, sched = make(impl, share=100)
    env.engine.pressure = True
    env.send_many(syns(5000, 12), now=1.0)
    assert sched.calls == 12
    env, sched = make(impl, share=0)
    env.engine.pressure = True
    _, rows = env.send_many(syns(5000, 5), now=1.0)
    assert sched.calls == 0 and [r[0] for r in rows] == [DROP] * 5
    assert env.stats()["drop_upcall_limit"] == 5


@pytest.mark.parametrize("impl", IMPLS)
def test_refill_follows_now_at_the_share(impl):
    """After the burst (5 ms -> -1 ms), `now` advancing by 4 ms at 50%
    gives 2 ms back: one more upcall (1 ms left -> -1 ms), then none until
    `now` moves again; a long pause refills only up to the cap."""
    env, sched = make(impl)
    env.engine.pressure = True
    env.send_many(syns(5000, 10), now=1.0)
    assert sched.calls == 3
    env.send_many(syns(6000, 10), now=1.0)   # same now: nothing refilled
    assert sched.calls == 3
    env.send_many(syns(7000, 10), now=1.004)
    assert sched.calls == 4
    env.send_many(syns(8000, 10), now=1.0 + 100 * WINDOW)
    assert sched.calls == 7


@pytest.mark.parametrize("impl", IMPLS)
def test_unknown_cost_is_no_limit_and_bad_costs_are_refused(impl):
    env, sched = make(impl)
    env.engine.upcall_cost = 0.0
    env.engine.pressure = True
    env.send_many(syns(5000, 12), now=1.0)
    assert sched.calls == 12
    for bad in (-1e-6, 2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="upcall_cost"):
            env.engine.upcall_cost = bad
    assert env.engine.upcall_cost == 0.0


def test_upcall_share_is_a_checked_sysctl():
    from pylvs.control.balancer import Balancer, BalancerError
    b = Balancer(tables.Counters(1, 1))
    assert b.sysctl("upcall_share") == {"upcall_share": 50}
    assert b.sysctl("upcall_share", 20) == {"upcall_share": 20}
    with pytest.raises(BalancerError, match=r"out of range \(0..100\)"):
        b.sysctl("upcall_share", 101)


# --- pressure_conn_rate: every new conn waits while the ring backs up ------

RATE = 1000   # the default: conns a second, a burst of 10 ms's worth (10)


@pytest.mark.parametrize("impl", IMPLS)
def test_under_pressure_new_conns_pass_at_the_rate_established_frames_all(impl):
    env, sched = make(impl, share=100, rate=RATE)
    est = established(env)
    env.engine.pressure = True
    _, rows = env.send_many(syns(5000, 20) + [(est, CLIENT_PORT)], now=1.0)
    assert [r[0] for r in rows] == [TX] * 10 + [DROP] * 10 + [TX]
    st = env.stats()
    assert st["drop_pressure"] == 10 and "drop_upcall_limit" not in st
    assert sched.calls == 1 + 10, "a refused SYN costs no scheduler call"
    # 5.5 ms of `now` give 5 conns back; the same `now` none.
    _, rows = env.send_many(syns(6000, 8), now=1.0055)
    assert [r[0] for r in rows] == [TX] * 5 + [DROP] * 3
    _, rows = env.send_many(syns(7000, 3), now=1.0055)
    assert [r[0] for r in rows] == [DROP] * 3


@pytest.mark.parametrize("impl", IMPLS)
def test_pressure_conn_rate_0_is_off_and_without_pressure_all_pass(impl):
    env, sched = make(impl, share=100, rate=0)
    env.engine.pressure = True
    _, rows = env.send_many(syns(5000, 30), now=1.0)
    assert [r[0] for r in rows] == [TX] * 30
    env, sched = make(impl, share=100, rate=1)
    env.engine.pressure = True
    _, rows = env.send_many(syns(5000, 4), now=1.0)
    assert [r[0] for r in rows] == [TX] + [DROP] * 3, "a burst of at least one"
    env.engine.pressure = False
    _, rows = env.send_many(syns(6000, 30), now=1.0)
    assert [r[0] for r in rows] == [TX] * 30


@pytest.mark.parametrize("impl", IMPLS)
def test_pressure_conn_rate_comes_before_the_upcall_limit(impl):
    """A conn the rate turns away never draws on the upcall bucket: of 20
    SYNs, 10 pass the rate and 3 of those get the upcall time (5 ms at
    2 ms each)."""
    env, sched = make(impl, rate=RATE)
    env.engine.pressure = True
    env.send_many(syns(5000, 20), now=1.0)
    st = env.stats()
    assert (st["drop_pressure"], st["drop_upcall_limit"], sched.calls) == (10, 7, 3)


def test_pressure_conn_rate_is_a_checked_sysctl():
    from pylvs.control.balancer import Balancer, BalancerError

    b = Balancer(tables.Counters(1, 1))
    assert b.sysctl("pressure_conn_rate") == {"pressure_conn_rate": RATE}
    assert b.sysctl("pressure_conn_rate", 0) == {"pressure_conn_rate": 0}
    with pytest.raises(BalancerError, match="out of range"):
        b.sysctl("pressure_conn_rate", -1)
