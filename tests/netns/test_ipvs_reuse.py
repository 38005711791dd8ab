"""Issue 5 item 1: a client port reused after an abort is scheduled afresh.

A client aborts its connection with a RST (SO_LINGER 0): the director's conn
sits in CLOSE (10 s). Its real server is then deleted or quiesced (weight
0), and the client connects again from the same source port. Behind a
kernel director the SYN finds the conn in CLOSE, which `is_new_conn_expected`
accepts (conn_reuse_mode=1): the conn is expired and the SYN scheduled anew,
so the client connects at once, to an available real server.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.netns

ABORT = """
import json, socket, struct, sys
from pylvs.lab.clients import whoami
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(5)
s.connect((sys.argv[3], 80))
name = whoami(s)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()  # linger 0: the kernel sends a RST instead of a FIN
print(json.dumps(name))
"""

RECONNECT = """
import json, socket, sys, time
from pylvs.lab.clients import whoami
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[4]))
t = time.monotonic()
out = {}
try:
    s.connect((sys.argv[3], 80))
    out["connect_s"] = time.monotonic() - t
    out["server"] = whoami(s)
except OSError as e:
    out["error"] = f"{type(e).__name__}: {e}"
    out["connect_s"] = time.monotonic() - t
s.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("change", ["delete", "weight0"])
def test_same_source_port_after_rst_is_rescheduled(director_lab, change):
    lab = director_lab(servers=2)
    vip = lab.nat_service("tcp", 80, (1, 1), sched="rr")
    sport = random.randrange(20000, 30000)  # below the ephemeral range: no clash
    first = lab.py(lab.client, ABORT, args=(lab.cip, sport, lab.vip))
    assert first in lab.rs_names
    rip = lab.rips[lab.rs_names.index(first)]
    if change == "delete":
        lab.adm("-d", "-t", vip, "-r", f"{rip}:80")
    else:
        lab.adm("-e", "-t", vip, "-r", f"{rip}:80", "-m", "-w", "0")
    # Waits up to 5 s: long enough to tell "at once" from the 11 s the
    # client waited when the conn in CLOSE held the port.
    again = lab.py(lab.client, RECONNECT, args=(lab.cip, sport, lab.vip, 5), timeout=20)
    assert "error" not in again, again
    assert again["connect_s"] < 1.0, again
    (other,) = set(lab.rs_names) - {first}
    assert again["server"] == other, (first, again)
