"""The Balancer's health overlay: what the health checks say of a dest is
kept apart from the operator's weight. Down: out of the tables as after -d
(or weight 0 with inhibit_on_failure); up: back with the configured weight
(or misc_dynamic's); -S saves what the operator set, -L shows what forwards;
the sorry server is the checks' own dest."""

from __future__ import annotations

import pytest

from engine_kit import CIP, IMPLS, RIP, RIP2, RMAC, RS_PORT, SMAC, VIP, ip, mac, tcp, v
from pylvs.control import listing
from pylvs.control.balancer import Balancer, BalancerError
from pylvs.engine import new_engine, tables
from pylvs.engine.tables import DEST_F_REPLIES, DEST_F_USED, Counters


class Resolver:
    def resolve(self, daddr):
        return (RS_PORT, mac(RMAC), mac(SMAC))


@pytest.fixture
def bal():
    pubs = []
    b = Balancer(Counters(max_services=4, max_dests=8), resolver=Resolver(),
                 publish=lambda s, d: pubs.append((s, d)))
    b.pubs = pubs
    b.add_service("tcp", VIP, 80, sched="rr")
    b.add_dest("tcp", VIP, 80, RIP, 8080, fwd="masq", weight=3)
    b.add_dest("tcp", VIP, 80, RIP2, 8080, fwd="masq", weight=2)
    return b


def dest(b, daddr):
    return next(d for d in b.snapshot()["services"][0]["dests"] if d["daddr"] == daddr)


def picks(b, n=12):
    return {b.dests_table[b.schedule(0, ip(CIP), 1000 + i)]["daddr"] for i in range(n)}


def test_down_leaves_the_tables_and_the_listing_but_not_the_saved_rules(bal):
    slot = dest(bal, RIP)["slot"]
    assert bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=False) is True
    row = bal.dests_table[slot]
    # Not forwarded to (no DEST_F_USED, as after -d), its NAT replies still ours.
    assert not row["flags"] & DEST_F_USED and row["flags"] & DEST_F_REPLIES
    assert picks(bal) == {ip(RIP2)}
    d = dest(bal, RIP)
    assert (d["forwarding"], d["weight"], d["config_weight"], d["health"]) == (False, 0, 3, "down")
    snap = bal.snapshot()
    assert RIP + ":8080" not in listing.list_all(snap)
    assert f"-a -t {VIP}:80 -r {RIP}:8080 -m -w 3\n" in listing.save(snap)
    # Back up: the same slot (its old conns resume), the operator's weight.
    assert bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=True) is True
    assert dest(bal, RIP)["slot"] == slot
    assert bal.dests_table[slot]["flags"] & DEST_F_USED and bal.dests_table[slot]["weight"] == 3
    assert picks(bal) == {ip(RIP), ip(RIP2)}
    assert "  -> %-28s Masq    3" % (RIP + ":8080") in listing.list_all(bal.snapshot())


def test_unchanged_health_publishes_nothing(bal):
    n = len(bal.pubs)
    assert bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=True) is False
    assert len(bal.pubs) == n


def test_inhibit_on_failure_keeps_the_dest_with_weight_zero(bal):
    slot = dest(bal, RIP)["slot"]
    bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=False, inhibit=True)
    row = bal.dests_table[slot]
    assert row["flags"] & DEST_F_USED and row["weight"] == 0
    assert picks(bal) == {ip(RIP2)}
    snap = bal.snapshot()
    assert "  -> %-28s Masq    0 " % (RIP + ":8080") in listing.list_all(snap)
    assert f"-r {RIP}:8080 -m -w 3\n" in listing.save(snap)


def test_misc_dynamic_weight_forwards_and_the_operator_weight_is_saved(bal):
    bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=True, weight=7)
    assert bal.dests_table[dest(bal, RIP)["slot"]]["weight"] == 7
    snap = bal.snapshot()
    assert "  -> %-28s Masq    7 " % (RIP + ":8080") in listing.list_all(snap)
    assert f"-r {RIP}:8080 -m -w 3\n" in listing.save(snap)
    # misc_dynamic weight 0: quiesced, still listed.
    bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=True, weight=0)
    assert picks(bal) == {ip(RIP2)}
    with pytest.raises(BalancerError, match="illegal weight"):
        bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=True, weight=70000)


def test_operator_edits_a_down_dest_and_it_comes_back_with_the_new_weight(bal):
    bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=False)
    bal.edit_dest("tcp", VIP, 80, RIP, 8080, weight=9)
    assert not bal.dests_table[dest(bal, RIP)["slot"]]["flags"] & DEST_F_USED
    assert f"-r {RIP}:8080 -m -w 9\n" in listing.save(bal.snapshot())
    bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=True)
    assert bal.dests_table[dest(bal, RIP)["slot"]]["weight"] == 9


def test_health_of_an_unknown_dest_is_refused(bal):
    bal.del_dest("tcp", VIP, 80, RIP, 8080)
    with pytest.raises(BalancerError, match="No such destination"):
        bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=False)


def test_a_down_dest_counts_as_gone_for_expire_nodest_conn(bal):
    old = bal.dests_table
    bal.set_dest_health("tcp", VIP, 80, RIP, 8080, up=False)
    assert tables.dests_gone(old, bal.dests_table)


