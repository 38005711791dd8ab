"""bench e2e: 64-byte UDP frames through a director, counted at the sinks.

Topology: a lab of pylvs/lab/topology.py with three real servers acting as
sinks, for one forwarding method (``--fwd nat|dr|tun``, NAT by default):

- ``nat``: the VS-NAT lab. The client namespace is the generator, one veth
  from the director's eth0; the sinks sit behind the director's eth1.
- ``dr``: the routed VS-DR lab. The director and the sinks share one L2
  segment (the front bridge); the director sends each frame back out of
  eth0, to a sink's MAC.
- ``tun``: the routed VS-Tun lab. The director sends IPIP (protocol 4) to
  each sink's RIP on the far network, through the lab's router.

In the routed labs the client sits behind the router; the generator runs in
the router's namespace and sends on the router's front interface, with the
frames the router would forward (router MAC -> director MAC, cip -> VIP,
TTL 64): the router's own forwarding would otherwise cost the generator's
core as much again, for every impl alike.

trafgen sends 64-byte frames (60 + FCS) cip:sport -> VIP:9 with sport
cycling over ``--flows`` values (1000 by default), so after the first
packets of each source port every path handles established flows. Each sink
drops at nft netdev ingress, counting in a named counter (no socket, no ICMP
port unreachable back), what arrives for it: NAT: UDP port 9; DR: UDP to
VIP:9 addressed to its MAC; Tun: IPIP to its RIP addressed to its MAC (no
decapsulator needed to count). Once per impl and run, one frame is captured
at each sink during the warm-up and checked field by field (check_frame), so
the bench cannot count garbage.

Impls, in the same lab, alternating round by round:

- ``pylvs``: `pylvs run` pinned to one core with taskset, a wlc UDP service
  VIP:9 with the three sinks as dests of weight 1 (``-m``, ``-g`` or ``-i``).
- ``kernel-nft`` (nat): no pylvs; the director namespace with ip_forward=1
  and an nft nat prerouting rule ``dnat to numgen inc mod 3 map {...}``: the
  kernel's own conntrack + DNAT load balancing.
- ``kernel-nft-fwd`` (dr): no pylvs, no routing: an nft netdev ingress chain
  on the director's eth0 that, for UDP to VIP:9, decrements the TTL, sets
  ``ether saddr`` to eth0's MAC and ``ether daddr`` to a sink's MAC chosen by
  ``jhash udp sport mod 3``, and ``fwd to "eth0"``. nftables 1.0.6 has no
  arithmetic on a payload field (``ip ttl set ip ttl - 1`` is refused: "Range
  is not constant"), so the TTL goes through a verdict map on ``ip ttl``
  jumping to one of 254 chains that each set the constant TTL - 1; a TTL
  below 2 is dropped (the kernel would also answer time exceeded).
- tun: no kernel equivalent on these machines (no ipip module, and nftables
  cannot encapsulate); the JSON says so in ``kernel``.
- ``cfloor``: bench/cfloor.c, compiled with ``cc -O2`` into the lab's
  directory at the start of the run: the floor of an AF_PACKET user-space
  forwarder (the same TPACKET_V3 ring as pylvs, a BPF filter, no conn
  table, stateless choice by source-port hash, the method's rewrite,
  sendmmsg batches with PACKET_QDISC_BYPASS), pinned like pylvs, with an
  nft netdev ingress drop for VIP:9 keeping the kernel away from the frames
  as pylvs's steering does. pylvs/cfloor is what pylvs's conn table, engine
  and Python around them cost.
- ``pylvs-no-qdisc-bypass`` (only with ``--impl``): ``pylvs`` started with
  ``--no-qdisc-bypass`` (transmissions through the qdisc layer, visible to
  tcpdump on the director): what watching both sides costs.
- ``pylvs-pcap`` (only with ``--impl``): ``pylvs`` with ``--pcap FILE``
  (every frame sent also written to a pcap file in the lab's directory).
- ``pylvs-xdp`` (only with ``--impl``): ``pylvs`` with ``--io xdp`` (AF_XDP
  sockets fed by an XDP program on the director's ports, copy mode on veth).
  trafgen's frames carry full checksums, which XDP frames need.

Two ways of sharing the two cores, both measured (``--rps``):

- plain (scenario ``udp64-1000flows``, ``-dr``, ``-tun``): veth hands a frame
  to the receiving namespace on the *sender's* CPU, so the director's
  receive work (for pylvs and cfloor the AF_PACKET ring copy and the nft
  ingress drop; for the kernel impls the whole forwarding path) runs in
  softirq on the generator's core. The kernel impls then share a core with
  trafgen and show the generator's rate; the user-space ones get their
  receive work done off their own core.
- ``+rps``: RPS on the director's eth0 (``rps_cpus`` = the director's core)
  moves that receive work to the director's core. The kernel impls forward
  on their own core; the user-space ones share their core with their
  receive softirq, which runs first (on interrupt exit, and inside their
  sendmmsg: a veth transmission runs the receiver's path inline on the same
  core). Past what that core can do, frames are dropped in the AF_PACKET
  ring after the core paid for receiving them: receive livelock (docs/io.md,
  "Facts measured").

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
from dataclasses import dataclass
from pathlib import Path

from pylvs.lab.topology import Lab, LabError, wait_for_line

from . import netbench
from .netbench import kernel_nft_down, uptime as _uptime

PORT = 9
WARMUP = 1.0
GEN_TTL = 64
PAYLOAD = b"\x42" * 18
CFLOOR_SRC = Path(__file__).resolve().with_name("cfloor.c")
FWDS = ("nat", "dr", "tun")
# Impls run by default, per method.
DEFAULT_IMPLS = {
    "nat": ("pylvs", "kernel-nft", "cfloor"),
    "dr": ("pylvs", "kernel-nft-fwd", "cfloor"),
    "tun": ("pylvs", "cfloor"),
}
# The kernel's best equivalent of the director, per method (the JSON's "kernel").
KERNEL = {
    "nat": "kernel-nft: conntrack + nft DNAT (dnat to numgen inc mod 3 map), ip_forward=1",
    "dr": "kernel-nft-fwd: nft netdev ingress, TTL - 1 (ip ttl vmap to 254 constant sets), "
          "ether saddr/daddr set (jhash udp sport mod 3 map), fwd to eth0",
    "tun": "none: no ipip module, nftables cannot encapsulate",
}
KERNEL_IMPLS = {"nat": "kernel-nft", "dr": "kernel-nft-fwd"}
# Variants of the pylvs impl: name -> lab -> extra `pylvs run` arguments.
VARIANTS = {
    "pylvs-no-qdisc-bypass": lambda lab: ("--no-qdisc-bypass",),
    "pylvs-pcap": lambda lab: ("--pcap", str(lab.log_path("sent").with_suffix(".pcap"))),
    "pylvs-xdp": lambda lab: ("--io", "xdp"),
    "pylvs-ring-v3": lambda lab: ("--ring", "v3"),
    "pylvs-ring-v2": lambda lab: ("--ring", "v2"),
}
IMPLS = ("pylvs", "kernel-nft", "kernel-nft-fwd", "cfloor", *VARIANTS)


@dataclass
class Generator:
    """Where trafgen sends from: its namespace, interface and the frame's MACs."""

    ns: str
    iface: str
    smac: str
    dmac: str


