"""Workers without namespaces: engines sharing the per-dest conn counts,
counters summed over workers, the engine lock, and the options' checks.
The steering and the sums end to end: tests/netns/test_workers.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import pylvs.engine
from pylvs.control.balancer import Balancer
from pylvs.engine import tables
from pylvs.io import open_workers
from pylvs.runtime import daemon as D

from engine_kit import build_tables, tcp

CONNS = tables.STAT_CONNS


def engines(n: int, schedule=lambda s, a, p: 0):
    cs = tables.CounterSum(16, 32, n)
    es = [pylvs.engine.new_engine("c", 64, counters=part, schedule=schedule) for part in cs.parts]
    for e in es:
        e.set_tables(*build_tables())
    return cs, es


def send(e, frame: bytes, now: float = 0.0) -> int:
    b = tables.Batch(size=4, slot=2048)
    b.append(bytes(tables.VNET_HDR_LEN) + frame, 0)
    e.process(b, now)
    return int(b.verdict[0])


def test_engines_share_dest_conns_and_sum_the_rest():
    cs, (a, b) = engines(2)
    assert send(a, tcp(src="192.0.2.1", flags="S")) == tables.V_TX
    assert send(b, tcp(src="192.0.2.2", flags="S")) == tables.V_TX
    # One array for both: what the scheduler reads is the sum.
    assert cs.parts[0].dest_conns is cs.parts[1].dest_conns is cs.dest_conns
    assert list(cs.dest_conns[0]) == [2, 0]   # half-open conns are active (tcp_state_active_table)
    # Traffic and engine counters: one row per worker, summed when read.
    assert cs.parts[0].svc_stats[0, CONNS] == cs.parts[1].svc_stats[0, CONNS] == 1
    assert cs.svc_stats[0, CONNS] == 2 and cs.dest_stats[0, CONNS] == 2
    assert cs.stat("conns_created") == 2 and cs.named()["rx_frames"] == 2
    # A FIN ends a's handshake: one active, one inactive (TIME_WAIT), one array.
    send(a, tcp(src="192.0.2.1", flags="F"))
    assert list(cs.dest_conns[0]) == [1, 1]
    assert b.expire(1e6, 64) == 1 and list(cs.dest_conns[0]) == [0, 1]
    cs.zero_svc(0)
    cs.zero_dest(0)
    assert not cs.svc_stats[0].any() and not cs.dest_stats[0].any()
    assert not cs.parts[0].svc_stats[0].any() and not cs.parts[1].dest_stats[0].any()


def test_balancer_lists_and_estimates_the_sums():
    cs = tables.CounterSum(16, 32, 2)
    bal = Balancer(cs)
    bal.add_service("tcp", "10.0.0.100", 80)
    bal.add_dest("tcp", "10.0.0.100", 80, "10.0.1.11", 8080, fwd="m")
    svc = bal.snapshot()["services"][0]
    slot, dslot = svc["slot"], svc["dests"][0]["slot"]
    for i, part in enumerate(cs.parts):
        part.svc_stats[slot] = (1, 10 * (i + 1), 5, 1000, 500)
        part.dest_stats[dslot] = (1, 10 * (i + 1), 5, 1000, 500)
    cs.dest_conns[dslot] = (3, 4)
    svc = bal.snapshot()["services"][0]
    assert svc["stats"]["conns"] == 2 and svc["stats"]["inpkts"] == 30
    assert svc["dests"][0]["stats"]["inbytes"] == 2000
    assert (svc["dests"][0]["activeconns"], svc["dests"][0]["inactconns"]) == (3, 4)
    bal.estimate(0.0)
    for part in cs.parts:
        part.svc_stats[slot, 1] += 100
    bal.estimate(2.0)
    assert bal.snapshot()["services"][0]["rates"]["inpps"] == 25   # (200 / 2 s) / 4
    bal.zero()
    assert not cs.svc_stats[slot].any() and not cs.parts[1].dest_stats[dslot].any()
    assert bal.stats()["engine"]["rx_frames"] == 0


def test_control_waits_for_the_engine_lock_during_an_upcall():
    """A worker in its scheduler upcall holds its engine's lock: another
    thread's conns() or set_tables waits for the frame to finish (it used to
    be refused or unsafe), and nothing deadlocks on the GIL."""
    out: dict = {}
    holder: dict = {}

    def control():
        out["conns"] = holder["e"].conns()
        holder["e"].set_tables(*build_tables())
        out["done"] = time.monotonic()

    def schedule(s, a, p):
        t = threading.Thread(target=control)
        holder["t"] = t
        t.start()
        t.join(0.3)   # the GIL is free meanwhile: control runs, and must block
        out["blocked"] = t.is_alive()
        out["returned"] = time.monotonic()
        return 0

    _, (e,) = engines(1, schedule)
    holder["e"] = e
    assert send(e, tcp(src="192.0.2.9")) == tables.V_TX
    holder["t"].join(5)
    assert out["blocked"] and out["done"] >= out["returned"]
    assert [c[1] for c in out["conns"]] == [int.from_bytes(bytes([192, 0, 2, 9]), "big")]


def test_worker_options_are_checked():
    with pytest.raises(ValueError):
        open_workers("afpacket", ["eth0"], 0)
    with pytest.raises(ValueError):
        open_workers("carrier-pigeon", ["eth0"], 2)
    with pytest.raises(SystemExit, match="C engine"):
        D.Daemon(D.Options(ifaces=["a"], engine="python", workers=2), backend=[object()] * 2)
    with pytest.raises(SystemExit, match="2 workers"):
        D.Daemon(D.Options(ifaces=["a"], workers=2), backend=object())
    with pytest.raises(ValueError):
        tables.CounterSum(4, 4, 0)
    with pytest.raises(ValueError):
        tables.Counters(4, 4, dest_conns=np.zeros((3, 2), np.int32))


def test_cli_workers_option(capsys):
    with pytest.raises(SystemExit):
        D.main(["--workers", "0"])
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        D.main(["--engine", "python", "--workers", "2"])
    assert "needs --engine c" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        D.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--workers N" in text and "split evenly among the --workers" in text
