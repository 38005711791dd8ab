"""Persistence: templates in both engines (docs/engine.md, "Persistence").

The kernel's rules (net/netfilter/ipvs/ip_vs_core.c ip_vs_sched_persist,
ip_vs_conn.c ip_vs_check_template and ip_vs_conn_expire): a persistent
service (-p) keeps a template per client network (caddr & -M netmask,
cport 0, vaddr, vport; vport 0 for a port-0 service) that pins the client's
later conns to one dest whatever the scheduler; the template's timer starts
again at each conn made through it and, when it fires while conns it
controls live, waits another 60 s; it counts in the dest's PersistConn, not
in its active/inactive conns. A weight-0 dest keeps its persistent clients,
unless expire_quiescent_template is set; a deleted dest's templates are no
longer used. Every scenario runs on the C engine and on the reference, with
the real control plane (Balancer and its schedulers) choosing dests, and
both engines' conn tables are compared at the end.
"""

from __future__ import annotations

import pytest

from pylvs.control import listing
from pylvs.control.balancer import Balancer, BalancerError, E_ZERO_PORT
from pylvs.engine import new_engine, states, tables

from engine_kit import CIP, RIP, RIP2, RMAC, SMAC, VIP, ip, mac, tcp, udp, v

IMPLS = ["python", "c"]
RIP3 = "192.168.1.4"
RIPS = (RIP, RIP2, RIP3)
CLIENT_PORT, RS_PORT = 0, 1
TPL = tables.CONN_F_TEMPLATE


class Resolver:
    """Every real server resolved, on the real-server port."""

    @staticmethod
    def resolve(daddr):
        return RS_PORT, mac(RMAC), mac(SMAC)


class World:
    """A Balancer publishing to one engine: the director in small."""

    def __init__(self, impl: str, capacity: int = 256):
        self.counters = tables.Counters(max_services=8, max_dests=16)
        self.engine = new_engine(impl, capacity, counters=self.counters,
                                 schedule=self._schedule, key=bytes(range(16)))
        self.b = Balancer(self.counters, resolver=Resolver(),
                          publish=lambda s, d: self.engine.set_tables(s, d))
        self.b.publish_sysctls = self.engine.set_sysctls
        self.batch = tables.Batch(size=8, slot=2048)

    def _schedule(self, svc, caddr, cport):
        return self.b.schedule(svc, caddr, cport)

    def service(self, sched="rr", port=80, proto="tcp", persistent=300, netmask=None,
                dests=RIPS, dport=None, weights=None):
        self.b.add_service(proto, VIP, port, sched, persistent=persistent, netmask=netmask)
        for i, r in enumerate(dests):
            self.b.add_dest(proto, VIP, port, r, port if dport is None else dport, fwd="masq",
                            weight=1 if weights is None else weights[i])

    def send(self, frame: bytes, now: float, in_port: int = CLIENT_PORT):
        """(verdict, the frame afterwards)."""
        self.batch.clear()
        self.batch.append(v(frame), in_port)
        self.engine.process(self.batch, now)
        return int(self.batch.verdict[0]), self.batch.frame(0)[tables.VNET_HDR_LEN:]

    def syn(self, now: float, src=CIP, sport=1000, dport=80) -> str | None:
        """A new TCP conn's real server (None: not forwarded)."""
        verdict, out = self.send(tcp(src=src, sport=sport, dport=dport), now)
        if verdict != tables.V_TX:
            return None
        return "%d.%d.%d.%d" % tuple(out[30:34])

    def established(self, now: float, src=CIP, sport=1000, dport=80):
        """The rest of a handshake through the director (NAT): the real
        server's SYN+ACK, the client's ACK."""
        for c in self.engine.conns():
            if c[0] == tables.PROTO_TCP and c[1] == ip(src) and c[2] == sport and not c[9] & TPL:
                daddr, rport = c[5], c[6]
                break
        else:
            raise AssertionError("no conn")
        rs = "%d.%d.%d.%d" % tuple(daddr.to_bytes(4, "big"))
        assert self.send(tcp(src=rs, dst=src, sport=rport, dport=sport, flags="SA",
                             smac=RMAC, dmac=SMAC), now, RS_PORT)[0] == tables.V_TX
        assert self.send(tcp(src=src, sport=sport, dport=dport, flags="A"), now)[0] == tables.V_TX

    def templates(self) -> list[tuple]:
        """(caddr, cport, vport, daddr, dport, state, expires) of each template."""
        return sorted((c[1], c[2], c[4], c[5], c[6], c[7], c[8])
                      for c in self.engine.conns() if c[9] & TPL)

    def persist(self, rip: str) -> int:
        return int(self.counters.dest_persist[self.slot(rip)])

    def slot(self, rip: str, port=80) -> int:
        for svc in self.b.services():
            for d in svc.dests.values():
                if d.daddr == ip(rip) and svc.vport == port:
                    return d.slot
        raise KeyError(rip)

    def check(self):
        if hasattr(self.engine, "_check"):
            self.engine._check()


