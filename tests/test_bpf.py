"""The socket filter lets in exactly the virtual-service traffic.

Each case runs twice: in the Python interpreter of pylvs.io.bpf, and in the
kernel, attached to an AF_UNIX datagram socketpair (the kernel runs socket
filters on any socket; a message the filter refuses never arrives).
"""

from __future__ import annotations

import socket
import struct
import timeit

import numpy as np
import pytest

from pylvs.engine import tables
from pylvs.io import bpf
from pylvs.io.afpacket import attach_filter

VIP = "10.0.0.1"
RIP = "192.168.1.2"


def frame(src: str, dst: str, proto: int, sport: int, dport: int, *,
          ethertype: int = 0x0800, frag: int = 0, ihl: int = 5, payload: bytes = b"x" * 20,
          icmp_type: int = 8) -> bytes:
    eth = b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ethertype)
    opts = b"\x01" * ((ihl - 5) * 4)
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 512, 0, 0)
    elif proto == 17:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    else:
        l4 = bytes([icmp_type]) + b"\x00" * 7
    total = ihl * 4 + len(l4) + len(payload)
    iph = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return eth + iph + opts + l4 + payload


SVC = [(6, bpf.ip(VIP), 80), (17, bpf.ip(VIP), 53), (6, bpf.ip("10.0.0.9"), 443)]
DST = [(6, bpf.ip(RIP), 8080), (17, bpf.ip(RIP), 5353)]

CASES = [
    ("tcp to service", frame("1.2.3.4", VIP, 6, 40000, 80), True),
    ("udp to service", frame("1.2.3.4", VIP, 17, 40000, 53), True),
    ("tcp to second vip", frame("1.2.3.4", "10.0.0.9", 6, 40000, 443), True),
    ("tcp with ip options", frame("1.2.3.4", VIP, 6, 40000, 80, ihl=7), True),
    ("reply from real server", frame(RIP, "1.2.3.4", 6, 8080, 40000), True),
    ("udp reply from real server", frame(RIP, "1.2.3.4", 17, 5353, 40000), True),
    ("first fragment to service", frame("1.2.3.4", VIP, 6, 40000, 80, frag=0x2000), True),
    ("other port on vip", frame("1.2.3.4", VIP, 6, 40000, 81), False),
    ("udp to a tcp service port", frame("1.2.3.4", VIP, 17, 40000, 80), False),
    ("tcp to a udp service port", frame("1.2.3.4", VIP, 6, 40000, 53), False),
    ("port of one vip on another", frame("1.2.3.4", "10.0.0.9", 6, 40000, 80), False),
    ("ssh to the director", frame("1.2.3.4", "10.0.0.2", 6, 40000, 22), False),
    ("real server other port", frame(RIP, "1.2.3.4", 6, 22, 40000), False),
    ("real server udp on tcp port", frame(RIP, "1.2.3.4", 17, 8080, 40000), False),
    ("icmp echo to vip", frame("1.2.3.4", VIP, 1, 0, 0), False),
    # ICMP errors that may quote a NAT conn (issue 5, item 4a).
    ("icmp frag-needed to vip", frame("1.2.3.4", VIP, 1, 0, 0, icmp_type=3), True),
    ("icmp source quench to vip", frame("1.2.3.4", VIP, 1, 0, 0, icmp_type=4), True),
    ("icmp time exceeded to vip", frame("1.2.3.4", VIP, 1, 0, 0, icmp_type=11), True),
    ("icmp error to vip, ip options", frame("1.2.3.4", VIP, 1, 0, 0, icmp_type=3, ihl=7), True),
    ("icmp error from real server", frame(RIP, "1.2.3.4", 1, 0, 0, icmp_type=3), True),
    ("icmp echo reply from real server", frame(RIP, "1.2.3.4", 1, 0, 0, icmp_type=0), False),
    ("icmp redirect to vip", frame("1.2.3.4", VIP, 1, 0, 0, icmp_type=5), False),
    ("icmp error to the director", frame("1.2.3.4", "10.0.0.2", 1, 0, 0, icmp_type=3), False),
    ("icmp error non-first fragment", frame("1.2.3.4", VIP, 1, 0, 0, icmp_type=3, frag=0x0010), False),
    ("icmp error without its type", frame("1.2.3.4", VIP, 1, 0, 0, icmp_type=3)[:34], False),
    ("non-first fragment", frame("1.2.3.4", VIP, 6, 40000, 80, frag=0x0010), False),
    ("arp", frame("1.2.3.4", VIP, 6, 40000, 80, ethertype=0x0806), False),
    ("ipv6 ethertype", frame("1.2.3.4", VIP, 6, 40000, 80, ethertype=0x86DD), False),
    ("truncated", frame("1.2.3.4", VIP, 6, 40000, 80)[:30], False),
]


