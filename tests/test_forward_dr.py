"""VS-DR, the TTL of forwarded packets, and the forwarding method bound per
conn: a table of frames for both engines (docs/engine.md steps 10-14, "The
ICMP path").

The director of test_engine_answers, with engine_kit's DR services: VIP:82
(TCP and UDP) to RIP2:82 by DR, VIP:86 to a DR dest whose MAC is unknown,
VIP:87 to a DR dest not on a connected network (DEST_F_NO_ROUTE), VIP:88 to
a Tun dest (not forwarded yet). A DR frame leaves as it came but for the
TTL and the Ethernet header (the real server's MAC, from the director's
MAC on its network); a NAT frame also one hop older.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, IPOption
from scapy.layers.l2 import Ether
from scapy.packet import raw

from engine_kit import (CIP, CLIENT_PORT, IMPLS, LMAC, RIP, RIP2, RMAC, RS_PORT, SMAC, VIP,
                        CMAC, Env, build_tables, icmp_error_for, partial_vnet, tcp, tcp_out, udp,
                        udp_out, v)
from pylvs.engine import states, tables
from test_engine_answers import (BIG, DIP_S, DROP, EMIT, NET, PASS, ROUTER, SYN, TX, Row,
                                 counts, icmp_about, icmp_fwd, ip_fragments, ip_of, net, run_row,
                                 sysctl)

DR_PORT = 82
NOPS = [IPOption(b"\x01\x01\x01\x00")]


def dr_in(**kw) -> bytes:
    """A client's TCP frame to the DR service VIP:82."""
    return tcp(dport=DR_PORT, **kw)


def dr_out(**kw) -> bytes:
    """dr_in's frame as it leaves toward the real server."""
    return tcp_out(dport=DR_PORT, smac=SMAC, dmac=RMAC, **kw)


DR_SYN = (v(dr_in()), CLIENT_PORT, 0.0)
DR_ACK = (v(dr_in(flags="A")), CLIENT_PORT, 0.0)
NO_ROUTE_SYN = (v(tcp(dport=87)), CLIENT_PORT, 0.0)
TUN_SYN = (v(tcp(dport=88)), CLIENT_PORT, 0.0)
# What a DR real server sends the client (from the VIP, not through the director).
DR_REPLY = ip_of(tcp(src=VIP, dst=CIP, sport=DR_PORT, dport=1000, flags="PA", payload=b"y" * 64))


def reply(ttl: int, **kw) -> bytes:
    """A NAT real server's reply to the client (RIP:8080 -> CIP:1000)."""
    return tcp(src=RIP, dst=CIP, sport=8080, dport=1000, smac=RMAC, dmac=SMAC, flags="A",
               ttl=ttl, **kw)


def reply_out(ttl: int) -> bytes:
    """reply() as it leaves toward the client."""
    return tcp(src=VIP, dst=CIP, sport=80, dport=1000, smac=LMAC, dmac=CMAC, flags="A", ttl=ttl)


def time_exceeded(frame: bytes, src: str) -> bytes:
    return icmp_error_for(frame, 11, 0, src)


TE = ("drop_ttl", "icmp_time_exceeded_sent", "emit_frames")