def same_tables(worlds):
    """Both engines end with the same conns (templates included) and counts."""
    a, b = (w.engine.conns() for w in worlds)
    assert a == b
    for name in ("dest_conns", "dest_persist", "stats"):
        assert getattr(worlds[0].counters, name).tolist() == getattr(worlds[1].counters, name).tolist()


def both():
    return [World(impl) for impl in IMPLS]


# --- one client, one real server --------------------------------------------

SCHEDULERS = ["rr", "wrr", "lc", "wlc", "sed", "nq"]


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_same_client_pinned_across_many_conns(sched):
    worlds = both()
    for w in worlds:
        w.service(sched, weights=(1, 2, 3))
        first = w.syn(0.0)
        # Another client scheduled in between moves rr/wrr on and loads lc/wlc.
        other = [w.syn(0.5 + i, src=f"10.0.7.{i + 1}") for i in range(3)]
        got = [w.syn(1.0 + i, sport=2000 + i) for i in range(30)]
        assert got == [first] * 30, (w.engine, sched)
        assert len(set(other)) > 1 or sched in ("lc", "wlc", "sed", "nq")
        # One template for the client, keyed cport 0, counting in PersistConn only.
        tpl = [t for t in w.templates() if t[0] == ip(CIP)]
        assert tpl == [(ip(CIP), 0, 80, ip(first), 80, tables.CTPL_NONE, 30.0 + 300)]
        assert w.persist(first) == 1 + other.count(first)
        assert int(w.counters.dest_conns[w.slot(first)].sum()) == 31 + other.count(first)
        w.check()
    same_tables(worlds)


def test_without_persistence_the_client_is_spread():
    """The control case: the same script without -p uses every dest."""
    for w in both():
        w.service("rr", persistent=0)
        assert {w.syn(float(i), sport=2000 + i) for i in range(6)} == set(RIPS)
        assert w.templates() == [] and w.counters.dest_persist.sum() == 0


@pytest.mark.parametrize("netmask, clients, together", [
    ("255.255.255.0", ("10.0.0.2", "10.0.0.77", "10.0.0.254"), True),
    (None, ("10.0.0.2", "10.0.0.77", "10.0.0.254"), False),   # /32: one template each
    ("255.255.0.0", ("10.0.0.2", "10.0.200.1"), True),
])
def test_netmask_groups_clients(netmask, clients, together):
    worlds = both()
    for w in worlds:
        w.service("rr", netmask=netmask)
        got = [w.syn(float(i), src=c, sport=3000 + i) for i, c in enumerate(clients)]
        assert (len(set(got)) == 1) == together, got
        mask = 0xFFFFFFFF if netmask is None else ip(netmask)
        assert {t[0] for t in w.templates()} == {ip(c) & mask for c in clients}
        # Another network is scheduled afresh (rr moves on).
        assert w.syn(10.0, src="10.9.9.9") != got[-1]
        w.check()
    same_tables(worlds)


# --- the template's timer --------------------------------------------------

def test_template_expires_by_the_service_timeout():
    """UDP conns of 2 s (--set 0 0 2) under a -p 10 template: once they are
    gone the template goes at 10 s after the last conn made through it."""
    worlds = both()
    for w in worlds:
        w.engine.set_timeouts(states.timeout_array(900, 120, 2))
        w.service("rr", port=53, proto="udp", persistent=10)
        first = w.send(udp(sport=1000), 0.0)[1][30:34]
        assert w.send(udp(sport=1001), 5.0)[1][30:34] == first    # re-armed: 15
        assert w.templates()[0][6] == 15.0
        w.engine.expire(14.9, 1000)
        assert len(w.templates()) == 1 and w.engine.conn_count == 1
        w.engine.expire(15.0, 1000)
        assert w.templates() == [] and w.engine.conn_count == 0
        assert w.counters.dest_persist.sum() == 0
        # rr moved on: the client is scheduled afresh, and a new template made.
        assert w.send(udp(sport=1002), 20.0)[1][30:34] != first
        assert len(w.templates()) == 1
        w.check()
    same_tables(worlds)


