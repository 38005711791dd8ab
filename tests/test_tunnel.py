"""VS-Tun encapsulation (IPIP, GUE), GSO segmentation and partial checksums.

Every case runs through the C functions (pylvs/_fast/ip_vs_xmit_tun.c,
through the _fast test hooks) and their Python twins (pylvs/engine/tunnel.py)
on separate emit areas that must end up identical byte for byte; the frames
are then read back with scapy, which recomputes every checksum.
"""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from engine_kit import CIP, CMAC, LMAC, RIP, RMAC, SMAC, VIP, ip, mac, partial_vnet, \
    scapy_rebuild, tcp, udp, v
from pylvs import _fast
from pylvs.engine import tables, tunnel
from pylvs.engine.tunnel import Tun
from test_icmp import both, ip_part, mutate, small_emit

DIP = "192.168.1.1"                       # the director's address toward the real servers
ETH_OUT = mac(RMAC) + mac(SMAC) + b"\x08\x00"
IPIP = Tun(tunnel.TUN_IPIP, 0, 0, 0, ip(DIP), ip(RIP))
GUE_CSUM = Tun(tunnel.TUN_GUE, 1, 49152 + 77, 6080, ip(DIP), ip(RIP))
GUE_NOCSUM = Tun(tunnel.TUN_GUE, 0, 40000, 5555, ip(DIP), ip(RIP))
GRE = Tun(2, 0, 0, 0, ip(DIP), ip(RIP))   # ipvsadm's type 2: not built
GUE_HDR = b"\x00\x04\x00\x00"             # variant 0, C 0, hlen 0, proto 4 (IPv4), flags 0


def big_emit():
    return small_emit(nbytes=256 * 1024, max_frames=256)




def run_encap(ip_bytes: bytes, t: Tun, ip_id=0x4242, port=1, ip_len=None, make_emit=small_emit):
    """tun_encap (through ipip_encap / gue_encap) in both implementations."""
    n = len(ip_bytes) if ip_len is None else ip_len
    if t.type == tunnel.TUN_IPIP:
        py = lambda em: tunnel.ipip_encap(em, port, ETH_OUT, ip_bytes, n, t.saddr, t.daddr, ip_id)
    elif t.type == tunnel.TUN_GUE:
        py = lambda em: tunnel.gue_encap(em, port, ETH_OUT, ip_bytes, n, t.saddr, t.daddr,
                                         t.sport, t.dport, bool(t.csum), ip_id)
    else:
        py = lambda em: tunnel.tun_encap(em, port, ETH_OUT, ip_bytes, n, t, ip_id)
    return both(py, lambda em: _fast._tun_encap(em.arrays, port, ETH_OUT, ip_bytes, n, tuple(t),
                                                ip_id), make_emit)


def check_outer(f: bytes, t: Tun, inner: bytes, ip_id: int) -> None:
    """One encapsulated frame, read by scapy: the outer headers as
    ip_vs_tunnel_xmit writes them and the inner packet unchanged."""
    assert f[:10] == bytes(10) and f[10:24] == ETH_OUT
    eth = f[10:]
    ovh = tunnel.tun_overhead(t.type)
    assert len(eth) == 14 + ovh + len(inner)
    o = IP(eth[14:])
    i = IP(inner)
    assert (o.version, o.ihl, o.tos, o.len, o.id, o.frag, o.ttl, o.src, o.dst) == \
        (4, 5, i.tos, ovh + len(inner), ip_id, 0, i.ttl, DIP, RIP)
    assert int(o.flags) == int(i.flags) & 2            # DF copied, MF never
    rebuilt = IP(raw(o)[:20])
    del rebuilt.chksum
    assert raw(rebuilt) == eth[14:34], "outer IP checksum"
    if t.type == tunnel.TUN_IPIP:
        assert o.proto == 4 and isinstance(o.payload, IP)
        assert raw(o.payload) == inner
        return
    assert o.proto == 17
    u = o[UDP]
    assert (u.sport, u.dport, u.len) == (t.sport, t.dport, 12 + len(inner))
    body = eth[42:]
    assert body[:4] == GUE_HDR and body[4:] == inner
    if t.csum:
        want = UDP(raw(IP(src=DIP, dst=RIP) / UDP(sport=t.sport, dport=t.dport) / Raw(body))[20:])
        assert u.chksum == want.chksum != 0
    else:
        assert u.chksum == 0


# --- encapsulation -------------------------------------------------------------

