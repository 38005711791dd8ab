"""ICMP errors, TCP resets, IPv4 fragments and NAT of ICMP errors.

Every case runs through the C functions (pylvs/_fast/ip_vs_icmp.c, through
the _fast test hooks) and their Python twins (pylvs/engine/icmp.py) on
separate emit areas that must end up identical byte for byte; the frames are
then read back with scapy and every checksum is recomputed by scapy.
"""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPOption
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw
from scapy.utils import checksum as scapy_checksum

from engine_kit import CIP, CMAC, LMAC, RIP, RMAC, SMAC, VIP, ip, scapy_rebuild, tcp, udp
from pylvs import _fast
from pylvs.engine import icmp, tables
from pylvs.engine.checksum import ones_sum
from pylvs.engine.icmp import Emit

ROUTER_C = "10.0.0.254"      # a router on the client side
ROUTER_R = "192.168.1.254"   # a router on the real-server side
EMIT_BYTES, EMIT_MAX = 8192, 16


def small_emit(nbytes: int = EMIT_BYTES, max_frames: int = EMIT_MAX, filled: int = 0) -> Emit:
    """An emit area, with `filled` frames of 100 bytes already in it."""
    em = Emit.new(nbytes, max_frames)
    for k in range(filled):
        mv = em.reserve(100, 9)
        mv[:] = bytes([k + 1]) * 100
    return em


def both(py_call, c_call, make_emit=small_emit):
    """Run the Python twin and the C hook on twin emit areas; they must agree
    on the result and on every byte and slot of the area. Returns (result,
    frames)."""
    em_py, em_c = make_emit(), make_emit()
    r_py = py_call(em_py)
    r_c = c_call(em_c)
    assert r_py == r_c, f"python {r_py} != c {r_c}"
    assert em_py.n.tolist() == em_c.n.tolist()
    for a, b in zip(em_py.arrays, em_c.arrays):
        assert a.tobytes() == b.tobytes()
    return r_py, em_py.frames()


def ip_part(frame: bytes) -> bytes:
    """The IPv4 packet of an Ethernet frame (no Ethernet padding)."""
    return frame[14:14 + int.from_bytes(frame[16:18], "big")]


def mutate(frame: bytes, at: int, value: bytes) -> bytes:
    """The frame with bytes at `at` (from the Ethernet header) replaced."""
    return frame[:at] + value + frame[at + len(value):]


def ip_checksums_ok_by_scapy(ip_bytes: bytes, hl: int) -> None:
    hdr = ip_bytes[:hl]
    assert scapy_checksum(hdr[:10] + b"\0\0" + hdr[12:]) == int.from_bytes(hdr[10:12], "big"), \
        "IP header checksum"


def with_ip_options(frame: bytes, opts: bytes) -> bytes:
    """The Ethernet frame with raw IPv4 options (a multiple of 4 bytes) put in
    its header; lengths and the header checksum follow (L4 sums do not
    cover options)."""
    assert len(opts) % 4 == 0 and frame[14] == 0x45
    hdr = bytearray(frame[14:34] + opts)
    hdr[0] = 0x40 | len(hdr) // 4
    hdr[2:4] = (int.from_bytes(frame[16:18], "big") + len(opts)).to_bytes(2, "big")
    hdr[10:12] = b"\0\0"
    hdr[10:12] = scapy_checksum(bytes(hdr)).to_bytes(2, "big")
    return frame[:14] + bytes(hdr) + frame[34:]


# --- the emit area -------------------------------------------------------------

def test_emit_reserve_appends_and_refuses_without_change():
    em = Emit.new(300, 3)
    a = em.reserve(100, 1)
    b = em.reserve(150, 2)
    a[:] = b"a" * 100
    b[:] = b"b" * 150
    assert em.n.tolist() == [2, 250]
    assert em.reserve(51, 3) is None            # 50 bytes left
    assert em.n.tolist() == [2, 250]
    c = em.reserve(50, 3)
    c[:] = b"c" * 50
    assert em.reserve(0, 4) is None             # three slots used
    assert em.frames() == [(1, b"a" * 100), (2, b"b" * 150), (3, b"c" * 50)]
    assert em.off.tolist() == [0, 100, 250] and em.len.tolist() == [100, 150, 50]


def test_emit_of_batch_is_what_batch_emitted_reads():
    """Both implementations append to a Batch's own emit area."""
    frame = tcp()
    batches = [tables.Batch(size=4, slot=256, emit_bytes=1024) for _ in range(2)]
    em = Emit.of(batches[0])
    assert icmp.icmp_error(em, 3, frame[:14], frame[14:], 40, 3, 3, 0, ip(VIP), 1) == 92
    assert icmp.tcp_reset(em, 3, frame[:14], frame[14:], frame[34:], 20) == 64
    b = batches[1]
    arrays = (b.emit_buf, b.emit_off, b.emit_len, b.emit_port, b.emit_n)
    assert _fast._icmp_error(arrays, 3, frame, 40, 3, 3, 0, ip(VIP), 1) == 92
    assert _fast._tcp_reset(arrays, 3, frame, 40) == 64
    assert batches[0].emitted() == batches[1].emitted() == em.frames()
    assert [(p, len(f)) for p, f in em.frames()] == [(3, 92), (3, 64)]


