"""The whole director process (Daemon) forwarding VS-NAT between namespaces.

The director is embedded with an on_start hook that configures the
Balancer directly, so this test needs neither `pylvs adm` nor a config
file: it checks the I/O and process side (rings, filter, steering, neighbour
resolution, data thread) with each engine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from nsio import REPO, sh, steering_state

pytestmark = pytest.mark.netns

DIRECTOR = r"""
import sys, logging
from pylvs.runtime.daemon import Daemon, Options
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
def setup(b):
    b.add_service("tcp", "10.9.0.1", 80, "rr")
    b.add_dest("tcp", "10.9.0.1", 80, "10.9.1.2", 8080, "masq", 1)
    b.add_service("udp", "10.9.0.1", 53, "rr")
    b.add_dest("udp", "10.9.0.1", 53, "10.9.1.2", 5353, "masq", 1)
opts = Options(ifaces=["d0", "d1"], engine=sys.argv[1], control=sys.argv[2])
sys.exit(Daemon(opts, on_start=setup).run())
"""

REAL_SERVER = r"""
import socket, threading, hashlib
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("10.9.1.2", 8080)); l.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("10.9.1.2", 5353))
def udp():
    while True:
        d, a = u.recvfrom(65535); u.sendto(b"echo:" + d, a)
threading.Thread(target=udp, daemon=True).start()
def serve(c):
    h = hashlib.sha256()
    while True:
        d = c.recv(1 << 20)
        if not d: break
        h.update(d)
    c.sendall(h.hexdigest().encode() + b" " + str(c.getpeername()[0]).encode()); c.close()
print("ready", flush=True)
while True:
    c, a = l.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import socket, os, hashlib, json
out = {}
data = os.urandom(8 << 20)
s = socket.create_connection(("10.9.0.1", 80), timeout=10)
s.sendall(data); s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = s.recv(4096)
    if not d: break
    reply += d
digest, peer = reply.decode().split()
out["tcp_ok"] = digest == hashlib.sha256(data).hexdigest()
out["rs_saw_client"] = peer
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
u.sendto(b"hi", ("10.9.0.1", 53))
d, a = u.recvfrom(100)
out["udp"] = [d.decode(), a[0], a[1]]
print(json.dumps(out))
"""


CONNECT_TIME = r"""
import socket, time, json
t = time.monotonic()
s = socket.create_connection(("10.9.0.1", 81), timeout=5)
print(json.dumps(time.monotonic() - t))
"""


@pytest.mark.parametrize("engine", ["c", "python"])
@pytest.mark.parametrize("ip_forward", [0, 1])
def test_director_forwards_vs_nat(trio, engine, ip_forward, tmp_path):
    sh("ip", "netns", "exec", trio.d, "sysctl", "-qw", f"net.ipv4.ip_forward={ip_forward}")
    rs = subprocess.Popen(["ip", "netns", "exec", trio.r, sys.executable, "-c", REAL_SERVER],
                          cwd=REPO, stdout=subprocess.PIPE, text=True)
    log = tmp_path / "director.log"
    with open(log, "wb") as f:
        director = subprocess.Popen(
            ["ip", "netns", "exec", trio.d, sys.executable, "-c", DIRECTOR, engine,
             str(tmp_path / "ctl.sock")], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        assert rs.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            assert director.poll() is None, log.read_text()
            time.sleep(0.1)
        out = trio.py(trio.c, CLIENT, timeout=40)
        assert out["tcp_ok"], out
        assert out["rs_saw_client"] == "10.9.0.2"  # NAT keeps the client address
        assert out["udp"] == ["echo:hi", "10.9.0.1", 53]  # reply from the VIP

        # A service added at run time through the control socket answers at
        # once (a SYN lost between steering and the engine would show as a
        # 1 s retransmission).
        env = {**os.environ, "PYLVS_CONTROL": str(tmp_path / "ctl.sock")}
        for args in (["-A", "-t", "10.9.0.1:81", "-s", "rr"],
                     ["-a", "-t", "10.9.0.1:81", "-r", "10.9.1.2:8080", "-m"]):
            subprocess.run(["ip", "netns", "exec", trio.d, sys.executable, "-m", "pylvs.cli.main",
                            "adm", *args], cwd=REPO, env=env, check=True, timeout=20)
        t = trio.py(trio.c, CONNECT_TIME, timeout=20)
        assert t < 0.5, t
        director.send_signal(signal.SIGTERM)
        assert director.wait(10) == 0, log.read_text()
        assert steering_state(trio.d, "d0") is None and steering_state(trio.d, "d1") is None
    finally:
        for p in (director, rs):
            if p.poll() is None:
                p.kill()
                p.wait()
