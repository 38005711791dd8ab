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
- ``pylvs-xdp`` (nat default): ``pylvs`` with ``--io xdp`` (AF_XDP
  sockets fed by an XDP program on the director's ports, copy mode on veth).
  trafgen's frames carry full checksums, which XDP frames need.
- ``pylvs-w2``, ``pylvs-xdp-w2`` (nat default): ``pylvs`` (AF_PACKET, and
  ``--io xdp``) with ``--workers 2``, pinned to every core (the generator's
  too: a 2-core machine has no third). Their rows carry ``scaling``: 2
  workers / 1 of the same backend, who set each figure (limit_check), and
  the generator's own rate in both. Workers are steered by client address:
  with the default ``--clients 1`` every flow lands on one worker; use
  ``--clients 16`` (client_addrs) to measure scaling.
- ``pylvs-tap`` (nat default): ``pylvs`` behind TAPs (``--tap``, ``--mac``
  TAP_MAC) in a second lab of the same shape built with ``io="tap"``, whose
  director namespace bridges eth0/eth1 to tap0/tap1 (netns-labs/tap/); the
  generator sends to pylvs's MAC there. Same sinks, checks and windows.

Every row of the headline scenarios says who set its figure (limit_check):
``limit`` "director" when it lost more than LOST_DIRECTOR of what reached
its eth0, with where (``director_drops_pps``: pylvs's backend rx_dropped,
the eth0 backlog's rx_dropped), else "generator" (it kept up: the figure
is a lower bound).

With RPS on, two more scenarios per impl, in the same round as its
headline window (each director then has its own core for all its work and
the generator the other):

- ``-overload+rps``: a capacity ramp (the headline flows at each
  ``--ramp`` load, paced by a tbf qdisc on the generator's interface:
  police()), then the generator unpaced for ``--seconds``. The capacity is
  the most the impl delivered in the round; the row gives what was offered
  (``offered_pps``: the generator interface's tx_packets + tx_dropped),
  ``offered_over_capacity`` (the target: >= 2, ``overload_reached``) and
  ``delivered_over_capacity`` (1.0: the rate held at its peak).
- ``-flood+rps``: established flows (the client's 1000 source ports,
  paced by trafgen ``--gap``) alone, then with a second trafgen flooding
  VIP:PORT with new flows (flood_conf: other source addresses of the
  client's /24, a random source port each frame) as fast as it goes. The
  sinks count the client's frames apart (counter ``est``): ``pps`` = the
  established flows under the flood, ``est_kept`` = that over the same
  flows alone.

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
# --flood-kind -> the scenario's name part (and the session's key).
FLOOD_KINDS = {"udp": "flood", "syn": "synflood"}
# The flood's source addresses: these last octets of the client's /24 (none
# is the client, the director or the VIP).
FLOOD_HOSTS = (128, 254)
CFLOOR_SRC = Path(__file__).resolve().with_name("cfloor.c")
FWDS = ("nat", "dr", "tun")
# Impls run by default, per method.
DEFAULT_IMPLS = {
    "nat": ("pylvs", "pylvs-w2", "pylvs-xdp", "pylvs-xdp-w2", "pylvs-tap", "kernel-nft",
            "cfloor"),
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
NOLIMIT = ("--sysctl", "upcall_share=100", "--sysctl", "pressure_conn_rate=0")
# Variants of the pylvs impl: name -> lab -> extra `pylvs run` arguments.
VARIANTS = {
    "pylvs-no-qdisc-bypass": lambda lab: ("--no-qdisc-bypass",),
    "pylvs-pcap": lambda lab: ("--pcap", str(lab.log_path("sent").with_suffix(".pcap"))),
    "pylvs-xdp": lambda lab: ("--io", "xdp"),
    "pylvs-ring-v3": lambda lab: ("--ring", "v3"),
    "pylvs-ring-v2": lambda lab: ("--ring", "v2"),
    "pylvs-w2": lambda lab: ("--workers", "2"),
    "pylvs-xdp-w2": lambda lab: ("--io", "xdp", "--workers", "2"),
    "pylvs-tap": lambda lab: ("--mac", TAP_MAC),
    # The upcall limit and pressure_conn_rate off (docs/engine.md): the
    # flood rows' A/B.
    "pylvs-nolimit": lambda lab: NOLIMIT,
    "pylvs-xdp-nolimit": lambda lab: ("--io", "xdp", *NOLIMIT),
    "pylvs-tap-nolimit": lambda lab: ("--mac", TAP_MAC, *NOLIMIT),
}
# The 2-worker impls run on every core (taskset), the others on the director's.
ALL_CORES_IMPLS = ("pylvs-w2", "pylvs-xdp-w2")
# (1 worker, 2 workers) of one backend: the scaling check's pairs.
SCALING = (("pylvs", "pylvs-w2"), ("pylvs-xdp", "pylvs-xdp-w2"))
# pylvs-tap runs in a second lab, built with io="tap" (pylvs/lab/topology.py).
TAP_IMPLS = ("pylvs-tap", "pylvs-tap-nolimit")
TAP_MAC = "02:00:00:00:be:01"   # pylvs's MAC on tap0 in that lab (--mac)
# Past this fraction of what reached it lost, the director is the limit.
LOST_DIRECTOR = 0.05
IMPLS = ("pylvs", "kernel-nft", "kernel-nft-fwd", "cfloor", *VARIANTS)


@dataclass
class Generator:
    """Where trafgen sends from: its namespace, interface and the frame's MACs."""

    ns: str
    iface: str
    smac: str
    dmac: str


def generator(lab: Lab) -> Generator:
    # In a TAP lab the director is pylvs behind tap0, at its own MAC.
    dmac = TAP_MAC if lab.io == "tap" else lab.mac(lab.director, "eth0")
    if lab.routed:
        # The frames the router would forward, sent from its front interface.
        return Generator(lab.router_ns, "eth1", lab.mac(lab.router_ns, "eth1"), dmac)
    return Generator(lab.client, "eth0", lab.mac(lab.client, "eth0"), dmac)


# With --clients N > 1 the headline flows come from N client addresses,
# these last octets of the client's /24 on (none is the director, the VIP
# or the flood's): workers are steered by client address, so one address
# keeps every flow on one worker.
CLIENTS_FROM = 20


def client_addrs(lab: Lab, n: int) -> list[str]:
    """The headline flows' source addresses: the client's own for n = 1,
    else n addresses of its /24 from CLIENTS_FROM on."""
    if n <= 1:
        return [lab.cip]
    net = lab.cip.rsplit(".", 1)[0]
    return [f"{net}.{CLIENTS_FROM + k}" for k in range(n)]


def trafgen_conf(lab: Lab, gen: Generator, flows: int, base_port: int = 10000,
                 clients: int = 1) -> str:
    # 14 + 20 + 8 + 18 = 60 bytes on the wire before the FCS: a 64-byte frame.
    # Two runtime counters (source address, source port) step together per
    # frame: lcm(clients, flows) distinct flows.
    addrs = client_addrs(lab, clients)
    saddr = f"saddr={addrs[0]}" if clients <= 1 else \
        f"saddr={addrs[0]}, saddr[3]=dinc({CLIENTS_FROM}, {CLIENTS_FROM + clients - 1})"
    return (
        "{\n"
        f"  eth(da={gen.dmac}, sa={gen.smac}, type=0x0800),\n"
        f"  ipv4({saddr}, daddr={lab.vip}, ttl={GEN_TTL}),\n"
        f"  udp(sp=dinc({base_port}, {base_port + flows - 1}), dp={PORT}),\n"
        f"  fill(0x{PAYLOAD[0]:02x}, {len(PAYLOAD)})\n"
        "}\n"
    )


def flood_conf(lab: Lab, gen: Generator, kind: str = "udp") -> str:
    """The flood of new flows: frames to VIP:PORT from the client's /24,
    the last octet of the source address cycling over FLOOD_HOSTS and a
    random source port in every frame, so nearly every frame is a flow no
    director has seen. The sources stay routable from the director (the
    same /24 as the client): a reverse-path check does not drop them.

    kind "udp": 64-byte UDP frames (to the UDP service of the established
    flows); "syn": TCP SYNs (54-byte frames, a random sequence number) to
    the TCP service on the same VIP:PORT (FLOOD_KINDS), each a half-open
    conn for a director, a conntrack entry for the kernel."""
    net = lab.cip.rsplit(".", 1)[0]
    lo, hi = FLOOD_HOSTS
    l4 = (f"  udp(sp=drnd(), dp={PORT}),\n  fill(0x{PAYLOAD[0]:02x}, {len(PAYLOAD)})\n"
          if kind == "udp" else f"  tcp(sp=drnd(), dp={PORT}, seq=drnd(), syn),\n")
    return (
        "{\n"
        f"  eth(da={gen.dmac}, sa={gen.smac}, type=0x0800),\n"
        f"  ipv4(saddr={net}.{lo}, saddr[3]=dinc({lo}, {hi}), daddr={lab.vip}, ttl={GEN_TTL}),\n"
        f"{l4}"
        "}\n"
    )


def sink_nft(lab: Lab, i: int) -> str:
    """The nft table of sink i: count and drop at ingress what is for it.

    Counter ``rx``: every bench frame (UDP or TCP to PORT); ``est``: those from the client's own
    address (lab.cip), i.e. the established flows, not the flood's
    (flood_conf) other source addresses. In Tun the client's address is the
    inner saddr: 20 bytes of outer header + 12, read raw.
    """
    # UDP and TCP: the SYN flood's frames are counted (and dropped, so no
    # server answers them with a RST) as the UDP flood's are.
    port = f"meta l4proto {{ tcp, udp }} th dport {PORT}"
    if lab.fwd == "nat":
        match = port
    elif lab.fwd == "dr":
        match = f"ether daddr {lab.mac(lab.rs[i], 'eth0')} ip daddr {lab.vip} {port}"
    else:
        match = f"ether daddr {lab.mac(lab.rs[i], 'eth0')} ip protocol 4 ip daddr {lab.rips[i]}"
    cip = f"@nh,256,32 0x{bytes(map(int, lab.cip.split('.'))).hex()}" if lab.fwd == "tun" \
        else f"ip saddr {lab.cip}"
    return f"""
table netdev sink {{
  counter rx {{ }}
  counter est {{ }}
  chain in {{
    type filter hook ingress device "eth0" priority 0; policy accept;
    {match} {cip} counter name "est"
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


def sink_counts(lab: Lab) -> list[dict[str, int]]:
    """Per sink, its counters by name: {"rx": frames, "est": of them, the client's}."""
    out = []
    for ns in lab.rs:
        p = lab.run(ns, ["nft", "-j", "list", "counters", "table", "netdev", "sink"])
        out.append({obj["counter"]["name"]: int(obj["counter"]["packets"])
                    for obj in json.loads(p.stdout)["nftables"] if "counter" in obj})
    return out


def if_counters(lab: Lab, ns: str, iface: str, *names: str) -> list[int]:
    """Counters of /sys/class/net/IFACE/statistics in ns, in the order asked."""
    p = lab.run(ns, ["sh", "-c", "cd /sys/class/net/%s/statistics && cat %s"
                     % (iface, " ".join(names))])
    return [int(x) for x in p.stdout.split()]


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


def check_sinks(lab: Lab, timeout: float = 2.0, cips: tuple[str, ...] = ()) -> dict[str, str]:
    """Capture one bench frame at each sink and check it: {rs name: "ok" or what is wrong}.

    cips: the client addresses the frames may come from (--clients);
    default: lab.cip alone."""
    out = {}
    for i, ns in enumerate(lab.rs):
        got = lab.py(ns, CAPTURE, timeout=timeout + 10, args=(timeout,))
        if got is None:
            out[lab.rs_names[i]] = f"no frame within {timeout} s"
            continue
        frame = bytes.fromhex(got)
        # The inner source address (Tun: behind the 20-byte outer header).
        src = _ip(frame[26 + (20 if lab.fwd == "tun" else 0):][:4])
        cip = src if src in cips else lab.cip
        bad = check_frame(lab.fwd, frame, mac=lab.mac(ns, "eth0"), cip=cip,
                          vip=lab.vip, rip=lab.rips[i], outer_saddr=lab.dip0)
        out[lab.rs_names[i]] = "; ".join(bad) if bad else "ok"
    return out


# --- the impls --------------------------------------------------------------------


def kernel_nft_up(lab: Lab) -> None:
    netbench.kernel_nft_up(lab, "udp", PORT, lab.rips, also_tcp=True)


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
    # The SYN flood's target (flood_conf "syn"); idle otherwise.
    lab.service("tcp", PORT, [1] * len(lab.rips), sched="wlc")


def pylvs_down(lab: Lab) -> None:
    lab.stop_director()


def build_cfloor(lab: Lab) -> Path:
    """bench/cfloor.c, compiled into the lab's directory (netbench.build_c)."""
    return netbench.build_c(lab, CFLOOR_SRC)


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


@dataclass
class Load:
    """One trafgen of a window: its config, its pacing (pacing_args) and
    whether it sends through the qdisc layer (where police() acts) rather
    than bypassing it as trafgen does by default."""

    conf: Path
    pacing: str
    qdisc: bool = False


def director_counters(lab: Lab, pylvs: bool) -> dict[str, float]:
    """What the director lost so far: its eth0's rx_dropped (the RPS backlog
    and the bridge's drops, every impl) and, for pylvs, its backends'
    ``rx_dropped`` (ring or XSK full, the TAP's queue full: frames the
    kernel had for pylvs and could not give it) and ``rx_frames``."""
    out = {"t": time.monotonic(),
           "if_rx_dropped": if_counters(lab, lab.director, "eth0", "rx_dropped")[0]}
    if pylvs:
        st = lab.stats()
        out.update(pylvs_rx_dropped=st.get("rx_dropped", 0), pylvs_rx_frames=st.get("rx_frames", 0))
    return out


def one_round(lab: Lab, gen: Generator, loads: list[Load], seconds: float,
              check: bool = False, warmup: float = WARMUP, pylvs: bool = False,
              cips: tuple[str, ...] = ()) -> dict:
    """Run the loads' generators for warm-up + seconds; delivered and offered pps.

    Result: ``pps`` (all bench frames at the sinks), ``est_pps`` (those from
    lab.cip), ``offered_pps`` (the generator interface's tx_packets: what
    reached the director's eth0), ``gen_tx_dropped_pps`` (what that
    interface could not hand over: the director's backlog full), and
    ``director``: the director_counters deltas over the window, per second.
    check: capture and check one frame at each sink after the warm-up,
    before the window (``sample_check`` in the result).
    """
    procs = []
    res: dict = {}
    try:
        for k, load in enumerate(loads):
            procs.append(lab.popen(
                gen.ns, ["trafgen", "--dev", gen.iface, "--conf", str(load.conf), "--cpus", "1",
                         "--no-sock-mem", "--notouch-irq", "--no-cpu-stats",
                         *(["--qdisc-path"] if load.qdisc else []), *pacing_args(load.pacing)],
                key=f"trafgen{k}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL, start_new_session=True))
        time.sleep(warmup)
        for proc in procs:
            if proc.poll() is not None:
                raise LabError(f"trafgen exited: {proc.stderr.read().decode()[-1000:]}")
        if check:
            res["sample_check"] = check_sinks(lab, cips=cips)
        s0, g0, t0 = sink_counts(lab), if_counters(lab, gen.ns, gen.iface, "tx_packets",
                                                   "tx_dropped"), time.monotonic()
        d0 = director_counters(lab, pylvs)
        time.sleep(seconds)
        d1 = director_counters(lab, pylvs)
        s1, g1, t1 = sink_counts(lab), if_counters(lab, gen.ns, gen.iface, "tx_packets",
                                                   "tx_dropped"), time.monotonic()
    finally:
        for k, proc in enumerate(procs):
            lab.procs.pop(f"trafgen{k}", None)
            _stop_generator(lab, proc)
    dt = t1 - t0
    per_sink = [(b["rx"] - a["rx"]) / dt for a, b in zip(s0, s1)]
    ddt = d1.pop("t") - d0.pop("t")
    return {"pps": sum(per_sink), "est_pps": sum(b["est"] - a["est"] for a, b in zip(s0, s1)) / dt,
            "offered_pps": (g1[0] - g0[0]) / dt, "gen_tx_dropped_pps": (g1[1] - g0[1]) / dt,
            "per_sink_pps": per_sink,
            "director": {k: (d1[k] - d0[k]) / ddt for k in d0}, **res}


def police(lab: Lab, gen: Generator, pps: float | None) -> None:
    """Pace what the generator interface sends to pps (None: no limit).

    A tbf qdisc at the generator interface's root, its rate pps 60-byte
    frames (tbf counts skb->len: the frame without FCS) and a bucket of
    4 ms of them: a trafgen sending through the qdisc path (Load.qdisc) as
    fast as it can is held to pps, waiting on its own core (the qdisc's
    queue full, its send fails with ENOBUFS and trafgen retries), before
    the director. With a 64-frame bucket tbf gave a third of the rate asked
    on the loaded machine (its watchdog wakes late and a small bucket
    loses the tokens of the delay); with 4 ms, 0.64-0.82 of it (measured
    2026-11-30 on a veth pair: 41 k for 50 k, 68 k for 100 k, 127 k for
    200 k, the generator's maximum then): the ramp records the rate
    reached. trafgen's own --rate sends each second's quota in one burst,
    and --gap cannot go past ~60 kpps here (pacing_args); this kernel has
    no police action (CONFIG_NET_ACT_POLICE is off).
    """
    lab.run(gen.ns, ["tc", "qdisc", "del", "dev", gen.iface, "root"], check=False)
    if pps:
        frame = 60
        lab.run(gen.ns, ["tc", "qdisc", "add", "dev", gen.iface, "root", "tbf",
                         "rate", f"{int(pps * frame * 8)}bit", "burst", str(max(64, int(pps * 0.004)) * frame),
                         "limit", str(max(256, int(pps * 0.008)) * frame)])


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


def bed_up(lab: Lab) -> Generator:
    """Build a lab for the bench: sinks counting at their ingress, static
    FDB entries where frames must not flood; its generator."""
    lab.up()
    if lab.routed:
        pin_bridges(lab)
    for i, ns in enumerate(lab.rs):
        lab.nft(ns, sink_nft(lab, i))
    if lab.io == "tap":
        # pylvs's MAC behind tap0 (--mac): learned from its gratuitous ARP,
        # but a static entry never ages into flooding the load to eth1.
        lab.run(lab.director, ["bridge", "fdb", "replace", TAP_MAC, "dev", "tap0", "master",
                               "static"])
    return generator(lab)


def overload_round(lab: Lab, gen: Generator, window, conf: Path, args, ramp: list[float],
                   peak: float) -> dict:
    """One impl's capacity ramp, then its overload window (RPS on).

    The ramp: the established flows of conf at each of the ramp's loads,
    paced by police(); the capacity is the most the impl delivered in this
    round (ramp steps, the round's unpaced window ``peak``, the overload
    window itself). The overload window: the generator unpaced, as fast as
    it goes; ``attempted_pps`` = its interface's tx_packets + tx_dropped (the
    frames it put on the wire, whether or not the director's backlog took
    them), compared with the capacity.
    """
    steps = []
    try:
        for pps in ramp:
            police(lab, gen, pps)
            res = window([Load(conf, args.rate, qdisc=True)], args.ramp_seconds, warmup=0.5)
            steps.append({"asked_pps": pps, "offered_pps": res["offered_pps"], "pps": res["pps"]})
    finally:
        police(lab, gen, None)
    res = window([Load(conf, args.rate)], args.seconds)
    capacity = max([peak, res["pps"], *(s["pps"] for s in steps)])
    res.update(ramp=steps, capacity_pps=capacity,
               attempted_pps=res["offered_pps"] + res["gen_tx_dropped_pps"])
    return res


def _median(got: list[dict], key: str):
    vals = [s[key] for s in got if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def overload_row(name: str, impl: str, got: list[dict], args) -> dict:
    """The overload scenario's row: delivered under overload against the
    capacity measured in the same rounds (medians; per-round figures in
    ``rounds``)."""
    per = [{"capacity_pps": s["capacity_pps"], "attempted_pps": s["attempted_pps"],
            "into_director_pps": s["offered_pps"], "pps": s["pps"],
            "offered_over_capacity": s["attempted_pps"] / s["capacity_pps"],
            "delivered_over_capacity": s["pps"] / s["capacity_pps"], "ramp": s["ramp"],
            "director_drops_pps": s["director"]} for s in got if s["capacity_pps"]]
    med = _median(got, "pps")
    over = _median(per, "offered_over_capacity")
    return {"scenario": name, "impl": impl, "fwd": args.fwd, "runs": len(got), "rps": True,
            "samples": [s["pps"] for s in got], "pps": med, "median": med,
            "ns_per_packet": 1e9 / med if med else None, "seconds": args.seconds,
            "flows": args.flows, "frame_bytes": 64, "ramp_pps": [float(x) for x in args.ramp.split(",")],
            "capacity_pps": _median(per, "capacity_pps"),
            "offered_pps": _median(per, "attempted_pps"),
            "into_director_pps": _median(per, "into_director_pps"),
            "offered_over_capacity": over, "overload_reached": bool(over and over >= 2.0),
            "delivered_over_capacity": _median(per, "delivered_over_capacity"), "rounds": per}


def flood_row(name: str, impl: str, got: list[dict], args) -> dict:
    """The flood scenario's row: the established flows' delivered rate under
    the flood (``pps``) against the same flows alone in the same round."""
    per = [{"est_alone_pps": s["alone"]["est_pps"], "est_flood_pps": s["flood"]["est_pps"],
            "est_kept": s["flood"]["est_pps"] / s["alone"]["est_pps"]
            if s["alone"]["est_pps"] else None,
            "flood_offered_pps": s["flood"]["offered_pps"] + s["flood"]["gen_tx_dropped_pps"]
            - s["alone"]["offered_pps"] - s["alone"]["gen_tx_dropped_pps"],
            "flood_delivered_pps": s["flood"]["pps"] - s["flood"]["est_pps"],
            "director_drops_pps": s["flood"]["director"]} for s in got]
    med = _median(per, "est_flood_pps")
    return {"scenario": name, "impl": impl, "fwd": args.fwd, "runs": len(got), "rps": True,
            "samples": [s["est_flood_pps"] for s in per], "pps": med, "median": med,
            "ns_per_packet": None, "seconds": args.seconds, "flows": args.flows,
            "est_gap": args.flood_gap,
            "est_alone_pps": _median(per, "est_alone_pps"),
            "est_kept": _median(per, "est_kept"),
            "flood_offered_pps": _median(per, "flood_offered_pps"),
            "flood_delivered_pps": _median(per, "flood_delivered_pps"), "rounds": per}


def extra_ratio_lines(name: str, rows: dict[str, dict], kernel_impl: str | None) -> list[str]:
    """Ratios of each pylvs impl's overload or flood figure to the kernel's
    and cfloor's (``ratios``: of medians); the summary lines."""
    out = []
    for impl, row in rows.items():
        if "capacity_pps" in row and row.get("capacity_pps"):
            out.append(f"{name}: {impl}: capacity {row['capacity_pps']:,.0f} pps, offered "
                       f"{row['offered_over_capacity']:.1f}x of it, delivered "
                       f"{row['delivered_over_capacity']:.2f}x of it")
        if row.get("est_kept") is not None:
            out.append(f"{name}: {impl}: established flows {row['est_alone_pps']:,.0f} pps "
                       f"alone, {row['pps']:,.0f} under a flood of "
                       f"{row['flood_offered_pps']:,.0f} pps ({row['est_kept']:.2f}x kept)")
        if not impl.startswith("pylvs") or not row.get("pps"):
            continue
        for base in (kernel_impl, "cfloor"):
            if base and rows.get(base, {}).get("pps"):
                ratio = row["pps"] / rows[base]["pps"]
                row.setdefault("ratios", {})[f"{impl}/{base}"] = ratio
                out.append(f"{name}: {impl}/{base} = {ratio:.2f}")
    return out


def scaling_lines(scen: str, rows: dict[str, dict]) -> list[str]:
    """2 workers against 1 for each backend of SCALING (``scaling`` in the
    2-worker row), with who set each figure (limit_check) and the
    generator's own rate in both."""
    out = []
    for w1, w2 in SCALING:
        one, two = rows.get(w1, {}), rows.get(w2, {})
        if not one.get("pps") or not two.get("pps"):
            continue
        gen1, gen2 = one["offered_pps"], two["offered_pps"]
        if two["limit"] == "generator":
            verdict = ("the generator is the limit with 2 workers (they delivered what "
                       "reached them): the ratio is a lower bound")
        elif one["limit"] == "generator":
            verdict = "the generator is the limit with 1 worker: the ratio means nothing"
        else:
            verdict = "the director is the limit in both: the ratio is the workers' scaling"
        if gen2 < 0.9 * gen1:
            verdict += (f"; the generator itself sent {100 * (1 - gen2 / gen1):.0f}% less with "
                        "2 workers (the second worker shares its core)")
        two["scaling"] = {f"{w2}/{w1}": two["pps"] / one["pps"], "limit_w1": one["limit"],
                          "limit_w2": two["limit"], "generator_pps_w1": gen1,
                          "generator_pps_w2": gen2, "verdict": verdict}
        out.append(f"{scen}: {w2}/{w1} = {two['pps'] / one['pps']:.2f}: {verdict}")
    return out


def limit_check(row: dict, got: list[dict]) -> dict:
    """Who set a row's figure: the generator or the director (``limit``).

    The director is the limit when it lost what reached it: offered (its
    eth0's share of the generator's tx) less delivered over 5% of offered,
    with where it lost it (``director``: pylvs's backend ``rx_dropped``, the
    eth0 backlog's ``if_rx_dropped``, per second). Otherwise it kept up and
    its figure is the generator's rate: a lower bound of what it can do.
    """
    offered = statistics.median(s["offered_pps"] for s in got)
    lost = 1 - row["pps"] / offered if offered else 0.0
    where = {k: statistics.median(s["director"][k] for s in got) for k in got[0]["director"]}
    return {"offered_pps": offered, "lost_fraction": lost, "director_drops_pps": where,
            "gen_tx_dropped_pps": statistics.median(s["gen_tx_dropped_pps"] for s in got),
            "limit": "director" if lost > LOST_DIRECTOR else "generator"}


def run(argv: list[str], runs: int | None = None, quick: bool = False) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench e2e")
    ap.add_argument("--fwd", choices=FWDS, default="nat",
                    help="forwarding method: the lab, the dests' flag and the kernel baseline")
    ap.add_argument("--seconds", type=float, default=2.0 if quick else 5.0)
    ap.add_argument("--warmup", type=float, default=0.5 if quick else WARMUP,
                    help="seconds of traffic before each window (conns, ARP, sample check)")
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=1,
                    help="client addresses of the headline flows (workers are steered by "
                         "client address: 1 keeps every flow on one worker)")
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
    ap.add_argument("--overload", choices=("on", "off"), default="on",
                    help="with RPS on: the capacity ramp, then the overload window (docstring)")
    ap.add_argument("--ramp", default="100000,200000,300000",
                    help="the capacity ramp's loads in pps (tc-policed), comma separated")
    ap.add_argument("--ramp-seconds", type=float, default=1.0 if quick else 2.0)
    ap.add_argument("--flood", choices=("on", "off"), default="on",
                    help="with RPS on: established flows alone, then under a flood of new flows")
    ap.add_argument("--flood-kind", default=None,
                    help="the floods, comma-separated: udp (new UDP flows), syn (TCP SYNs "
                    "from random sources); default udp,syn for nat, udp for dr and tun")
    ap.add_argument("--flood-gap", default="20us",
                    help="trafgen --gap of the established flows in the flood scenario")
    args = ap.parse_args(argv)
    fwd = args.fwd
    runs = runs or (2 if quick else 5)
    kinds = [k.strip() for k in (args.flood_kind or ("udp,syn" if fwd == "nat" else "udp"))
             .split(",") if k.strip()]
    if any(k not in FLOOD_KINDS for k in kinds):
        ap.error(f"--flood-kind: one of {', '.join(FLOOD_KINDS)}, comma-separated")
    impls = args.impl or list(DEFAULT_IMPLS[fwd])
    for impl in impls:
        if impl.startswith("kernel-") and KERNEL_IMPLS.get(fwd) != impl:
            ap.error(f"--impl {impl} is not a {fwd} director (kernel baseline for {fwd}: "
                     f"{KERNEL[fwd]})")
    gen_cpu = "0"
    all_cpus = f"0-{(os.cpu_count() or 1) - 1}"

    rates = [x.strip() for x in args.rates.split(",") if x.strip()]
    pace = {x: args.rate if x == "max" else f"gap:{1e6 / float(x):.0f}us" for x in rates}
    ramp = [float(x) for x in args.ramp.split(",") if x.strip()]
    modes = ["off", "on"] if args.rps == "both" else [args.rps]
    # Scenario keys: (rps mode, rate).
    keys = [(m, x) for m in modes for x in rates]
    extra = {"overload": "on" in modes and args.overload == "on",
             "flood": "on" in modes and args.flood == "on"}
    base_name = f"udp64-{args.flows}flows" + ("" if fwd == "nat" else f"-{fwd}")

    def scenario(key) -> str:
        mode, rate = key
        base = base_name
        if rate != "max":
            base += f"@{int(float(rate)) // 1000}kpps"
        return base + ("+rps" if mode == "on" else "")

    samples: dict[tuple, list[dict]] = {(k, i): [] for k in keys for i in impls}
    overload: dict[str, list[dict]] = {i: [] for i in impls}
    flood: dict[str, list[dict]] = {i: [] for i in impls}
    synflood: dict[str, list[dict]] = {i: [] for i in impls}
    checks: dict[str, dict] = {}
    cfloor_stats: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    uptime_before = _uptime()
    labs = {"afpacket": Lab(f"plbench{uuid.uuid4().hex[:5]}", servers=3, start_servers=False,
                            fwd=fwd)}
    if any(i in TAP_IMPLS for i in impls):
        labs["tap"] = Lab(f"plbench{uuid.uuid4().hex[:5]}", servers=3, start_servers=False,
                          fwd=fwd, io="tap")
    try:
        gens = {name: bed_up(lab) for name, lab in labs.items()}
        exe = None
        if "cfloor" in impls:
            try:
                exe = build_cfloor(labs["afpacket"])
            except (LabError, OSError) as e:  # OSError: no cc at all
                errors["cfloor"] = str(e)
        n_conf = 0

        def fresh_conf(lab: Lab, gen: Generator, text: str | None = None,
                       clients: int = args.clients) -> Path:
            # Fresh source ports each time: no impl meets flows (conns,
            # conntrack entries) left by the one before.
            nonlocal n_conf
            conf = lab.log_path(f"trafgen{n_conf}").with_suffix(".cfg")
            conf.write_text(text or trafgen_conf(
                lab, gen, args.flows, base_port=10000 + (args.flows * n_conf) % 50000,
                clients=clients))
            n_conf += 1
            return conf

        def actions(impl: str, mode: str) -> tuple:
            lab = labs["tap" if impl in TAP_IMPLS else "afpacket"]
            gen = gens["tap" if impl in TAP_IMPLS else "afpacket"]
            if impl.startswith("pylvs"):
                run_args = VARIANTS.get(impl, lambda lab: ())(lab)
                cpu = all_cpus if impl in ALL_CORES_IMPLS else args.director_cpu
                up, down = (lambda: pylvs_up(lab, cpu, *run_args)), (lambda: pylvs_down(lab))
            elif impl == "cfloor":
                up, down = (lambda: cfloor_up(lab, exe, args.director_cpu)), \
                    (lambda: cfloor_down(lab))
            elif impl == "kernel-nft-fwd":
                up, down = (lambda: kernel_nft_fwd_up(lab)), (lambda: kernel_nft_fwd_down(lab))
            else:
                up, down = (lambda: kernel_nft_up(lab)), (lambda: kernel_nft_down(lab))

            def down_all() -> None:
                police(lab, gen, None)
                stats = down()
                if impl == "cfloor":
                    cfloor_stats.setdefault(mode, []).append(stats)
            return up, down_all

        def session(r: int, impl: str, mode: str) -> dict:
            """Every window of one impl's round in one RPS mode, with it up."""
            lab = labs["tap" if impl in TAP_IMPLS else "afpacket"]
            gen = gens["tap" if impl in TAP_IMPLS else "afpacket"]

            def window(loads: list[Load], seconds: float, check: bool = False,
                       warmup: float = args.warmup) -> dict:
                return one_round(lab, gen, loads, seconds, check=check, warmup=warmup,
                                 pylvs=impl.startswith("pylvs"),
                                 cips=tuple(client_addrs(lab, args.clients)))

            def say(what: str, res: dict) -> None:
                print(f"round {r + 1}/{runs} {what:<26} {impl:<14} delivered "
                      f"{res['pps']:>10,.0f} pps  offered {res['offered_pps']:>10,.0f} pps",
                      flush=True)
            out: dict = {"rates": {}}
            for rate in rates:
                conf = fresh_conf(lab, gen)
                res = window([Load(conf, pace[rate])], args.seconds, check=impl not in checks)
                if "sample_check" in res:
                    checks[impl] = res.pop("sample_check")
                    print(f"sample check {impl}: {checks[impl]}", flush=True)
                out["rates"][rate] = res
                say(scenario((mode, rate)), res)
            if mode == "on" and extra["overload"]:
                peak = max(res["pps"] for res in out["rates"].values())
                out["overload"] = overload_round(lab, gen, window, conf, args, ramp, peak)
                say(f"{base_name}-overload+rps", out["overload"])
            if mode == "on" and extra["flood"]:
                est = fresh_conf(lab, gen, clients=1)  # the sinks' "est": lab.cip's
                alone = window([Load(est, f"gap:{args.flood_gap}")], args.seconds)
                for kind in kinds:
                    flooded = window([Load(est, f"gap:{args.flood_gap}"),
                                      Load(fresh_conf(lab, gen, flood_conf(lab, gen, kind)),
                                           args.rate)], args.seconds)
                    key = FLOOD_KINDS[kind]
                    out[key] = {"alone": alone, "flood": flooded}
                    print(f"round {r + 1}/{runs} {f'{base_name}-{key}+rps':<26} {impl:<14} "
                          f"established {alone['est_pps']:>9,.0f} pps alone, "
                          f"{flooded['est_pps']:>9,.0f} under the flood (flood: "
                          f"{flooded['pps'] - flooded['est_pps']:,.0f} pps delivered, "
                          f"{flooded['offered_pps'] - alone['offered_pps']:,.0f} offered)",
                          flush=True)
            return out

        for mode in modes:
            mask = format(1 << int(args.director_cpu), "x") if mode == "on" else "0"
            for lab in labs.values():
                lab.run(lab.director, ["sh", "-c",
                                       f"echo {mask} > /sys/class/net/eth0/queues/rx-0/rps_cpus"])
            # Rounds interleaved, the first impl alternating, so drift hits all alike.
            got, errs = netbench.interleaved(
                [i for i in impls if i not in errors], runs,
                lambda r, impl: session(r, impl, mode), lambda impl: actions(impl, mode))
            errors.update(errs)
            for impl, sessions in got.items():
                for out in sessions:
                    for rate, res in out["rates"].items():
                        samples[((mode, rate), impl)].append(res)
                    if "overload" in out:
                        overload[impl].append(out["overload"])
                    if "flood" in out:
                        flood[impl].append(out["flood"])
                    if "synflood" in out:
                        synflood[impl].append(out["synflood"])
    finally:
        for lab in labs.values():
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
                row.update(pps=med, median=med, ns_per_packet=1e9 / med if med else None,
                           per_sink_pps=[statistics.median(x) for x in
                                         zip(*(s["per_sink_pps"] for s in got))])
                row.update(limit_check(row, got))
                row["delivered_fraction"] = med / row["offered_pps"] if row["offered_pps"] else None
            else:
                row.update(pps=None, ns_per_packet=None)
            if impl in checks:
                row["sample_check"] = checks[impl]
                if any(v != "ok" for v in checks[impl].values()):
                    row["error"] = f"sample check failed: {checks[impl]}"
            if impl == "cfloor" and mode in cfloor_stats:
                # Per round, over every scenario of the round: rx, tx, ring drops.
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
        summary += scaling_lines(scenario(key), rows)
        for row in rows.values():
            if row.get("offered_pps"):
                summary.append(f"  {row['impl']}: offered {row['offered_pps']:,.0f} pps, "
                               f"delivered {100 * row['delivered_fraction']:.0f}%, limit: "
                               f"{row['limit']}")
    for name, got, make in ((f"{base_name}-overload+rps", overload, overload_row),
                            (f"{base_name}-flood+rps", flood, flood_row),
                            (f"{base_name}-synflood+rps", synflood, flood_row)):
        rows = {impl: make(name, impl, got[impl], args) for impl in impls if got[impl]}
        for impl, row in rows.items():
            if impl in errors:
                row["error"] = errors[impl]
        results += rows.values()
        summary += extra_ratio_lines(name, rows, kernel_impl)
    summary.append(f"kernel equivalent ({fwd}): {KERNEL[fwd]}")
    summary.append(f"director cpu {args.director_cpu} (+rps: and the receive work of its eth0), "
                   f"generator (trafgen) "
                   f"cpu {gen_cpu}, {args.seconds} s per round after {args.warmup} s warm-up")
    return {"fwd": fwd, "kernel": KERNEL[fwd], "results": results, "summary": summary,
            "meta": {"uptime_before": uptime_before, "uptime_after": uptime_after,
                     "labs": [lab.name for lab in labs.values()],
                     "generator": "router ns eth1 (frames as routed)" if fwd != "nat"
                     else "client ns eth0",
                     "tap_lab": "pylvs-tap runs in a second lab of the same shape whose "
                                "director namespace bridges eth0/eth1 to tap0/tap1"
                                if "tap" in labs else None}}
