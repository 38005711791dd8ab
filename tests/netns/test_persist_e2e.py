"""Persistence end to end (`-p`, `-M`, port-0 services) in a VS-NAT lab
with three real servers, with one worker and with two.

Each real server's httpd answers GET /whoami with its name, and its UDP
echo (port 7) prefixes its name: the client sees which real server took
each connection. The schedulers alone (rr) would spread a client's
connections over all three; a persistent service keeps every connection of
a client (or, with -M, of its network) on the real server its template
names, until the template expires (kernel ip_vs_sched_persist).
"""

from __future__ import annotations

import time

import pytest

from pylvs.lab.topology import Lab

pytestmark = pytest.mark.netns

# The lab's client segment is a /24: these addresses share it. Unmasked,
# two workers would split them (bpf.fanout_mix: 77 odd, 79 even): with -M
# /24 the steering mask must bring both to the worker of their template.
CLIENT_B = "10.0.0.77"
CLIENT_C = "10.0.0.79"

# In the client namespace: n TCP connections (each a new source port) from
# `src` (or the default address) to VIP:port, GET /whoami; prints the
# real servers' names (None for a failed one).
WHOAMI = """
import http.client, json, sys
vip, port, n, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = []
for _ in range(n):
    name = None
    for _attempt in range(3):
        c = http.client.HTTPConnection(vip, port, timeout=3,
                                       source_address=(src, 0) if src != "-" else None)
        try:
            c.request("GET", "/whoami")
            name = c.getresponse().read().decode().strip()
            break
        except OSError:
            continue
        finally:
            c.close()
    out.append(name)
print(json.dumps(out))
"""

# n UDP datagrams to VIP:7, each from a new socket (a new source port);
# prints the name each echo starts with.
ECHO = """
import json, socket, sys
vip, n = sys.argv[1], int(sys.argv[2])
out = []
for k in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    name = None
    for _ in range(3):
        s.sendto(b"ping %d" % k, (vip, 7))
        try:
            name = s.recv(2048).split()[0].decode()
            break
        except socket.timeout:
            continue
    s.close()
    out.append(name)
print(json.dumps(out))
"""


def whoami(lab: Lab, n: int, src: str = "-", port: int = 80) -> list:
    return lab.py(lab.client, WHOAMI, timeout=60, args=(lab.vip, port, n, src))


def echo(lab: Lab, n: int) -> list:
    return lab.py(lab.client, ECHO, timeout=60, args=(lab.vip, n))


def persistent_service(lab: Lab, proto: str, port: int, *opts: str) -> None:
    flag = {"tcp": "-t", "udp": "-u"}[proto]
    lab.adm("-A", flag, f"{lab.vip}:{port}", "-s", "rr", *opts)
    for rip in lab.rips:
        lab.adm("-a", flag, f"{lab.vip}:{port}", "-r", f"{rip}:{port}", "-m")
    assert lab.wait_resolved(lab.rips), lab.director_log()[-2000:]


@pytest.fixture
def lab(pooled_lab) -> Lab:
    lab = pooled_lab(servers=3)
    for a in (CLIENT_B, CLIENT_C):
        lab.run(lab.client, ["ip", "addr", "replace", f"{a}/24", "dev", "eth0"])
    return lab


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
def test_same_client_same_real_server_across_connections(lab: Lab):
    persistent_service(lab, "tcp", 80, "-p", "300")
    names = whoami(lab, 24)
    assert None not in names, names
    assert len(set(names)) == 1, names
    # Another client is scheduled afresh: rr gives it the next real server.
    other = whoami(lab, 6, CLIENT_B)
    assert len(set(other)) == 1 and other[0] != names[0], (names[0], other)
    # -L -c lists the templates (cport 0) and -L --persistent-conn counts them.
    conns = lab.adm("-L", "-n", "-c")
    tpl = [line.split() for line in conns.splitlines() if ":0 " in line]
    assert sorted(t[3] for t in tpl) == sorted([f"{lab.cip}:0", f"{CLIENT_B}:0"]), conns
    assert all(t[0] == "TCP" and t[4] == f"{lab.vip}:80" for t in tpl), conns
    rows = [line.split() for line in lab.adm("-L", "-n", "--persistent-conn").splitlines()
            if "->" in line and ":80" in line]
    assert sorted(int(r[3]) for r in rows) == [0, 1, 1], rows   # PersistConn


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
@pytest.mark.parametrize("netmask, together", [("255.255.255.0", True), (None, False)])
def test_netmask_groups_a_slash_24(lab: Lab, netmask, together):
    persistent_service(lab, "tcp", 80, "-p", "300", *(("-M", netmask) if netmask else ()))
    b = whoami(lab, 8, CLIENT_B)
    c = whoami(lab, 8, CLIENT_C)
    assert None not in b + c and len(set(b)) == 1 and len(set(c)) == 1, (b, c)
    assert (b[0] == c[0]) == together, (b, c)
    if together:
        assert "10.0.0.0:0" in lab.adm("-L", "-n", "-c")


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
def test_template_expires_after_a_short_timeout(lab: Lab):
    """UDP conns of 1 s (--set 0 0 1) under -p 2: while datagrams keep
    coming the client stays; 2 s after its last conn the template is gone
    and rr gives the client the next real server."""
    lab.adm("--set", "0", "0", "1")
    persistent_service(lab, "udp", 7, "-p", "2")
    first = echo(lab, 5)
    assert None not in first and len(set(first)) == 1, first
    assert "UDP" in lab.adm("-L", "-n", "-c")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ":0 " in lab.adm("-L", "-n", "-c"):
        time.sleep(0.5)
    assert ":0 " not in lab.adm("-L", "-n", "-c")
    again = echo(lab, 3)
    assert None not in again and len(set(again)) == 1 and again[0] != first[0], (first, again)


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
@pytest.mark.parametrize("steering", ["bpf", "nft"])
def test_port_zero_service_serves_every_port_of_the_vip(pooled_lab, steering):
    """-A -t VIP:0 -p: accepted only with persistence; the NAT dests given
    port 0 take the packet's port (80 here), and their replies reach the
    client through the worker holding the conn; both steering modes take
    every port of a port-0 service and its real servers."""
    lab = pooled_lab(run_args=("--steering", steering), servers=3)
    lab.run(lab.client, ["ip", "addr", "replace", f"{CLIENT_B}/24", "dev", "eth0"])
    p = lab.adm_run("-A", "-t", f"{lab.vip}:0", "-s", "rr")
    assert p.returncode != 0 and "Zero port specified for non-persistent service" in p.stderr
    lab.adm("-A", "-t", f"{lab.vip}:0", "-s", "rr", "-p", "300")
    for rip in lab.rips:
        lab.adm("-a", "-t", f"{lab.vip}:0", "-r", f"{rip}:0", "-m")
    assert lab.wait_resolved(lab.rips), lab.director_log()[-2000:]
    names = whoami(lab, 10) + whoami(lab, 4, CLIENT_B)
    assert None not in names, names
    assert len(set(names[:10])) == 1, names
    conns = lab.adm("-L", "-n", "-c")
    assert f"{lab.vip}:0" in conns and f"{lab.vip}:80" in conns, conns
