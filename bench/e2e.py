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
- ``pylvs-no-qdisc-bypass`` (only with ``--impl``): ``pylvs`` started with
  ``--no-qdisc-bypass`` (transmissions through the qdisc layer, visible to
  tcpdump on the director): what watching both sides costs.
- ``pylvs-pcap`` (only with ``--impl``): ``pylvs`` with ``--pcap FILE``
  (every frame sent also written to a pcap file in the lab's directory).

Two ways of sharing the two cores, both measured (``--rps``):

- plain (scenario ``udp64-1000flows``): veth hands a frame to the receiving
  namespace on the *sender's* CPU, so the director's receive work (for
  pylvs the AF_PACKET ring copy and the nft ingress drop; for kernel-nft
  the whole forwarding path) runs in softirq on the generator's core.
  kernel-nft then shares a core with trafgen and shows the generator's
  rate; pylvs gets its receive work done off its own core.
- ``+rps``: RPS on the director's eth0 (``rps_cpus`` = the director's core)
  moves that receive work to the director's core. kernel-nft forwards on
  its own core; pylvs now shares its core with its receive softirq, which
  runs first (on interrupt exit, and inside pylvs's sendmmsg: a veth
  transmission runs the receiver's path inline on the same core). Past
  what that core can do, frames are dropped in the AF_PACKET ring
  (rx_dropped in the director's log), after the core paid for receiving
  them: receive livelock (docs/io.md, "Facts measured").

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
# Variants of the pylvs impl: name -> lab -> extra `pylvs run` arguments.
VARIANTS = {
    "pylvs-no-qdisc-bypass": lambda lab: ("--no-qdisc-bypass",),
    "pylvs-pcap": lambda lab: ("--pcap", str(lab.log_path("sent").with_suffix(".pcap"))),
}


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


def pylvs_up(lab: Lab, cpu: str, *run_args: str) -> None:
    lab.start_director(*run_args, taskset=cpu)
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
                                 *pacing_args(rate)],
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


def pacing_args(pacing: str) -> list[str]:
    """trafgen options for a pacing: "2000000pps" (--rate) or "gap:20us" (--gap).

    The unpaced TX ring flush fails with EAGAIN as soon as the director's
    backlog is full (RPS), hence --rate even for the maximum load: set above
    what the generator makes, it sends continuously. Below that, trafgen's
    --rate sends each second's quota in one burst at full speed (measured:
    50,000 frames in ~100 ms, then nothing for ~900 ms), a burst test rather
    than a paced load; --gap spaces frames evenly (a sleep per frame, so the
    achieved rate is below 1/gap: offered_pps says what it was).
    """
    if pacing.startswith("gap:"):
        return ["--gap", pacing[4:]]
    return ["--rate", pacing]


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
    ap.add_argument("--impl", action="append",
                    choices=("pylvs", "kernel-nft", *VARIANTS))
    ap.add_argument("--rate", default="2000000pps",
                    help="trafgen's pacing for the 'max' load (above what the generator makes)")
    ap.add_argument("--rates", default="max",
                    help="offered loads in pps, comma separated; 'max' = as fast as "
                         "the generator goes (the headline scenario); others are paced "
                         "with trafgen --gap 1/rate (evenly spaced, lands below the rate)")
    ap.add_argument("--rps", choices=("off", "on", "both"), default="both",
                    help="RPS of the director's eth0 to the director's core (see the docstring)")
    args = ap.parse_args(argv)
    runs = runs or (2 if quick else 5)
    impls = args.impl or ["pylvs", "kernel-nft"]
    gen_cpu = "0"

    rates = [x.strip() for x in args.rates.split(",") if x.strip()]
    pace = {x: args.rate if x == "max" else f"gap:{1e6 / float(x):.0f}us" for x in rates}
    modes = ["off", "on"] if args.rps == "both" else [args.rps]
    # Scenario keys: (rps mode, rate).
    keys = [(m, x) for m in modes for x in rates]

    def scenario(key) -> str:
        mode, rate = key
        base = f"udp64-{args.flows}flows"
        if rate != "max":
            base += f"@{int(float(rate)) // 1000}kpps"
        return base + ("+rps" if mode == "on" else "")

    samples: dict[tuple, list[dict]] = {(k, i): [] for k in keys for i in impls}
    errors: dict[str, str] = {}
    lab = Lab(f"plbench{uuid.uuid4().hex[:5]}", servers=3, start_servers=False)
    try:
        lab.up()
        for ns in lab.rs:
            lab.nft(ns, SINK_NFT)
        n_conf = 0
        for mode in modes:
            mask = format(1 << int(args.director_cpu), "x") if mode == "on" else "0"
            lab.run(lab.director, ["sh", "-c",
                                   f"echo {mask} > /sys/class/net/eth0/queues/rx-0/rps_cpus"])
            for r in range(runs):
                # Alternate which impl goes first, so drift hits both alike.
                order = impls if r % 2 == 0 else list(reversed(impls))
                for impl in order:
                    if impl in errors:
                        continue
                    if impl.startswith("pylvs"):
                        extra = VARIANTS.get(impl, lambda lab: ())(lab)
                        up, down = (lambda: pylvs_up(lab, args.director_cpu, *extra)), \
                            (lambda: pylvs_down(lab))
                    else:
                        up, down = (lambda: kernel_nft_up(lab)), (lambda: kernel_nft_down(lab))
                    try:
                        up()
                        for rate in rates:
                            # Fresh source ports each time: no impl meets flows
                            # (conns, conntrack entries) left by the one before.
                            conf = lab.log_path(f"trafgen{n_conf}").with_suffix(".cfg")
                            conf.write_text(trafgen_conf(
                                lab, args.flows, base_port=10000 + (args.flows * n_conf) % 50000))
                            n_conf += 1
                            res = one_round(lab, conf, args.seconds, pace[rate])
                            samples[((mode, rate), impl)].append(res)
                            print(f"round {r + 1}/{runs} {scenario((mode, rate)):<26} {impl:<10} "
                                  f"delivered {res['pps']:>10,.0f} pps  offered "
                                  f"{res['offered_pps']:>10,.0f} pps", flush=True)
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
    summary = []
    for key in keys:
        mode, rate = key
        rows = {}
        for impl in impls:
            got = samples[(key, impl)]
            pps = [s["pps"] for s in got]
            row = {"scenario": scenario(key), "impl": impl, "runs": len(pps), "samples": pps,
                   "seconds": args.seconds, "flows": args.flows, "frame_bytes": 64,
                   "pacing": pace[rate], "rps": mode == "on"}
            if pps:
                med = statistics.median(pps)
                offered = statistics.median(s["offered_pps"] for s in got)
                row.update(pps=med, median=med, ns_per_packet=1e9 / med if med else None,
                           offered_pps=offered,
                           delivered_fraction=med / offered if offered else None,
                           per_sink_pps=[statistics.median(x) for x in
                                         zip(*(s["per_sink_pps"] for s in got))])
            else:
                row.update(pps=None, ns_per_packet=None)
            if impl in errors:
                row["error"] = errors[impl]
            rows[impl] = row
            results.append(row)
        if rows.get("pylvs", {}).get("pps") and rows.get("kernel-nft", {}).get("pps"):
            ratio = rows["pylvs"]["pps"] / rows["kernel-nft"]["pps"]
            rows["pylvs"]["ratio"] = ratio
            rows["pylvs"]["ratio_of"] = "pylvs/kernel-nft"
            summary.append(f"{scenario(key)}: pylvs/kernel-nft = {ratio:.2f}"
                           + (" (first target >= 0.5)" if rate == "max" else ""))
        for name in VARIANTS:
            v = rows.get(name, {})
            if v.get("pps") and rows.get("pylvs", {}).get("pps"):
                v["ratio"] = v["pps"] / rows["pylvs"]["pps"]
                v["ratio_of"] = f"{name}/pylvs"
                summary.append(f"{scenario(key)}: {name}/pylvs = {v['ratio']:.2f}")
        for row in rows.values():
            if row.get("offered_pps"):
                summary.append(f"  {row['impl']}: offered {row['offered_pps']:,.0f} pps, "
                               f"delivered {100 * row['delivered_fraction']:.0f}%")
    summary.append(f"director cpu {args.director_cpu} (+rps: and the receive work of its eth0), "
                   f"generator (trafgen) "
                   f"cpu {gen_cpu}, {args.seconds} s per round after {WARMUP} s warm-up")
    return {"results": results, "summary": summary}
