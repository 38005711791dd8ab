"""bench latency: the round trip a VS-NAT director adds, at a fixed moderate rate.

The VS-NAT lab of pylvs/lab/topology.py: bench/peers.c ``udp-ping`` in the
client namespace (pinned to CPU 0) sends ``--rate`` 32-byte UDP datagrams
a second for ``--seconds``, each from the next of ``--flows`` sockets (so
the director schedules ``--flows`` flows over its three dests, then meets
them established), and waits for each answer before the next (ping-pong,
at most one datagram in flight). The real servers run ``udp-echo`` on port
7. Round-trip time per datagram with CLOCK_MONOTONIC; percentiles p50, p90,
p99, p99.9 per round; the row's figure is the median over the rounds.

Impls (bench/netbench.py): ``pylvs`` (wlc, three Masq dests, pinned to
the last core), ``kernel-nft`` (conntrack DNAT), ``direct`` (the client on
the servers' bridge, to rs1: no director). ``added_us`` = the impl's
percentile less direct's: what the director adds (its own veth hop and
the bridge crossing it needs included). ``achieved_rate``: datagrams per
second actually sent; ping-pong cannot go faster than one per round trip,
so an impl whose round trip exceeds 1/rate runs slower than asked.
"""

from __future__ import annotations

import argparse
import json

from . import netbench

PORT = 7
IMPLS = ("pylvs", "kernel-nft", "direct")
PCTS = ("p50_us", "p90_us", "p99_us", "p99_9_us")


def run(argv: list[str], runs: int | None = None, quick: bool = False) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench latency")
    ap.add_argument("--rate", type=float, default=2000, help="datagrams per second")
    ap.add_argument("--seconds", type=float, default=2 if quick else 10)
    ap.add_argument("--flows", type=int, default=64)
    ap.add_argument("--impl", action="append", choices=IMPLS)
    args = ap.parse_args(argv)
    runs = runs or (1 if quick else 3)
    impls = args.impl or list(IMPLS)

    def setup(ctx: netbench.NatLab) -> None:
        for ns in ctx.lab.rs:
            netbench.start_ready(ctx.lab, ns, [str(ctx.exe), "udp-echo", str(PORT)],
                                 key=f"echo-{ns}")

    def one(ctx: netbench.NatLab, r: int, impl: str) -> dict:
        host = ctx.direct_host if impl == "direct" else ctx.lab.vip
        p = ctx.lab.run(ctx.lab.client, ["taskset", "-c", ctx.client_cpu, str(ctx.exe),
                                         "udp-ping", host, str(PORT), str(args.rate),
                                         str(args.seconds), str(args.flows)],
                        timeout=args.seconds * 3 + 30)
        res = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"round {r + 1}/{runs} {impl:<10} " + "  ".join(
            f"{k[:-3]} {res[k]:.1f} us" for k in PCTS) + f"  lost {res['lost']}  "
            f"{res['sent'] / res['elapsed_s']:.0f}/s achieved", flush=True)
        return res

    samples, errors, meta = netbench.nat_lab_rounds("pllat", impls, runs, "udp", PORT, setup,
                                                    one)

    rows = {}
    for impl in impls:
        got = samples.get(impl, [])
        row = {"scenario": f"udp-pingpong-{args.rate:.0f}pps", "impl": impl, "runs": len(got),
               "rate": args.rate, "seconds": args.seconds, "flows": args.flows,
               "pps": None, "ns_per_packet": None, "rounds": got,
               **{k: netbench.median_of(got, k) for k in (*PCTS, "mean_us", "max_us")},
               "lost": sum(s["lost"] for s in got),
               "achieved_rate": netbench.median_of(
                   [{"r": s["sent"] / s["elapsed_s"]} for s in got if s.get("elapsed_s")], "r")}
        if impl in errors:
            row["error"] = errors[impl]
        rows[impl] = row
    summary = []
    base = rows.get("direct", {})
    for impl, row in rows.items():
        if impl != "direct" and base.get("p50_us") and row.get("p50_us"):
            row["added_us"] = {k: row[k] - base[k] for k in PCTS}
            summary.append(f"{impl} adds " + ", ".join(
                f"{k[:-3]} {v:+.1f} us" for k, v in row["added_us"].items()) + " over direct")
    for impl, row in rows.items():
        if row.get("p50_us"):
            summary.append(f"{impl}: " + ", ".join(f"{k[:-3]} {row[k]:.1f} us" for k in PCTS)
                           + f" (median of {row['runs']} rounds), lost {row['lost']}")
    return {"results": list(rows.values()), "summary": summary,
            "meta": {**meta, "client": f"bench/peers.c udp-ping, cpu {netbench.cores()[0]}",
                     "server": "bench/peers.c udp-echo in rs1..rs3 (direct: rs1 only)"}}


def plot(doc: dict, png) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r.get("p50_us")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(PCTS))]
        ax.bar(xs, [r[k] for k in PCTS], width, color=f"C{i}", label=r["impl"])
        for k, x in enumerate(xs):
            ax.scatter([x] * len(r["rounds"]), [s[PCTS[k]] for s in r["rounds"]], color="k",
                       s=8, zorder=3)
    ax.set_xticks(range(len(PCTS)))
    ax.set_xticklabels([k[:-3].replace("_", ".") for k in PCTS])
    ax.set_ylabel("UDP round trip, µs (median of rounds; dots: rounds)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"pylvs bench latency ({doc.get('meta', {}).get('when', '')})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