def test_template_of_half_open_conns_waits_for_them():
    """Two SYNs (SYN_RECV, 60 s) under -p 10: the template's timer fires at
    15 while they live, so it waits 60 s more, and goes after them."""
    worlds = both()
    for w in worlds:
        w.service("rr", persistent=10)
        first = w.syn(0.0)
        assert w.syn(5.0, sport=1001) == first
        w.engine.expire(15.0, 1000)
        assert w.templates()[0][6] == 75.0
        w.engine.expire(65.0, 1000)
        assert w.engine.conn_count == 1 and w.persist(first) == 1
        w.engine.expire(74.9, 1000)
        assert len(w.templates()) == 1
        w.engine.expire(75.0, 1000)
        assert w.engine.conn_count == 0 and w.persist(first) == 0
        assert w.syn(80.0, sport=1002) != first
        w.check()
    same_tables(worlds)


def test_template_waits_while_it_controls_conns():
    """ip_vs_conn_expire: the template's timer fires while a conn it controls
    lives: it waits 60 s more, and from then on its timeout is 60 s."""
    worlds = both()
    for w in worlds:
        w.service("rr", persistent=10)
        first = w.syn(0.0)
        w.established(0.0)                                # ESTABLISHED: 900 s
        assert w.engine.expire(10.0, 1000) == 0
        assert w.templates() == [(ip(CIP), 0, 80, ip(first), 80, tables.CTPL_ASSURED, 70.0)]
        assert w.engine.expire(70.0, 1000) == 0           # still controlling: 60 s again
        assert w.templates()[0][6] == 130.0
        # A new conn through it re-arms it by 60 s now, not by -p 10.
        assert w.syn(100.0, sport=1001) == first
        assert w.templates()[0][6] == 160.0
        # Once its conns are gone the template goes at its next expiry (the
        # clock hand meets it first, still controlling: 60 s more).
        w.engine.expire(1000.0, 1000)
        assert w.engine.conn_count == 1 and w.templates()[0][6] == 1060.0
        w.engine.expire(1060.0, 1000)
        assert w.templates() == [] and w.engine.conn_count == 0
        assert w.counters.dest_conns.sum() == 0 and w.counters.dest_persist.sum() == 0
        w.check()
    same_tables(worlds)


def test_controlling_template_met_late_by_a_lookup_waits_as_the_hand_would():
    worlds = both()
    for w in worlds:
        w.service("rr", persistent=10)
        first = w.syn(0.0)
        w.established(0.0)
        # No clock hand ran: at 20 the template's timer is past, but it
        # controls a conn, so it was never to go; it now runs by 60 s.
        assert w.syn(20.0, sport=1001) == first
        assert w.templates()[0][6] == 80.0
        w.check()
    same_tables(worlds)


def test_dead_template_met_before_the_clock_hand_is_not_used():
    worlds = both()
    for w in worlds:
        w.engine.set_timeouts(states.timeout_array(900, 120, 2))
        w.service("rr", port=53, proto="udp", persistent=10)
        first = w.send(udp(sport=1000), 0.0)[1][30:34]
        w.engine.expire(5.0, 1000)                     # the conn goes, not the template
        assert w.engine.conn_count == 1
        # Dead at 10, not yet reaped: a lookup meets it, expires it, and the
        # client is scheduled afresh (rr's next dest) under a new template.
        assert w.send(udp(sport=1001), 11.0)[1][30:34] != first
        assert len(w.templates()) == 1 and w.templates()[0][6] == 21.0
        assert w.counters.stat("conns_expired") == 2
    same_tables(worlds)


# --- weight 0, expire_quiescent_template, deleted dests ----------------------

@pytest.mark.parametrize("quiescent", [0, 1])
def test_weight_zero_dest_keeps_its_persistent_clients(quiescent):
    worlds = both()
    for w in worlds:
        w.b.set_sysctls({"expire_quiescent_template": quiescent})
        w.service("rr")
        first = w.syn(0.0)
        w.b.edit_dest("tcp", VIP, 80, first, 80, weight=0)
        again = w.syn(1.0, sport=1001)
        newcomer = w.syn(2.0, src="10.0.5.5")
        assert newcomer != first                       # the scheduler skips weight 0
        if quiescent:
            # The template is no longer used: rescheduled, and the old one
            # leaves the index, listed as the kernel shows it (ports 65535).
            assert again != first
            tpls = w.templates()
            assert (ip(CIP), 0, 0xFFFF, ip(first), 0xFFFF, 0, 300.0) in tpls
            assert (ip(CIP), 0, 80, ip(again), 80, 0, 301.0) in tpls
        else:
            assert again == first
        w.check()
    same_tables(worlds)


