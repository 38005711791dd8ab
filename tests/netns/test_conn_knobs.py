"""`-o` one-packet scheduling end to end (issue 8, item 4): every datagram
of a UDP service with ``-o`` is scheduled on its own and leaves no conn, as
the kernel's IP_VS_CONN_F_ONE_PACKET, with one worker and with two."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.netns

SEND = """
import json, socket, sys, time
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40123))
for i in range(n):
    s.sendto(b"ops-%d" % i, (vip, port))
    time.sleep(0.05)
print(json.dumps({"sent": n}))
"""


def _dest_columns(listing: str) -> dict[str, list[str]]:
    return {p[1]: p[2:] for p in (line.split() for line in listing.splitlines())
            if len(p) >= 3 and p[0] == "->" and p[1][0].isdigit()}


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
def test_one_packet_scheduling_spreads_one_sockets_datagrams(director_lab, workers):
    lab = director_lab(servers=2)
    vip = f"{lab.vip}:7"
    lab.adm("-A", "-u", vip, "-s", "rr", "-o")
    for rip in lab.rips:
        lab.adm("-a", "-u", vip, "-r", f"{rip}:7", "-m")
    assert lab.wait_resolved(lab.rips)
    assert f"UDP  {vip} rr ops" in lab.adm("-L", "-n")
    assert lab.py(lab.client, SEND, args=(lab.vip, 7, 10)) == {"sent": 10}
    stats = _dest_columns(lab.adm("-L", "-n", "--stats", "-u", vip))
    # Conns and InPkts per real server: rr took every datagram on its own.
    assert {k: v[:2] for k, v in stats.items()} == {f"{rip}:7": ["5", "5"] for rip in lab.rips}
    assert "40123" not in lab.adm("-L", "-n", "-c")   # no conn stays
    st = lab.stats()
    assert st["conns_created"] == 10 and st["conns_expired"] >= 10, st


HOLD = """
import socket, sys
from pylvs.lab.clients import whoami
s = socket.socket()
s.bind(("0.0.0.0", 40200))
s.connect((sys.argv[1], 80))
print(whoami(s), flush=True)
sys.stdin.readline()
print(whoami(s), flush=True)
sys.stdin.readline()
"""


def _expire_of(lab, cport: int) -> int:
    """Seconds left of the conn from client port `cport` (`-L -n -c`)."""
    for line in lab.adm("-L", "-n", "-c").splitlines():
        if f":{cport} " in line:
            mm, ss = line.split()[1].split(":")
            return int(mm) * 60 + int(ss)
    raise AssertionError(f"no conn from port {cport}")


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
def test_set_reaches_a_running_conn_at_its_next_packet(director_lab, workers):
    import subprocess

    lab = director_lab(servers=1)
    lab.nat_service("tcp", 80, (1,))
    p = lab.popen(lab.client, [lab.python, "-c", HOLD, lab.vip], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "rs1", p.stderr.read() if p.poll() else ""
        assert _expire_of(lab, 40200) > 14 * 60          # ESTABLISHED: 15 minutes
        lab.adm("--set", "30", "0", "0")
        assert _expire_of(lab, 40200) > 14 * 60          # no packet yet: the old timer
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "rs1"
        assert _expire_of(lab, 40200) <= 30              # the new table at the next packet
        assert "30 120 300" in lab.adm("-L", "--timeout")
    finally:
        p.kill()
        p.wait()
