"""The ports and routes tables the engine gets (pylvs/control/ports.py)."""

from __future__ import annotations

import numpy as np

from pylvs.control import ports as P
from pylvs.io import Port
from pylvs.io.bpf import ip

MAC0, MAC1 = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
PORTS = [Port(0, "eth0", 5, MAC0), Port(1, "eth1", 7, MAC1)]


def test_dtypes_are_the_engine_contract():
    assert P.PORT_DTYPE.itemsize == 16 and P.ROUTE_DTYPE.itemsize == 16
    assert [P.PORT_DTYPE.fields[n][1] for n in ("addr", "mtu", "mac", "flags", "rp_filter")] == \
        [0, 4, 8, 14, 15]
    assert P.NO_PORT == 0xFFFF


def test_port_rows_follow_the_backend_port_numbers():
    rows = P.port_table(PORTS, {7: (1400, MAC1), 5: (1500, MAC0)},
                        {5: ip("10.0.0.1"), 7: ip("10.1.0.1")}, {"eth0": 1, "eth1": 2})
    assert rows[0]["addr"] == ip("10.0.0.1") and rows[1]["addr"] == ip("10.1.0.1")
    assert (rows["mtu"] == [1500, 1400]).all()
    assert bytes(rows[1]["mac"]) == MAC1
    assert (rows["flags"] == P.PORT_F_USED | P.PORT_F_CHECK_MAC).all()
    assert list(rows["rp_filter"]) == [1, 2]


def test_a_port_whose_interface_is_gone_is_not_checked():
    rows = P.port_table(PORTS, {5: (1500, MAC0)}, {}, {"eth0": 0})
    assert rows[1]["flags"] == 0 and rows[1]["mtu"] == 0
    assert rows[0]["addr"] == 0  # no address: 0


def test_rp_filter_is_the_larger_of_all_and_the_interface():
    # As the kernel's IN_DEV_RPFILTER (IN_DEV_MAXCONF).
    assert [P.effective_rp_filter(a, i) for a, i in ((0, 1), (2, 1), (1, 0), (0, 0))] == [1, 2, 1, 0]


def test_routes_longest_prefix_then_lowest_metric_first():
    routes = [
        (0, 0, P.RTN_UNICAST, 5, 0),                         # default via eth0
        (ip("10.1.0.0"), 24, P.RTN_UNICAST, 7, 0),
        (ip("10.2.0.0"), 16, P.RTN_UNICAST, 7, 200),
        (ip("10.2.0.0"), 16, P.RTN_UNICAST, 5, 100),         # the one the kernel uses
        (ip("10.3.0.0"), 16, P.RTN_UNICAST, 99, 0),          # an interface not attached
        (ip("10.4.0.0"), 16, 6, None, 0),                    # blackhole
        (ip("10.5.0.7"), 16, P.RTN_UNICAST, 5, 0),           # host bits are masked
    ]
    t = P.route_table(routes, {5: 0, 7: 1})
    got = [(str(ipaddress_of(r["prefix"])), int(r["plen"]), int(r["port"])) for r in t]
    assert got == [
        ("10.1.0.0", 24, 1),
        ("10.2.0.0", 16, 0), ("10.2.0.0", 16, 1),
        ("10.3.0.0", 16, P.NO_PORT), ("10.4.0.0", 16, P.NO_PORT), ("10.5.0.0", 16, 0),
        ("0.0.0.0", 0, 0),
    ]


def ipaddress_of(v) -> str:
    import ipaddress
    return str(ipaddress.IPv4Address(int(v)))


def test_states_compare_by_content():
    a = P.NetState(np.zeros(2, P.PORT_DTYPE), np.zeros(1, P.ROUTE_DTYPE), np.array([1], np.uint32))
    b = P.NetState(np.zeros(2, P.PORT_DTYPE), np.zeros(1, P.ROUTE_DTYPE), np.array([1], np.uint32))
    assert a == b
    b.ports["mtu"][0] = 1400
    assert a != b


def test_routes_carry_next_hop_macs():
    """A gateway route gets its gateway's MAC from the kernel's neighbour
    table; an on-link host with a neighbour entry gets a /32 row with its
    MAC when its route is a connected network through that interface; no
    entry, another interface or a gateway route: nothing (docs/engine.md,
    "Sync": what a synced NAT conn's reply needs)."""
    gw, host, far = ip("10.0.0.1"), ip("10.0.0.7"), ip("10.9.0.7")
    m1, m2, m3 = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x07", b"\x02" * 6
    routes = [
        (0, 0, P.RTN_UNICAST, 5, 0, gw),                    # default via 10.0.0.1 dev eth0
        (ip("10.0.0.0"), 24, P.RTN_UNICAST, 5, 0, None),    # connected
        (ip("10.9.0.0"), 16, P.RTN_UNICAST, 5, 0, gw),      # via the gateway
        (ip("10.1.0.0"), 24, P.RTN_UNICAST, 7, 0),          # no gateway field at all
    ]
    neigh = {(5, gw): m1, (5, host): m2, (5, far): m3, (7, host): m3}
    t = P.route_table(routes, {5: 0, 7: 1}, neigh)
    got = [(ipaddress_of(r["prefix"]), int(r["plen"]), int(r["port"]),
            bytes(r["mac"]) if r["flags"] & P.ROUTE_F_MAC else None) for r in t]
    assert got == [
        ("10.0.0.1", 32, 0, m1), ("10.0.0.7", 32, 0, m2),
        ("10.0.0.0", 24, 0, None), ("10.1.0.0", 24, 1, None),
        ("10.9.0.0", 16, 0, m1), ("0.0.0.0", 0, 0, m1),
    ]
    assert len(P.route_table(routes, {5: 0, 7: 1}, neigh, max_hosts=1)) == len(t) - 1


def test_watcher_logs_neighbour_only_changes_at_debug(monkeypatch, caplog):
    """A next-hop MAC or an on-link host row coming or going (the kernel's
    neighbour garbage collection) is published but logged at debug only;
    a route of the kernel's changing is logged at info."""
    import logging

    def st(rows):
        r = np.zeros(len(rows), P.ROUTE_DTYPE)
        for i, (prefix, plen, flags) in enumerate(rows):
            r["prefix"][i], r["plen"][i], r["flags"][i] = prefix, plen, flags
        return P.NetState(np.zeros(0, P.PORT_DTYPE), r, np.zeros(0, np.uint32))

    seq = [st([(0, 0, 0)]), st([(ip("10.0.0.7"), 32, P.ROUTE_F_MAC), (0, 0, P.ROUTE_F_MAC)]),
           st([(ip("10.1.0.0"), 16, 0), (0, 0, 0)])]
    monkeypatch.setattr(P, "read_state", lambda ipr, ports, root: seq.pop(0))
    seen = []
    w = P.NetWatcher([], on_change=seen.append)
    with caplog.at_level(logging.DEBUG, logger="pylvs.ports"):
        for _ in range(3):
            w.poll(None)
    assert len(seen) == 3
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.DEBUG, logging.INFO]