INNER = [
    # (description, inner IPv4 packet)
    ("a TCP SYN", ip_part(tcp())),
    ("TOS, DF and TTL 5 copied", raw(IP(src=CIP, dst=VIP, tos=0xB9, flags="DF", ttl=5)
                                     / TCP(flags="PA") / Raw(b"d" * 100))),
    ("TTL 1 is copied as it is (the caller decides on time exceeded)",
     raw(IP(src=CIP, dst=VIP, ttl=1) / UDP() / Raw(b"z"))),
    ("an inner header with options",
     ip_part(tcp(options=[IPOption(b"\x82\x0b" + b"\x33" * 9 + b"\0")], flags="A"))),
    ("UDP, odd length (the GUE sum pads a zero byte)", ip_part(udp(payload=b"abc"))),
    ("UDP sent without a checksum", ip_part(udp(chksum=0, payload=b"no sum"))),
    ("ICMP: any protocol goes through a tunnel",
     raw(IP(src=CIP, dst=VIP, ttl=9) / ICMP(type=8) / Raw(b"ping"))),
    ("a 1500-byte packet", ip_part(tcp(flags="PA", ip_flags="DF", payload=bytes(range(256)) * 5
                                       + b"x" * 180))),
    ("an inner first fragment: DF clear, MF not copied",
     ip_part(udp(flags="MF", payload=b"f" * 64))),
]
TUNNELS = [("ipip", IPIP), ("gue-csum", GUE_CSUM), ("gue-nocsum", GUE_NOCSUM)]


@pytest.mark.parametrize("tname,t", TUNNELS, ids=[n for n, _ in TUNNELS])
@pytest.mark.parametrize("desc,inner", INNER, ids=[d for d, _ in INNER])
def test_encap(desc, inner, tname, t):
    r, frames = run_encap(inner, t, ip_id=0xBEEF, port=4)
    assert len(frames) == 1
    port, f = frames[0]
    assert port == 4 and r == len(f)
    check_outer(f, t, inner, 0xBEEF)


def test_encap_reads_only_ip_len_and_appends_after_other_frames():
    inner = ip_part(udp(payload=b"q" * 30))
    r, frames = run_encap(inner + b"\xee" * 7, GUE_CSUM, ip_len=len(inner),
                          make_emit=lambda: small_emit(filled=2))
    assert len(frames) == 3 and frames[0][1] == bytes([1]) * 100
    check_outer(frames[2][1], GUE_CSUM, inner, 0x4242)


def test_gue_checksum_that_sums_to_zero_is_sent_as_ffff():
    """RFC 768: a computed UDP checksum of 0 goes as 0xffff (0 means none)."""
    base = bytearray(ip_part(udp(payload=b"\0\0" + b"w" * 20)))
    _, frames = run_encap(bytes(base), GUE_CSUM)
    c = int.from_bytes(frames[0][1][10 + 14 + 26:10 + 14 + 28], "big")
    # adding the complement of what the sum was makes it all ones: checksum 0
    at = 28
    base[at:at + 2] = c.to_bytes(2, "big")
    _, frames = run_encap(bytes(base), GUE_CSUM)
    f = frames[0][1]
    assert f[10 + 14 + 26:10 + 14 + 28] == b"\xff\xff"
    assert IP(f[24:])[UDP].chksum == 0xFFFF


NOT_ENCAPSULATED = [
    # (description, inner, tunnel, run_encap kwargs)
    ("IHL 4", mutate(ip_part(tcp()), 0, b"\x44"), IPIP, {}),
    ("version 6", mutate(ip_part(tcp()), 0, b"\x65"), GUE_CSUM, {}),
    ("ip_len shorter than the header", ip_part(tcp()), IPIP, dict(ip_len=19)),
    ("IHL beyond ip_len", mutate(ip_part(tcp()), 0, b"\x4f"), IPIP, dict(ip_len=40)),
    ("total length says more than ip_len (truncated)", ip_part(tcp(payload=b"t" * 10)), IPIP,
     dict(ip_len=45)),
    ("total length says less than ip_len", mutate(ip_part(tcp()), 2, b"\x00\x27"), IPIP, {}),
    ("outer over 65535 bytes (IPIP)",
     mutate(ip_part(udp(payload=b"\0" * 65500)), 2, (65516).to_bytes(2, "big"))[:65516], IPIP,
     dict(make_emit=big_emit)),
    ("GRE is not built", ip_part(tcp()), GRE, {}),
    ("no room: the buffer", ip_part(tcp()), IPIP,
     dict(make_emit=lambda: small_emit(nbytes=183, filled=1))),
    ("no room: GUE needs 12 more bytes than IPIP", ip_part(tcp()), GUE_NOCSUM,
     dict(make_emit=lambda: small_emit(nbytes=195, filled=1))),
    ("no room: the frame slots", ip_part(tcp()), IPIP,
     dict(make_emit=lambda: small_emit(max_frames=2, filled=2))),
]


