"""VS-NAT packet tests as a table (as Katran's fixtures), for both engines.

Each row: a frame (built with scapy behind a virtio_net_hdr), the port it
arrives on, the frame expected out (None: the input, untouched), the verdict
and the exact change of the global counters. ``before`` frames set up conns.
Every row runs on the reference ("python") and on the C engine ("c").
"""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw, raw

from engine_kit import (CIP, CLIENT_PORT, CMAC, IMPLS, LMAC, RIP, RMAC, RS_PORT, SMAC,
                        VIP, VIP2, Env, Row, SchedError, UnraisableCatcher, build_tables,
                        delta, diff_bytes, partial_vnet, tcp, udp, v)
from pylvs.engine import tables
from pylvs.engine.checksum import fold, ones_sum, pseudo_header_sum

TX, PASS, DROP = tables.V_TX, tables.V_PASS, tables.V_DROP
NEEDS_CSUM = tables.VNET_F_NEEDS_CSUM

# Frames that set up state for a row: (frame, in_port, now).
SYN = (v(tcp()), CLIENT_PORT, 0.0)
UDP_Q = (v(udp()), CLIENT_PORT, 0.0)


# Client -> VIP and the same frame as it must leave toward the real server.
def c2s(**kw):
    return tcp(**kw)


def c2s_out(dport=8080, **kw):
    return tcp(dst=RIP, dport=dport, smac=SMAC, dmac=RMAC, **kw)


def s2c(flags="SA", **kw):
    return tcp(src=RIP, dst=CIP, sport=8080, dport=1000, smac=RMAC, dmac=SMAC, flags=flags, **kw)


def s2c_out(flags="SA", dmac=CMAC, **kw):
    return tcp(src=VIP, dst=CIP, sport=80, dport=1000, smac=LMAC, dmac=dmac, flags=flags, **kw)


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
        v(udp(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC)), TX, delta("tx_frames", "conns_created")),
    Row("udp reply back to vip:53", v(udp(src=RIP, dst=CIP, sport=5353, dport=1000, smac=RMAC,
                                          dmac=SMAC, payload=b"answer")), RS_PORT,
        v(udp(src=VIP, dst=CIP, sport=53, dport=1000, smac=LMAC, dmac=CMAC, payload=b"answer")),
        TX, delta("tx_frames"), before=[UDP_Q]),
    Row("udp checksum 0 (none) stays 0", v(udp(chksum=0)), CLIENT_PORT,
        v(udp(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, chksum=0)), TX,
        delta("tx_frames", "conns_created")),
    Row("udp checksum that computes to 0 is sent as 0xffff", v(udp(payload=FFFF_PAYLOAD)),
        CLIENT_PORT, v(udp(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, payload=FFFF_PAYLOAD,
                           chksum=0xFFFF)), TX, delta("tx_frames", "conns_created")),
    Row("ethernet padding after total length is kept", v(c2s() + PAD), CLIENT_PORT,
        v(c2s_out() + PAD), TX, delta("tx_frames", "conns_created")),
    Row("udp with ethernet padding", v(udp(payload=b"q") + PAD), CLIENT_PORT,
        v(udp(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, payload=b"q") + PAD), TX,
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
        v(udp(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, payload=b"odd"), csum_start=34,
          csum_offset=6), TX, delta("tx_frames", "conns_created", "csum_partial_fixed")),
    Row("partial udp checksum computing to 0 is sent as 0xffff",
        partial_vnet(udp(payload=FFFF_PAYLOAD)), CLIENT_PORT,
        v(udp(dst=RIP, dport=5353, smac=SMAC, dmac=RMAC, payload=FFFF_PAYLOAD, chksum=0xFFFF),
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
    Row("tcp ack without a conn is dropped", v(c2s(flags="A")), CLIENT_PORT, None, DROP,
        delta("drop_no_conn")),
    Row("tcp syn-ack without a conn is dropped", v(c2s(flags="SA")), CLIENT_PORT, None, DROP,
        delta("drop_no_conn")),
    Row("tcp rst without a conn is dropped", v(c2s(flags="R")), CLIENT_PORT, None, DROP,
        delta("drop_no_conn")),
    Row("tcp syn+rst without a conn is dropped", v(c2s(flags="SR")), CLIENT_PORT, None, DROP,
        delta("drop_no_conn")),
    Row("tcp fin without a conn is dropped", v(c2s(flags="F")), CLIENT_PORT, None, DROP,
        delta("drop_no_conn")),
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
    Row("dest with DR forwarding: not in this engine", v(c2s(dport=82)), CLIENT_PORT, None, DROP,
        delta("drop_fwd_method", "conns_created")),
    Row("scheduler finds no dest", v(c2s(dport=83)), CLIENT_PORT, None, DROP,
        delta("drop_no_dest")),
    Row("scheduler raises: counted, reported, dropped", v(c2s(dport=84)), CLIENT_PORT, None, DROP,
        delta("sched_errors")),
    Row("scheduler answers another service's dest", v(c2s(dport=85)), CLIENT_PORT, None, DROP,
        delta("drop_no_dest")),
    Row("real server side already in use: conflict", v(c2s(dst=VIP2)), CLIENT_PORT, None, DROP,
        delta("drop_conflict"), before=[SYN]),
    Row("conn table full", v(c2s(sport=1001)), CLIENT_PORT, None, DROP,
        delta("drop_table_full"), before=[SYN], capacity=1),
    Row("a freed slot is used again", v(c2s(sport=1001)), CLIENT_PORT, v(c2s_out(sport=1001)), TX,
        delta("tx_frames", "conns_created"), before=[SYN, _sweep], capacity=1, now=60.0),
    Row("a full table is not swept on a miss", v(c2s(sport=1001)), CLIENT_PORT, None, DROP,
        delta("drop_table_full"), before=[SYN], capacity=1, now=60.0),
    Row("conn expired on lookup (expires <= now): ack has no conn", v(c2s(flags="A")),
        CLIENT_PORT, None, DROP, delta("drop_no_conn", "conns_expired"), before=[SYN], now=60.0),
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
    if "sched_errors" in row.counters:
        assert len(reported.seen) == 1 and reported.seen[0][0] is SchedError
    else:
        assert reported.seen == []
