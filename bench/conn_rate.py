"""bench conn-rate: new TCP connections per second through a VS-NAT director.

The VS-NAT lab of pylvs/lab/topology.py: the client namespace runs wrk
(Debian's), one thread pinned to CPU 0, ``--conns`` concurrent connections
(32 and 256 by default, one scenario each, both in every round), each
request carrying ``Connection: close``: wrk reconnects after every
response (its response_complete path closes and reopens when the response
does not keep the connection alive), so every request is a new TCP
connection, handshake to FIN. The real servers run bench/peers.c
``tcp-server`` on port 80 (epoll, answers a 2-byte body with
``Connection: close`` and closes first, so the TIME_WAIT sockets sit on the
servers, as with nginx behind a load balancer).

Impls (bench/netbench.py): ``pylvs`` (wlc, three Masq dests), ``kernel-nft``
(conntrack DNAT, numgen round robin), ``haproxy`` (mode tcp, roundrobin:
two TCP connections per client connection, the proxy's own core),
``direct`` (the client on the servers' bridge, all connections to rs1).
Directors pinned to the last core. Each impl is started afresh every round
(an empty conn table for pylvs); conntrack entries of earlier kernel-nft
rounds stay in the director namespace (about 120 s of TIME_WAIT each).

Per round: wrk's completed requests per second (= connections per
second), its socket errors, and the servers' accept counters sampled every
second (``per_second``: the sum over the servers, interpolated to whole
seconds of the round): a rate that falls as a table fills shows there.
``sustained`` = the median of the last third of ``per_second`` over the
median of its first third. ``cpu_busy``: the CPU use (fraction of one
core) of `pylvs run` or HAProxy over the round, which says whether the
director's core is the limit.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import threading
import time

from . import netbench

PORT = 80
DEFAULT_IMPLS = ("pylvs", "kernel-nft", "haproxy", "direct")
IMPLS = (*DEFAULT_IMPLS, "pylvs-nolimit")   # --sysctl upcall_share=100: the limit's A/B


class AcceptLog:
    """The (monotonic time, accepted total) lines of one tcp-server, as they come."""

    def __init__(self, proc):
        self.points: list[tuple[float, int]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            try:
                self.points.append((time.monotonic(), json.loads(line)["accepted"]))
            except (ValueError, KeyError):
                continue

    def at(self, t: float) -> float:
        """The accepted total at time t, interpolated between samples."""
        pts = self.points
        if not pts:
            return 0.0
        for (t0, a0), (t1, a1) in zip(pts, pts[1:]):
            if t0 <= t <= t1:
                return a0 + (a1 - a0) * (t - t0) / (t1 - t0)
        return float(pts[-1][1] if t > pts[-1][0] else pts[0][1])


def parse_wrk(out: str) -> dict:
    """wrk's summary: requests, requests per second, socket errors, non-2xx."""
    res: dict = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                    map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def run(argv: list[str], runs: int | None = None, quick: bool = False) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench conn-rate")
    ap.add_argument("--seconds", type=int, default=3 if quick else 20)
    ap.add_argument("--conns", default="32,256",
                    help="wrk's concurrent connections, comma separated: one scenario each")
    ap.add_argument("--impl", action="append", choices=IMPLS)
    args = ap.parse_args(argv)
    runs = runs or (1 if quick else 3)
    impls = args.impl or list(DEFAULT_IMPLS)
    levels = [int(x) for x in args.conns.split(",")]
    logs: list[AcceptLog] = []

    def setup(ctx: netbench.NatLab) -> None:
        # Every connection takes a client port; the servers and HAProxy keep
        # TIME_WAIT (120 s in conntrack, 60 s in the stack): use every port.
        for ns in (ctx.lab.client, ctx.lab.director):
            ctx.lab.sysctl(ns, netbench.WIDE_PORTS)
        logs.extend(AcceptLog(netbench.start_ready(
            ctx.lab, ns, [str(ctx.exe), "tcp-server", str(PORT)], key=f"srv-{ns}"))
            for ns in ctx.lab.rs)

    def wrk(ctx: netbench.NatLab, r: int, impl: str, conns: int) -> dict:
        lab = ctx.lab
        host = ctx.direct_host if impl == "direct" else lab.vip
        t0 = time.monotonic()
        # The user-space directors' CPU use says whether their core is
        # the limit (kernel-nft works in softirq: not a process).
        res = netbench.cpu_busy(lab, ["director", "haproxy"], lambda: {"out": lab.run(
            lab.client, ["taskset", "-c", ctx.client_cpu, "wrk", "-t1", f"-c{conns}",
                         f"-d{args.seconds}s", "--timeout", "2s", "-H", "Connection: close",
                         f"http://{host}:{PORT}/"], timeout=args.seconds + 60)})
        t1 = time.monotonic()
        time.sleep(1.2)  # the servers' next once-a-second line covers t1
        p = res.pop("out")
        res.update(parse_wrk(p.stdout))
        if "rps" not in res:
            raise RuntimeError(f"wrk printed no rate: {p.stdout[-500:]} {p.stderr[-500:]}")
        ticks = [t0 + k for k in range(int(t1 - t0) + 1)]
        totals = [sum(log.at(t) for log in logs) for t in ticks]
        res["per_second"] = [round(b - a) for a, b in zip(totals, totals[1:])]
        third = max(1, len(res["per_second"]) // 3)
        first = statistics.median(res["per_second"][:third] or [0])
        res["sustained"] = (statistics.median(res["per_second"][-third:]) / first
                            if first else None)
        print(f"round {r + 1}/{runs} c{conns:<4} {impl:<10} {res['rps']:>10,.0f} conns/s  "
              f"errors {res['socket_errors']}  cpu {res['cpu_busy']}  "
              f"per second {res['per_second']}", flush=True)
        return res

    samples, errors, meta = netbench.nat_lab_rounds(
        "plcr", impls, runs, "tcp", PORT, setup,
        lambda ctx, r, impl: {c: wrk(ctx, r, impl, c) for c in levels})

    results, summary = [], []
    for conns in levels:
        rows = {}
        got_c = {impl: [s[conns] for s in samples.get(impl, [])] for impl in impls}
        for impl in impls:
            got = got_c[impl]
            rate = netbench.median_of(got, "rps")
            row = {"scenario": f"tcp-connection-close-c{conns}", "impl": impl, "conns": conns,
                   "runs": len(got), "samples": [s["rps"] for s in got],
                   "seconds": args.seconds, "conns_per_s": rate, "pps": rate,
                   "ns_per_packet": None, "sustained": netbench.median_of(got, "sustained"),
                   "per_second": [s["per_second"] for s in got],
                   "socket_errors": [s["socket_errors"] for s in got],
                   "non_2xx": [s["non_2xx"] for s in got],
                   "cpu_busy": [s["cpu_busy"] for s in got]}
            if impl in errors:
                row["error"] = errors[impl]
            rows[impl] = row
        results += rows.values()
        summary += [f"c{conns}: {line}" for line in netbench.ratio_rows(
            rows, "conns_per_s", "pylvs", ["kernel-nft", "haproxy", "direct"], got_c, "rps")]
        summary += [f"c{conns}: {i}: rate in the last third of the run / first third = "
                    f"{r['sustained']:.2f}" for i, r in rows.items() if r.get("sustained")]
    summary.append("targets: pylvs/kernel-nft >= 1.2, pylvs/haproxy >= 1.5, sustained")
    return {"results": results, "summary": summary,
            "meta": {**meta, "client": f"wrk -t1 -c{args.conns} -H 'Connection: close', "
                                       f"cpu {netbench.cores()[0]}",
                     "server": "bench/peers.c tcp-server in rs1..rs3 (direct: rs1 only)"}}


def plot(doc: dict, png) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r.get("conns_per_s")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ax.bar(range(len(rows)), [r["conns_per_s"] for r in rows],
           color=[f"C{impls.index(r['impl'])}" for r in rows])
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["samples"]), r["samples"], color="k", s=8, zorder=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"c{r['conns']}\n{r['impl']}" for r in rows], fontsize=8)
    ax.set_ylabel("new TCP connections per second (median; dots: rounds)")
    top = max(r["conns"] for r in rows) if rows else 0
    for r in rows:
        if r["conns"] != top:
            continue
        for k, series in enumerate(r["per_second"]):
            ax2.plot(range(1, len(series) + 1), series, color=f"C{impls.index(r['impl'])}",
                     alpha=0.8, label=r["impl"] if k == 0 else None)
    ax2.set_xlabel(f"second of the round (c{top}, every round)")
    ax2.set_ylabel("connections accepted by the servers per second")
    ax2.legend()
    ax2.set_ylim(bottom=0)
    fig.suptitle(f"pylvs bench conn-rate ({doc.get('meta', {}).get('when', '')})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
