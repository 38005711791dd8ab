"""Connection sync between two directors in namespaces of the test's own
(docs/sync.md).

1. The daemons' network side (sync_pair.py): a master and a backup on two
   ends of a veth, engines standing in: the multicast socket options, the
   kernel's flush time, the bulk resync (first request unanswered, the
   retry answered), bad datagrams counted and installing nothing, and what
   went over the wire decoded by tshark's ipvs dissector.
2. Two `pylvs run` directors (VS-NAT lab + a backup director on a sync
   link), 1 and 2 workers: conns the master forwards appear on the backup
   (`pylvs adm -L -c`), in the worker their client reaches; a restarted
   backup gets the whole table back by bulk resync, also when its rules
   come only after its daemon started; bad packets sent at
   the backup's socket are counted and install nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pylvs.sync import daemon as sd
from pylvs.sync import wire

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent
BAD_SPORT = 9999   # sync_pair.py sends its bad datagrams from this port
REPO = HERE.parents[1]


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def veth_pair(ns_a: str, ns_b: str, name: str, addr_a: str, addr_b: str) -> None:
    """A veth ``name`` in each namespace, addressed and up."""
    sh("ip", "link", "add", f"{name}a", "netns", ns_a, "type", "veth", "peer", "name",
       f"{name}b", "netns", ns_b)
    for ns, old, addr in ((ns_a, f"{name}a", addr_a), (ns_b, f"{name}b", addr_b)):
        sh("ip", "-n", ns, "link", "set", old, "name", name)
        sh("ip", "-n", ns, "addr", "add", addr, "dev", name)
        sh("ip", "-n", ns, "link", "set", name, "up")


@pytest.fixture
def two_ns(uid):
    names = (f"pl{uid}-sa", f"pl{uid}-sb")
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        veth_pair(*names, "sy0", "10.77.0.1/24", "10.77.0.2/24")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def capture(ns: str, iface: str, path: str) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", iface, "-U", "-n", "-w",
                          path, "udp", "port", str(wire.SYNC_PORT)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:   # tcpdump says "listening on" once the socket is bound
        if os.path.exists(path) and os.path.getsize(path) > 0:
            break
        time.sleep(0.05)
    return p


def pcap_count(path: str) -> int:
    """Whole packet records in a pcap file tcpdump is still writing."""
    with open(path, "rb") as f:
        data = f.read()
    n, p = 0, 24   # the file header, then a 16-byte header per record
    while p + 16 <= len(data):
        p += 16 + int.from_bytes(data[p + 8:p + 12], "little")
        n += p <= len(data)
    return n


def stop_capture(p: subprocess.Popen, path: str, want: int) -> None:
    """Stop tcpdump once ``path`` holds ``want`` packets (at most 5 s)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pcap_count(path) < want:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)


