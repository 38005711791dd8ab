"""Health checks: the time from a real server's death to its removal, and
from its return to its reinstatement (issue 9 item 8).

    .venv/bin/python -m bench.health [--runs 5] [--workers 1] [--quick] [--json PATH]

One VS-NAT lab (pylvs.lab.health: `pylvs run -c keepalived.conf`, rs1,
rs2 HTTP_GET-checked on /health, rs3 the sorry server), for each timing configuration: ``--runs`` times,
rs1's HTTP server is killed (SIGTERM; the kernel then refuses its port)
at another point of the probe cycle in each run (0, 1/runs, 2/runs ...
of delay_loop after a probe), and the director's table is read every
10 ms over its control socket until rs1 no longer forwards; then rs1's server is started again and the
time from its "ready" to its reinstatement is taken the same way.

What to expect (keepalived's rules, pylvs/health/manager.py): a refused
connect fails at once, so removal takes the wait for the next probe
(uniform in 0..delay_loop) plus ``retry`` retries ``delay_before_retry``
apart; the bound is delay_loop + retry * (delay_before_retry +
connect_timeout) + connect_timeout (a server that stops answering
without refusing, e.g. a host gone, needs the timeouts). Reinstatement
waits for the next probe: at most delay_loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

# (name, delay_loop, connect_timeout, retry, delay_before_retry)
CONFIGS = [
    ("delay_loop 1 retry 0", 1.0, 1.0, 0, 1.0),
    ("delay_loop 1 retry 1 delay_before_retry 0.5", 1.0, 1.0, 1, 0.5),
    ("delay_loop 2 retry 2 delay_before_retry 0.5", 2.0, 1.0, 2, 0.5),
]


def _summary(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs),
            "samples": [round(x, 3) for x in xs]}


def run(workers: int = 1, runs: int | None = None, quick: bool = False) -> dict:
    from pylvs.lab import health
    from pylvs.lab.topology import Lab

    runs = runs or (2 if quick else 5)
    configs = CONFIGS[:1] if quick else CONFIGS
    results = []
    lab = Lab(f"hb{uuid.uuid4().hex[:5]}", servers=3)
    control = f"/run/pylvs/{lab.name}.sock"
    try:
        lab.up()
        for name, d, t, r, b in configs:
            health.start_director(lab, "--control", control, "--workers", str(workers),
                                  timings=(d, t, r, b))
            bound = d + r * (b + t) + t
            gone, back = [], []
            for k in range(runs):
                if health.wait_for(lab, lambda f: lab.rips[0] in f, 10, 0.01, control) is None:
                    raise RuntimeError("rs1 is not forwarding at the start of a run")
                # rs1 was just reinstated by a probe: its death falls at
                # another point of the probe cycle in every run.
                time.sleep(d * k / runs)
                took = health.removal_time(lab, 0, bound + 10, control, 0.01)
                if took is None:
                    raise RuntimeError(f"{name}: rs1 not removed within {bound + 10:.1f} s")
                gone.append(took)
                took = health.return_time(lab, 0, d + t + 10, control, 0.01)
                if took is None:
                    raise RuntimeError(f"{name}: rs1 not back within {d + t + 10:.1f} s")
                back.append(took)
            results.append({"scenario": name, "impl": "pylvs", "delay_loop": d,
                            "connect_timeout": t, "retry": r, "delay_before_retry": b,
                            "bound_s": bound, "removal_s": _summary(gone),
                            "return_s": _summary(back), "runs": runs})
            lab.stop_director()
    finally:
        lab.stop_director()
        lab.down()
    return {"results": results, "meta": {"workers": workers}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.health",
        description="Time from a real server's death to its removal, and from its return "
                    "to its reinstatement, in a VS-NAT lab (as root; about a minute).")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--runs", type=int, help="deaths per timing configuration (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="the first configuration only, 2 runs (a smoke test)")
    ap.add_argument("--workers", type=int, default=1, help="the director's data-path workers")
    a = ap.parse_args(argv)
    doc = {"bench": "health", **run(a.workers, a.runs, a.quick)}
    doc["meta"].update({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "command": "python -m bench.health " + " ".join(
                            argv if argv is not None else sys.argv[1:])})
    print(f"{'configuration':<46} {'removal s (min/med/max)':>24} {'bound s':>8} "
          f"{'return s (med/max)':>19}")
    for r in doc["results"]:
        g, b = r["removal_s"], r["return_s"]
        print(f"{r['scenario']:<46} {g['min']:>7.2f} {g['median']:>7.2f} {g['max']:>7.2f}  "
              f"{r['bound_s']:>8.2f} {b['median']:>9.2f} {b['max']:>8.2f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