def assert_refused(run, data: bytes, t: Tun | None, kw: dict) -> None:
    """run(data, t, **kw) returns 0 and leaves the emit area (one frame in it
    unless kw's make_emit says otherwise) as it was."""
    make = kw.get("make_emit", lambda: small_emit(filled=1))
    r, frames = run(data, t, **{**kw, "make_emit": make})
    assert r == 0 and frames == make().frames()


@pytest.mark.parametrize("desc,inner,t,kw", NOT_ENCAPSULATED, ids=[r[0] for r in NOT_ENCAPSULATED])
def test_encap_refuses_without_change(desc, inner, t, kw):
    assert_refused(run_encap, inner, t, kw)


def test_encap_exact_fit():
    inner = ip_part(tcp())                # 40 bytes: IPIP frame 84, GUE 96
    for t, need in ((IPIP, 84), (GUE_CSUM, 96)):
        r, frames = run_encap(inner, t, make_emit=lambda: small_emit(nbytes=100 + need, filled=1))
        assert r == need and len(frames) == 2


# --- GSO segmentation ----------------------------------------------------------

TS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]


def tcp_gso(payload: bytes, mss: int, flags="PA", seq=1000, ecn=False, **kw) -> bytes:
    """A TCPv4 GSO super-frame (vnet header first) as a sender with TSO hands it over."""
    f = tcp(flags=flags, seq=seq, ack=77, payload=payload, **kw)
    gso = tables.VNET_GSO_TCPV4 | (tunnel.VNET_GSO_ECN if ecn else 0)
    return partial_vnet(f, gso, mss)


def udp_gso(payload: bytes, mss: int, **kw) -> bytes:
    return partial_vnet(udp(payload=payload, **kw), tables.VNET_GSO_UDP_L4, mss)


def with_tcp_options(vframe: bytes, options) -> bytes:
    """The super-frame rebuilt with TCP options (scapy lays them out)."""
    e = Ether(vframe[10:])
    e[TCP].options = options
    del e[IP].len, e[IP].chksum, e[TCP].dataofs, e[TCP].chksum
    vn = tables.VNET_HDR.unpack_from(vframe)
    return partial_vnet(raw(e), vn[1], vn[3])


def payload_of(pkt: bytes) -> bytes:
    hl = (pkt[0] & 15) * 4
    l4 = hl + ((pkt[hl + 12] >> 4) * 4 if pkt[9] == 6 else 8)
    return pkt[l4:int.from_bytes(pkt[2:4], "big")]


def run_gso(vframe: bytes, t: Tun | None, ip_id=0x0F00, port=1, ip_len=None, make_emit=big_emit):
    n = len(vframe) - 24 if ip_len is None else ip_len
    return both(
        lambda em: tunnel.gso_segments(em, port, ETH_OUT, vframe[:10], memoryview(vframe)[24:], n,
                                       t, ip_id),
        lambda em: _fast._gso_segments(em.arrays, port, ETH_OUT, vframe, n,
                                       None if t is None else tuple(t), ip_id),
        make_emit)