def generator(lab: Lab) -> Generator:
    if lab.routed:
        # The frames the router would forward, sent from its front interface.
        return Generator(lab.router_ns, "eth1", lab.mac(lab.router_ns, "eth1"),
                         lab.mac(lab.director, "eth0"))
    return Generator(lab.client, "eth0", lab.mac(lab.client, "eth0"),
                     lab.mac(lab.director, "eth0"))


def trafgen_conf(lab: Lab, gen: Generator, flows: int, base_port: int = 10000) -> str:
    # 14 + 20 + 8 + 18 = 60 bytes on the wire before the FCS: a 64-byte frame.
    return (
        "{\n"
        f"  eth(da={gen.dmac}, sa={gen.smac}, type=0x0800),\n"
        f"  ipv4(saddr={lab.cip}, daddr={lab.vip}, ttl={GEN_TTL}),\n"
        f"  udp(sp=dinc({base_port}, {base_port + flows - 1}), dp={PORT}),\n"
        f"  fill(0x{PAYLOAD[0]:02x}, {len(PAYLOAD)})\n"
        "}\n"
    )


def sink_nft(lab: Lab, i: int) -> str:
    """The nft table of sink i: count and drop at ingress what is for it."""
    if lab.fwd == "nat":
        match = f"udp dport {PORT}"
    elif lab.fwd == "dr":
        match = f"ether daddr {lab.mac(lab.rs[i], 'eth0')} ip daddr {lab.vip} udp dport {PORT}"
    else:
        match = f"ether daddr {lab.mac(lab.rs[i], 'eth0')} ip protocol 4 ip daddr {lab.rips[i]}"
    return f"""
table netdev sink {{
  counter rx {{ }}
  chain in {{
    type filter hook ingress device "eth0" priority 0; policy accept;
    {match} counter name "rx" drop
  }}
}}
"""