# --- ICMP errors ---------------------------------------------------------------

def run_icmp_error(frame, icmp_type=3, code=3, info=0, saddr=VIP, ip_id=0x1234, port=2,
                   ip_len=None, make_emit=small_emit):
    n = len(ip_part(frame)) if ip_len is None else ip_len
    return both(
        lambda em: icmp.icmp_error(em, port, frame[:14], memoryview(frame)[14:], n, icmp_type,
                                   code, info, ip(saddr), ip_id),
        lambda em: _fast._icmp_error(em.arrays, port, frame, n, icmp_type, code, info,
                                     ip(saddr), ip_id),
        make_emit)


def icmp_echo(src=CIP, dst=VIP, icmp_type=8):
    return raw(Ether(src=CMAC, dst=LMAC) / IP(src=src, dst=dst, id=3) / ICMP(type=icmp_type)
               / Raw(b"ping"))


def icmp_err_frame(icmp_type=3, quoted=None):
    inner = quoted if quoted is not None else ip_part(tcp(src=VIP, dst=CIP, sport=80, dport=1000))
    return raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP) / ICMP(type=icmp_type, code=0)
               / Raw(inner))


BIG = tcp(payload=bytes(range(256)) * 6, flags="PA")
ANSWERED = [
    # (description, frame, icmp_error kwargs, expected TOS)
    ("port unreachable for a TCP SYN", tcp(), {}, 0xC0),
    ("port unreachable for a UDP datagram", udp(payload=b"q" * 40), {}, 0xC0),
    ("TOS keeps the RFC 1349 bits only, precedence internetwork control",
     tcp(tos=0xFF), {}, 0xDE),
    ("frag-needed carries the next-hop MTU in the low 16 bits",
     BIG, dict(code=4, info=1400), 0xC0),
    ("a 1578-byte packet is quoted up to a 576-byte datagram", BIG, {}, 0xC0),
    ("the quote keeps IP options",
     tcp(options=[IPOption(b"\x07\x07\x04" + b"\0" * 5)]), {}, 0xC0),
    ("time exceeded", udp(), dict(icmp_type=11, code=0), 0xC0),
    ("an ICMP echo request is answered", icmp_echo(), {}, 0xC0),
    ("an ICMP echo reply is answered", icmp_echo(icmp_type=0), {}, 0xC0),
    ("a first fragment (MF, offset 0) is answered", tcp(ip_flags="MF"), {}, 0xC0),
    ("an informational message may be sent about an ICMP error",
     icmp_err_frame(), dict(icmp_type=0, code=0), 0xC0),
]


@pytest.mark.parametrize("desc,frame,kw,tos", ANSWERED, ids=[r[0] for r in ANSWERED])
def test_icmp_error_answers(desc, frame, kw, tos):
    orig = ip_part(frame)
    r, frames = run_icmp_error(frame, **kw)
    assert len(frames) == 1
    port, f = frames[0]
    assert port == 2 and r == len(f)
    assert f[:10] == bytes(10)
    eth = f[10:]
    e = Ether(eth)
    assert (e.dst, e.src, e.type) == (CMAC, LMAC, 0x0800)
    quote = orig[:576 - 28]
    out = ip_part(eth)
    assert len(out) == 28 + len(quote) <= 576
    assert len(eth) == 14 + len(out)
    p = IP(out)
    assert (p.version, p.ihl, p.tos, p.id, int(p.flags), p.frag, p.ttl, p.proto) == \
        (4, 5, tos, 0x1234, 0, 0, 64, 1)
    assert (p.src, p.dst) == (VIP, IP(orig).src)
    want_type = kw.get("icmp_type", 3)
    assert (out[20], out[21]) == (want_type, kw.get("code", 3 if want_type == 3 else 0))
    assert out[24:28] == kw.get("info", 0).to_bytes(4, "big")
    assert out[28:] == quote
    check_icmp_checksums(out, quoted_header=False)


