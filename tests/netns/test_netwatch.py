"""NetWatcher reads the director namespace's ports, routes and local
addresses from the kernel, and notices when they change."""

from __future__ import annotations

import pytest

from nsio import sh

pytestmark = pytest.mark.netns


def test_state_of_the_director_namespace_and_its_changes(trio):
    d = trio.d
    for cmd in (("addr", "add", "10.9.0.100/24", "dev", "d0"),          # secondary
                ("route", "add", "10.20.0.0/16", "via", "10.9.1.2"),
                ("route", "add", "blackhole", "10.30.0.0/16"),
                ("link", "set", "d1", "mtu", "1400")):
        sh("ip", "-n", d, *cmd)
    sh("ip", "netns", "exec", d, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0",
       "net.ipv4.conf.d0.rp_filter=1", "net.ipv4.conf.d1.rp_filter=2")
    macs = [trio.mac(d, "d0"), trio.mac(d, "d1")]
    res = trio.py(d, r"""
import ipaddress, json, queue, socket, subprocess
from pylvs.control.ports import NetWatcher, PORT_F_USED, PORT_F_CHECK_MAC
from pylvs.io import Port
ports = [Port(i, n, socket.if_nametoindex(n), b"") for i, n in enumerate(["d0", "d1"])]
seen = queue.Queue()
w = NetWatcher(ports, interval=0.1, on_change=seen.put)
w.start()
def show(st):
    a = lambda v: str(ipaddress.IPv4Address(int(v)))
    return dict(
        ports=[dict(addr=a(r["addr"]), mtu=int(r["mtu"]), mac=bytes(r["mac"]).hex(":"),
                    flags=int(r["flags"]), rp=int(r["rp_filter"])) for r in st.ports],
        routes=[(a(r["prefix"]), int(r["plen"]), int(r["port"])) for r in st.routes],
        local=[a(v) for v in st.local])
first = show(seen.get(timeout=5))
subprocess.run(["ip", "link", "set", "d0", "mtu", "1300"], check=True)
subprocess.run(["ip", "route", "add", "default", "via", "10.9.0.2"], check=True)
second = seen.get(timeout=5)
while not any(r["plen"] == 0 for r in second.routes) or second.ports[0]["mtu"] != 1300:
    second = seen.get(timeout=5)   # the two changes may come in two polls
w.close()
print(json.dumps(dict(first=first, second=show(second), errors=w.errors)))
""")
    used = 1 | 2  # PORT_F_USED | PORT_F_CHECK_MAC
    assert res["first"]["ports"] == [
        dict(addr="10.9.0.1", mtu=1500, mac=macs[0], flags=used, rp=1),
        dict(addr="10.9.1.1", mtu=1400, mac=macs[1], flags=used, rp=2),
    ]
    assert res["first"]["routes"] == [
        ["10.9.0.0", 24, 0], ["10.9.1.0", 24, 1],
        ["10.20.0.0", 16, 1], ["10.30.0.0", 16, 0xFFFF],
    ]
    # Our addresses and the subnet broadcasts the kernel adds (martian sources).
    assert res["first"]["local"] == ["10.9.0.1", "10.9.0.100", "10.9.0.255", "10.9.1.1",
                                     "10.9.1.255", "127.0.0.1", "127.255.255.255"]
    assert res["second"]["ports"][0]["mtu"] == 1300
    assert res["second"]["routes"][-1] == ["0.0.0.0", 0, 0]
    assert res["errors"] == 0