def pin_bridges(lab: Lab) -> None:
    """Static FDB entries for every port of the routed labs' bridges.

    Nothing the sinks receive is answered, and the kernel-nft-fwd and cfloor
    impls never ARP for them, so a learned entry could age out (300 s) and
    the bridge would flood every frame to every port.
    """
    # bridge namespace -> (port, namespace and interface behind it)
    ports = {lab.front: [("dir", lab.director, "eth0"), ("router", lab.router_ns, "eth1")]}
    if lab.far:
        ports[lab.far] = [("router", lab.router_ns, "eth2")]
    for i, (rs, kind) in enumerate(zip(lab.rs, lab.kinds)):
        ports[lab.front if kind == "dr" else lab.far].append((f"rs{i + 1}", rs, "eth0"))
    for bridge, members in ports.items():
        for port, ns, ifname in members:
            lab.run(bridge, ["bridge", "fdb", "replace", lab.mac(ns, ifname), "dev", port,
                             "master", "static"])


def sink_counts(lab: Lab) -> list[int]:
    out = []
    for ns in lab.rs:
        p = lab.run(ns, ["nft", "-j", "list", "counter", "netdev", "sink", "rx"])
        for obj in json.loads(p.stdout)["nftables"]:
            if "counter" in obj:
                out.append(int(obj["counter"]["packets"]))
    return out


def tx_packets(lab: Lab, gen: Generator) -> int:
    return int(lab.run(gen.ns, ["cat", f"/sys/class/net/{gen.iface}/statistics/tx_packets"]).stdout)


# --- checking what arrives --------------------------------------------------------


