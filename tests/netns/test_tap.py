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
``mixed`` fixture gives them a TAP lab; the downloads run with 1 and 2
workers (one TAP queue each, steered by tap_steer.bpf.c).
"""

from __future__ import annotations

import socket
import subprocess
import struct
import sys
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

import test_fwd_methods as fwd
from pylvs.io import bpf
from pylvs.lab.topology import Lab
from test_fwd_methods import (PORT, assert_content, download,  # noqa: F401 (tests rerun here)
                              test_edit_method_keeps_running_conns,
                              test_mixed_service_distributes_by_weight, whoami_many)
from test_workers import CLIENTS, check_round, director_view, send_round

pytestmark = pytest.mark.netns

MAC = "02:00:00:00:aa:01"   # the director's on tap0 (tap1: ...:02)


@pytest.fixture
def mixed(director_lab) -> Lab:
    return director_lab(fwd="mixed", servers=3, io="tap", run_args=("--mac", MAC))


# Every method with one worker; with two, one of each method (the GUE
# variants differ only in the tunnel's header, not in what is steered).
HTTP_CASES = ([pytest.param(1, *m[1:], id=f"{m[0]}-1worker") for m in fwd.METHODS]
              + [pytest.param(2, *m[1:], id=f"{m[0]}-2workers") for m in fwd.METHODS[:3]])


@pytest.mark.parametrize("workers,rs,tun", HTTP_CASES, indirect=["workers"])
def test_http_byte_for_byte(mixed: Lab, tmp_path, rs, tun):
    """test_fwd_methods's downloads and upload over the TAP lab."""
    fwd.test_http_byte_for_byte(mixed, tmp_path, rs, tun)


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
    # rr walks the kernel's dest list, newest first.
    assert whoami_many(lab, 2) == ["rs2", "rs1"]
    before = lab.run(lab.client, ["ip", "neigh", "show", lab.vip]).stdout.split()
    lab.stop_director()
    lab.start_director()
    lab.nat_service("tcp", PORT, [1, 1], sched="rr")
    p = lab.curl("/whoami", "--connect-timeout", "2", max_time=3, check=False)
    assert p.returncode == 0 and p.stdout.strip() == "rs2", p.stderr
    after = lab.run(lab.client, ["ip", "neigh", "show", lab.vip]).stdout.split()
    mac = after[after.index("lladdr") + 1]
    assert mac != before[before.index("lladdr") + 1]


# --- workers: one TAP queue each, steered by client address ----------------------

STEER = r"""
import json, sys
from pylvs import _bpf
from pylvs.io import tap
bs = tap.open_workers(["t0"], 2, addrs=["10.9.0.1/24"])
steering = bs[0].steering
# BPF_PROG_TEST_RUN gives a socket filter the frame past a first Ethernet
# header (eth_type_trans); the TAP's transmit path gives it the frame from
# its own: a dummy IPv4 header in front makes the two the same.
pad = bytes(12) + b"\x08\x00"
out = {"values": []}
for svc, dst in json.loads(sys.argv[1]):   # one table after the other
    steering.apply([tuple(k) for k in svc], [tuple(k) for k in dst])
    out["values"].append([_bpf.prog_test_run(steering.prog_id, pad + bytes.fromhex(h))
                          for h in sys.argv[2:]])
try:
    tap.TapSteering(bs[0].fds, max_services=0)
except OSError as e:
    out["error"] = str(e)
for b in bs[::-1]:
    b.close()
# Where the program cannot be set: one worker, and a warning says why.
import logging
warnings = []

class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())

logging.getLogger("pylvs.tap").addHandler(Keep())
tap.BPF_OBJECT = "/nonexistent.bpf.o"
one = tap.open_workers(["t2"], 2, addrs=["10.9.0.1/24"])
out["fallback"] = [len(one), tap.queues_open("t2"), warnings]
print(json.dumps(out))
"""

VIP, RIP, CADDR, ROUTER, DIP = "10.0.0.100", "10.0.1.2", "192.0.2.77", "10.0.0.254", "10.0.1.1"
STEER_SVC = [(17, bpf.ip(VIP), 53), (6, bpf.ip(VIP), 80)]
STEER_DST = [(17, bpf.ip(RIP), 5353)]

