"""`pylvs run` and its control plane under load and misuse: the namespace
lock file, 10,000 services by -R, `pylvs stats` / `pylvs sysctl`, many
control connections and the descriptor limit."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from nsio import sh
from test_run import RUN, Pair, has_table, running, stop, wait_ready

pytestmark = pytest.mark.netns

PYLVS = RUN[:-1]
SMALL = ("--conn-max", "4096")   # these tests make no conns


@pytest.fixture
def pair(uid):
    p = Pair(uid)
    try:
        yield p.up()
    finally:
        p.down()


def in_ns(ns: str, *args: str, stdin: str | None = None, timeout: float = 120):
    import subprocess
    return subprocess.run(["ip", "netns", "exec", ns, *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout)


def lock_path(ns: str) -> str:
    ino = sh("ip", "netns", "exec", ns, "stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout
    return f"/run/pylvs/netns-{ino.strip()}.lock"


def test_lock_file_removed_at_stop_and_a_stale_one_does_not_block(pair):
    path = lock_path(pair.a)
    with running(pair.a, "--iface", "eth0", *SMALL) as (p, log):
        wait_ready(p, log)
        assert open(path).read().strip() == str(p.pid)
        assert stop(p) == 0
        assert not os.path.exists(path)
    # Killed outright: the file stays, the lock went with the process.
    with running(pair.a, "--iface", "eth0", *SMALL) as (p, log):
        wait_ready(p, log)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    assert os.path.exists(path)
    sh("ip", "netns", "exec", pair.a, "nft", "delete", "table", "netdev", "pylvs", check=False)
    with running(pair.a, "--iface", "eth0", *SMALL) as (p, log):
        wait_ready(p, log)
        assert open(path).read().strip() == str(p.pid)
        assert stop(p) == 0
        assert not os.path.exists(path)


def test_restore_of_ten_thousand_services_and_the_stats(pair, tmp_path):
    ctl = str(tmp_path / "ctl.sock")
    rules = "".join(f"-A -t 10.{20 + (i >> 8)}.{i & 255}.1:80 -s rr\n"
                    f"-a -t 10.{20 + (i >> 8)}.{i & 255}.1:80 -r 10.9.5.2:0 -m\n"
                    for i in range(10_000))
    with running(pair.a, "--iface", "eth0", "--control", ctl, *SMALL,
                 "--sysctl", "expire_nodest_conn=1") as (p, log):
        wait_ready(p, log)
        t0 = time.monotonic()
        r = in_ns(pair.a, *PYLVS, "adm", "--control", ctl, "-R", stdin=rules)
        took = time.monotonic() - t0
        assert (r.returncode, r.stderr) == (0, ""), r.stderr[-2000:]
        print(f"pylvs adm -R of 10,000 services + 10,000 dests: {took:.2f} s")
        assert took < 60
        st = json.loads(in_ns(pair.a, *PYLVS, "stats", "--control", ctl, "--json").stdout)
        assert st["services"] == {"count": 10_000, "limit": 16384}
        assert st["dests"] == {"count": 10_000, "limit": 131072}
        assert st["conns"]["count"] == 0 and st["conns"]["limit"] == 4096
        assert "drop_no_dest" in st["counters"] and "rx_frames" in st["counters"]
        saved = in_ns(pair.a, *PYLVS, "adm", "--control", ctl, "-S", "-n").stdout
        assert saved.count("\n") == 20_000 and "-r 10.9.5.2:0 -m" in saved
        # The start-time knob is there; the run-time way changes it.
        r = in_ns(pair.a, *PYLVS, "sysctl", "--control", ctl, "expire_nodest_conn")
        assert r.stdout == "expire_nodest_conn = 1\n"
        r = in_ns(pair.a, *PYLVS, "sysctl", "--control", ctl, "icmp_msgs_burst=10")
        assert (r.returncode, r.stdout) == (0, "icmp_msgs_burst = 10\n")
        t0 = time.monotonic()
        assert in_ns(pair.a, *PYLVS, "adm", "--control", ctl, "-C").returncode == 0
        print(f"pylvs adm -C of them: {time.monotonic() - t0:.2f} s")
        assert stop(p) == 0


def test_many_control_connections(pair, tmp_path):
    """The director raises its soft descriptor limit to the hard one; 64
    clients at most, the others told so and closed; once they go, `pylvs
    adm` works again."""
    ctl = str(tmp_path / "ctl.sock")
    import subprocess
    import tempfile
    log = tempfile.NamedTemporaryFile(prefix="pylvs-run-", suffix=".log", delete=False).name
    cmd = " ".join([*RUN, "--iface", "eth0", "--control", ctl, *SMALL])
    with open(log, "wb") as f:
        p = subprocess.Popen(["ip", "netns", "exec", pair.a, "sh", "-c",
                              f"ulimit -Sn 128 && exec {cmd}"], stdout=f,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    held = []
    try:
        wait_ready(p, log)
        limits = open(f"/proc/{p.pid}/limits").read()
        soft, hard = next(ln.split()[3:5] for ln in limits.splitlines()
                          if ln.startswith("Max open files"))
        assert soft == hard and int(soft) > 128
        refused = 0
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(ctl)
            held.append(s)
            try:
                s.sendall(b'{"op": "ping"}\n')
            except BrokenPipeError:
                pass   # refused and closed at once; the answer is there to read
            resp = json.loads(s.makefile("rb").readline())
            if not resp["ok"]:
                assert resp["error"].startswith("too many control connections (64)")
                refused += 1
        assert refused == 300 - 64
        r = in_ns(pair.a, *PYLVS, "adm", "--control", ctl, "-L", "-n")
        assert r.returncode != 0 and "too many control connections" in r.stderr
        for s in held:
            s.close()
        held.clear()
        deadline = time.monotonic() + 10
        while True:
            r = in_ns(pair.a, *PYLVS, "adm", "--control", ctl, "-L", "-n")
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.returncode == 0 and "IP Virtual Server" in r.stdout
        assert p.poll() is None
        assert stop(p) == 0
    finally:
        for s in held:
            s.close()
        if p.poll() is None:
            p.kill()
        os.unlink(log)


def test_cleared_real_servers_are_not_arped_for_any_more(pair, tmp_path):
    """200 real servers nobody answers ARP for: the director asks the kernel
    to resolve them (backing off); after -C it asks about none of them."""
    ctl = str(tmp_path / "ctl.sock")
    rules = "-A -t 10.9.5.1:80 -s rr\n" + "".join(
        f"-a -t 10.9.5.1:80 -r 10.9.5.{i}:80 -m\n" for i in range(10, 210))
    sh("ip", "netns", "exec", pair.a, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")

    def arp_sent() -> int:
        out = sh("ip", "netns", "exec", pair.a, "cat",
                 "/sys/class/net/eth0/statistics/tx_packets").stdout
        return int(out)

    with running(pair.a, "--iface", "eth0", "--control", ctl, *SMALL) as (p, log):
        wait_ready(p, log)
        r = in_ns(pair.a, *PYLVS, "adm", "--control", ctl, "-R", stdin=rules)
        assert (r.returncode, r.stderr) == (0, "")
        time.sleep(1)
        before = arp_sent()
        time.sleep(2)
        asked = arp_sent() - before
        assert asked >= 200, asked     # every one of them is being resolved
        assert in_ns(pair.a, *PYLVS, "adm", "--control", ctl, "-C").returncode == 0
        time.sleep(4)                  # the kernel's own retries of the last pokes end
        before = arp_sent()
        time.sleep(3)
        assert arp_sent() - before == 0
        assert stop(p) == 0


# Run in the client namespace: 5 UDP datagrams to the service through the
# kernel (to the director's MAC), then 3 frames to it at the broadcast MAC,
# which IPVS never sees (ip_vs_in_hook: not PACKET_HOST).
SEND_TO_SERVICE = r"""
import socket, struct, sys
vip, port = sys.argv[1], int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    u.sendto(b"to the director", (vip, port))
def csum(b):
    s = sum(struct.unpack("!10H", b))
    s = (s & 0xFFFF) + (s >> 16)
    return ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
p = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
p.bind(("eth0", 0))
src = p.getsockname()[4]
for _ in range(3):
    udp = struct.pack("!HHHH", 40000, port, 8 + 9, 0) + b"broadcast"
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                      socket.inet_aton("10.9.5.2"), socket.inet_aton(vip))
    iph = iph[:10] + struct.pack("!H", csum(iph)) + iph[12:]
    p.send(b"\xff" * 6 + src + b"\x08\x00" + iph + udp)
"""


def test_stats_show_the_io_and_steering_counters(pair, tmp_path):
    """`pylvs stats` through a running director: the engine's counters, the
    AF_PACKET rings' (io) and the steering table's not_host."""
    import sys
    ctl = str(tmp_path / "ctl.sock")
    with running(pair.a, "--iface", "eth0", "--control", ctl, *SMALL) as (p, log):
        wait_ready(p, log)
        r = in_ns(pair.a, *PYLVS, "adm", "--control", ctl, "-A", "-u", "10.9.5.1:7")
        assert (r.returncode, r.stderr) == (0, "")
        r = in_ns(pair.b, sys.executable, "-c", SEND_TO_SERVICE, "10.9.5.1", "7")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 5
        while True:
            t0 = time.monotonic()
            r = in_ns(pair.a, *PYLVS, "stats", "--control", ctl, "--json")
            took = time.monotonic() - t0
            assert (r.returncode, r.stderr) == (0, "")
            st = json.loads(r.stdout)
            if st["engine"]["rx_frames"] >= 5 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert took < 5
        assert st["counters"] == st["engine"] and st["engine"]["rx_frames"] >= 5
        io = st["io"]
        assert io["rx_frames"] >= 5
        assert {"tx_frames", "tx_errors", "tx_emsgsize", "emit_sent", "emit_errors",
                "rx_dropped", "rx_freezes"} <= set(io)
        assert all(isinstance(v, int) for v in io.values())
        assert st["steering"] == {"not_host": 3}
        text = in_ns(pair.a, *PYLVS, "stats", "--control", ctl).stdout.splitlines()
        assert "steering.not_host  3" in text
        named = dict(ln.split() for ln in text if len(ln.split()) == 2)
        assert int(named["io.rx_frames"]) >= 5 and int(named["rx_frames"]) >= 5
        assert stop(p) == 0


@pytest.mark.parametrize("stop_sig", [signal.SIGTERM, signal.SIGINT])
def test_sighup_does_not_stop_the_director(pair, stop_sig):
    """A closed terminal sends SIGHUP: a director without -c logs one line
    and keeps serving; SIGTERM and SIGINT still stop it with its clean-up done (nft
    table, control socket and lock file gone)."""
    path = lock_path(pair.a)
    ino = path.rsplit("-", 1)[1].split(".")[0]
    ctl = f"/run/pylvs/ctl-{ino}.sock"
    with running(pair.a, "--iface", "eth0", *SMALL) as (p, log):
        wait_ready(p, log)
        assert has_table(pair.a) and os.path.exists(ctl)
        p.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP" not in open(log).read() and time.monotonic() < deadline:
            time.sleep(0.05)
        r = in_ns(pair.a, *PYLVS, "adm", "-A", "-t", "10.9.0.1:80")
        assert r.returncode == 0, r.stderr
        assert p.poll() is None
        text = open(log).read()
        assert text.count("SIGHUP: no configuration file (-c) to reload; "
                          "still running") == 1, text
        p.send_signal(stop_sig)
        assert p.wait(10) == 0
        assert not has_table(pair.a)
        assert not os.path.exists(path) and not os.path.exists(ctl)
        assert "stopped" in open(log).read()


def test_broadcast_and_local_real_servers_are_refused(pair, tmp_path):
    """eth0 has 10.9.5.1/24 added without `brd +` (no IFA_BROADCAST): its
    subnet broadcast 10.9.5.255 is still refused as IPVS refuses it, from
    the -c file at start (logged by file and line) and from `pylvs adm`;
    so are the director's own addresses (Local forwarding)."""
    rules = tmp_path / "rules"
    rules.write_text("-A -t 10.9.0.1:80 -s rr\n"
                     "-a -t 10.9.0.1:80 -r 10.9.5.255:80 -m\n"
                     "-a -t 10.9.0.1:80 -r 10.9.5.1:80 -m\n"
                     "-a -t 10.9.0.1:80 -r 10.9.5.2:80 -m\n")
    unicast = "Invalid operation.  Possibly wrong module version, address not unicast, ..."
    local = "local real servers (Local forwarding) are not supported yet"
    with running(pair.a, "--iface", "eth0", "-c", str(rules), *SMALL) as (p, log):
        text = wait_ready(p, log)
        assert f"{rules} line 2: {unicast}" in text and f"{rules} line 3: {local}" in text
        assert "applied 2 of 4 rules" in text
        vip = ("real server 10.9.0.1 is the virtual address itself: a real server needs an "
               "address of its own (its RIP) to be sent to; the director as its own real "
               "server (Local forwarding) is not supported yet")
        for daddr, msg in [("10.9.5.255", unicast), ("127.0.0.1", local),
                           ("10.9.0.1", vip), ("10.9.5.1", local)]:
            r = in_ns(pair.a, *PYLVS, "adm", "-a", "-t", "10.9.0.1:80", "-r", f"{daddr}:80", "-m")
            assert (r.returncode, r.stderr) == (255, msg + "\n"), daddr
        r = in_ns(pair.a, *PYLVS, "adm", "-S", "-n")
        assert r.stdout == "-A -t 10.9.0.1:80 -s rr\n-a -t 10.9.0.1:80 -r 10.9.5.2:80 -m -w 1\n"
        assert stop(p) == 0
