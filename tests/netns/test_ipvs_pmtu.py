"""Issue 5 item 4: path MTU through a NAT director.

(a) A router on the client's side has a smaller MTU (1280) than the path
    the real server believes in: it answers the server's DF segments with
    ICMP frag-needed addressed to the VIP. The director must hand that error
    to the real server (kernel ip_vs_in_icmp and ip_vs_icmp_xmit: outer and
    inner headers translated), which then sends smaller segments.
(b) The director's own egress toward the real servers is 1280 while the
    client's link is 1500: a DF packet too big for it gets ICMP frag-needed
    back to its sender, a packet without DF is fragmented (as the kernel's
    ip_forward / ip_fragment do); nothing is lost silently.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from pylvs.lab.httpd import content
from pylvs.lab.topology import wait_for_line

pytestmark = pytest.mark.netns

MTU = 1280
SIZE = 200_000


def _download(lab, tmp_path):
    out = tmp_path / "down"
    p = lab.curl(f"/bytes/{SIZE}", "-o", str(out), max_time=10, check=False)
    assert p.returncode == 0, f"download: curl rc {p.returncode} {p.stderr.strip()}, " \
                              f"{out.stat().st_size if out.exists() else 0} bytes arrived"
    assert out.read_bytes() == content(0, SIZE)


def test_router_frag_needed_reaches_the_real_server(director_lab, tmp_path):
    lab = director_lab(servers=1, router=True, router_mtu=MTU)
    lab.nat_service("tcp", 80, (1,))
    # Small answers fit any MTU: the routed path itself works.
    assert lab.curl("/whoami", max_time=5).stdout.strip() == "rs1"
    _download(lab, tmp_path)
    assert lab.stats()["icmp_forwarded"] >= 1


UDP_SINK = """
import json, socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 9))
u.settimeout(5)
print("ready", flush=True)
try:
    data, _ = u.recvfrom(65535)
    print(json.dumps({"len": len(data), "sha": __import__("hashlib").sha256(data).hexdigest()}))
except socket.timeout:
    print(json.dumps({"len": None}))
"""

UDP_SEND = """
import json, socket, sys
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0  # <linux/in.h>
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
# DF clear, whatever the path MTU: a router (here the director) must fragment.
u.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
u.sendto(bytes(range(256)) * 5 + bytes(120), (sys.argv[1], 9))
print(json.dumps("sent"))
"""


def test_director_egress_mtu_smaller_than_the_clients(director_lab, tmp_path):
    lab = director_lab(servers=1, server_mtu=MTU)
    # The real server advertises an MSS of 1460 as if its path were 1500
    # (route advmss), so the client sends full 1500-byte segments: the
    # director's 1280 egress is the narrowest link, and it is the director's
    # to report (frag-needed) or the client's upload stalls.
    lab.run(lab.rs[0], ["ip", "route", "change", "default", "via", lab.dip, "advmss", "1460"])
    lab.nat_service("tcp", 80, (1,))
    lab.nat_service("udp", 9, (1,))

    # The datagram first, while the client still believes in a 1500 path: it
    # sends it whole (no DF), so it is the director that must fragment. (Once
    # the client has learnt 1280 it fragments itself, and the director does
    # not reassemble what it receives.)
    sink = lab.popen(lab.rs[0], [lab.python, "-c", UDP_SINK], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    assert wait_for_line(sink, "ready", 10), sink.stderr.read() if sink.poll() else ""
    lab.py(lab.client, UDP_SEND, args=(lab.vip,))
    out, err = sink.communicate(timeout=10)
    got = json.loads(out.strip().splitlines()[-1])
    want = bytes(range(256)) * 5 + bytes(120)
    assert got == {"len": 1400, "sha": hashlib.sha256(want).hexdigest()}, (got, err)
    assert lab.stats()["tx_fragmented"] >= 1

    up = tmp_path / "up"
    up.write_bytes(content(7, SIZE))
    # Twice: with the client's offloads on (the director gets GSO frames
    # whose segments exceed its egress MTU), then off (plain 1500-byte
    # frames). The client's learnt path MTU is flushed in between.
    for offload in ("on", "off"):
        lab.run(lab.client, ["ethtool", "-K", "eth0", "tso", offload, "gso", offload])
        lab.run(lab.client, ["ip", "route", "flush", "cache"])
        before = lab.stats().get("icmp_frag_needed_sent", 0)
        p = lab.curl("/sink", "-T", str(up), "-H", "Expect:", max_time=10, check=False)
        assert p.returncode == 0, f"upload (offload {offload}): curl rc {p.returncode} " \
                                  f"{p.stderr.strip()}"
        assert p.stdout.split() == [str(SIZE), hashlib.sha256(up.read_bytes()).hexdigest()]
        assert lab.stats()["icmp_frag_needed_sent"] > before, f"offload {offload}"
    _download(lab, tmp_path)

