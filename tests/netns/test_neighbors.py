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
