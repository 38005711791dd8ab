"""Steering in the director's namespace (never the root one): the nft table
and the tcx BPF program apply the same rules (pylvs/control/steering.py);
the behaviour tests run on both (``S`` in the snippets is the class under
test)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time

import pytest

import sys

from nsio import REPO, Trio, sh

pytestmark = pytest.mark.netns

KINDS = ["bpf", "nft"]
CLASSES = {"bpf": "BpfSteering", "nft": "NftSteering"}


def nft(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, "nft", *args, check=check)


def _prelude(kind: str) -> str:
    return ("import json, sys\nfrom pylvs.control import steering\n"
            f"from pylvs.control.steering import {CLASSES[kind]} as S\n"
            "from pylvs.io.bpf import ip\n")


def steer(trio: Trio, body: str, kind: str = "nft"):
    return trio.py(trio.d, _prelude(kind) + body)


@contextlib.contextmanager
def steering_held(trio: Trio, kind: str, body: str):
    """Steering set up by ``body`` (which binds ``s``) in a process of the
    director's namespace that keeps it until the block ends (a BPF program
    lives as long as its process)."""
    code = _prelude(kind) + body + (
        "\nprint('ready', flush=True)\nsys.stdin.read()\ns.remove()\n")
    p = subprocess.Popen(["ip", "netns", "exec", trio.d, sys.executable, "-c", code],
                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        yield p
    finally:
        p.stdin.close()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_nft_rules_match_the_listing(trio):
    steer(trio, """
s = S(["d0", "d1"])
s.apply([(6, ip("10.9.0.1"), 80), (17, ip("10.9.0.1"), 53)],
        [(6, ip("10.9.1.2"), 8080)], ["10.9.0.1", "10.9.1.1"])
print(json.dumps(None))
""")
    text = nft(trio.d, "list", "table", "netdev", "pylvs").stdout
    assert "10.9.0.1 . tcp . 80" in text and "10.9.0.1 . udp . 53" in text
    assert "10.9.1.2 . tcp . 8080" in text
    assert "10.9.0.1, 10.9.1.1" in text
    for dev in ("d0", "d1"):
        assert f'type filter hook ingress device "{dev}" priority -500; policy accept;' in text
    assert text.count("ip daddr . meta l4proto . th dport @services drop") == 2
    assert text.count("ip daddr != @local ip saddr . meta l4proto . th sport @realservers drop") == 2
    # ICMP errors from a NAT real server to anyone but the director.
    assert text.count("ip daddr != @local ip saddr @rsaddrs icmp type "
                      "{ destination-unreachable, source-quench, time-exceeded } drop") == 2
    assert "elements = { 10.9.1.2 }" in text  # rsaddrs
    assert text.count("meta pkttype != host jump not_host") == 2
    assert "counter not_host" in text


@pytest.mark.parametrize("kind", KINDS)
def test_update_replaces_set_contents(trio, kind):
    res = steer(trio, """
s = S(["d0"])
s.apply([(6, ip("10.9.0.1"), 80)], [(6, ip("10.9.1.2"), 8080)], ["10.9.0.1"])
first = s.sets()
s.apply([(6, ip("10.9.0.1"), 443), (17, ip("10.9.0.7"), 53)], [], ["10.9.0.1", "10.9.1.1"])
print(json.dumps([first, s.sets()]))
s.remove()
""", kind)
    a, v, r, rip = ip("10.9.0.1"), ip("10.9.0.7"), ip("10.9.1.1"), ip("10.9.1.2")
    assert res[0] == {"services": [[6, a, 80]], "realservers": [[6, rip, 8080]],
                      "rsaddrs": [rip], "vips": [a], "local": [a]}
    assert res[1] == {"services": [[6, a, 443], [17, v, 53]], "realservers": [],
                      "rsaddrs": [], "vips": [a, v], "local": [a, r]}


def ip(text: str) -> int:
    import ipaddress
    return int(ipaddress.IPv4Address(text))


def test_bpf_change_updates_the_maps_without_reattaching(trio):
    # One program, one link per interface for the director's whole life: a
    # table change rewrites map entries only, and another process sees the
    # same sets through the attached program.
    res = steer(trio, """