def test_deleted_dest_templates_are_not_used():
    worlds = both()
    for w in worlds:
        w.service("rr")
        first = w.syn(0.0)
        slot = w.slot(first)
        w.b.del_dest("tcp", VIP, 80, first, 80)
        again = w.syn(1.0, sport=1001)
        assert again not in (None, first)
        assert int(w.counters.dest_persist[slot]) == 1     # the old template lives on...
        w.engine.expire(300.0, 1000)                       # ...until its timer, which
        assert int(w.counters.dest_persist[slot]) == 1     # waits for its SYN_RECV conn
        w.engine.expire(360.0, 1000)
        assert int(w.counters.dest_persist[slot]) == 0
        w.check()
    same_tables(worlds)


def test_template_slot_not_reused_while_a_template_names_it():
    w = World("c")
    w.service("rr", dests=(RIP,))
    w.syn(0.0)
    slot = w.slot(RIP)
    w.b.del_dest("tcp", VIP, 80, RIP, 80)
    w.b.add_dest("tcp", VIP, 80, RIP2, 80, fwd="masq")
    assert w.slot(RIP2) != slot
    # Re-added, the dest gets its slot back and its template applies again.
    w.b.add_dest("tcp", VIP, 80, RIP, 80, fwd="masq")
    assert w.slot(RIP) == slot
    assert w.syn(1.0, sport=1001) == RIP


# --- port 0 -----------------------------------------------------------------

def test_port_zero_service_takes_every_port_with_one_template():
    worlds = both()
    for w in worlds:
        w.service("rr", port=0, dport=0)
        w.service("rr", port=22, persistent=0, dests=(RIP3,))   # an exact service wins
        first = w.syn(0.0, dport=443)
        for i, port in enumerate((80, 443, 8080, 5001)):
            verdict, out = w.send(tcp(sport=4000 + i, dport=port), 1.0 + i)
            assert verdict == tables.V_TX
            assert "%d.%d.%d.%d" % tuple(out[30:34]) == first
            assert int.from_bytes(out[36:38], "big") == port      # the packet's own port
        assert w.syn(9.0, sport=4100, dport=22) == RIP3
        assert w.templates() == [(ip(CIP), 0, 0, ip(first), 0, 0, 304.0)]
        # Replies come back through the NAT conn of each port.
        verdict, out = w.send(tcp(src=first, dst=CIP, sport=8080, dport=4002, flags="SA",
                                  smac=RMAC, dmac=SMAC), 5.0, RS_PORT)
        assert verdict == tables.V_TX and int.from_bytes(out[34:36], "big") == 8080
        w.check()
    same_tables(worlds)


