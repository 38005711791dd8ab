"""The kernel's IPVS selftest scenarios, with `pylvs run` as the director.

tools/testing/selftests/netfilter/ipvs.sh builds three namespaces, sends 32
random bytes from the client to VIP:8080 and compares them with what the
real server's listener received, once per forwarding method (DR, NAT, Tun).
Its topology, addresses and per-method settings are kept here; what changes:
the director is `pylvs run` instead of the kernel's IPVS, the real server is
prepared by `pylvs realserver setup` and, for Tun, decapsulates in user space
(`pylvs realserver run`: these machines have no ipip module)::

        ns0 (client)                 ns1 (director)              ns2 (real server)
    br0 cip 10.0.0.2 ── veth01 ─── veth10 gip 10.0.0.1
        │                            veth12 dip 172.16.0.1 ─── veth21 rip 172.16.0.2
        └─────────── veth02 ──────────────────────────────── veth20 sip 10.0.0.3
                                     lo: vip 207.175.44.110/32   lo: vip (DR, Tun)

The client routes the VIP via the director's gip. DR and Tun replies leave
the real server from the VIP through veth20, straight onto the client's
bridge; NAT deletes veth20 and routes the real server's default via the dip.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from nsio import PY, REPO, sh
from pylvs.lab.topology import wait_for_file, wait_for_line

pytestmark = pytest.mark.netns

VIP, PORT = "207.175.44.110", 8080
CIP, GIP, DIP, RIP, SIP = "10.0.0.2", "10.0.0.1", "172.16.0.1", "172.16.0.2", "10.0.0.3"
DATALEN = 32

LISTEN = f"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT})); s.listen(1); s.settimeout(8)
print("listening", flush=True)
c, peer = s.accept(); c.settimeout(5)
data = b""
while True:
    chunk = c.recv(4096)
    if not chunk:
        break
    data += chunk
print(peer[0], data.hex(), flush=True)
"""

CONNECT = f"""
import socket, sys
s = socket.create_connection(("{VIP}", {PORT}), timeout=3)
s.sendall(bytes.fromhex(sys.argv[1])); s.close()
"""