def test_daemons_over_a_veth_with_stand_in_engines(two_ns, tmp_path):
    ns_a, ns_b = two_ns
    # Wireshark's ipvs dissector reads the wire: tshark is one of the
    # Makefile's APT_TOOLS, so its absence is a broken setup, not a skip.
    assert shutil.which("tshark"), "tshark is missing: run `make deps` (Makefile APT_TOOLS)"
    pcap = str(tmp_path / "sync.pcap")
    cap = capture(ns_b, "sy0", pcap)
    p = out = None
    try:
        p = subprocess.run([sys.executable, str(HERE / "sync_pair.py"), ns_a, "sy0", ns_b, "sy0"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        out = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    finally:
        # Every datagram the backup read went over sy0, and so did its requests.
        backup = out["stats"]["backup"] if out else {}
        stop_capture(cap, pcap, backup.get("messages", 0) + backup.get("bulk_request_messages", 0))
    assert p.returncode == 0, p.stderr[-3000:]
    sent = np.array(out["sent"], dtype=np.uint32)
    # Every conn arrived once, in the worker its client reaches.
    want = sd.worker_of(sent, np.zeros(0, dtype=[("flags", "u4"), ("timeout", "u4"),
                                                ("netmask", "u4")]), 2)
    assert out["installed"] == [sorted(sent[want == i].tolist()) for i in range(2)]
    # The last partial message waited for the kernel's flush time (2 s).
    assert sd.FLUSH_TIME - 0.1 <= out["installed_at"] <= sd.FLUSH_TIME + 2.0
    backup, master = out["stats"]["backup"], out["stats"]["master"]
    assert backup["bulk_complete"] and backup["bulk_request_messages"] == 2
    assert master["bulk_requests"] == 1 and master["bulk_walks"] == 1
    assert master["bulk_conns"] == 600 and master["conns"] == 100
    # Bad datagrams: counted by reason, nothing installed.
    assert out["installed_after_bad"] == 0
    dropped = {k: v for k, v in backup["dropped"].items() if v}
    assert dropped == {"short": 2, "bad_size": 1, "wrong_syncid": 1, "bad_version": 1, "v0": 1}
    assert [d["state"] for d in out["list"]] == ["master", "backup"]
    assert out["list"][0]["sync_maxlen"] == 1472 and out["list"][0]["mcast_ifn"] == "sy0"
    # Root (CAP_NET_ADMIN) gets the backup's 1 MiB past net.core.rmem_max;
    # getsockopt reports twice the size asked (the kernel's bookkeeping).
    assert out["rcvbuf"] == 2 * sd.RCVBUF
    # The wire, as Wireshark decodes it: syncid 7, v1, conns whose client
    # addresses are the ones sent.
    fields = ["ipvs.syncid", "ipvs.version", "ipvs.conncount", "ipvs.caddr", "ip.ttl",
              "ip.dst", "udp.dstport"]
    cmd = ["tshark", "-r", pcap, "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=;",
           "-Y", f"ipvs.version == 1 && udp.srcport != {BAD_SPORT}"]
    for f in fields:
        cmd += ["-e", f]
    lines = sh(*cmd, timeout=60).stdout.splitlines()
    seen = []
    for line in lines:
        syncid, ver, n, caddrs, ttl, dst, dport = line.split("\t")
        assert (syncid, ver, ttl, dst, dport) == ("7", "1", "1", "224.0.0.81", "8848")
        seen += caddrs.split(";")
        assert len(caddrs.split(";")) == int(n)
    assert sorted(seen) == sorted(_dotted(a) for a in sent)


def _dotted(v) -> str:
    v = int(v)
    return ".".join(str((v >> s) & 255) for s in (24, 16, 8, 0))


# --- two `pylvs run` directors ---------------------------------------------

SYNCID = "7"
CLIENTS = [f"10.0.0.{i}" for i in range(2, 8)]   # the lab's cip, then extra addresses
PER_CLIENT = 3
HOLD = """
import json, socket, sys, time
vip, port, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for addr in sys.argv[4:]:
    for _ in range(per):
        s = socket.create_connection((vip, port), timeout=5, source_address=(addr, 0))
        # Two segments after the handshake: the 3rd client packet is the one
        # the kernel's rule (sync_threshold 3) announces; the request stays
        # unfinished, so the real server keeps the conn open.
        s.sendall(b"GET /whoami HTTP/1.1\\r\\n")
        time.sleep(0.02)
        s.sendall(b"Host: sync\\r\\n")
        held.append(s)
print(json.dumps([[addr, s.getsockname()[1]] for addr, s in
                  ((s.getsockname()[0], s) for s in held)]), flush=True)
time.sleep(60)
"""


class Backup:
    """A second director in a namespace of the test's own, linked to the
    lab's director by the sync link sy0 (10.77.0.1 ↔ 10.77.0.2)."""

    def __init__(self, lab, ns: str, workers: int, logs: Path):
        self.lab, self.ns, self.workers, self.logs = lab, ns, workers, logs
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, *extra: str) -> None:
        from pylvs.lab.topology import wait_for_file

        self.starts += 1
        log = self.logs / f"backup-{self.starts}.log"
        argv = self.lab.pylvs_argv("run", "--iface", "sy0", "--workers", str(self.workers),
                                   *extra)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], stdout=f,
                                         stderr=f, stdin=subprocess.DEVNULL, cwd=REPO,
                                         start_new_session=True)
        assert wait_for_file(log, " ready: ", 20, proc=self.proc), log.read_text()[-3000:]

    def log_text(self) -> str:
        return "".join((self.logs / f"backup-{i}.log").read_text(errors="replace")
                       for i in range(1, self.starts + 1))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def adm(self, *args: str, check: bool = True) -> str:
        p = subprocess.run(["ip", "netns", "exec", self.ns, *self.lab.pylvs_argv("adm", *args)],
                           capture_output=True, text=True, timeout=20, cwd=REPO)
        assert not check or p.returncode == 0, (args, p.returncode, p.stderr)
        return p.stdout

    def py(self, code: str):
        p = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=20, cwd=REPO)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])

    def stats(self) -> dict:
        p = subprocess.run(["ip", "netns", "exec", self.ns, *self.lab.pylvs_argv("stats", "--json")],
                           capture_output=True, text=True, timeout=20, cwd=REPO)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)


