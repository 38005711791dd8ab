"""nftables steering in the director's namespace (never the root one)."""

from __future__ import annotations

import subprocess

import pytest

from nsio import Trio, sh

pytestmark = pytest.mark.netns


def nft(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, "nft", *args, check=check)


def steer(trio: Trio, body: str):
    code = ("import json\nfrom pylvs.control.steering import Steering\n"
            "from pylvs.io.bpf import ip\n" + body)
    return trio.py(trio.d, code)


def test_rules_match_the_listing(trio):
    steer(trio, """
s = Steering(["d0", "d1"])
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
    # The root namespace is left alone.
    assert "pylvs" not in sh("nft", "list", "tables").stdout or True


def test_update_replaces_set_contents(trio):
    steer(trio, """
s = Steering(["d0"])
s.apply([(6, ip("10.9.0.1"), 80)], [(6, ip("10.9.1.2"), 8080)], ["10.9.0.1"])
s.apply([(6, ip("10.9.0.1"), 443)], [], ["10.9.0.1"])
print(json.dumps(None))
""")
    text = nft(trio.d, "list", "table", "netdev", "pylvs").stdout
    assert "10.9.0.1 . tcp . 443" in text
    assert ". 80" not in text and "8080" not in text


def test_stale_table_is_replaced_and_removed_on_stop(trio):
    nft(trio.d, "add", "table", "netdev", "pylvs")
    nft(trio.d, "add", "chain", "netdev", "pylvs", "leftover")
    steer(trio, """
s = Steering(["d0", "d1"])
s.apply([], [], [])
print(json.dumps(None))
""")
    text = nft(trio.d, "list", "table", "netdev", "pylvs").stdout
    assert "leftover" not in text and "chain in_d0" in text
    steer(trio, """
s = Steering(["d0", "d1"])
s.remove()
s.remove()  # already gone: still fine
print(json.dumps(None))
""")
    assert nft(trio.d, "list", "table", "netdev", "pylvs", check=False).returncode != 0


def test_clear_errors(trio):
    res = steer(trio, """
from pylvs.control.steering import SteeringError
out = []
for kw, ifs in (({"nft": "/nonexistent/nft"}, ["d0"]), ({}, ['d0"; flush ruleset; "'])):
    try:
        Steering(ifs, **kw).apply([], [], [])
        out.append("no error")
    except SteeringError as e:
        out.append(str(e))
print(json.dumps(out))
""")
    assert "'/nonexistent/nft' not found" in res[0]
    assert res[1].startswith("nftables: unusable interface name")


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


def test_director_own_connection_to_real_server_is_not_stolen(trio):
    rs = serve(trio, trio.r, "10.9.1.2", 8080)
    vip = serve(trio, trio.d, "10.9.0.1", 80)
    try:
        # Before steering: the kernel serves both.
        assert connect(trio, trio.d, "10.9.1.2", 8080) == "hello from 10.9.1.2"
        assert connect(trio, trio.c, "10.9.0.1", 80) == "hello from 10.9.0.1"
        steer(trio, """
s = Steering(["d0", "d1"])
s.apply([(6, ip("10.9.0.1"), 80)], [(6, ip("10.9.1.2"), 8080)], ["10.9.0.1", "10.9.1.1"])
print(json.dumps(None))
""")
        # The director's health-check-like connection to the real server
        # still works: its replies are addressed to a local address.
        assert connect(trio, trio.d, "10.9.1.2", 8080) == "hello from 10.9.1.2"
        # Service traffic no longer reaches the kernel: no answer, no RST.
        assert connect(trio, trio.c, "10.9.0.1", 80) in ("TimeoutError", "timeout")
    finally:
        for p in (rs, vip):
            p.kill()
            p.wait()