def check_segments(vframe: bytes, frames, t: Tun | None, ip_id: int, nseg: int) -> None:
    """Each segment valid per scapy; together they carry the super-frame's
    payload; seqs, IDs and flags as tcp_gso_segment / inet_gso_segment."""
    sup = vframe[24:]
    s = IP(sup)
    mss = tables.VNET_HDR.unpack_from(vframe)[3]
    ovh = 0 if t is None else tunnel.tun_overhead(t.type)
    got = b""
    assert len(frames) == nseg
    for k, (port, f) in enumerate(frames):
        seg = f[24 + ovh:]
        if t is not None:
            check_outer(f, t, seg, (ip_id + k) & 0xFFFF)
        else:
            assert f[:24] == bytes(10) + ETH_OUT
        eth = ETH_OUT + seg
        assert scapy_rebuild(eth) == eth, f"segment {k}: checksums or lengths"
        p = IP(seg)
        assert len(seg) == p.len
        assert (p.id, p.ttl, p.tos, int(p.flags), p.src, p.dst, p.options) == \
            ((s.id + k) & 0xFFFF, s.ttl, s.tos, int(s.flags), s.src, s.dst, s.options)
        body = payload_of(seg)
        last = k == nseg - 1
        assert len(body) == mss or (last and 0 < len(body) <= mss) or (nseg == 1 and not body)
        if s.proto == 6:
            th, sth = p[TCP], s[TCP]
            assert th.seq == (sth.seq + k * mss) & 0xFFFFFFFF
            assert (th.ack, th.window, th.options, th.dataofs) == \
                (sth.ack, sth.window, sth.options, sth.dataofs)
            want = int(sth.flags)
            if not last:
                want &= ~0x09                     # FIN, PSH on the last only
            if k:
                want &= ~0x80                     # CWR on the first only
            assert int(th.flags) == want
        else:
            u = p[UDP]
            assert (u.sport, u.dport, u.len) == (s[UDP].sport, s[UDP].dport, 8 + len(body))
        got += body
    assert got == payload_of(sup)


PAY = bytes(range(256)) * 40               # 10240 bytes
GSO = [
    # (description, super-frame, segments)
    ("TCP one byte over 3 x gso_size", tcp_gso(PAY[:3001], 1000), 4),
    ("TCP exactly 3 x gso_size", tcp_gso(PAY[:3000], 1000), 3),
    ("TCP FIN+PSH stay on the last segment only", tcp_gso(PAY[:2500], 1000, flags="FPA"), 3),
    ("TCP CWR+ECE, ECN GSO bit: CWR on the first only",
     tcp_gso(PAY[:4000], 1448, flags="PACE", ecn=True), 3),
    ("TCP with timestamps (data offset 8)", with_tcp_options(tcp_gso(PAY[:8000], 1448), TS), 6),
    ("TCP with IP options", tcp_gso(PAY[:3000], 1400,
                                    options=[IPOption(b"\x82\x0b" + b"\x44" * 9 + b"\0")]), 3),
    ("TCP payload within gso_size: one segment", tcp_gso(PAY[:500], 1448), 1),
    ("TCP no payload: one segment", tcp_gso(b"", 1448, flags="A"), 1),
    ("TCP seq wraps past 2**32", tcp_gso(PAY[:3000], 1000, seq=0xFFFFFC00), 3),
    ("TCP IP ID wraps past 0xffff", tcp_gso(PAY[:3000], 1000, ip_id=0xFFFF), 3),
    ("TCP DF and TOS copied into every segment",
     tcp_gso(PAY[:3000], 1000, ip_flags="DF", tos=0x10), 3),
    ("TCP 64 KiB super-frame", tcp_gso((PAY * 7)[:65495], 1448), 46),
    ("UDP_L4 one byte over", udp_gso(PAY[:3601], 1200), 4),
    ("UDP_L4 exact multiple", udp_gso(PAY[:2400], 1200), 2),
    ("UDP_L4 odd sizes", udp_gso(PAY[:1001], 333), 4),
]
GSO_TUNNELS = [("plain", None)] + TUNNELS


@pytest.mark.parametrize("tname,t", GSO_TUNNELS, ids=[n for n, _ in GSO_TUNNELS])
@pytest.mark.parametrize("desc,vframe,nseg", GSO, ids=[r[0] for r in GSO])
def test_gso_segments(desc, vframe, nseg, tname, t):
    r, frames = run_gso(vframe, t, ip_id=0xFFFE, port=6)
    assert r == nseg and {p for p, _ in frames} == {6}
    check_segments(vframe, frames, t, 0xFFFE, nseg)


def test_gso_parse_and_iter_agree_with_segments():
    """The generator the Python engine may use gives the same segments."""
    vf = tcp_gso(PAY[:5000], 1448)
    g = tunnel.gso_parse(vf[:10], vf[24:], len(vf) - 24)
    assert g is not None and (g.nseg, g.mss, g.hl, g.l4hl, g.payload) == (4, 1448, 20, 20, 5000)
    _, frames = run_gso(vf, None)
    assert list(tunnel.gso_iter(g)) == [f[24:] for _, f in frames]


def vnet_set(vframe: bytes, **fields) -> bytes:
    names = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset")
    vals = dict(zip(names, tables.VNET_HDR.unpack_from(vframe)))
    vals.update(fields)
    return tables.VNET_HDR.pack(*(vals[n] for n in names)) + vframe[10:]


