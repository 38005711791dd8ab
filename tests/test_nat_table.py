"""VS-NAT packet tests as a table (as Katran's fixtures), for both engines.

Each row: a frame (built with scapy behind a virtio_net_hdr), the port it
arrives on, the frame expected out (None: the input, untouched), the verdict
and the exact change of the global counters. ``before`` frames set up conns.
Every row runs on the reference ("python") and on the C engine ("c").
"""

from __future__ import annotations

import random

import numpy as np

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw, raw

from engine_kit import (CIP, CLIENT_PORT, CMAC, IMPLS, LMAC, RIP, RMAC, RS_PORT, SMAC,
                        VIP, VIP2, Env, Row, SchedError, UnraisableCatcher, build_tables,
                        delta, diff_bytes, icmp_error_for, ip, mangle, partial_vnet,
                        random_frame, rst_for, tcp, tcp_out, udp, udp_out, v)
from pylvs.engine import states, tables
from pylvs.engine.checksum import fold, ones_sum, pseudo_header_sum

TX, PASS, DROP = tables.V_TX, tables.V_PASS, tables.V_DROP
NEEDS_CSUM = tables.VNET_F_NEEDS_CSUM

# Frames that set up state for a row: (frame, in_port, now).
SYN = (v(tcp()), CLIENT_PORT, 0.0)
ACK = (v(tcp(flags="A")), CLIENT_PORT, 0.0)
UDP_Q = (v(udp()), CLIENT_PORT, 0.0)


# Client -> VIP and the same frame as it must leave toward the real server.
def c2s(**kw):
    return tcp(**kw)


def c2s_out(dport=8080, **kw):
    return tcp_out(dst=RIP, dport=dport, smac=SMAC, dmac=RMAC, **kw)


def s2c(flags="SA", **kw):
    return tcp(src=RIP, dst=CIP, sport=8080, dport=1000, smac=RMAC, dmac=SMAC, flags=flags, **kw)


def s2c_out(flags="SA", dmac=CMAC, **kw):
    return tcp_out(src=VIP, dst=CIP, sport=80, dport=1000, smac=LMAC, dmac=dmac, flags=flags, **kw)


def _udp_payload_for_ffff() -> bytes:
    """A query payload whose checksum, once rewritten to RIP:5353, computes to 0
    (so it must be sent as 0xFFFF)."""
    base = bytearray(b"pad.")
    out = udp(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, payload=bytes(base) + b"\0\0", chksum=0)
    seg = out[34:]
    s = fold(pseudo_header_sum(int.from_bytes(out[26:30], "big"), int.from_bytes(out[30:34], "big"),
                               17, len(seg)) + ones_sum(seg))
    w = (0xFFFF - s) % 0xFFFF
    return bytes(base) + w.to_bytes(2, "big")


FFFF_PAYLOAD = _udp_payload_for_ffff()

BIG = bytes(random.Random(7).randrange(256) for _ in range(3000))
PAD = b"\xaa" * 6