def test_port_zero_needs_persistence():
    w = World("python")
    with pytest.raises(BalancerError, match=E_ZERO_PORT):
        w.b.add_service("tcp", VIP, 0, "rr")
    w.b.add_service("tcp", VIP, 0, "rr", persistent=60)
    with pytest.raises(BalancerError, match=E_ZERO_PORT):
        w.b.edit_service("tcp", VIP, 0, "rr", persistent=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_engine_refuses_a_port_zero_service_without_persistence(impl):
    """A table the Balancer would not make: the kernel's ip_vs_schedule
    schedules no frame to another port of a non-persistent service."""
    w = World(impl)
    svc = tables.empty_services(1)
    svc[0] = (ip(VIP), 0, tables.PROTO_TCP, tables.SVC_F_USED, 0, 0xFFFFFFFF)
    dst = tables.empty_dests(1)
    dst[0] = (ip(RIP), 0, 0, 1, tables.FWD_MASQ, tables.DEST_F_USED | tables.DEST_F_RESOLVED,
              RS_PORT, tuple(mac(RMAC)), tuple(mac(SMAC)), 0, 0, 0)
    w.engine.set_tables(svc, dst)
    assert w.send(tcp(dport=80), 0.0)[0] == tables.V_DROP
    assert w.counters.stat("drop_no_dest") == 1


def test_ftp_templates_have_vport_zero():
    """ip_vs_sched_persist: an FTP service's template is <caddr, 0, vaddr, 0, daddr, 0>."""
    for w in both():
        w.service("rr", port=21)
        first = w.syn(0.0, dport=21)
        assert w.templates() == [(ip(CIP), 0, 0, ip(first), 0, 0, 300.0)]


# --- template states and listings --------------------------------------------

def test_udp_template_assured_on_a_reply():
    worlds = both()
    for w in worlds:
        w.service("rr", port=53, proto="udp")
        assert w.send(udp(sport=1000), 0.0)[0] == tables.V_TX
        rs = w.templates()[0][3]
        assert w.templates()[0][5] == tables.CTPL_NONE
        addr = "%d.%d.%d.%d" % tuple(rs.to_bytes(4, "big"))
        assert w.send(udp(src=addr, dst=CIP, sport=53, dport=1000, smac=RMAC, dmac=SMAC),
                      0.5, RS_PORT)[0] == tables.V_TX
        assert w.templates()[0][5] == tables.CTPL_ASSURED
    same_tables(worlds)


def test_listings_show_templates_as_ipvsadm():
    w = World("c")
    w.b.clock = lambda: 0.0
    w.b.conns_source = w.engine.conns
    w.service("rr", dests=(RIP,))
    w.syn(0.0)
    w.established(0.0)
    text = listing.conns(w.b.conns())
    assert text == (
        "IPVS connection entries\n"
        "pro expire state       source             virtual            destination\n"
        "TCP 05:00  ASSURED     10.0.0.2:0         10.0.0.1:80        192.168.1.2:80\n"
        "TCP 15:00  ESTABLISHED 10.0.0.2:1000      10.0.0.1:80        192.168.1.2:80\n")
    snap = w.b.snapshot()
    assert snap["services"][0]["dests"][0]["persistconns"] == 1
    text = listing.list_all(snap, listing.PERSISTENT_CONN)
    assert text.splitlines()[-1] == "  -> 192.168.1.2:80               1         1           1          0         "


# --- the two engines step by step, at the limit -----------------------------

@pytest.mark.parametrize("seed", range(6))
def test_engines_agree_on_random_persistent_traffic_at_the_limit(seed):
    """Random SYNs, handshakes, UDP datagrams and replies from a few client
    networks, expiry passes and weight changes on a 12-conn table, where
    templates and conns evict each other: after every step both engines
    hold the same conns and counts, and the C table checks out."""
    import random

    rng = random.Random(seed)
    worlds = [World(impl, capacity=12) for impl in IMPLS]
    for w in worlds:
        w.service("wlc", persistent=6, netmask="255.255.255.252")
        w.service("rr", port=53, proto="udp", persistent=4, netmask="255.255.255.252")
    clients = [f"10.0.0.{i}" for i in range(2, 14)]
    now = 0.0
    for step in range(250):
        now += rng.choice((0.0, 0.1, 0.5, 2.0))
        kind = rng.random()
        src, sport = rng.choice(clients), rng.randrange(1000, 1030)
        for w in worlds:
            if kind < 0.45:
                w.send(tcp(src=src, sport=sport), now)
            elif kind < 0.6:
                w.send(udp(src=src, sport=sport), now)
            elif kind < 0.75:
                conns = [c for c in w.engine.conns() if not c[9] & TPL]
                if conns:
                    c = conns[step % len(conns)]
                    rs = "%d.%d.%d.%d" % tuple(c[5].to_bytes(4, "big"))
                    cl = "%d.%d.%d.%d" % tuple(c[1].to_bytes(4, "big"))
                    frame = (tcp(src=rs, dst=cl, sport=c[6], dport=c[2], flags="SA", smac=RMAC,
                                 dmac=SMAC) if c[0] == tables.PROTO_TCP else
                             udp(src=rs, dst=cl, sport=c[6], dport=c[2], smac=RMAC, dmac=SMAC))
                    w.send(frame, now, RS_PORT)
                    w.send(tcp(src=cl, sport=c[2], flags="A"), now)
            elif kind < 0.9:
                w.engine.expire(now, 5)
            else:
                rip = RIPS[step % 3]
                w.b.edit_dest("tcp", VIP, 80, rip, 80, weight=step % 2)
                w.b.set_sysctls({"expire_quiescent_template": (step // 3) % 2})
        same_tables(worlds)
        worlds[1].check()
