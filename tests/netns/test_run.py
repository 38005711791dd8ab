"""Smoke tests of `pylvs run`: start, ready, SIGTERM, clean exit."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from nsio import REPO, sh, steering_state

pytestmark = pytest.mark.netns

RUN = [sys.executable, "-m", "pylvs.cli.main", "run"]


class Pair:
    """Two namespaces joined by a veth: two directors side by side."""

    def __init__(self, uid: str):
        self.a, self.b = f"pl{uid}-a", f"pl{uid}-b"
        self.uid = uid

    def up(self) -> "Pair":
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"pl{self.uid}a", "netns", self.a, "type", "veth",
           "peer", "name", f"pl{self.uid}b", "netns", self.b)
        for ns, dev, addr in ((self.a, f"pl{self.uid}a", "10.9.5.1/24"),
                              (self.b, f"pl{self.uid}b", "10.9.5.2/24")):
            sh("ip", "-n", ns, "link", "set", dev, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return self

    def down(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def pair(uid):
    p = Pair(uid)
    try:
        yield p.up()
    finally:
        p.down()


def start(ns: str, *args: str, env=None, log=None) -> tuple[subprocess.Popen, str]:
    log = log or tempfile.NamedTemporaryFile(prefix="pylvs-run-", suffix=".log", delete=False).name
    with open(log, "wb") as f:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *RUN, *args], cwd=REPO, stdout=f,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})})
    return p, log


@contextlib.contextmanager
def running(ns: str, *args: str, env=None):
    """``pylvs run`` in ``ns``; killed (if still up) and its log removed afterwards."""
    p, log = start(ns, *args, env=env)
    try:
        yield p, log
    finally:
        if p.poll() is None:
            p.kill()
        os.unlink(log)


def wait_ready(p: subprocess.Popen, log: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = open(log, errors="replace").read()
        if "ready" in text:
            return text
        if p.poll() is not None:
            raise AssertionError(f"pylvs run exited with {p.returncode}:\n{text}")
        time.sleep(0.1)
    raise AssertionError(f"pylvs run not ready in {timeout}s:\n{open(log).read()}")


def stop(p: subprocess.Popen, timeout: float = 10) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise AssertionError("pylvs run ignored SIGTERM")
    return p.returncode


def has_table(ns: str) -> bool:
    """Something of pylvs steers eth0 of ns (a tcx program or the nft table)."""
    return steering_state(ns) is not None


def nft_table(ns: str) -> bool:
    return sh("ip", "netns", "exec", ns, "nft", "list", "table", "netdev", "pylvs",
              check=False).returncode == 0


@pytest.mark.parametrize("steering", ["bpf", "nft", None])
def test_run_ready_then_sigterm_exits_clean(pair, steering):
    notify_path = tempfile.mktemp(prefix="pylvs-notify-")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    p, log = start(pair.a, "--iface", "eth0", *(["--steering", steering] if steering else []),
                   env={"NOTIFY_SOCKET": notify_path})
    try:
        wait_ready(p, log)
        assert notify.recv(100) == b"READY=1"
        # By default BPF (this kernel has tcx); the nft table only when asked.
        assert steering_state(pair.a)["kind"] == (steering or "bpf")
        assert nft_table(pair.a) == (steering == "nft")
        if steering == "nft":
            assert 'device "eth0"' in sh("ip", "netns", "exec", pair.a, "nft", "list", "table",
                                         "netdev", "pylvs").stdout
        assert stop(p) == 0, open(log).read()
        assert not has_table(pair.a)
        assert "stopped" in open(log).read()
    finally:
        if p.poll() is None:
            p.kill()
        notify.close()
        os.unlink(notify_path)
        os.unlink(log)


def test_two_directors_side_by_side_with_defaults(pair):
    # No --iface, no --control: each picks its namespace's interfaces and
    # control socket.
    pa, la = start(pair.a)
    pb, lb = start(pair.b)
    try:
        ta, tb = wait_ready(pa, la), wait_ready(pb, lb)
        assert "eth0" in ta and "eth0" in tb
        assert has_table(pair.a) and has_table(pair.b)
        assert stop(pa) == 0, open(la).read()
        assert not has_table(pair.a) and has_table(pair.b)
        assert pb.poll() is None
        assert stop(pb) == 0, open(lb).read()
        assert not has_table(pair.b)
    finally:
        for p in (pa, pb):
            if p is not None and p.poll() is None:
                p.kill()
        for log in (la, lb):
            if log is not None:
                os.unlink(log)


def test_second_director_in_one_namespace_is_refused(pair, tmp_path):
    # Both would own "table netdev pylvs": the second replaced the first's
    # table at start and deleted it at exit, so the kernel then saw (and
    # reset) the first one's established connections.
    pa, la = start(pair.a, "--iface", "eth0", "--control", str(tmp_path / "a.sock"))
    pb = lb = None
    try:
        wait_ready(pa, la)  # the first holds the namespace before the second starts
        pb, lb = start(pair.a, "--iface", "eth0", "--control", str(tmp_path / "b.sock"))
        assert pb.wait(10) != 0
        assert "another pylvs director" in open(lb).read(), open(lb).read()
        assert pa.poll() is None and has_table(pair.a)
        assert stop(pa) == 0, open(la).read()
        # The namespace is free again once the first one has gone.
        pc, lc = start(pair.a, "--iface", "eth0", "--control", str(tmp_path / "c.sock"))
        try:
            wait_ready(pc, lc)
            assert stop(pc) == 0
        finally:
            if pc.poll() is None:
                pc.kill()
            os.unlink(lc)
    finally:
        for p in (pa, pb):
            if p is not None and p.poll() is None:
                p.kill()
        for log in (la, lb):
            if log is not None:
                os.unlink(log)


def test_same_interface_twice_is_refused(pair):
    # Two ports on one interface: every frame read and forwarded twice.
    with running(pair.a, "--iface", "eth0", "--iface", "eth0") as (p, log):
        assert p.wait(10) != 0
        assert "eth0 given twice" in open(log).read(), open(log).read()


@pytest.mark.parametrize("steering", ["bpf", "nft"])
def test_stale_table_from_a_crash_is_replaced(pair, steering):
    # Left by a killed nft-steered run (or an older pylvs): it would keep
    # dropping the VIPs' frames. BPF steering removes it, nft replaces it.
    sh("ip", "netns", "exec", pair.a, "nft", "add", "table", "netdev", "pylvs")
    sh("ip", "netns", "exec", pair.a, "nft", "add", "chain", "netdev", "pylvs", "stale")
    with running(pair.a, "--iface", "eth0", "--steering", steering) as (p, log):
        wait_ready(p, log)
        if steering == "bpf":
            assert not nft_table(pair.a)
            assert "removed the nft table netdev pylvs left by an earlier run" in open(log).read()
        else:
            text = sh("ip", "netns", "exec", pair.a, "nft", "list", "table", "netdev",
                      "pylvs").stdout
            assert "stale" not in text
        assert steering_state(pair.a)["kind"] == steering
        assert stop(p) == 0


def test_config_file_rules_applied_at_start(pair, tmp_path):
    conf = tmp_path / "rules"
    conf.write_text("-A -t 10.9.5.1:80 -s rr\n"
                    "-a -t 10.9.5.1:80 -r 10.9.5.2:8080 -m -w 2\n"
                    "-A -u 10.9.5.1:53 -s wlc\n")
    with running(pair.a, "-c", str(conf)) as (p, log):
        wait_ready(p, log)
        sets = steering_state(pair.a)["sets"]
        assert sets["services"] == ["10.9.5.1 . tcp . 80", "10.9.5.1 . udp . 53"]
        assert sets["realservers"] == ["10.9.5.2 . tcp . 8080"]
        listing = sh("ip", "netns", "exec", pair.a, *RUN[:-1], "adm", "-L", "-n").stdout
        assert "TCP  10.9.5.1:80 rr" in listing
        assert "-> 10.9.5.2:8080" in listing and "Masq    2" in listing
        assert stop(p) == 0


def test_bad_config_file_fails_the_start(pair, tmp_path):
    conf = tmp_path / "rules"
    conf.write_text("-A -t 10.9.5.1:80 -s rr\n-a -t 10.9.5.1:80 -r nonsense:x -m\n")
    with running(pair.a, "-c", str(conf)) as (p, log):
        assert p.wait(20) != 0
        text = open(log).read()
        assert "line 2" in text, text
        assert not has_table(pair.a)


def test_binary_config_file_fails_the_start_with_its_name(pair, tmp_path):
    conf = tmp_path / "rules"
    conf.write_bytes(b"-A -t 10.9.5.1:80 -s rr\n\xa1\xff\x00\n")
    with running(pair.a, "-c", str(conf)) as (p, log):
        assert p.wait(20) != 0
        text = open(log).read()
        assert f"-c {conf}" in text, text
        assert "Traceback" not in text, text


def test_new_local_address_reaches_the_steering_set(pair):
    with running(pair.a, "--iface", "eth0") as (p, log):
        wait_ready(p, log)
        sh("ip", "-n", pair.a, "addr", "add", "10.9.5.100/32", "dev", "eth0")
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = steering_state(pair.a)["sets"]["local"]
            if "10.9.5.100" in text:
                break
            time.sleep(0.2)
        assert "10.9.5.100" in text and "10.9.5.1" in text
        assert stop(p) == 0
