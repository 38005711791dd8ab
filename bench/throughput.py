"""bench throughput: one bulk TCP transfer (iperf3) through each forwarding method.

One lab of pylvs/lab/topology.py per method (``--fwd``, all three by
default, one after the other): iperf3 (Debian's) ``-s`` in rs1, the
client's ``iperf3 -c`` pinned to CPU 0 sending for ``--seconds`` (the
client -> server direction crosses the director in every method). The
service has rs1 as its only dest: iperf3's control connection and its data
connection must reach the same server, and a scheduler spreading them over
several dests would split them (persistence is not applied yet).

Impls, per lab (bench/netbench.py), interleaved round by round:

- nat: ``pylvs`` (``-m``), ``kernel-nft`` (conntrack DNAT to rs1),
  ``direct`` (the client on the servers' bridge).
- dr: ``pylvs`` (``-g``), ``direct`` (to rs1's RIP through the router).
- tun: ``pylvs`` (``-i``, IPIP) with `pylvs realserver run`, the user-space
  decapsulator, in rs1 (these machines have no ipip module): it reads each
  IPIP packet from a raw socket and writes the inner one to a TUN device,
  one Python system call pair per packet, expected to be the limit of this
  row (``cpu_busy`` shows how busy it and the director are). ``direct`` as
  in dr. No kernel equivalent (nftables cannot
  encapsulate).

The row's figure: the receiver's rate over the transfer
(``end.sum_received``), median over rounds; the sender's retransmits; and
``cpu_busy``, the CPU use (fraction of one core) of `pylvs run` and of
rs1's decapsulator over each transfer (on a loaded machine a figure below
1.0 may also mean a process waited for a CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import uuid

from pylvs.lab.topology import FWDS as LAB_FWDS, Lab

from . import netbench

PORT = 5201
FWDS = tuple(f for f in LAB_FWDS if f != "mixed")
IMPLS = {"nat": ("pylvs", "kernel-nft", "direct"), "dr": ("pylvs", "direct"),
         "tun": ("pylvs", "direct")}


def parse_iperf3(out: str) -> dict:
    doc = json.loads(out)
    if doc.get("error"):
        raise RuntimeError(f"iperf3: {doc['error']}")
    end = doc["end"]
    return {"bps": end["sum_received"]["bits_per_second"],
            "sent_bps": end["sum_sent"]["bits_per_second"],
            "retransmits": end["sum_sent"].get("retransmits")}


def run_lab(fwd: str, impls: list[str], runs: int, seconds: float) -> tuple[list[dict], str]:
    client_cpu, director_cpu = netbench.cores()
    lab = Lab(f"plthr{uuid.uuid4().hex[:5]}", servers=3, start_servers=False, fwd=fwd)
    try:
        lab.up()
        if fwd == "tun":
            lab.start_decapsulators()
        direct_host = netbench.add_direct_path(lab)
        lab.popen(lab.rs[0], ["iperf3", "-s", "-p", str(PORT)], key="iperf3-s",
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def one(r: int, impl: str) -> dict:
            host = direct_host if impl == "direct" else lab.vip

            def transfer() -> dict:
                p = lab.run(lab.client, ["taskset", "-c", client_cpu, "iperf3", "-c", host,
                                         "-p", str(PORT), "-t", str(seconds), "-J",
                                         "--connect-timeout", "5000"],
                            timeout=seconds + 60, check=False)
                return parse_iperf3(p.stdout)

            # Which process is the limit: the director's and the Tun
            # decapsulator's CPU use over the transfer (1.0 = one core).
            res = netbench.cpu_busy(lab, ["director", "decap-rs1"], transfer)
            print(f"round {r + 1}/{runs} {fwd:<4} {impl:<10} {res['bps'] / 1e9:6.2f} Gbit/s  "
                  f"retransmits {res['retransmits']}  cpu {res['cpu_busy']}", flush=True)
            return res

        # iperf3 -s needs a moment before its first client.
        lab.run(lab.rs[0], ["sh", "-c", f"for i in $(seq 50); do ss -Hltn 'sport = :{PORT}' "
                                        f"| grep -q . && exit 0; sleep 0.1; done; exit 1"])
        samples, errors = netbench.interleaved(
            impls, runs, one, lambda impl: netbench.impl_actions(
                impl, lab, "tcp", PORT, director_cpu, [1, None, None]))
    finally:
        errs = lab.down()
        if errs:
            print("lab teardown:", errs)
    rows = {}
    for impl in impls:
        got = samples.get(impl, [])
        bps = netbench.median_of(got, "bps")
        row = {"scenario": f"iperf3-tcp-{fwd}", "impl": impl, "fwd": fwd, "runs": len(got),
               "seconds": seconds, "bps": bps, "gbps": bps / 1e9 if bps else None,
               "samples": [s["bps"] for s in got], "pps": None, "ns_per_packet": None,
               "retransmits": [s["retransmits"] for s in got],
               "cpu_busy": [s["cpu_busy"] for s in got]}
        if impl in errors:
            row["error"] = errors[impl]
        rows[impl] = row
    lines = [f"{fwd}: " + s for s in netbench.ratio_rows(rows, "bps", "pylvs",
                                                        ["kernel-nft", "direct"], samples)]
    return list(rows.values()), lines


def run(argv: list[str], runs: int | None = None, quick: bool = False) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench throughput")
    ap.add_argument("--fwd", action="append", choices=FWDS,
                    help="forwarding methods (repeatable); default: nat, dr, tun")
    ap.add_argument("--seconds", type=float, default=2 if quick else 10)
    args = ap.parse_args(argv)
    runs = runs or (1 if quick else 3)
    before = netbench.uptime()
    results, summary = [], []
    for fwd in args.fwd or FWDS:
        rows, lines = run_lab(fwd, list(IMPLS[fwd]), runs, args.seconds)
        results += rows
        summary += lines
    summary.append("tun: the real server decapsulates in user space (pylvs realserver run); "
                   "cpu_busy gives its CPU use and the director's")
    return {"results": results, "summary": summary,
            "meta": {"uptime_before": before, "uptime_after": netbench.uptime(),
                     "client": "iperf3 -c, cpu 0", "director_cpu": netbench.cores()[1],
                     "server": "iperf3 -s in rs1, the service's only dest"}}


def plot(doc: dict, png) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r.get("gbps")]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(rows)), 4.5))
    ax.bar(range(len(rows)), [r["gbps"] for r in rows],
           color=[f"C{impls.index(r['impl'])}" for r in rows])
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["samples"]), [s / 1e9 for s in r["samples"]], color="k", s=8,
                   zorder=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['fwd']}\n{r['impl']}" for r in rows])
    ax.set_ylabel("iperf3 TCP, Gbit/s received (median; dots: rounds)")
    ax.set_yscale("log")
    ax.set_title(f"pylvs bench throughput ({doc.get('meta', {}).get('when', '')})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
