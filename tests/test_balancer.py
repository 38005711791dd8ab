"""The Balancer: ipvsadm semantics, stable slots, published tables, the
schedule upcall with the real schedulers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ipaddress import ip_address
from pylvs.control.balancer import Balancer, BalancerError
from pylvs.io import bpf
from pylvs.engine import states, tables
from pylvs.engine.tables import (
    DEST_F_NO_ROUTE, DEST_F_RESOLVED, DEST_F_USED, FWD_MASQ, FWD_ROUTE, FWD_TUNNEL, SVC_F_USED,
    Counters,
)

VIP = "10.0.0.1"
VIP_INT = 0x0A000001


def ip(s: str) -> int:
    a, b, c, d = map(int, s.split("."))
    return a << 24 | b << 16 | c << 8 | d


class FakeResolver:
    def __init__(self):
        self.answers = {}
        self.direct = {}

    def resolve(self, daddr):
        return self.answers.get(daddr)

    def connected(self, daddr):
        return self.direct.get(daddr)


@pytest.fixture
def env():
    c = Counters(max_services=4, max_dests=8)
    pubs = []
    res = FakeResolver()
    b = Balancer(c, resolver=res, publish=lambda s, d: pubs.append((s, d)))
    return b, c, pubs, res


def test_add_service_and_dests_publish_tables(env):
    b, c, pubs, res = env
    res.answers[ip("10.0.1.2")] = (1, b"\x02\x00\x00\x00\x00\x02", b"\x02\x00\x00\x00\x00\x01")
    s = b.add_service("tcp", VIP, 80, sched="wlc")
    d1 = b.add_dest("tcp", VIP, 80, "10.0.1.2", 8080, fwd="masq", weight=3)
    d2 = b.add_dest("tcp", VIP, 80, "10.0.1.3", None, fwd="masq")
    assert len(pubs) == 3
    svcs, dests = pubs[-1]
    assert svcs.shape == (4,) and dests.shape == (8,)
    assert (svcs[s]["vaddr"], svcs[s]["vport"], svcs[s]["proto"], svcs[s]["flags"]) == (
        VIP_INT, 80, 6, SVC_F_USED)
    r = dests[d1]
    assert (r["daddr"], r["dport"], r["svc"], r["weight"], r["fwd"], r["out_port"]) == (
        ip("10.0.1.2"), 8080, s, 3, FWD_MASQ, 1)
    assert r["flags"] == DEST_F_USED | DEST_F_RESOLVED
    assert bytes(r["dmac"]) == b"\x02\x00\x00\x00\x00\x02"
    assert bytes(r["smac"]) == b"\x02\x00\x00\x00\x00\x01"
    # Unresolved: used, not resolved; the port defaults to the service's.
    assert dests[d2]["flags"] == DEST_F_USED and dests[d2]["dport"] == 80
    # Only the used rows are set.
    assert int((dests["flags"] != 0).sum()) == 2 and int((svcs["flags"] != 0).sum()) == 1


def test_published_arrays_are_never_modified(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    d = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, weight=1)
    first = [(s.copy(), x.copy()) for s, x in pubs]
    b.edit_dest("tcp", VIP, 80, "10.0.1.2", 80, weight=7)
    b.del_dest("tcp", VIP, 80, "10.0.1.2", 80)
    b.del_service("tcp", VIP, 80)
    for (s0, d0), (s1, d1) in zip(first, pubs):
        assert np.array_equal(s0, s1) and np.array_equal(d0, d1)
    assert pubs[1][1][d]["weight"] == 1 and pubs[2][1][d]["weight"] == 7
    assert pubs[-1][0]["flags"].sum() == 0 and pubs[-1][1]["flags"].sum() == 0
    # A changed table is a new array; an unchanged one may be handed on.
    for (s0, d0), (s1, d1) in zip(pubs, pubs[1:]):
        assert s1 is not s0 or np.array_equal(s0, s1)
        assert d1 is not d0 or np.array_equal(d0, d1)
    assert pubs[1][1] is not pubs[2][1]


def test_republish_after_resolution(env):
    b, c, pubs, res = env
    b.add_service("udp", VIP, 53)
    d = b.add_dest("udp", VIP, 53, "10.0.1.2", 53, fwd="masq")
    assert not pubs[-1][1][d]["flags"] & DEST_F_RESOLVED
    res.answers[ip("10.0.1.2")] = (0, b"\xaa" * 6, b"\xbb" * 6)
    n = len(pubs)
    b.on_resolved(ip("10.9.9.9"))   # nobody uses it: nothing to publish
    assert len(pubs) == n
    b.on_resolved(ip("10.0.1.2"))
    assert pubs[-1][1][d]["flags"] & DEST_F_RESOLVED
    assert b.snapshot()["services"][0]["dests"][0]["resolved"] is True


# --- ipvsadm errors ------------------------------------------------------------

def test_errors_with_ipvsadm_wording(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    cases = [
        (lambda: b.add_service("tcp", VIP, 80), "Service already exists"),
        (lambda: b.edit_service("tcp", VIP, 81), "No such service"),
        (lambda: b.del_service("udp", VIP, 80), "No such service"),
        (lambda: b.zero("tcp", VIP, 81), "No such service"),
        (lambda: b.add_dest("tcp", VIP, 81, "10.0.1.2"), "Service not defined"),
        (lambda: b.edit_dest("tcp", VIP, 81, "10.0.1.2"), "Service not defined"),
        (lambda: b.del_dest("tcp", VIP, 81, "10.0.1.2"), "Service not defined"),
        (lambda: b.edit_dest("tcp", VIP, 80, "10.0.1.2", 80), "No such destination"),
        (lambda: b.del_dest("tcp", VIP, 80, "10.0.1.2", 80), "No such destination"),
        (lambda: b.add_service("tcp", VIP, 81, sched="nosuch"),
         "Scheduler or persistence engine not found"),
        (lambda: b.add_service("tcp", VIP, 0), "Zero port specified for non-persistent service"),
        (lambda: b.add_service("tcp", VIP, 53, ops=True),
         "One-Packet Scheduling is only for UDP virtual services"),
        (lambda: b.add_dest("tcp", VIP, 80, "10.0.1.2", weight=65536), "illegal weight specified"),
        (lambda: b.add_dest("tcp", VIP, 80, "10.0.1.2", weight=-1), "illegal weight specified"),
        (lambda: b.add_service("sctp", VIP, 80), "SCTP services are not supported yet"),
        (lambda: b.add_service("tcp", "10.0.0", 80), "illegal virtual server address '10.0.0'"),
        (lambda: b.add_service("tcp", VIP, 70000), "illegal virtual server port 70000"),
    ]
    for fn, msg in cases:
        with pytest.raises(BalancerError) as ei:
            fn()
        assert str(ei.value) == msg
    b.add_dest("tcp", VIP, 80, "10.0.1.2", 80)
    with pytest.raises(BalancerError, match="^Destination already exists$"):
        b.add_dest("tcp", VIP, 80, "10.0.1.2", 80)


MAC_RS = b"\x02\x00\x00\x00\x00\x02"
MAC_DIR = b"\x02\x00\x00\x00\x00\x01"


def test_mixed_methods_in_one_service_publish_their_rows(env):
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 80)
    nat = b.add_dest("tcp", VIP, 80, "10.0.1.2", 8080, fwd="masq")
    dr = b.add_dest("tcp", VIP, 80, "10.0.1.3", None, fwd="route")
    ipip = b.add_dest("tcp", VIP, 80, "10.0.2.4", 80, fwd="tunnel")
    gue = b.add_dest("tcp", VIP, 80, "10.0.2.5", 80, fwd="ipip", tun_type="gue",
                     tun_port=6080, tun_flags="csum")
    rows = pubs[-1][1]
    got = [tuple(int(rows[d][k]) for k in ("fwd", "dport", "tun_type", "tun_flags", "tun_port"))
           for d in (nat, dr, ipip, gue)]
    assert got == [(FWD_MASQ, 8080, 0, 0, 0), (FWD_ROUTE, 80, 0, 0, 0),
                   (FWD_TUNNEL, 80, 0, 0, 0), (FWD_TUNNEL, 80, 1, 1, 6080)]
    # Every method is scheduled: the engine binds the method per conn.
    assert sorted(v.slot for v in b._sched_view[s][1]) == sorted([nat, dr, ipip, gue])
    snap = {d["daddr"]: d for d in b.snapshot()["services"][0]["dests"]}
    assert [(snap[a]["fwd"], snap[a]["fwd_name"], snap[a]["tun_type"], snap[a]["tun_port"],
             snap[a]["tun_flags"]) for a in ("10.0.1.2", "10.0.1.3", "10.0.2.4", "10.0.2.5")] == [
        ("masq", "Masq", "ipip", 0, 0), ("route", "Route", "ipip", 0, 0),
        ("tunnel", "Tunnel", "ipip", 0, 0), ("tunnel", "Tunnel", "gue", 6080, 1)]
    # Only NAT replies come back through the director.
    assert b.steering_view()["real_servers"] == [(6, ip("10.0.1.2"), 8080)]


def test_dr_and_tun_dests_keep_the_service_port(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    for fwd in ("route", "tunnel", 3, 2):
        with pytest.raises(BalancerError, match=r"must equal the service port \(80\)"):
            b.add_dest("tcp", VIP, 80, "10.0.1.2", 8080, fwd=fwd)
    assert b.add_dest("tcp", VIP, 80, "10.0.1.2", None, fwd="dr") is not None
    assert b.snapshot()["services"][0]["dests"][0]["dport"] == 80


@pytest.mark.parametrize("fwd, tun, msg", [
    ("masq", {"tun_type": "gue", "tun_port": 6080}, "Tunnel options conflict with forward method"),
    ("route", {"tun_flags": "csum"}, "Tunnel options conflict with forward method"),
    ("route", {"tun_port": 1}, "Tunnel options conflict with forward method"),
    ("tunnel", {"tun_type": "gue"}, "You need to supply the 'tun-port' option for the 'gue' tunnel type"),
    ("tunnel", {"tun_port": 6080}, "Illegal 'tun-port' option with the 'ipip' tunnel type"),
    ("tunnel", {"tun_flags": "remcsum"}, "Illegal 'tun-remcsum' option with the 'ipip' tunnel type"),
    ("tunnel", {"tun_type": "gre", "tun_flags": "remcsum"},
     "Illegal 'tun-remcsum' option with the 'gre' tunnel type"),
    ("tunnel", {"tun_type": "gre", "tun_port": 9}, "Illegal 'tun-port' option with the 'gre' tunnel type"),
    ("tunnel", {"tun_type": "gre"},
     "tunnel type gre is not supported by this director yet (ipip or gue)"),
    ("tunnel", {"tun_type": "gre", "tun_flags": "csum"},
     "tunnel type gre is not supported by this director yet (ipip or gue)"),
    ("tunnel", {"tun_type": "vxlan"}, "illegal tunnel type specified"),
    ("tunnel", {"tun_type": "gue", "tun_port": 65536}, "illegal tunnel port specified"),
    ("tunnel", {"tun_type": "gue", "tun_port": 1, "tun_flags": 3},
     "illegal tunnel flags 3 (nocsum, csum or remcsum)"),
    ("local", {}, "unknown forwarding method 'local' (masq, route or tunnel)"),
    (True, {}, "unknown forwarding method True (masq, route or tunnel)"),
])
def test_refused_dests_change_nothing(env, fwd, tun, msg):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    b.add_dest("tcp", VIP, 80, "10.0.1.3", 80, fwd="tunnel", tun_type="gue", tun_port=5555)
    before, n = b.snapshot(), len(pubs)
    with pytest.raises(BalancerError) as ei:
        b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, fwd=fwd, **tun)
    assert str(ei.value) == msg
    with pytest.raises(BalancerError) as ei:
        b.edit_dest("tcp", VIP, 80, "10.0.1.3", 80, fwd=fwd, **tun)
    assert str(ei.value) == msg
    assert b.snapshot() == before and len(pubs) == n


def test_edit_dest_changes_the_method_of_the_row_only(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    d = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, fwd="masq", weight=2)
    c.dest_conns[d] = (1, 0)   # a running conn: the engine keeps its bound method
    b.edit_dest("tcp", VIP, 80, "10.0.1.2", 80, fwd="tunnel", tun_type="gue", tun_port=6080,
                tun_flags="tun-csum")
    row = pubs[-1][1][d]
    assert (int(row["fwd"]), int(row["tun_type"]), int(row["tun_port"]), int(row["tun_flags"]),
            int(row["weight"])) == (FWD_TUNNEL, 1, 6080, 1, 2)
    # Unset arguments keep the tunnel options ...
    b.edit_dest("tcp", VIP, 80, "10.0.1.2", 80, weight=5)
    assert int(pubs[-1][1][d]["tun_port"]) == 6080
    # ... which go when the dest stops being a tunnel dest.
    b.edit_dest("tcp", VIP, 80, "10.0.1.2", 80, fwd="route")
    row = pubs[-1][1][d]
    assert (int(row["fwd"]), int(row["tun_type"]), int(row["tun_port"]), int(row["tun_flags"])) == (
        FWD_ROUTE, 0, 0, 0)
    assert b.snapshot()["services"][0]["dests"][0]["slot"] == d


def test_dr_dest_off_a_connected_network_is_accepted_flagged_and_logged_once(env, caplog):
    b, c, pubs, res = env
    res.answers[ip("10.0.9.2")] = (1, MAC_RS, MAC_DIR)
    res.direct = {ip("10.0.9.2"): False, ip("10.0.1.2"): True}
    b.add_service("tcp", VIP, 80)
    b.add_service("udp", VIP, 53)
    with caplog.at_level("WARNING", logger="pylvs.balancer"):
        dr = b.add_dest("tcp", VIP, 80, "10.0.9.2", 80, fwd="route")
        ok = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, fwd="route")
        tun = b.add_dest("udp", VIP, 53, "10.0.9.2", 53, fwd="tunnel")
        b.edit_dest("tcp", VIP, 80, "10.0.9.2", 80, fwd="route", weight=4)
        b.on_resolved(ip("10.0.9.2"))
    rows = pubs[-1][1]
    assert rows[dr]["flags"] == DEST_F_USED | DEST_F_RESOLVED | DEST_F_NO_ROUTE
    assert rows[ok]["flags"] & DEST_F_NO_ROUTE == 0
    assert rows[tun]["flags"] & DEST_F_NO_ROUTE == 0   # tunnels are routed by design
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["DR real server 10.0.9.2:80 of TCP 10.0.0.1:80 is not on a directly "
                    "connected network: its frames are dropped (drop_no_route) until it is"]
    # The route becomes direct: the flag goes, and a later change logs again.
    res.direct[ip("10.0.9.2")] = True
    b.on_resolved(ip("10.0.9.2"))
    assert pubs[-1][1][dr]["flags"] & DEST_F_NO_ROUTE == 0
    res.direct[ip("10.0.9.2")] = False
    with caplog.at_level("WARNING", logger="pylvs.balancer"):
        b.on_resolved(ip("10.0.9.2"))
    assert len(caplog.records) == 2 and pubs[-1][1][dr]["flags"] & DEST_F_NO_ROUTE


def test_persistence_is_stored_and_listed(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 0, sched="rr", persistent=True, netmask="255.255.255.0")
    s = b.snapshot()["services"][0]
    assert (s["persistent"], s["timeout"], s["netmask"], s["vport"]) == (
        True, 300, "255.255.255.0", 0)
    with pytest.raises(BalancerError, match="Zero port"):
        b.edit_service("tcp", VIP, 0, persistent=0)
    b.edit_service("tcp", VIP, 0, persistent=60)
    assert b.snapshot()["services"][0]["timeout"] == 60


def test_edit_service_keeps_unset_attributes_and_swaps_scheduler(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80, sched="rr", persistent=30)
    b.add_dest("tcp", VIP, 80, "10.0.1.2", 80)
    old = b._sched_view[0][0]
    b.edit_service("tcp", VIP, 80, sched="wlc")
    s = b.snapshot()["services"][0]
    assert s["sched"] == "wlc" and s["timeout"] == 30
    assert b._sched_view[0][0] is not old and type(b._sched_view[0][0]).name == "wlc"
    assert len(b._sched_view[0][1]) == 1


def test_sched_flags_names(env):
    b, c, pubs, res = env
    b.add_service("udp", VIP, 53, sched="rr", flags=["flag-1", "flag-3"])
    assert b.snapshot()["services"][0]["flags"] == ["flag-1", "flag-3"]
    with pytest.raises(BalancerError, match="invalid scheduler flag"):
        b.add_service("udp", VIP, 54, flags="nope")


def test_clear_and_delete(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    b.add_service("udp", VIP, 53)
    b.add_dest("tcp", VIP, 80, "10.0.1.2", 80)
    b.del_service("udp", VIP, 53)
    assert [s["proto"] for s in b.snapshot()["services"]] == ["TCP"]
    b.clear()
    assert b.snapshot()["services"] == []
    assert pubs[-1][0]["flags"].sum() == 0 and pubs[-1][1]["flags"].sum() == 0
    assert b.schedule(0, 1, 2) == -1


# --- slots ---------------------------------------------------------------------

def test_dest_slot_not_reused_while_conns_name_it(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    slots = [b.add_dest("tcp", VIP, 80, f"10.0.1.{i}", 80) for i in range(1, 9)]
    assert sorted(slots) == list(range(8))
    with pytest.raises(BalancerError, match="Memory allocation problem"):
        b.add_dest("tcp", VIP, 80, "10.0.1.99", 80)
    busy = slots[2]
    c.dest_conns[busy] = [1, 0]
    c.dest_stats[busy] = [5, 5, 5, 5, 5]
    b.del_dest("tcp", VIP, 80, "10.0.1.3", 80)
    # The only free slot is held by a conn: no room.
    with pytest.raises(BalancerError, match="Memory allocation problem"):
        b.add_dest("tcp", VIP, 80, "10.0.1.99", 80)
    free = slots[5]
    c.dest_stats[free] = [7, 7, 7, 7, 7]
    b.del_dest("tcp", VIP, 80, "10.0.1.6", 80)
    new = b.add_dest("tcp", VIP, 80, "10.0.1.99", 80)
    assert new == free
    assert c.dest_stats[new].sum() == 0          # a reused slot starts from zero
    # The conn drains: the slot can be used again, counters zeroed.
    c.dest_conns[busy] = [0, 0]
    again = b.add_dest("tcp", VIP, 80, "10.0.1.100", 80)
    assert again == busy and c.dest_stats[busy].sum() == 0


def test_freed_slots_are_reused_last(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    a = b.add_dest("tcp", VIP, 80, "10.0.1.1", 80)
    b.del_dest("tcp", VIP, 80, "10.0.1.1", 80)
    n = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80)
    assert n != a   # not handed out again right away


def test_dest_readded_while_its_conns_live_gets_its_slot_back(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    d = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, weight=2)
    c.dest_conns[d] = [3, 1]
    b.del_dest("tcp", VIP, 80, "10.0.1.2", 80)
    assert not pubs[-1][1][d]["flags"] & DEST_F_USED
    assert b.add_dest("tcp", VIP, 80, "10.0.1.2", 80) == d
    assert c.dest_conns[d].tolist() == [3, 1]
    snap_d = b.snapshot()["services"][0]["dests"][0]
    assert (snap_d["activeconns"], snap_d["inactconns"]) == (3, 1)


def test_service_readded_gets_its_slot_back(env):
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 80)
    b.add_service("tcp", VIP, 81)
    d = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80)
    c.dest_conns[d] = [1, 0]
    b.del_service("tcp", VIP, 80)
    assert b.add_service("tcp", VIP, 80) == s
    assert b.add_dest("tcp", VIP, 80, "10.0.1.2", 80) == d
    assert pubs[-1][1][d]["svc"] == s


def test_service_slot_counters_zeroed_on_reuse():
    c = Counters(max_services=1, max_dests=4)
    b = Balancer(c)
    s = b.add_service("tcp", VIP, 80)
    c.svc_stats[s] = [1, 2, 3, 4, 5]
    b.del_service("tcp", VIP, 80)
    assert b.add_service("tcp", VIP, 81) == s
    assert c.svc_stats[s].sum() == 0
    with pytest.raises(BalancerError, match="Memory allocation problem"):
        b.add_service("tcp", VIP, 82)


# --- the schedule upcall ---------------------------------------------------------

def test_schedule_rr_cycles_and_skips_weight_zero(env):
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 80, sched="rr")
    d1 = b.add_dest("tcp", VIP, 80, "10.0.1.1", 80)
    d2 = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80)
    d3 = b.add_dest("tcp", VIP, 80, "10.0.1.3", 80)
    picks = [b.schedule(s, 1, 1000 + i) for i in range(6)]
    assert picks == [d3, d2, d1, d3, d2, d1]       # the kernel's list: newest first
    b.edit_dest("tcp", VIP, 80, "10.0.1.2", 80, weight=0)
    assert {b.schedule(s, 1, 1) for _ in range(4)} == {d1, d3}


def test_schedule_wlc_uses_live_conn_counts(env):
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 80, sched="wlc")
    d1 = b.add_dest("tcp", VIP, 80, "10.0.1.1", 80, weight=1)
    d2 = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, weight=3)
    assert b.schedule(s, 1, 1) == d2       # tie: first in list, the newest
    c.dest_conns[d2] = [3, 0]               # overhead 768 / 3
    assert b.schedule(s, 1, 1) == d1
    c.dest_conns[d1] = [1, 0]               # 256 / 1 == 768 / 3: first wins
    assert b.schedule(s, 1, 1) == d2
    c.dest_conns[d2] = [4, 0]
    assert b.schedule(s, 1, 1) == d1


def test_schedule_no_dests_unknown_slot_and_quiesced(env):
    b, c, pubs, res = env
    s = b.add_service("udp", VIP, 53, sched="wrr")
    assert b.schedule(s, 1, 1) == -1
    assert b.schedule(3, 1, 1) == -1
    assert b.schedule(999, 1, 1) == -1
    b.add_dest("udp", VIP, 53, "10.0.1.1", 53, weight=0)
    assert b.schedule(s, 1, 1) == -1


def test_schedule_wrr_by_weight(env):
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 80, sched="wrr")
    d1 = b.add_dest("tcp", VIP, 80, "10.0.1.1", 80, weight=1)
    d2 = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, weight=2)
    picks = [b.schedule(s, 1, 1) for _ in range(30)]
    assert picks.count(d2) == 20 and picks.count(d1) == 10


def test_deleted_dest_is_not_scheduled(env):
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 80, sched="rr")
    b.add_dest("tcp", VIP, 80, "10.0.1.1", 80)
    d2 = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80)
    b.del_dest("tcp", VIP, 80, "10.0.1.1", 80)
    assert {b.schedule(s, 1, 1) for _ in range(5)} == {d2}


# --- counters, rates, timeouts, snapshot ---------------------------------------------

def test_zero_one_service_or_all(env):
    b, c, pubs, res = env
    s1 = b.add_service("tcp", VIP, 80)
    s2 = b.add_service("tcp", VIP, 81)
    d1 = b.add_dest("tcp", VIP, 80, "10.0.1.1", 80)
    d2 = b.add_dest("tcp", VIP, 81, "10.0.1.1", 81)
    for row in (c.svc_stats[s1], c.svc_stats[s2], c.dest_stats[d1], c.dest_stats[d2]):
        row[:] = 9
    c.dest_conns[d1] = [2, 3]
    b.zero("tcp", VIP, 80)
    assert c.svc_stats[s1].sum() == 0 and c.dest_stats[d1].sum() == 0
    assert c.svc_stats[s2].sum() == 45 and c.dest_stats[d2].sum() == 45
    assert c.dest_conns[d1].tolist() == [2, 3]   # conn counts are not traffic counters
    b.zero()
    assert c.svc_stats.sum() == 0 and c.dest_stats.sum() == 0


def test_rate_estimator_smooths_like_the_kernel(env):
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 80)
    d = b.add_dest("tcp", VIP, 80, "10.0.1.1", 80)
    b.estimate(0.0)
    c.svc_stats[s] = [8, 800, 400, 80000, 40000]
    c.dest_stats[d] = [8, 800, 400, 80000, 40000]
    b.estimate(2.0)    # rate 4 conns/s; avg = 0 * 3/4 + 4/4 = 1
    r = b.snapshot()["services"][0]["rates"]
    assert r == {"cps": 1, "inpps": 100, "outpps": 50, "inbps": 10000, "outbps": 5000}
    b.estimate(4.0)    # no traffic: avg = 1 * 3/4
    r = b.snapshot()["services"][0]["dests"][0]["rates"]
    assert r["inpps"] == 75 and r["cps"] == 1   # 0.75 rounds to 1


def test_timeouts(env):
    b, c, pubs, res = env
    got = []
    b.on_timeouts = got.append
    assert b.timeouts() == {"tcp": 900, "tcpfin": 120, "udp": 300}
    assert b.set_timeouts(600, 0, 30) == {"tcp": 600, "tcpfin": 120, "udp": 30}
    assert got[-1][states.ESTABLISHED] == 600 and got[-1][states.UDP_STATE] == 30
    assert got[-1][states.FIN_WAIT] == 120
    with pytest.raises(BalancerError, match="invalid timeout value"):
        b.set_timeouts(-1, 0, 0)


def test_snapshot_is_json(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80, sched="wlc")
    d = b.add_dest("tcp", VIP, 80, "10.0.1.2", 8080, weight=2, u_threshold=10, l_threshold=5)
    c.dest_conns[d] = [1, 2]
    c.dest_stats[d] = [1, 2, 3, 4, 5]
    snap = json.loads(json.dumps(b.snapshot()))
    svc = snap["services"][0]
    assert (svc["proto"], svc["vaddr"], svc["vport"], svc["sched"]) == ("TCP", VIP, 80, "wlc")
    dst = svc["dests"][0]
    assert dst["daddr"] == "10.0.1.2" and dst["dport"] == 8080 and dst["weight"] == 2
    assert dst["fwd"] == "masq" and (dst["activeconns"], dst["inactconns"]) == (1, 2)
    assert dst["stats"] == {"conns": 1, "inpkts": 2, "outpkts": 3, "inbytes": 4, "outbytes": 5}
    assert (dst["u_threshold"], dst["l_threshold"]) == (10, 5)
    assert snap["timeouts"] == {"tcp": 900, "tcpfin": 120, "udp": 300}


def test_conns_from_the_engine(env):
    b, c, pubs, res = env
    with pytest.raises(BalancerError, match="not available"):
        b.conns()
    b.clock = lambda: 100.0
    b.conns_source = lambda: [
        (6, ip("10.0.2.5"), 5555, VIP_INT, 80, ip("10.0.1.2"), 8080,
         states.ESTABLISHED, 999.6, 0, 0, 0),
        (17, ip("10.0.2.5"), 53, VIP_INT, 53, ip("10.0.1.3"), 53,
         states.UDP_STATE, 100.5, 0, 1, 1),
        (17, ip("10.0.2.6"), 53, VIP_INT, 53, ip("10.0.1.3"), 53,
         states.UDP_STATE, 99.0, 0, 1, 1),    # expired: not listed
    ]
    rows = b.conns()
    assert rows[0] == {"proto": "TCP", "caddr": "10.0.2.5", "cport": 5555, "vaddr": VIP,
                       "vport": 80, "daddr": "10.0.1.2", "dport": 8080,
                       "state": "ESTABLISHED", "expires": 899}
    assert len(rows) == 2
    assert rows[1]["state"] == "UDP" and rows[1]["expires"] == 0


def test_steering_view(env):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    b.add_service("udp", VIP, 53)
    b.add_dest("tcp", VIP, 80, "10.0.1.2", 8080)
    b.add_dest("udp", VIP, 53, "10.0.1.2", 53)
    v = b.steering_view()
    assert v["services"] == [(6, VIP_INT, 80), (17, VIP_INT, 53)]
    assert v["real_servers"] == [(6, ip("10.0.1.2"), 8080), (17, ip("10.0.1.2"), 53)]


# --- apply -------------------------------------------------------------------------

def test_apply_ops_and_batch(env):
    b, c, pubs, res = env
    assert b.apply({"op": "add_service", "proto": "tcp", "vaddr": VIP, "vport": 80,
                    "sched": "rr"}) == 0
    n = len(pubs)
    results = b.apply({"op": "batch", "ops": [
        {"op": "add_dest", "proto": "tcp", "vaddr": VIP, "vport": 80, "daddr": "10.0.1.1",
         "dport": 80, "fwd": "masq", "weight": 1},
        {"op": "add_service", "proto": "tcp", "vaddr": VIP, "vport": 80},
        {"op": "add_dest", "proto": "tcp", "vaddr": VIP, "vport": 80, "daddr": "10.0.1.2",
         "fwd": "masq"},
    ]})
    assert [r["ok"] for r in results] == [True, False, True]
    assert results[1]["error"] == "Service already exists"
    assert len(pubs) == n + 1     # one publish for the whole batch
    assert b.apply({"op": "timeouts"}) == {"tcp": 900, "tcpfin": 120, "udp": 300}
    with pytest.raises(BalancerError, match="unknown operation"):
        b.apply({"op": "reboot"})
    with pytest.raises(BalancerError, match="unknown argument"):
        b.apply({"op": "clear", "force": True})
    with pytest.raises(BalancerError):
        b.apply({"op": "del_service"})
    with pytest.raises(BalancerError):
        b.apply(["clear"])


def test_json_infinity_and_odd_batches_are_refused_as_bad_values(env):
    # json.loads accepts Infinity/NaN: int(inf) raises OverflowError, which
    # must be an ipvsadm-style refusal, and must not abort the rest of a batch.
    b, c, pubs, res = env
    inf = float("inf")
    with pytest.raises(BalancerError, match="illegal virtual server port"):
        b.apply({"op": "add_service", "proto": "tcp", "vaddr": VIP, "vport": inf})
    with pytest.raises(BalancerError, match="invalid timeout value"):
        b.apply({"op": "set_timeouts", "tcp": inf})
    b.add_service("tcp", VIP, 80)
    with pytest.raises(BalancerError, match="illegal weight"):
        b.apply({"op": "add_dest", "proto": "tcp", "vaddr": VIP, "vport": 80,
                 "daddr": "10.0.1.1", "weight": -inf})
    results = b.apply({"op": "batch", "ops": [
        {"op": "add_service", "proto": "tcp", "vaddr": VIP, "vport": 81, "persistent": inf},
        {"op": "add_service", "proto": "tcp", "vaddr": VIP, "vport": 82},
    ]})
    assert [r["ok"] for r in results] == [False, True]
    with pytest.raises(BalancerError, match="batch"):
        b.apply({"op": "batch", "ops": 5})


def test_overloaded_dests_are_skipped_and_a_raised_threshold_ends_it(env):
    """The upcall leaves out dests whose overload flag the engines set
    (their -x/-y hysteresis: tests/test_sched_c.py); editing a dest's -x to
    0 or higher clears the flag, as __ip_vs_update_dest does, a lower or
    equal one keeps it."""
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 80, sched="rr")
    d1 = b.add_dest("tcp", VIP, 80, "10.0.1.1", 80, u_threshold=4, l_threshold=2)
    d2 = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, u_threshold=4)
    c.dest_flags[d1] = tables.DEST_F_OVERLOAD
    assert {b.schedule(s, 1, 1) for _ in range(4)} == {d2}
    b.edit_dest("tcp", VIP, 80, "10.0.1.1", 80, u_threshold=4, l_threshold=1)
    assert c.dest_flags[d1] == tables.DEST_F_OVERLOAD
    b.edit_dest("tcp", VIP, 80, "10.0.1.1", 80, u_threshold=3, l_threshold=1)
    assert c.dest_flags[d1] == tables.DEST_F_OVERLOAD
    c.dest_flags[d2] = tables.DEST_F_OVERLOAD
    assert b.schedule(s, 1, 1) == -1
    b.edit_dest("tcp", VIP, 80, "10.0.1.1", 80, u_threshold=5, l_threshold=1)
    assert c.dest_flags[d1] == 0 and b.schedule(s, 1, 1) == d1
    b.edit_dest("tcp", VIP, 80, "10.0.1.2", 80, u_threshold=0)
    assert c.dest_flags[d2] == 0


# --- issue 5: port 0 dests, refusals, large tables ---------------------------

def test_nat_dest_with_port_zero_uses_the_service_port(env):
    """ipvsadm -a -t VIP:80 -r RIP:0 -m: conns go to RIP:80 (kernel
    ip_vs_schedule: a zero dest port means the packet's port); replies from
    RIP:80 are stolen; -L and -S still show :0."""
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    d = b.add_dest("tcp", VIP, 80, "10.0.1.2", 0, fwd="masq")
    assert pubs[-1][1][d]["dport"] == 80
    assert b.steering_view()["real_servers"] == [(6, ip("10.0.1.2"), 80)]
    assert b._sched_view[0][1][0].dport == 80
    assert b.snapshot()["services"][0]["dests"][0]["dport"] == 0
    # The dest is still known by the port it was given.
    b.edit_dest("tcp", VIP, 80, "10.0.1.2", 0, weight=5)
    assert pubs[-1][1][d]["weight"] == 5 and pubs[-1][1][d]["dport"] == 80
    b.del_dest("tcp", VIP, 80, "10.0.1.2", 0)
    assert b.steering_view()["real_servers"] == []


@pytest.mark.parametrize("daddr", ["255.255.255.255", "0.0.0.0", "0.1.2.3", "224.0.0.1",
                                   "239.255.255.250", "10.0.1.255"])
def test_non_unicast_real_servers_refused_with_ipvsadm_message(env, daddr):
    """ip_vs_new_dest takes only RTN_UNICAST and RTN_LOCAL addresses; libipvs
    words EINVAL as below. 10.0.1.255 is a subnet broadcast of the director."""
    b, c, pubs, res = env
    res.broadcasts = {ip("10.0.1.255")}
    b.add_service("tcp", VIP, 80)
    with pytest.raises(BalancerError) as ei:
        b.add_dest("tcp", VIP, 80, daddr, 80, fwd="masq")
    assert str(ei.value) == (
        "Invalid operation.  Possibly wrong module version, address not unicast, ...")
    assert b.snapshot()["services"][0]["dests"] == []
    b.add_dest("tcp", VIP, 80, "10.0.1.254", 80, fwd="masq")


@pytest.mark.parametrize("field,value", [("vport", 80.5), ("vport", 80.0), ("vport", True),
                                         ("vport", "80.5"), ("dport", 8080.5),
                                         ("dport", False), ("weight", 1.5), ("weight", True)])
def test_numbers_on_the_control_socket_must_be_integers(env, field, value):
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    op = {"op": "add_dest", "proto": "tcp", "vaddr": VIP, "vport": 80,
          "daddr": "10.0.1.2", "dport": 80, "fwd": "masq", "weight": 1, field: value}
    with pytest.raises(BalancerError):
        b.apply(op)
    assert b.snapshot()["services"][0]["dests"] == []
    with pytest.raises(BalancerError, match="illegal virtual server port"):
        b.apply({"op": "add_service", "proto": "udp", "vaddr": VIP, "vport": 53.5})


def test_incremental_publish_matches_a_full_rebuild():
    """Tables patched row by row equal the tables built from scratch, after
    any mix of operations (single and batched)."""
    import random
    rnd = random.Random(5)
    c = Counters(max_services=8, max_dests=32)
    res = FakeResolver()
    pubs = []
    b = Balancer(c, resolver=res, publish=lambda s, d: pubs.append((s, d)))
    for step in range(400):
        port = rnd.randrange(1, 5)
        da = f"10.0.1.{rnd.randrange(1, 12)}"
        kind = rnd.random()
        batch = []
        if kind < 0.2:
            batch.append({"op": "add_service", "proto": "tcp", "vaddr": VIP, "vport": port})
        elif kind < 0.3:
            batch.append({"op": "del_service", "proto": "tcp", "vaddr": VIP, "vport": port})
        elif kind < 0.65:
            batch.append({"op": "add_dest", "proto": "tcp", "vaddr": VIP, "vport": port,
                          "daddr": da, "dport": rnd.choice([0, 80]), "fwd": "masq"})
        elif kind < 0.8:
            batch.append({"op": "edit_dest", "proto": "tcp", "vaddr": VIP, "vport": port,
                          "daddr": da, "dport": 80, "weight": rnd.randrange(3)})
        elif kind < 0.95:
            batch.append({"op": "del_dest", "proto": "tcp", "vaddr": VIP, "vport": port,
                          "daddr": da, "dport": rnd.choice([0, 80])})
        else:
            batch.append({"op": "clear"})
        if rnd.random() < 0.3:
            res.answers[ip(da)] = (1, bytes([2, 0, 0, 0, 0, step % 250]), b"\x02" * 6)
            b.on_resolved(ip(da))
        if rnd.random() < 0.5:
            b.apply_many(batch * 2)
        else:
            b.apply_many(batch)
        s_full, d_full = b.build_tables()
        assert np.array_equal(b.services_table, s_full), step
        assert np.array_equal(b.dests_table, d_full), step
    assert pubs


def test_batch_schedulers_never_name_an_unpublished_dest():
    """Inside a batch the schedulers wait: when the tables are published a
    removed dest is already out of its scheduler and an added one not in it."""
    c = Counters(max_services=4, max_dests=8)
    seen = []
    b = Balancer(c)
    b.publish = lambda s, d: seen.append(
        (sorted(v.slot for v in b._sched_view[0][1]),
         sorted(int(i) for i in np.nonzero(d["flags"])[0])))
    b.add_service("tcp", VIP, 80, sched="rr")
    old = b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, fwd="masq")
    seen.clear()
    b.apply_many([
        {"op": "del_dest", "proto": "tcp", "vaddr": VIP, "vport": 80, "daddr": "10.0.1.2",
         "dport": 80},
        {"op": "add_dest", "proto": "tcp", "vaddr": VIP, "vport": 80, "daddr": "10.0.1.3",
         "dport": 80, "fwd": "masq"},
    ])
    (view, used), = seen
    assert view == [] and old not in used and len(used) == 1
    assert [v.slot for v in b._sched_view[0][1]] == used


def test_ten_thousand_services_fit_the_default_limits():
    """ipvsadm -R of 10,000 services with a dest each: one publish, every
    rule applied; "Memory allocation problem" only beyond the limit."""
    from pylvs.control.balancer import DEFAULT_MAX_DESTS, DEFAULT_MAX_SERVICES
    assert DEFAULT_MAX_SERVICES >= 10_000 and DEFAULT_MAX_DESTS >= 100_000
    c = Counters(DEFAULT_MAX_SERVICES, DEFAULT_MAX_DESTS)
    pubs = []
    b = Balancer(c, publish=lambda s, d: pubs.append(d))
    ops = []
    for i in range(10_000):
        vip = f"10.{i >> 8}.{i & 255}.1"
        ops.append({"op": "add_service", "proto": "tcp", "vaddr": vip, "vport": 80})
        ops.append({"op": "add_dest", "proto": "tcp", "vaddr": vip, "vport": 80,
                    "daddr": f"192.168.{i >> 8}.{i & 255}", "dport": 0, "fwd": "masq"})
    assert all(r["ok"] for r in b.apply_many(ops))
    assert len(pubs) == 1 and int((pubs[0]["flags"] != 0).sum()) == 10_000


def test_memory_allocation_problem_only_beyond_the_configured_limit():
    c = Counters(max_services=3, max_dests=5)
    b = Balancer(c)
    for port in (1, 2, 3):
        b.add_service("udp", VIP, port)
    with pytest.raises(BalancerError, match="^Memory allocation problem"):
        b.add_service("udp", VIP, 4)
    for i in range(5):
        b.add_dest("udp", VIP, 1 + i % 3, f"10.0.1.{i + 1}", 53, fwd="masq")
    with pytest.raises(BalancerError, match="^Memory allocation problem"):
        b.add_dest("udp", VIP, 1, "10.0.1.99", 53, fwd="masq")
    b.del_service("udp", VIP, 3)
    b.add_service("udp", VIP, 4)
    b.add_dest("udp", VIP, 4, "10.0.1.99", 53, fwd="masq")


def test_deleted_dests_are_forgotten_by_the_resolver(env):
    b, c, pubs, res = env
    forgotten = []
    res.forget = forgotten.append
    b.add_service("tcp", VIP, 80)
    b.add_service("tcp", VIP, 81)
    b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, fwd="masq")
    b.add_dest("tcp", VIP, 81, "10.0.1.2", 80, fwd="masq")
    b.add_dest("tcp", VIP, 80, "10.0.1.3", 80, fwd="masq")
    b.del_dest("tcp", VIP, 80, "10.0.1.2", 80)
    assert forgotten == []          # still a dest of :81
    b.clear()
    assert sorted(forgotten) == [ip("10.0.1.2"), ip("10.0.1.3")]


# --- sysctls and engine counters ------------------------------------------------

def test_sysctls_validated_and_published(env):
    from pylvs.control.balancer import SYSCTL_DEFAULTS, SYSCTL_NAMES
    b, c, pubs, res = env
    sent = []
    b.publish_sysctls = sent.append
    from pylvs.sched import SYSCTLS
    assert b.apply({"op": "sysctl"}) == {**dict(zip(SYSCTL_NAMES, SYSCTL_DEFAULTS)),
                                         **{n: r[0] for n, r in SYSCTLS.items()}}
    assert b.apply({"op": "sysctl", "name": "expire_nodest_conn"}) == {"expire_nodest_conn": 0}
    assert sent == []
    assert b.apply({"op": "sysctl", "name": "expire_nodest_conn", "value": "1"}) == {
        "expire_nodest_conn": 1}
    assert sent[-1].dtype == np.int64 and len(sent[-1]) == len(SYSCTL_NAMES)
    assert int(sent[-1][SYSCTL_NAMES.index("expire_nodest_conn")]) == 1
    for op, msg in [
        ({"name": "nosuch", "value": 1}, "unknown sysctl 'nosuch'"),
        ({"name": "nosuch"}, "unknown sysctl 'nosuch'"),
        ({"name": "icmp_msgs_per_sec", "value": "fast"}, "'fast' is not an integer"),
        ({"name": "icmp_msgs_per_sec", "value": 1.5}, "1.5 is not an integer"),
        ({"name": "icmp_msgs_per_sec", "value": True}, "True is not an integer"),
        ({"name": "icmp_msgs_per_sec", "value": -1}, r"-1 is out of range \(0\.\.2147483647\)"),
        ({"name": "expire_nodest_conn", "value": 2}, r"2 is out of range \(0\.\.1\)"),
        ({"name": "expire_quiescent_template", "value": 2}, r"2 is out of range \(0\.\.1\)"),
    ]:
        with pytest.raises(BalancerError, match=msg):
            b.apply({"op": "sysctl", **op})
    # All or nothing.
    with pytest.raises(BalancerError):
        b.set_sysctls({"tcp_rst_burst": 5, "conn_reuse_mode": 9})
    assert b.sysctls()["tcp_rst_burst"] == 50 and len(sent) == 1


def test_stats_names_every_engine_counter(env):
    from pylvs.engine import tables
    b, c, pubs, res = env
    c.stats[tables.STAT_INDEX["drop_no_dest"]] = 7
    st = b.apply({"op": "stats"})
    assert list(st["counters"]) == list(tables.STAT_NAMES)
    assert st["counters"]["drop_no_dest"] == 7
    assert st["conns"] == {"count": None, "limit": None, "memory": None}
    b.engine_info = lambda: {"conn_count": 3, "capacity": 100}
    b.add_service("tcp", VIP, 80)
    b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, fwd="masq")
    st = json.loads(json.dumps(b.stats()))
    assert st["conns"] == {"count": 3, "limit": 100, "memory": None}
    assert st["services"] == {"count": 1, "limit": 4}
    assert st["dests"] == {"count": 1, "limit": 8}


def test_held_batches_publish_once_and_any_other_change_publishes_them(env):
    b, c, pubs, res = env
    add = {"op": "add_service", "proto": "udp", "vaddr": VIP}
    b.apply({"op": "batch", "more": True, "ops": [{**add, "vport": 1}]})
    b.apply({"op": "batch", "more": True, "ops": [
        {**add, "vport": 2},
        {"op": "add_dest", "proto": "udp", "vaddr": VIP, "vport": 2, "daddr": "10.0.1.2",
         "dport": 0, "fwd": "masq"}]})
    assert pubs == [] and b._sched_view[1] is None   # not scheduled before published
    b.apply({"op": "batch", "ops": [{**add, "vport": 3}]})
    assert len(pubs) == 1 and int(pubs[0][0]["flags"].sum()) == 3
    assert [v.daddr for v in b._sched_view[1][1]] == [ip("10.0.1.2")]
    # Held, then someone else's single change: everything goes out.
    b.apply({"op": "batch", "more": True, "ops": [{**add, "vport": 4}]})
    b.del_service("udp", VIP, 1)
    assert len(pubs) == 2 and int(pubs[1][0]["flags"].sum()) == 3
    b.flush()
    assert len(pubs) == 2   # nothing pending


@pytest.mark.parametrize("op", [
    {"op": "sysctl", "name": "conn_reuse_mode", "value": "\u0661"},
    {"op": "sysctl", "name": "icmp_msgs_burst", "value": "+-5"},
    {"op": "add_service", "proto": "tcp", "vaddr": VIP, "vport": "\uff18\uff10"},
    {"op": "add_service", "proto": "tcp", "vaddr": VIP, "vport": 0, "persistent": 300,
     "netmask": "/\uff12\uff14"},
    {"op": "add_dest", "proto": "tcp", "vaddr": VIP, "vport": 80, "daddr": "10.0.1.2",
     "fwd": "masq", "weight": "\uff13"},
])
def test_numbers_in_operations_are_ascii_digits_only(env, op):
    """JSON strings are numbers only in ASCII digits (Python's int() would
    take "٣" and "３"); a malformed sign is refused, not a crash."""
    b, c, pubs, res = env
    if op["op"] == "add_dest":
        b.add_service("tcp", VIP, 80)
    with pytest.raises(BalancerError):
        b.apply(op)
    assert b.sysctls()["icmp_msgs_burst"] == 50 and len(b.snapshot()["services"]) <= 1


def test_lower_threshold_above_the_upper_one_is_refused(env):
    """ip_vs_add_dest and ip_vs_edit_dest refuse l_threshold > u_threshold
    with ERANGE, also when no upper threshold is set; nothing changes."""
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 80)
    for ut, lt in [(10, 20), (0, 5)]:
        with pytest.raises(BalancerError, match=r"^Numerical result out of range$"):
            b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, u_threshold=ut, l_threshold=lt)
    assert b.snapshot()["services"][0]["dests"] == []
    b.add_dest("tcp", VIP, 80, "10.0.1.2", 80, u_threshold=10, l_threshold=10)
    n = len(pubs)
    with pytest.raises(BalancerError, match=r"^Numerical result out of range$"):
        b.edit_dest("tcp", VIP, 80, "10.0.1.2", 80, u_threshold=9)
    d = b.snapshot()["services"][0]["dests"][0]
    assert (d["u_threshold"], d["l_threshold"]) == (10, 10) and len(pubs) == n


def test_dest_moved_off_nat_keeps_its_replies_while_its_conns_live():
    """-e binds new conns to the new method; running NAT conns keep theirs, so
    their replies must still be taken (DEST_F_REPLIES, steering) until the
    dest has no conn left."""
    from pylvs.engine.tables import DEST_F_REPLIES, Counters
    from pylvs.io import bpf
    published = []
    b = Balancer(Counters(max_services=8, max_dests=8),
                 publish=lambda s, d: published.append((s, d)))
    b.add_service("tcp", "10.0.0.1", 80, "rr")
    slot = b.add_dest("tcp", "10.0.0.1", 80, "10.0.1.2", 80, "masq", 1)
    b.counters.dest_conns[slot] = (1, 2)          # conns made while it was NAT
    b.edit_dest("tcp", "10.0.0.1", 80, "10.0.1.2", 80, fwd="route")
    svcs, dests = published[-1]
    assert dests[slot]["flags"] & DEST_F_REPLIES
    assert bpf.dest_keys(svcs, dests) == [(6, int(ip_address("10.0.1.2")), 80)]
    assert b.steering_view()["real_servers"] == [(6, int(ip_address("10.0.1.2")), 80)]
    b.release_replies()                           # conns left: nothing changes
    assert published[-1][1][slot]["flags"] & DEST_F_REPLIES
    b.counters.dest_conns[slot] = (0, 0)
    b.release_replies()
    svcs, dests = published[-1]
    assert not dests[slot]["flags"] & DEST_F_REPLIES
    assert bpf.dest_keys(svcs, dests) == []
    assert b.steering_view()["real_servers"] == []
    # A dest with no conns moved off NAT never keeps replies.
    slot2 = b.add_dest("tcp", "10.0.0.1", 80, "10.0.1.3", 80, "masq", 1)
    b.edit_dest("tcp", "10.0.0.1", 80, "10.0.1.3", 80, fwd="route")
    assert not published[-1][1][slot2]["flags"] & DEST_F_REPLIES


def test_deleted_service_held_while_its_conns_live(env):
    """ipvsadm -D of a service whose NAT dest still has conns: as in the
    kernel, those conns are not reset. The service's key stays in the
    published table and the steering view (its frames reach the engine,
    which drops them: the dest is gone), and its NAT reply key in the view;
    no other service takes the slot. Re-added, the service and its dest get
    their old slots back and the conns find them. Once the conns are gone
    the estimator's pass releases the key and the slot."""
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 8080)
    d = b.add_dest("tcp", VIP, 8080, "10.0.1.2", 80, fwd="masq")
    c.dest_conns[d] = [1, 0]
    b.del_service("tcp", VIP, 8080)
    svcs, dests = pubs[-1]
    assert svcs[s]["flags"] & SVC_F_USED and (int(svcs[s]["vaddr"]), int(svcs[s]["vport"])) == (VIP_INT, 8080)
    assert not dests[d]["flags"] & DEST_F_USED      # the engine drops their frames
    assert b.steering_view() == {"services": [(6, VIP_INT, 8080)],
                                 "real_servers": [(6, ip("10.0.1.2"), 80)]}
    # What the socket filter and steering read: the published tables. The
    # real server's replies on those conns stay ours (ip_vs_out translates
    # them whatever the dest's state), or the director's kernel would
    # forward them untranslated.
    assert bpf.dest_keys(svcs, dests) == [(6, ip("10.0.1.2"), 80)]
    assert bpf.keys_of(svcs, "svc") == [(6, VIP_INT, 8080)]
    assert b.snapshot()["services"] == []           # -L no longer shows it
    assert b.schedule(s, 1, 1) == -1
    other = b.add_service("tcp", VIP, 81)
    assert other != s
    b.del_service("tcp", VIP, 81)
    b.release_replies()                             # conns live: still held
    assert b.steering_view()["services"] == [(6, VIP_INT, 8080)]
    # Re-added: old slots, so the conns find their dest again.
    assert b.add_service("tcp", VIP, 8080) == s
    assert b.add_dest("tcp", VIP, 8080, "10.0.1.2", 80, fwd="masq") == d
    assert pubs[-1][1][d]["flags"] & DEST_F_USED and int(pubs[-1][1][d]["svc"]) == s
    # Deleted again; the conns then end: key, reply key and slot released.
    b.del_service("tcp", VIP, 8080)
    n = len(pubs)
    c.dest_conns[d] = [0, 0]
    assert b.steering_view() == {"services": [(6, VIP_INT, 8080)], "real_servers": []}
    b.release_replies()
    assert len(pubs) == n + 1 and not pubs[-1][0][s]["flags"] & SVC_F_USED
    assert bpf.dest_keys(*pubs[-1]) == []
    assert b.steering_view() == {"services": [], "real_servers": []}
    for port in range(4):                           # every slot is free again
        b.add_service("tcp", VIP, 90 + port)


