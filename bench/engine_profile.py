"""The workload of `bench engine --scenario nat-established --impl c`, for a profiler.

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=engine_process \\
        --cache-sim=yes --dump-instr=yes --callgrind-out-file=OUT \\
        .venv/bin/python -m bench.engine_profile [--flows N] [--packets N]
    callgrind_annotate --inclusive=yes OUT

Builds the same engine, conns and frames as bench/engine.py's Setup, then
processes ``--packets`` established
frames in batches of 256, reloading each batch from the pristine pool as
the bench does. Prints one JSON line: flows, packets processed, set-up
frames.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench.engine import BATCH, Setup


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engine_profile")
    ap.add_argument("--flows", type=int, default=20_000)
    ap.add_argument("--packets", type=int, default=BATCH * 200)
    ap.add_argument("--setup-only", action="store_true",
                    help="only create the conns (2 frames per flow), to subtract their cost")
    args = ap.parse_args(argv)
    st = Setup("c", args.flows)
    sent = 0
    if not args.setup_only:
        _, sent = st.timed(args.packets)
    print(json.dumps({"flows": args.flows, "packets": sent, "setup_frames": 2 * args.flows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