REFUSED = [
    ("an ICMP error about an ICMP error (dest unreach)", icmp_err_frame(3), {}),
    ("an ICMP error about a time exceeded", icmp_err_frame(11), {}),
    ("an ICMP error about a redirect", icmp_err_frame(5), {}),
    ("an ICMP error about an unknown ICMP type (counts as an error)", icmp_echo(icmp_type=42), {}),
    ("an ICMP error about an ICMP packet with no ICMP header",
     raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP, proto=1)), {}),
    ("a non-first fragment", tcp(frag=3), {}),
    ("a non-first last fragment", udp(frag=100, flags="MF"), {}),
    ("source 0.0.0.0", tcp(src="0.0.0.0"), {}),
    ("source in 0/8", tcp(src="0.1.2.3"), {}),
    ("source loopback", tcp(src="127.0.0.1"), {}),
    ("source multicast", udp(src="224.0.0.9"), {}),
    ("source class E", udp(src="240.0.0.1"), {}),
    ("source broadcast", udp(src="255.255.255.255"), {}),
    ("destination limited broadcast", udp(dst="255.255.255.255"), {}),
    ("destination multicast", udp(dst="239.1.2.3"), {}),
    ("destination 0.0.0.0", udp(dst="0.0.0.0"), {}),
    ("IHL 4", mutate(tcp(), 14, b"\x44"), {}),
    ("IP version 6", mutate(tcp(), 14, b"\x65"), {}),
    ("ip_len shorter than an IP header", tcp(), dict(ip_len=19)),
    ("no room: the buffer", tcp(), dict(make_emit=lambda: small_emit(nbytes=91))),
    ("no room: one byte short", tcp(), dict(make_emit=lambda: small_emit(nbytes=191, filled=1))),
    ("no room: the frame slots", tcp(), dict(make_emit=lambda: small_emit(max_frames=3, filled=3))),
]


@pytest.mark.parametrize("desc,frame,kw", REFUSED, ids=[r[0] for r in REFUSED])
def test_icmp_error_refuses(desc, frame, kw):
    make = kw.get("make_emit", lambda: small_emit(filled=1))
    kw = {**kw, "make_emit": make}
    r, frames = run_icmp_error(frame, **kw)
    assert r == 0
    assert frames == make().frames()      # the area is as it was


def test_icmp_error_exact_fit_and_after_other_frames():
    frame = tcp()                        # 40-byte IP packet: a 10+14+68 = 92-byte error
    r, frames = run_icmp_error(frame, make_emit=lambda: small_emit(nbytes=192, filled=1))
    assert r == 92 and [len(f) for _, f in frames] == [100, 92]
    assert frames[0][1] == bytes([1]) * 100


# --- TCP resets ----------------------------------------------------------------

def run_tcp_reset(frame, port=0, make_emit=small_emit, ip_len=None):
    n = len(ip_part(frame)) if ip_len is None else ip_len
    hl = (frame[14] & 15) * 4
    return both(
        lambda em: icmp.tcp_reset(em, port, frame[:14], frame[14:], frame[14 + hl:], n - hl),
        lambda em: _fast._tcp_reset(em.arrays, port, frame, n),
        make_emit)


RESETS = [
    # (description, segment, expected (seq, ack, flags))
    ("a SYN: RST|ACK acknowledging the SYN", tcp(flags="S", seq=1000), (0, 1001, "RA")),
    ("an ACK with data: RST at the segment's ack", tcp(flags="PA", seq=7, ack=5000,
                                                      payload=b"x" * 100), (5000, 0, "R")),
    ("a keep-alive ACK", tcp(flags="A", seq=99, ack=0xFFFFFFFF), (0xFFFFFFFF, 0, "R")),
    ("a FIN without ACK, with data: ack counts data and FIN",
     tcp(flags="F", seq=10, payload=b"y" * 10), (0, 21, "RA")),
    ("SYN and FIN count one each", tcp(flags="SF", seq=10, payload=b"z" * 3), (0, 15, "RA")),
    ("no flags at all", tcp(flags="", seq=5, payload=b"w"), (0, 6, "RA")),
    ("the ack wraps around 2**32", tcp(flags="S", seq=0xFFFFFFFF), (0, 0, "RA")),
    ("TCP options are not payload",
     raw(Ether(src=CMAC, dst=LMAC) / IP(src=CIP, dst=VIP) /
         TCP(sport=1000, dport=80, flags="S", seq=40, options=[("MSS", 1460), ("NOP", None),
                                                                ("WScale", 7)])),
     (0, 41, "RA")),
    ("IP options before the segment",
     tcp(flags="S", seq=1, options=[IPOption(b"\x01\x01\x01\x00")]),
     (0, 2, "RA")),
]


@pytest.mark.parametrize("desc,frame,want", RESETS, ids=[r[0] for r in RESETS])
def test_tcp_reset(desc, frame, want):
    r, frames = run_tcp_reset(frame, port=5)
    assert r == 64 and len(frames) == 1
    port, f = frames[0]
    assert port == 5 and f[:10] == bytes(10)
    eth = f[10:]
    assert scapy_rebuild(eth) == eth        # IP and TCP checksums as scapy computes them
    p = Ether(eth)
    seg = Ether(frame)
    assert (p.dst, p.src) == (CMAC, LMAC)
    assert (p[IP].src, p[IP].dst, p[IP].id, str(p[IP].flags), p[IP].ttl, p[IP].len, p[IP].ihl) == \
        (seg[IP].dst, seg[IP].src, 0, "DF", 64, 40, 5)
    t = p[TCP]
    assert (t.sport, t.dport) == (seg[TCP].dport, seg[TCP].sport)
    assert (t.seq, t.ack, str(t.flags)) == want
    assert (t.window, t.dataofs, t.urgptr, t.options, bytes(t.payload)) == (0, 5, 0, [], b"")