def _csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data: 0 when a valid checksum is included."""
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip(a: bytes) -> str:
    return ".".join(map(str, a))


def check_frame(fwd: str, frame: bytes, *, mac: str, cip: str, vip: str, rip: str,
                outer_saddr: str = "", ttl: int = GEN_TTL - 1,
                outer_ttl: int = GEN_TTL - 2) -> list[str]:
    """What is wrong with one frame captured at a sink; [] when nothing is.

    The bench's packet after one forwarding hop: Ethernet to ``mac``; NAT:
    cip -> rip, DR: cip -> vip; Tun: an outer IPv4 header (protocol 4,
    outer_saddr -> rip, TTL ``outer_ttl``: the director copies the inner TTL
    after its decrement, and the lab's router takes one more on the way to
    the far network) in front of the DR packet. Inner packet: TTL ``ttl``
    (one hop: the director), UDP to PORT with the generator's
    payload. Every IPv4 header checksum and a non-zero UDP checksum must
    verify. frame: the bytes from the Ethernet header on (no FCS).
    """
    bad: list[str] = []
    if len(frame) < 14 or frame[12:14] != b"\x08\x00":
        return ["not an IPv4 Ethernet frame"]
    if frame[:6].hex(":") != mac.lower():
        bad.append(f"ether daddr {frame[:6].hex(':')}, expected {mac}")
    ip = frame[14:]
    if fwd == "tun":
        if len(ip) < 20 or ip[0] != 0x45:
            return bad + ["outer header is not a 20-byte IPv4 header"]
        if ip[9] != 4:
            bad.append(f"outer protocol {ip[9]}, expected 4 (IPIP)")
        if _csum(ip[:20]):
            bad.append("outer header checksum")
        if int.from_bytes(ip[2:4], "big") != len(ip):
            bad.append(f"outer total length {int.from_bytes(ip[2:4], 'big')}, frame has {len(ip)}")
        if (_ip(ip[12:16]), _ip(ip[16:20])) != (outer_saddr, rip):
            bad.append(f"outer {_ip(ip[12:16])} -> {_ip(ip[16:20])}, "
                       f"expected {outer_saddr} -> {rip}")
        if ip[8] != outer_ttl:
            bad.append(f"outer TTL {ip[8]}, expected {outer_ttl}")
        ip = ip[20:]
    ihl = (ip[0] & 0x0F) * 4 if ip else 0
    if len(ip) < 20 or ip[0] >> 4 != 4 or ihl < 20 or len(ip) < ihl + 8:
        return bad + ["inner packet is not IPv4 + UDP"]
    total = int.from_bytes(ip[2:4], "big")
    if total > len(ip) or total < ihl + 8:
        return bad + [f"IP total length {total}, packet has {len(ip)}"]
    ip = ip[:total]  # past it: Ethernet padding
    if _csum(ip[:ihl]):
        bad.append("IP header checksum")
    want_dst = rip if fwd == "nat" else vip
    if (_ip(ip[12:16]), _ip(ip[16:20])) != (cip, want_dst):
        bad.append(f"IP {_ip(ip[12:16])} -> {_ip(ip[16:20])}, expected {cip} -> {want_dst}")
    if ip[8] != ttl:
        bad.append(f"TTL {ip[8]}, expected {ttl}")
    if ip[9] != 17:
        return bad + [f"protocol {ip[9]}, expected 17 (UDP)"]
    udp = ip[ihl:]
    if int.from_bytes(udp[2:4], "big") != PORT:
        bad.append(f"UDP dport {int.from_bytes(udp[2:4], 'big')}, expected {PORT}")
    if int.from_bytes(udp[4:6], "big") != len(udp):
        bad.append("UDP length")
    if udp[6:8] != b"\0\0":
        pseudo = ip[12:20] + b"\0\x11" + len(udp).to_bytes(2, "big")
        if _csum(pseudo + udp):
            bad.append("UDP checksum")
    if bytes(udp[8:]) != PAYLOAD:
        bad.append(f"payload {bytes(udp[8:]).hex()}, expected {PAYLOAD.hex()}")
    return bad


CAPTURE = """
import json, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
s.settimeout(0.1)
deadline = time.monotonic() + float(sys.argv[1])
got = None
while got is None and time.monotonic() < deadline:
    try:
        data, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING or len(data) < 34 or data[12:14] != b"\\x08\\x00":
        continue
    ihl = (data[14] & 15) * 4
    if data[23] == 4 or (data[23] == 17 and data[14 + ihl + 2:14 + ihl + 4] == b"\\x00\\x09"):
        got = data.hex()
print(json.dumps(got))
"""


def check_sinks(lab: Lab, timeout: float = 2.0) -> dict[str, str]:
    """Capture one bench frame at each sink and check it: {rs name: "ok" or what is wrong}."""
    out = {}
    for i, ns in enumerate(lab.rs):
        got = lab.py(ns, CAPTURE, timeout=timeout + 10, args=(timeout,))
        if got is None:
            out[lab.rs_names[i]] = f"no frame within {timeout} s"
            continue
        bad = check_frame(lab.fwd, bytes.fromhex(got), mac=lab.mac(ns, "eth0"), cip=lab.cip,
                          vip=lab.vip, rip=lab.rips[i], outer_saddr=lab.dip0)
        out[lab.rs_names[i]] = "; ".join(bad) if bad else "ok"
    return out


# --- the impls --------------------------------------------------------------------


def kernel_nft_up(lab: Lab) -> None:
    netbench.kernel_nft_up(lab, "udp", PORT, lab.rips)


def kernel_nft_fwd_script(vip: str, out_mac: str, rs_macs: list[str], iface: str = "eth0") -> str:
    """The nft netdev table of impl kernel-nft-fwd (VS-DR in one ingress chain)."""
    macs = ", ".join(f"{i} : {m}" for i, m in enumerate(rs_macs))
    ttl_chains = "".join(f"  chain ttl{t} {{\n    ip ttl set {t - 1}\n  }}\n" for t in range(2, 256))
    vmap = ", ".join(f"{t} : jump ttl{t}" for t in range(2, 256))
    return f"""
