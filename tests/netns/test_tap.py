"""The TAP backend end to end: `pylvs run --tap` in the `--io tap` lab.

The lab (pylvs/lab/topology.py, ``io="tap"``, netns-labs/tap/README.md) is
the routed mixed lab whose director namespace only bridges: eth0 with tap0
(the front segment: router, DR real servers) and eth1 with tap1 (the NAT
real servers). pylvs owns 10.0.0.1/24, 10.0.1.1/24 and the VIP, answers ARP
and ping for them and resolves its neighbours by ARP itself.

The HTTP tests of test_fwd_methods.py (1 B, 100 KB, 10 MB downloads and a
2 MB upload byte for byte through NAT, DR, Tun IPIP and GUE each alone;
weights across the three methods; `-e` keeping running conns) run here
unchanged over the TAP backend: they are imported, and this module's
``mixed`` fixture gives them a TAP lab.
"""

from __future__ import annotations

import socket
import subprocess
import struct
import sys
import time

import pytest

from pylvs.lab.topology import Lab
from test_fwd_methods import (PORT, assert_content, download,  # noqa: F401 (tests rerun here)
                              test_edit_method_keeps_running_conns, test_http_byte_for_byte,
                              test_mixed_service_distributes_by_weight, whoami_many)

pytestmark = pytest.mark.netns

MAC = "02:00:00:00:aa:01"   # the director's on tap0 (tap1: ...:02)


@pytest.fixture
def mixed(director_lab) -> Lab:
    return director_lab(fwd="mixed", servers=3, io="tap", run_args=("--mac", MAC))


PING = r"""
import socket, struct, sys, json
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(1)
got = {}
for dst in sys.argv[1:]:
    body = struct.pack('!BBHHH', 8, 0, 0, 0x4242, 7) + b'pylvs-ping'
    body = body[:2] + struct.pack('!H', csum(body)) + body[4:]
    for _ in range(3):
        s.sendto(body, (dst, 0))
        try:
            while True:
                d, a = s.recvfrom(2000)
                ihl = (d[0] & 15) * 4
                if a[0] == dst and d[ihl] == 0 and d[ihl + 8:] == b'pylvs-ping':
                    got[dst] = True
                    break
        except socket.timeout:
            continue
        break
print(json.dumps(got))
"""


def test_ping_and_arp(mixed: Lab):
    """Ping answered for the VIP (once a service holds it) and both DIPs,
    from the client behind the router and from a NAT real server; the
    neighbours learn the director's MAC, not the TAP device's."""
    lab = mixed
    lab.service("tcp", PORT, [1, None, None])
    # (The router has no route to the NAT segment: the client cannot reach dip.)
    got = lab.py(lab.client, PING, args=(lab.vip, lab.dip0))
    assert got == {lab.vip: True, lab.dip0: True}
    assert lab.py(lab.rs[0], PING, args=(lab.dip,)) == {lab.dip: True}
    assert lab.mac(lab.director, "tap0") != MAC
    neigh = lab.run(lab.router_ns, ["ip", "neigh", "show", lab.vip]).stdout
    assert MAC in neigh, neigh
    st = lab.stats()
    assert st["echo_replies_sent"] >= 3 and st["arp_replies_sent"] >= 2, st
    # A service on a new VIP: announced (gratuitous ARP), then pingable.
    lab.adm("-A", "-t", "10.0.0.101:80", "-s", "rr")
    assert lab.py(lab.client, PING, args=("10.0.0.101",)) == {"10.0.0.101": True}


SEND = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for h in sys.argv[2:]:
    s.send(bytes.fromhex(h))