def test_tcp_reset_tos_drops_ecn_bits():
    _, frames = run_tcp_reset(tcp(tos=0xB9))
    assert frames[0][1][10 + 15] == 0xB8


NO_RESET = [
    ("never for a RST", tcp(flags="R"), {}),
    ("never for a RST|ACK", tcp(flags="RA", ack=5), {}),
    ("never for a SYN|RST", tcp(flags="SR"), {}),
    ("data offset 4", mutate(tcp(), 14 + 20 + 12, b"\x40"), {}),
    ("data offset beyond the segment", mutate(tcp(), 14 + 20 + 12, b"\x60"), {}),
    ("segment shorter than a TCP header", tcp(), dict(ip_len=39)),
    ("from a multicast source", tcp(src="224.1.1.1"), {}),
    ("from 0.0.0.0", tcp(src="0.0.0.0"), {}),
    ("to the limited broadcast", tcp(dst="255.255.255.255"), {}),
    ("no room: the buffer", tcp(), dict(make_emit=lambda: small_emit(nbytes=163, filled=1))),
    ("no room: the frame slots", tcp(), dict(make_emit=lambda: small_emit(max_frames=1, filled=1))),
]


@pytest.mark.parametrize("desc,frame,kw", NO_RESET, ids=[r[0] for r in NO_RESET])
def test_tcp_reset_refuses(desc, frame, kw):
    make = kw.pop("make_emit", lambda: small_emit(filled=1))
    r, frames = run_tcp_reset(frame, make_emit=make, **kw)
    assert r == 0 and frames == make().frames()


# --- fragmentation -------------------------------------------------------------

def run_fragment(frame, mtu, port=1, make_emit=small_emit, ip_len=None):
    n = len(ip_part(frame)) if ip_len is None else ip_len
    return both(
        lambda em: icmp.ip_fragment(em, port, frame[:14], memoryview(frame)[14:], n, mtu),
        lambda em: _fast._ip_fragment(em.arrays, port, frame, n, mtu),
        make_emit)


def big_emit():
    return small_emit(nbytes=64 * 1024, max_frames=128)


def check_fragments(frame, mtu, frames, later_options=None):
    """The fragments reassemble to the packet; each obeys RFC 791."""
    orig = ip_part(frame)
    hl = (orig[0] & 15) * 4
    data = orig[hl:]
    got = bytearray()
    step = (mtu - hl) & ~7
    for k, (port, f) in enumerate(frames):
        assert port == 1 and f[:10] == bytes(10) and f[10:24] == frame[:14]
        fip = f[24:]
        assert len(fip) <= mtu and (fip[0] & 15) * 4 == hl
        ip_checksums_ok_by_scapy(fip, hl)
        p = IP(fip[:hl])
        last = k == len(frames) - 1
        assert (p.id, p.ttl, p.proto, p.src, p.dst, p.tos, p.len) == \
            (IP(orig).id, IP(orig).ttl, IP(orig).proto, IP(orig).src, IP(orig).dst,
             IP(orig).tos, len(fip))
        assert int(p.flags) == (0 if last else 1)          # MF only, DF and reserved clear
        assert p.frag * 8 == len(got) == k * step
        if not last:
            assert len(fip) - hl == step and step % 8 == 0
        # the first fragment keeps the options; later ones as ip_options_fragment leaves them
        want_opts = orig[20:hl] if k == 0 or later_options is None else later_options
        assert fip[20:hl] == want_opts
        got += fip[hl:]
    assert bytes(got) == data


# (options, what ip_options_fragment leaves of them in later fragments)
RR_SEC = b"\x07\x07\x04" + bytes(4) + b"\x82\x0b" + b"\x11" * 9 + bytes(2)
RR_SEC_LATER = b"\x01" * 7 + b"\x82\x0b" + b"\x11" * 9 + bytes(2)
NOP_TS = b"\x01" + b"\x44\x08\x05\x00" + bytes(4) + bytes(3)
NOP_TS_LATER = b"\x01" * 9 + bytes(3)
SEC_TS = b"\x82\x0b" + b"\x22" * 9 + b"\x44\x0c\x05\x00" + bytes(8) + bytes(1)
SEC_TS_LATER = b"\x82\x0b" + b"\x22" * 9 + b"\x01" * 12 + bytes(1)
OPTION_CASES = [(b"", b""), (RR_SEC, RR_SEC_LATER), (NOP_TS, NOP_TS_LATER),
                (SEC_TS, SEC_TS_LATER), (b"\x01\x01\x01\x00", b"\x01\x01\x01\x00")]

