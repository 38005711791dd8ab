"""The real-server decapsulator's parsing: a table of IPIP/GUE packets built with scapy."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from pylvs.realserver.decap import ACCEPT, COUNTER_NAMES, DROPS, IGNORE, decapsulate

RIP, DIP, VIP, CIP = "10.1.0.2", "10.1.0.1", "192.0.2.10", "198.51.100.7"
LOCAL = frozenset({socket.inet_aton(RIP)})
VIPS = frozenset({socket.inet_aton(VIP)})
PORT = 6080


def inner(**kw) -> IP:
    fields = {"src": CIP, "dst": VIP, "ttl": 63, **kw}
    return IP(**fields) / TCP(sport=40000, dport=8080, flags="S", seq=1)


def ipip(payload, **kw) -> bytes:
    return bytes(IP(src=DIP, dst=RIP, proto=4, **kw) / payload)


def gue(payload, b0=0x00, proto=4, flags=0, ext=b"", chksum=None, dport=PORT) -> bytes:
    hdr = bytes([b0 | len(ext) // 4, proto]) + flags.to_bytes(2, "big") + ext
    udp = UDP(sport=51000, dport=dport) if chksum is None else UDP(sport=51000, dport=dport,
                                                                  chksum=chksum)
    return bytes(IP(src=DIP, dst=RIP) / udp / Raw(hdr + bytes(payload)))


def corrupt(pkt: bytes, offset: int, value: int) -> bytes:
    b = bytearray(pkt)
    b[offset] = value
    return bytes(b)


GOOD = bytes(inner())
GOOD_FRAG = bytes(inner(flags="MF", frag=0))
BAD_INNER_CSUM = bytes(IP(src=CIP, dst=VIP, chksum=0x1234) / TCP(dport=8080))

# (description, packet, gue_port, expected counter, expected inner bytes or None)
CASES = [
    ("good IPIP", ipip(GOOD), None, "decap_ipip", GOOD),
    ("good IPIP with Ethernet padding after it", ipip(GOOD) + b"\0" * 6, None, "decap_ipip", GOOD),
    ("good GUE, UDP checksum computed", gue(GOOD), PORT, "decap_gue", GOOD),
    ("good GUE, no UDP checksum (--tun-nocsum)", gue(GOOD, chksum=0), PORT, "decap_gue", GOOD),
    ("GUE with a private-data word, no remcsum", gue(GOOD, flags=1, ext=b"\0\0\0\0"), PORT,
     "decap_gue", GOOD),
    ("inner first fragment: passed, the kernel reassembles", ipip(GOOD_FRAG), None,
     "decap_ipip", GOOD_FRAG),
    ("inner bytes beyond its total length are trimmed", ipip(Raw(GOOD + b"xyz")), None,
     "decap_ipip", GOOD),
    ("IPIP to another host", bytes(IP(src=DIP, dst="10.1.0.99", proto=4) / inner()), None,
     IGNORE, None),
    ("plain TCP to this host", bytes(IP(src=CIP, dst=RIP) / TCP()), PORT, IGNORE, None),
    ("UDP to another port", gue(GOOD, dport=PORT + 1), PORT, IGNORE, None),
    ("GUE when no --gue-port", gue(GOOD), None, IGNORE, None),
    ("not IPv4 at all", b"\x60" + b"\0" * 39, None, IGNORE, None),
    ("shorter than an IP header", b"\x45\0\0", None, IGNORE, None),
    ("inner to a VIP not ours", ipip(inner(dst="192.0.2.11")), None, "drop_inner_not_vip", None),
    ("outer truncated (total length beyond the packet)", ipip(GOOD)[:30], None,
     "drop_outer_length", None),
    ("outer IHL 4", corrupt(ipip(GOOD), 0, 0x44), None, "drop_outer_header", None),
    ("outer header checksum wrong", corrupt(ipip(GOOD), 8, 0x01), None,
     "drop_outer_checksum", None),
    ("outer fragment", ipip(GOOD, flags="MF"), None, "drop_outer_fragment", None),
    ("inner truncated to 10 bytes", ipip(Raw(GOOD[:10])), None, "drop_inner_truncated", None),
    ("inner cut short (total length beyond)", ipip(Raw(GOOD[:30])), None,
     "drop_inner_length", None),
    ("inner is IPv6", ipip(Raw(b"\x60" + GOOD[1:])), None, "drop_inner_version", None),
    ("inner IHL 3", ipip(Raw(b"\x43" + GOOD[1:])), None, "drop_inner_header", None),
    ("inner header checksum wrong", ipip(BAD_INNER_CSUM), None, "drop_inner_checksum", None),
    ("GUE version 1", gue(GOOD, b0=0x40), PORT, "drop_gue_version", None),
    ("GUE control message", gue(GOOD, b0=0x20), PORT, "drop_gue_control", None),
    ("GUE carrying proto 41 (IPv6)", gue(GOOD, proto=41), PORT, "drop_gue_proto", None),
    ("GUE with an unknown flag", gue(GOOD, flags=0x8000), PORT, "drop_gue_flags", None),
    ("GUE with remote checksum offload", gue(GOOD, flags=1, ext=b"\x80\0\0\0"), PORT,
     "drop_gue_remcsum", None),
    ("GUE header cut off", bytes(IP(src=DIP, dst=RIP) / UDP(dport=PORT) / Raw(b"\0\4")), PORT,
     "drop_gue_truncated", None),
    ("GUE extension beyond the packet", gue(Raw(b""), b0=0x05), PORT, "drop_gue_truncated", None),
    ("GUE with a wrong UDP checksum", gue(GOOD, chksum=0x1234), PORT,
     "drop_gue_udp_checksum", None),
]


@pytest.mark.parametrize("desc,pkt,port,want,inner_want", CASES, ids=[c[0] for c in CASES])
def test_decapsulate(desc, pkt, port, want, inner_want):
    got, got_inner = decapsulate(pkt, LOCAL, VIPS, port)
    assert got == want, desc
    assert (None if got_inner is None else bytes(got_inner)) == inner_want


def test_every_drop_reason_has_a_row_and_a_counter():
    assert {c[3] for c in CASES} >= set(DROPS) | set(ACCEPT) | {IGNORE}
    assert set(DROPS) <= set(COUNTER_NAMES)


def test_random_garbage_never_raises():
    import random
    rnd = random.Random(6)
    good = ipip(GOOD)
    for _ in range(3000):
        b = bytearray(good[:rnd.randrange(len(good) + 1)])
        for _ in range(rnd.randrange(4)):
            if b:
                b[rnd.randrange(len(b))] = rnd.randrange(256)
        name, got = decapsulate(bytes(b), LOCAL, VIPS, PORT)
        assert name in COUNTER_NAMES
        assert (got is None) == (name not in ACCEPT)


FILTER_CASES = [
    ("IPIP to this host", ipip(GOOD), 0, 0x0800, None, True),
    ("GUE to the port", gue(GOOD), 0, 0x0800, PORT, True),
    ("GUE when no --gue-port", gue(GOOD), 0, 0x0800, None, False),
    ("UDP to another port", gue(GOOD, dport=PORT + 1), 0, 0x0800, PORT, False),
    ("GUE non-first fragment", bytes(IP(src=DIP, dst=RIP, frag=100, proto=17) / Raw(b"\0" * 40)),
     0, 0x0800, PORT, False),
    ("IPIP to another host's MAC", ipip(GOOD), 3, 0x0800, PORT, False),
    ("plain TCP", bytes(IP(src=CIP, dst=RIP) / TCP()), 0, 0x0800, PORT, False),
    ("an ARP payload with byte 9 == 4", b"\0\1\x08\0\6\4\0\1\0\4" + b"\0" * 18, 0, 0x0806,
     None, False),
]


@pytest.mark.parametrize("desc,pkt,pkttype,proto,port,accepted", FILTER_CASES,
                         ids=[c[0] for c in FILTER_CASES])
def test_socket_filter(desc, pkt, pkttype, proto, port, accepted):
    from pylvs.io import bpf
    from pylvs.realserver.run import tunnel_filter
    assert bool(bpf.run(tunnel_filter(port), pkt, pkttype, proto)) == accepted


class _DeadSocket:
    """A tap whose interface went away: every recv fails as the kernel makes it."""

    def __init__(self, err):
        self.err, self.closed = err, False

    def recv_into(self, buf):
        raise OSError(self.err, "link error")

    def getsockopt(self, *a):
        return bytes(8)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("err", [100, 6, 19])   # ENETDOWN, ENXIO, ENODEV
def test_decapsulator_counts_link_errors_and_waits_for_a_deleted_interface(
        tmp_path, monkeypatch, capsys, err):
    from pylvs.realserver import config, run
    monkeypatch.setattr(config, "STATE_DIR", tmp_path)
    monkeypatch.setattr(run, "REATTACH_INTERVAL", 0.01)
    d = run.Decapsulator("eth0", [VIP], None, "plvsdec0")
    d.sock, d.ifindex = _DeadSocket(err), 7
    dead = d.sock

    def gone(name):
        raise OSError(19, "No such device")
    monkeypatch.setattr(run.socket, "if_nametoindex", gone)
    turns = iter(range(5))
    d.loop(lambda: next(turns, None) is None, lambda: False)
    assert d.counters["error_link"] == 1 and d.counters["reattach"] == 0
    assert dead.closed and d.sock is None
    err_text = capsys.readouterr().err
    assert "carrying on" in err_text
    # Said once, however long it stays gone.
    assert err_text.count("eth0 is gone; looking for it again every") == 1