# (description, Ethernet frame): the program's value must be the fanout
# program's mix (steer_index with 2**16 workers is the mix itself).
STEER_CASES = [
    ("UDP client to VIP: caddr", Ether() / IP(src=CADDR, dst=VIP) / UDP(sport=4000, dport=53)),
    ("TCP client to VIP: caddr", Ether() / IP(src=CADDR, dst=VIP) / TCP(sport=4000, dport=80)),
    ("NAT reply from the dest: daddr",
     Ether() / IP(src=RIP, dst=CADDR) / UDP(sport=5353, dport=4000)),
    ("reply from the VIP: daddr", Ether() / IP(src=VIP, dst=CADDR) / TCP(sport=80, dport=4000)),
    ("a dest's other port: saddr", Ether() / IP(src=RIP, dst=CADDR) / UDP(sport=99, dport=4000)),
    ("not a service: saddr", Ether() / IP(src=CADDR, dst=VIP) / UDP(sport=4000, dport=54)),
    ("echo request to the VIP: saddr", Ether() / IP(src=CADDR, dst=VIP) / ICMP()),
    ("ICMP error about a NAT reply: the quoted daddr",
     Ether() / IP(src=ROUTER, dst=RIP) / ICMP(type=3, code=4)
     / IP(src=RIP, dst=CADDR) / UDP(sport=5353, dport=4000)),
    ("ICMP error about a tunnel packet: the inner saddr",
     Ether() / IP(src=ROUTER, dst=DIP) / ICMP(type=3, code=4)
     / IP(src=DIP, dst=RIP, proto=4) / IP(src=CADDR, dst=VIP) / TCP(sport=4000, dport=80)),
    ("ICMP error cut inside the quoted header: 0",
     Ether() / IP(src=ROUTER, dst=RIP) / ICMP(type=11) / bytes(6)),
    ("UDP header cut short: 0", Ether() / IP(src=CADDR, dst=VIP, proto=17) / bytes(3)),
    ("IPv4 header cut short: 0", Ether(type=0x0800) / bytes(12)),
    ("ARP: 0", Ether() / ARP(psrc=CADDR, pdst=VIP)),
    ("IPv6: 0", Ether(type=0x86DD) / bytes(40)),
]


def _in_fresh_netns(uid, tag: str, code: str, *args: str) -> dict | list:
    import json as _json

    from pylvs.lab.topology import _repo_root, remove_netns

    ns = f"pl{uid}-{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                           capture_output=True, text=True, timeout=60, cwd=_repo_root())
        assert p.returncode == 0, p.stderr
        return _json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        remove_netns(ns)


def test_steering_program_is_the_fanout_rule(uid):
    """tap_steer.bpf.c, run by the kernel on each frame of the table, gives
    the value the AF_PACKET fanout program gives (bpf.steer_index), with
    the table above and with services added until the classic program
    would fall back to addresses, then to saddr (bpf.fanout_plan): the eBPF
    programs key by the full rule at every size; a program that cannot be
    loaded is a clear error, and open_workers then gives one worker with a
    warning."""
    import json as _json

    frames = [bytes(f) for _, f in STEER_CASES]
    # Services on other addresses: 1000 make the classic program compare
    # addresses only, 1100 key everything by saddr.
    tables_ = [(STEER_SVC + [(6, bpf.ip("10.50.0.0") + i, 80) for i in range(k)], STEER_DST)
               for k in (0, 1000, 1100)]
    assert [bpf.fanout_plan(*t) for t in tables_] == [bpf.FANOUT_FULL, bpf.FANOUT_ADDRS,
                                                       bpf.FANOUT_SADDR]
    out = _in_fresh_netns(uid, "steer", STEER, _json.dumps(tables_), *(f.hex() for f in frames))
    for t, got in zip(tables_, out["values"]):
        want = [bpf.steer_index(f, 1 << 16, *t) for f in frames]
        assert {d: g for (d, _), g in zip(STEER_CASES, got)} == \
            {d: w for (d, _), w in zip(STEER_CASES, want)}, bpf.fanout_plan(*t)
    keys, addrs, saddr = out["values"]
    assert keys[0] == keys[2] == keys[3] != 0   # one client, both ways
    assert keys == addrs == saddr   # the size of the tables changes nothing
    assert out["error"].startswith("TAP queue steering: map services: max_entries 0"), out
    n, queues, (warning,) = out["fallback"]
    assert (n, queues) == (1, 1), out
    assert warning.startswith("TAP queue steering: opening BPF object /nonexistent.bpf.o")
    assert warning.endswith("one worker instead of 2"), warning