FRAGMENTS = [
    # (description, frame, mtu, fragments expected, options in later fragments)
    ("1500-byte UDP over a 1400 MTU", udp(payload=b"u" * 1472), 1400, 2, None),
    ("the same over the minimum MTU 576", udp(payload=b"u" * 1472), 576, 3, None),
    ("RFC 791 minimum 68: 48 bytes a fragment", udp(payload=bytes(range(200))), 68, 5, None),
    ("one byte over the MTU", udp(payload=b"v" * 973), 1000, 2, None),
    ("MTU not a multiple of 8 past the header", tcp(payload=b"t" * 1000, flags="PA"), 1003, 2,
     None),
    ("record route (not copied) becomes NOOPs, security (copied) stays",
     with_ip_options(tcp(flags="PA", payload=b"o" * 1000), RR_SEC), 600, 2, RR_SEC_LATER),
    ("a timestamp option goes, NOOPs and END stay",
     with_ip_options(udp(payload=b"p" * 700), NOP_TS), 300, 3, NOP_TS_LATER),
    ("an option length below 2 stops the walk (as the kernel)",
     with_ip_options(udp(payload=b"m" * 500), b"\x07\x03\x04\x44\x01\x09\x04\x00"), 300, 2,
     b"\x01\x01\x01\x44\x01\x09\x04\x00"),
    ("an option length beyond the header stops the walk",
     with_ip_options(udp(payload=b"m" * 500), b"\x07\x09\x04\x00"), 300, 2,
     b"\x07\x09\x04\x00"),
]


@pytest.mark.parametrize("desc,frame,mtu,count,later", FRAGMENTS, ids=[r[0] for r in FRAGMENTS])
def test_ip_fragment(desc, frame, mtu, count, later):
    r, frames = run_fragment(frame, mtu, make_emit=big_emit)
    assert r == count == len(frames)
    check_fragments(frame, mtu, frames, later)


def test_ip_fragment_leaves_ethernet_padding_out():
    frame = udp(payload=b"e" * 600) + b"\xee" * 30
    r, frames = run_fragment(frame, 300)
    assert r == 3
    check_fragments(frame, 300, frames)


def test_ip_fragment_after_other_frames():
    frame = udp(payload=b"a" * 1000)
    r, frames = run_fragment(frame, 576, make_emit=lambda: small_emit(filled=2))
    assert r == 2 and len(frames) == 4
    assert frames[0][1] == bytes([1]) * 100
    check_fragments(frame, 576, frames[2:])


NO_FRAGMENT = [
    ("DF set", udp(payload=b"d" * 1472, flags="DF"), 1400, {}),
    ("already a first fragment", udp(payload=b"d" * 1472, flags="MF"), 1400, {}),
    ("already a later fragment", udp(payload=b"d" * 1472, frag=10), 1400, {}),
    ("fits the MTU exactly", udp(payload=b"d" * 1372), 1400, {}),
    ("MTU 67, below RFC 791's minimum", udp(payload=b"d" * 100), 67, {}),
    ("IHL 4", mutate(udp(payload=b"d" * 100), 14, b"\x44"), 68, {}),
    ("no room for the last fragment",
     udp(payload=b"d" * 1472), 576, dict(make_emit=lambda: small_emit(nbytes=1711, filled=1))),
    ("no slot for the last fragment",
     udp(payload=b"d" * 1472), 576, dict(make_emit=lambda: small_emit(max_frames=3, filled=1))),
]


@pytest.mark.parametrize("desc,frame,mtu,kw", NO_FRAGMENT, ids=[r[0] for r in NO_FRAGMENT])
def test_ip_fragment_refuses_all_or_nothing(desc, frame, mtu, kw):
    make = kw.get("make_emit", lambda: small_emit(filled=1))
    r, frames = run_fragment(frame, mtu, make_emit=make)
    assert r == 0 and frames == make().frames()


@pytest.mark.parametrize("seed", range(3))
def test_ip_fragment_random_c_equals_python(seed):
    rng = random.Random(seed)
    for _ in range(60):
        maker = tcp if rng.random() < 0.5 else udp
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 3000)))
        plain = maker(payload=payload, ip_id=rng.randrange(65536), tos=rng.randrange(256),
                      **({"flags": "PA"} if maker is tcp else {}))
        opts, later = rng.choice(OPTION_CASES)
        frame = with_ip_options(plain, opts)
        mtu = rng.randrange(60, 1600)
        r, frames = run_fragment(frame, mtu, make_emit=big_emit)
        if mtu < 68 or len(ip_part(frame)) <= mtu:
            assert r == 0 and frames == []
        else:
            assert r == len(frames) > 1
            check_fragments(frame, mtu, frames, later)


