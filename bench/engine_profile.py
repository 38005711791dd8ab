"""The workload of `bench engine --scenario nat-established --impl c`, for a profiler.

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=engine_process \\
        --cache-sim=yes --dump-instr=yes --callgrind-out-file=OUT \\
        .venv/bin/python -m bench.engine_profile [--flows N] [--packets N]
    callgrind_annotate --inclusive=yes OUT

Builds the same engine, conns and frames as bench/engine.py's Setup, then
processes ``--packets`` established frames in batches of 256, reloading
each batch from the pristine pool as the bench does. The set-up's SYN and
ACK batches go through ``engine_process`` too and are collected with the
rest: ``--setup-only`` runs them alone, and the difference of the two runs
is the established frames' cost. With a sampling profiler, skip the set-up
instead: ``--ready PATH`` writes the process id to PATH once the set-up is
done and waits a second before the timed loop, so that a profiler attaches
to the loop alone (on a loaded machine the set-up's length varies too much
for ``perf record -D``)::

    .venv/bin/python -m bench.engine_profile --flows 100000 --packets 30000000 \\
        --ready /tmp/ready &
    while [ ! -s /tmp/ready ]; do sleep 0.2; done
    perf record -e cpu-clock -F 5000 -p "$(cat /tmp/ready)" -o OUT
    perf report -i OUT --no-children --sort srcline --symbols engine_batch -g none

Prints one JSON line: flows, packets processed, set-up frames, set-up and
timed seconds, ns per packet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.engine import BATCH, Setup


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engine_profile")
    ap.add_argument("--flows", type=int, default=20_000)
    ap.add_argument("--packets", type=int, default=BATCH * 200)
    ap.add_argument("--setup-only", action="store_true",
                    help="only create the conns (2 frames per flow), to subtract their cost")
    ap.add_argument("--ready", metavar="PATH",
                    help="write the pid here after the set-up, then wait 1 s")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    st = Setup("c", args.flows)
    setup_s = time.perf_counter() - t0
    if args.ready:
        with open(args.ready, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(1.0)
    sent, dt = 0, 0.0
    if not args.setup_only:
        dt, _, sent = st.timed(args.packets)
    print(json.dumps({"flows": args.flows, "packets": sent, "setup_frames": 2 * args.flows,
                      "setup_s": round(setup_s, 2), "timed_s": round(dt, 2),
                      "ns_per_packet": round(dt / sent * 1e9, 1) if sent else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
