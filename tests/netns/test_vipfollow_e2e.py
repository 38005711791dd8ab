"""VIP following: `pylvs run` forwards a service's traffic only while its VIP
is an address of the director, starting and stopping within a second as the
address comes and goes (keepalived moving it), without a restart; `--vips
all` forwards whatever the addresses (pylvs/control/vipfollow.py)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from nsio import steering_state

pytestmark = pytest.mark.netns

# Requests to VIP:80 in a loop for `seconds`: each a new connection with a
# short timeout; prints [[unix time, ok], ...].
PROBE = r"""
import json, socket, sys, time
vip, seconds = sys.argv[1], float(sys.argv[2])
out, end = [], time.time() + seconds
while time.time() < end:
    t = time.time()
    ok = False
    try:
        with socket.create_connection((vip, 80), timeout=0.2) as s:
            s.settimeout(0.5)
            s.sendall(b"GET /whoami HTTP/1.0\r\n\r\n")
            ok = s.recv(100).startswith(b"HTTP/1.")
    except OSError:
        pass
    out.append([t, ok])
    time.sleep(0.03)
print(json.dumps(out))
"""


def probe_around(lab, change, seconds: float = 3.0, lead: float = 0.7) -> tuple[float, list]:
    """Probe the VIP for ``seconds`` from the client, running ``change``
    (an `ip addr` in the director) ``lead`` s in; (time of the change,
    probes)."""
    p = lab.popen(lab.client, [lab.python, "-c", PROBE, lab.vip, str(seconds)],
                  stdout=subprocess.PIPE, text=True)
    time.sleep(lead)
    t0 = time.time()
    change()
    out, _ = p.communicate(timeout=seconds + 20)
    return t0, json.loads(out)


def service_keys(lab) -> list[str]:
    return steering_state(lab.director, "eth0")["sets"]["services"]


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
def test_forwarding_follows_the_vip_within_a_second(director_lab):
    lab = director_lab(servers=1)
    lab.nat_service("tcp", 80, [1])
    key = f"{lab.vip} . tcp . 80"
    # The client keeps sending to the director's MAC when the VIP leaves (as
    # a router's stale ARP entry would), so what it sees is the director's
    # choice, not ARP's.
    mac = lab.mac(lab.director, "eth0")
    lab.run(lab.client, ["ip", "neigh", "replace", lab.vip, "lladdr", mac, "dev", "eth0",
                         "nud", "permanent"])
    assert key in service_keys(lab)
    vip24 = f"{lab.vip}/24"   # as the lab adds it

    t0, probes = probe_around(lab, lambda: lab.run(lab.director, [
        "ip", "addr", "del", vip24, "dev", "eth0"]))
    before = [ok for t, ok in probes if t < t0]
    after = [ok for t, ok in probes if t > t0 + 1.0]
    assert before and all(before), probes
    # Within a second they are not forwarded any more...
    assert after and not any(after), probes
    # ...and still kept from the kernel (no RST from a kernel that holds
    # the VIP before pylvs takes it, docs/failover.md).
    assert key in service_keys(lab)
    # The real server's replies are still the director's (IPVS's ip_vs_out
    # works at FORWARD, whatever the VIP).
    assert steering_state(lab.director, "eth0")["sets"]["realservers"] == \
        [f"{lab.rips[0]} . tcp . 80"]

    t0, probes = probe_around(lab, lambda: lab.run(lab.director, [
        "ip", "addr", "add", vip24, "dev", "eth0"]))
    before = [ok for t, ok in probes if t < t0]
    ok_times = [t for t, ok in probes if ok]
    assert before and not any(before), probes
    assert ok_times and ok_times[0] - t0 < 1.0, probes
    assert all(ok for t, ok in probes if t >= ok_times[0]), probes
    assert key in service_keys(lab)

    log = lab.director_log()
    assert f"VIP {lab.vip} left this host: not forwarding TCP {lab.vip}:80" in log
    assert f"VIP {lab.vip} is an address of this host: forwarding TCP {lab.vip}:80" in log
    # No restart: one director process throughout.
    assert log.count(" ready: ") == 1


def test_a_service_added_for_an_absent_vip_waits_and_vips_all_takes_it(director_lab):
    lab = director_lab(servers=1)
    lab.run(lab.director, ["ip", "addr", "del", f"{lab.vip}/24", "dev", "eth0"])
    mac = lab.mac(lab.director, "eth0")
    lab.run(lab.client, ["ip", "neigh", "replace", lab.vip, "lladdr", mac, "dev", "eth0",
                         "nud", "permanent"])
    lab.nat_service("tcp", 80, [1])
    assert (f"VIP {lab.vip} is not an address of this host: TCP {lab.vip}:80 wait(s) for it"
            in lab.director_log())
    assert lab.curl("/whoami", max_time=1, check=False).returncode != 0

    # --vips all: the behaviour before VIP following, a VIP being the
    # director's whatever its interfaces carry.
    lab.stop_director()
    lab.start_director("--vips", "all")
    lab.nat_service("tcp", 80, [1])
    assert service_keys(lab) == [f"{lab.vip} . tcp . 80"]
    assert lab.curl("/whoami", max_time=3).stdout.strip() == "rs1"