# --- NAT of ICMP errors --------------------------------------------------------

def quoted(pkt_frame: bytes, n: int | None = None) -> bytes:
    q = ip_part(pkt_frame)
    return q if n is None else q[:n]


def icmp_error_ip(src, dst, quote: bytes, icmp_type=3, code=4, mtu=1400, **ipkw) -> bytes:
    icmp_l = ICMP(type=icmp_type, code=code)
    if icmp_type == 3 and code == 4:
        icmp_l.nexthopmtu = mtu
    return raw(IP(src=src, dst=dst, ttl=60, **ipkw) / icmp_l / Raw(quote))


def run_inner(ip_bytes: bytes, ip_len=None):
    n = len(ip_bytes) if ip_len is None else ip_len
    r_py = icmp.icmp_inner(memoryview(ip_bytes), n)
    r_c = _fast._icmp_inner(ip_bytes, n)
    assert (None if r_py is None else tuple(r_py)) == r_c
    return r_py


def run_nat(ip_bytes: bytes, out: bool, addr: str, port: int, ip_len=None):
    n = len(ip_bytes) if ip_len is None else ip_len
    a_py, a_c = bytearray(ip_bytes), bytearray(ip_bytes)
    r_py = icmp.nat_icmp(a_py, n, out, ip(addr), port)
    r_c = _fast._nat_icmp(a_c, n, out, ip(addr), port)
    assert r_py == r_c and a_py == a_c
    if not r_py:
        assert bytes(a_py) == ip_bytes
    return r_py, bytes(a_py)


# What the client sent (CIP:1000 -> VIP:80) and what the director made of it
# (-> RIP:8080); what the real server answered (RIP:8080 -> CIP:1000) and what
# the director made of it (VIP:80 -> CIP:1000).
CLIENT_TCP = tcp(flags="PA", seq=11, ack=22, payload=b"GET / HTTP/1.1\r\n" * 4)
TO_RS_TCP = tcp(dst=RIP, dport=8080, flags="PA", seq=11, ack=22, payload=b"GET / HTTP/1.1\r\n" * 4,
                smac=SMAC, dmac=RMAC)
RS_TCP = tcp(src=RIP, dst=CIP, sport=8080, dport=1000, flags="PA", seq=5, ack=6,
             payload=b"H" * 1400, smac=RMAC, dmac=SMAC)
TO_CLIENT_TCP = tcp(src=VIP, dst=CIP, sport=80, dport=1000, flags="PA", seq=5, ack=6,
                    payload=b"H" * 1400, smac=LMAC, dmac=CMAC)
CLIENT_UDP = udp(payload=b"dns?" * 10)
TO_RS_UDP = udp(dst=RIP, dport=5353, payload=b"dns?" * 10)
RS_UDP = udp(src=RIP, dst=CIP, sport=5353, dport=1000, payload=b"dns!" * 100)
TO_CLIENT_UDP = udp(src=VIP, dst=CIP, sport=53, dport=1000, payload=b"dns!" * 100)
RS_UDP0 = mutate(RS_UDP, 14 + 20 + 6, b"\0\0")           # sent without a checksum
TO_CLIENT_UDP0 = mutate(TO_CLIENT_UDP, 14 + 20 + 6, b"\0\0")
OPT = [IPOption(b"\x82\x0b" + b"\x33" * 9 + b"\0")]
CLIENT_OPT = tcp(flags="A", seq=1, ack=2, options=OPT)
TO_RS_OPT = tcp(dst=RIP, dport=8080, flags="A", seq=1, ack=2, options=OPT)