class Selftest:
    """ipvs.sh's setup(): ns0, ns1, ns2 with their veths, bridge and addresses."""

    def __init__(self, uid: str, tmp):
        self.ns = [f"pl{uid}-ns{i}" for i in range(3)]
        self.procs: list[subprocess.Popen] = []
        self.log = tmp / "director.log"

    def ip(self, i: int, *args: str) -> None:
        sh("ip", "-n", self.ns[i], *args)

    def sysctl(self, i: int, *settings: str) -> None:
        sh("ip", "netns", "exec", self.ns[i], "sysctl", "-qw", *settings)

    def pylvs(self, i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(["ip", "netns", "exec", self.ns[i], PY, "-m", "pylvs.cli.main",
                            *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert not check or p.returncode == 0, (args, p.stdout, p.stderr)
        return p

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[i], *argv], cwd=REPO, **kw)
        self.procs.append(p)
        return p

    def up(self) -> "Selftest":
        ns0, ns1, ns2 = self.ns
        for ns in self.ns:
            sh("ip", "netns", "add", ns)
            # Strict reverse-path filtering as many distributions ship it (a
            # new namespace would otherwise inherit the host's value), and no
            # IPv6 chatter in the way.
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1",
               "net.ipv4.conf.default.rp_filter=1", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "link", "add", "veth01", "netns", ns0, "type", "veth", "peer", "name",
           "veth10", "netns", ns1)
        sh("ip", "link", "add", "veth02", "netns", ns0, "type", "veth", "peer", "name",
           "veth20", "netns", ns2)
        sh("ip", "link", "add", "veth12", "netns", ns1, "type", "veth", "peer", "name",
           "veth21", "netns", ns2)
        self.ip(0, "link", "add", "br0", "type", "bridge")
        for dev in ("veth01", "veth02"):
            self.ip(0, "link", "set", dev, "master", "br0")
        for i, dev, addr in ((0, "br0", CIP), (1, "veth10", GIP), (1, "veth12", DIP),
                             (2, "veth21", RIP), (2, "veth20", SIP)):
            self.ip(i, "addr", "add", f"{addr}/24", "dev", dev)
        for i, devs in ((0, ("lo", "veth01", "veth02", "br0")), (1, ("lo", "veth10", "veth12")),
                        (2, ("lo", "veth21", "veth20"))):
            for dev in devs:
                self.ip(i, "link", "set", dev, "up")
        # Every method: the client reaches the VIP through the director, and
        # the director holds the VIP on lo as a /32.
        self.ip(0, "route", "add", VIP, "via", GIP, "dev", "br0")
        self.ip(1, "addr", "add", f"{VIP}/32", "dev", "lo")
        return self

    def start_director(self, ip_forward: int) -> None:
        # ipvs.sh: ip_forward=1 for DR and NAT, 0 (with no redirects) for Tun;
        # pylvs forwards in user space either way.
        self.sysctl(1, f"net.ipv4.ip_forward={ip_forward}", "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0")
        with open(self.log, "wb") as out:
            p = self.popen(1, [PY, "-m", "pylvs.cli.main", "run", "--iface", "veth10",
                               "--iface", "veth12"], stdout=out, stderr=out,
                           stdin=subprocess.DEVNULL, start_new_session=True)
        assert wait_for_file(self.log, " ready: ", 20, proc=p), self.log.read_text()

    def wait_resolved(self, addr: str) -> None:
        deadline = time.monotonic() + 5
        while f"dest {addr} via" not in self.log.read_text():
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def test_service(self) -> tuple[bytes, str, bytes]:
        """ipvs.sh's test_service: listen on ns2, send 32 random bytes from ns0."""
        server = self.popen(2, [PY, "-c", LISTEN], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        assert wait_for_line(server, "listening", 10)
        data = os.urandom(DATALEN)
        client = subprocess.run(["ip", "netns", "exec", self.ns[0], PY, "-c", CONNECT,
                                 data.hex()], capture_output=True, text=True, timeout=15)
        assert client.returncode == 0, f"client: {client.stderr}\n{self.log.read_text()}"
        out, err = server.communicate(timeout=15)
        assert server.returncode == 0, err
        peer, got = out.split()
        return data, peer, bytes.fromhex(got)

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        for ns in self.ns:
            # realserver setup's state file goes with teardown.
            subprocess.run(["ip", "netns", "exec", ns, PY, "-m", "pylvs.cli.main", "realserver",
                            "teardown"], cwd=REPO, capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def selftest(uid, tmp_path):
    st = Selftest(uid, tmp_path)
    try:
        yield st.up()
    finally:
        print(f"--- director log ---\n{st.log.read_text() if st.log.exists() else ''}")
        st.down()
        assert not any(os.path.exists(f"/run/netns/{ns}") for ns in st.ns)


def _stats(st: Selftest) -> dict:
    return json.loads(st.pylvs(1, "stats", "--json").stdout)


def _counter(stats: dict, name: str) -> int:
    for v in stats.values():
        if isinstance(v, dict) and name in v:
            return v[name]
    return stats[name]


def _decap_counters(st: Selftest, ready) -> dict:
    """The decapsulator's counters once ready(counters) (its stats file is
    written at most once a second), bounded."""
    deadline = time.monotonic() + 5
    while True:
        status = json.loads(st.pylvs(2, "realserver", "status", "--json", check=False).stdout)
        counters = (status.get("decapsulator") or {}).get("counters") or {}
        if counters and ready(counters) or time.monotonic() > deadline:
            assert counters and ready(counters), status
            return counters
        time.sleep(0.2)


@pytest.mark.parametrize("ip_forward", [1, 0], ids=["ip_forward=1", "ip_forward=0"])
def test_dr(selftest: Selftest, ip_forward):
    """ipvs.sh's test_dr (ip_forward=1), and the same with the director's
    kernel not forwarding (pylvs needs neither)."""
    st = selftest
    st.start_director(ip_forward=ip_forward)
    st.pylvs(1, "adm", "-A", "-t", f"{VIP}:{PORT}", "-s", "rr")
    st.pylvs(1, "adm", "-a", "-t", f"{VIP}:{PORT}", "-r", f"{RIP}:{PORT}")  # -g, the default
    # The client's packet arrives on veth21 while the route back to the
    # client leaves by veth20: ipvs.sh turns rp_filter off ("avoid reverse
    # route lookup") and so must we. `realserver setup --fwd dr` leaves
    # rp_filter alone (docs/realserver.md: the client's packet arrives where
    # the route back leaves, not true of this two-legged real server): with
    # strict filtering the SYNs are dropped (TcpExtIPReversePathFilter) while
    # `realserver status` says ok. Setup makes the VIP and ARP settings.
    st.sysctl(2, "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.veth21.rp_filter=0")
    st.pylvs(2, "realserver", "setup", "--fwd", "dr", "--vip", VIP, "--iface", "veth21")
    st.wait_resolved(RIP)
    sent, peer, got = st.test_service()
    assert got == sent
    assert peer == CIP  # DR changes no address
    stats = _stats(st)
    assert _counter(stats, "conns_created") == 1
    assert _counter(stats, "tx_frames") >= 4  # SYN, ACK, data, FIN at least
    assert "Route" in st.pylvs(1, "adm", "-L", "-n").stdout


def test_nat(selftest: Selftest):
    st = selftest
    st.start_director(ip_forward=1)
    st.pylvs(1, "adm", "-A", "-t", f"{VIP}:{PORT}", "-s", "rr")
    st.pylvs(1, "adm", "-a", "-m", "-t", f"{VIP}:{PORT}", "-r", f"{RIP}:{PORT}")
    st.ip(2, "link", "del", "veth20")
    st.pylvs(2, "realserver", "setup", "--fwd", "nat", "--dip", DIP, "--iface", "veth21")
    st.wait_resolved(RIP)
    sent, peer, got = st.test_service()
    assert got == sent
    assert peer == CIP
    stats = _stats(st)
    # The real server's replies came back through the director, rewritten.
    assert _counter(stats, "conns_created") == 1
    listing = st.pylvs(1, "adm", "-L", "-n", "--stats").stdout
    line = next(x for x in listing.splitlines() if RIP in x).split()
    assert int(line[3]) > 0, listing  # OutPkts


@pytest.mark.parametrize("tun", [(), ("--tun-type", "gue", "--tun-port", "6080", "--tun-csum"),
                                 ("--tun-type", "gue", "--tun-port", "6080", "--tun-nocsum")],
                         ids=["ipip", "gue-csum", "gue-nocsum"])
def test_tun(selftest: Selftest, tun):
    st = selftest
    st.start_director(ip_forward=0)
    st.pylvs(1, "adm", "-A", "-t", f"{VIP}:{PORT}", "-s", "rr")
    st.pylvs(1, "adm", "-a", "-i", *tun, "-t", f"{VIP}:{PORT}", "-r", f"{RIP}:{PORT}")
    # ipvs.sh turns rp_filter off on all, tunl0 and veth21. Here setup
    # --fwd tun lowers the strict 'all' to 0 and keeps every interface at 1,
    # and the decapsulator gives its TUN device 0: the decapsulated packet
    # (client source, routed back by veth20) arrives on the TUN device, the
    # outer one (director's source, routed by veth21) on veth21: both pass.
    st.pylvs(2, "realserver", "setup", "--fwd", "tun", "--vip", VIP, "--iface", "veth21")
    log = st.log.with_name("decap.log")
    with open(log, "wb") as out:
        dec = st.popen(2, [PY, "-m", "pylvs.cli.main", "realserver", "run", "--iface", "veth21",
                           "--vip", VIP, "--gue-port", "6080"], stdout=out, stderr=out,
                       stdin=subprocess.DEVNULL, start_new_session=True)
    assert wait_for_file(log, "decapsulating", 10, proc=dec), log.read_text()
    st.wait_resolved(RIP)
    sent, peer, got = st.test_service()
    assert got == sent
    assert peer == CIP
    stats = _stats(st)
    assert _counter(stats, "tx_tunneled") >= 4
    kind = "decap_gue" if tun else "decap_ipip"
    counters = _decap_counters(st, lambda c: c[kind] >= 4)
    assert not any(v for k, v in counters.items() if k.startswith("drop_")), counters
