"""bench e2e: 64-byte UDP frames through a director, counted at the sinks.

Topology: the VS-NAT lab (pylvs/lab/topology.py) with three real servers
acting as sinks. The client namespace is the generator: trafgen sends
64-byte frames (60 + FCS) cip:sport -> VIP:9 with sport cycling over
``--flows`` values (1000 by default), so after the first packets of each
source port every path handles established flows. Each sink drops UDP port
9 at nft netdev ingress, counting it (a named counter): no socket, no ICMP
port unreachable back towards the director.

Two impls of the director, in the same lab, alternating round by round:

- ``pylvs``: `pylvs run` pinned to one core with taskset, a wlc UDP service
  VIP:9 with the three sinks as Masq dests of weight 1.
- ``kernel-nft``: no pylvs; the director namespace with ip_forward=1 and an
  nft nat prerouting rule ``dnat to numgen inc mod 3 map {...}``: the
  kernel's own conntrack + DNAT load balancing, the baseline.

The director's share of the kernel's receive work goes to the director's
core too: RPS on the director's eth0 (``rps_cpus`` = that core) moves the
processing of received frames off the generator's core. Without it the
kernel-nft path would forward in softirq on the generator's core (veth
hands a frame to the receiver on the sender's CPU) and its figure would be
the generator's rate, not the director's. ``--no-rps`` shows that case.

Delivered pps = sum of the sinks' counters over a window that starts after a
warm-up (conns created, ARP resolved) and lasts ``--seconds``. The
generator's own rate (its interface tx counter) is reported as ``offered_pps``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import time
import uuid
from pathlib import Path

from pylvs.lab.topology import Lab, LabError

PORT = 9
WARMUP = 1.0


def trafgen_conf(lab: Lab, flows: int, base_port: int = 10000) -> str:
    dmac = lab.run(lab.director, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    smac = lab.run(lab.client, ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    # 14 + 20 + 8 + 18 = 60 bytes on the wire before the FCS: a 64-byte frame.
    return (
        "{\n"
        f"  eth(da={dmac}, sa={smac}, type=0x0800),\n"
        f"  ipv4(saddr={lab.cip}, daddr={lab.vip}, ttl=64),\n"
        f"  udp(sp=dinc({base_port}, {base_port + flows - 1}), dp={PORT}),\n"
        "  fill(0x42, 18)\n"
        "}\n"
    )


SINK_NFT = f"""
table netdev sink {{
  counter rx {{ }}
  chain in {{
    type filter hook ingress device "eth0" priority 0; policy accept;
    udp dport {PORT} counter name "rx" drop
  }}
}}
"""


def sink_counts(lab: Lab) -> list[int]:
    out = []
    for ns in lab.rs:
        p = lab.run(ns, ["nft", "-j", "list", "counter", "netdev", "sink", "rx"])
        for obj in json.loads(p.stdout)["nftables"]:
            if "counter" in obj:
                out.append(int(obj["counter"]["packets"]))
    return out


def tx_packets(lab: Lab) -> int:
    return int(lab.run(lab.client, ["cat", "/sys/class/net/eth0/statistics/tx_packets"]).stdout)


def kernel_nft_up(lab: Lab) -> None:
    m = ", ".join(f"{i} : {rip}" for i, rip in enumerate(lab.rips))
    lab.set_ip_forward(1)
    lab.nft(lab.director, f"""