@pytest.fixture
def pair(director_lab, workers, uid, tmp_path):
    """(lab with its director = the master, Backup), the same persistent
    VS-NAT service on both, both sync daemons running (syncid 7)."""
    lab = director_lab(servers=2)
    ns = f"pl{uid}-bk"
    backup = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        veth_pair(lab.director, ns, "sy0", "10.77.0.1/24", "10.77.0.2/24")
        for addr in CLIENTS[1:]:
            sh("ip", "-n", lab.client, "addr", "add", f"{addr}/24", "dev", "eth0")
        backup = Backup(lab, ns, workers, tmp_path)
        backup.start()
        rules = RULES.format(vip=lab.vip, rs1=lab.rips[0], rs2=lab.rips[1])
        lab.adm("-R", stdin=rules)
        assert lab.wait_resolved(lab.rips[:2])
        _restore(backup, rules)
        lab.adm("--start-daemon", "master", "--mcast-interface", "sy0", "--syncid", SYNCID)
        backup.adm("--start-daemon", "backup", "--mcast-interface", "sy0", "--syncid", SYNCID)
        yield lab, backup
    finally:
        if backup is not None:
            print(f"--- backup log ---\n{backup.log_text()[-6000:]}")
            backup.stop()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


RULES = """-A -t {vip}:80 -s rr -p 300
-a -t {vip}:80 -r {rs1}:80 -m -w 1
-a -t {vip}:80 -r {rs2}:80 -m -w 1
"""


def _restore(backup: Backup, rules: str) -> None:
    p = subprocess.run(["ip", "netns", "exec", backup.ns, *backup.lab.pylvs_argv("adm", "-R")],
                       input=rules, capture_output=True, text=True, timeout=20, cwd=REPO)
    assert p.returncode == 0, p.stderr


def conn_rows(listing: str) -> set[tuple]:
    """`-L -c -n` rows without their expiry: (pro, state, source, virtual, destination)."""
    rows = set()
    for line in listing.splitlines()[2:]:
        pro, _expire, state, src, vip, dst = line.split()
        rows.add((pro, state, src, vip, dst))
    return rows