@pytest.fixture(scope="module")
def prog():
    return bpf.program(SVC, DST)


@pytest.mark.parametrize("name,pkt,accept", CASES, ids=[c[0] for c in CASES])
def test_interpreter(prog, name, pkt, accept):
    assert (bpf.run(prog, pkt) > 0) == accept


def kernel_accepts(prog, pkts):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        attach_filter(b, prog)
        b.setblocking(False)
        out = []
        for p in pkts:
            a.send(p)
            try:
                got = b.recv(1 << 17)
                assert got == p  # accepted whole: the snap length covers it
                out.append(True)
            except BlockingIOError:
                out.append(False)
        return out


def test_kernel_agrees(prog):
    want = [c[2] for c in CASES]
    assert kernel_accepts(prog, [c[1] for c in CASES]) == want


@pytest.mark.parametrize("pkttype", [1, 2, 3], ids=["broadcast", "multicast", "otherhost"])
def test_only_frames_to_this_host_are_taken(prog, pkttype):
    # ip_vs_in_hook ignores what is not PACKET_HOST; steering counts these.
    for name, pkt, accept in CASES:
        if accept:
            assert bpf.run(prog, pkt) > 0, name
        assert bpf.run(prog, pkt, pkttype) == 0, name
    assert bpf.run(bpf.accept_ipv4_l4(), CASES[0][1], pkttype) == 0


def test_empty_tables_reject_everything():
    prog = bpf.program([], [])
    assert all(bpf.run(prog, c[1]) == 0 for c in CASES)
    assert kernel_accepts(prog, [CASES[0][1]]) == [False]


def test_from_published_tables():
    services = tables.empty_services(4)
    services[1] = (bpf.ip(VIP), 80, 6, tables.SVC_F_USED, 0, 0)
    services[2] = (bpf.ip(VIP), 53, 17, 0, 0, 0)  # free slot: not a service
    dests = tables.empty_dests(4)
    dests[0]["daddr"], dests[0]["dport"], dests[0]["svc"] = bpf.ip(RIP), 8080, 1
    dests[0]["flags"] = tables.DEST_F_USED
    dests[1]["daddr"], dests[1]["dport"], dests[1]["svc"] = bpf.ip(RIP), 5353, 1
    dests[1]["flags"] = 0  # deleted dest
    prog = bpf.for_tables(services, dests)
    assert bpf.run(prog, frame("1.2.3.4", VIP, 6, 1, 80)) > 0
    assert bpf.run(prog, frame("1.2.3.4", VIP, 17, 1, 53)) == 0
    assert bpf.run(prog, frame(RIP, "1.2.3.4", 6, 8080, 1)) > 0
    assert bpf.run(prog, frame(RIP, "1.2.3.4", 6, 5353, 1)) == 0


def test_large_tables_need_far_jumps():
    # Enough keys that targets lie far beyond a conditional jump's 255 reach.
    svc = [(6, bpf.ip("10.1.0.0") + i, 80 + (i % 7)) for i in range(200)]
    dst = [(17, bpf.ip("172.16.0.0") + i, 53) for i in range(100)]
    prog = bpf.program(svc, dst)
    assert 1000 < len(prog) <= bpf.BPF_MAXINSNS
    assert any(k > 255 for code, jt, jf, k in prog if code == bpf.JMP | bpf.JA)
    pkts = [frame("1.2.3.4", "10.1.0.199", 6, 1, 80 + (199 % 7)),  # last service
            frame("1.2.3.4", "10.1.0.0", 6, 1, 80),                # first
            frame("1.2.3.4", "10.1.0.5", 6, 1, 81),                # wrong port
            frame("172.16.0.99", "1.2.3.4", 17, 53, 1),            # last dest
            frame("172.16.0.100", "1.2.3.4", 17, 53, 1)]           # not a dest
    want = [True, True, False, True, False]
    assert [bpf.run(prog, p) > 0 for p in pkts] == want
    assert kernel_accepts(prog, pkts) == want


