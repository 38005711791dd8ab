"""The Resolver's rounds against a fake netlink: deleted dests are forgotten,
unanswered ones back off exponentially up to a cap, answered ones are
re-checked with one neighbour dump and poked only when no longer REACHABLE."""

from __future__ import annotations

import ipaddress

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from pylvs.control.balancer import E_INVAL, E_LOCAL_DEST, Balancer, BalancerError
from pylvs.control.neighbors import NUD_REACHABLE, NUD_STALE, Resolver

NUD_FAILED = 0x20
from pylvs.engine.tables import Counters
from pylvs.io import Port

MAC0 = b"\x02\x00\x00\x00\x00\x01"


class Msg(dict):
    def __init__(self, attrs, **fields):
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name):
        return self.attrs.get(name)


class FakeNetlink:
    """IPRoute's calls the Resolver makes, over a dict of neighbours
    {ip: (mac, state)}; every 10.0.1.0/24 address is on ifindex 7."""

    def __init__(self):
        self.neighbours: dict[str, tuple[str, int]] = {}
        self.gateways: dict[str, str] = {}   # dst -> gateway: a routed network
        self.kinds: dict[str, int] = {}      # dst -> route type other than RTN_UNICAST
        self.route_gets: list[str] = []
        self.dumps = 0
        self.pokes: list[str] = []

    def route(self, cmd, dst):
        assert cmd == "get"
        self.route_gets.append(dst)
        attrs = {"RTA_OIF": 7}
        if dst in self.gateways:
            attrs["RTA_GATEWAY"] = self.gateways[dst]
        return [Msg(attrs, type=self.kinds.get(dst, 1))]

    def neigh(self, cmd, **kw):
        if cmd == "dump":
            self.dumps += 1
            return [Msg({"NDA_DST": ip, "NDA_LLADDR": mac}, state=st)
                    for ip, (mac, st) in self.neighbours.items()]
        # neigh_add (net/core/neighbour.c): NLM_F_EXCL ("add") on an
        # existing entry is EEXIST before NTF_USE is looked at.
        assert cmd in ("add", "replace") and kw["flags"] == 1
        if cmd == "add" and kw["dst"] in self.neighbours:
            raise NetlinkError(17, "File exists")
        self.pokes.append(kw["dst"])
        return []

    # 10.0.2.1/24 was added without `brd +`: no IFA_BROADCAST, but the
    # kernel's broadcast route all the same.
    addrs = [Msg({"IFA_LOCAL": "10.0.1.1", "IFA_BROADCAST": "10.0.1.255"}),
             Msg({"IFA_LOCAL": "10.0.2.1"})]
    routes = [Msg({"RTA_DST": "127.0.0.0", "RTA_TABLE": 255}, type=2, dst_len=8, table=255),
              Msg({"RTA_DST": "10.0.1.1", "RTA_TABLE": 255}, type=2, dst_len=32, table=255),
              Msg({"RTA_DST": "10.0.2.1", "RTA_TABLE": 255}, type=2, dst_len=32, table=255),
              Msg({"RTA_DST": "10.0.1.255", "RTA_TABLE": 255}, type=3, dst_len=32, table=255),
              Msg({"RTA_DST": "10.0.2.255", "RTA_TABLE": 255}, type=3, dst_len=32, table=255),
              Msg({"RTA_DST": "10.0.3.0", "RTA_TABLE": 254}, type=1, dst_len=24, table=254)]

    def get_addr(self, family):
        return list(self.addrs)

    def get_routes(self, family, table):
        assert family == 2 and table == 255
        return list(self.routes)   # pyroute2 may not filter: the Resolver does


def ip(s):
    return int(ipaddress.IPv4Address(s))


def resolver():
    r = Resolver([Port(0, "eth0", 7, MAC0)], interval=0.1, refresh=2.0, max_backoff=8.0)
    r.start = lambda: None   # the test drives the rounds
    return r


def test_unanswered_dest_backs_off_exponentially_up_to_the_cap():
    r, nl = resolver(), FakeNetlink()
    r.resolve(ip("10.0.1.77"))
    now, tries = 0.0, []
    while now < 60:
        before = len(nl.pokes)
        wait = r._cycle(nl, now)
        if len(nl.pokes) > before:
            tries.append(round(now, 2))
        now += max(wait, 0.01)
    gaps = [round(b - a, 2) for a, b in zip(tries, tries[1:])]
    # 0.1, 0.2, ... doubling to the 8 s cap (the 2 s refresh rounds do not
    # touch an unanswered address).
    assert gaps[:7] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]
    assert set(gaps[7:]) == {8.0} and len(tries) < 15
    assert r.broadcasts == {ip("10.0.1.255"), ip("10.0.2.255")}


