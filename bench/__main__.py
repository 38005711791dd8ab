"""python -m bench NAME [--json PATH] [options]

Runs one benchmark, prints a table and, with --json, writes
``{"bench": NAME, "results": [{"scenario", "impl", "pps", "ns_per_packet", ...}]}``
and a PNG plot next to it (same name, .png).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

BENCHES = ("engine", "e2e", "conn-rate", "latency", "throughput", "sync")
MODULES = {"sync": "sync_traffic"}


def main(argv: list[str] | None = None) -> int:
    # --help is handled here, not by argparse: with a NAME it belongs to
    # that benchmark's parser, which alone knows its options.
    ap = argparse.ArgumentParser(prog="python -m bench", add_help=False,
                                 epilog="python -m bench NAME --help lists NAME's own options.")
    ap.add_argument("-h", "--help", action="store_true",
                    help="show this help, or with NAME that benchmark's, and exit")
    ap.add_argument("name", nargs="?", choices=BENCHES)
    ap.add_argument("--json", type=Path, help="write results here (and a .png plot beside it)")
    ap.add_argument("--runs", type=int, default=None, help="repetitions (median is quoted)")
    ap.add_argument("--quick", action="store_true", help="short runs, for smoke tests")
    args, rest = ap.parse_known_args(argv)
    if args.name is None:
        if args.help:
            ap.print_help()
            return 0
        ap.error("the following arguments are required: name")
    if args.help:
        rest = ["--help", *rest]

    mod = importlib.import_module(f"bench.{MODULES.get(args.name, args.name.replace('-', '_'))}")
    doc = mod.run(rest, runs=args.runs, quick=args.quick)
    doc = {"bench": args.name, **doc}
    doc.setdefault("meta", {}).update({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    })
    print_table(doc)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        png = args.json.with_suffix(".png")
        try:
            getattr(mod, "plot", plot)(doc, png)
            print(f"wrote {args.json} and {png}")
        except ImportError:
            print(f"wrote {args.json} (matplotlib missing: no plot)")
    return 0 if all("error" not in r for r in doc["results"]) else 1


def _fmt_pps(v) -> str:
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{v:.0f}"


def print_table(doc: dict) -> None:
    rows = doc["results"]
    print(f"\nbench {doc['bench']}")
    print(f"{'scenario':<26} {'impl':<14} {'pps (median)':>14} {'ns/packet':>10} {'runs':>5}  notes")
    for r in rows:
        ns = r.get("ns_per_packet")
        notes = []
        if "ratios" in r:
            notes += [f"{k} = {v:.2f}" for k, v in r["ratios"].items()]
        elif "ratio" in r:
            notes.append(f"ratio {r['ratio_of']} = {r['ratio']:.2f}")
        if r.get("gbps"):
            notes.append(f"{r['gbps']:.2f} Gbit/s")
        if r.get("p50_us"):
            notes.append(f"rtt p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
                         f"p99.9 {r['p99_9_us']:.0f} us")
        if "error" in r:
            notes.append(f"error: {r['error']}")
        print(f"{r['scenario']:<26} {r['impl']:<14} {_fmt_pps(r.get('pps')):>14} "
              f"{'-' if ns is None else f'{ns:.0f}':>10} {r.get('runs', '-'):>5}  {'; '.join(notes)}")
    for line in doc.get("summary", []):
        print(line)


def plot(doc: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r.get("pps")]
    fig, ax = plt.subplots(figsize=(max(7, min(1.9, 16 / max(len(rows), 1) + 0.5) * len(rows)),
                                    4.5))
    # "udp64-1000flows-overload+rps" -> "udp64-overload+rps": labels that fit a bar.
    labels = ["{}\n{}".format(r["scenario"].replace(f"-{r.get('flows')}flows", ""), r["impl"])
              for r in rows]
    med = [r["pps"] for r in rows]
    impls = list(dict.fromkeys(r["impl"] for r in rows))  # one colour per impl
    ax.bar(range(len(rows)), med, color=[f"C{impls.index(r['impl']) % 10}" for r in rows])
    seen: set[str] = set()
    for i, r in enumerate(rows):
        samples = r.get("samples") or []
        ax.scatter([i] * len(samples), samples, color="k", s=8, zorder=3)
        if r.get("offered_pps"):
            ax.scatter([i], [r["offered_pps"]], marker="_", s=900, color="r", zorder=4,
                       label="offered (generator)" if "offered" not in seen else None)
            seen.add("offered")
        if r.get("capacity_pps"):
            ax.scatter([i], [r["capacity_pps"]], marker="_", s=900, color="b", zorder=4,
                       label="capacity (same rounds)" if "capacity" not in seen else None)
            seen.add("capacity")
        if r.get("est_alone_pps"):
            ax.scatter([i], [r["est_alone_pps"]], marker="_", s=900, color="g", zorder=4,
                       label="established flows without the flood"
                       if "alone" not in seen else None)
            seen.add("alone")
    if any(r.get("offered_pps") for r in rows):
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8, rotation=60 if len(rows) > 12 else 0,
                       ha="right" if len(rows) > 12 else "center")
    ax.set_ylabel("packets per second (median; dots: runs)")
    if rows and max(med) / max(min(med), 1) > 30:
        ax.set_yscale("log")
    ax.set_title(f"pylvs bench {doc['bench']} ({doc.get('meta', {}).get('when', '')})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