def test_deleted_nat_dest_keeps_its_replies_in_the_tables_while_its_conns_live(env):
    """ipvsadm -d of a NAT dest with conns: the published dest table keeps a
    DEST_F_REPLIES row (not DEST_F_USED: nothing new is sent to it) so the
    socket filter and steering still take its replies until the conns end."""
    b, c, pubs, res = env
    b.add_service("tcp", VIP, 8080)
    d = b.add_dest("tcp", VIP, 8080, "10.0.1.2", 80, fwd="masq")
    c.dest_conns[d] = [1, 0]
    b.del_dest("tcp", VIP, 8080, "10.0.1.2", 80)
    svcs, dests = pubs[-1]
    assert not dests[d]["flags"] & DEST_F_USED
    assert bpf.dest_keys(svcs, dests) == [(6, ip("10.0.1.2"), 80)]
    b.release_replies()
    assert bpf.dest_keys(*pubs[-1]) == [(6, ip("10.0.1.2"), 80)]
    c.dest_conns[d] = [0, 0]
    b.release_replies()
    assert bpf.dest_keys(*pubs[-1]) == []
    assert pubs[-1][1][d]["flags"] == 0


def test_deleted_service_without_conns_goes_at_once(env):
    b, c, pubs, res = env
    s = b.add_service("tcp", VIP, 8080)
    b.add_dest("tcp", VIP, 8080, "10.0.1.2", 80, fwd="masq")
    b.del_service("tcp", VIP, 8080)
    assert not pubs[-1][0][s]["flags"] & SVC_F_USED
    assert b.steering_view() == {"services": [], "real_servers": []}