ROWS = [
    # --- VS-DR -----------------------------------------------------------------------
    Row("dr syn: the ip packet unchanged but the ttl, to the real server's mac",
        v(dr_in()), CLIENT_PORT, TX, counts("tx_frames", "conns_created"),
        expect=v(dr_out()), out_port=RS_PORT),
    Row("dr established ack", v(dr_in(flags="A", seq=1001, ack=77)), CLIENT_PORT, TX,
        counts("tx_frames"), expect=v(dr_out(flags="A", seq=1001, ack=77)), out_port=RS_PORT,
        before=[DR_SYN]),
    Row("dr data with ip options and ethernet padding",
        v(dr_in(flags="PA", payload=b"GET /", options=NOPS) + b"\xaa" * 6),
        CLIENT_PORT, TX, counts("tx_frames", "ip_options"),
        expect=v(dr_out(flags="PA", payload=b"GET /", options=NOPS) + b"\xaa" * 6),
        out_port=RS_PORT, before=[DR_SYN, DR_ACK]),
    Row("dr fin", v(dr_in(flags="FA")), CLIENT_PORT, TX, counts("tx_frames"),
        expect=v(dr_out(flags="FA")), out_port=RS_PORT, before=[DR_SYN, DR_ACK]),
    Row("dr udp", v(udp(dport=DR_PORT)), CLIENT_PORT, TX, counts("tx_frames", "conns_created"),
        expect=v(udp_out(dport=DR_PORT, smac=SMAC, dmac=RMAC)), out_port=RS_PORT),
    Row("dr partial checksum is completed, vnet flags cleared",
        partial_vnet(dr_in(flags="PA", payload=b"x" * 33)), CLIENT_PORT, TX,
        counts("tx_frames", "csum_partial_fixed"),
        expect=v(dr_out(flags="PA", payload=b"x" * 33), csum_start=34, csum_offset=16),
        out_port=RS_PORT, before=[DR_SYN]),
    Row("dr gso frame keeps its partial sum (no address changed)",
        partial_vnet(dr_in(flags="PA", payload=BIG * 2), gso_type=tables.VNET_GSO_TCPV4,
                     gso_size=1448), CLIENT_PORT, TX, counts("tx_frames", "gso_frames"),
        expect=partial_vnet(dr_out(flags="PA", payload=BIG * 2), gso_type=tables.VNET_GSO_TCPV4,
                            gso_size=1448), out_port=RS_PORT, before=[DR_SYN]),
    Row("dr dest not resolved: dropped after the conn is made", v(tcp(dport=86)), CLIENT_PORT,
        DROP, counts("drop_unresolved", "conns_created")),
    Row("dr dest not on a connected network: drop_no_route", v(tcp(dport=87)), CLIENT_PORT,
        DROP, counts("drop_no_route", "conns_created")),
    Row("an ip fragment to the dr service is dropped", v(raw(
        Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP, flags="MF") / TCP(dport=DR_PORT))),
        CLIENT_PORT, DROP, counts("drop_fragment"), before=[DR_SYN]),
    Row("a dr reply sent through the director is not matched: no OUT key",
        v(tcp(src=RIP2, dst=CIP, sport=DR_PORT, dport=1000, smac=RMAC, dmac=SMAC, flags="SA")),
        RS_PORT, PASS, counts("pass_not_ours"), before=[DR_SYN]),
    Row("a tun reply through the director is not matched: no OUT key",
        v(tcp(src=RIP2, dst=CIP, sport=88, dport=1000, smac=RMAC, dmac=SMAC, flags="SA")),
        RS_PORT, PASS, counts("pass_not_ours"), before=[TUN_SYN]),
    # --- DR and the path MTU -------------------------------------------------------------
    Row("dr DF and too big: frag-needed from the vip",
        v(dr_in(flags="PA", payload=BIG, ip_flags="DF")), CLIENT_PORT, DROP,
        counts("drop_frag_needed", "icmp_frag_needed_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, icmp_error_for(
            tcp_out(dport=DR_PORT, flags="PA", payload=BIG, ip_flags="DF"), 3, 4, VIP,
            mtu=1280))],
        before=[net(mtu_rs=1280), DR_SYN]),
    Row("dr DF clear and too big: fragments of the packet one hop older",
        v(udp(dport=DR_PORT, payload=BIG)), CLIENT_PORT, EMIT,
        counts("tx_fragmented", "conns_created", "frag_out", "frag_out", "emit_frames",
               "emit_frames"),
        expect=v(udp_out(dport=DR_PORT, smac=SMAC, dmac=RMAC, payload=BIG)),
        emitted=[(RS_PORT, f) for f in ip_fragments(
            udp_out(dport=DR_PORT, smac=SMAC, dmac=RMAC, payload=BIG), 1280)],
        before=[net(mtu_rs=1280)]),
    # --- TTL ------------------------------------------------------------------------------
    Row("nat in, ttl 1: time exceeded from the vip", v(tcp(flags="A", ttl=1)), CLIENT_PORT,
        DROP, counts(*TE), emitted=[(CLIENT_PORT, time_exceeded(tcp(flags="A", ttl=1), VIP))],
        before=[SYN]),
    Row("nat in, ttl 0", v(tcp(flags="A", ttl=0)), CLIENT_PORT, DROP, counts(*TE),
        emitted=[(CLIENT_PORT, time_exceeded(tcp(flags="A", ttl=0), VIP))], before=[SYN]),
    Row("nat in, ttl 1 on a syn: the conn is made, the packet is not sent",
        v(tcp(ttl=1)), CLIENT_PORT, DROP, counts("conns_created", *TE),
        emitted=[(CLIENT_PORT, time_exceeded(tcp(ttl=1), VIP))]),
    Row("nat in, ttl 2 leaves with ttl 1", v(tcp(flags="A", ttl=2)), CLIENT_PORT, TX,
        counts("tx_frames"), expect=v(tcp(dst=RIP, dport=8080, smac=SMAC, dmac=RMAC, flags="A",
                                          ttl=1)), out_port=RS_PORT, before=[SYN]),
    Row("nat out, ttl 1: time exceeded from the in port's address", v(reply(1)), RS_PORT, DROP,
        counts(*TE), emitted=[(RS_PORT, time_exceeded(reply(1), DIP_S))], before=[NET, SYN]),
    Row("nat out, ttl 0, no ports table: time exceeded from the vip", v(reply(0)), RS_PORT,
        DROP, counts(*TE), emitted=[(RS_PORT, time_exceeded(reply(0), VIP))], before=[SYN]),
    Row("nat out, ttl 2 leaves with ttl 1", v(reply(2)), RS_PORT, TX, counts("tx_frames"),
        expect=v(reply_out(1)), out_port=CLIENT_PORT, before=[SYN]),
    Row("dr, ttl 1: time exceeded from the vip", v(dr_in(flags="A", ttl=1)), CLIENT_PORT, DROP,
        counts(*TE), emitted=[(CLIENT_PORT, time_exceeded(dr_in(flags="A", ttl=1), VIP))],
        before=[DR_SYN]),
    Row("dr, ttl 2 leaves with ttl 1", v(dr_in(flags="A", ttl=2)), CLIENT_PORT, TX,
        counts("tx_frames"), expect=v(tcp(dport=DR_PORT, smac=SMAC, dmac=RMAC, flags="A", ttl=1)),
        out_port=RS_PORT, before=[DR_SYN]),
    Row("time exceeded takes a token of the icmp rate limit", v(tcp(flags="A", ttl=1)),
        CLIENT_PORT, DROP, counts("drop_ttl", "icmp_ratelimited"),
        before=[sysctl(icmp_msgs_per_sec=0, icmp_msgs_burst=0), SYN]),
    Row("ttl before the MTU: ttl 1, DF and too big gets time exceeded",
        v(tcp(flags="PA", payload=BIG, ip_flags="DF", ttl=1)), CLIENT_PORT, DROP, counts(*TE),
        emitted=[(CLIENT_PORT, time_exceeded(tcp(flags="PA", payload=BIG, ip_flags="DF", ttl=1),
                                             VIP))], before=[net(mtu_rs=1280), SYN]),
    Row("ttl before the neighbour: ttl 1 to an unresolved dest gets time exceeded",
        v(tcp(dport=86, ttl=1)), CLIENT_PORT, DROP, counts("conns_created", *TE),
        emitted=[(CLIENT_PORT, time_exceeded(tcp(dport=86, ttl=1), VIP))]),
    Row("the route before the ttl: ttl 1 to a no-route dest", v(tcp(dport=87, ttl=1)),
        CLIENT_PORT, DROP, counts("drop_no_route", "conns_created")),
    # --- ICMP errors about DR conns ---------------------------------------------------------
    Row("frag-needed from a client-side router about a dr reply reaches the real server",
        v(icmp_about(ROUTER, VIP, DR_REPLY, mtu=1280)), CLIENT_PORT, TX,
        counts("tx_frames", "icmp_forwarded"),
        expect=v(icmp_fwd(ROUTER, VIP, DR_REPLY, mtu=1280, src_mac=SMAC, dst_mac=RMAC)),
        out_port=RS_PORT, before=[DR_SYN]),
    Row("an icmp error about a dr conn with ttl 1 is dropped, never answered",
        v(icmp_about(ROUTER, VIP, DR_REPLY, mtu=1280, ttl=1)), CLIENT_PORT, DROP,
        counts("drop_ttl"), before=[DR_SYN]),
    Row("an icmp error about a conn of a no-route dr dest", v(icmp_about(
        ROUTER, VIP, ip_of(tcp(src=VIP, dst=CIP, sport=87, dport=1000)))), CLIENT_PORT, DROP,
        counts("drop_no_route"), before=[NO_ROUTE_SYN]),
    Row("an icmp error from the dr real server's side is not matched: no OUT key", v(icmp_about(
        RIP2, CIP, ip_of(dr_in()), code=3, src_mac=RMAC, dst_mac=SMAC)), RS_PORT, PASS,
        counts("pass_not_ours"), before=[DR_SYN]),
    Row("an icmp error about a nat conn with ttl 1 is dropped, never answered",
        v(icmp_about(ROUTER, VIP, ip_of(tcp(src=VIP, dst=CIP, sport=80, dport=1000)), ttl=1)),
        CLIENT_PORT, DROP, counts("drop_ttl"), before=[SYN]),
    Row("an icmp error from the nat real server's side with ttl 1", v(icmp_about(
        RIP, CIP, ip_of(tcp(dst=RIP, dport=8080)), code=3, src_mac=RMAC, dst_mac=SMAC, ttl=1)),
        RS_PORT, DROP, counts("drop_ttl"), before=[SYN]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", ROWS, ids=[r.desc for r in ROWS])
def test_row(row: Row, impl: str) -> None:
    run_row(row, impl)


# --- the state table a conn follows is bound with its method ------------------------------

S = states
NAT_DEST, DR_DEST = 0, 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dport, dest, flags, want", [
    # NAT: INPUT (a client FIN on ESTABLISHED is CLOSE_WAIT: the server may still send)
    (80, NAT_DEST, ["S", "A", "FA", "FA"], [S.SYN_RECV, S.ESTABLISHED, S.CLOSE_WAIT, S.CLOSE_WAIT]),
    # DR: INPUT_ONLY, the director sees one side only (FIN_WAIT, as the kernel)
    (DR_PORT, DR_DEST, ["S", "A", "FA", "FA"], [S.SYN_RECV, S.ESTABLISHED, S.FIN_WAIT, S.FIN_WAIT]),
    (80, NAT_DEST, ["S", "A", "R"], [S.SYN_RECV, S.ESTABLISHED, S.CLOSE]),
    (DR_PORT, DR_DEST, ["S", "A", "A", "R"], [S.SYN_RECV, S.ESTABLISHED, S.ESTABLISHED, S.CLOSE]),
], ids=["nat-fin", "dr-fin", "nat-rst", "dr-rst"])
def test_state_table_bound_with_the_method(impl, dport, dest, flags, want):
    env = Env(impl)
    timeouts = states.timeout_array()
    for i, (f, state) in enumerate(zip(flags, want)):
        now = float(i)
        verdict, _, _ = env.send(v(tcp(dport=dport, flags=f)), CLIENT_PORT, now)
        assert verdict == TX
        c = env.conn()
        assert c[7] == state, (f, states.STATE_NAMES[c[7]])
        assert c[8] == now + timeouts[state]
        active = int(env.counters.dest_conns[dest, tables.ACTIVE])
        assert active == (1 if state in S.ACTIVE else 0)
        assert active + int(env.counters.dest_conns[dest, tables.INACTIVE]) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_running_conns_keep_the_method_they_were_bound_to(impl):
    """-e changing a dest's method applies to new conns only (issue 6, 2.3)."""
    env = Env(impl)
    env.send(*DR_SYN)
    svc, dst = build_tables()
    dst[DR_DEST]["fwd"] = tables.FWD_MASQ
    env.engine.set_tables(svc, dst)
    verdict, port, out = env.send(v(dr_in(flags="A")), CLIENT_PORT, 1.0)
    assert (verdict, port, out) == (TX, RS_PORT, v(dr_out(flags="A")))
    assert env.conn()[9] == tables.FWD_ROUTE
    # a new conn of the same dest is NAT now: rewritten to RIP2:82, with an OUT key
    verdict, _, out = env.send(v(dr_in(sport=2000)), CLIENT_PORT, 1.0)
    assert out == v(tcp_out(dst=RIP2, sport=2000, dport=DR_PORT, smac=SMAC, dmac=RMAC))
    assert env.conn(cport=2000)[9] == tables.FWD_MASQ
    back = v(tcp(src=RIP2, dst=CIP, sport=DR_PORT, dport=2000, smac=RMAC, dmac=SMAC, flags="SA"))
    assert env.send(back, RS_PORT, 1.0)[0] == TX


