"""Issue 5 item 8: the director accepts only what the kernel would have accepted.

IPVS sees a packet only once the kernel's receive path took it as addressed
to this host: a frame for another MAC, or a broadcast or multicast frame
(ip_vs_in_hook: pkt_type != PACKET_HOST), a bad IPv4 header checksum
(ip_rcv_core), a source-route option with accept_source_route off
(ip_rcv_options), a martian source (ip_route_input_slow: loopback, 0/8,
multicast, limited or subnet broadcast, a local address) or a source that
fails the reverse-path check (fib_validate_source, rp_filter=1) never
reaches a real server. Crafted frames of each kind are sent from the client
namespace to the VIP's TCP and UDP services; a capture on the real server
shows which arrived, and each refusal must be counted.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from pylvs.lab.topology import wait_for_line

pytestmark = pytest.mark.netns

SEQ_BASE = 0x5EC0000
MARK = b"pylvs-accept:"

# name: (kind, value, counter that must count it)
CASES = {
    "control": (None, None, None),
    # Frames of another packet type: counted together (L2_COUNTERS below).
    "l2_broadcast": ("dmac", "ff:ff:ff:ff:ff:ff", None),
    "l2_multicast": ("dmac", "01:00:5e:00:00:01", None),
    "l2_other_host": ("dmac", "02:00:00:00:99:99", None),
    "bad_ip_csum": ("csum", None, "drop_bad_ip_csum"),
    "lsrr": ("lsrr", None, "drop_source_route"),
    "src_loopback": ("src", "127.0.0.1", "drop_martian"),
    "src_zeronet": ("src", "0.1.2.3", "drop_martian"),
    "src_multicast": ("src", "224.0.0.5", "drop_martian"),
    "src_limited_bcast": ("src", "255.255.255.255", "drop_martian"),
    "src_subnet_bcast": ("src", "10.0.0.255", "drop_martian"),
    "src_vip": ("src", "VIP", "drop_martian"),
    "src_real_server": ("src", "RIP", "drop_rp_filter"),
}

# Where a refusal by packet type is counted: by the engine, or by the
# steering table when the socket filter refuses the frame before user space
# (pylvs/io/bpf.py); either way `pylvs stats` must show it.
L2_COUNTERS = ("drop_l2_bcast", "drop_l2_other_host", "not_host")

SEND = """
import json, socket, sys
from scapy.all import IP, TCP, UDP, Ether, IPOption_LSRR, Raw
from pylvs.lab.clients import send_frames
cmac, dmac, cip, vip, rip = sys.argv[1:6]
cases = json.loads(sys.argv[6])
frames = []
for i, (name, (kind, value, _)) in enumerate(cases.items()):
    src = {"VIP": vip, "RIP": rip}.get(value, value) if kind == "src" else cip
    ip = IP(src=src, dst=vip, options=[IPOption_LSRR(routers=["10.0.0.1"])]
            if kind == "lsrr" else [])
    l4s = (UDP(sport=41000 + i, dport=7) / Raw(%(MARK)r + name.encode()),
           TCP(sport=41000 + i, dport=80, flags="S", seq=%(SEQ_BASE)d + i))
    for l4 in l4s:
        raw = bytearray(bytes(Ether(src=cmac, dst=value if kind == "dmac" else dmac) / ip / l4))
        if kind == "csum":
            raw[24] ^= 0xFF  # the IPv4 header checksum, made wrong
        frames.append(bytes(raw))
end = Ether(src=cmac, dst=dmac) / IP(src=cip, dst=vip) / UDP(sport=40999, dport=7)
frames.append(bytes(end / Raw(%(MARK)r + b"end")))
send_frames("eth0", frames, 200)
print(json.dumps(len(frames)))
""" % {"MARK": MARK, "SEQ_BASE": SEQ_BASE}

SNIFF = """
import json, struct, sys, time
from pylvs.lab.clients import Sniffer
names = json.loads(sys.argv[1])
sn = Sniffer("eth0")
print("ready", flush=True)
seen, deadline, end = [], time.monotonic() + 20, None
while time.monotonic() < (end or deadline):
    for pkt in sn.collect(0.2):
        ihl, proto = (pkt[0] & 15) * 4, pkt[9]
        l4 = pkt[ihl:]
        if proto == 17 and l4[8:].startswith(%(MARK)r):
            name = l4[8 + %(MLEN)d:].decode()
            if name == "end":
                end = time.monotonic() + 0.5  # stragglers of the burst
            else:
                seen.append(["udp", name])
        elif proto == 6 and l4[13] & 0x02:
            i = struct.unpack("!I", l4[4:8])[0] - %(SEQ_BASE)d
            if 0 <= i < len(names):
                seen.append(["tcp", names[i]])
print(json.dumps({"seen": seen, "end": end is not None}))
""" % {"MARK": MARK, "MLEN": len(MARK), "SEQ_BASE": SEQ_BASE}


def test_frames_the_kernel_would_refuse_reach_no_real_server(director_lab):
    lab = director_lab(servers=1)
    lab.nat_service("tcp", 80, (1,))
    lab.nat_service("udp", 7, (1,))
    names = list(CASES)
    sniff = lab.popen(lab.rs[0], [lab.python, "-c", SNIFF, json.dumps(names)],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for_line(sniff, "ready", 10), sniff.stderr.read() if sniff.poll() else ""
    before = lab.stats()
    lab.py(lab.client, SEND, timeout=60,
           args=(lab.mac(lab.client, "eth0"), lab.mac(lab.director, "eth0"), lab.cip, lab.vip,
                 lab.rips[0], json.dumps(CASES)))
    out, err = sniff.communicate(timeout=30)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["end"], f"the last (legitimate) frame never arrived: {res} {err}"
    seen = {tuple(x) for x in res["seen"]}
    # The capture works: the legitimate frames arrived, both protocols.
    assert {("udp", "control"), ("tcp", "control")} <= seen, seen
    forwarded = sorted(x for x in seen if x[1] != "control")
    assert not forwarded, f"forwarded to the real server: {forwarded}"

    after = lab.stats()
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    want: dict[str, int] = {}
    for _, _, counter in CASES.values():
        if counter:
            want[counter] = want.get(counter, 0) + 2  # one UDP, one TCP frame each
    for counter, n in want.items():
        assert grew.get(counter, 0) >= n, (counter, grew)
    l2 = sum(2 for kind, _, _ in CASES.values() if kind == "dmac")
    assert sum(grew.get(k, 0) for k in L2_COUNTERS) >= l2, grew
