"""The fanout steering programs against their Python twin (steer_index) and
the rule of docs/io.md: every frame of a client, both ways and inside ICMP
errors, goes to the worker of fanout_mix(client address). The eBPF program
(pylvs/bpf/fanout.bpf.c, what workers run) keys any table size by the full
rule; the classic PACKET_FANOUT_CBPF one (pylvs/io/bpf.py fanout_program,
the fallback without eBPF) falls back for big tables (fanout_plan). The
kernel's agreement is checked end to end in tests/netns/test_workers.py."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from pylvs.io import bpf
from pylvs.io.bpf import ip

VIP, RIP, TUN_RIP, CIP, DIP = "10.0.0.100", "10.0.1.11", "10.0.3.11", "192.0.2.7", "10.0.0.1"
SVC = [(6, ip(VIP), 80), (17, ip(VIP), 53)]
NAT = [(6, ip(RIP), 8080), (17, ip(RIP), 53)]


def eth(pkt) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt)


def quoting(outer_src: str, outer_dst: str, inner, icmp_type: int = 3, code: int = 4):
    return IP(src=outer_src, dst=outer_dst) / ICMP(type=icmp_type, code=code) / inner


# (description, frame, the client address it belongs to; None: index 0)
CASES = [
    ("client to VIP, TCP", eth(IP(src=CIP, dst=VIP) / TCP(sport=40000, dport=80)), CIP),
    ("client to VIP, UDP", eth(IP(src=CIP, dst=VIP) / UDP(sport=40000, dport=53)), CIP),
    ("client to VIP with IP options",
     eth(IP(src=CIP, dst=VIP, options=b"\x01\x01\x01\x00") / TCP(sport=40000, dport=80)), CIP),
    ("NAT reply from RIP:rport", eth(IP(src=RIP, dst=CIP) / TCP(sport=8080, dport=40000)), CIP),
    ("NAT reply, UDP", eth(IP(src=RIP, dst=CIP) / UDP(sport=53, dport=40000)), CIP),
    ("RIP from another port: not a reply, keyed by saddr",
     eth(IP(src=RIP, dst=CIP) / TCP(sport=22, dport=40000)), RIP),
    ("a router's error about a reply the director sent from the VIP",
     eth(quoting("198.51.100.1", VIP, IP(src=VIP, dst=CIP) / TCP(sport=80, dport=40000))), CIP),
    ("a NAT real server's error about a forwarded packet",
     eth(quoting(RIP, CIP, IP(src=CIP, dst=RIP) / TCP(sport=40000, dport=8080))), CIP),
    ("an error about a VS-Tun (IPIP) packet: keyed by the inner packet",
     eth(quoting("10.0.3.254", DIP, IP(src=DIP, dst=TUN_RIP, proto=4)
                 / IP(src=CIP, dst=VIP) / TCP(sport=40000, dport=80), code=4)), CIP),
    ("time exceeded is an error too",
     eth(quoting("198.51.100.1", VIP, IP(src=VIP, dst=CIP) / UDP(sport=53, dport=40000),
                 icmp_type=11, code=0)), CIP),
    ("echo request to the VIP: not an error, keyed by saddr",
     eth(IP(src=CIP, dst=VIP) / ICMP(type=8)), CIP),
    ("an error whose quoted header is cut short: 0",
     eth(IP(src="198.51.100.1", dst=VIP) / ICMP(type=3, code=4) / bytes(IP(src=VIP, dst=CIP))[:12]),
     None),
    ("ARP: 0", bytes(Ether() / ARP(psrc=CIP, pdst=VIP)), None),
]


def kernel_index(prog, frame: bytes, n: int) -> int:
    """What af_packet.c fanout_demux_bpf picks: the program run on the IP
    packet (network header), its return value modulo the member count."""
    proto = int.from_bytes(frame[12:14], "big")
    return bpf.run(prog, frame[14:], protocol=proto) % n


@pytest.mark.parametrize("desc,frame,client", CASES, ids=[c[0] for c in CASES])
def test_program_and_python_twin_agree_with_the_rule(desc, frame, client):
    prog = bpf.fanout_program(SVC, NAT)
    assert len(prog) <= bpf.BPF_MAXINSNS
    for n in (2, 3, 4, 7):
        want = 0 if client is None else bpf.fanout_mix(ip(client)) % n
        assert kernel_index(prog, frame, n) == want, (desc, n)
        assert bpf.steer_index(frame, n, SVC, NAT) == want, (desc, n)


@pytest.mark.parametrize("lane", [0, 1])
@pytest.mark.parametrize("desc,frame,client", CASES, ids=[c[0] for c in CASES])
def test_lanes_program_picks_the_worker_then_its_lane(desc, frame, client, lane):
    # --ring auto: two members per worker (V3 ring 2k, V2 lane 2k+1); the
    # worker is the one the plain program picks, whatever the lane.
    for n in (1, 2, 3):
        prog = bpf.fanout_program(SVC, NAT, lanes=(n, lane))
        # A frame the program cannot key (client None) ends with 0, as the
        # kernel ends a load beyond the packet: worker 0's V3 ring.
        want = 0 if client is None else 2 * bpf.steer_index(frame, n, SVC, NAT) + lane
        assert kernel_index(prog, frame, 2 * n) == want, (desc, n)


def test_lanes_program_refuses_bad_lanes():
    for bad in ((0, 0), (2, 2), (1, -1)):
        with pytest.raises(ValueError):
            bpf.fanout_program(SVC, NAT, lanes=bad)


def test_many_clients_spread_over_the_workers():
    prog = bpf.fanout_program(SVC, NAT)
    seen = [kernel_index(prog, eth(IP(src=f"192.0.2.{i}", dst=VIP) / TCP(sport=1, dport=80)), 4)
            for i in range(1, 61)]
    assert set(seen) == {0, 1, 2, 3}
    assert max(seen.count(k) for k in range(4)) <= 30


def test_published_tables_key_like_key_lists():
    from pylvs.engine import tables

    services = tables.empty_services(2)
    services[0] = (ip(VIP), 80, 6, tables.SVC_F_USED, 0, 0)
    dests = tables.empty_dests(2)
    dests[0]["daddr"], dests[0]["dport"], dests[0]["svc"] = ip(RIP), 8080, 0
    dests[0]["fwd"], dests[0]["flags"] = tables.FWD_MASQ, tables.DEST_F_USED
    assert bpf.fanout_program(services, dests) == bpf.fanout_program([SVC[0]], [NAT[0]])


def test_big_tables_fall_back_to_addresses_then_to_saddr():
    # 500 services on 500 addresses: the full key match would not fit.
    svc = [(6, ip("10.10.0.0") + i, 80) for i in range(500)]
    nat = [(6, ip("10.20.0.0") + i, 8080) for i in range(500)]
    assert bpf.fanout_plan(svc, nat) == bpf.FANOUT_ADDRS
    prog = bpf.fanout_program(svc, nat)
    assert len(prog) <= bpf.BPF_MAXINSNS
    reply = eth(IP(src="10.20.0.5", dst=CIP) / TCP(sport=9999, dport=40000))
    plan = bpf.FANOUT_ADDRS
    for n in (2, 3):   # addresses only: a reply from any port of a RIP is keyed by daddr
        assert kernel_index(prog, reply, n) == bpf.steer_index(reply, n, svc, nat, plan) \
            == bpf.fanout_mix(ip(CIP)) % n
    huge = [(6, ip("10.30.0.0") + i, 80) for i in range(3000)]
    assert bpf.fanout_plan(huge, nat) == bpf.FANOUT_SADDR
    prog = bpf.fanout_program(huge, nat)
    assert len(prog) <= bpf.BPF_MAXINSNS
    nat_reply = eth(IP(src="10.20.0.5", dst=CIP) / TCP(sport=8080, dport=40000))
    for frame in (reply, nat_reply):   # keyed by saddr: a NAT reply lands anywhere
        assert kernel_index(prog, frame, 3) \
            == bpf.steer_index(frame, 3, huge, nat, bpf.FANOUT_SADDR) \
            == bpf.fanout_mix(ip("10.20.0.5")) % 3
    # The full rule, which the eBPF programs follow at any size: the NAT
    # reply goes to its client's worker.
    assert bpf.steer_index(nat_reply, 3, huge, nat) == bpf.fanout_mix(ip(CIP)) % 3


# --- the eBPF program (BPF_PROG_TEST_RUN runs a socket filter on the skb at
# its network header, as fanout demux does) ----------------------------------

def fanout_steering(workers: int, lanes: bool = False):
    from pylvs.io.afpacket import FanoutSteering

    try:
        return FanoutSteering(workers, lanes=lanes, max_services=4096, max_dests=4096)
    except OSError as e:   # pragma: no cover - CI runs as root with clang-built objects
        pytest.fail(f"the eBPF fanout program does not load: {e}")


@pytest.mark.parametrize("lanes", [False, True])
def test_ebpf_program_follows_the_rule_at_any_table_size(lanes):
    from pylvs import _bpf

    huge = SVC + [(6, ip("10.30.0.0") + i, 80) for i in range(3000)]
    for svc in (SVC, huge):
        fs = fanout_steering(3, lanes)
        try:
            fs.apply(svc, NAT)
            for lane in (0, 1):
                fs.set_lane(lane)
                for desc, frame, client in CASES:
                    got = _bpf.prog_test_run(fs.prog_id, frame)
                    want = bpf.steer_index(frame, 1 << 16, svc, NAT)
                    if lanes:
                        want = (want % 3) * 2 + lane
                    if client is not None:
                        assert got == want, (desc, len(svc), lane)
                    else:   # cannot be keyed: worker 0 (the lane with lanes)
                        assert got == (lane if lanes else 0), (desc, len(svc), lane)
        finally:
            fs.close()


@pytest.mark.parametrize("svc,nat", [([], []), (SVC, NAT), (SVC, []), ([], NAT)])
def test_program_length_is_known_before_building(svc, nat):
    packed_svc, packed_frm = bpf._fanout_sets(svc, nat)
    want = bpf._FANOUT_HEAD_LEN + bpf._match_len(packed_svc) + bpf._match_len(packed_frm)
    assert len(bpf.fanout_program(svc, nat)) == want
    assert len(bpf.fanout_program(svc, nat, lanes=(2, 1))) == want + bpf._FANOUT_LANES_LEN


def test_lanes_count_in_the_plan():
    """A table that just fits without lanes falls back to addresses with
    them, so the program never exceeds BPF_MAXINSNS (1,000 services on one
    VIP made 4,097 instructions)."""
    svc = [(6, bpf.ip(VIP), 10000 + i) for i in range(1000)]
    nat = [(6, bpf.ip(RIP), 80)]
    for lanes in (None, (1, 0), (2, 1)):
        assert len(bpf.fanout_program(svc, nat, lanes=lanes)) <= bpf.BPF_MAXINSNS, lanes
    assert bpf.fanout_plan(svc, nat, lanes=True) == bpf.FANOUT_ADDRS


def test_bad_worker_count_is_refused():
    with pytest.raises(ValueError):
        bpf.steer_index(CASES[0][1], 0, SVC, NAT)


# --- persistence: the client address masked, port-0 services ---------------
#
# Every client one template covers (caddr & -M netmask) must reach the worker
# that holds the template: all rules key the client address ANDed with
# bpf.client_mask, the AND of the persistent services' netmasks. A port-0
# service takes every port, and its dests (port 0) answer from any.

VIP0, RIP0 = "10.0.0.200", "10.0.1.20"


def persist_tables(services, nats):
    """Published tables: services (proto, vip, port, timeout, netmask),
    NAT dests (service index, rip, rport)."""
    from pylvs.engine import tables

    svc = tables.empty_services(len(services) + 1)
    for i, (proto, vip, port, timeout, mask) in enumerate(services):
        svc[i] = (ip(vip), port, proto, tables.SVC_F_USED, timeout, ip(mask))
    svc[len(services)] = (ip("10.9.9.9"), 1, 6, 0, 300, ip("255.0.0.0"))   # unused row
    dst = tables.empty_dests(len(nats))
    for j, (s, rip, rport) in enumerate(nats):
        dst[j]["daddr"], dst[j]["dport"], dst[j]["svc"] = ip(rip), rport, s
        dst[j]["fwd"], dst[j]["flags"] = tables.FWD_MASQ, tables.DEST_F_USED
    return svc, dst


PERSIST_TABLES = persist_tables(
    [(6, VIP, 80, 0, "255.255.255.255"),            # not persistent: its netmask is no matter
     (6, VIP0, 0, 300, "255.255.255.0"),           # port 0, -M /24
     (17, VIP0, 0, 300, "255.255.0.0"),            # port 0, -M /16: the AND is /16
     (6, VIP, 443, 60, "255.255.255.255")],
    [(0, RIP, 8080), (1, RIP0, 0), (2, RIP0, 0), (3, RIP, 443)])

# (description, frame, the client address it belongs to)
PERSIST_CASES = [
    ("client to a port-0 service, any port",
     eth(IP(src=CIP, dst=VIP0) / TCP(sport=40000, dport=5001)), CIP),
    ("another client of the same /16", eth(IP(src="192.0.77.9", dst=VIP0) / TCP(sport=1, dport=22)),
     "192.0.77.9"),
    ("UDP to the port-0 service", eth(IP(src=CIP, dst=VIP0) / UDP(sport=4, dport=53)), CIP),
    ("NAT reply from a port-0 dest, any port",
     eth(IP(src=RIP0, dst=CIP) / TCP(sport=5001, dport=40000)), CIP),
    ("a non-persistent service's client: masked too (one mask for all)",
     eth(IP(src="192.0.200.1", dst=VIP) / TCP(sport=40000, dport=80)), "192.0.200.1"),
    ("NAT reply of the port-80 dest", eth(IP(src=RIP, dst=CIP) / TCP(sport=8080, dport=9)), CIP),
    ("RIP from another port is not a reply of the port-80 dest",
     eth(IP(src=RIP, dst=CIP) / TCP(sport=22, dport=9)), RIP),
]


def test_client_mask_ands_the_persistent_services_netmasks():
    svc, _ = PERSIST_TABLES
    assert bpf.client_mask(svc) == ip("255.255.0.0")
    assert bpf.client_mask(svc[:1]) == 0xFFFFFFFF         # none persistent: /32
    assert bpf.client_mask(SVC) == 0xFFFFFFFF             # key lists carry no persistence


@pytest.mark.parametrize("desc,frame,client", PERSIST_CASES, ids=[c[0] for c in PERSIST_CASES])
def test_masked_and_port_zero_rules_agree(desc, frame, client):
    svc, dst = PERSIST_TABLES
    prog = bpf.fanout_program(svc, dst)
    assert len(prog) == bpf._FANOUT_HEAD_LEN + sum(map(bpf._match_len, bpf._fanout_sets(svc, dst)))
    for n in (2, 3, 4, 7):
        want = bpf.fanout_mix(ip(client) & ip("255.255.0.0")) % n
        assert kernel_index(prog, frame, n) == want, (desc, n)
        assert bpf.steer_index(frame, n, svc, dst) == want, (desc, n)


def test_clients_of_one_template_network_share_a_worker():
    svc, dst = persist_tables([(6, VIP, 80, 300, "255.255.255.0")], [(0, RIP, 8080)])
    prog = bpf.fanout_program(svc, dst)
    for n in (2, 3, 4):
        seen = {kernel_index(prog, eth(IP(src=f"192.0.2.{i}", dst=VIP) / TCP(sport=i, dport=80)), n)
                for i in range(1, 255)}
        assert len(seen) == 1
        nets = {bpf.steer_index(eth(IP(src=f"192.0.{k}.1", dst=VIP) / TCP(sport=1, dport=80)),
                                n, svc, dst) for k in range(40)}
        assert len(nets) == n   # other /24s still spread


def test_ebpf_program_masks_and_takes_port_zero():
    from pylvs import _bpf

    svc, dst = PERSIST_TABLES
    fs = fanout_steering(3)
    try:
        fs.apply(svc, dst)
        for desc, frame, client in PERSIST_CASES + CASES:
            got = _bpf.prog_test_run(fs.prog_id, frame)
            want = bpf.steer_index(frame, 1 << 16, svc, dst)
            if client is not None:
                assert got == want, desc
        # Back to no persistent service: /32 again.
        plain = persist_tables([(6, VIP, 80, 0, "255.255.255.0")], [(0, RIP, 8080)])
        fs.apply(*plain)
        frame = PERSIST_CASES[4][1]
        assert _bpf.prog_test_run(fs.prog_id, frame) == bpf.fanout_mix(ip("192.0.200.1"))
    finally:
        fs.close()
