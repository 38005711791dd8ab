"""Issue 5 items 2 and 3: the client learns at once that nobody will answer.

Item 2 (kernel ip_vs_leave): a service with no dest, or only weight-0 dests,
answers a new flow with ICMP port unreachable, for TCP and UDP alike; the
client's connect (or its connected UDP socket) fails with ECONNREFUSED.

Item 3: a TCP segment that matches no conn (a keep-alive connection idle
past the tcp timeout) gets a RST, as the kernel director's own stack would
answer for the VIP; the client sees ECONNRESET and can reconnect at once.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.netns

NO_DEST, WEIGHT0 = 8081, 8082

REFUSED = """
import json, socket, sys, time
vip, out = sys.argv[1], {}
for proto, port in (("tcp", %(NO_DEST)d), ("tcp", %(WEIGHT0)d),
                    ("udp", %(NO_DEST)d), ("udp", %(WEIGHT0)d)):
    t = time.monotonic()
    if proto == "tcp":
        s = socket.socket()
        s.settimeout(3)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
    try:
        s.connect((vip, port))  # UDP: connected, so ICMP errors reach the socket
        if proto == "udp":
            s.send(b"anyone?")
            s.recv(100)
        res = "answered"
    except OSError as e:
        res = type(e).__name__
    out[f"{proto}:{port}"] = [res, round(time.monotonic() - t, 3)]
    s.close()
print(json.dumps(out))
""" % {"NO_DEST": NO_DEST, "WEIGHT0": WEIGHT0}


def test_service_without_available_dest_refuses_at_once(director_lab):
    lab = director_lab(servers=1)
    for flag in ("-t", "-u"):
        lab.adm("-A", flag, f"{lab.vip}:{NO_DEST}", "-s", "rr")
        lab.adm("-A", flag, f"{lab.vip}:{WEIGHT0}", "-s", "rr")
        lab.adm("-a", flag, f"{lab.vip}:{WEIGHT0}", "-r", f"{lab.rips[0]}:80", "-m", "-w", "0")
    assert lab.wait_resolved(lab.rips[:1])
    seen = lab.py(lab.client, REFUSED, args=(lab.vip,), timeout=30)
    for case, (res, secs) in seen.items():
        assert res == "ConnectionRefusedError", (case, seen)
        assert secs < 1.0, (case, seen)
    # Counted and visible to the operator.
    st = lab.stats()
    assert st["drop_no_dest"] >= 4, st
    assert st["icmp_unreach_sent"] >= 4, st


IDLE = """
import json, socket, sys, time
from pylvs.lab.clients import whoami
vip, idle, out = sys.argv[1], float(sys.argv[2]), {}
s = socket.create_connection((vip, 80), timeout=3)
out["first"] = whoami(s)
time.sleep(idle)  # longer than the director's tcp timeout: the conn expires
t = time.monotonic()
try:
    out["second"] = whoami(s)
except OSError as e:  # ECONNRESET, or EPIPE if the RST came before the send
    out["error"] = type(e).__name__
out["secs"] = round(time.monotonic() - t, 3)
s.close()
t = time.monotonic()
with socket.create_connection((vip, 80), timeout=3) as s2:
    out["again"] = whoami(s2)
out["again_secs"] = round(time.monotonic() - t, 3)
print(json.dumps(out))
"""


def test_segment_of_an_expired_conn_gets_a_reset(director_lab):
    lab = director_lab(servers=1)
    lab.nat_service("tcp", 80, (1,))
    lab.adm("--set", "3", "0", "0")  # tcp (established) timeout 3 s
    out = lab.py(lab.client, IDLE, args=(lab.vip, 6), timeout=30)
    assert out["first"] == "rs1", out
    assert out.get("error") in ("ConnectionResetError", "BrokenPipeError"), out
    assert out["secs"] < 1.0, out
    assert out["again"] == "rs1" and out["again_secs"] < 1.0, out
    assert lab.stats()["rst_sent"] >= 1
