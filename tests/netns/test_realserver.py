"""`pylvs realserver` in namespaces: setup/status/teardown, refusals, and the
user-space decapsulator carrying a real TCP connection.

The decapsulation topology is the trio of nsio (client c, "director" d, real
server r). d runs a tiny relay written for the test: it takes the client's
packets to the VIP off d0 (an nft ingress rule keeps d's own stack from
answering them) and sends each inside IPIP or GUE to the RIP; the real
server's replies go back through d's ordinary forwarding, never through the
relay, as a VS-Tun real server's replies do::

    c 10.9.0.2 ──► d0 [relay: IPIP/GUE to 10.9.1.2] d1 ──► eth0 10.9.1.2  r
      ◄───────────── d forwards the reply (src VIP) ◄──────  VIP on lo, listener :8080
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from nsio import PY, REPO, Trio, sh

pytestmark = pytest.mark.netns

VIP = "10.9.200.1"
RIP, DIP = "10.9.1.2", "10.9.1.1"
GUE_PORT = 6080


def rs(ns: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`pylvs realserver ARGS` in a namespace."""
    return subprocess.run(["ip", "netns", "exec", ns, PY, "-m", "pylvs.cli.main", "realserver",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def snapshot(ns: str) -> dict:
    """Every IPv4 conf sysctl, address, route (all tables) and link flag of a namespace."""
    conf = sh("ip", "netns", "exec", ns, "sh", "-c",
              "cd /proc/sys/net/ipv4/conf && grep -r . */arp_* */rp_filter").stdout
    addrs = json.loads(sh("ip", "-4", "-n", ns, "-j", "addr").stdout)
    for link in addrs:
        # Counters and timers move on their own.
        for k in ("stats64", "operstate", "qdisc"):
            link.pop(k, None)
    routes = sh("ip", "-4", "-n", ns, "route", "show", "table", "all").stdout
    return {"conf": sorted(conf.splitlines()), "addrs": addrs, "routes": routes}


def state_file(ns: str) -> str:
    ino = sh("ip", "netns", "exec", ns, "stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout
    return f"/run/pylvs/realserver-{ino.strip()}.json"


@pytest.fixture
def r(trio):
    """The trio's real server with strict reverse-path filtering on `all`, as many distros ship."""
    sh("ip", "netns", "exec", trio.r, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
    # A new namespace may reuse the inode of one a killed run left a state
    # file for; that file is stale by definition (setup discards it too).
    stale = state_file(trio.r)
    if os.path.exists(stale):
        os.unlink(stale)
    yield trio.r
    rs(trio.r, "teardown")


SETUPS = {
    "dr": ["--fwd", "dr", "--vip", VIP, "--vip", "10.9.200.2"],
    "tun": ["--fwd", "tun", "--vip", VIP, "--iface", "eth0"],
    "nat-default": ["--fwd", "nat", "--dip", "10.9.1.3"],
    "nat-clients": ["--fwd", "nat", "--dip", "10.9.1.3", "--clients", "10.9.0.0/24"],
}


@pytest.mark.parametrize("name", SETUPS)
def test_setup_status_teardown_round_trip(r, name):
    before = snapshot(r)
    p = rs(r, "setup", *SETUPS[name])
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "change(s) made and recorded" in p.stdout, (p.stdout, p.stderr)
    after = snapshot(r)
    conf = set(after["conf"])
    routes = after["routes"]
    if name in ("dr", "tun"):
        for line in ("all/arp_ignore:1", "eth0/arp_ignore:1", "all/arp_announce:2",
                     "eth0/arp_announce:2"):
            assert line in conf
        assert f"local {VIP} dev lo" in routes
        assert "arp_ignore" in p.stdout and "ARP problem" in p.stdout
    if name == "tun":
        # all lowered so the tunnel device's own 0 counts, every other device
        # raised to the old strict value: their effective filtering is unchanged.
        assert {"all/rp_filter:0", "eth0/rp_filter:1", "default/rp_filter:1",
                "lo/rp_filter:1"} <= conf
        assert "pylvs realserver run --iface eth0 --vip 10.9.200.1" in p.stdout
    if name == "dr":
        assert "all/rp_filter:1" in conf
    if name == "nat-default":
        assert "default via 10.9.1.3 dev eth0" in routes
    if name == "nat-clients":
        assert "10.9.0.0/24 via 10.9.1.3 dev eth0" in routes
        assert "default via 10.9.1.1 dev eth0" in routes

    st = rs(r, "status", "--json")
    status = json.loads(st.stdout)
    assert status["setup"]["fwd"] == SETUPS[name][1]
    verdicts = {c["name"]: c["verdict"] for c in status["checks"]}
    if name == "tun":
        # No ipip module here and no decapsulator running yet: status says so.
        assert status["mode"] == "decap" and verdicts["decapsulator"] == "warn"
        assert st.returncode == 1
    else:
        assert set(verdicts.values()) == {"ok"}, status
        assert st.returncode == 0

    t = rs(r, "teardown")
    assert t.returncode == 0, t.stderr
    assert "undone" in t.stdout
    assert snapshot(r) == before
    assert not os.path.exists(state_file(r))
    again = rs(r, "teardown")
    assert again.returncode == 0 and "nothing to tear down" in again.stdout


def test_second_setup_changes_nothing_and_teardown_still_restores(r):
    before = snapshot(r)
    args = SETUPS["tun"]
    assert rs(r, "setup", *args).returncode == 0
    mid, record = snapshot(r), open(state_file(r)).read()
    p = rs(r, "setup", *args)
    assert p.returncode == 0, p.stderr
    assert "nothing changed: already set up" in p.stdout
    assert "changed " not in p.stdout.replace("nothing changed", "")
    assert snapshot(r) == mid and open(state_file(r)).read() == record
    # Something changed behind setup's back is repaired, and the record keeps
    # the value from before the first setup.
    sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.conf.eth0.arp_ignore=0")
    p = rs(r, "setup", *args)
    assert "eth0.arp_ignore = 1 (was 0)" in p.stdout and "1 change(s)" in p.stdout
    assert rs(r, "teardown").returncode == 0
    assert snapshot(r) == before


def _stale_record() -> dict:
    return {"version": 1, "config": {"fwd": "dr", "vips": ["10.9.250.1"], "iface": "eth0",
                                     "dip": "", "clients": []},
            # A netns cookie is never reused within a boot: 1 is some other namespace's.
            "netns": {"inode": 0, "cookie": 1}, "mode": "",
            "changes": [{"kind": "sysctl", "dev": "lo", "name": "rp_filter", "old": 1, "new": 0,
                         "changed": True, "why": ""}]}


def test_stale_state_file_of_a_deleted_namespace_is_discarded(r):
    # Namespace inodes are reused: a file left by a namespace that no longer
    # exists must neither block setup nor be "restored" here; status only
    # reports it and never removes it.
    before = snapshot(r)
    os.makedirs("/run/pylvs", exist_ok=True)
    with open(state_file(r), "w") as f:
        json.dump(_stale_record(), f)
    st = rs(r, "status")
    assert st.returncode == 1 and "belongs to a deleted network namespace" in st.stdout, st
    assert "not set up by pylvs here" in st.stdout
    assert os.path.exists(state_file(r))
    p = rs(r, "setup", *SETUPS["dr"])
    assert p.returncode == 0, p.stderr
    assert "stale" in p.stderr and "left by a deleted namespace" in p.stderr
    assert rs(r, "teardown").returncode == 0
    assert snapshot(r) == before


@pytest.mark.parametrize("change", ["mac", "ifindex"])
def test_setup_survives_a_mac_or_nic_change(r, change):
    """The record belongs to the namespace, not to the interface: a new MAC or
    a re-created interface (new ifindex) must not make status or teardown
    forget what setup changed."""
    before = snapshot(r)
    assert rs(r, "setup", "--fwd", "dr", "--vip", VIP).returncode == 0
    if change == "mac":
        sh("ip", "-n", r, "link", "set", "eth0", "address", "02:00:00:00:99:01")
    else:
        # A NIC swap: the same name on a new device (a veth stands in for it).
        sh("ip", "-n", r, "link", "set", "eth0", "down")
        sh("ip", "-n", r, "link", "set", "eth0", "name", "eth9")
        sh("ip", "-n", r, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    st = rs(r, "status", "--json")
    status = json.loads(st.stdout)
    assert status["setup"] and status["setup"]["vips"] == [VIP], status
    assert os.path.exists(state_file(r))
    t = rs(r, "teardown")
    assert t.returncode == 0 and "undone" in t.stdout, (t.stdout, t.stderr)
    assert f"{VIP}/32 removed from lo" in t.stdout
    if change == "ifindex":
        sh("ip", "-n", r, "link", "del", "eth0")
        sh("ip", "-n", r, "link", "set", "eth9", "name", "eth0")
        sh("ip", "-n", r, "link", "set", "eth0", "up")
        sh("ip", "-n", r, "route", "replace", "default", "via", "10.9.1.1")
    after = snapshot(r)
    # A swapped-out NIC keeps what was set on it; everything else is restored.
    kept = (lambda c: c) if change == "mac" else (
        lambda c: [x for x in c if not x.startswith("eth0/")])
    assert kept(after["conf"]) == kept(before["conf"])
    assert f"local {VIP} dev lo" not in after["routes"]


def test_nat_setup_without_a_default_route_takes_the_dips_interface(r):
    """`pylvs check`'s nat-route fix, `setup --fwd nat --dip DIP`, as written,
    on a real server with no default route."""
    sh("ip", "-n", r, "route", "del", "default")
    before = snapshot(r)
    p = rs(r, "setup", "--fwd", "nat", "--dip", "10.9.1.3")
    assert p.returncode == 0, p.stderr
    assert "default via 10.9.1.3 dev eth0" in snapshot(r)["routes"]
    assert json.loads(rs(r, "status", "--json").stdout)["setup"]["iface"] == "eth0"
    assert rs(r, "teardown").returncode == 0
    assert snapshot(r) == before


@pytest.mark.parametrize("first, second", [("dr", "tun"), ("tun", "dr")])
def test_dr_and_tun_setups_combine_and_teardown_restores_both(r, first, second):
    """A real server that is a DR dest of one service and a Tun dest of
    another: the second setup extends the first (as `pylvs check` advises
    either), and teardown restores everything."""
    before = snapshot(r)
    assert rs(r, "setup", "--fwd", first, "--vip", VIP).returncode == 0
    p = rs(r, "setup", "--fwd", second, "--vip", VIP)
    assert p.returncode == 0, p.stderr
    assert "DR and Tun: set up for both" in p.stdout, p.stdout
    st = json.loads(rs(r, "status", "--json").stdout)
    assert st["setup"]["fwd"] == "dr+tun" and st["mode"] == "decap"
    verdicts = {c["name"]: c["verdict"] for c in st["checks"]}
    # DR's loose filtering on eth0 and Tun's decapsulation part are both checked.
    assert verdicts["rp_filter on eth0"] == "ok" and verdicts["decapsulator"] == "warn"
    conf = set(snapshot(r)["conf"])
    assert {"all/rp_filter:0", "eth0/rp_filter:2", "lo/rp_filter:1"} <= conf, conf
    for fwd in ("dr", "tun"):
        again = rs(r, "setup", "--fwd", fwd, "--vip", VIP)
        assert "nothing changed: already set up" in again.stdout, again.stdout
    assert rs(r, "teardown").returncode == 0
    assert snapshot(r) == before


def _as_nobody(ns: str, *args: str) -> subprocess.CompletedProcess:
    # The interpreter lives under /root (unreadable for nobody): import first, then drop root.
    code = ("import os, sys, shutil, gettext; from pylvs.realserver import cli, config, run; "
            "os.setgid(65534); os.setuid(65534); "
            f"sys.exit(cli.main({list(args)!r}))")
    return subprocess.run(["ip", "netns", "exec", ns, PY, "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


REFUSALS = [
    ("VIP not an address", ["setup", "--fwd", "dr", "--vip", "10.9.300.1"],
     "is not an IPv4 address"),
    ("VIP loopback", ["setup", "--fwd", "dr", "--vip", "127.0.0.2"], "not a unicast address"),
    ("VIP the subnet broadcast", ["setup", "--fwd", "dr", "--vip", "10.9.1.255"],
     "--vip 10.9.1.255 is a broadcast address here"),
    ("interface missing", ["setup", "--fwd", "dr", "--vip", VIP, "--iface", "nosuch0"],
     "--iface nosuch0: no such interface"),
    ("no VIP for DR", ["setup", "--fwd", "tun"], "needs at least one --vip"),
    ("NAT without DIP", ["setup", "--fwd", "nat"], "needs --dip"),
    ("NAT DIP not on a connected network", ["setup", "--fwd", "nat", "--dip", "10.9.5.1"],
     "not on a network this host is directly connected to"),
    ("NAT DIP is our own address", ["setup", "--fwd", "nat", "--dip", RIP],
     "is an address of this host"),
    ("VIP on the Ethernet interface", ["setup", "--fwd", "dr", "--vip", "10.9.1.77"],
     "is configured on eth0"),
    # The RIP given as the VIP: removing it from eth0, as for a VIP added
    # there, would cut the host off; say what is wrong instead.
    ("the RIP given as the VIP", ["setup", "--fwd", "tun", "--vip", RIP],
     f"--vip {RIP} is eth0's own (primary) address: that is this host's address, the RIP"),
    ("decapsulator for the host's own address", ["run", "--vip", RIP, "--iface", "eth0"],
     f"--vip {RIP} is eth0's own (primary) address"),
    ("decapsulator before setup (strict rp_filter)", ["run", "--vip", VIP, "--iface", "eth0"],
     "not configured on this host"),
    ("decapsulator with a TUN name the kernel refuses",
     ["run", "--vip", VIP, "--iface", "eth0", "--tun-name", "thisnameiswaytoolong"],
     "not a valid interface name"),
    ("decapsulator with a slash in the TUN name",
     ["run", "--vip", VIP, "--iface", "eth0", "--tun-name", "a/b"], "not a valid interface name"),
]


@pytest.mark.parametrize("desc,args,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refuses_before_changing_anything(r, desc, args, message):
    sh("ip", "-n", r, "addr", "add", "10.9.1.77/24", "dev", "eth0")
    before = snapshot(r)
    p = rs(r, *args)
    assert p.returncode == 1, p.stdout
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert snapshot(r) == before
    assert not os.path.exists(state_file(r))
    assert "pylvs_realserver" not in sh("ip", "netns", "exec", r, "nft", "list", "tables").stdout


def test_refuses_conflicting_setup_and_non_root(r):
    assert rs(r, "setup", *SETUPS["dr"]).returncode == 0
    before, record = snapshot(r), open(state_file(r)).read()
    p = rs(r, "setup", "--fwd", "nat", "--dip", "10.9.1.3")
    assert p.returncode == 1
    assert "conflicting earlier setup in this namespace (fwd dr" in p.stderr
    assert "that --fwd nat cannot extend" in p.stderr
    assert "run 'pylvs realserver teardown' first" in p.stderr
    for args in (["setup", *SETUPS["dr"]], ["teardown"], ["run", "--vip", VIP]):
        p = _as_nobody(r, *args)
        assert p.returncode == 1 and "must run as root" in p.stderr, (args, p.stderr)
    assert snapshot(r) == before and open(state_file(r)).read() == record


RELAY = r"""
import json, select, socket, sys, time
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw
VIP, RIP, DIP, MODE, PORT = {vip!r}, {rip!r}, {dip!r}, {mode!r}, {port}
def tap(dev):
    # ETH_P_ALL: only such taps run before the netdev ingress drop on d0.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))
    s.bind((dev, 3))
    return s
d0, d1 = tap("d0"), tap("d1")
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
counts = {{"relayed": 0, "icmp_from_rs": 0}}
print("ready", flush=True)
deadline = time.time() + 60
while time.time() < deadline:
    ready, _, _ = select.select([d0, d1, sys.stdin], [], [], 0.2)
    if sys.stdin in ready:
        break
    for s in ready:
        data, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING or addr[1] != 0x0800:
            continue
        p = IP(data)
        if s is d0 and p.dst == VIP:
            # The client's veth leaves partial checksums: complete them as a
            # director must before encapsulating.
            del p.chksum
            if TCP in p:
                del p[TCP].chksum
            inner = bytes(p)
            if MODE == "ipip":
                outer = IP(src=DIP, dst=RIP, proto=4) / Raw(inner)
            else:
                outer = IP(src=DIP, dst=RIP) / UDP(sport=40000 + p.sport % 1000, dport=PORT) \
                    / Raw(b"\x00\x04\x00\x00" + inner)
            tx.sendto(bytes(outer), (RIP, 0))
            counts["relayed"] += 1
        elif s is d1 and p.src == RIP and p.proto == 1:
            counts["icmp_from_rs"] += 1
print(json.dumps(counts), flush=True)
"""

SERVER = r"""
import json, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(({vip!r}, 8080))
s.listen(1)
s.settimeout(20)
print("listening", flush=True)
c, peer = s.accept()
c.settimeout(20)
got = []
while data := c.recv(32, socket.MSG_WAITALL):
    got.append(data.hex())
    c.sendall(data[::-1])
print(json.dumps({{"peer": peer[0], "got": got}}))
"""

# Two rounds on one connection; between them the test sends malformed tunnel
# packets, which must not disturb the established connection.
CLIENT = r"""
import json, os, socket, sys
s = socket.create_connection(({vip!r}, 8080), timeout=10)
for _ in range(2):
    data = os.urandom(32)
    s.sendall(data)
    back = s.recv(32, socket.MSG_WAITALL)
    print(json.dumps({{"sent": data.hex(), "back": back.hex()}}), flush=True)
    sys.stdin.readline()
"""

BAD_PACKETS = r"""
import json, socket
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
bad_csum = bytes(IP(src="10.9.0.2", dst={vip!r}, chksum=0x1234) / TCP(dport=8080))
for inner in (bad_csum, bad_csum[:12], bytes(IP(src="10.9.0.2", dst="10.9.201.1") / TCP())):
    tx.sendto(bytes(IP(src={dip!r}, dst={rip!r}, proto=4) / inner), ({rip!r}, 0))
if {gue}:
    gue_v1 = IP(src={dip!r}, dst={rip!r}) / UDP(sport=40000, dport={port}) / Raw(b"\x40\x04\0\0")
    tx.sendto(bytes(gue_v1 / IP(src="10.9.0.2", dst={vip!r}) / TCP(dport=8080)), ({rip!r}, 0))
# Bad outer headers go out as whole frames: a raw IP socket's kernel would fix
# the checksum and length or refuse the header (raw_send_hdrinc).
good = bytes(IP(src={dip!r}, dst={rip!r}, proto=4) / IP(src="10.9.0.2", dst={vip!r}) / TCP())
frames = [bytes(IP(src={dip!r}, dst={rip!r}, proto=4, chksum=0x1234)) + good[20:],  # checksum
          bytes([0x4f]) + good[1:40],                                              # IHL 15
          bytes([0x42]) + good[1:],                                                # IHL 2
          good[:2] + (1000).to_bytes(2, "big") + good[4:]]                         # length
eth = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
eth.bind(("d1", 0))
dst, src = bytes.fromhex({rmac!r}.replace(":", "")), eth.getsockname()[4]
for f in frames:
    eth.send(dst + src + b"\x08\x00" + f)
print(json.dumps({{}}))
"""


def _line(p: subprocess.Popen, want: str) -> None:
    line = p.stdout.readline()
    if want not in line:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"expected {want!r}, got {line!r}\n{out}\n{err}")


def _nft_table(ns: str) -> str:
    return sh("ip", "netns", "exec", ns, "nft", "list", "table", "netdev",
              "pylvs_realserver").stdout


def _status(ns: str) -> dict:
    return json.loads(rs(ns, "status", "--json").stdout)


def _counters_when(ns: str, ready) -> dict:
    for _ in range(40):
        d = _status(ns)["decapsulator"]
        if d and ready(d["counters"]):
            return d["counters"]
        time.sleep(0.25)
    raise AssertionError(f"decapsulator counters never got there: {d}")


def _tun_lab(trio: Trio, *run_args: str) -> subprocess.Popen:
    """The trio as a Tun lab: r set up (from strict rp_filter), d forwarding
    replies and keeping the client's packets to the VIP from its own stack;
    returns `pylvs realserver run RUN_ARGS` started in r."""
    d, r = trio.d, trio.r
    sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
    sh("ip", "netns", "exec", d, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    # d's own stack must not answer the client's packets to the VIP (it has
    # no route there): the relay's taps see them before this ingress drop.
    sh("ip", "netns", "exec", d, "nft",
       f'add table netdev relay; add chain netdev relay in {{ type filter hook ingress '
       f'device "d0" priority 0; }}; add rule netdev relay in ip daddr {VIP} drop')
    setup = rs(r, "setup", "--fwd", "tun", "--vip", VIP)
    assert setup.returncode == 0, setup.stderr
    return _start_decap(r, *run_args)


def _relay(trio: Trio, mode: str = "ipip") -> subprocess.Popen:
    relay = trio.popen(trio.d, RELAY.format(vip=VIP, rip=RIP, dip=DIP, mode=mode, port=GUE_PORT),
                       stdin=subprocess.PIPE)
    _line(relay, "ready")
    return relay


def _round(client: subprocess.Popen) -> dict:
    """One 32-byte round of CLIENT; asserts it came back reversed."""
    got = json.loads(client.stdout.readline())
    assert got["back"] == bytes.fromhex(got["sent"])[::-1].hex(), got
    return got


@pytest.mark.parametrize("change", ["flap", "recreate"])
def test_decapsulator_survives_its_interface_going_down_or_being_recreated(trio: Trio, change):
    c, d, r = trio.c, trio.d, trio.r
    dec = _tun_lab(trio)
    server = relay = client = None
    try:
        _line(dec, "decapsulating")
        server = trio.popen(r, SERVER.format(vip=VIP))
        _line(server, "listening")
        relay = _relay(trio)
        client = trio.popen(c, CLIENT.format(vip=VIP), stdin=subprocess.PIPE)
        first = _round(client)
        if change == "flap":
            sh("ip", "-n", r, "link", "set", "eth0", "down")
            sh("ip", "-n", r, "link", "set", "eth0", "up")
        else:
            # The relay's tap on d1 dies with the veth pair: a new relay after.
            relay.communicate(input="stop\n", timeout=20)
            sh("ip", "-n", r, "link", "del", "eth0")
            sh("ip", "-n", r, "link", "add", "eth0", "type", "veth", "peer", "name", "d1",
               "netns", d)
            sh("ip", "-n", r, "addr", "add", f"{RIP}/24", "dev", "eth0")
            sh("ip", "-n", d, "addr", "add", f"{DIP}/24", "dev", "d1")
            sh("ip", "-n", d, "link", "set", "d1", "up")
            sh("ip", "-n", r, "link", "set", "eth0", "up")
        # Down flushes the routes through eth0; a network manager would put
        # the default route back, as this does.
        sh("ip", "-n", r, "route", "replace", "default", "via", DIP)
        counters = _counters_when(r, lambda k: k["error_link"] >= 1 and (
            change == "flap" or k["reattach"] >= 1))
        assert dec.poll() is None, dec.communicate()
        if change == "recreate":
            relay = _relay(trio)
            assert f"ip daddr {RIP}" in _nft_table(r)
        client.stdin.write("next\n")
        client.stdin.flush()
        second = _round(client)
        counters = _counters_when(r, lambda k: k["decap_ipip"] >= counters["decap_ipip"] + 1)
        client.communicate(input="next\n", timeout=20)
        out, err = server.communicate(timeout=20)
        seen = json.loads(out.strip().splitlines()[-1])
        assert seen["got"] == [first["sent"], second["sent"]], err
        dec.terminate()
        out, err = dec.communicate(timeout=20)
        assert dec.returncode == 0 and "Traceback" not in err, err
        assert "carrying on" in err
        assert ("is back" in err) == (change == "recreate"), err
    finally:
        for p in (dec, server, relay, client):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()
        rs(r, "teardown")


@pytest.mark.parametrize("mode", ["ipip", "gue"])
def test_decapsulator_carries_a_tcp_connection(trio: Trio, mode):
    c, d, r = trio.c, trio.d, trio.r
    gue = ["--gue-port", str(GUE_PORT)] if mode == "gue" else []
    dec = _tun_lab(trio, *gue)
    server = relay = client = None
    try:
        _line(dec, "decapsulating")
        assert f"ip daddr {RIP}" in _nft_table(r)
        tun = json.loads(sh("ip", "-n", r, "-j", "link", "show", "plvsdec0").stdout)[0]
        assert "UP" in tun["flags"]
        assert sh("ip", "netns", "exec", r, "cat",
                  "/proc/sys/net/ipv4/conf/plvsdec0/rp_filter").stdout.strip() == "0"

        server = trio.popen(r, SERVER.format(vip=VIP))
        _line(server, "listening")
        relay = _relay(trio, mode)
        client = trio.popen(c, CLIENT.format(vip=VIP), stdin=subprocess.PIPE)
        first = _round(client)

        counters = _counters_when(r, lambda k: k[f"decap_{mode}"] >= 3)
        assert counters["tx"] == counters[f"decap_{mode}"]
        st = rs(r, "status")
        assert st.returncode == 0, st.stdout  # every check ok while the decapsulator runs
        assert "ok    rp_filter on plvsdec0: max(all=0, plvsdec0=0)" in st.stdout
        assert "decapsulator: pid" in st.stdout
        assert not any(v for k, v in counters.items() if k.startswith("drop_")), counters

        # Malformed tunnel packets: counted drops; the decapsulator and the
        # established connection carry on.
        trio.py(d, BAD_PACKETS.format(vip=VIP, rip=RIP, dip=DIP, gue=mode == "gue",
                                      port=GUE_PORT, rmac=trio.mac(r, "eth0")))
        counters = _counters_when(r, lambda k: k["drop_outer_length"] >= 1)
        # The socket filter reads only the protocol (and GUE port): malformed
        # outer headers reach the decapsulator and are counted there.
        assert (counters["drop_outer_checksum"], counters["drop_outer_header"],
                counters["drop_outer_length"]) == (1, 2, 1), counters
        assert counters["drop_inner_not_vip"] == 1
        assert counters["drop_inner_checksum"] == 1
        assert counters["drop_inner_truncated"] == 1
        assert counters["drop_gue_version"] == (mode == "gue")
        assert dec.poll() is None
        out, err = client.communicate(input="next\n", timeout=20)
        assert client.returncode == 0, err
        second = json.loads(out)
        assert second["back"] == bytes.fromhex(second["sent"])[::-1].hex()
        out, err = server.communicate(timeout=20)
        seen = json.loads(out.strip().splitlines()[-1])
        assert seen == {"peer": "10.9.0.2", "got": [first["sent"], second["sent"]]}, err

        out, err = relay.communicate(input="stop\n", timeout=20)
        seen = json.loads(out.strip().splitlines()[-1])
        assert seen["relayed"] >= 3
        # The kernel never saw the raw IPIP/GUE packets: no protocol/port unreachable.
        assert seen["icmp_from_rs"] == 0, seen
        dropped = sum(int(n) for n in re.findall(r"counter packets (\d+)", _nft_table(r)))
        assert dropped >= seen["relayed"] + 3

        dec.send_signal(signal.SIGUSR1)
        dec.send_signal(signal.SIGTERM)
        out, err = dec.communicate(timeout=20)
        assert dec.returncode == 0, err
        assert f"decap_{mode}" in out and "drop_inner_checksum" in out
        assert "pylvs_realserver" not in sh("ip", "netns", "exec", r, "nft", "list",
                                            "tables").stdout
        assert sh("ip", "-n", r, "link", "show", "plvsdec0", check=False).returncode != 0
        assert _status(r)["decapsulator"] is None
    finally:
        for p in (dec, server, relay, client):
            if p is not None and p.poll() is None:
                p.terminate()  # the decapsulator cleans up on SIGTERM
                try:
                    p.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()
        rs(r, "teardown")


# -- one decapsulator per namespace, recovery from a killed one, teardown --------

def _start_decap(ns: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, PY, "-m", "pylvs.cli.main", "realserver",
                             "run", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _has_table(ns: str) -> bool:
    return "pylvs_realserver" in sh("ip", "netns", "exec", ns, "nft", "list", "tables").stdout


def _link_exists(ns: str, dev: str) -> bool:
    return sh("ip", "-n", ns, "link", "show", dev, check=False).returncode == 0


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


def test_second_decapsulator_in_a_namespace_is_refused(r):
    assert rs(r, "setup", *SETUPS["tun"]).returncode == 0
    first = _start_decap(r)
    try:
        _line(first, "decapsulating")
        table = _nft_table(r)
        # Another TUN name gets past the device-name check: the lock refuses it.
        for extra in ((), ("--tun-name", "plvsdec9", "--gue-port", "6080")):
            p = rs(r, "run", *extra)
            assert p.returncode == 1, p.stdout
            assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
            assert (f"another 'pylvs realserver run' (pid " in p.stderr
                    and "is running in this network namespace" in p.stderr), p.stderr
            assert str(_status(r)["decapsulator"]["pid"]) in p.stderr
        # Bad arguments are reported as such, not as the running decapsulator.
        for extra, message in ((("--gue-port", "0"), "--gue-port 0: not a UDP port"),
                               (("--vip", RIP), f"--vip {RIP} is eth0's own (primary) address"),
                               (("--iface", "nosuch0"), "--iface nosuch0: no such interface")):
            p = rs(r, "run", *extra)
            assert p.returncode == 1 and message in p.stderr, (extra, p.stderr)
        # The first one's table, device and stats are untouched, and it still runs.
        assert _nft_table(r) == table and _link_exists(r, "plvsdec0")
        assert not _link_exists(r, "plvsdec9")
        assert first.poll() is None and _status(r)["decapsulator"]["tun"] == "plvsdec0"
    finally:
        _stop(first)
    assert first.returncode == 0 and not _has_table(r)


def test_setup_after_drift_while_the_decapsulator_runs(r):
    """all.rp_filter put back to strict under a running decapsulator: setup
    lowers it again and never raises rp_filter on the decapsulator's own TUN
    device (strict filtering there drops every decapsulated packet)."""
    assert rs(r, "setup", *SETUPS["tun"]).returncode == 0
    dec = _start_decap(r)
    try:
        _line(dec, "decapsulating")
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
        p = rs(r, "setup", *SETUPS["tun"])
        assert p.returncode == 0, p.stderr
        assert "net.ipv4.conf.all.rp_filter = 0 (was 1)" in p.stdout, p.stdout
        assert "net.ipv4.conf.plvsdec0.rp_filter = 0\n" in p.stdout, p.stdout
        assert "pylvs's own" in p.stdout
        # `ip netns exec` execs: the pid is the decapsulator's.
        assert f"the user-space decapsulator runs (pid {dec.pid}, TUN device plvsdec0)" \
            in p.stdout
        assert "start the user-space decapsulator" not in p.stdout
        conf = sh("ip", "netns", "exec", r, "cat", "/proc/sys/net/ipv4/conf/plvsdec0/rp_filter",
                  "/proc/sys/net/ipv4/conf/all/rp_filter").stdout.split()
        assert conf == ["0", "0"]
        again = rs(r, "setup", *SETUPS["tun"])
        assert "nothing changed: already set up" in again.stdout, again.stdout
        st = rs(r, "status")
        assert st.returncode == 0, st.stdout
    finally:
        _stop(dec)


def test_killed_decapsulator_is_recovered_and_teardown_stops_a_running_one(r):
    assert rs(r, "setup", *SETUPS["tun"]).returncode == 0
    procs = []
    try:
        first = _start_decap(r)
        procs.append(first)
        _line(first, "decapsulating")
        first.kill()
        first.communicate(timeout=10)
        # SIGKILL: no cleanup ran; the drop table stays (the TUN device goes with its fd).
        assert _has_table(r) and not _link_exists(r, "plvsdec0")
        assert _status(r)["decapsulator"] is None

        # A new run is not blocked by the dead one's lock file and replaces its table.
        second = _start_decap(r, "--gue-port", str(GUE_PORT))
        procs.append(second)
        _line(second, "replacing the nft table netdev pylvs_realserver left by a killed run")
        _line(second, "decapsulating")
        assert f"udp dport {GUE_PORT}" in _nft_table(r)
        assert _status(r)["decapsulator"]["pid"] != first.pid

        # teardown stops the running decapsulator (it cleans up after itself),
        # then undoes setup.
        t = rs(r, "teardown")
        assert t.returncode == 0, t.stderr
        assert "stopped (SIGTERM)" in t.stdout and "undone" in t.stdout, t.stdout
        second.communicate(timeout=10)
        assert second.returncode == 0
        assert not _has_table(r) and not _link_exists(r, "plvsdec0")
        assert not os.path.exists(state_file(r))
        assert not os.path.exists(state_file(r).replace(".json", "-decap.lock"))

        # Killed again, with nothing set up: teardown removes the table it left.
        sh("ip", "-n", r, "addr", "add", f"{VIP}/32", "dev", "lo")
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
        third = _start_decap(r, "--vip", VIP, "--iface", "eth0")
        procs.append(third)
        _line(third, "decapsulating")
        third.kill()
        third.communicate(timeout=10)
        assert _has_table(r)
        t = rs(r, "teardown")
        assert t.returncode == 0, t.stderr
        assert "nft table netdev pylvs_realserver removed" in t.stdout, t.stdout
        assert "no setup recorded in this namespace" in t.stdout
        assert not _has_table(r)
        again = rs(r, "teardown")
        assert again.returncode == 0 and "nothing to tear down" in again.stdout
    finally:
        for p in procs:
            _stop(p)


def test_status_without_setup_and_malformed_state_files(r):
    p = rs(r, "status")
    assert p.returncode == 1 and "not set up by pylvs here" in p.stdout, (p.stdout, p.stderr)
    p = rs(r, "status", "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["setup"] is None
    os.makedirs("/run/pylvs", exist_ok=True)
    path = state_file(r)
    decap = path.replace(".json", "-decap.json")
    try:
        for which, text, why in [
                (path, "[]", "it holds an array, not an object"),
                (path, '{"config": {"fwd": "dr"}, "changes": []}', "no config with the fields"),
                (path, '{"config": {"fwd": "x", "vips": [], "iface": "eth0", "dip": "", '
                       '"clients": []}, "changes": []}', "wrong type or value"),
                (path, "{not json", "cannot read the state file"),
                (decap, '"text"', "it holds a string, not an object")]:
            with open(which, "w") as f:
                f.write(text)
            # Only status reads the decapsulator's stats file.
            for cmd in ("status",) if which == decap else ("status", "teardown", "setup"):
                p = rs(r, cmd, *(SETUPS["dr"] if cmd == "setup" else ()))
                assert p.returncode == 1, (cmd, text, p.stdout)
                assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
                assert which in p.stderr and why in p.stderr, (cmd, p.stderr)
            os.unlink(which)
    finally:
        for f in (path, decap):
            if os.path.exists(f):
                os.unlink(f)