from pylvs import _bpf
import socket
s = S(["d0", "d1"])
def links():
    return [(l.id, l.prog_id) for l in s.links]
def attached():
    return [_bpf.tcx_query(socket.if_nametoindex(n)) for n in ("d0", "d1")]
before = (links(), attached())
s.apply([(6, ip("10.9.0.1"), 80)], [(6, ip("10.9.1.2"), 8080)], ["10.9.0.1"])
s.apply([(6, ip("10.9.0.1"), 81)], [], ["10.9.0.1"])
after = (links(), attached(), steering.attached("d1"))
s.remove()
print(json.dumps([before, after, attached()]))
""", "bpf")
    (links0, att0), (links1, att1, seen), gone = res
    prog = links0[0][1]
    assert links0 == links1 and att0 == att1 == [[prog], [prog]]
    assert links0[0][0] != links0[1][0] and links0[1][1] == prog  # one link per port
    assert seen["prog_id"] == prog
    assert seen["sets"]["services"] == [[6, ip("10.9.0.1"), 81]]
    assert seen["sets"]["realservers"] == [] and seen["sets"]["local"] == [ip("10.9.0.1")]
    assert gone == [[], []]


def test_stale_table_is_replaced_and_removed_on_stop(trio):
    nft(trio.d, "add", "table", "netdev", "pylvs")
    nft(trio.d, "add", "chain", "netdev", "pylvs", "leftover")
    steer(trio, """
s = S(["d0", "d1"])
s.apply([], [], [])
print(json.dumps(None))
""")
    text = nft(trio.d, "list", "table", "netdev", "pylvs").stdout
    assert "leftover" not in text and "chain in_d0" in text
    steer(trio, """
s = S(["d0", "d1"])
s.remove()
s.remove()  # already gone: still fine
print(json.dumps(None))
""")
    assert nft(trio.d, "list", "table", "netdev", "pylvs", check=False).returncode != 0


def test_bpf_start_removes_a_table_left_by_a_killed_nft_run(trio):
    nft(trio.d, "add", "table", "netdev", "pylvs")
    res = steer(trio, """
s = steering.open_steering(["d0"])
print(json.dumps(s.kind))
""")
    assert res == "bpf"
    assert nft(trio.d, "list", "table", "netdev", "pylvs", check=False).returncode != 0


def test_clear_errors(trio):
    res = steer(trio, """
from pylvs.control.steering import SteeringError, NftSteering, BpfSteering
out = []
for make in (lambda: NftSteering(["d0"], nft="/nonexistent/nft"),
             lambda: NftSteering(['d0"; flush ruleset; "']),
             lambda: BpfSteering(["nosuchif"]),
             lambda: BpfSteering(["d0"], obj_path="/nonexistent.bpf.o"),
             lambda: steering.open_steering(["d0"], "bpf", max_services=0)):
    try:
        make().apply([], [], [])
        out.append("no error")
    except SteeringError as e:
        out.append(str(e))
print(json.dumps(out))
""")
    assert "'/nonexistent/nft' not found" in res[0]
    assert res[1].startswith("nftables: unusable interface name")
    assert res[2] == "steering: no interface 'nosuchif' in this namespace"
    assert res[3].startswith("BPF steering: opening BPF object /nonexistent.bpf.o"), res[3]
    assert "max_entries 0 out of range" in res[4], res[4]


SERVER = """
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(); l.settimeout(15)
print("ready", flush=True)
while True:
    try:
        c, _ = l.accept()
    except socket.timeout:
        break
    c.sendall(b"hello from " + sys.argv[1].encode()); c.close()
"""


def serve(trio: Trio, ns: str, addr: str, port: int) -> subprocess.Popen:
    import sys
    from nsio import REPO
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, addr, str(port)],
                         cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def connect(trio: Trio, ns: str, addr: str, port: int) -> str:
    return trio.py(ns, f"""
