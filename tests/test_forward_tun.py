"""VS-Tun in the engine, both engines: IPIP and GUE encapsulation of client
packets (kernel ip_vs_tunnel_xmit), GSO frames cut into segments first,
the tunnel's MTU, DF-clear packets fragmented before encapsulation.

The world is engine_kit's: service VIP:88 (slot 11) has one Tun dest,
RIP2:88 (dest 13, IPIP unless a row changes it). Encapsulated frames leave
on the real-server port from SMAC to RMAC; expected frames are built with
scapy from the kernel's rules (outer TOS and DF copied from the inner
header, TTL = the inner TTL after the decrement, IP ID from the engine's
counter).
"""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from engine_kit import (CIP, CLIENT_PORT, CMAC, FIRST_ICMP_ID, IMPLS, LMAC, RIP, RIP2, RMAC,
                        RS_PORT, SMAC, VIP, Env, build_tables, icmp_error_for, ip, partial_vnet,
                        tcp, tcp_out, udp, v)
from pylvs.engine import tables
from pylvs.engine.checksum import ones_sum
from test_engine_answers import (BIG, DIP_C, DIP_S, DROP, EMIT, NET, PASS, ROUTER, Row,
                                 _bad_ip_csum, counts, icmp_about, ip_fragments, ip_of, net,
                                 run_row)

TUN_PORT = 88
TUN_DEST = 13
GUE_PORT = 6080


def tun_in(**kw) -> bytes:
    return tcp(dport=TUN_PORT, **kw)


def gue_sport(caddr: str = CIP, cport: int = 1000) -> int:
    a = int.from_bytes(bytes(int(x) for x in caddr.split(".")), "big")
    return 32768 + (((a * 0x9E3779B1) ^ (cport * 0x85EBCA6B)) & 0xFFFFFFFF) % 28232


def encap(inner_eth: bytes, src: str = VIP, ip_id: int = FIRST_ICMP_ID, gue: bool = False,
          csum: bool = False) -> bytes:
    """The frame the engine must make of an Ethernet frame whose IP packet
    (TTL already decremented) goes to the Tun dest."""
    inner = Ether(inner_eth)[IP]
    outer = IP(src=src, dst=RIP2, id=ip_id, ttl=inner.ttl, tos=inner.tos,
               flags="DF" if inner.flags.DF else 0, proto=17 if gue else 4)
    body = raw(inner)
    if gue:
        u = UDP(sport=gue_sport(), dport=GUE_PORT) / Raw(b"\x00\x04\x00\x00" + body)
        if not csum:
            u.chksum = 0
        p = Ether(src=SMAC, dst=RMAC) / outer / u
    else:
        p = Ether(src=SMAC, dst=RMAC) / outer / Raw(body)
    return tables.with_vnet(raw(p))


def gue(csum: bool):
    """A `before` step: the Tun dest speaks GUE to GUE_PORT (--tun-csum or not)."""
    def setup(env: Env) -> None:
        svc, dst = build_tables()
        dst[TUN_DEST]["tun_type"] = 1
        dst[TUN_DEST]["tun_flags"] = 1 if csum else 0
        dst[TUN_DEST]["tun_port"] = GUE_PORT
        env.engine.set_tables(svc, dst)
    return setup


def gre(env: Env) -> None:
    svc, dst = build_tables()
    dst[TUN_DEST]["tun_type"] = 2
    env.engine.set_tables(svc, dst)


def edited_to_unreachable_dr(env: Env) -> None:
    """A `before` step: `-e` made the Tun dest a DR dest, and the balancer
    flags it DEST_F_NO_ROUTE (it is not on a connected network)."""
    svc, dst = build_tables()
    dst[TUN_DEST]["fwd"] = tables.FWD_ROUTE
    dst[TUN_DEST]["flags"] |= tables.DEST_F_NO_ROUTE
    env.engine.set_tables(svc, dst)


TUN = ("tx_tunneled", "emit_frames")


def ttl_minus_one(eth_frame: bytes) -> bytes:
    p = Ether(eth_frame)
    p[IP].ttl -= 1
    del p[IP].chksum
    return raw(p)


