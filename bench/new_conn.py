"""bench engine --scenario new-conn: a SYN per new flow through the C engine, per scheduler.

One TCP service VIP:80 made through ``pylvs.control.balancer.Balancer``
(``-s SCHED``) with eight Masq dests of weights 1..4 (twice), resolved at
once; the C engine's tables and scheduler upcall are the Balancer's, as in
``pylvs run``. Every timed frame is the SYN of a flow the table does not
hold, so each one takes the miss path: the scheduler's choice, a new conn
(SYN_RECV), its index entries, the dest's counters, the NAT rewrite.

impl ``python``: the Balancer's scheduler upcall (``Balancer.schedule``,
Python, per new conn). impl ``c``: the same Balancer with ``c_sched`` set
(the schedulers of pylvs/_fast/ip_vs_sched.c; a scheduler without a C body
still calls up). Where ``Balancer.c_sched`` does not exist the impl c rows
say so and carry no figure.

Each run sends the SYNs of the same ``m`` flows (reloaded from pristine
headers, the reload timed, as nat-established) into a table that holds none
of them: before each run, not timed, the clock moves 1000 s on and
``expire`` empties the table (the conns of the last run, whose dests'
counts drop back to 0, so lc/wlc/... start every run alike). ``m`` is
calibrated so one run of each (scheduler, impl) lasts about ``--seconds``.
Runs of every case interleave, the order rotating each round; a row's
figure is the median of its runs, in new conns per second.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from pylvs.control.balancer import Balancer
from pylvs.engine import new_engine, tables
from pylvs import sched as schedmod

from .engine import BATCH, NOW, SMAC
from .flowgen import VIP, VPORT, FrameMaker, flow_tuples

DESTS = 8
MAX_FLOWS = 1 << 21  # flows per run at most (the pool's rows)


class _Resolver:
    """Every dest on port 1 behind its own MAC."""

    def resolve(self, daddr: int):
        return 1, bytes([2, 0, 0, 0, 1, daddr & 0xFF]), SMAC


def sched_names() -> list[str]:
    """Every -s name this tree has (pylvs.sched's registry)."""
    return schedmod.names()


class Case:
    """A Balancer with one service of scheduler `sched`, and its C engine."""

    def __init__(self, sched: str, impl: str, pool: np.ndarray, sample: np.ndarray):
        self.sched, self.impl = sched, impl
        self.counters = tables.Counters()
        self.engine = None
        b = Balancer(self.counters, resolver=_Resolver(), publish=self._publish)
        self.balancer = b
        self.engine = new_engine("c", capacity=MAX_FLOWS, counters=self.counters,
                                 schedule=b.schedule)
        if hasattr(b, "c_sched"):
            # Wired as pylvs run wires it (runtime/daemon.py): the scheduler
            # tables go to the engine's set_sched.
            b.publish_sched = lambda *t: self.engine.set_sched(*t)
            b.c_sched = impl == "c"
        elif impl == "c":
            raise RuntimeError("Balancer.c_sched is not on this branch (the C "
                               "schedulers): no impl c")
        b.add_service("tcp", VIP, VPORT, sched=sched)
        for i in range(DESTS):
            b.add_dest("tcp", VIP, VPORT, 0x0A000100 + 11 + i, 80, fwd="masq",
                       weight=1 + i % 4)
        b.republish()
        self.pool, self.sample = pool, sample
        self.batch = tables.Batch(BATCH, 2048)
        self.now = NOW
        self.m = 0

    def _publish(self, services, dests) -> None:
        self._tables = (services, dests)
        if self.engine is not None:
            self.engine.set_tables(services, dests)

    def timed(self, m: int) -> tuple[float, float, int]:
        """SYNs of flows 0..m-1 (m a multiple of BATCH) into an empty table:
        (wall seconds, CPU seconds, conns made)."""
        e, b = self.engine, self.batch
        if e.conn_count:
            self.now += 1000.0
            e.expire(self.now, 1 << 30)
            if e.conn_count:
                raise RuntimeError(f"{e.conn_count} conns left after expiry")
        head = self.pool.shape[1]
        b.buf[:, :len(self.sample)] = self.sample
        b.length[:] = len(self.sample)
        b.in_port[:] = 0
        b.count = BATCH
        srcs = [self.pool[k:k + BATCH] for k in range(0, m, BATCH)]
        heads = b.buf[:, :head]
        copyto, now = np.copyto, self.now
        c0 = time.thread_time()
        t0 = time.perf_counter()
        for src in srcs:
            copyto(heads, src)
            e.process(b, now)
        dt = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        return dt, cpu, e.conn_count


def run(scheds: list[str], impls: list[str], runs: int,
        seconds: float) -> tuple[list[dict], list[str]]:
    syn = FrameMaker(0x02)
    pool = np.empty((MAX_FLOWS, syn.length), dtype=np.uint8)
    syn.fill(pool, *flow_tuples(np.arange(MAX_FLOWS)))
    rows, cases = [], []
    for sched in scheds:
        for impl in impls:
            row = {"scenario": f"new-conn-{sched}", "impl": impl, "sched": sched,
                   "batch": BATCH, "dests": DESTS, "copy_included": True}
            rows.append(row)
            try:
                case = Case(sched, impl, pool, syn.template)
                dt, _, made = case.timed(BATCH * 32)
                if made != BATCH * 32:
                    raise RuntimeError(f"{made} conns from {BATCH * 32} SYNs: "
                                       f"{case.counters.named()}")
                m = int(seconds / max(dt / made, 1e-9)) // BATCH * BATCH
                case.m = min(max(m, BATCH * 32), MAX_FLOWS)
                row.update(samples=[], cpu_samples=[], flows_per_run=case.m)
                cases.append((case, row))
            except Exception as e:  # report and go on with the other cases
                row.update(pps=None, ns_per_packet=None, error=f"{type(e).__name__}: {e}")
    for r in range(runs):
        k = r % max(len(cases), 1)
        for case, row in cases[k:] + cases[:k]:
            if "error" in row:
                continue
            try:
                dt, cpu, made = case.timed(case.m)
                if made != case.m:
                    raise RuntimeError(f"{made} conns from {case.m} SYNs: "
                                       f"{case.counters.named()}")
                row["samples"].append(made / dt)
                row["cpu_samples"].append(cpu / made * 1e9)
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {e}")
    for case, row in cases:
        if row.get("samples") and "error" not in row:
            med = statistics.median(row["samples"])
            row.update(pps=med, ns_per_packet=1e9 / med, runs=len(row["samples"]),
                       median=med, cpu_ns_per_packet=statistics.median(row["cpu_samples"]),
                       conns_per_dest=case.counters.dest_conns[:DESTS].sum(axis=1).tolist())
        elif "error" not in row:
            row.update(pps=None, ns_per_packet=None)
    summary = []
    by = {(r["sched"], r["impl"]): r for r in rows}
    for sched in scheds:
        c, py = by.get((sched, "c")), by.get((sched, "python"))
        if c and py and c.get("pps") and py.get("pps"):
            per = [a / b for a, b in zip(c["samples"], py["samples"])]
            c["ratio"], c["ratio_of"] = c["pps"] / py["pps"], "c/python"
            c["ratio_per_run_median"] = statistics.median(per)
            summary.append(f"{sched}: c {c['pps'] / 1e3:.0f} k/s, python "
                           f"{py['pps'] / 1e3:.0f} k/s new conns: c/python = "
                           f"{c['ratio']:.1f}x (per-run median {statistics.median(per):.1f}x)")
        elif py and py.get("pps"):
            summary.append(f"{sched}: python {py['pps'] / 1e3:.0f} k/s new conns"
                           + (f"; c: {c['error']}" if c and c.get("error") else ""))
    return rows, summary