import socket, json
try:
    s = socket.create_connection(({addr!r}, {port}), timeout=1.5)
    print(json.dumps(s.recv(100).decode()))
except OSError as e:
    print(json.dumps(type(e).__name__))
""")


@pytest.mark.parametrize("kind", KINDS)
def test_director_own_connection_to_real_server_is_not_stolen(trio, kind):
    rs = serve(trio, trio.r, "10.9.1.2", 8080)
    vip = serve(trio, trio.d, "10.9.0.1", 80)
    try:
        # Before steering: the kernel serves both.
        assert connect(trio, trio.d, "10.9.1.2", 8080) == "hello from 10.9.1.2"
        assert connect(trio, trio.c, "10.9.0.1", 80) == "hello from 10.9.0.1"
        with steering_held(trio, kind, """
s = S(["d0", "d1"])
s.apply([(6, ip("10.9.0.1"), 80)], [(6, ip("10.9.1.2"), 8080)], ["10.9.0.1", "10.9.1.1"])
"""):
            # The director's health-check-like connection to the real server
            # still works: its replies are addressed to a local address.
            assert connect(trio, trio.d, "10.9.1.2", 8080) == "hello from 10.9.1.2"
            # Service traffic no longer reaches the kernel: no answer, no RST.
            assert connect(trio, trio.c, "10.9.0.1", 80) in ("TimeoutError", "timeout")
        # Steering removed: the kernel has the VIP's traffic again.
        assert connect(trio, trio.c, "10.9.0.1", 80) == "hello from 10.9.0.1"
    finally:
        for p in (rs, vip):
            p.kill()
            p.wait()


ICMP_KIT = """
import json, socket, struct, sys, time
def csum(data):
    if len(data) % 2: data += b"\\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
def send_frag_needed(dst, marker):
    # ICMP destination unreachable / fragmentation needed (3/4), MTU 1200,
    # quoting a UDP header; the marker rides in the quoted payload.
    quoted = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(marker), 1, 0x4000, 64, 17, 0,
                         socket.inet_aton(dst), socket.inet_aton("10.9.9.9"))
    quoted += struct.pack("!HHHH", 40000, 53, 8 + len(marker), 0) + marker
    body = struct.pack("!BBHHH", 3, 4, 0, 0, 1200) + quoted
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.sendto(body, (dst, 0))
def dest_unreachs():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InDestUnreachs")])
"""

LISTEN = ICMP_KIT + """
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
r.settimeout(1.5)
print("ready", flush=True)
got = 0
try:
    while True:
        if b"rs-error" in r.recv(2048):
            got += 1
except socket.timeout:
    pass
print(json.dumps(got))
"""


def client_gets_rs_error(trio: Trio) -> int:
    listener = trio.popen(trio.c, LISTEN)
    assert listener.stdout.readline().strip() == "ready"
    trio.py(trio.r, ICMP_KIT + "send_frag_needed('10.9.0.2', b'rs-error')\nprint('null')")
    out, err = listener.communicate(timeout=10)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_icmp_errors_from_real_servers_are_not_forwarded_by_the_kernel(trio, kind):
    # issue 5, item 4a: the engine translates them; the kernel must not
    # also forward them with the real server's address inside.
    sh("ip", "netns", "exec", trio.d, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert client_gets_rs_error(trio) == 1  # the kernel routes it
    with steering_held(trio, kind, """
s = S(["d0", "d1"])
s.apply([(17, ip("10.9.0.1"), 53)], [(17, ip("10.9.1.2"), 53)], ["10.9.0.1", "10.9.1.1"])
"""):
        before = trio.py(trio.d, ICMP_KIT + "print(dest_unreachs())")
        assert client_gets_rs_error(trio) == 0
        # Errors to the director itself stay with the kernel: from the real
        # server to its address, and from the client side to the VIP.
        trio.py(trio.r, ICMP_KIT + "send_frag_needed('10.9.1.1', b'to me')\nprint('null')")
        trio.py(trio.c, ICMP_KIT + "send_frag_needed('10.9.0.1', b'to vip')\nprint('null')")
        deadline = time.monotonic() + 5
        while trio.py(trio.d, ICMP_KIT + "print(dest_unreachs())") < before + 2:
            assert time.monotonic() < deadline, "the director's kernel did not get its ICMP errors"
            time.sleep(0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_frames_not_for_this_host_are_refused_and_counted(trio, kind):
    # IPVS ignores frames whose packet type is not PACKET_HOST; the socket
    # filter refuses them and the steering table counts them.
    dmac = trio.mac(trio.d, "d0")
    res = steer(trio, rf"""