GOOD_TCP = tcp_gso(PAY[:3000], 1000)
GOOD_UDP = udp_gso(PAY[:3000], 1000)
NOT_SEGMENTED = [
    # (description, super-frame, tunnel, run_gso kwargs)
    ("gso_size 0", vnet_set(GOOD_TCP, gso_size=0), None, {}),
    ("without NEEDS_CSUM", vnet_set(GOOD_TCP, flags=0), None, {}),
    ("not GSO", vnet_set(GOOD_TCP, gso_type=0), None, {}),
    ("UFO (gso_type UDP 3) is not segmented", vnet_set(GOOD_UDP, gso_type=3), None, {}),
    ("TCPV6 on an IPv4 frame", vnet_set(GOOD_TCP, gso_type=4), None, {}),
    ("ECN bit on UDP_L4", vnet_set(GOOD_UDP, gso_type=0x85), None, {}),
    ("gso_type TCPV4 on a UDP packet", vnet_set(GOOD_UDP, gso_type=1, csum_offset=16), None, {}),
    ("hdr_len beyond the frame", vnet_set(GOOD_TCP, hdr_len=14 + 3040 + 1), None, {}),
    ("csum_start not the TCP header", vnet_set(GOOD_TCP, csum_start=14 + 24), None, {}),
    ("csum_offset not the TCP checksum", vnet_set(GOOD_TCP, csum_offset=6), None, {}),
    ("csum_offset not the UDP checksum", vnet_set(GOOD_UDP, csum_offset=16), None, {}),
    ("truncated: total length beyond ip_len", GOOD_TCP, None, dict(ip_len=3039)),
    ("truncated: no room for the TCP header",
     mutate(GOOD_TCP[:24 + 39], 24 + 2, (39).to_bytes(2, "big")), None, {}),
    ("TCP data offset 4", mutate(GOOD_TCP, 24 + 32, b"\x40"), None, {}),
    ("TCP data offset beyond the packet",
     mutate(tcp_gso(b"", 1448, flags="A"), 24 + 32, b"\xf0"), None, {}),
    ("an IP fragment", mutate(GOOD_TCP, 24 + 6, b"\x20\x00"), None, {}),
    ("IHL 4", mutate(GOOD_UDP, 24, b"\x44"), None, {}),
    ("GRE tunnel not built", GOOD_TCP, GRE, {}),
    ("no room for the last plain segment", GOOD_TCP, None,
     dict(make_emit=lambda: small_emit(nbytes=100 + 2 * 1064 + 1063, filled=1))),
    ("no room for the last GUE segment", GOOD_TCP, GUE_CSUM,
     dict(make_emit=lambda: small_emit(nbytes=100 + 3 * 1096 - 1, filled=1))),
    ("no slot for the last IPIP segment", GOOD_UDP, IPIP,
     dict(make_emit=lambda: small_emit(max_frames=3, filled=1))),
]


@pytest.mark.parametrize("desc,vframe,t,kw", NOT_SEGMENTED, ids=[r[0] for r in NOT_SEGMENTED])
def test_gso_refuses_all_or_nothing(desc, vframe, t, kw):
    assert_refused(run_gso, vframe, t, kw)


def test_gso_exact_fit():
    need = 100 + 3 * 1096                  # three GUE frames of 10 + 14 + 32 + 1040
    r, frames = run_gso(GOOD_TCP, GUE_CSUM, make_emit=lambda: small_emit(nbytes=need, filled=1))
    assert r == 3 and len(frames) == 4
    check_segments(GOOD_TCP, frames[1:], GUE_CSUM, 0x0F00, 3)


# --- partial checksums ---------------------------------------------------------

def run_complete(vframe: bytes, ip_len=None):
    n = len(vframe) - 24 if ip_len is None else ip_len
    a_py, a_c = bytearray(vframe), bytearray(vframe)
    r_py = tunnel.csum_complete(memoryview(a_py)[:10], memoryview(a_py)[24:], n)
    r_c = _fast._csum_complete(a_c, n)
    assert r_py == r_c and a_py == a_c
    if r_py != 1:
        assert bytes(a_py) == vframe
    return r_py, bytes(a_py)


