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
   backup gets the whole table back by bulk resync; bad packets sent at
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


def stop_capture(p: subprocess.Popen) -> None:
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)


def test_daemons_over_a_veth_with_stand_in_engines(two_ns, tmp_path):
    ns_a, ns_b = two_ns
    pcap = str(tmp_path / "sync.pcap")
    cap = capture(ns_b, "sy0", pcap)
    try:
        p = subprocess.run([sys.executable, str(HERE / "sync_pair.py"), ns_a, "sy0", ns_b, "sy0"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    finally:
        stop_capture(cap)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
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
    # The wire, as Wireshark decodes it: syncid 7, v1, conns whose client
    # addresses are the ones sent.
    if shutil.which("tshark"):
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