def wait_rows(backup: Backup, want: set, timeout: float) -> set:
    deadline = time.monotonic() + timeout
    got: set = set()
    while time.monotonic() < deadline:
        got = conn_rows(backup.adm("-L", "-c", "-n"))
        if want <= got:
            break
        time.sleep(0.2)
    return got


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
def test_backup_installs_what_the_master_forwards_and_resyncs_after_restart(pair, workers):
    lab, backup = pair
    daemon_line = ("{} sync daemon (mcast=sy0, syncid=7, maxlen=1472, group=224.0.0.81, "
                   "port=8848, ttl=1)\n")
    assert lab.adm("-L", "--daemon") == daemon_line.format("master")
    assert backup.adm("-L", "--daemon") == daemon_line.format("backup")

    hold = lab.popen(lab.client, [sys.executable, "-c", HOLD, lab.vip, "80", str(PER_CLIENT),
                                  *CLIENTS], stdout=subprocess.PIPE, text=True)
    try:
        held = json.loads(hold.stdout.readline())
        assert len(held) == len(CLIENTS) * PER_CLIENT
        master = conn_rows(lab.adm("-L", "-c", "-n"))
        conns = {r for r in master if r[1] == "ESTABLISHED"}
        assert {r[2] for r in conns} == {f"{a}:{p}" for a, p in held}
        templates = {r for r in master if r[1] == "ASSURED" or r[1] == "NONE"}
        assert {r[2].split(":")[0] for r in templates} == set(CLIENTS)
        # Sent at the 3rd packet, a partial message flushed within 2 s.
        got = wait_rows(backup, master, 6.0)
        assert master <= got, sorted(master - got)

        if workers > 1:   # each conn in the worker its client's frames reach
            from pylvs.io import bpf
            listed = backup.py("from pylvs.control import rpc; import json; "
                               "print(json.dumps(rpc.Client().call({'op': 'conns'})))")
            for c in listed:
                assert c["worker"] == bpf.fanout_mix(bpf.ip(c["caddr"])) % workers, c

        # A restarted backup hears nothing from these idle conns: the bulk
        # resync brings the master's whole table back. This time the
        # director starts its daemon itself, and its rules come after
        # (as `pylvs run --start-daemon backup` then `pylvs adm -R`): the
        # first answer installs nothing, the backup asks again once the
        # rules are there.
        backup.stop()
        backup.start("--start-daemon", "backup", "--mcast-interface", "sy0",
                     "--syncid", SYNCID)
        assert backup.adm("-L", "--daemon") == daemon_line.format("backup")
        deadline = time.monotonic() + 5
        while not backup.stats()["sync"]["backup"]["bulk_complete"]:
            assert time.monotonic() < deadline, backup.stats()["sync"]
            time.sleep(0.1)
        assert conn_rows(backup.adm("-L", "-c", "-n")) == set()
        _restore(backup, RULES.format(vip=lab.vip, rs1=lab.rips[0], rs2=lab.rips[1]))
        got = wait_rows(backup, master, 5.0)   # rules rest 1 s, then the re-ask
        assert master <= got, sorted(master - got)
        sync = backup.stats()["sync"]["backup"]
        assert sync["bulk_complete"] is True and sync["installed"] >= len(master)
        assert sync["bulk_reasks"] == 1 and sum(sync["dropped"].values()) == 0
        again = subprocess.run(["ip", "netns", "exec", backup.ns,
                                *lab.pylvs_argv("adm", "--start-daemon", "backup",
                                                "--mcast-interface", "sy0")],
                               capture_output=True, text=True, timeout=20, cwd=REPO)
        assert again.returncode != 0 and again.stderr == "Daemon has already run\n"
    finally:
        hold.kill()
        hold.wait(timeout=5)


def test_bad_packets_at_the_backup_are_counted_and_install_nothing(pair):
    lab, backup = pair
    before = conn_rows(backup.adm("-L", "-c", "-n"))
    good = wire.encode(np.array([(6, 1, 0, 0x0A000063, 4242, 0x0A000064, 80, 0x0A00010B, 80, 0,
                                  900)], dtype=wire.SYNC_DTYPE), int(SYNCID))[0]
    bad = [good[:-1], good[:3], _replace(good, 1, 8), _replace(good, 5, 2),
           _replace(good, 4, 2), bytes([1]) + good[1:], _replace(good, 10, 0x10)]
    code = f"""
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
             socket.inet_aton("0.0.0.0") * 2 + struct.pack("i", socket.if_nametoindex("sy0")))
for m in {[bytes(b) for b in bad]!r}:
    s.sendto(m, ("224.0.0.81", 8848))
print("[]")
"""
    lab.py(lab.director, code)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        dropped = backup.stats()["sync"]["backup"]["dropped"]
        if sum(dropped.values()) >= len(bad):
            break
        time.sleep(0.1)
    assert {k: v for k, v in dropped.items() if v} == {
        "bad_size": 1, "short": 1, "wrong_syncid": 1, "bad_version": 1, "truncated": 1,
        "v0": 1, "conn_version": 1}
    assert conn_rows(backup.adm("-L", "-c", "-n")) == before
    # The good message itself installs (the socket and syncid are right).
    lab.py(lab.director, code.replace(repr([bytes(b) for b in bad]), repr([good])))
    got = wait_rows(backup, {("TCP", "ESTABLISHED", "10.0.0.99:4242", f"{lab.vip}:80",
                              f"{lab.rips[0]}:80")}, 5.0)
    assert ("TCP", "ESTABLISHED", "10.0.0.99:4242", f"{lab.vip}:80", f"{lab.rips[0]}:80") in got


def _replace(buf: bytes, off: int, val: int) -> bytes:
    return buf[:off] + bytes([val]) + buf[off + 1:]
