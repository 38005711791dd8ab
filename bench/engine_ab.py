"""Interleaved before/after rounds of `bench engine` (nat-established, impl c) across builds.

    .venv/bin/python -m bench.engine_ab TREE [TREE ...] [--rounds 8] [--flows 100000]
        [--packets 1000000] [--json PATH]

Each TREE is a checkout with its extension built in place (for the code
before a change: ``git worktree add /tmp/old REV`` and ``python setup.py
build_ext --inplace`` there). Every round runs one process per tree, in
alternating order, so a busy moment of a shared machine hits all of them;
each process imports that tree's own ``pylvs`` and ``bench.engine``, makes
its Setup, and keeps the best of three timed runs (wall clock, and the
thread's CPU time, which leaves out the time other tenants held the core),
plus the reload alone. Prints a line per round and the medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# Run inside a tree; works with the bench's older timed() too, which
# returned (seconds, frames) instead of (seconds, cpu seconds, frames).
_CHILD = r"""
import json, sys, time
sys.path.insert(0, ".")
from bench.engine import BATCH, Setup
flows, packets = int(sys.argv[1]), int(sys.argv[2])
st = Setup("c", flows)
st.timed(BATCH * 64)
wall, cpu = [], []
for _ in range(3):
    c0 = time.thread_time()
    r = st.timed(packets)
    c = time.thread_time() - c0
    wall.append(r[0] / r[-1] * 1e9)
    cpu.append(c / r[-1] * 1e9)
c0 = time.thread_time()
st.copy_only(packets)
reload = (time.thread_time() - c0) / ((packets // BATCH) * BATCH) * 1e9
print(json.dumps({"wall": min(wall), "cpu": min(cpu), "reload": reload}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engine_ab")
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    rows = {t: [] for t in args.trees}
    for r in range(args.rounds):
        order = args.trees if r % 2 == 0 else args.trees[::-1]
        for tree in order:
            out = subprocess.run([sys.executable, "-c", _CHILD, str(args.flows),
                                  str(args.packets)], cwd=tree, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{tree}: {out.stderr.strip()[-2000:]}", file=sys.stderr)
                return 1
            rows[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"round {r}: load {os.getloadavg()[0]:.1f}  " + "  ".join(
            f"{os.path.basename(t.rstrip('/'))} {rows[t][-1]['cpu']:.1f}" for t in args.trees),
            flush=True)
    summary = {}
    for tree, runs in rows.items():
        med = {k: statistics.median(x[k] for x in runs) for k in ("wall", "cpu", "reload")}
        cpus = [x["cpu"] for x in runs]
        summary[tree] = dict(med, cpu_min=min(cpus), cpu_max=max(cpus))
        print(f"{tree}: cpu {med['cpu']:.1f} ns/frame ({min(cpus):.1f}-{max(cpus):.1f}), "
              f"wall {med['wall']:.1f}, reload {med['reload']:.1f}")
    first = args.trees[0]
    for tree in args.trees[1:]:
        ratios = [b["cpu"] / a["cpu"] for a, b in zip(rows[first], rows[tree])]
        summary[tree]["cpu_ratio_per_round_median"] = statistics.median(ratios)
        print(f"{tree} / {first}: cpu per-round ratio median {statistics.median(ratios):.2f}, "
              f"lower in {sum(x < 1 for x in ratios)} of {len(ratios)} rounds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "engine_ab", "rounds": rows, "summary": summary,
                       "meta": {"command": " ".join(["python -m bench.engine_ab", *sys.argv[1:]])}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