NAT = [
    # (description, ICMP error at the director, out, addr, port,
    #  outer (src, dst) afterwards, the quote afterwards = a prefix of what the peer sent)
    ("frag-needed from the RS side about a request: back to the client as from the VIP",
     icmp_error_ip(ROUTER_R, CIP, quoted(TO_RS_TCP, 28 + 20 + 8)), True, VIP, 80,
     (VIP, CIP), quoted(CLIENT_TCP, 56)),
    ("RS side, the whole request quoted (its TCP checksum verifiable)",
     icmp_error_ip(RIP, CIP, quoted(TO_RS_TCP), code=3), True, VIP, 80,
     (VIP, CIP), quoted(CLIENT_TCP)),
    ("frag-needed from the client side about a response: on to the real server",
     icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 548)), False, RIP, 8080,
     (ROUTER_C, RIP), quoted(RS_TCP, 548)),
    ("client side, time exceeded, 8 bytes of TCP: the TCP checksum is not quoted",
     icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 28), icmp_type=11, code=0), False, RIP,
     8080, (ROUTER_C, RIP), quoted(RS_TCP, 28)),
    ("client side, 18 bytes of TCP: the checksum field just fits",
     icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 38), icmp_type=11, code=0), False, RIP,
     8080, (ROUTER_C, RIP), quoted(RS_TCP, 38)),
    ("client side, 17 bytes of TCP: half the checksum field, left alone",
     icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 37), icmp_type=11, code=0), False, RIP,
     8080, (ROUTER_C, RIP), quoted(RS_TCP, 37)[:36] + quoted(TO_CLIENT_TCP, 37)[36:]),
    ("source quench, RS side, UDP", icmp_error_ip(RIP, CIP, quoted(TO_RS_UDP), icmp_type=4, code=0),
     True, VIP, 53, (VIP, CIP), quoted(CLIENT_UDP)),
    ("port unreachable from the client about a UDP response",
     icmp_error_ip(CIP, VIP, quoted(TO_CLIENT_UDP, 100), code=3), False, RIP, 5353,
     (CIP, RIP), quoted(RS_UDP, 100)),
    ("UDP without checksum keeps 0",
     icmp_error_ip(CIP, VIP, quoted(TO_CLIENT_UDP0, 60), code=3), False, RIP, 5353,
     (CIP, RIP), quoted(RS_UDP0, 60)),
    ("quoted header with options", icmp_error_ip(RIP, CIP, quoted(TO_RS_OPT)), True, VIP, 80,
     (VIP, CIP), quoted(CLIENT_OPT)),
    ("quoted first fragment (MF, offset 0)",
     icmp_error_ip(RIP, CIP, quoted(mutate(TO_RS_UDP, 14 + 6, b"\x20\x00"))), True, VIP, 53,
     (VIP, CIP), None),
    ("the outer header has options", icmp_error_ip(RIP, CIP, quoted(TO_RS_UDP), options=OPT),
     True, VIP, 53, (VIP, CIP), quoted(CLIENT_UDP)),
]


def check_icmp_checksums(out: bytes, quoted_header: bool = True) -> None:
    """Outer IP, ICMP and (if asked) quoted IP header checksums as scapy
    computes them. (scapy's ICMP layer reads long quotes as RFC 4884
    extensions, so the ICMP sum is taken over the raw message.)"""
    hl = (out[0] & 15) * 4
    ip_checksums_ok_by_scapy(out, hl)
    msg = out[hl:]
    assert scapy_checksum(msg[:2] + b"\0\0" + msg[4:]) == int.from_bytes(msg[2:4], "big"), \
        "ICMP checksum"
    if quoted_header:
        ip_checksums_ok_by_scapy(msg[8:], (msg[8] & 15) * 4)


@pytest.mark.parametrize("desc,err,out,addr,port,outer,quote", NAT, ids=[r[0] for r in NAT])
def test_nat_icmp(desc, err, out, addr, port, outer, quote):
    inner = run_inner(err)
    assert inner is not None
    q = IP(err[inner.inner_off:])
    # the quoted packet's conn is found under its reversed tuple
    assert (inner.saddr, inner.daddr, inner.proto) == (ip(q.src), ip(q.dst), q.proto)
    assert inner.icmp_off == (err[0] & 15) * 4 and inner.inner_off == inner.icmp_off + 8
    assert inner.l4_off == inner.inner_off + (err[inner.inner_off] & 15) * 4
    ok, got = run_nat(err, out, addr, port)
    assert ok
    p = IP(got)
    assert (p.src, p.dst) == outer
    at = inner.icmp_off
    assert got[:10] == err[:10] and got[at:at + 2] == err[at:at + 2]  # type and code stay
    check_icmp_checksums(got)
    assert run_inner(got) is not None
    if quote is not None:
        assert got[inner.inner_off:] == quote
    tail = got[inner.inner_off:]
    if len(tail) == int.from_bytes(tail[2:4], "big"):    # a whole packet: scapy checks L4 too
        eth = bytes(14) + tail
        assert scapy_rebuild(mutate(eth, 12, b"\x08\x00")) == mutate(eth, 12, b"\x08\x00")


def test_nat_icmp_there_and_back():
    """Translating toward the client and back again restores every byte."""
    err = icmp_error_ip(RIP, CIP, quoted(TO_RS_TCP, 60))
    _, to_client = run_nat(err, True, VIP, 80)
    assert to_client != err
    _, again = run_nat(to_client, True, RIP, 8080)
    assert again == err