def test_dr_conns_have_one_index_key():
    """C: the index holds an IN key per conn and an OUT key per NAT conn only;
    removing conns of both kinds leaves it consistent (Engine._check)."""
    env = Env("c")
    for sport in range(1000, 1010):
        env.send(v(tcp(sport=sport)), CLIENT_PORT, 0.0)        # NAT
        env.send(v(dr_in(sport=sport)), CLIENT_PORT, 0.0)      # DR
        env.send(v(tcp(dport=88, sport=sport)), CLIENT_PORT, 0.0)  # Tun
    assert env.engine.conn_count == 30
    env.engine._check()
    assert env.engine.expire(1000.0, 64) == 30
    env.engine._check()
    assert env.engine.conn_count == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_dr_conns_at_the_limit(impl):
    """A DR conn is never answered through the director: half-open it gives
    way at the limit (class 0); ESTABLISHED (the client's ACK, INPUT_ONLY) it
    does not."""
    env = Env(impl, capacity=1)
    env.send(*DR_SYN)
    verdict, _, _ = env.send(v(dr_in(sport=1001)), CLIENT_PORT, 1.0)
    assert verdict == TX
    assert env.counters.stat("conns_evicted") == 1
    assert [c[2] for c in env.engine.conns()] == [1001]
    env.send(v(dr_in(sport=1001, flags="A")), CLIENT_PORT, 1.0)
    verdict, _, _ = env.send(v(dr_in(sport=1002)), CLIENT_PORT, 2.0)
    assert verdict == DROP and env.counters.stat("drop_table_full") == 1