import subprocess, sys, time
from pylvs.io.afpacket import AfPacketBackend
from pylvs.engine import tables
svc = [(17, ip("10.9.0.1"), 7)]
s = S(["d0"])
s.apply(svc, [], ["10.9.0.1"])
b = AfPacketBackend(["d0"])
b.set_filter(svc, [])
sender = '''
import socket, struct
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
src = s.getsockname()[4]
for dst in ({dmac!r}, "02:00:00:00:00:99", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"):
    udp = struct.pack("!HHHH", 40000, 7, 8 + len(dst), 0) + dst.encode()
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                      socket.inet_aton("10.9.0.2"), socket.inet_aton("10.9.0.1"))
    s.send(bytes.fromhex(dst.replace(":", "")) + src + b"\\x08\\x00" + iph + udp)
'''
subprocess.run(["ip", "netns", "exec", {trio.c!r}, sys.executable, "-c", sender], check=True)
batch = tables.Batch(16, 2048)
got = []
deadline = time.monotonic() + 1
while time.monotonic() < deadline:
    for i in range(b.recv(batch, 0.1)):
        got.append(batch.frame(i)[10 + 14 + 20 + 8:].decode())
print(json.dumps(dict(got=got, not_host=s.not_host())))
b.close()
s.remove()
""", kind)
    assert res == dict(got=[dmac], not_host=3), res


# --- a killed director gives the VIP back to the kernel -------------------------

TCX_GONE = """
import json, socket, sys, time
from pylvs import _bpf
ifindexes = [socket.if_nametoindex(n) for n in sys.argv[1:]]
print(json.dumps([_bpf.tcx_query(i) for i in ifindexes]), flush=True)
sys.stdin.readline()
end = time.monotonic() + 5
while any(_bpf.tcx_query(i) for i in ifindexes) and time.monotonic() < end:
    time.sleep(0.002)
print(json.dumps([time.monotonic(), [_bpf.tcx_query(i) for i in ifindexes]]), flush=True)
"""

REFUSED = """
import json, socket, sys, time
vip = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()
end, out = time.monotonic() + 5, None
while out is None and time.monotonic() < end:
    s = socket.socket()
    s.settimeout(0.2)
    t = time.monotonic()
    try:
        s.connect((vip, 80))
        out = ["connected", time.monotonic(), 0]
    except ConnectionRefusedError:
        out = ["refused", time.monotonic(), time.monotonic() - t]
    except OSError:
        pass   # dropped: try again with a new connection
    finally:
        s.close()