def _ip_patch(frame: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite bytes of the IPv4 header (offset from its start)."""
    at = 14 + offset
    return frame[:at] + value + frame[at + len(value):]


def _gone(env: Env) -> None:
    env.engine.set_tables(*build_tables(gone=(0,)))


def _sweep(env: Env) -> None:
    assert env.engine.expire(60.0, env.engine.capacity) == 1


def _shrunk(env: Env) -> None:
    env.engine.set_tables(build_tables()[0], tables.empty_dests(0))


def _dup_service(env: Env) -> None:
    svc, dst = build_tables()
    more = tables.empty_services(len(svc) + 1)
    more[:len(svc)] = svc
    more[len(svc)] = svc[0]   # the same service again in a later slot
    env.engine.set_tables(more, dst)


def _moved(env: Env) -> None:
    svc, dst = build_tables()
    dst[0]["svc"] = 1
    env.engine.set_tables(svc, dst)


ROWS = [
    # --- the NAT path ------------------------------------------------------
    Row("tcp syn to vip creates a conn, to rip:8080", v(c2s()), CLIENT_PORT,
        v(c2s_out()), TX, delta("tx_frames", "conns_created")),
    Row("tcp ack of a known conn", v(c2s(flags="A", seq=1001, ack=5001)), CLIENT_PORT,
        v(c2s_out(flags="A", seq=1001, ack=5001)), TX, delta("tx_frames"), before=[SYN]),
    Row("tcp data with payload", v(c2s(flags="PA", payload=b"GET / HTTP/1.0\r\n\r\n")), CLIENT_PORT,
        v(c2s_out(flags="PA", payload=b"GET / HTTP/1.0\r\n\r\n")), TX, delta("tx_frames"),
        before=[SYN]),
    Row("tcp segment without flags still forwarded", v(c2s(flags="")), CLIENT_PORT,
        v(c2s_out(flags="")), TX, delta("tx_frames"), before=[SYN]),
    Row("tcp syn-ack reply back to vip:80", v(s2c()), RS_PORT,
        v(s2c_out()), TX, delta("tx_frames"), before=[SYN]),
    Row("reply goes to the client's port and mac", v(s2c(flags="A")), RS_PORT,
        v(s2c_out(flags="A", dmac="02:00:00:00:00:77")), TX, delta("tx_frames"),
        before=[(v(tcp(smac="02:00:00:00:00:77")), 5, 0.0)], out_port=5),
    Row("udp query to vip:53 goes to rip:5353", v(udp()), CLIENT_PORT,
        v(udp_out(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC)), TX, delta("tx_frames", "conns_created")),
    Row("udp reply back to vip:53", v(udp(src=RIP, dst=CIP, sport=5353, dport=1000, smac=RMAC,
                                          dmac=SMAC, payload=b"answer")), RS_PORT,
        v(udp_out(src=VIP, dst=CIP, sport=53, dport=1000, smac=LMAC, dmac=CMAC, payload=b"answer")),
        TX, delta("tx_frames"), before=[UDP_Q]),
    Row("udp checksum 0 (none) stays 0", v(udp(chksum=0)), CLIENT_PORT,
        v(udp_out(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, chksum=0)), TX,
        delta("tx_frames", "conns_created")),
    Row("udp checksum that computes to 0 is sent as 0xffff", v(udp(payload=FFFF_PAYLOAD)),
        CLIENT_PORT, v(udp_out(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, payload=FFFF_PAYLOAD,
                           chksum=0xFFFF)), TX, delta("tx_frames", "conns_created")),
    Row("ethernet padding after total length is kept", v(c2s() + PAD), CLIENT_PORT,
        v(c2s_out() + PAD), TX, delta("tx_frames", "conns_created")),
    Row("udp with ethernet padding", v(udp(payload=b"q") + PAD), CLIENT_PORT,
        v(udp_out(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, payload=b"q") + PAD), TX,
        delta("tx_frames", "conns_created")),
    Row("ip options are forwarded unchanged and counted",
        v(c2s(options=[IPOption(b"\x01\x01\x01\x00")])), CLIENT_PORT,
        v(c2s_out(options=[IPOption(b"\x01\x01\x01\x00")])), TX,
        delta("tx_frames", "conns_created", "ip_options")),
    Row("ip options on the reply", v(s2c(options=[IPOption(b"\x07\x07\x04" + b"\0" * 5)])),
        RS_PORT, v(s2c_out(options=[IPOption(b"\x07\x07\x04" + b"\0" * 5)])), TX,
        delta("tx_frames", "ip_options"), before=[SYN]),
    Row("df flag is no fragment", v(c2s(ip_flags="DF")), CLIENT_PORT,
        v(c2s_out(ip_flags="DF")), TX, delta("tx_frames", "conns_created")),
    # --- checksum offload: partial sums and GSO -----------------------------
    Row("partial tcp checksum (tx offload) is completed, vnet flags cleared",
        partial_vnet(c2s(payload=b"x" * 33)), CLIENT_PORT,
        v(c2s_out(payload=b"x" * 33), flags=0, csum_start=34, csum_offset=16), TX,
        delta("tx_frames", "conns_created", "csum_partial_fixed")),
    Row("partial udp checksum is completed", partial_vnet(udp(payload=b"odd")), CLIENT_PORT,
        v(udp_out(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, payload=b"odd"), csum_start=34,
          csum_offset=6), TX, delta("tx_frames", "conns_created", "csum_partial_fixed")),
    Row("partial udp checksum computing to 0 is sent as 0xffff",
        partial_vnet(udp(payload=FFFF_PAYLOAD)), CLIENT_PORT,
        v(udp_out(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, payload=FFFF_PAYLOAD, chksum=0xFFFF),
          csum_start=34, csum_offset=6), TX,
        delta("tx_frames", "conns_created", "csum_partial_fixed")),
    Row("partial checksum of a reply from a local real server",
        partial_vnet(s2c(flags="PA", payload=b"HTTP/1.0 200 OK\r\n")), RS_PORT,
        v(s2c_out(flags="PA", payload=b"HTTP/1.0 200 OK\r\n"), csum_start=34, csum_offset=16), TX,
        delta("tx_frames", "csum_partial_fixed"), before=[SYN]),
    Row("partial checksum ignores ethernet padding", partial_vnet(c2s()[:54] + PAD), CLIENT_PORT,
        v(c2s_out() + PAD, csum_start=34, csum_offset=16), TX,
        delta("tx_frames", "conns_created", "csum_partial_fixed")),
    Row("gso tcp frame keeps a partial sum for the new addresses",
        partial_vnet(c2s(flags="PA", payload=BIG), gso_type=tables.VNET_GSO_TCPV4, gso_size=1448),
        CLIENT_PORT,
        partial_vnet(c2s_out(flags="PA", payload=BIG), gso_type=tables.VNET_GSO_TCPV4,
                     gso_size=1448), TX, delta("tx_frames", "gso_frames"), before=[SYN]),
    Row("gso reply keeps a partial sum", partial_vnet(s2c(flags="A", payload=BIG),
                                                       gso_type=tables.VNET_GSO_TCPV4, gso_size=1448),
        RS_PORT, partial_vnet(s2c_out(flags="A", payload=BIG), gso_type=tables.VNET_GSO_TCPV4,
                              gso_size=1448), TX, delta("tx_frames", "gso_frames"), before=[SYN]),
    # --- new conns: who may create one ---------------------------------------
    Row("tcp ack without a conn is dropped and answered with a rst", v(c2s(flags="A", ack=777)),
        CLIENT_PORT, None, DROP, delta("drop_no_conn", "rst_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, rst_for(c2s(flags="A", ack=777)))]),
    Row("tcp syn-ack without a conn: rst with seq = its ack", v(c2s(flags="SA", ack=99)),
        CLIENT_PORT, None, DROP, delta("drop_no_conn", "rst_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, rst_for(c2s(flags="SA", ack=99)))]),
    Row("tcp rst without a conn is dropped, never answered", v(c2s(flags="R")), CLIENT_PORT, None,
        DROP, delta("drop_no_conn")),
    Row("tcp syn+rst without a conn is dropped, never answered", v(c2s(flags="SR")), CLIENT_PORT,
        None, DROP, delta("drop_no_conn")),
    Row("tcp fin without a conn: rst|ack acking the fin", v(c2s(flags="F", payload=b"bye")),
        CLIENT_PORT, None, DROP, delta("drop_no_conn", "rst_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, rst_for(c2s(flags="F", payload=b"bye")))]),
    Row("tcp data without flags or a conn: rst|ack", v(c2s(flags="", payload=b"xy")),
        CLIENT_PORT, None, DROP, delta("drop_no_conn", "rst_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, rst_for(c2s(flags="", payload=b"xy")))]),
    Row("no service on the port: pass", v(c2s(dport=8888)), CLIENT_PORT, None, PASS,
        delta("pass_not_ours")),
    Row("no service on the address: pass", v(c2s(dst="10.0.0.50")), CLIENT_PORT, None, PASS,
        delta("pass_not_ours")),
    Row("udp without a service: pass", v(udp(dport=54)), CLIENT_PORT, None, PASS,
        delta("pass_not_ours")),
    Row("real server traffic without a conn: pass", v(s2c()), RS_PORT, None, PASS,
        delta("pass_not_ours")),
    Row("dest not resolved: dropped after the conn is made", v(c2s(dport=81)), CLIENT_PORT,
        None, DROP, delta("drop_unresolved", "conns_created")),
    Row("scheduler finds no dest: icmp port unreachable from the vip", v(c2s(dport=83)),
        CLIENT_PORT, None, DROP, delta("drop_no_dest", "icmp_unreach_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, icmp_error_for(c2s(dport=83), 3, 3, VIP))]),
    Row("scheduler raises: counted, reported, dropped", v(c2s(dport=84)), CLIENT_PORT, None, DROP,
        delta("sched_errors")),
    Row("scheduler answers another service's dest", v(c2s(dport=85)), CLIENT_PORT, None, DROP,
        delta("drop_no_dest", "icmp_unreach_sent", "emit_frames"),
        emitted=[(CLIENT_PORT, icmp_error_for(c2s(dport=85), 3, 3, VIP))]),
    Row("real server side already in use: conflict", v(c2s(dst=VIP2)), CLIENT_PORT, None, DROP,
        delta("drop_conflict"), before=[SYN]),
    Row("conn table full of established conns", v(c2s(sport=1001)), CLIENT_PORT, None, DROP,
        delta("drop_table_full"), before=[SYN, ACK], capacity=1),
    Row("conn table full: a half-open conn gives way", v(c2s(sport=1001)), CLIENT_PORT,
        v(c2s_out(sport=1001)), TX, delta("tx_frames", "conns_created", "conns_evicted"),
        before=[SYN], capacity=1),
    Row("a freed slot is used again", v(c2s(sport=1001)), CLIENT_PORT, v(c2s_out(sport=1001)), TX,
        delta("tx_frames", "conns_created"), before=[SYN, _sweep], capacity=1, now=60.0),
    Row("a full table: a dead conn gives way (counted as expired)", v(c2s(sport=1001)),
        CLIENT_PORT, v(c2s_out(sport=1001)), TX,
        delta("tx_frames", "conns_created", "conns_expired"), before=[SYN], capacity=1, now=60.0),
    Row("conn expired on lookup (expires <= now): ack has no conn", v(c2s(flags="A")),
        CLIENT_PORT, None, DROP, delta("drop_no_conn", "conns_expired", "rst_sent", "emit_frames"),
        before=[SYN], now=60.0, emitted=[(CLIENT_PORT, rst_for(c2s(flags="A")))]),
    Row("conn not yet expired just before its time", v(c2s(flags="A")), CLIENT_PORT,
        v(c2s_out(flags="A")), TX, delta("tx_frames"), before=[SYN], now=59.999),
    Row("expired conn: a new syn makes a new conn", v(c2s()), CLIENT_PORT, v(c2s_out()), TX,
        delta("tx_frames", "conns_created", "conns_expired"), before=[SYN], now=61.0),
    Row("expired conn: the reply has no conn", v(s2c()), RS_PORT, None, PASS,
        delta("pass_not_ours", "conns_expired"), before=[SYN], now=60.0),
    Row("dest deleted: its conns' packets dropped", v(c2s(flags="A")), CLIENT_PORT, None, DROP,
        delta("drop_dest_gone"), before=[SYN, _gone]),
    Row("dest slot now of another service: dropped", v(c2s(flags="A")), CLIENT_PORT, None, DROP,
        delta("drop_dest_gone"), before=[SYN, _moved]),
    Row("dest table shrunk below the conn's dest slot", v(c2s(flags="A")), CLIENT_PORT, None,
        DROP, delta("drop_dest_gone"), before=[SYN, _shrunk]),
    Row("a service listed twice: the lowest slot is scheduled", v(c2s()), CLIENT_PORT,
        v(c2s_out()), TX, delta("tx_frames", "conns_created"), before=[_dup_service]),
    Row("reply of a conn whose dest was deleted still goes out", v(s2c()), RS_PORT, v(s2c_out()),
        TX, delta("tx_frames"), before=[SYN, _gone]),
    # --- malformed and foreign frames ---------------------------------------
    Row("shorter than vnet + ethernet", v(c2s())[:23], CLIENT_PORT, None, DROP,
        delta("drop_truncated")),
    Row("ethernet header only", v(c2s())[:24], CLIENT_PORT, None, DROP, delta("drop_truncated")),
    Row("ip header cut at 19 bytes", v(c2s())[:43], CLIENT_PORT, None, DROP,
        delta("drop_truncated")),
    Row("arp", v(raw(Ether(src=CMAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=VIP))), CLIENT_PORT,
        None, PASS, delta("pass_not_ipv4")),
    Row("ipv6", v(raw(Ether(src=CMAC, dst=LMAC) / IPv6(dst="fd00::1") / TCP(dport=80))),
        CLIENT_PORT, None, PASS, delta("pass_not_ipv4")),
    Row("vlan-tagged ipv4", v(raw(Ether(src=CMAC, dst=LMAC) / Dot1Q(vlan=5) / IP(dst=VIP)
                                  / TCP(dport=80))), CLIENT_PORT, None, PASS,
        delta("pass_not_ipv4")),
    Row("ethertype ipv4 but version 6", v(_ip_patch(c2s(), 0, b"\x65")), CLIENT_PORT, None, DROP,
        delta("drop_bad_ip")),
    Row("ihl < 5", v(_ip_patch(c2s(), 0, b"\x44")), CLIENT_PORT, None, DROP, delta("drop_bad_ip")),
    Row("ihl beyond the frame", v(_ip_patch(c2s(), 0, b"\x4f")), CLIENT_PORT, None, DROP,
        delta("drop_bad_ip")),
    Row("total length beyond the frame", v(_ip_patch(c2s(), 2, (41).to_bytes(2, "big"))),
        CLIENT_PORT, None, DROP, delta("drop_bad_ip")),
    Row("total length shorter than the header", v(_ip_patch(c2s(), 2, (19).to_bytes(2, "big"))),
        CLIENT_PORT, None, DROP, delta("drop_bad_ip")),
    Row("total length shorter than header with options",
        v(_ip_patch(c2s(options=[IPOption(b"\x01\x01\x01\x00")]), 2, (23).to_bytes(2, "big"))),
        CLIENT_PORT, None, DROP, delta("drop_bad_ip")),
    Row("fragment with MF", v(c2s(ip_flags="MF")), CLIENT_PORT, None, DROP,
        delta("drop_fragment")),
    Row("fragment with an offset", v(raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP, frag=3,
                                                                        proto=6) / Raw(b"x" * 24))),
        CLIENT_PORT, None, DROP, delta("drop_fragment")),
    Row("fragment with ip options: both counted",
        v(raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP, flags="MF",
                                             options=[IPOption(b"\x01\x01\x01\x00")])
              / TCP(dport=80))), CLIENT_PORT, None, DROP, delta("ip_options", "drop_fragment")),
    Row("icmp to the vip: pass", v(raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP) / ICMP())),
        CLIENT_PORT, None, PASS, delta("pass_not_ours")),
    Row("tcp data offset < 5", v(tcp()[:46] + b"\x40" + tcp()[47:]), CLIENT_PORT, None,
        DROP, delta("drop_bad_l4")),
    Row("tcp data offset beyond the packet", v(tcp()[:46] + b"\x60" + tcp()[47:]), CLIENT_PORT,
        None, DROP, delta("drop_bad_l4")),
    Row("tcp header cut short by total length",
        v(raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP, proto=6)
              / Raw(bytes(TCP(sport=1000, dport=80))[:12]))), CLIENT_PORT, None, DROP,
        delta("drop_bad_l4")),
    Row("udp length longer than the packet", v(udp()[:38] + (100).to_bytes(2, "big") + udp()[40:]), CLIENT_PORT, None, DROP,
        delta("drop_bad_l4")),
    Row("udp length shorter than the packet", v(udp()[:38] + (9).to_bytes(2, "big") + udp()[40:]),
        CLIENT_PORT, None, DROP, delta("drop_bad_l4")),
    Row("udp header cut short by total length",
        v(raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP, proto=17) / Raw(b"\x03\xe8\x00\x35"))),
        CLIENT_PORT, None, DROP, delta("drop_bad_l4")),
    Row("padding does not count as udp payload", v(udp(payload=b"q")[:38] + (17).to_bytes(2, "big")
                                                   + udp(payload=b"q")[40:] + PAD), CLIENT_PORT,
        None, DROP, delta("drop_bad_l4")),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", ROWS, ids=[r.desc for r in ROWS])
def test_row(row: Row, impl: str) -> None:
    env = Env(impl, capacity=row.capacity)
    for item in row.before:
        if callable(item):
            item(env)
        else:
            env.send(*item)
    before = env.counters.named()
    with UnraisableCatcher() as reported:
        verdict, out_port, out = env.send(row.frame, row.in_port, row.now)
    after = env.counters.named()
    changed = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    names = {TX: "V_TX", PASS: "V_PASS", DROP: "V_DROP"}
    assert names[verdict] == names[row.verdict]
    assert changed == row.counters
    if row.expect is None:
        assert out == row.frame, "a frame not sent must stay untouched: " + diff_bytes(out, row.frame)
    else:
        assert out == row.expect, diff_bytes(out, row.expect)
        assert out_port == row.want_port()
    assert len(env.emitted) == len(row.emitted), env.emitted
    for (gport, got), (wport, want) in zip(env.emitted, row.emitted):
        assert got == want, diff_bytes(got, want)
        assert gport == wport
    if "sched_errors" in row.counters:
        assert len(reported.seen) == 1 and reported.seen[0][0] is SchedError
    else:
        assert reported.seen == []


# --- randomized differential test: the C engine against the reference ----------

from pylvs import sched as _sched  # noqa: E402

RIP2, RIP3 = "192.168.1.3", "192.168.1.4"
RESOLVED = tables.DEST_F_USED | tables.DEST_F_RESOLVED
MASQ, ROUTE, TUNNEL = tables.FWD_MASQ, tables.FWD_ROUTE, tables.FWD_TUNNEL
DIFF_SERVICES = {
    0: (6, VIP, 80),      # wlc over dests 0-2
    1: (17, VIP, 53),     # rr over dests 3-4
    2: (6, VIP2, 443),    # wrr, weights 3, 1, 0
    3: (6, VIP, 81),      # an unresolved dest
    4: (6, VIP, 82),      # a Tun dest (drop_fwd_method)
    5: (6, VIP, 84),      # the scheduler raises
    6: (17, VIP2, 53),    # lc; its dest is dest 3's RIP:port (conflicts)
    7: (6, VIP2, 80),     # rr; its dest is dest 0's RIP:port (conflicts)
    8: (6, VIP, 85),      # wrr: DR, NAT and Tun dests side by side
    9: (17, VIP, 82),     # rr over a DR dest and a NAT dest
}
DIFF_DESTS = {
    0: (0, RIP, 8080, MASQ, RESOLVED, 1),
    1: (0, RIP2, 8080, MASQ, RESOLVED, 2),
    2: (0, RIP3, 80, MASQ, RESOLVED, 1),
    3: (1, RIP, 5353, MASQ, RESOLVED, 1),
    4: (1, RIP2, 53, MASQ, RESOLVED, 1),
    5: (2, RIP, 443, MASQ, RESOLVED, 3),
    6: (2, RIP2, 443, MASQ, RESOLVED, 1),
    7: (2, RIP3, 443, MASQ, RESOLVED, 0),
    8: (3, RIP2, 81, MASQ, tables.DEST_F_USED, 1),
    9: (4, RIP2, 82, TUNNEL, RESOLVED, 1),
    10: (6, RIP, 5353, MASQ, RESOLVED, 1),
    11: (7, RIP, 8080, MASQ, RESOLVED, 1),
    12: (8, RIP2, 85, ROUTE, RESOLVED, 3),
    13: (8, RIP3, 8085, MASQ, RESOLVED, 2),
    14: (8, RIP, 85, TUNNEL, RESOLVED, 1),
    15: (9, RIP2, 82, ROUTE, RESOLVED, 1),
    16: (9, RIP3, 82, ROUTE, RESOLVED | tables.DEST_F_NO_ROUTE, 1),
}
DIFF_SCHED = {0: "wlc", 1: "rr", 2: "wrr", 3: "rr", 4: "rr", 6: "lc", 7: "rr", 8: "wrr", 9: "rr"}
CLIENTS = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "172.16.5.5", "203.0.113.9"]
TARGETS = [(6, VIP, 80)] * 4 + [(17, VIP, 53)] * 2 + [(6, VIP2, 443)] * 2 + [
    (6, VIP, 81), (6, VIP, 82), (6, VIP, 84), (17, VIP2, 53), (17, VIP2, 53), (6, VIP2, 80), (6, VIP2, 80),
    (6, VIP, 8888), (17, VIP, 9), (6, VIP, 85), (17, VIP, 82)]
TTLS = [64] * 12 + [0, 1, 2]
FOREIGN = [
    v(raw(Ether(src=CMAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=VIP))),
    v(raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP) / ICMP())),
    v(raw(Ether(src=CMAC, dst=LMAC) / IPv6(dst="fd00::1") / UDP(dport=53))),
]


class _SchedDest:
    __slots__ = ("slot", "weight")

    def __init__(self, slot, weight):
        self.slot, self.weight = slot, weight


class DiffControl:
    """Plays the control plane for one engine: schedulers, dest lists, tables."""

    def __init__(self, counters: tables.Counters):
        self.counters = counters
        self.gone: set[int] = set()
        self.per_svc = {s: (_sched.get(name)(), []) for s, name in DIFF_SCHED.items()}
        self._relist()

    def _relist(self) -> None:
        for s, (sch, ds) in self.per_svc.items():
            ds[:] = [_SchedDest(d, row[5]) for d, row in DIFF_DESTS.items()
                     if row[0] == s and d not in self.gone]
            sch.update(ds)

    def toggle(self, slot: int) -> tuple:
        self.gone ^= {slot}
        self._relist()
        return build_tables(DIFF_SERVICES, DIFF_DESTS, gone=self.gone)

    def __call__(self, svc: int, caddr: int, cport: int) -> int:
        if svc == 5:
            raise SchedError("broken scheduler")
        sch, ds = self.per_svc[svc]
        d = sch.schedule(ds, _sched.SchedCtx(self.counters.dest_conns, caddr, cport))
        return -1 if d is None else d.slot


def _client_mac(caddr: str) -> str:
    return "02:00:00:00:10:%02x" % (ip(caddr) & 0xFF)


def _random_item(rng, conns):
    r = rng.random()
    if r < 0.9:
        if r < 0.45 or not conns:
            proto, vaddr, vport = rng.choice(TARGETS)
            caddr = rng.choice(CLIENTS)
            frame = random_frame(rng, proto, caddr, vaddr, rng.randrange(1000, 1006), vport,
                                 _client_mac(caddr), LMAC, ttl=rng.choice(TTLS))
            port = rng.choice([CLIENT_PORT, 2])
        else:
            c = rng.choice(conns)
            proto, caddr, cport, _, _, daddr, dport = c[:7]
            frame = random_frame(rng, proto, ipaddress_str(daddr), ipaddress_str(caddr),
                                 dport, cport, RMAC, SMAC, ttl=rng.choice(TTLS))
            port = RS_PORT
        if r > 0.8:
            frame = mangle(rng, frame)
        return frame, port
    return rng.choice(FOREIGN), CLIENT_PORT


def ipaddress_str(a: int) -> str:
    return ".".join(str(a >> s & 0xFF) for s in (24, 16, 8, 0))


def _counters_of(env: Env) -> dict:
    c = env.counters
    return {"stats": dict(zip(tables.STAT_NAMES, c.stats.tolist())),
            "svc_stats": c.svc_stats.tolist(), "dest_stats": c.dest_stats.tolist(),
            "dest_conns": c.dest_conns.tolist()}


@pytest.mark.parametrize("hand", ["sweep", "steps"])
@pytest.mark.parametrize("seed", range(3))
def test_random_traffic_same_in_both_engines(seed, hand):
    """Random flows, flag sequences, offload modes, malformed frames, table and
    timeout changes and expiry, fed to both engines at the same times.

    "sweep" expires with a budget covering every slot (hand order cannot
    matter); "steps" uses small budgets, relying on the slot allocation and
    hand order both engines document (LIFO free slots from 0, hand 0..n-1).
    """
    rng = random.Random(1000 + seed)
    capacity = 16
    controls = {}

    def make(impl):
        def factory(counters):
            controls[impl] = DiffControl(counters)
            return controls[impl]
        return Env(impl, capacity=capacity, make_schedule=factory,
                   services=DIFF_SERVICES, dests=DIFF_DESTS)

    ref, fast = make("python"), make("c")
    now = 1000.0
    for step in range(250):
        now += rng.choice([0, 0, 0, 0.25, 0.5, 1, 2, 3, 5, 11, 30, 61, 400])
        items = [_random_item(rng, sorted(ref.engine.conns())) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.3:
            # Frames of one flow close together in a batch: the C engine
            # looks frames up ahead of handling them.
            items += rng.sample(items, rng.randint(1, len(items)))
            rng.shuffle(items)
        results = []
        for env in (ref, fast):
            with UnraisableCatcher() as reported:
                results.append((env.send_many(items, now), len(reported.seen)))
        (tx_r, out_r), rep_r = results[0]
        (tx_f, out_f), rep_f = results[1]
        where = f"seed {seed} step {step} now {now}"
        for i, ((vr, pr, fr), (vf, pf, ff)) in enumerate(zip(out_r, out_f)):
            assert (vr, pr) == (vf, pf), f"{where} frame {i}: verdict/out_port python {vr}/{pr} c {vf}/{pf}; in {items[i][0].hex()}"
            assert fr == ff, f"{where} frame {i}: {diff_bytes(ff, fr)} (c vs python); in {items[i][0].hex()}"
        assert tx_r == tx_f and rep_r == rep_f, where
        assert ref.emitted == fast.emitted, f"{where}: emitted frames differ"
        if rng.random() < 0.4:
            budget = capacity if hand == "sweep" else rng.randrange(1, capacity // 2)
            assert ref.engine.expire(now, budget) == fast.engine.expire(now, budget), where
        if rng.random() < 0.03:
            slot = rng.choice([1, 3, 5, 12])
            for impl, env in (("python", ref), ("c", fast)):
                env.engine.set_tables(*controls[impl].toggle(slot))
        if rng.random() < 0.03:
            t = states.timeout_array(*(rng.choice([0, 5, 30, 100]) for _ in range(3)))
            ref.engine.set_timeouts(t)
            fast.engine.set_timeouts(t)
        assert ref.engine.conns() == fast.engine.conns(), where  # slot order too
        assert ref.engine.conn_count == fast.engine.conn_count == len(ref.engine.conns()), where
        assert ref.engine.memory == fast.engine.memory, where
        fast.engine._check()  # the index holds exactly the keys of the conns (OUT: NAT only)
        cr, cf = _counters_of(ref), _counters_of(fast)
        for k in cr:
            assert cr[k] == cf[k], f"{where}: {k} differ"
    # The run must have reached the interesting places.
    st = ref.counters.named()
    dr_in = ref.counters.dest_stats[[12, 15], tables.STAT_INPKTS]
    assert dr_in.min() > 0, "a DR dest saw no packet"
    for name in ("conns_created", "conns_expired", "tx_frames", "drop_no_conn", "conns_evicted",
                 "csum_partial_fixed", "gso_frames", "ip_options", "drop_conflict",
                 "sched_errors", "drop_unresolved", "tx_tunneled", "drop_ttl",
                 "icmp_time_exceeded_sent", "drop_no_route"):
        assert st[name] > 0, f"{name} never happened"


# --- the scheduler upcall's answers and the API edges, in both engines ----------

class _Answer:
    def __init__(self, value):
        self.value = value

    def __call__(self, svc, caddr, cport):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("answer, counter", [
    (0, "conns_created"),
    (np.int64(0), "conns_created"),
    (False, "conns_created"),       # a bool is an int: slot 0
    (-1, "drop_no_dest"),
    (-7, "drop_no_dest"),
    (1, "drop_no_dest"),            # a dest of another service
    (99, "drop_no_dest"),           # no such slot
    (2**70, "drop_no_dest"),
    (None, "sched_errors"),
    (0.0, "sched_errors"),          # not an integer
    ("0", "sched_errors"),
    (ValueError("boom"), "sched_errors"),
], ids=lambda x: repr(x)[:20])
def test_schedule_answers(impl, answer, counter):
    env = Env(impl, schedule=_Answer(answer))
    with UnraisableCatcher() as reported:
        env.send(v(tcp()), CLIENT_PORT, 0.0)
    assert env.counters.stat(counter) == 1
    assert len(reported.seen) == (1 if counter == "sched_errors" else 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_reentry_from_the_scheduler(impl):
    seen = []
    env = None

    def schedule(svc, caddr, cport):
        for call in (lambda: env.engine.expire(0.0, 1), lambda: env.engine.process(env.batch, 0.0),
                     lambda: env.engine.set_timeouts(states.timeout_array()),
                     lambda: env.engine.set_tables(*build_tables())):
            try:
                call()
            except RuntimeError:
                seen.append(True)
        seen.append(len(env.engine.conns()))   # reading is fine
        return 0

    env = Env(impl, schedule=schedule)
    verdict, _, _ = env.send(v(tcp()), CLIENT_PORT, 0.0)
    assert verdict == TX
    assert seen == [True, True, True, True, 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_api_edges(impl):
    env = Env(impl)
    e = env.engine
    assert e.capacity == 64 and e.conn_count == 0
    b = tables.Batch(size=2, slot=64)
    b.append(v(tcp()))
    b.length[0] = 65
    with pytest.raises(ValueError):
        e.process(b, 0.0)
    assert env.counters.stat("rx_frames") == 0
    with pytest.raises(ValueError):
        e.set_timeouts(np.zeros(11))
    with pytest.raises(ValueError):
        e.set_timeouts(np.full(12, np.inf))
    with pytest.raises(TypeError):
        e.set_tables(np.zeros(3), tables.empty_dests(1))
    with pytest.raises(ValueError):
        e.set_tables(tables.empty_services(17), tables.empty_dests(1))   # counters have 16 rows
    cls = type(e)
    kw = dict(key=bytes(16), transitions=states.TRANSITIONS, timeouts=states.timeout_array(),
              counters=tables.Counters(), schedule=lambda *a: -1)
    with pytest.raises(ValueError):
        cls(0, **kw)
    with pytest.raises(ValueError):
        cls(8, **{**kw, "key": b"short"})
    with pytest.raises(ValueError):
        cls(8, **{**kw, "transitions": np.full((3, 4, 11), 11, np.uint8)})
    with pytest.raises(TypeError):
        cls(8, **{**kw, "schedule": 5})
    assert e.expire(0.0, 0) == 0 and e.expire(0.0, -1) == 0


def test_stat_names_match_engine_h():
    """tables.STAT_NAMES and the C enum pylvs_stat list the same counters in order."""
    import pathlib
    import re
    h = (pathlib.Path(__file__).parent.parent / "pylvs/_fast/engine.h").read_text()
    body = re.search(r"enum pylvs_stat\s*\{(.*?)\}", h, re.S).group(1)
    names = [n.strip()[3:].lower() for n in body.split(",") if n.strip().startswith("ST_")]
    assert names[-1] == "_count"
    assert tuple(names[:-1]) == tables.STAT_NAMES
    n_stats = int(re.search(r"#define PYLVS_N_STATS (\d+)", h).group(1))
    assert n_stats == tables.N_STATS >= len(tables.STAT_NAMES)
