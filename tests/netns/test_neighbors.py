"""The Resolver asks the director namespace's kernel for egress port and MACs."""

from __future__ import annotations

import pytest

from nsio import sh

pytestmark = pytest.mark.netns


def test_resolve_real_servers(trio):
    sh("ip", "-n", trio.d, "route", "add", "10.9.7.0/24", "via", "10.9.1.2")
    sh("ip", "-n", trio.d, "neigh", "flush", "all")
    res = trio.py(trio.d, """
import json, threading
from pylvs.io import Port
from pylvs.control.neighbors import Resolver
from pylvs.io.bpf import ip
def mac(dev):
    return bytes.fromhex(open(f"/sys/class/net/{dev}/address").read().strip().replace(":", ""))
ports = [Port(0, "d0", __import__("socket").if_nametoindex("d0"), mac("d0")),
         Port(1, "d1", __import__("socket").if_nametoindex("d1"), mac("d1"))]
changed = []
r = Resolver(ports, on_change=changed.append)
first = r.resolve(ip("10.9.1.2"))   # not in the neighbour table yet
direct = r.wait(ip("10.9.1.2"), 5)
routed = r.wait(ip("10.9.7.9"), 5)  # behind a gateway: the gateway's MAC
local = r.wait(ip("10.9.1.1"), 1)
absent = r.wait(ip("10.9.1.77"), 1.5)  # nobody answers ARP
out = dict(first=first, direct=[direct[0], direct[1].hex(), direct[2].hex()],
           routed=[routed[0], routed[1].hex()], local=local, absent=absent,
           connected=[r.connected(ip("10.9.1.2")), r.connected(ip("10.9.7.9"))],
           changed=changed, d1=mac("d1").hex())
r.close()
print(json.dumps(out))
""")
    rmac = trio.mac(trio.r, "eth0").replace(":", "")
    assert res["first"] is None
    assert res["direct"] == [1, rmac, res["d1"]]
    assert res["routed"] == [1, rmac]
    # What VS-DR needs to know: only the first is on a connected network.
    assert res["connected"] == [True, False]
    assert res["local"] is None and res["absent"] is None
    from pylvs.io.bpf import ip
    assert set(res["changed"]) == {ip("10.9.1.2"), ip("10.9.7.9")}


def test_dr_real_server_changing_its_mac_is_reached_again(director_lab):
    """`ip link set eth0 address ...` on a VS-DR real server (no gratuitous
    ARP: arp_notify is 0): the director's kernel entry goes STALE with the
    old MAC; pylvs must make the kernel re-resolve it (as a kernel IPVS
    transmit does) and use the new MAC. The director's neighbour timers are
    shortened so the kernel's own STALE -> DELAY -> PROBE -> FAILED -> ARP
    sequence takes seconds, not a minute."""
    import time

    lab = director_lab(fwd="dr", servers=1)
    for key, value in (("base_reachable_time_ms", 1000), ("delay_first_probe_time", 1),
                       ("retrans_time_ms", 200)):
        sh("ip", "netns", "exec", lab.director, "sysctl", "-qw",
           f"net.ipv4.neigh.eth0.{key}={value}")
    lab.service("tcp", 80, [1])
    assert lab.curl("/whoami", max_time=5).returncode == 0
    new = "02:00:00:00:00:25"
    sh("ip", "netns", "exec", lab.rs[0], "ip", "link", "set", "eth0", "address", new)
    t0, ok = time.monotonic(), False
    while not ok and time.monotonic() - t0 < 30:
        ok = lab.curl("/whoami", max_time=1, check=False).returncode == 0
    took = time.monotonic() - t0
    assert ok and took < 20, (took, lab.director_log()[-3000:])
    assert f"dest {lab.rips[0]} via port 0 mac {new}" in lab.director_log()