NOT_TRANSLATED = [
    ("echo reply", raw(IP(src=CIP, dst=VIP) / ICMP(type=0) / Raw(quoted(TO_CLIENT_TCP, 40)))),
    ("redirect", icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 40), icmp_type=5, code=1)),
    ("parameter problem", icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 40), icmp_type=12,
                                        code=0)),
    ("bad ICMP checksum", mutate(icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 40)), 22,
                                 b"\xde\xad")),
    ("quote too short for 8 bytes of TCP", icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 27))),
    ("quote shorter than an IP header", icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 19))),
    ("no quote at all", icmp_error_ip(ROUTER_C, VIP, b"")),
    ("quoted IHL 4", icmp_error_ip(ROUTER_C, VIP, mutate(quoted(TO_CLIENT_TCP, 40), 0, b"\x44"))),
    ("quoted IHL 15 beyond the quote",
     icmp_error_ip(ROUTER_C, VIP, mutate(quoted(TO_CLIENT_TCP, 40), 0, b"\x4f"))),
    ("quoted IHL 6 leaves 4 bytes of TCP",
     icmp_error_ip(ROUTER_C, VIP, mutate(quoted(TO_CLIENT_TCP, 30), 0, b"\x46"))),
    ("quoted version 6",
     icmp_error_ip(ROUTER_C, VIP, mutate(quoted(TO_CLIENT_TCP, 40), 0, b"\x65"))),
    ("quoted non-first fragment",
     icmp_error_ip(ROUTER_C, VIP, mutate(quoted(TO_CLIENT_TCP, 40), 6, b"\x00\x10"))),
    ("ICMP about ICMP", icmp_error_ip(ROUTER_C, VIP, raw(IP(src=VIP, dst=CIP) / ICMP(type=8)))),
    ("quoted GRE", icmp_error_ip(ROUTER_C, VIP, raw(IP(src=VIP, dst=CIP, proto=47)) + bytes(8))),
    ("outer packet not ICMP", mutate(icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 40)), 9,
                                     b"\x11")),
    ("outer packet is a fragment",
     icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 40), flags="MF")),
    ("outer IHL 4", mutate(icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 40)), 0, b"\x44")),
]


@pytest.mark.parametrize("desc,err", NOT_TRANSLATED, ids=[r[0] for r in NOT_TRANSLATED])
def test_icmp_inner_refuses(desc, err):
    assert run_inner(err) is None


def test_icmp_inner_reads_only_ip_len():
    """Bytes past ip_len (Ethernet padding) are neither quoted nor summed."""
    err = icmp_error_ip(ROUTER_C, VIP, quoted(TO_CLIENT_TCP, 40))
    assert run_inner(err + b"\x55" * 9, len(err)) == run_inner(err)
    ok, got = run_nat(err + b"\x55" * 9, False, RIP, 8080, ip_len=len(err))
    assert ok and got[len(err):] == b"\x55" * 9
    check_icmp_checksums(got[:len(err)])


@pytest.mark.parametrize("desc,err", [r for r in NOT_TRANSLATED if "checksum" not in r[0]],
                         ids=[r[0] for r in NOT_TRANSLATED if "checksum" not in r[0]])
def test_nat_icmp_leaves_malformed_alone(desc, err):
    ok, _ = run_nat(err, False, RIP, 8080)     # run_nat asserts nothing changed
    assert not ok


@pytest.mark.parametrize("seed", range(3))
def test_nat_icmp_random_c_equals_python(seed):
    """Random errors (malformed ones included): identical bytes and verdicts;
    every translated one has every checksum right."""
    rng = random.Random(1000 + seed)
    translated = 0
    for _ in range(300):
        maker = tcp if rng.random() < 0.5 else udp
        kw = {"flags": rng.choice(["S", "A", "PA", "FA"])} if maker is tcp else {}
        pkt = maker(src=VIP, dst=CIP, sport=rng.randrange(65536), dport=rng.randrange(65536),
                    payload=bytes(rng.randrange(256) for _ in range(rng.randrange(60))),
                    options=rng.choice([None, OPT]), tos=rng.randrange(256), **kw)
        quote = bytearray(quoted(pkt, rng.randrange(10, len(ip_part(pkt)) + 1)))
        if rng.random() < 0.3 and len(quote) > 27:
            quote[rng.randrange(len(quote))] = rng.randrange(256)   # checksums or fields go wrong
        err = bytearray(icmp_error_ip(rng.choice([ROUTER_C, CIP]), VIP, bytes(quote),
                                      icmp_type=rng.choice([3, 3, 4, 11, 5, 0]),
                                      code=rng.randrange(5)))
        if rng.random() < 0.1:
            err[rng.randrange(len(err))] ^= 1 << rng.randrange(8)
        err = bytes(err)
        run_inner(err)
        out = rng.random() < 0.5
        ok, got = run_nat(err, out, rng.choice([RIP, VIP]), rng.randrange(65536))
        if ok:
            translated += 1
            hl = (got[0] & 15) * 4
            ihl = (got[hl + 8] & 15) * 4
            assert ones_sum(got[:hl]) == ones_sum(got[hl:]) == 0xFFFF
            assert ones_sum(got[hl + 8:hl + 8 + ihl]) == 0xFFFF
            assert run_inner(got) is not None
    assert translated > 50
