"""The TAP backend's user-space host: ARP, ICMP echo, neighbours, routes.

Tables of frames built with scapy, each with the answer the director must
send (or none) and the counter it must move. Rules: kernel net/ipv4/arp.c
(arp_process), net/ipv4/icmp.c (icmp_echo, icmp_reply).
"""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw, raw

from pylvs.engine import tables
from pylvs.io import taphost
from pylvs.io.taphost import Iface, TapHost

DIP0, DIP, VIP, GW = "10.0.0.1", "10.0.1.1", "10.0.0.100", "10.0.0.2"
CIP, RIP, FAR = "10.0.0.7", "10.0.1.11", "10.0.3.11"
MAC0, MAC1 = "02:aa:00:00:00:01", "02:aa:00:00:00:02"
CMAC, RMAC, GMAC = "02:00:00:00:00:07", "02:00:00:00:01:0b", "02:00:00:00:00:02"
OTHER = "02:00:00:00:00:99"
BCAST = "ff:ff:ff:ff:ff:ff"


def ip(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_host(gateway: str | None = GW):
    sent: list[tuple[int, bytes]] = []
    clock = Clock()
    host = TapHost([Iface(ip(DIP0), 24, 1500, mac(MAC0)), Iface(ip(DIP), 24, 1400, mac(MAC1))],
                   ip(gateway) if gateway else None,
                   send=lambda port, frame: sent.append((port, frame)), clock=clock,
                   thread=False)
    host.set_vips([ip(VIP)])
    sent.clear()   # the VIP's announcements (test_announce checks them)
    return host, sent, clock


def vnet(pkt) -> bytes:
    return bytes(tables.VNET_HDR_LEN) + raw(pkt)


def arp_req(src_mac, sip, tip, dst=BCAST, op=1):
    return Ether(src=src_mac, dst=dst) / ARP(op=op, hwsrc=src_mac, psrc=sip, pdst=tip,
                                             hwdst="00:00:00:00:00:00")


def echo(dst_ip, dst_mac=MAC0, src=CIP, **kw):
    return (Ether(src=CMAC, dst=dst_mac) / IP(src=src, dst=dst_ip, tos=0x10, ttl=50, id=77)
            / ICMP(**{"type": 8, "id": 0x1234, "seq": 5, **kw}) / Raw(b"ping payload"))


# (description, frame, port, expected answer as a scapy check or None, counter)
ARP_CASES = [
    ("request for the DIP", arp_req(CMAC, CIP, DIP0), 0, (CMAC, DIP0, CIP), "arp_replies_sent"),
    ("request for the VIP", arp_req(CMAC, CIP, VIP), 0, (CMAC, VIP, CIP), "arp_replies_sent"),
    ("request for the VIP on the other port", arp_req(RMAC, RIP, VIP), 1, (RMAC, VIP, RIP),
     "arp_replies_sent"),
    ("request for the other port's DIP (any local address: arp_ignore 0)",
     arp_req(CMAC, CIP, DIP), 0, (CMAC, DIP, CIP), "arp_replies_sent"),
    ("duplicate-address probe for the VIP (sender 0.0.0.0)", arp_req(CMAC, "0.0.0.0", VIP), 0,
     (CMAC, VIP, "0.0.0.0"), "arp_replies_sent"),
    ("request for the VIP unicast to us", arp_req(CMAC, CIP, VIP, dst=MAC0), 0,
     (CMAC, VIP, CIP), "arp_replies_sent"),
    ("request for another host", arp_req(CMAC, CIP, "10.0.0.55"), 0, None, None),
    ("request unicast to another MAC (PACKET_OTHERHOST)", arp_req(CMAC, CIP, VIP, dst=OTHER),
     0, None, "host_ignored"),
    ("reply nobody asked for", arp_req(CMAC, CIP, DIP0, dst=MAC0, op=2), 0, None, None),
    ("gratuitous request from a neighbour", arp_req(CMAC, CIP, CIP), 0, None, None),
    ("multicast sender MAC", arp_req("01:00:5e:00:00:01", CIP, VIP), 0, None,
     "host_bad_frames"),
    ("loopback sender address", arp_req(CMAC, "127.0.0.1", VIP), 0, None, "host_bad_frames"),
    ("truncated ARP body", Ether(src=CMAC, dst=BCAST, type=0x0806) / Raw(bytes(10)), 0, None,
     "host_bad_frames"),
    ("not Ethernet/IPv4 ARP (hlen 8)", Ether(src=CMAC, dst=BCAST) / ARP(hwlen=8, plen=4,
     hwsrc=b"\x02" * 8, pdst=VIP), 0, None, "host_bad_frames"),
]


@pytest.mark.parametrize("desc,frame,port,want,counter", ARP_CASES, ids=[c[0] for c in ARP_CASES])
def test_arp(desc, frame, port, want, counter):
    host, sent, _ = make_host()
    before = dict(host.counters)
    host.handle(vnet(frame), port)
    if want is None:
        assert sent == []
    else:
        to_mac, for_ip, to_ip = want
        assert len(sent) == 1 and sent[0][0] == port
        assert sent[0][1][:10] == bytes(10)
        r = Ether(sent[0][1][10:])
        own = MAC0 if port == 0 else MAC1
        assert (r.dst, r.src, r.type) == (to_mac, own, 0x0806)
        a = r[ARP]
        assert (a.op, a.hwsrc, a.psrc, a.hwdst, a.pdst) == (2, own, for_ip, to_mac, to_ip)
        assert len(sent[0][1]) - 10 == 60   # padded to the Ethernet minimum
    moved = {k for k in host.counters if host.counters[k] != before[k]}
    assert moved == ({counter} if counter else set())


ECHO_CASES = [
    ("echo to the VIP", echo(VIP), True, "echo_replies_sent"),
    ("echo to the DIP", echo(DIP0), True, "echo_replies_sent"),
    ("echo to another address", echo("10.0.0.55"), False, "host_ignored"),
    ("echo to another MAC", echo(VIP, dst_mac=OTHER), False, "host_ignored"),
    ("echo reply (type 0) to the VIP", echo(VIP, type=0), False, "host_ignored"),
    ("TCP to the DIP (no service)", Ether(src=CMAC, dst=MAC0) / IP(src=CIP, dst=DIP0) / TCP(),
     False, "host_ignored"),
    ("bad ICMP checksum", echo(VIP, chksum=0x1111), False, "host_bad_frames"),
    ("bad IP header checksum", Ether(src=CMAC, dst=MAC0) / IP(src=CIP, dst=VIP, chksum=1)
     / ICMP(), False, "host_bad_frames"),
    ("IP total length beyond the frame", Ether(src=CMAC, dst=MAC0) / IP(src=CIP, dst=VIP,
     len=400) / ICMP(), False, "host_bad_frames"),
    ("IHL 4", Ether(src=CMAC, dst=MAC0) / IP(src=CIP, dst=VIP, ihl=4) / ICMP(), False,
     "host_bad_frames"),
    ("a first fragment of an echo", Ether(src=CMAC, dst=MAC0) / IP(src=CIP, dst=VIP,
                                                                    flags="MF") / ICMP(),
     False, "host_ignored"),
    ("IPv4 frame of 14 bytes", Ether(src=CMAC, dst=MAC0, type=0x0800), False,
     "host_bad_frames"),
    ("UDP to the VIP, not a service", Ether(src=CMAC, dst=MAC0) / IP(src=CIP, dst=VIP) / UDP(),
     False, "host_ignored"),
]


@pytest.mark.parametrize("desc,frame,answered,counter", ECHO_CASES,
                         ids=[c[0] for c in ECHO_CASES])
def test_echo(desc, frame, answered, counter):
    host, sent, _ = make_host()
    before = dict(host.counters)
    host.handle(vnet(frame), 0)
    moved = {k for k in host.counters if host.counters[k] != before[k]}
    assert moved == {counter}
    if not answered:
        assert sent == []
        return
    assert len(sent) == 1 and sent[0][0] == 0
    r = Ether(sent[0][1][10:])
    q = Ether(raw(frame))
    assert (r.dst, r.src) == (CMAC, MAC0)
    # icmp_reply: addresses swapped, the request's TOS, TTL 64, DF clear,
    # the echo's id, sequence and data unchanged; scapy recomputes every
    # checksum and must find the ones we sent.
    assert (r[IP].src, r[IP].dst, r[IP].tos, r[IP].ttl, int(r[IP].flags), r[IP].ihl) == (
        q[IP].dst, q[IP].src, 0x10, 64, 0, 5)
    assert (r[ICMP].type, r[ICMP].code, r[ICMP].id, r[ICMP].seq) == (0, 0, 0x1234, 5)
    assert bytes(r[ICMP].payload) == b"ping payload"
    again = Ether(raw(r))
    del again[IP].chksum, again[ICMP].chksum
    again = Ether(raw(again))
    assert (again[IP].chksum, again[ICMP].chksum) == (r[IP].chksum, r[ICMP].chksum)


def test_echo_ids_advance():
    host, sent, _ = make_host()
    host.handle(vnet(echo(VIP)), 0)
    host.handle(vnet(echo(VIP)), 0)
    ids = [Ether(f[10:])[IP].id for _, f in sent]
    assert ids[1] == (ids[0] + 1) & 0xFFFF


def test_announce_new_vips_on_every_port():
    host, sent, _ = make_host()
    seen = []
    host.on_local_change = seen.append
    host.set_vips([ip(VIP), ip("10.0.0.101")])
    assert [p for p, _ in sent] == [0, 1]
    for port, f in sent:
        a = Ether(f[10:])[ARP]
        assert (a.op, a.psrc, a.pdst, a.hwsrc) == (1, "10.0.0.101", "10.0.0.101",
                                                   (MAC0, MAC1)[port])
    assert seen == [frozenset({DIP0, DIP, VIP, "10.0.0.101"})]
    sent.clear()
    host.set_vips([ip(VIP)])   # one VIP gone: nothing to announce
    assert sent == [] and "10.0.0.101" not in host.local


def test_routes_and_ports_for_the_engine():
    host, _, _ = make_host()
    st = host.net.state
    assert [(int(r["addr"]), int(r["mtu"]), bytes(r["mac"]), int(r["flags"]))
            for r in st.ports] == [
        (ip(DIP0), 1500, mac(MAC0), tables.PORT_F_USED | tables.PORT_F_CHECK_MAC),
        (ip(DIP), 1400, mac(MAC1), tables.PORT_F_USED | tables.PORT_F_CHECK_MAC)]
    assert [(int(r["prefix"]), int(r["plen"]), int(r["port"])) for r in st.routes] == [
        (ip("10.0.0.0"), 24, 0), (ip("10.0.1.0"), 24, 1), (0, 0, 0)]
    assert st.local.tolist() == sorted(ip(a) for a in (DIP0, DIP, "10.0.0.255", "10.0.1.255"))
    assert host.route(ip(RIP)) == (1, ip(RIP), True)
    assert host.route(ip(FAR)) == (0, ip(GW), False)
    assert host.route(ip(VIP)) is None and host.route(ip(DIP)) is None
    assert host.connected(ip(FAR)) is False and host.connected(ip(RIP)) is True
    no_gw, _, _ = make_host(gateway=None)
    assert no_gw.route(ip(FAR)) is None and len(no_gw.net.state.routes) == 2
    with pytest.raises(ValueError, match="no --addr prefix"):
        TapHost([Iface(ip(DIP0), 24, 1500, mac(MAC0))], ip("192.168.9.1"))


def test_resolve_by_arp():
    host, sent, clock = make_host()
    changes = []
    host.on_change = changes.append
    assert host.resolve(ip(RIP)) is None
    host.tick(clock())
    # One broadcast request on the RIP's port, from the DIP there.
    assert len(sent) == 1 and sent[0][0] == 1
    r = Ether(sent[0][1][10:])
    assert (r.dst, r[ARP].op, r[ARP].psrc, r[ARP].pdst) == (BCAST, 1, DIP, RIP)
    host.handle(vnet(arp_req(RMAC, RIP, DIP, dst=MAC1, op=2)), 1)
    assert changes == [ip(RIP)]
    assert host.resolve(ip(RIP)) == (1, mac(RMAC), mac(MAC1))
    # A far real server goes through the gateway's MAC.
    assert host.resolve(ip(FAR)) is None
    sent.clear()
    host.tick(clock())
    assert Ether(sent[0][1][10:])[ARP].pdst == GW and sent[0][0] == 0
    host.handle(vnet(arp_req(GMAC, GW, DIP0, dst=MAC0, op=2)), 0)
    assert host.resolve(ip(FAR)) == (0, mac(GMAC), mac(MAC0))
    assert changes == [ip(RIP), ip(FAR)]
    # An answer on the wrong port teaches nothing (neighbours are per port).
    host.handle(vnet(arp_req(OTHER, RIP, DIP0, dst=MAC0, op=2)), 0)
    assert host.resolve(ip(RIP)) == (1, mac(RMAC), mac(MAC1))


def test_unanswered_requests_back_off():
    host, sent, clock = make_host()
    host.resolve(ip(RIP))
    times = []
    for _ in range(200):
        n = len(sent)
        host.tick(clock())
        if len(sent) > n:
            times.append(clock.t)
        clock.t += 0.25
    gaps = np.diff(times).tolist()
    # mcast_probes: 3 requests 1 s apart, then doubling up to MAX_BACKOFF.
    assert gaps[:3] == [1.0, 1.0, 2.0] and gaps[3:6] == [4.0, 8.0, 16.0]
    assert max(gaps) <= taphost.MAX_BACKOFF
    assert host.counters["arp_requests_sent"] == len(times)


def test_stale_neighbour_probed_then_forgotten():
    host, sent, clock = make_host()
    changes = []
    host.on_change = changes.append
    host.resolve(ip(RIP))
    host.tick(clock())
    host.handle(vnet(arp_req(RMAC, RIP, DIP, dst=MAC1, op=2)), 1)
    sent.clear()
    clock.t += taphost.REACHABLE_TIME - 1
    host.tick(clock())
    assert sent == []                                # still reachable
    clock.t += 1
    for _ in range(taphost.PROBES):
        host.tick(clock())
        clock.t += taphost.RETRANS_TIME
    # Unicast probes to the known MAC, the MAC still in use meanwhile.
    assert [Ether(f[10:]).dst for _, f in sent] == [RMAC] * taphost.PROBES
    assert host.resolve(ip(RIP)) == (1, mac(RMAC), mac(MAC1))
    # An answer to a probe keeps it.
    host.handle(vnet(arp_req(RMAC, RIP, DIP, dst=MAC1, op=2)), 1)
    assert host.neighbours()[0][3] == taphost.REACHABLE
    # No answer this time: forgotten, dests unresolved, broadcast again.
    clock.t += taphost.REACHABLE_TIME
    sent.clear()
    for _ in range(taphost.PROBES + 1):
        host.tick(clock())
        clock.t += taphost.RETRANS_TIME
    assert host.resolve(ip(RIP)) is None
    assert changes == [ip(RIP), ip(RIP)] and host.counters["arp_failed"] == 1
    assert Ether(sent[-1][1][10:]).dst == BCAST
    # A new MAC (the server was replaced) is learned and reported.
    host.handle(vnet(arp_req(OTHER, RIP, DIP, dst=MAC1, op=2)), 1)
    assert host.resolve(ip(RIP)) == (1, mac(OTHER), mac(MAC1)) and changes[-1] == ip(RIP)


def test_forget_drops_the_entry():
    host, sent, clock = make_host()
    host.resolve(ip(RIP))
    host.forget(ip(RIP))
    host.tick(clock())
    assert sent == [] and host.neighbours() == []


def test_send_errors_are_counted():
    def refuse(port, frame):
        raise OSError(5, "EIO")

    host = TapHost([Iface(ip(DIP0), 24, 1500, mac(MAC0))], send=refuse, thread=False)
    host.handle(vnet(arp_req(CMAC, CIP, DIP0)), 0)
    assert host.counters["host_send_errors"] == 1


def test_runt_and_bad_port():
    host, sent, _ = make_host()
    host.handle(b"\0" * 12, 0)
    host.handle(vnet(arp_req(CMAC, CIP, DIP0)), 7)
    assert host.counters["host_bad_frames"] == 2 and sent == []


# --- options of `pylvs run --tap` ---------------------------------------------

RUN_ERRORS = [
    (["--tap", "t0"], "1 --tap but 0 --addr"),
    (["--tap", "t0", "--addr", "10.0.0.1"], "give the prefix length"),
    (["--tap", "t0", "--addr", "10.0.0.300/24"], "--addr"),
    (["--tap", "t0", "--addr", "10.0.0.1/24", "--mac", "01:00:00:00:00:01"], "not a unicast"),
    (["--tap", "t0", "--addr", "10.0.0.1/24", "--mac", "zz"], "not a MAC"),
    (["--tap", "t0", "--addr", "10.0.0.1/24", "--mac", "zz:00:00:00:00:01"], "not a MAC"),
    (["--tap", "t0", "--addr", "10.0.0.1/24", "--gateway", "x"], "--gateway 'x'"),
    (["--tap", "t0", "--addr", "10.0.0.1/24", "--iface", "eth0"], "none of --iface"),
    (["--tap", "t0", "--addr", "10.0.0.1/24", "--steering", "nft"], "nothing to steer"),
    (["--addr", "10.0.0.1/24"], "go with --tap"),
]


@pytest.mark.parametrize("argv,message", RUN_ERRORS, ids=[" ".join(a) for a, _ in RUN_ERRORS])
def test_run_option_errors(argv, message, capsys):
    from pylvs.runtime import daemon

    with pytest.raises(SystemExit) as e:
        daemon.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_macs_and_addrs():
    from pylvs.io import tap

    for _ in range(20):
        m = tap.random_mac()
        assert len(m) == 6 and m[0] & 3 == 2   # unicast, locally administered
    assert tap.parse_mac("02:00:00:00:aa:01") == bytes.fromhex("02000000aa01")
    assert tap.parse_addr("10.0.1.1/24") == (ip("10.0.1.1"), 24)
