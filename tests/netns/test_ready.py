"""`pylvs run -c RULES` logs "ready" only once it can forward to every dest.

A client that starts sending when the director says "ready" (a systemd
unit ordered After= it, a health check) must not lose its first packet to
a dest whose MAC the workers' tables do not carry yet (drop_unresolved):
a lone UDP datagram would be gone, a SYN would wait 1 s for its
retransmission.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from pylvs.lab.topology import HTTP_PORT, UDP_PORT

pytestmark = pytest.mark.netns

RESTARTS = 5


@pytest.fixture
def rules_path(tmp_path_factory):
    """Where the -c file goes: a path without the word "ready" in it, since
    the lab waits for that word in the director's log, and the log names
    the file ("applied N of N rules from PATH") before the director is
    ready."""
    path = tmp_path_factory.mktemp("lvs") / "rules"
    assert "ready" not in str(path)
    return path

# One line on stdin: one UDP datagram to VIP:UDP_PORT and one TCP connect to
# VIP:HTTP_PORT, each given 2 s; prints how long each took to be answered
# (None: no answer).
CLIENT = r"""
import json, socket, sys, time
vip, uport, tport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for line in sys.stdin:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    t0 = time.monotonic()
    u.sendto(b"first", (vip, uport))
    try:
        u.recvfrom(2048)
        udp = time.monotonic() - t0
    except OSError:
        udp = None
    u.close()
    t0 = time.monotonic()
    try:
        socket.create_connection((vip, tport), timeout=2).close()
        tcp = time.monotonic() - t0
    except OSError:
        tcp = None
    print(json.dumps({"udp": udp, "tcp": tcp}), flush=True)
"""


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
def test_first_request_after_start_is_answered_at_once(director_lab, rules_path, workers):
    lab = director_lab(start=False)
    rules = rules_path
    lines = [f"-A -u {lab.vip}:{UDP_PORT} -s rr", f"-A -t {lab.vip}:{HTTP_PORT} -s rr"]
    for rip in lab.rips:
        lines += [f"-a -u {lab.vip}:{UDP_PORT} -r {rip}:{UDP_PORT} -m",
                  f"-a -t {lab.vip}:{HTTP_PORT} -r {rip}:{HTTP_PORT} -m"]
    rules.write_text("\n".join(lines) + "\n")
    client = lab.popen(lab.client, [lab.python, "-c", CLIENT, lab.vip, str(UDP_PORT),
                                    str(HTTP_PORT)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []
    for i in range(RESTARTS):
        if i == 1:
            # The first start found the neighbour table empty (ARP on the
            # wire); later ones find it as the last run left it, unless
            # flushed, which this start does.
            lab.run(lab.director, ["ip", "neigh", "flush", "all"])
        lab.start_director("-c", str(rules))
        client.stdin.write("go\n")
        client.stdin.flush()
        took = json.loads(client.stdout.readline())
        drops = lab.stats().get("drop_unresolved")
        lab.stop_director()
        seen.append((took, drops))
        assert drops == 0, seen
        assert took["udp"] is not None and took["udp"] < 0.5, seen
        assert took["tcp"] is not None and took["tcp"] < 0.5, seen
    client.stdin.close()
    client.wait(5)


def test_start_waits_no_longer_than_the_bound_for_a_silent_dest(director_lab, rules_path):
    # A dest nobody answers ARP for: "ready" comes after the bounded wait,
    # and the log names the dest still unresolved.
    lab = director_lab(start=False)
    silent = lab.rips[0].rsplit(".", 1)[0] + ".250"
    rules = rules_path
    rules.write_text(f"-A -u {lab.vip}:{UDP_PORT} -s rr\n"
                     f"-a -u {lab.vip}:{UDP_PORT} -r {lab.rips[0]}:{UDP_PORT} -m\n"
                     f"-a -u {lab.vip}:{UDP_PORT} -r {silent}:{UDP_PORT} -m\n")
    lab.start_director("-c", str(rules))
    log = lab.director_log()
    assert f"1 dest(s) still unresolved after 2 s: {silent};" in log, log
    assert log.index("still unresolved") < log.index("ready:"), log
    assert f"dest {lab.rips[0]} via" in log[:log.index("ready:")], log