print("{}")
"""


def test_malformed_frames_counted(mixed: Lab, tmp_path):
    """Malformed frames written into the TAP (an AF_PACKET socket on tap0 in
    the director namespace: the kernel transmits them to pylvs; through the
    lab's bridges they would not come, br_netfilter drops bad IPv4 headers)
    are counted where they fail, and the director goes on serving."""
    lab = mixed
    lab.service("tcp", PORT, [None, 1, None])
    src = bytes.fromhex(lab.mac(lab.rs[1], "eth0").replace(":", ""))
    dst = bytes.fromhex(MAC.replace(":", ""))
    ip_hdr = lambda ihl_byte, proto=6: (bytes([ihl_byte, 0]) + struct.pack("!H", 40)  # noqa: E731
                                        + bytes(4) + bytes([64, proto, 0, 0])
                                        + socket.inet_aton(lab.rips[1])
                                        + socket.inet_aton(lab.vip) + bytes(20))
    frames = {
        "drop_truncated": dst + src + b"\x08\x00" + bytes(6),        # IPv4, 6 bytes of header
        "drop_bad_ip": dst + src + b"\x08\x00" + ip_hdr(0x44),     # IHL 4
        "host_bad_frames": dst + src + b"\x08\x06" + bytes(10),    # ARP, 10 bytes of body
    }
    before = lab.stats()
    for _ in range(3):
        lab.py(lab.director, SEND, args=["tap0", *(f.hex() for f in frames.values())])
    deadline = time.monotonic() + 5
    while True:
        st = lab.stats()
        grown = {k: st[k] - before[k] for k in frames}
        if all(v >= 3 for v in grown.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(v >= 3 for v in grown.values()), grown
    assert lab.procs["director"].poll() is None
    assert whoami_many(lab, 2) == ["rs2", "rs2"]
    rc, code, err = download(lab, 100_000, tmp_path / "after")
    assert (rc, code) == (0, "200"), err
    assert_content(tmp_path / "after", 100_000)


def test_tun_outer_source_is_the_dip(mixed: Lab, tmp_path):
    """VS-Tun's outer packets leave from the egress port's --addr (dip0),
    and the engine has the TAP ports' MTU: a client upload is answered with
    frag-needed for the tunnel's smaller MTU instead of vanishing."""
    lab = mixed
    lab.service("tcp", PORT, [None, None, 1])
    cap = lab.popen(lab.rs[2], ["timeout", "10", "tcpdump", "-nli", "eth0", "-c", "1",
                                "ip proto 4"], stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL)
    time.sleep(1)
    assert whoami_many(lab, 1) == ["rs3"]
    out = cap.communicate(timeout=15)[0].decode()
    assert f"{lab.dip0} > {lab.rips[2]}" in out, out
    body = tmp_path / "up"
    body.write_bytes(bytes(3_000_000))
    p = lab.curl("/sink", "-T", str(body), max_time=20, check=False)
    assert p.returncode == 0 and p.stdout.split()[0] == "3000000", p.stderr
    assert lab.stats()["icmp_frag_needed_sent"] > 0


LOOP = r"""
import json, socket, sys, time
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import raw
from pylvs.engine import new_engine, tables
from pylvs.io import tap

impl = sys.argv[1]
b = tap.open_workers(["t0"], 1, addrs=["10.9.0.1/24"], mac="02:00:00:00:bb:01")[0]
counters = tables.Counters(4, 4)
engine = new_engine(impl, 1024, counters=counters, schedule=lambda *a: -1)
engine.set_ports(b.host.net.state.ports)
# The kernel's side of the TAP: what it transmits reaches pylvs, what
# pylvs writes arrives here.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("t0", 0))
s.settimeout(0.05)
me, peer = "02:00:00:00:bb:01", "02:00:00:00:bb:09"
frames = [
    Ether(src=peer, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=peer, psrc="10.9.0.9", pdst="10.9.0.1"),
    Ether(src=peer, dst=me) / IP(src="10.9.0.9", dst="10.9.0.1") / ICMP(id=9, seq=1),
]
for f in frames:
    s.send(raw(f))
s.send(bytes.fromhex(me.replace(":", "") + peer.replace(":", "") + "0800") + bytes(6))
got, n, deadline = [], 0, time.monotonic() + 5
while time.monotonic() < deadline and (n < 3 or len(got) < 2):
    n += b.forward(engine, time.monotonic(), 0.05)
    try:
        while True:
            d = s.recv(2000)
            e = Ether(d)
            if e.src == me:
                got.append(e.summary())
    except socket.timeout:
        pass
st = b.stats()
print(json.dumps({"frames": n, "got": got, "truncated": int(counters.named()["drop_truncated"]),
                  "echo": st["echo_replies_sent"], "arp": st["arp_replies_sent"]}))
"""


@pytest.mark.parametrize("impl", ["c", "python"])
def test_backend_loops_in_a_namespace(uid, impl):
    """Both loops (the C one for the C engine, recv/process/send for the
    Python engine) on a TAP pylvs creates itself in a fresh namespace:
    the engine's drops are counted, ARP and echo for the DIP answered."""
    import json as _json

    from pylvs.lab.topology import _repo_root, remove_netns

    ns = f"pl{uid}-tap"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", LOOP, impl],
                           capture_output=True, text=True, timeout=60, cwd=_repo_root())
        assert p.returncode == 0, p.stderr
        out = _json.loads(p.stdout.strip().splitlines()[-1])
        assert out["frames"] >= 3 and out["truncated"] == 1, out
        assert (out["arp"], out["echo"]) == (1, 1), out
        assert any("ARP is at" in g for g in out["got"]), out
        assert any("echo-reply" in g for g in out["got"]), out
    finally:
        remove_netns(ns)


QUEUES = r"""
import json, subprocess
from pylvs.io import tap
bs = tap.open_workers(["t0"], 2, addrs=["10.9.0.1/24"])
link = subprocess.run(["ip", "-d", "link", "show", "t0"], capture_output=True, text=True).stdout
print(json.dumps({"shared": bs[1].host is bs[0].host, "fds": len({b.fds[0] for b in bs}),
                  "macs": len({b.ports[0].mac for b in bs}), "link": link}))
"""


def test_one_queue_per_worker(uid):
    """open_workers(n=2): two queues of one multi-queue TAP, one host."""
    import json as _json

    from pylvs.lab.topology import _repo_root, remove_netns

    ns = f"pl{uid}-tapq"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", QUEUES],
                           capture_output=True, text=True, timeout=60, cwd=_repo_root())
        assert p.returncode == 0, p.stderr
        out = _json.loads(p.stdout.strip().splitlines()[-1])
        assert (out["shared"], out["fds"], out["macs"]) == (True, 2, 1), out
        assert "multi_queue numqueues 2" in out["link"], out["link"]
    finally:
        remove_netns(ns)


def test_restart_takes_the_vip_back(director_lab):
    """A restarted director (a new random MAC) is reached at once: it
    announces its addresses by gratuitous ARP, so the client's stale
    neighbour entry for the VIP is replaced without waiting for it to age."""
    lab = director_lab(io="tap")
    lab.nat_service("tcp", PORT, [1, 1], sched="rr")
    assert whoami_many(lab, 2) == ["rs1", "rs2"]
    before = lab.run(lab.client, ["ip", "neigh", "show", lab.vip]).stdout.split()
    lab.stop_director()
    lab.start_director()
    lab.nat_service("tcp", PORT, [1, 1], sched="rr")
    p = lab.curl("/whoami", "--connect-timeout", "2", max_time=3, check=False)
    assert p.returncode == 0 and p.stdout.strip() == "rs1", p.stderr
    after = lab.run(lab.client, ["ip", "neigh", "show", lab.vip]).stdout.split()
    mac = after[after.index("lladdr") + 1]
    assert mac != before[before.index("lladdr") + 1]