table ip lb {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {lab.vip} udp dport {PORT} dnat to numgen inc mod {len(lab.rips)} map {{ {m} }}
  }}
}}
""")


def kernel_nft_down(lab: Lab) -> None:
    lab.run(lab.director, ["nft", "delete", "table", "ip", "lb"], check=False)
    lab.set_ip_forward(0)


def pylvs_up(lab: Lab, cpu: str) -> None:
    lab.start_director(taskset=cpu)
    vip = f"{lab.vip}:{PORT}"
    lab.adm("-A", "-u", vip, "-s", "wlc")
    for rip in lab.rips:
        lab.adm("-a", "-u", vip, "-r", f"{rip}:{PORT}", "-m", "-w", "1")


def pylvs_down(lab: Lab) -> None:
    lab.stop_director()


def one_round(lab: Lab, conf: Path, seconds: float, rate: str) -> dict:
    """Run the generator for warm-up + seconds; delivered and offered pps."""
    gen = lab.popen(lab.client, ["trafgen", "--dev", "eth0",
                                 "--conf", str(conf), "--cpus", "1", "--no-sock-mem",
                                 "--notouch-irq", "--no-cpu-stats",
                                 # Paced: with RPS the unpaced TX ring flush fails
                                 # with EAGAIN as soon as the backlog is full.
                                 "--rate", rate],
                    key="trafgen", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(WARMUP)
        if gen.poll() is not None:
            raise LabError(f"trafgen exited: {gen.stderr.read().decode()[-1000:]}")
        s0, g0, t0 = sink_counts(lab), tx_packets(lab), time.monotonic()
        time.sleep(seconds)
        s1, g1, t1 = sink_counts(lab), tx_packets(lab), time.monotonic()
    finally:
        lab.procs.pop("trafgen", None)
        _stop_generator(lab, gen)
    dt = t1 - t0
    per_sink = [(b - a) / dt for a, b in zip(s0, s1)]
    return {"pps": sum(per_sink), "offered_pps": (g1 - g0) / dt, "per_sink_pps": per_sink}


def _stop_generator(lab: Lab, gen: subprocess.Popen) -> None:
    """Stop trafgen and its forked worker; return once nothing sends.

    trafgen forks its worker: signalling the parent alone can leave the
    worker sending while the next impl is being set up (the kernel would
    then create un-NATed conntrack entries for those flows).
    """
    try:
        os.killpg(gen.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        gen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(gen.pid, signal.SIGKILL)
        gen.wait(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(gen.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        try:
            os.killpg(gen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if gen.stderr:
        gen.stderr.close()


def run(argv: list[str], runs: int | None = None, quick: bool = False) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench e2e")
    ap.add_argument("--seconds", type=float, default=2.0 if quick else 5.0)
    ap.add_argument("--flows", type=int, default=1000)
    # trafgen pins its one worker to CPU 0 whatever the caller's affinity,
    # so the director gets the last core.
    ap.add_argument("--director-cpu", default=str((os.cpu_count() or 1) - 1))
    ap.add_argument("--impl", action="append", choices=("pylvs", "kernel-nft"))
    ap.add_argument("--rate", default="2000000pps",
                    help="trafgen's pacing (above what either director delivers)")
    ap.add_argument("--no-rps", action="store_true",
                    help="leave the director's receive processing on the generator's core")
    args = ap.parse_args(argv)
    runs = runs or (2 if quick else 5)
    impls = args.impl or ["pylvs", "kernel-nft"]
    gen_cpu = "0"

    samples: dict[str, list[dict]] = {i: [] for i in impls}
    errors: dict[str, str] = {}
    lab = Lab(f"plbench{uuid.uuid4().hex[:5]}", servers=3, start_servers=False)
    try:
        lab.up()
        for ns in lab.rs:
            lab.nft(ns, SINK_NFT)
        if not args.no_rps:
            mask = format(1 << int(args.director_cpu), "x")
            lab.run(lab.director, ["sh", "-c", f"echo {mask} > /sys/class/net/eth0/queues/rx-0/rps_cpus"])
        for r in range(runs):
            # Fresh source ports each round: no impl meets flows (conns,
            # conntrack entries) left by the one before.
            conf = lab.log_path(f"trafgen{r}").with_suffix(".cfg")
            conf.write_text(trafgen_conf(lab, args.flows, base_port=10000 + (args.flows * r) % 50000))
            # Alternate which impl goes first, so drift hits both alike.
            order = impls if r % 2 == 0 else list(reversed(impls))
            for impl in order:
                if impl in errors:
                    continue
                up, down = ((lambda: pylvs_up(lab, args.director_cpu)), lambda: pylvs_down(lab)) \
                    if impl == "pylvs" else ((lambda: kernel_nft_up(lab)), lambda: kernel_nft_down(lab))
                try:
                    up()
                    res = one_round(lab, conf, args.seconds, args.rate)
                    if impl == "pylvs":
                        res["director_log_tail"] = lab.director_log()[-300:]
                    samples[impl].append(res)
                    print(f"round {r + 1}/{runs} {impl:<10} delivered {res['pps']:>12,.0f} pps"
                          f"  offered {res['offered_pps']:>12,.0f} pps", flush=True)
                except Exception as e:
                    errors[impl] = f"{type(e).__name__}: {e}"
                    print(f"{impl}: {errors[impl]}", flush=True)
                finally:
                    try:
                        down()
                    except Exception as e:
                        errors.setdefault(impl, f"teardown: {e}")
    finally:
        errs = lab.down()
        if errs:
            print("lab teardown:", errs)

    results = []
    for impl in impls:
        pps = [s["pps"] for s in samples[impl]]
        row = {"scenario": "udp64-1000flows" if args.flows == 1000 else f"udp64-{args.flows}flows",
               "impl": impl, "runs": len(pps), "samples": pps, "seconds": args.seconds,
               "flows": args.flows, "frame_bytes": 64}
        if pps:
            med = statistics.median(pps)
            offered = statistics.median(s["offered_pps"] for s in samples[impl])
            row.update(pps=med, median=med, ns_per_packet=1e9 / med if med else None,
                       offered_pps=offered, delivered_fraction=med / offered if offered else None,
                       rps=not args.no_rps,
                       per_sink_pps=[statistics.median(x) for x in
                                     zip(*(s["per_sink_pps"] for s in samples[impl]))])
        else:
            row.update(pps=None, ns_per_packet=None)
        if impl in errors:
            row["error"] = errors[impl]
        results.append(row)
    summary = []
    by = {r["impl"]: r for r in results}
    if by.get("pylvs", {}).get("pps") and by.get("kernel-nft", {}).get("pps"):
        ratio = by["pylvs"]["pps"] / by["kernel-nft"]["pps"]
        by["pylvs"]["ratio"] = ratio
        by["pylvs"]["ratio_of"] = "pylvs/kernel-nft"
        summary.append(f"pylvs/kernel-nft = {ratio:.2f} (first target >= 0.5)")
    for r in results:
        if r.get("offered_pps"):
            summary.append(f"{r['impl']}: offered {r['offered_pps']:,.0f} pps, delivered "
                           f"{100 * r['delivered_fraction']:.0f}%")
    summary.append(f"director cpu {args.director_cpu}"
                   f"{'' if args.no_rps else ' (+ RPS of its eth0)'}, generator (trafgen) "
                   f"cpu {gen_cpu}, {args.seconds} s per round after {WARMUP} s warm-up")
    return {"results": results, "summary": summary}