def udp_summing_to_zero() -> bytes:
    """A UDP frame whose full checksum computes to 0 (sent as 0xffff)."""
    f = bytearray(udp(payload=b"\0\0" + b"k" * 9))
    c = int.from_bytes(f[40:42], "big")
    f[42:44] = c.to_bytes(2, "big")       # adds ~sum: the new sum is all ones
    f[40:42] = b"\xff\xff"
    return bytes(f)


COMPLETED = [
    # (description, the full-checksum frame the sender meant)
    ("TCP with data", tcp(flags="PA", payload=b"GET / HTTP/1.1\r\n" * 9)),
    ("TCP SYN with options", raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP) /
                                 TCP(sport=1, dport=80, flags="S", options=[("MSS", 1460)]))),
    ("UDP, odd length", udp(payload=b"odd")),
    ("UDP whose checksum computes to 0 goes as 0xffff", udp_summing_to_zero()),
    ("IP options before TCP", tcp(flags="A", options=[IPOption(b"\x01\x01\x01\x00")])),
]


@pytest.mark.parametrize("desc,frame", COMPLETED, ids=[r[0] for r in COMPLETED])
def test_csum_complete(desc, frame):
    vf = partial_vnet(frame)
    r, got = run_complete(vf + b"\xaa" * 5, ip_len=len(ip_part(frame)))
    assert r == 1
    assert got[0] == 0 and got[1:10] == vf[1:10]            # only the flags byte changes
    assert got[10:] == frame + b"\xaa" * 5                  # the checksum the sender meant
    assert scapy_rebuild(frame) == frame
    if "0xffff" in desc:
        assert got[24 + 26:24 + 28] == b"\xff\xff"


NOT_COMPLETED = [
    # (description, frame, result)
    ("no NEEDS_CSUM: nothing to do", v(tcp(flags="PA", payload=b"x")), 0),
    ("a GSO frame", GOOD_TCP, -1),
    ("ICMP", tables.with_vnet(raw(Ether() / IP(src=CIP, dst=VIP) / ICMP()), flags=1,
                              csum_start=34, csum_offset=2), -1),
    ("a fragment", partial_vnet(udp(payload=b"f" * 16, flags="MF")), -1),
    ("csum_start not the L4 header", vnet_set(partial_vnet(tcp()), csum_start=30), -1),
    ("csum_offset not the UDP checksum", vnet_set(partial_vnet(udp()), csum_offset=16), -1),
    ("IHL 4", mutate(partial_vnet(tcp()), 24, b"\x44"), -1),
]


@pytest.mark.parametrize("desc,vframe,want", NOT_COMPLETED, ids=[r[0] for r in NOT_COMPLETED])
def test_csum_complete_refuses(desc, vframe, want):
    assert run_complete(vframe)[0] == want


def test_csum_complete_truncated_l4():
    vf = partial_vnet(tcp())
    assert run_complete(vf, ip_len=39)[0] == -1
    vu = partial_vnet(udp(payload=b""))
    assert run_complete(vu, ip_len=27)[0] == -1


# --- random frames: C and Python agree -----------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_random_c_equals_python(seed):
    """Random super-frames and packets (some mangled): identical bytes and
    results; every segmentation that succeeds is checked with scapy."""
    rng = random.Random(7000 + seed)
    done = 0
    for _ in range(30):
        is_tcp = rng.random() < 0.6
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 6000)))
        mss = rng.choice([100, 536, 1000, 1448, 1460, 8000])
        if is_tcp:
            vf = tcp_gso(payload, mss, flags=rng.choice(["A", "PA", "FPA", "PACE"]),
                         seq=rng.randrange(2**32), ip_id=rng.randrange(65536),
                         tos=rng.randrange(256), ecn=rng.random() < 0.3)
        else:
            vf = udp_gso(payload, mss, ip_id=rng.randrange(65536))
        mangled = rng.random() < 0.25
        if mangled:
            b = bytearray(vf)
            b[rng.randrange(24 + 40)] = rng.randrange(256)
            vf = bytes(b)
        t = rng.choice([None, IPIP, GUE_CSUM, GUE_NOCSUM])
        ip_id = rng.randrange(65536)
        r, frames = run_gso(vf, t, ip_id=ip_id, make_emit=big_emit)
        if r:
            done += 1
            if not mangled:
                check_segments(vf, frames, t, ip_id, r)
        run_complete(vf)
        inner = vf[24:]
        run_encap(inner, rng.choice([IPIP, GUE_CSUM, GUE_NOCSUM]), ip_id=ip_id,
                  make_emit=big_emit)
    assert done > 15