print(json.dumps(out), flush=True)
"""


def _probe(lab, ns: str, code: str, *args: str) -> subprocess.Popen:
    return lab.popen(ns, [sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)


def test_kill_9_gives_the_vip_back_to_the_kernel_and_a_restart_takes_it(director_lab):
    lab = director_lab(servers=1)
    assert "steering: BPF at tcx ingress" in lab.director_log()
    lab.nat_service("tcp", 80, (1,))
    loop = lab.popen(lab.client, ["sh", "-c", "for i in $(seq 40); do "
                                  + " ".join(lab.curl_argv("/whoami", max_time=1))
                                  + "; echo; sleep 0.05; done"],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    gone = _probe(lab, lab.director, TCX_GONE, *lab.director_ifaces)
    refused = _probe(lab, lab.client, REFUSED, lab.vip)
    before = json.loads(gone.stdout.readline())
    assert all(len(ids) == 1 for ids in before), before   # ours, on every port
    assert refused.stdout.readline().strip() == "ready"
    time.sleep(0.5)   # the curl loop is under way

    director = lab.procs["director"]
    killed = time.monotonic()
    director.kill()
    for p in (gone, refused):
        p.stdin.write("go\n")
        p.stdin.flush()
    director.wait(5)
    gone_at, left = json.loads(gone.stdout.readline())
    assert left == [[] for _ in before] and gone_at - killed < 1.0, (gone_at - killed, left)
    seen = json.loads(refused.stdout.readline())
    assert seen is not None, "the VIP still black-holed 5 s after the kill"
    verdict, at, took = seen
    # The director's kernel answers the VIP again: a RST (nothing local
    # listens on port 80), fast, not a hang.
    assert verdict == "refused" and at - killed < 1.0 and took < 0.1, (verdict, at - killed, took)
    print(f"after kill -9: tcx empty at +{gone_at - killed:.3f} s, "
          f"connect refused at +{at - killed:.3f} s (in {took * 1000:.1f} ms)")

    answers = loop.communicate(timeout=60)[0].split()
    assert "rs1" in answers, answers   # the loop was served before the kill

    # A restarted director takes the VIP back.
    lab.start_director()
    lab.nat_service("tcp", 80, (1,))
    assert lab.curl("/whoami", max_time=5).stdout.strip() == "rs1"


# --- the BPF program's rules, frame by frame (BPF_PROG_TEST_RUN) ----------------

def _rule_cases():
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw

    host, other = "00:00:00:00:00:00", "02:00:00:00:00:99"  # test runs use lo's MAC

    def eth(dst=host):
        return Ether(dst=dst, src="02:00:00:00:00:01")

    def icmp(src, dst, type_, code=0, to=eth()):
        return to / IP(src=src, dst=dst) / ICMP(type=type_, code=code) / IPerror(
            src="10.9.0.2", dst="10.9.9.9") / UDPerror(sport=40000, dport=53)

    to_svc = IP(src="10.9.0.2", dst="10.9.0.1") / TCP(sport=40000, dport=80)
    reply = IP(src="10.9.1.2", dst="10.9.0.2") / TCP(sport=8080, dport=40000)
    # (description, frame, dropped, not_host counted)
    return [
        ("TCP to a service", eth() / to_svc, True, 0),
        ("UDP to a service", eth() / IP(src="10.9.0.2", dst="10.9.0.1") / UDP(dport=53), True, 0),
        ("TCP to the VIP, no service on the port",
         eth() / IP(src="10.9.0.2", dst="10.9.0.1") / TCP(dport=81), False, 0),
        ("UDP to a TCP service's port",
         eth() / IP(src="10.9.0.2", dst="10.9.0.1") / UDP(dport=80), False, 0),
        ("to a service, IP options before the ports",
         eth() / IP(src="10.9.0.2", dst="10.9.0.1", options=b"\x01\x01\x01\x00")
         / TCP(dport=80), True, 0),
        ("first fragment to a service", eth() / IP(src="10.9.0.2", dst="10.9.0.1", flags="MF")
         / TCP(dport=80), True, 0),
        ("non-first fragment to a service (no ports)",
         eth() / IP(src="10.9.0.2", dst="10.9.0.1", proto=6, frag=185) / Raw(b"\0\x50" * 8),
         False, 0),
        ("NAT reply from a real server to a client", eth() / reply, True, 0),
        ("real server's reply to the director's own address",
         eth() / IP(src="10.9.1.2", dst="10.9.1.1") / TCP(sport=8080), False, 0),
        ("from a real server's other port",
         eth() / IP(src="10.9.1.2", dst="10.9.0.2") / TCP(sport=22), False, 0),
        ("frag needed from a real server to a client", icmp("10.9.1.2", "10.9.0.2", 3, 4), True, 0),
        ("time exceeded from a real server to a client", icmp("10.9.1.2", "10.9.0.2", 11), True, 0),
        ("source quench from a real server to a client", icmp("10.9.1.2", "10.9.0.2", 4), True, 0),
        ("echo request from a real server to a client",
         eth() / IP(src="10.9.1.2", dst="10.9.0.2") / ICMP(type=8), False, 0),
        ("ICMP error from a real server to the director", icmp("10.9.1.2", "10.9.1.1", 3, 4),
         False, 0),
        ("ICMP error to a VIP (engine and kernel both get it)",
         icmp("10.9.0.2", "10.9.0.1", 3, 4), False, 0),
        ("ARP", eth("ff:ff:ff:ff:ff:ff") / ARP(pdst="10.9.0.1"), False, 0),
        ("IPv6", eth() / IPv6() / TCP(dport=80), False, 0),
        ("truncated IP header", eth() / Raw(bytes(IP(dst="10.9.0.1"))[:12]), False, 0),
        ("to a service, another host's MAC", eth(other) / to_svc, False, 1),
        ("to a service, broadcast", eth("ff:ff:ff:ff:ff:ff") / to_svc, False, 1),
        ("to a service, multicast", eth("01:00:5e:00:00:01") / to_svc, False, 1),
        ("NAT reply, another host's MAC", eth(other) / reply, False, 1),
        ("ICMP error to a VIP, broadcast", icmp("10.9.0.2", "10.9.0.1", 3, 4,
                                                eth("ff:ff:ff:ff:ff:ff")), False, 1),
        ("ICMP error from a real server, another host's MAC",
         icmp("10.9.1.2", "10.9.0.2", 3, 4, eth(other)), False, 1),
        ("another host's MAC, nothing of ours",
         eth(other) / IP(src="10.9.0.2", dst="10.9.0.1") / TCP(dport=22), False, 0),
    ]


RULE_CASES = _rule_cases()


def test_bpf_program_rules_frame_by_frame(trio):
    frames = [bytes(c[1]).hex() for c in RULE_CASES]
    res = steer(trio, f"""