LEFTOVER = r"""
import json, os, subprocess, sys
from pylvs import _bpf
from pylvs.io import tap

def alive(prog_id):
    try:
        _bpf.prog_info(prog_id)
        return True
    except OSError:
        return False

def gone(prog_id):
    # The device drops its program after an RCU grace period.
    import time
    for _ in range(100):
        if not alive(prog_id):
            return True
        time.sleep(0.02)
    return False

if sys.argv[1] == "child":
    bs = tap.open_workers(["t1"], 2, addrs=["10.9.0.1/24"])
    print(bs[0].steering.prog_id, flush=True)
    os._exit(0)   # as after kill -9: nothing closed
subprocess.run(["ip", "tuntap", "add", "t1", "mode", "tap", "multi_queue", "vnet_hdr"], check=True)
out = {}
bs = tap.open_workers(["t1"], 2, addrs=["10.9.0.1/24"])
pid = bs[0].steering.prog_id
for b in bs[::-1]:
    b.close()
out["stop"] = gone(pid)
child = subprocess.run([sys.executable, "-c", sys.argv[2], "child", sys.argv[2]],
                       capture_output=True, text=True, check=True)
pid = int(child.stdout.split()[-1])
out["left_by_kill"] = alive(pid)
bs = tap.open_workers(["t1"], 1, addrs=["10.9.0.1/24"])
out["one_worker_start"] = gone(pid)
out["queues"] = tap.queues_open("t1")
try:   # bs still holds its queue
    tap.open_workers(["t1"], 2, addrs=["10.9.0.1/24"])
except OSError as e:
    out["second"] = str(e)
print(json.dumps(out))
"""


def test_steering_program_left_on_a_persistent_tap_only_by_kill(uid):
    """A stop detaches the program from a persistent TAP; one left by a
    director that died outright is taken off by the next start (here with
    one worker, which sets none); a TAP whose queues another process holds
    is refused, since worker i must own queue i."""
    out = _in_fresh_netns(uid, "stale", LEFTOVER, "parent", LEFTOVER)
    assert out["stop"] and out["left_by_kill"] and out["one_worker_start"], out
    assert out["queues"] == 1, out
    assert "another process holds" in out["second"], out


@pytest.mark.parametrize("workers", [2], ids=["2workers"], indirect=True)
def test_both_directions_of_every_client_reach_its_worker(director_lab, workers):
    """60 clients x 2 UDP flows through VS-NAT over the TAP lab: each conn
    is held by the worker bpf.steer_index names, and every reply came back
    (a reply steered to the other worker would find no conn there and never
    reach the client). Counters are sums over the workers."""
    lab = director_lab(io="tap", servers=3)
    for a in CLIENTS:
        lab.run(lab.client, ["ip", "addr", "add", f"{a}/24", "dev", "eth0"])
    lab.nat_service("udp", 7, (1, 1, 1))
    sent = send_round(lab)
    view = director_view(lab)
    assert set(check_round(lab, sent, view)) == {0, 1}
    io = view["stats"]["io"]
    per_worker = [w["io"] for w in view["stats"]["workers"]]
    assert all(w["rx_frames"] > 0 for w in per_worker), per_worker
    assert io["rx_frames"] == sum(w["rx_frames"] for w in per_worker)
    # The host's counters (ARP) are the director's, counted once.
    assert io["arp_replies_sent"] == per_worker[0]["arp_replies_sent"] > 0, per_worker
    assert "arp_replies_sent" not in per_worker[1]
    assert sum(1 for line in lab.adm("-L", "-n", "-c").splitlines()
               if line.startswith("UDP")) == len(sent)
    # Echo requests to the VIP reach the worker of their source: both
    # workers' threads answer for the one host.
    by_worker = {bpf.steer_index(bytes(Ether() / IP(src=a, dst=lab.vip) / ICMP()), 2, [], []): a
                 for a in CLIENTS}
    assert set(by_worker) == {0, 1}
    before = lab.stats()["echo_replies_sent"]
    for a in by_worker.values():
        p = lab.run(lab.client, ["ping", "-c", "1", "-W", "2", "-I", a, lab.vip], check=False)
        assert p.returncode == 0, (a, p.stdout, p.stderr)
    assert lab.stats()["echo_replies_sent"] == before + 2