def test_answered_dests_rechecked_with_one_dump_and_poked_only_when_stale():
    r, nl = resolver(), FakeNetlink()
    changed = []
    r.on_change = changed.append
    addrs = [f"10.0.1.{i}" for i in range(10, 210)]
    for i, a in enumerate(addrs):
        nl.neighbours[a] = (f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}", NUD_REACHABLE)
        r.resolve(ip(a))
    r._cycle(nl, 0.0)
    assert len(changed) == 200 and nl.dumps == 1 and nl.pokes == []
    assert r.resolve(ip("10.0.1.10")) == (0, bytes.fromhex("020000000000"), MAC0)
    # Within the refresh period nothing is asked.
    nl.route_gets.clear()
    r._cycle(nl, 1.0)
    assert nl.route_gets == [] and nl.dumps == 1
    # A refresh round: one dump for all; only the stale one is poked, and
    # it keeps its answer meanwhile.
    nl.neighbours["10.0.1.10"] = (nl.neighbours["10.0.1.10"][0], NUD_STALE)
    r._cycle(nl, 2.0)
    assert nl.dumps == 2 and nl.pokes == ["10.0.1.10"] and len(nl.route_gets) == 200
    assert r.resolve(ip("10.0.1.10")) is not None


def test_a_dest_without_a_route_through_our_ports_is_told_apart():
    """no_route: start-up does not wait for an answer that cannot come (a
    local or unreachable address), but does for one whose ARP is pending."""
    r, nl = resolver(), FakeNetlink()
    nl.kinds["10.0.1.5"] = 7   # RTN_UNREACHABLE
    for a in ("10.0.1.5", "10.0.1.77"):
        r.resolve(ip(a))
    assert not r.no_route(ip("10.0.1.5"))   # not looked up yet
    r._cycle(nl, 0.0)
    assert r.no_route(ip("10.0.1.5")) and not r.no_route(ip("10.0.1.77"))
    # The route appears: the next try finds it, and the answer.
    del nl.kinds["10.0.1.5"]
    nl.neighbours["10.0.1.5"] = ("02:00:00:00:00:05", NUD_REACHABLE)
    r._cycle(nl, 0.2)
    assert not r.no_route(ip("10.0.1.5")) and r.resolve(ip("10.0.1.5")) is not None
    nl.kinds["10.0.1.77"] = 7
    r._cycle(nl, 0.5)
    assert r.no_route(ip("10.0.1.77"))
    r.forget(ip("10.0.1.77"))
    assert not r.no_route(ip("10.0.1.77"))


def test_deleted_dests_are_forgotten():
    """-C of 200 dests: the Balancer tells the resolver, which asks the
    kernel about none of them again (no route lookups, no ARP)."""
    r, nl = resolver(), FakeNetlink()
    b = Balancer(Counters(4, 256), resolver=r)
    b.add_service("tcp", "10.0.0.1", 80)
    for i in range(200):
        b.add_dest("tcp", "10.0.0.1", 80, f"10.0.1.{i + 10}", 80, fwd="masq")
    for i in range(0, 200, 2):   # half of them answer
        nl.neighbours[f"10.0.1.{i + 10}"] = ("02:00:00:00:00:09", NUD_REACHABLE)
    now = 0.0
    for _ in range(5):
        now += r._cycle(nl, now)
    assert len(set(nl.route_gets)) == 200
    b.clear()
    nl.route_gets.clear()
    nl.pokes.clear()
    for _ in range(30):
        now += max(r._cycle(nl, now), 0.01)
    assert nl.route_gets == [] and nl.pokes == [] and now > 60


def test_connected_tells_a_directly_connected_dest_from_a_routed_one():
    """VS-DR needs the first: the Balancer flags a DR dest that is not."""
    r, nl = resolver(), FakeNetlink()
    changed = []
    r.on_change = changed.append
    nl.neighbours["10.0.1.2"] = ("02:00:00:00:00:02", NUD_REACHABLE)
    nl.neighbours["10.0.1.254"] = ("02:00:00:00:00:fe", NUD_REACHABLE)
    nl.gateways["10.0.9.2"] = "10.0.1.254"
    for a in ("10.0.1.2", "10.0.9.2"):
        assert r.connected(ip(a)) is None
        r.resolve(ip(a))
    r._cycle(nl, 0.0)
    assert (r.connected(ip("10.0.1.2")), r.connected(ip("10.0.9.2"))) == (True, False)
    assert r.resolve(ip("10.0.9.2"))[1] == bytes.fromhex("0200000000fe")
    # The route changes to go through the router: reported once.
    changed.clear()
    nl.gateways["10.0.1.2"] = "10.0.1.254"
    r._cycle(nl, 2.0)
    assert r.connected(ip("10.0.1.2")) is False and changed == [ip("10.0.1.2")]
    # A router that answers for its own address too (same MAC, proxy ARP):
    # the answer stays, the move back is still reported.
    changed.clear()
    del nl.gateways["10.0.1.2"]
    nl.neighbours["10.0.1.2"] = nl.neighbours["10.0.1.254"]
    r._cycle(nl, 4.0)
    assert r.connected(ip("10.0.1.2")) is True and changed == [ip("10.0.1.2")]
    r.forget(ip("10.0.1.2"))
    assert r.connected(ip("10.0.1.2")) is None