from pylvs import _bpf
s = S(["d0"])
s.apply([(6, ip("10.9.0.1"), 80), (17, ip("10.9.0.1"), 53)], [(6, ip("10.9.1.2"), 8080)],
        ["10.9.0.1", "10.9.1.1"])
prog = s.links[0].prog_id
out = []
for frame in {frames!r}:
    before = s.not_host()
    verdict = _bpf.prog_test_run(prog, bytes.fromhex(frame))
    out.append([verdict, s.not_host() - before])
s.remove()
print(json.dumps(out))
""", "bpf")
    got = [(c[0], v == 2, n) for c, (v, n) in zip(RULE_CASES, res)]
    assert all(v in (0, 2) for v, _ in res), res   # TC_ACT_OK or TC_ACT_SHOT only
    assert got == [(c[0], c[2], c[3]) for c in RULE_CASES]


def test_falls_back_to_nft_with_one_warning_when_bpf_cannot_attach(trio):
    # As on a kernel without tcx: the BPF object does not load or attach.
    res = steer(trio, """
import logging
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append([record.levelname, record.getMessage()])
logging.getLogger("pylvs").addHandler(Keep())
logging.getLogger("pylvs").setLevel(logging.INFO)
bad = "/nonexistent/steer.bpf.o"
s = steering.open_steering(["d0"], obj_path=bad)
s.apply([(6, ip("10.9.0.1"), 80)], [], ["10.9.0.1"])
sets = s.sets()
try:
    steering.open_steering(["d0"], "bpf", obj_path=bad)
    asked = "no error"
except steering.SteeringError as e:
    asked = str(e)
print(json.dumps([s.kind, sets["services"], lines, asked]))
s.remove()
""")
    kind, services, lines, asked = res
    assert kind == "nft" and services == [[6, ip("10.9.0.1"), 80]]
    assert len(lines) == 1 and lines[0][0] == "WARNING", lines
    assert "falling back to nftables" in lines[0][1] and "/nonexistent/steer.bpf.o" in lines[0][1]
    assert asked.startswith("BPF steering: opening BPF object /nonexistent/steer.bpf.o")