table netdev lbfwd {{
{ttl_chains}  chain dr {{
    ip ttl < 2 drop
    ip ttl vmap {{ {vmap} }}
    ether saddr set {out_mac} ether daddr set jhash udp sport mod {len(rs_macs)} map {{ {macs} }} fwd to "{iface}"
  }}
  chain in {{
    type filter hook ingress device "{iface}" priority -500; policy accept;
    ip daddr {vip} udp dport {PORT} jump dr
  }}
}}
"""


def kernel_nft_fwd_up(lab: Lab) -> None:
    lab.nft(lab.director, kernel_nft_fwd_script(
        lab.vip, lab.mac(lab.director, "eth0"), [lab.mac(rs, "eth0") for rs in lab.rs]),
        timeout=30)


def kernel_nft_fwd_down(lab: Lab) -> None:
    lab.run(lab.director, ["nft", "delete", "table", "netdev", "lbfwd"], check=False)


def pylvs_up(lab: Lab, cpu: str, *run_args: str) -> None:
    lab.start_director(*run_args, taskset=cpu)
    lab.service("udp", PORT, [1] * len(lab.rips), sched="wlc")


def pylvs_down(lab: Lab) -> None:
    lab.stop_director()


def build_cfloor(lab: Lab) -> Path:
    """Compile bench/cfloor.c into the lab's directory (removed with the lab)."""
    exe = lab.log_path("cfloor").with_suffix(".bin")
    p = subprocess.run(["cc", "-O2", "-Wall", "-o", str(exe), str(CFLOOR_SRC)],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise LabError(f"cc -O2 {CFLOOR_SRC} failed: {p.stderr.strip()}")
    return exe


def cfloor_argv(lab: Lab) -> list[str]:
    """cfloor's arguments for the lab's method: interfaces, MACs of the next hops."""
    argv = ["--mode", lab.fwd, "--vip", lab.vip, "--port", str(PORT), "--in", "eth0"]
    if lab.fwd == "nat":
        argv += ["--out", "eth1"]
        hops = [lab.mac(rs, "eth0") for rs in lab.rs]
    elif lab.fwd == "dr":
        argv += ["--out", "eth0"]
        hops = [lab.mac(rs, "eth0") for rs in lab.rs]
    else:
        # The RIPs are behind the router: every outer packet goes to its MAC.
        argv += ["--out", "eth0", "--saddr", lab.dip0]
        hops = [lab.mac(lab.router_ns, "eth1")] * len(lab.rs)
    for rip, mac in zip(lab.rips, hops):
        argv += ["--dest", f"{rip},{mac}"]
    return argv


def cfloor_up(lab: Lab, exe: Path, cpu: str) -> None:
    # Keep the kernel from also handling the frames (pylvs/control/steering.py).
    lab.nft(lab.director, f"""
table netdev cfloor {{
  chain in {{
    type filter hook ingress device "eth0" priority -500; policy accept;
    ip daddr {lab.vip} udp dport {PORT} drop
  }}
}}
""")
    p = lab.popen(lab.director, ["taskset", "-c", cpu, str(exe), *cfloor_argv(lab)],
                  key="cfloor", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  stdin=subprocess.DEVNULL, start_new_session=True)
    if not wait_for_line(p, "ready", 10.0):
        p.kill()
        p.wait(timeout=5)
        raise LabError(f"cfloor did not start: {p.stderr.read().decode()[-1000:]}")


def cfloor_down(lab: Lab) -> dict:
    """Stop cfloor; its counters (rx, tx, drop_bad, tx_error, ring_dropped, ...)."""
    p = lab.procs.pop("cfloor", None)
    stats = {}
    if p is not None:
        p.send_signal(signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=5)
            lines = out.decode().strip().splitlines()
            stats = json.loads(lines[-1]) if lines else {}
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate(timeout=5)
    lab.run(lab.director, ["nft", "delete", "table", "netdev", "cfloor"], check=False)
    return stats


def one_round(lab: Lab, gen: Generator, conf: Path, seconds: float, rate: str,
              check: bool = False, warmup: float = WARMUP) -> dict:
    """Run the generator for warm-up + seconds; delivered and offered pps.

    check: capture and check one frame at each sink after the warm-up,
    before the window (``sample_check`` in the result).
    """
    proc = lab.popen(gen.ns, ["trafgen", "--dev", gen.iface,
                              "--conf", str(conf), "--cpus", "1", "--no-sock-mem",
                              "--notouch-irq", "--no-cpu-stats",
                              *pacing_args(rate)],
                     key="trafgen", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                     stdin=subprocess.DEVNULL, start_new_session=True)
    res: dict = {}
    try:
        time.sleep(warmup)
        if proc.poll() is not None:
            raise LabError(f"trafgen exited: {proc.stderr.read().decode()[-1000:]}")
        if check:
            res["sample_check"] = check_sinks(lab)
        s0, g0, t0 = sink_counts(lab), tx_packets(lab, gen), time.monotonic()
        time.sleep(seconds)
        s1, g1, t1 = sink_counts(lab), tx_packets(lab, gen), time.monotonic()
    finally:
        lab.procs.pop("trafgen", None)
        _stop_generator(lab, proc)
    dt = t1 - t0
    per_sink = [(b - a) / dt for a, b in zip(s0, s1)]
    return {"pps": sum(per_sink), "offered_pps": (g1 - g0) / dt, "per_sink_pps": per_sink,
            **res}


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
    ap.add_argument("--fwd", choices=FWDS, default="nat",
                    help="forwarding method: the lab, the dests' flag and the kernel baseline")
    ap.add_argument("--seconds", type=float, default=2.0 if quick else 5.0)
    ap.add_argument("--warmup", type=float, default=0.5 if quick else WARMUP,
                    help="seconds of traffic before each window (conns, ARP, sample check)")
    ap.add_argument("--flows", type=int, default=1000)
    # trafgen pins its one worker to CPU 0 whatever the caller's affinity,
    # so the director gets the last core.
    ap.add_argument("--director-cpu", default=str((os.cpu_count() or 1) - 1))
    ap.add_argument("--impl", action="append", choices=IMPLS,
                    help="impls to run (repeatable); default: those of --fwd "
                         + "; ".join(f"{f}: {', '.join(i)}" for f, i in DEFAULT_IMPLS.items()))
    ap.add_argument("--rate", default="2000000pps",
                    help="trafgen's pacing for the 'max' load (above what the generator makes)")
    ap.add_argument("--rates", default="max",
                    help="offered loads in pps, comma separated; 'max' = as fast as "
                         "the generator goes (the headline scenario); others are paced "
                         "with trafgen --gap 1/rate (evenly spaced, lands below the rate)")
    ap.add_argument("--rps", choices=("off", "on", "both"), default="both",
                    help="RPS of the director's eth0 to the director's core (see the docstring)")
    args = ap.parse_args(argv)
    fwd = args.fwd
    runs = runs or (2 if quick else 5)
    impls = args.impl or list(DEFAULT_IMPLS[fwd])
    for impl in impls:
        if impl.startswith("kernel-") and KERNEL_IMPLS.get(fwd) != impl:
            ap.error(f"--impl {impl} is not a {fwd} director (kernel baseline for {fwd}: "
                     f"{KERNEL[fwd]})")
    gen_cpu = "0"

    rates = [x.strip() for x in args.rates.split(",") if x.strip()]
    pace = {x: args.rate if x == "max" else f"gap:{1e6 / float(x):.0f}us" for x in rates}
    modes = ["off", "on"] if args.rps == "both" else [args.rps]
    # Scenario keys: (rps mode, rate).
    keys = [(m, x) for m in modes for x in rates]

    def scenario(key) -> str:
        mode, rate = key
        base = f"udp64-{args.flows}flows" + ("" if fwd == "nat" else f"-{fwd}")
        if rate != "max":
            base += f"@{int(float(rate)) // 1000}kpps"
        return base + ("+rps" if mode == "on" else "")

    samples: dict[tuple, list[dict]] = {(k, i): [] for k in keys for i in impls}
    checks: dict[str, dict] = {}
    cfloor_stats: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    uptime_before = _uptime()
    lab = Lab(f"plbench{uuid.uuid4().hex[:5]}", servers=3, start_servers=False, fwd=fwd)
    try:
        lab.up()
        if lab.routed:
            pin_bridges(lab)
        for i, ns in enumerate(lab.rs):
            lab.nft(ns, sink_nft(lab, i))
        gen = generator(lab)
        exe = None
        if "cfloor" in impls:
            try:
                exe = build_cfloor(lab)
            except (LabError, OSError) as e:  # OSError: no cc at all
                errors["cfloor"] = str(e)
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
                    elif impl == "cfloor":
                        up, down = (lambda: cfloor_up(lab, exe, args.director_cpu)), \
                            (lambda: cfloor_down(lab))
                    elif impl == "kernel-nft-fwd":
                        up, down = (lambda: kernel_nft_fwd_up(lab)), \
                            (lambda: kernel_nft_fwd_down(lab))
                    else:
                        up, down = (lambda: kernel_nft_up(lab)), (lambda: kernel_nft_down(lab))
                    try:
                        up()
                        for rate in rates:
                            # Fresh source ports each time: no impl meets flows
                            # (conns, conntrack entries) left by the one before.
                            conf = lab.log_path(f"trafgen{n_conf}").with_suffix(".cfg")
                            conf.write_text(trafgen_conf(
                                lab, gen, args.flows,
                                base_port=10000 + (args.flows * n_conf) % 50000))
                            n_conf += 1
                            res = one_round(lab, gen, conf, args.seconds, pace[rate],
                                            check=impl not in checks, warmup=args.warmup)
                            if "sample_check" in res:
                                checks[impl] = res.pop("sample_check")
                                print(f"sample check {impl}: {checks[impl]}", flush=True)
                            samples[((mode, rate), impl)].append(res)
                            print(f"round {r + 1}/{runs} {scenario((mode, rate)):<26} {impl:<14} "
                                  f"delivered {res['pps']:>10,.0f} pps  offered "
                                  f"{res['offered_pps']:>10,.0f} pps", flush=True)
                    except Exception as e:
                        errors[impl] = f"{type(e).__name__}: {e}"
                        print(f"{impl}: {errors[impl]}", flush=True)
                    finally:
                        try:
                            stats = down()
                            if impl == "cfloor":
                                cfloor_stats.setdefault(mode, []).append(stats)
                        except Exception as e:
                            errors.setdefault(impl, f"teardown: {e}")
    finally:
        errs = lab.down()
        if errs:
            print("lab teardown:", errs)
    uptime_after = _uptime()

    results = []
    summary = []
    kernel_impl = KERNEL_IMPLS.get(fwd)
    for key in keys:
        mode, rate = key
        rows = {}
        for impl in impls:
            got = samples[(key, impl)]
            pps = [s["pps"] for s in got]
            row = {"scenario": scenario(key), "impl": impl, "fwd": fwd, "runs": len(pps),
                   "samples": pps, "seconds": args.seconds, "flows": args.flows,
                   "frame_bytes": 64, "pacing": pace[rate], "rps": mode == "on"}
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
            if impl in checks:
                row["sample_check"] = checks[impl]
                if any(v != "ok" for v in checks[impl].values()):
                    row["error"] = f"sample check failed: {checks[impl]}"
            if impl == "cfloor" and mode in cfloor_stats:
                # Per round, over every rate of the round: rx, tx, ring drops.
                row["cfloor_counters"] = cfloor_stats[mode]
            if impl in errors:
                row["error"] = errors[impl]
            rows[impl] = row
            results.append(row)
        first = " (first target >= 0.5)" if rate == "max" and fwd == "nat" else ""
        for base in (kernel_impl, "cfloor"):
            if base and rows.get("pylvs", {}).get("pps") and rows.get(base, {}).get("pps"):
                ratio = rows["pylvs"]["pps"] / rows[base]["pps"]
                rows["pylvs"].setdefault("ratios", {})[f"pylvs/{base}"] = ratio
                if "ratio" not in rows["pylvs"]:
                    rows["pylvs"]["ratio"] = ratio
                    rows["pylvs"]["ratio_of"] = f"pylvs/{base}"
                # The median of per-round ratios: rounds of the two impls are
                # neighbours in time, so a busy moment hits both.
                per = [a["pps"] / b["pps"] for a, b in
                       zip(samples[(key, "pylvs")], samples[(key, base)]) if b["pps"]]
                if per:
                    rows["pylvs"].setdefault("ratios_per_round_median", {})[
                        f"pylvs/{base}"] = statistics.median(per)
                summary.append(f"{scenario(key)}: pylvs/{base} = {ratio:.2f}"
                               + (first if base == kernel_impl else ""))
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
    summary.append(f"kernel equivalent ({fwd}): {KERNEL[fwd]}")
    summary.append(f"director cpu {args.director_cpu} (+rps: and the receive work of its eth0), "
                   f"generator (trafgen) "
                   f"cpu {gen_cpu}, {args.seconds} s per round after {args.warmup} s warm-up")
    return {"fwd": fwd, "kernel": KERNEL[fwd], "results": results, "summary": summary,
            "meta": {"uptime_before": uptime_before, "uptime_after": uptime_after,
                     "generator": "router ns eth1 (frames as routed)" if fwd != "nat"
                     else "client ns eth0"}}
