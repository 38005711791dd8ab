"""bench engine --scenario table-scale: established lookups as the conn table grows.

One C engine per table size (``--sizes``, default 10k, 1M and 10M flows),
each holding that many established NAT conns made by SYN + ACK (not timed),
then the timed loop of ``nat-established`` (bench/engine.py: batches of 256
established client -> VIP frames, reload from pristine headers included)
walking all the flows of its table in a random order, so that every lookup
reads a random index bucket and a random conn of the whole table. Runs of
the sizes interleave (the order rotates each round), so a busy moment of the
shared machine hits every size; each row's figure is the median of its runs.

``copy_ns_per_packet``: the reload alone (its pool of headers is as large
as the table, so it streams from further away as the table grows); the
summary gives the ratio without it as well.

Per size: ``memory`` (the table's own count: slab made usable + index) and
``bytes_per_conn``; ``table_rss`` (what the process's RSS grew by while the
conns were made) and ``rss_per_conn``; ``anon_huge`` (the process's
transparent huge pages after all set-ups: the slab and index ask for them).
The summary has the lookup rate of the largest table over that of the
smallest, as the ratio of medians (wall clock and CPU time) and as the
median of per-round ratios (rounds are neighbours in time).
"""

from __future__ import annotations

import statistics
import time

from .engine import BATCH, Setup, rss_bytes

DEFAULT_SIZES = "10000,1000000,10000000"


def anon_huge_bytes() -> int:
    """The process's anonymous memory in transparent huge pages, bytes."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


def run(sizes: list[int], runs: int, seconds: float) -> tuple[list[dict], list[str]]:
    rows, setups = [], []
    for n in sizes:
        row = {"scenario": "table-scale", "impl": "c", "flows": n, "batch": BATCH,
               "copy_included": True}
        rows.append(row)
        try:
            t0 = time.perf_counter()
            st = Setup("c", n)
            row["setup_s"] = round(time.perf_counter() - t0, 1)
            mem = st.engine.memory
            row.update(memory=mem, bytes_per_conn=round(mem / n, 1), table_rss=st.table_rss,
                       rss_per_conn=round(st.table_rss / n, 1))
            dt, _, _ = st.timed(BATCH * 16)
            # One run: about `seconds`, and at least one frame of every flow
            # (so each run ranges over the whole table).
            per = dt / (BATCH * 16)
            st.packets = int(min(max(seconds / max(per, 1e-9), n, BATCH * 16), 50_000_000))
            row.update(samples=[], cpu_samples=[], copy=[])
            setups.append((st, row))
        except Exception as e:  # report the size and go on with the others
            row.update(pps=None, ns_per_packet=None, error=f"{type(e).__name__}: {e}")
    huge = anon_huge_bytes()
    for r in range(runs):
        k = r % max(len(setups), 1)
        for st, row in setups[k:] + setups[:k]:
            dt, cpu, sent = st.timed(st.packets)
            want = (st.packets // BATCH) * BATCH
            if sent != want:
                row["error"] = f"{sent} of {want} frames left: {st.counters.named()}"
                continue
            row["samples"].append(sent / dt)
            row["cpu_samples"].append(cpu / sent * 1e9)
            row["copy"].append(st.copy_only(st.packets) / want * 1e9)
    for st, row in setups:
        if row.get("samples"):
            med = statistics.median(row["samples"])
            row.update(pps=med, ns_per_packet=1e9 / med, runs=len(row["samples"]), median=med,
                       packets_per_run=(st.packets // BATCH) * BATCH,
                       cpu_ns_per_packet=statistics.median(row["cpu_samples"]),
                       copy_ns_per_packet=statistics.median(row["copy"]))
        row.pop("copy", None)
        row["anon_huge_process"] = huge
    summary = [f"{r['flows']:,} flows: {r['bytes_per_conn']} B/conn (memory "
               f"{r['memory'] / 2**20:.0f} MiB; RSS grew {r['table_rss'] / 2**20:.0f} MiB, "
               f"{r['rss_per_conn']} B/conn)" for r in rows if "memory" in r]
    ok = [r for r in rows if r.get("pps")]
    if len(ok) >= 2:
        small, big = ok[0], ok[-1]
        per_round = [b / a for a, b in zip(small["samples"], big["samples"])]
        cpu_round = [a / b for a, b in zip(small["cpu_samples"], big["cpu_samples"])]
        big["ratio"] = big["pps"] / small["pps"]
        big["ratio_of"] = f"{big['flows']}/{small['flows']} flows"
        big["ratio_per_round_median"] = statistics.median(per_round)
        big["ratio_cpu"] = small["cpu_ns_per_packet"] / big["cpu_ns_per_packet"]
        big["ratio_cpu_per_round_median"] = statistics.median(cpu_round)
        summary.append(
            f"lookup rate at {big['flows']:,} flows / at {small['flows']:,}: "
            f"{big['ratio']:.2f} (wall clock, ratio of medians; per-round median "
            f"{big['ratio_per_round_median']:.2f}); CPU time {big['ratio_cpu']:.2f} "
            f"(per-round median {big['ratio_cpu_per_round_median']:.2f}); target >= 0.5")
        # The reload streams the frames' headers from a pool as large as
        # the table (one row per flow): from L2 at 10k flows, from DRAM at
        # 10M. A NIC's frames arrive in the same ring whatever the table.
        net = [(r["cpu_ns_per_packet"] - r["copy_ns_per_packet"]) for r in (small, big)]
        big["ratio_cpu_without_reload"] = net[0] / net[1]
        summary.append(
            f"without the bench's frame reload ({small['copy_ns_per_packet']:.1f} and "
            f"{big['copy_ns_per_packet']:.1f} ns/packet): CPU time {net[0]:.1f} and "
            f"{net[1]:.1f} ns/packet, ratio {net[0] / net[1]:.2f}")
    summary.append(f"process RSS {rss_bytes() / 2**20:.0f} MiB (frame pools included), "
                   f"{huge / 2**20:.0f} MiB of it in transparent huge pages")
    return rows, summary