# A client-side router's frag-needed about a reply the Tun real server sent
# the client straight (VIP:88 -> CIP:1000).
TUN_REPLY = ip_of(tcp(src=VIP, dst=CIP, sport=TUN_PORT, dport=1000, flags="PA", payload=b"z" * 40))
ROUTER_ICMP = icmp_about(ROUTER, VIP, TUN_REPLY, mtu=1280)

ROWS = [
    Row("tun syn: IPIP from the VIP (no port address known) to the RIP", v(tun_in()),
        CLIENT_PORT, EMIT, counts(*TUN, "conns_created"), expect=v(tcp_out(dport=TUN_PORT)),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT)))]),
    Row("tun: the outer source is the egress port's address", v(tun_in(flags="A")),
        CLIENT_PORT, EMIT, counts(*TUN), expect=v(tcp_out(dport=TUN_PORT, flags="A")),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT, flags="A"), src=DIP_S, ip_id=FIRST_ICMP_ID + 1))],
        before=[NET, (v(tun_in()), CLIENT_PORT, 0.0)]),
    Row("tun: TOS and DF copied to the outer header",
        v(tun_in(flags="S", ip_flags="DF", tos=0x28)), CLIENT_PORT, EMIT,
        counts(*TUN, "conns_created"),
        expect=v(tcp_out(dport=TUN_PORT, flags="S", ip_flags="DF", tos=0x28)),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT, flags="S", ip_flags="DF",
                                         tos=0x28)))]),
    Row("tun: gue with a udp checksum", v(tun_in()), CLIENT_PORT, EMIT,
        counts(*TUN, "conns_created"), expect=v(tcp_out(dport=TUN_PORT)),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT), gue=True, csum=True))],
        before=[gue(csum=True)]),
    Row("tun: gue without a udp checksum", v(tun_in()), CLIENT_PORT, EMIT,
        counts(*TUN, "conns_created"), expect=v(tcp_out(dport=TUN_PORT)),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT), gue=True))],
        before=[gue(csum=False)]),
    Row("tun: a partial checksum is completed before encapsulation",
        partial_vnet(tun_in(flags="PA", payload=b"abc")), CLIENT_PORT, EMIT,
        counts(*TUN, "csum_partial_fixed"),
        # Only the vnet flags byte is cleared (docs/engine.md).
        expect=b"\0" + partial_vnet(tun_in(flags="PA", payload=b"abc"))[1:10]
        + tcp_out(dport=TUN_PORT, flags="PA", payload=b"abc"),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT, flags="PA", payload=b"abc"),
                                 ip_id=FIRST_ICMP_ID + 1))],
        before=[(v(tun_in()), CLIENT_PORT, 0.0)]),
    Row("tun: DF and too big for the tunnel: frag-needed with the MTU less 20",
        v(tun_in(flags="PA", payload=BIG, ip_flags="DF")), CLIENT_PORT, DROP,
        counts("drop_frag_needed", "icmp_frag_needed_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, icmp_error_for(
            tcp_out(dport=TUN_PORT, flags="PA", payload=BIG, ip_flags="DF"), 3, 4, VIP,
            ip_id=FIRST_ICMP_ID + 1, mtu=1400 - 20))],
        before=[net(mtu_rs=1400), (v(tun_in()), CLIENT_PORT, 0.0)]),
    Row("tun: gue takes 32 bytes of the MTU",
        v(tun_in(flags="PA", payload=BIG[:1350], ip_flags="DF")), CLIENT_PORT, DROP,
        counts("drop_frag_needed", "icmp_frag_needed_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, icmp_error_for(
            tcp_out(dport=TUN_PORT, flags="PA", payload=BIG[:1350], ip_flags="DF"), 3, 4, VIP,
            ip_id=FIRST_ICMP_ID + 1, mtu=1400 - 32))],
        before=[net(mtu_rs=1400), gue(csum=False), (v(tun_in()), CLIENT_PORT, 0.0)]),
    Row("tun: a packet that fits the MTU with the tunnel's 20 bytes",
        v(tun_in(flags="PA", payload=BIG[:1340], ip_flags="DF")), CLIENT_PORT, EMIT,
        counts(*TUN),
        expect=v(tcp_out(dport=TUN_PORT, flags="PA", payload=BIG[:1340], ip_flags="DF")),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT, flags="PA", payload=BIG[:1340],
                                         ip_flags="DF"), src=DIP_S, ip_id=FIRST_ICMP_ID + 1))],
        before=[net(mtu_rs=1400), (v(tun_in()), CLIENT_PORT, 0.0)]),
    Row("tun: ttl 1 is answered with time exceeded", v(tun_in(ttl=1)), CLIENT_PORT, DROP,
        counts("drop_ttl", "icmp_time_exceeded_sent", "emit_frames", "conns_created"),
        emitted=[(CLIENT_PORT, icmp_error_for(tun_in(ttl=1), 11, 0, VIP))]),
    Row("tun: no room in the emit area", v(tun_in()), CLIENT_PORT, DROP,
        counts("emit_overflow", "conns_created"), expect=v(tcp_out(dport=TUN_PORT)),
        before=[lambda env: setattr(env, "batch", tables.Batch(size=4, slot=4096,
                                                                emit_bytes=60))]),
    # Found end to end (tests/netns/test_fwd_methods.py): the running
    # conn's frames were counted as drop_no_route.
    Row("tun: a conn keeps its tunnel after -e turned its dest into an unreachable DR dest",
        v(tun_in(flags="A")), CLIENT_PORT, EMIT, counts(*TUN),
        expect=v(tcp_out(dport=TUN_PORT, flags="A")),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT, flags="A"), ip_id=FIRST_ICMP_ID + 1))],
        before=[(v(tun_in()), CLIENT_PORT, 0.0), edited_to_unreachable_dr]),
    Row("an icmp error about a tun conn goes through the tunnel to its real server",
        v(ROUTER_ICMP), CLIENT_PORT, EMIT, counts("icmp_forwarded", *TUN),
        expect=v(ttl_minus_one(ROUTER_ICMP)),
        emitted=[(RS_PORT, encap(ttl_minus_one(ROUTER_ICMP), ip_id=FIRST_ICMP_ID + 1))],
        before=[(v(tun_in()), CLIENT_PORT, 0.0)]),
    Row("a gre tunnel dest is not forwarded (not supported yet)", v(tun_in()), CLIENT_PORT, DROP,
        counts("drop_fwd_method", "conns_created"), before=[gre]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", ROWS, ids=[r.desc for r in ROWS])
def test_row(row: Row, impl: str) -> None:
    run_row(row, impl)


def _inner_packets(emitted: list[tuple[int, bytes]]) -> list:
    """The inner IP packets of IPIP frames, each checked: outer header
    checksum right, to the RIP, on the real-server port."""
    out = []
    for port, fr in emitted:
        assert port == RS_PORT
        p = Ether(fr[10:])
        o = p[IP]
        assert o.proto == 4 and o.dst == RIP2
        chk = o.chksum
        del o.chksum
        assert IP(raw(o)).chksum == chk
        out.append(IP(bytes(o.payload)))
    return out


@pytest.mark.parametrize("gso_size", [1440, 700])  # 1440 + 40 = the IPIP MTU of a 1500 link
def test_tun_gso_frame_leaves_as_encapsulated_segments(gso_size):
    """A 64 KiB-class GSO frame (veth offload) must reach the real server as
    valid packets: segmented, each with full checksums, then encapsulated;
    both engines byte for byte."""
    payload = bytes(random.Random(3).randrange(256) for _ in range(3900))
    frame = partial_vnet(tun_in(flags="PA", payload=payload, ip_flags="DF", seq=5000),
                         gso_type=tables.VNET_GSO_TCPV4, gso_size=gso_size)
    results = []
    for impl in IMPLS:
        env = Env(impl)
        env.engine.set_ports(net.__globals__["ports"](mtu_rs=1500))
        env.send(v(tun_in()), CLIENT_PORT, 0.0)
        verdict, _, _ = env.send(frame, CLIENT_PORT, 0.0)
        assert verdict == EMIT
        results.append(env.emitted)
        assert env.counters.stat("tx_tunneled") == 2
    assert results[0] == results[1]
    inner = _inner_packets(results[0])
    n = -(-len(payload) // gso_size)
    assert len(inner) == n
    got = b""
    for i, pkt in enumerate(inner):
        t = pkt[TCP]
        assert t.seq == 5000 + i * gso_size
        assert pkt.ttl == 63 and pkt.flags.DF
        for layer in (pkt, t):
            chk = layer.chksum
            del layer.chksum
        rebuilt = IP(raw(pkt))
        assert rebuilt.chksum == IP(bytes(results[0][i][1][10 + 14 + 20:])).chksum
        assert rebuilt[TCP].chksum == IP(bytes(results[0][i][1][10 + 14 + 20:]))[TCP].chksum
        got += bytes(t.payload)
    assert got == payload


def test_tun_df_clear_too_big_is_fragmented_then_encapsulated():
    """DF clear and too big for the tunnel: the inner packet is cut into IP
    fragments that each fit the MTU with the tunnel's headers, each
    encapsulated, so the real server reassembles the inner packet."""
    results = []
    for impl in IMPLS:
        env = Env(impl)
        env.engine.set_ports(net.__globals__["ports"](mtu_rs=1280))
        verdict, _, _ = env.send(v(udp(dport=TUN_PORT + 1000, payload=b"x")), CLIENT_PORT, 0.0)
        verdict, _, _ = env.send(v(tun_in(flags="S", payload=BIG)), CLIENT_PORT, 0.0)
        assert verdict == EMIT
        results.append(env.emitted)
        assert env.counters.stat("frag_out") == 2
    assert results[0] == results[1]
    frags = _inner_packets(results[0])
    assert len(frags) == 2
    assert all(len(raw(f)) + 20 <= 1280 for f in frags)
    assert frags[0].flags.MF and not frags[1].flags.MF
    whole = raw(frags[0])[20:] + raw(frags[1])[20:]
    assert whole == raw(Ether(tcp_out(dport=TUN_PORT, flags="S", payload=BIG))[IP])[20:]


# --- the tunnel's path MTU, learned from a router on the way (ip_vs_in_icmp) ---------
#
# A router between the director's real-server port (DIP_S) and RIP2 whose next
# link is smaller reports frag-needed about the OUTER packet to DIP_S. The
# engine learns the path MTU to RIP2 and tells the client the MTU less the
# tunnel's headers, from the VIP, quoting the inner packet as far as the
# router quoted it (Linux routers quote 576 - 28 bytes of the outer packet).

TUN_ROUTER = "192.168.1.77"
ROUTER_MAC = "02:00:00:00:01:77"
DATA = dict(flags="PA", payload=BIG[:1350], ip_flags="DF")  # 1390 bytes inside


def outer_sent(gue_: bool = False, **inner) -> bytes:
    """The outer IP packet the director sent RIP2 for a client packet (kw as tcp())."""
    return encap(tcp_out(**{"dport": TUN_PORT, **DATA, **inner}), src=DIP_S, gue=gue_)[10 + 14:]


def from_router(quoted: bytes, type_: int = 3, code: int = 4, mtu: int = 1400,
                dst: str = DIP_S, keep: int = 576 - 28) -> bytes:
    """The router's ICMP error to `dst` about `quoted` (cut to `keep` bytes)."""
    return v(icmp_about(TUN_ROUTER, dst, quoted[:keep], type_=type_, code=code, mtu=mtu,
                        src_mac=ROUTER_MAC, dst_mac=SMAC))


def to_client(mtu: int, ip_id: int, quoted: bytes, type_: int = 3, code: int = 4) -> bytes:
    """The frag-needed (or relayed error) the client gets: from the VIP, out
    of the port its conn came in on, to its MAC, quoting `quoted` (the inner
    packet's bytes)."""
    inner = IP(quoted[:20])
    icmp_ = ICMP(type=type_, code=code, nexthopmtu=mtu) if mtu else ICMP(type=type_, code=code)
    p = (Ether(src=LMAC, dst=CMAC)
         / IP(src=VIP, dst=CIP, id=ip_id, ttl=64, tos=(inner.tos & 0x1E) | 0xC0)
         / icmp_ / Raw(quoted))
    return tables.with_vnet(raw(p))


def inner_quote(gue_: bool = False, keep: int = 576 - 28, **inner) -> bytes:
    """The inner packet's bytes a router's quote of outer_sent() holds."""
    return outer_sent(gue_, **inner)[:keep][32 if gue_ else 20:]


def bad_icmp_csum(frame: bytes) -> bytes:
    b = bytearray(frame)
    b[10 + 14 + 20 + 2] ^= 0x5A
    return bytes(b)


SYN_DF = (v(tun_in(ip_flags="DF")), CLIENT_PORT, 0.0)
ACK_DF = (v(tun_in(flags="A", ip_flags="DF")), CLIENT_PORT, 0.0)
LEARN = (from_router(outer_sent()), RS_PORT, 0.0)
PMTU = ("tun_pmtu_learned",)
TOLD = ("icmp_frag_needed_sent", "emit_frames")
# The router's frame, in a row's before list, comes after the SYN (IP ID +0)
# and its answer takes ID +1.
ID_AFTER = FIRST_ICMP_ID + 2

PMTU_ROWS = [
    Row("tun pmtu: a router's frag-needed about an ipip packet is learned; the client is told "
        "the mtu less 20", from_router(outer_sent()), RS_PORT, PASS, counts(*PMTU, *TOLD),
        emitted=[(CLIENT_PORT, to_client(1400 - 20, FIRST_ICMP_ID + 1, inner_quote()))],
        before=[NET, SYN_DF]),
    Row("tun pmtu: gue: the client is told the mtu less 32",
        from_router(outer_sent(gue_=True)), RS_PORT, PASS, counts(*PMTU, *TOLD),
        emitted=[(CLIENT_PORT, to_client(1400 - 32, FIRST_ICMP_ID + 1,
                                         inner_quote(gue_=True)))],
        before=[NET, gue(csum=False), SYN_DF]),
    Row("tun pmtu: a quote of only the inner header and 8 bytes is enough",
        from_router(outer_sent(), keep=20 + 28), RS_PORT, PASS, counts(*PMTU, *TOLD),
        emitted=[(CLIENT_PORT, to_client(1380, FIRST_ICMP_ID + 1, inner_quote(keep=48)))],
        before=[NET, SYN_DF]),
    Row("tun pmtu: a later DF packet too big for the learned mtu is refused with it",
        v(tun_in(**DATA)), CLIENT_PORT, DROP, counts("drop_frag_needed", *TOLD),
        emitted=[(CLIENT_PORT, icmp_error_for(tcp_out(dport=TUN_PORT, **DATA), 3, 4, VIP, ip_id=ID_AFTER,
                                              mtu=1380))],
        before=[NET, SYN_DF, LEARN]),
    Row("tun pmtu: a later DF packet that fits the learned mtu goes through",
        v(tun_in(**{**DATA, "payload": BIG[:1340]})), CLIENT_PORT, EMIT, counts(*TUN),
        expect=v(tcp_out(dport=TUN_PORT, **{**DATA, "payload": BIG[:1340]})),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT, **{**DATA, "payload": BIG[:1340]}), src=DIP_S,
                                 ip_id=ID_AFTER))],
        before=[NET, SYN_DF, LEARN]),
    Row("tun pmtu: a later non-DF packet is fragmented to the learned mtu, then encapsulated",
        v(tun_in(flags="PA", payload=BIG)), CLIENT_PORT, EMIT,
        {**counts("tx_tunneled"), "emit_frames": 2, "frag_out": 2},
        expect=v(tcp_out(flags="PA", payload=BIG, dport=TUN_PORT)),
        emitted=[(RS_PORT, encap(fr[10:], src=DIP_S, ip_id=ID_AFTER + i))
                 for i, fr in enumerate(ip_fragments(tcp_out(flags="PA", payload=BIG,
                                                             dport=TUN_PORT), 1380))],
        before=[NET, SYN_DF, LEARN]),
    Row("tun pmtu: a gso frame whose segments exceed the learned mtu is refused with it",
        partial_vnet(tun_in(**{**DATA, "payload": BIG * 2}), gso_type=tables.VNET_GSO_TCPV4,
                     gso_size=1400),
        CLIENT_PORT, DROP, counts("drop_frag_needed", *TOLD),
        # The quote: the frame as it came (TCP checksum field still partial) but
        # for the TTL.
        emitted=[(CLIENT_PORT, icmp_error_for(
            partial_vnet(tcp_out(dport=TUN_PORT, **{**DATA, "payload": BIG * 2}))[10:], 3, 4, VIP,
            ip_id=ID_AFTER, mtu=1380))],
        before=[NET, SYN_DF, LEARN]),
    Row("tun pmtu: the learned mtu expires after 600 s (net.ipv4.route.mtu_expires)",
        v(tun_in(**DATA)), CLIENT_PORT, EMIT, counts(*TUN), now=600.0,
        expect=v(tcp_out(dport=TUN_PORT, **DATA)),
        emitted=[(RS_PORT, encap(tcp_out(dport=TUN_PORT, **DATA), src=DIP_S, ip_id=FIRST_ICMP_ID + 3))],
        before=[NET, SYN_DF, ACK_DF, LEARN]),
    Row("tun pmtu: ... and holds until then",
        v(tun_in(**DATA)), CLIENT_PORT, DROP, counts("drop_frag_needed", *TOLD), now=599.9,
        emitted=[(CLIENT_PORT, icmp_error_for(tcp_out(dport=TUN_PORT, **DATA), 3, 4, VIP,
                                              ip_id=FIRST_ICMP_ID + 3, mtu=1380))],
        before=[NET, SYN_DF, ACK_DF, LEARN]),
    Row("tun pmtu: a reported mtu below 552 is taken as 552 (net.ipv4.route.min_pmtu)",
        from_router(outer_sent(), mtu=300), RS_PORT, PASS, counts(*PMTU, *TOLD),
        emitted=[(CLIENT_PORT, to_client(552 - 20, FIRST_ICMP_ID + 1, inner_quote()))],
        before=[NET, SYN_DF]),
    Row("tun pmtu: a reported mtu of 0 (an old router) is taken as 552",
        from_router(outer_sent(), mtu=0), RS_PORT, PASS, counts(*PMTU, *TOLD),
        emitted=[(CLIENT_PORT, to_client(552 - 20, FIRST_ICMP_ID + 1, inner_quote()))],
        before=[NET, SYN_DF]),
    Row("tun pmtu: a reported mtu above the port's is no news: the client is told the port's",
        from_router(outer_sent(), mtu=9000), RS_PORT, PASS, counts(*PMTU, *TOLD),
        emitted=[(CLIENT_PORT, to_client(1500 - 20, FIRST_ICMP_ID + 1, inner_quote()))],
        before=[NET, SYN_DF]),
    Row("tun pmtu: a larger report does not raise a learned mtu",
        from_router(outer_sent(), mtu=1450), RS_PORT, PASS, counts(*PMTU, *TOLD),
        emitted=[(CLIENT_PORT, to_client(1400 - 20, ID_AFTER, inner_quote()))],
        before=[NET, SYN_DF, LEARN]),
    Row("tun pmtu: an inner packet without DF: learned, the client is not told",
        from_router(outer_sent(ip_flags=0)), RS_PORT, PASS, counts(*PMTU),
        before=[NET, SYN_DF]),
    Row("tun icmp: host unreachable about an outer packet is relayed to the client "
        "(ip_vs_in_icmp), about the inner packet",
        from_router(outer_sent(), code=1, mtu=0), RS_PORT, PASS,
        counts("tun_icmp_relayed", "icmp_unreach_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, to_client(0, FIRST_ICMP_ID + 1, inner_quote(), code=1))],
        before=[NET, SYN_DF]),
    Row("tun icmp: time exceeded about an outer packet is relayed to the client",
        from_router(outer_sent(), type_=11, code=0, mtu=0), RS_PORT, PASS,
        counts("tun_icmp_relayed", "icmp_time_exceeded_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, to_client(0, FIRST_ICMP_ID + 1, inner_quote(), type_=11, code=0))],
        before=[NET, SYN_DF]),
    Row("tun icmp: a relayed error keeps the router's word after the code (a gateway, a pointer)",
        from_router(outer_sent(), code=13, mtu=0x1234), RS_PORT, PASS,
        counts("tun_icmp_relayed", "icmp_unreach_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, to_client(0x1234, FIRST_ICMP_ID + 1, inner_quote(), code=13))],
        before=[NET, SYN_DF]),
    Row("tun icmp: an error about a tunnel packet of no conn is dropped, not relayed",
        from_router(outer_sent(sport=4444), code=1, mtu=0), RS_PORT, DROP,
        counts("drop_tun_icmp"), before=[NET, SYN_DF]),
    Row("tun pmtu: a quote of no conn is dropped",
        from_router(outer_sent(sport=4444)), RS_PORT, DROP, counts("drop_tun_icmp"),
        before=[NET, SYN_DF]),
    Row("tun pmtu: a quote of a conn to another real server is dropped",
        from_router(outer_sent()[:16] + ip(RIP).to_bytes(4, "big") + outer_sent()[20:]),
        RS_PORT, DROP, counts("drop_tun_icmp"), before=[NET, SYN_DF]),
    Row("tun pmtu: an inner packet cut short of its ports is dropped",
        from_router(outer_sent(), keep=20 + 24), RS_PORT, DROP, counts("drop_tun_icmp"),
        before=[NET, SYN_DF]),
    Row("tun pmtu: an outer header cut short is dropped",
        from_router(outer_sent(), keep=20), RS_PORT, DROP, counts("drop_tun_icmp"),
        before=[NET, SYN_DF]),
    Row("tun pmtu: an outer header whose IHL runs past the quote is dropped",
        from_router(b"\x4f" + outer_sent()[1:40]), RS_PORT, DROP, counts("drop_tun_icmp"),
        before=[NET, SYN_DF]),
    Row("tun pmtu: garbage after the outer header is dropped",
        from_router(outer_sent()[:20] + bytes(range(64))), RS_PORT, DROP,
        counts("drop_tun_icmp"), before=[NET, SYN_DF]),
    Row("tun pmtu: a wrong icmp checksum is dropped", bad_icmp_csum(from_router(outer_sent())),
        RS_PORT, DROP, counts("drop_tun_icmp"), before=[NET, SYN_DF]),
    Row("tun pmtu: an error about a director's udp packet that is not gue is the kernel's",
        from_router(ip_of(udp(src=DIP_S, dst=RIP2, sport=5000, dport=53))), RS_PORT, PASS,
        counts("pass_not_ours"), before=[NET, SYN_DF]),
    Row("tun pmtu: an error to another address than the quoted source is the kernel's",
        from_router(outer_sent(), dst=DIP_C), RS_PORT, PASS, counts("pass_not_ours"),
        before=[NET, SYN_DF]),
    Row("tun pmtu: an ipip quote from an address not the director's is the kernel's",
        from_router(encap(tcp_out(dport=TUN_PORT, **DATA), src=TUN_ROUTER)[24:], dst=TUN_ROUTER), RS_PORT,
        PASS, counts("pass_not_ours"), before=[NET, SYN_DF]),
    Row("tun pmtu: a frag-needed with a bad ip header checksum is refused as any frame",
        v(_bad_ip_csum(icmp_about(TUN_ROUTER, DIP_S, outer_sent()[:548], mtu=1400,
                                       src_mac=ROUTER_MAC, dst_mac=SMAC))),
        RS_PORT, DROP, counts("drop_bad_ip_csum"), before=[NET, SYN_DF]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", PMTU_ROWS, ids=[r.desc for r in PMTU_ROWS])
def test_pmtu_row(row: Row, impl: str) -> None:
    run_row(row, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_pmtu_is_per_real_server_and_a_colliding_one_takes_the_slot(impl):
    """The learned MTU is RIP2's only; a RIP whose cache slot is RIP2's
    (192.168.1.236: (addr * 0x9E3779B1 mod 2^32) >> 24 = 174 for both)
    replaces RIP2's entry, and RIP2 falls back to the port MTU."""
    from engine_kit import SERVICES, DESTS, RESOLVED
    rip_far, rip_slot = "192.168.1.4", "192.168.1.236"
    services = {**SERVICES, 12: (tables.PROTO_TCP, VIP, 89), 13: (tables.PROTO_TCP, VIP, 90)}
    dests = {**DESTS, 14: (12, rip_far, 89, tables.FWD_TUNNEL, RESOLVED),
             15: (13, rip_slot, 90, tables.FWD_TUNNEL, RESOLVED)}
    env = Env(impl, services=services, dests=dests,
              schedule=lambda svc, caddr, cport: {11: 13, 12: 14, 13: 15}[svc])
    NET(env)

    def data(port: int) -> bytes:
        return v(tcp(dport=port, **DATA))

    def report(port: int, rip: str, mtu: int) -> bytes:
        outer = encap(tcp_out(dport=port, **DATA), src=DIP_S)[24:]
        outer = outer[:16] + ip(rip).to_bytes(4, "big") + outer[20:]
        return from_router(outer, mtu=mtu)

    for port in (TUN_PORT, 89, 90):
        env.send(v(tcp(dport=port, ip_flags="DF")), CLIENT_PORT, 0.0)
    assert env.send(report(TUN_PORT, RIP2, 1400), RS_PORT)[0] == PASS
    assert env.send(data(TUN_PORT))[0] == DROP      # 1390 > 1400 - 20
    assert env.send(data(89))[0] == EMIT            # another RIP: the port's 1480
    assert env.send(report(90, rip_slot, 1300), RS_PORT)[0] == PASS
    assert env.send(data(90))[0] == DROP
    assert Ether(env.emitted[0][1][10:])[ICMP].nexthopmtu == 1280
    assert env.send(data(TUN_PORT))[0] == EMIT      # RIP2's entry was replaced
    assert env.counters.stat("tun_pmtu_learned") == 2


def _csum(data: bytes) -> bytes:
    """The Internet checksum of `data` (its checksum field zeroed first)."""
    return (~ones_sum(data) & 0xFFFF).to_bytes(2, "big")


def _fix_icmp_csum(frame: bytes) -> bytes:
    """The frame with its ICMP checksum made right again (so a changed quote
    reaches the checks past the checksum)."""
    b = bytearray(frame)
    at = 10 + 14 + (b[10 + 14] & 15) * 4
    if len(b) < at + 4:
        return frame
    b[at + 2:at + 4] = b"\0\0"
    b[at + 2:at + 4] = _csum(b[at:])
    return bytes(b)


@pytest.mark.parametrize("gue_", [False, True], ids=["ipip", "gue"])
def test_mangled_router_errors_agree_on_both_engines(gue_):
    """Routers' errors about tunnel packets, cut short or with a byte of the
    ICMP header or the quote changed (checksum made right again half the
    time): both engines give the same verdict, counters and frames, and
    neither raises."""
    rng = random.Random(61 + gue_)
    good = from_router(outer_sent(gue_=gue_))
    frames = []
    for _ in range(300):
        b = bytearray(good)
        if rng.random() < 0.3:
            b = b[:rng.randrange(10 + 14 + 20, len(b) + 1)]
            b[10 + 14 + 2:10 + 14 + 4] = (len(b) - 24).to_bytes(2, "big")
            b[10 + 14 + 10:10 + 14 + 12] = b"\0\0"
            b[10 + 14 + 10:10 + 14 + 12] = _csum(b[24:44])
        for _ in range(rng.randrange(1, 3)):
            i = rng.randrange(10 + 14 + 20, min(len(b), 10 + 14 + 20 + 8 + 32 + 44))
            b[i] = rng.randrange(256)
        frame = bytes(b)
        frames.append(_fix_icmp_csum(frame) if rng.random() < 0.5 else frame)
    results = []
    for impl in IMPLS:
        env = Env(impl)
        NET(env)
        if gue_:
            gue(csum=False)(env)
        env.send(*SYN_DF)
        got = []
        for f in frames:
            verdict, _, out = env.send(f, RS_PORT, 1.0)
            got.append((verdict, out, env.emitted, env.stats()))
        results.append(got)
    assert results[0] == results[1]
    final = results[0][-1][3]
    # The mutations reach every outcome: learned, refused as tunnel errors,
    # and left to the ordinary path.
    assert final["tun_pmtu_learned"] and final["drop_tun_icmp"] and final["pass_not_ours"], final
    assert final["tun_icmp_relayed"], final