def test_too_big_falls_back_to_all_tcp_udp():
    svc = [(6, bpf.ip("10.0.0.0") + i, 80) for i in range(3000)]
    prog = bpf.program(svc, [])
    assert prog == bpf.accept_ipv4_l4()
    assert bpf.run(prog, frame("1.2.3.4", "9.9.9.9", 17, 1, 2)) > 0
    assert bpf.run(prog, frame("1.2.3.4", "9.9.9.9", 1, 0, 0)) == 0
    assert bpf.run(prog, frame("1.2.3.4", "9.9.9.9", 1, 0, 0, icmp_type=3)) > 0
    assert bpf.run(prog, frame("1.2.3.4", "9.9.9.9", 6, 1, 2, frag=0x0010)) == 0
    assert kernel_accepts(prog, [frame("1.2.3.4", "9.9.9.9", 1, 0, 0, icmp_type=11),
                                 frame("1.2.3.4", "9.9.9.9", 1, 0, 0)]) == [True, False]


def test_accepts_a_gso_sized_frame(prog):
    big = frame("1.2.3.4", VIP, 6, 40000, 80, payload=b"y" * 65000)
    assert bpf.run(prog, big) >= len(big)
    assert kernel_accepts(prog, [big]) == [True]


def test_key_lists_give_the_program_of_the_tables():
    # set_filter takes key lists too (embedded directors, tests).
    assert bpf.for_tables(SVC, DST) == bpf.program(SVC, DST)
    assert bpf.for_tables(SVC, []) == bpf.program(SVC, [])


@pytest.mark.parametrize("key", [(6, bpf.ip(VIP), 1 << 16), (256, 1, 80), (6, -1, 80)])
def test_a_key_out_of_range_is_refused(key):
    with pytest.raises(ValueError, match="out of range"):
        bpf.program([key], [])


def test_only_nat_dests_are_stolen():
    services = tables.empty_services(2)
    services[0] = (bpf.ip(VIP), 80, 6, tables.SVC_F_USED, 0, 0)
    dests = _mixed_dests()
    assert bpf.dest_keys(services, dests) == [(6, bpf.ip(RIP), 80)]
    # ICMP errors too: from the NAT dest's address only (DR and Tun real
    # servers answer their clients directly, their errors are none of ours).
    prog = bpf.for_tables(services, dests)
    assert bpf.run(prog, frame(RIP, "1.2.3.4", 1, 0, 0, icmp_type=3)) > 0
    for other in ("192.168.1.3", "192.168.1.4"):
        assert bpf.run(prog, frame(other, "1.2.3.4", 1, 0, 0, icmp_type=3)) == 0
        assert bpf.run(prog, frame(other, "1.2.3.4", 6, 80, 40000)) == 0


def _mixed_dests():
    """A NAT, a DR and a Tun dest of service 0 (RIP, RIP+1, RIP+2, port 80)."""
    dests = tables.empty_dests(3)
    for i, fwd in enumerate((tables.FWD_MASQ, tables.FWD_ROUTE, tables.FWD_TUNNEL)):
        dests[i]["daddr"], dests[i]["dport"], dests[i]["svc"] = bpf.ip(RIP) + i, 80, 0
        dests[i]["flags"], dests[i]["fwd"] = tables.DEST_F_USED, fwd
    return dests


def test_steering_sets_hold_only_nat_real_servers():
    from pylvs.control.steering import NftSteering
    services = tables.empty_services(1)
    services[0] = (bpf.ip(VIP), 80, 6, tables.SVC_F_USED, 0, 0)
    lines = NftSteering._element_lines(services, _mixed_dests(), ["10.9.1.1"])
    assert [ln for ln in lines if " realservers " in ln or " rsaddrs " in ln] == [
        f"add element netdev pylvs realservers {{ {RIP} . 6 . 80 }}",
        f"add element netdev pylvs rsaddrs {{ {RIP} }}"]