def test_broadcast_and_local_real_servers_are_refused():
    """The local routing table names the director's own addresses (and
    127/8) and the subnet broadcasts, also of an address added without
    `brd +`: IPVS refuses a broadcast real server (EINVAL) and would
    deliver to a local one itself (Local forwarding, not supported yet);
    either is refused before anything changes. A VIP is local too."""
    r, nl = resolver(), FakeNetlink()
    r._cycle(nl, 0.0)
    assert r.local_nets == ((ip("10.0.1.1"), 0xFFFFFFFF), (ip("10.0.2.1"), 0xFFFFFFFF),
                            (ip("127.0.0.0"), 0xFF000000))
    b = Balancer(Counters(4, 16), resolver=r)
    b.add_service("tcp", "10.0.0.100", 80)
    b.add_service("tcp", "10.0.0.101", 80)
    for daddr, msg in [("10.0.2.255", E_INVAL), ("10.0.1.255", E_INVAL),
                       ("127.0.0.1", E_LOCAL_DEST), ("127.5.6.7", E_LOCAL_DEST),
                       ("10.0.1.1", E_LOCAL_DEST), ("10.0.2.1", E_LOCAL_DEST),
                       ("10.0.0.100", E_LOCAL_DEST), ("10.0.0.101", E_LOCAL_DEST)]:
        with pytest.raises(BalancerError) as ei:
            b.add_dest("tcp", "10.0.0.100", 80, daddr, 80)
        assert str(ei.value) == msg, daddr
    assert b.snapshot()["services"][0]["dests"] == []
    b.add_dest("tcp", "10.0.0.100", 80, "10.0.1.2", 80)
    b.add_dest("tcp", "10.0.0.100", 80, "10.0.0.102", 80)
    res = b.apply_many([{"op": "add_dest", "proto": "tcp", "vaddr": "10.0.0.100", "vport": 80,
                         "daddr": "10.0.2.1", "dport": 80, "fwd": "masq"},
                        {"op": "del_service", "proto": "tcp", "vaddr": "10.0.0.101", "vport": 80},
                        {"op": "add_dest", "proto": "tcp", "vaddr": "10.0.0.100", "vport": 80,
                         "daddr": "10.0.0.101", "dport": 80, "fwd": "masq"}])
    assert res[0] == {"ok": False, "error": E_LOCAL_DEST} and res[2]["ok"]
    assert E_LOCAL_DEST == "local real servers (Local forwarding) are not supported yet"


@pytest.mark.parametrize("gateway", [None, "10.0.1.254"], ids=["direct", "routed"])
def test_changed_mac_is_re_resolved_and_published(gateway):
    """A real server (or, for a routed dest such as a Tun or NAT one behind a
    router, its next hop) changes its MAC: the kernel entry goes STALE with
    the old lladdr, then FAILED. Each is poked so the kernel re-resolves
    (an existing entry too), the last answer stays meanwhile, a FAILED one is
    poked again with backoff, and the new MAC is published once the kernel
    learns it."""
    r, nl = resolver(), FakeNetlink()
    changed = []
    r.on_change = changed.append
    hop = gateway or "10.0.1.2"
    if gateway:
        nl.gateways["10.0.9.2"] = gateway
    daddr = ip("10.0.9.2" if gateway else "10.0.1.2")
    nl.neighbours[hop] = ("02:00:00:00:00:02", NUD_REACHABLE)
    r.resolve(daddr)
    r._cycle(nl, 0.0)
    assert changed == [daddr] and nl.pokes == []
    old = r.resolve(daddr)
    nl.neighbours[hop] = ("02:00:00:00:00:02", NUD_STALE)
    r._cycle(nl, 2.0)
    assert nl.pokes == [hop] and r.resolve(daddr) == old
    # The kernel's unicast probes to the old MAC got no answer.
    nl.neighbours[hop] = (None, NUD_FAILED)
    now, tries = 2.0, []
    while now < 70:
        now += 2.0
        before = len(nl.pokes)
        r._cycle(nl, now)
        if len(nl.pokes) > before:
            tries.append(now)
        assert r.resolve(daddr) == old
    assert [b - a for a, b in zip(tries, tries[1:])] == [2.0, 4.0] + [8.0] * 7
    assert tries[0] == 4.0
    # The kernel learned the new MAC: published at the next round.
    nl.neighbours[hop] = ("02:00:00:00:00:25", NUD_REACHABLE)
    r._cycle(nl, now + 2.0)
    assert r.resolve(daddr)[1] == bytes.fromhex("020000000025")
    assert changed == [daddr, daddr] and r._fail_delay == {}