def test_sorry_server_is_the_checks_dest(bal):
    sorry = "192.168.1.9"
    bal.set_sorry_server("tcp", VIP, 80, sorry, 80, "masq", "inhibit")
    d = dest(bal, sorry)
    assert d["sorry"] and bal.dests_table[d["slot"]]["weight"] == 0
    assert bal.dests_table[d["slot"]]["flags"] & DEST_F_USED
    # Quorum lost: the real servers leave, the sorry server takes the flows.
    for rip in (RIP, RIP2):
        bal.set_dest_health("tcp", VIP, 80, rip, 8080, up=False)
    assert bal.set_sorry_server("tcp", VIP, 80, sorry, 80, "masq", "on") is True
    assert picks(bal) == {ip(sorry)}
    snap = bal.snapshot()
    assert "  -> %-28s Masq    1 " % (sorry + ":80") in listing.list_all(snap)
    assert sorry not in listing.save(snap)
    for op in (lambda: bal.edit_dest("tcp", VIP, 80, sorry, 80, weight=4),
               lambda: bal.del_dest("tcp", VIP, 80, sorry, 80),
               lambda: bal.set_dest_health("tcp", VIP, 80, sorry, 80, up=False)):
        with pytest.raises(BalancerError, match="No such destination"):
            op()
    assert bal.set_sorry_server("tcp", VIP, 80, sorry, 80, "masq", "off") is True
    assert all(d["daddr"] != sorry for d in bal.snapshot()["services"][0]["dests"])
    assert bal.set_sorry_server("tcp", VIP, 80, sorry, 80, "masq", "off") is False
    # An operator's -a of the sorry server's address takes it over.
    bal.set_sorry_server("tcp", VIP, 80, sorry, 80, "masq", "on")
    bal.add_dest("tcp", VIP, 80, sorry, 80, fwd="masq", weight=5)
    assert f"-r {sorry}:80 -m -w 5\n" in listing.save(bal.snapshot())
    assert bal.set_sorry_server("tcp", VIP, 80, sorry, 80, "masq", "off") is False


def test_sorry_server_added_inhibited_never_forwards_with_weight_one(bal):
    n = len(bal.pubs)
    bal.set_sorry_server("tcp", VIP, 80, "192.168.1.9", 80, "masq", "inhibit")
    assert len(bal.pubs) == n + 1
    slot = dest(bal, "192.168.1.9")["slot"]
    assert bal.pubs[-1][1][slot]["weight"] == 0
    with pytest.raises(BalancerError, match="sorry server state"):
        bal.set_sorry_server("tcp", VIP, 80, "192.168.1.9", 80, "masq", "maybe")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c_sched", [True, False])
def test_engine_drains_a_down_dest_as_after_del_and_resumes_it(impl, c_sched):
    """A conn to a dest the checks took out: its packets are dropped
    (drop_dest_gone, as ip_vs_in for a dest not available); new conns go to
    the other dest; back up, the old conn flows again."""
    counters = Counters(max_services=4, max_dests=8)
    box = {}
    b = Balancer(counters, resolver=Resolver(),
                 publish=lambda s, d: box["engine"].set_tables(s, d) if "engine" in box else None)
    engine = box["engine"] = new_engine(impl, 64, counters=counters, schedule=b.schedule,
                                        key=bytes(range(16)))
    b.publish_sched = engine.set_sched
    b.c_sched = c_sched
    b.add_service("tcp", VIP, 80, sched="rr")
    b.add_dest("tcp", VIP, 80, RIP, 8080, fwd="masq")
    b.add_dest("tcp", VIP, 80, RIP2, 8080, fwd="masq")
    batch = tables.Batch(size=8, slot=4096)

    def send(frame):
        batch.clear()
        batch.append(v(frame), 0)
        engine.process(batch, 1.0)
        out = batch.frame(0)
        daddr_at = tables.VNET_HDR.size + 14 + 16   # the IPv4 destination
        return int(batch.verdict[0]), out[daddr_at:daddr_at + 4]

    verdict, first = send(tcp(sport=1000))
    assert verdict == tables.V_TX
    victim = ".".join(str(x) for x in first)
    other = RIP2 if victim == RIP else RIP
    b.set_dest_health("tcp", VIP, 80, victim, 8080, up=False)
    dropped = counters.named()["drop_dest_gone"]
    verdict, _ = send(tcp(sport=1000, flags="A", seq=1001, ack=1))
    assert verdict != tables.V_TX and counters.named()["drop_dest_gone"] == dropped + 1
    for port in range(2000, 2006):
        verdict, to = send(tcp(sport=port))
        assert verdict == tables.V_TX and bytes(to) == ip(other).to_bytes(4, "big")
    b.set_dest_health("tcp", VIP, 80, victim, 8080, up=True)
    verdict, to = send(tcp(sport=1000, flags="A", seq=1001, ack=1))
    assert verdict == tables.V_TX and bytes(to) == ip(victim).to_bytes(4, "big")


@pytest.mark.parametrize("state", ["on", "inhibit"])
def test_operator_takes_over_the_sorry_server_with_its_own_weight(bal, state):
    """An -a of the sorry server's address makes it the operator's dest: an
    inhibited sorry server's weight 0 must not stick to it."""
    sorry = "192.168.1.9"
    bal.set_sorry_server("tcp", VIP, 80, sorry, 80, "masq", state)
    bal.add_dest("tcp", VIP, 80, sorry, 80, fwd="masq", weight=5)
    d = dest(bal, sorry)
    assert (d["weight"], d["config_weight"], d["health"]) == (5, 5, "up")
    assert bal.dests_table[d["slot"]]["weight"] == 5
    bal.edit_dest("tcp", VIP, 80, sorry, 80, fwd="masq", weight=7)
    assert bal.dests_table[dest(bal, sorry)["slot"]]["weight"] == 7
    assert f"-r {sorry}:80 -m -w 7\n" in listing.save(bal.snapshot())