LENGTH_CASES = [
    ("one service", [(6, bpf.ip(VIP), 80)], []),
    ("dests only", [], [(17, bpf.ip(RIP), 53)]),
    ("the fixture", SVC, DST),
    ("two protos on one addr", [(6, bpf.ip(VIP), 80), (17, bpf.ip(VIP), 80)], DST),
    ("duplicate keys", SVC + SVC, DST + DST),
    ("far jumps", [(6, bpf.ip("10.1.0.0") + i, 80 + (i % 7)) for i in range(200)],
     [(17 - 11 * (i % 2), bpf.ip("172.16.0.0") + i // 3, 53 + i) for i in range(120)]),
]


@pytest.mark.parametrize("name,svc,dst", LENGTH_CASES, ids=[c[0] for c in LENGTH_CASES])
def test_length_is_known_before_building(name, svc, dst):
    # program_length is what decides the fallback: it must be the length built.
    assert bpf.program_length(svc, dst) == len(bpf.program(svc, dst))


def test_longest_program_is_built_and_one_more_falls_back():
    # One VIP, one protocol, n ports: 48 + 2n instructions, so 2024 ports make
    # exactly BPF_MAXINSNS, which the kernel still takes (sk_chk_filter).
    ports = [(6, bpf.ip(VIP), 1 + p) for p in range(2024)]
    prog = bpf.program(ports, [])
    assert len(prog) == bpf.BPF_MAXINSNS
    last = frame("1.2.3.4", VIP, 6, 1, 2024)
    assert kernel_accepts(prog, [last, frame("1.2.3.4", VIP, 6, 1, 2025)]) == [True, False]
    assert bpf.program(ports + [(6, bpf.ip(VIP), 2025)], []) == bpf.accept_ipv4_l4()


def test_ten_thousand_services_fall_back_in_milliseconds():
    # Issue 5 item 9: sizing 10,000 services used to build the whole program
    # (about a second per publish) before finding it too long.
    n = 10_000
    services = tables.empty_services(n + 1)
    services["vaddr"][:n] = bpf.ip("10.8.0.0") + np.arange(n)
    services["vport"][:n], services["proto"][:n] = 80, 6
    services["flags"][:n] = tables.SVC_F_USED
    dests = tables.empty_dests(2 * n)
    dests["daddr"] = bpf.ip("172.20.0.0") + np.arange(2 * n)
    dests["dport"], dests["svc"] = 8080, np.arange(2 * n) % n
    dests["flags"], dests["fwd"] = tables.DEST_F_USED, tables.FWD_MASQ
    best = min(timeit.repeat(lambda: bpf.for_tables(services, dests), number=1, repeat=3))
    assert best < 0.05
    prog = bpf.for_tables(services, dests)
    assert prog == bpf.accept_ipv4_l4()
    assert kernel_accepts(prog, [frame("1.2.3.4", "10.8.39.15", 6, 1, 80),    # the last VIP
                                 frame("172.20.78.31", "1.2.3.4", 6, 8080, 1),  # the last dest
                                 frame("1.2.3.4", "10.8.0.0", 1, 0, 0)]) == [True, True, False]
    # The key lists the steering table is built from come from the same packing.
    assert len(bpf.keys_of(services, "svc")) == n
    assert bpf.dest_keys(services, dests)[-1] == (6, bpf.ip("172.20.78.31"), 8080)


DIP = "192.168.1.1"  # the director's address toward the Tun real servers


def _one_service_with(fwd: int):
    services = tables.empty_services(1)
    services[0] = (bpf.ip(VIP), 80, 6, tables.SVC_F_USED, 0, 0)
    dests = tables.empty_dests(1)
    dests[0]["daddr"], dests[0]["dport"], dests[0]["svc"] = bpf.ip("192.168.2.3"), 80, 0
    dests[0]["flags"], dests[0]["fwd"] = tables.DEST_F_USED, fwd
    return services, dests


def test_icmp_errors_to_the_directors_own_addresses_come_in_with_a_tun_dest():
    """A router on a tunnel's path reports frag-needed about an outer packet
    to the director's own address (the outer source): with a Tun dest the
    filter lets ICMP errors to `own_addrs` in, and only errors."""
    prog = bpf.for_tables(*_one_service_with(tables.FWD_TUNNEL), own_addrs=[bpf.ip(DIP)])
    pkts = [frame("192.168.1.77", DIP, 1, 0, 0, icmp_type=3),
            frame("192.168.1.77", DIP, 1, 0, 0, icmp_type=4),
            frame("192.168.1.77", DIP, 1, 0, 0, icmp_type=11),
            frame("192.168.1.77", DIP, 1, 0, 0, icmp_type=8),      # echo
            frame("192.168.1.77", DIP, 6, 40000, 22),               # ssh
            frame("192.168.1.77", "192.168.1.9", 1, 0, 0, icmp_type=3),  # another host
            frame("1.2.3.4", VIP, 1, 0, 0, icmp_type=3)]            # to the VIP, as before
    want = [True, True, True, False, False, False, True]
    assert [bpf.run(prog, p) > 0 for p in pkts] == want
    assert kernel_accepts(prog, pkts) == want


@pytest.mark.parametrize("fwd", [tables.FWD_MASQ, tables.FWD_ROUTE])
def test_no_tun_dest_no_icmp_to_the_director(fwd):
    prog = bpf.for_tables(*_one_service_with(fwd), own_addrs=[bpf.ip(DIP)])
    assert prog == bpf.for_tables(*_one_service_with(fwd))
    assert bpf.run(prog, frame("192.168.1.77", DIP, 1, 0, 0, icmp_type=3)) == 0


def test_a_deleted_tun_dest_takes_the_own_addresses_out():
    services, dests = _one_service_with(tables.FWD_TUNNEL)
    dests[0]["flags"] = 0
    assert bpf.run(bpf.for_tables(services, dests, own_addrs=[bpf.ip(DIP)]),
                   frame("192.168.1.77", DIP, 1, 0, 0, icmp_type=3)) == 0


def test_length_with_own_addresses_is_known_before_building():
    own = [bpf.ip(DIP), bpf.ip(VIP), bpf.ip("10.9.9.9")]  # the VIP is counted once
    assert bpf.program_length(SVC, DST, own) == len(bpf.program(SVC, DST, own))
    assert len(bpf.program(SVC, DST, own)) == len(bpf.program(SVC, DST)) + 4
    with pytest.raises(ValueError, match="out of range"):
        bpf.program(SVC, DST, [-1])


# --- clients on the director itself (docs/io.md, "Clients on the director") ---

LOCAL_CASES = [
    # (description, frame, ports' filter with from_services, loopback port's filter)
    ("a local client's request", frame("10.0.0.254", VIP, 6, 40000, 80), True, True),
    ("a DR/Tun real server's reply from the VIP", frame(VIP, "10.0.0.254", 6, 80, 40000),
     True, False),
    ("a reply from another VIP port", frame(VIP, "10.0.0.254", 6, 81, 40000), False, False),
    ("a NAT real server's reply", frame(RIP, "10.0.0.254", 6, 8080, 40000), True, False),
    ("an ICMP error to the VIP", frame("1.2.3.4", VIP, 1, 0, 0, icmp_type=3), True, False),
]


@pytest.mark.parametrize("name,pkt,ports,lo", LOCAL_CASES, ids=[c[0] for c in LOCAL_CASES])
def test_local_client_filters(name, pkt, ports, lo):
    services, dests = SVC, DST
    port_prog = bpf.for_tables(services, dests, from_services=True)
    lo_prog = bpf.for_local(services)
    assert (bpf.run(port_prog, pkt) > 0) == ports
    assert (bpf.run(lo_prog, pkt) > 0) == lo
    assert kernel_accepts(port_prog, [pkt]) == [ports]
    assert kernel_accepts(lo_prog, [pkt]) == [lo]
    # Without local clients the ports take no frame from a VIP.
    assert (bpf.run(bpf.for_tables(services, dests), pkt) > 0) == (ports and name != (
        "a DR/Tun real server's reply from the VIP"))


def test_length_with_replies_from_services_is_known_before_building():
    svc, dst = bpf._pack_keys(SVC), bpf._pack_keys(DST)
    icmp_to = bpf._icmp_to(svc, ())
    assert bpf._packed_length(svc, dst, icmp_to, True) == len(
        bpf._program(svc, dst, icmp_to, True))
