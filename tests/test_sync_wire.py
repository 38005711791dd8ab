"""The IPVS sync protocol v1 codec (pylvs/sync/wire.py): records ↔ messages,
checked against messages written out byte by byte from the kernel's
layout (ip_vs_sync.c, struct ip_vs_sync_mesg / ip_vs_sync_v4), against
Wireshark's independent decoder (tshark's "ipvs" dissector), and with a
table of bad input: each counted under its reason, none installing a
record."""

from __future__ import annotations

import random
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest

from pylvs.engine.sync import SYNC_DTYPE
from pylvs.sync import wire

TCP, UDP = 6, 17
MASQ, TUNNEL, DROUTE = 0, 2, 3
TEMPLATE = 0x1000
ESTABLISHED, FIN_WAIT, SYN_RECV = 1, 4, 3


def ip(text: str) -> int:
    a, b, c, d = (int(x) for x in text.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def rec(proto, state, flags, caddr, cport, vaddr, vport, daddr, dport, timeout, fwmark=0):
    r = np.zeros(1, SYNC_DTYPE)
    r[0] = (proto, state, flags, ip(caddr), cport, ip(vaddr), vport, ip(daddr), dport,
            fwmark, timeout)
    return r


# Records covering what a master announces: every forwarding method, a NAT
# port remap (vport 80 → dport 8080), UDP, a persistence template (cport 0).
RECORDS = [
    ("NAT TCP established, port remapped",
     rec(TCP, ESTABLISHED, MASQ, "10.0.0.1", 40000, "10.0.10.2", 80, "192.168.1.2", 8080, 900)),
    ("DR TCP fin_wait", rec(TCP, FIN_WAIT, DROUTE, "10.0.0.7", 1025, "10.0.10.2", 443,
                            "192.168.1.3", 443, 120)),
    ("Tun TCP syn_recv, inactive", rec(TCP, SYN_RECV, TUNNEL | 0x0100, "10.0.0.9", 65535,
                                       "10.0.10.2", 80, "192.168.1.4", 80, 60)),
    ("NAT UDP", rec(UDP, 0, MASQ, "10.0.0.3", 5353, "10.0.10.3", 53, "192.168.1.5", 5300, 300)),
    ("template (persistence), DR", rec(TCP, 0, TEMPLATE | DROUTE, "10.0.0.0", 0, "10.0.10.2",
                                       80, "192.168.1.2", 80, 360)),
    ("fwmark and timeout extremes", rec(TCP, ESTABLISHED, MASQ, "255.255.255.255", 1,
                                        "1.2.3.4", 65535, "0.0.0.1", 1, 0xFFFFFFFF,
                                        fwmark=0xFFFFFFFF)),
]


@pytest.mark.parametrize("desc,r", RECORDS, ids=[d for d, _ in RECORDS])
def test_round_trip(desc, r):
    (msg,) = wire.encode(r, syncid=9)
    counts = Counter()
    out = wire.decode(msg, 9, counts)
    assert out.tolist() == r.tolist(), desc
    assert sum(counts.values()) == 0


# A message written out from the specification (not from the encoder):
# header: reserved 0, syncid 7, size 80, nr_conns 2, version 1, spare 0;
# conn 1: type 0, TCP, ver/size 36, flags 0, state 1 (ESTABLISHED),
#   cport 40000, vport 80, dport 8080, fwmark 0, timeout 900,
#   10.0.0.1 → 10.0.10.2 → 192.168.1.2;
# conn 2: type 0, UDP, size 36, flags 0x1003 (template, DR), state 0,
#   cport 0, vport 53, dport 53, fwmark 0, timeout 300,
#   10.0.0.3 → 10.0.10.2 → 192.168.1.3.
SPEC_MESSAGE = bytes([
    0x00, 0x07, 0x00, 0x50, 0x02, 0x01, 0x00, 0x00,
    0x00, 0x06, 0x00, 0x24, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x01, 0x9C, 0x40, 0x00, 0x50, 0x1F, 0x90,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x84,
    10, 0, 0, 1, 10, 0, 10, 2, 192, 168, 1, 2,
    0x00, 0x11, 0x00, 0x24, 0x00, 0x00, 0x10, 0x03,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x35, 0x00, 0x35,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x2C,
    10, 0, 0, 3, 10, 0, 10, 2, 192, 168, 1, 3,
])
SPEC_RECORDS = np.concatenate([
    rec(TCP, ESTABLISHED, 0, "10.0.0.1", 40000, "10.0.10.2", 80, "192.168.1.2", 8080, 900),
    rec(UDP, 0, TEMPLATE | DROUTE, "10.0.0.3", 0, "10.0.10.2", 53, "192.168.1.3", 53, 300),
])


def test_spec_message_decodes():
    out = wire.decode(SPEC_MESSAGE, 7)
    assert out.tolist() == SPEC_RECORDS.tolist()


def test_encoder_writes_the_spec_message():
    assert wire.encode(SPEC_RECORDS, 7) == [SPEC_MESSAGE]


def test_hashed_flag_is_not_sent():
    # ip_vs_sync_conn sends cp->flags & ~IP_VS_CONN_F_HASHED.
    (msg,) = wire.encode(rec(TCP, 1, 0x0040 | DROUTE, "1.1.1.1", 1, "2.2.2.2", 2, "3.3.3.3", 2, 5), 1)
    assert int.from_bytes(msg[12:16], "big") == DROUTE


# Options (sequence data, pe data, unknown optional ones) from other
# senders: a conn with valid options still installs.
def _with_options(conn: bytes, opts: bytes, nr: int = 1) -> bytes:
    size = len(conn) + len(opts)
    conn = conn[:2] + size.to_bytes(2, "big") + conn[4:]
    body = conn + opts
    return bytes([0, 7]) + (8 + len(body)).to_bytes(2, "big") + bytes([nr, 1, 0, 0]) + body


CONN1 = SPEC_MESSAGE[8:44]
CONN2 = SPEC_MESSAGE[44:80]


def test_seq_option_and_optional_param_accepted():
    seq = bytes([wire.OPT_SEQ_DATA, 24]) + bytes(range(24))
    optional = bytes([0x40 | 9, 2, 0xAB, 0xCD])
    out = wire.decode(_with_options(CONN1, seq + optional), 7)
    assert out.tolist() == SPEC_RECORDS[:1].tolist()


def test_unaligned_conn_then_padding_then_next_conn():
    # A 62-byte conn (seq option) is followed by 2 bytes of padding that
    # count in the message size but not in the conn's (ip_vs_sync_conn).
    seq = bytes([wire.OPT_SEQ_DATA, 24]) + bytes(24)
    first = CONN1[:2] + (36 + 26).to_bytes(2, "big") + CONN1[4:] + seq + b"\0\0"
    body = first + CONN2
    msg = bytes([0, 7]) + (8 + len(body)).to_bytes(2, "big") + bytes([2, 1, 0, 0]) + body
    assert wire.decode(msg, 7).tolist() == SPEC_RECORDS.tolist()


def header(nr: int, size: int, syncid: int = 7, version: int = 1, reserved: int = 0,
           spare: int = 0) -> bytes:
    return bytes([reserved, syncid]) + size.to_bytes(2, "big") + bytes([nr, version & 0xFF]) \
        + spare.to_bytes(2, "big")


def _set(buf: bytes, off: int, val: bytes) -> bytes:
    return buf[:off] + val + buf[off + len(val):]


# Bad input: (description, datagram, backup's syncid, reason counted).
BAD = [
    ("empty", b"", 7, "short"),
    ("3 bytes", b"\0\7\0", 7, "short"),
    ("v1 header cut to 6 bytes (size says 6)", b"\0\7\0\6\1\1", 7, "short"),
    ("size says more than sent", SPEC_MESSAGE[:-4], 7, "bad_size"),
    ("size says less than sent", SPEC_MESSAGE + b"\0\0\0\0", 7, "bad_size"),
    ("size field 0", _set(SPEC_MESSAGE, 2, b"\0\0"), 7, "bad_size"),
    ("wrong syncid", SPEC_MESSAGE, 8, "wrong_syncid"),
    ("version 0 message (first byte is nr_conns)",
     bytes([1, 7, 0, 28]) + bytes(24), 7, "v0"),
    ("unknown version 2", _set(SPEC_MESSAGE, 5, b"\2"), 7, "bad_version"),
    ("version -1", _set(SPEC_MESSAGE, 5, b"\xff"), 7, "bad_version"),
    ("spare not zero", _set(SPEC_MESSAGE, 6, b"\0\1"), 7, "bad_version"),
    ("nr_conns says 3, 2 sent", _set(SPEC_MESSAGE, 4, b"\3"), 7, "truncated"),
    ("nr_conns says 1, 2 sent", _set(SPEC_MESSAGE, 4, b"\1"), 7, "nr_conns"),
    ("nr_conns 0, conns sent", _set(SPEC_MESSAGE, 4, b"\0"), 7, "nr_conns"),
    ("conn size below 36", _set(SPEC_MESSAGE, 10, b"\0\x20"), 7, "conn_size"),
    ("conn size past the end", _set(SPEC_MESSAGE, 46, b"\0\x40"), 7, "conn_size"),
    ("conn size 0", _set(SPEC_MESSAGE, 10, b"\0\0"), 7, "conn_size"),
    ("conn version 1", _set(SPEC_MESSAGE, 10, b"\x10\x24"), 7, "conn_version"),
    ("conn type 2", _set(SPEC_MESSAGE, 8, b"\2"), 7, "bad_type"),
    ("IPv6 conn shorter than 72", _set(SPEC_MESSAGE, 8, b"\1"), 7, "conn_size"),
    ("option length 0", _with_options(CONN1, bytes([1, 0, 0, 0])), 7, "bad_option"),
    ("option past its conn", _with_options(CONN1, bytes([2, 9, 0, 0])), 7, "bad_option"),
    ("option header cut", _with_options(CONN1, bytes([2])), 7, "bad_option"),
    ("seq option of 20 bytes", _with_options(CONN1, bytes([1, 20]) + bytes(20)), 7,
     "bad_option"),
    ("seq option twice", _with_options(CONN1, 2 * (bytes([1, 24]) + bytes(24))), 7,
     "bad_option"),
    ("pe name longer than 16", _with_options(CONN1, bytes([3, 17]) + bytes(17) + b"\0"), 7,
     "bad_option"),
    ("trailing garbage after the last conn",
     header(1, 48) + CONN1 + b"\xde\xad\xbe\xef", 7, "nr_conns"),
]


@pytest.mark.parametrize("desc,buf,syncid,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_counted_and_installs_nothing(desc, buf, syncid, reason):
    counts = wire.new_counts()
    out = wire.decode(buf, syncid, counts)
    assert len(out) == 0, desc
    assert counts[reason] == 1, (desc, dict(+counts))
    assert sum(counts.values()) == 1, (desc, dict(+counts))


def test_syncid_zero_accepts_any():
    assert len(wire.decode(SPEC_MESSAGE, 0)) == 2


# Conns the kernel skips alone: (description, conn bytes, reason); the
# good conn in the same message still installs.
def _v6_conn() -> bytes:
    c = bytes([1, TCP]) + (72).to_bytes(2, "big") + bytes(4) + (1).to_bytes(2, "big") \
        + bytes(6) + bytes(8)
    return c + bytes(48)


SKIPS = [
    ("IPv6 conn", _v6_conn(), "skip_ipv6"),
    ("SCTP conn", _set(CONN1, 1, b"\x84"), "skip_proto"),
    ("TCP state 11", _set(CONN1, 8, b"\0\x0b"), "skip_state"),
    ("UDP state 1", _set(CONN2, 6, b"\0\0") [:8] + b"\0\1" + CONN2[10:], "skip_state"),
    # pylvs's rule: the kernel installs a template of state >= IP_VS_CTPL_S_LAST
    # (wire._records says why pylvs does not).
    ("template state 2 (pylvs refuses)", _set(CONN2, 8, b"\0\2"), "skip_state"),
    ("unknown mandatory option",
     CONN1[:2] + (40).to_bytes(2, "big") + CONN1[4:] + bytes([9, 2, 0, 0]), "skip_option"),
    # The kernel reads no option after an unknown mandatory one (goto out):
    # a zero-length option behind it does not drop the message.
    ("unknown mandatory option, then a malformed one",
     CONN1[:2] + (42).to_bytes(2, "big") + CONN1[4:] + bytes([9, 2, 0, 0, 1, 0]),
     "skip_option"),
    ("persistence engine data",
     CONN1[:2] + (45).to_bytes(2, "big") + CONN1[4:] + bytes([2, 2, 1, 2, 3, 3]) + b"sip",
     "skip_pe"),
]


@pytest.mark.parametrize("desc,conn,reason", SKIPS, ids=[s[0] for s in SKIPS])
def test_conn_skipped_alone(desc, conn, reason):
    body = CONN1 + conn   # last in its message: no padding after it
    msg = header(2, 8 + len(body)) + body
    counts = wire.new_counts()
    out = wire.decode(msg, 7, counts)
    assert out.tolist() == SPEC_RECORDS[:1].tolist(), desc
    assert counts[reason] == 1 and sum(counts.values()) == 1, dict(+counts)


def test_messages_respect_maxlen_and_255_conns():
    many = np.repeat(RECORDS[0][1], 1000)
    many["cport"] = np.arange(1000)
    for maxlen, per in ((1472, 40), (wire.sync_maxlen("master", given=65507), 255),
                        (44, 1), (8 + 36 * 3 + 35, 3)):
        msgs = wire.encode(many, 1, maxlen)
        assert all(len(m) <= maxlen for m in msgs)
        assert [m[4] for m in msgs[:-1]] == [per] * (len(msgs) - 1)
        back = np.concatenate([wire.decode(m, 1) for m in msgs])
        assert back.tolist() == many.tolist()
    # A master's --sync-maxlen may be 1..65507: below a header and a conn
    # (44 bytes) each message carries one conn, as ip_vs_sync_buff_create
    # makes a buffer the larger of sync_maxlen and what the conn needs.
    for maxlen in (1, 43):
        msgs = wire.encode(many[:3], 1, maxlen)
        assert [(len(m), m[4]) for m in msgs] == [(44, 1)] * 3
        assert np.concatenate([wire.decode(m, 1) for m in msgs]).tolist() == many[:3].tolist()
    with pytest.raises(ValueError):
        wire.encode(many, 256)


@pytest.mark.parametrize("role,mtu,given,expect", [
    ("master", 9000, 0, 1472),       # a master assumes 1500 whatever the link
    ("backup", 9000, 0, 8972),       # a backup reads what the link can carry
    ("backup", 1280, 0, 1472),       # ... at least 1500's worth
    ("master", 1500, 100, 100),
    ("backup", 1500, 100, 1024),     # a backup's buffer holds at least 1024
    ("master", 1500, 70000, 65507),
])
def test_sync_maxlen(role, mtu, given, expect):
    assert wire.sync_maxlen(role, mtu, given) == expect


@pytest.mark.parametrize("syncid", [256, -1, 1.0, True])
def test_a_syncid_out_of_range_is_a_value_error_everywhere(syncid):
    """A syncid is a u8 (0..255): message, encode and Buffer alike say so
    with ValueError, not a struct.error from deep inside, nor later."""
    for make in (lambda: wire.message(syncid, b""), lambda: wire.encode(RECORDS[0][1], syncid),
                 lambda: wire.Buffer(syncid, 1472)):
        with pytest.raises(ValueError, match="syncid"):
            make()


def test_buffer_flush_rule():
    b = wire.Buffer(3, 1472, flush_after=2.0)
    recs = np.repeat(RECORDS[0][1], 45)
    b.add(recs, now=10.0)
    full = b.take(10.0)
    assert len(full) == 1 and full[0][4] == 40 and len(b) == 5
    assert b.take(11.9) == []                 # the partial one waits 2 s
    (late,) = b.take(12.0)
    assert late[4] == 5 and len(b) == 0


def test_control_messages_round_trip_and_ipvs_ignores_them():
    m = wire.control_message(wire.BULK_REQUEST, 5, 0xDEADBEEF)
    assert wire.parse_control(m) == (wire.BULK_REQUEST, 5, 0xDEADBEEF)
    # An IPVS backup: size matches, version not 1 → v0 path, whose first
    # byte (nr_conns) is 0: nothing installed.
    assert m[0] == 0 and int.from_bytes(m[2:4], "big") == len(m) and m[5] != 1
    counts = Counter()
    assert len(wire.decode(m, 5, counts)) == 0
    assert wire.parse_control(SPEC_MESSAGE) is None
    assert wire.parse_control(m[:-1]) is None
    assert wire.parse_control(_set(m, 8, b"XLVS")) is None


def test_garbage_never_raises_nor_installs_from_broken_framing():
    rng = random.Random(9)
    good = SPEC_MESSAGE
    for i in range(3000):
        buf = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        if i % 3 == 0:
            buf = buf[:rng.randrange(len(buf) + 1)]
        elif i % 3 == 1:
            buf = bytearray(rng.randbytes(rng.randrange(100)))
        counts = wire.new_counts()
        out = wire.decode(bytes(buf), 0, counts)
        if len(out):
            # Only a message whose framing holds gives records, and then
            # every conn it counts is either a record or a counted skip.
            assert sum(counts[k] for k in wire.DROP_REASONS) == 0
            assert len(out) + sum(counts[k] for k in wire.SKIP_REASONS) == buf[4]
        else:
            assert sum(counts.values()) >= (1 if buf[4:5] != b"\0" else 0)


# --- Wireshark's decoder ---------------------------------------------------

TSHARK_FIELDS = ("ipvs.syncid", "ipvs.size", "ipvs.conncount", "ipvs.version", "ipvs.type",
                 "ipvs.proto", "ipvs.size.v1", "ipvs.flags.v1", "ipvs.state", "ipvs.cport",
                 "ipvs.vport", "ipvs.dport", "ipvs.fwmark", "ipvs.timeout", "ipvs.caddr",
                 "ipvs.vaddr", "ipvs.daddr")


def tshark_fields(pcap: str) -> list[dict[str, list[str]]]:
    """Per packet, each ipvs field's values as tshark decodes them."""
    cmd = ["tshark", "-r", pcap, "-d", "udp.port==8848,ipvs", "-T", "fields",
           "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in TSHARK_FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [dict(zip(TSHARK_FIELDS, (v.split(";") if v else [] for v in line.split("\t"))))
            for line in out.splitlines()]


def write_pcap(path, payloads):
    from scapy.all import IP, UDP, Ether, wrpcap

    wrpcap(path, [Ether() / IP(src="10.9.0.1", dst=wire.SYNC_GROUP, ttl=1)
                  / UDP(sport=33000, dport=wire.SYNC_PORT) / p for p in payloads])


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (Makefile APT_TOOLS)")
def test_tshark_decodes_what_pylvs_encodes(tmp_path):
    recs = np.concatenate([r for _, r in RECORDS] * 8)   # 48 conns: two messages at 1472
    recs["cport"] = np.arange(len(recs)) + 1000
    msgs = wire.encode(recs, 42, 1472)
    pcap = str(tmp_path / "sync.pcap")
    write_pcap(pcap, msgs)
    pkts = tshark_fields(pcap)
    assert len(pkts) == 2
    seen = 0
    for msg, pkt in zip(msgs, pkts):
        n = msg[4]
        assert pkt["ipvs.syncid"] == ["42"] and pkt["ipvs.version"] == ["1"]
        assert pkt["ipvs.size"] == [str(len(msg))] and pkt["ipvs.conncount"] == [str(n)]
        part = recs[seen:seen + n]
        seen += n
        assert pkt["ipvs.type"] == ["0"] * n and pkt["ipvs.size.v1"] == ["36"] * n
        assert [int(x, 16) for x in pkt["ipvs.proto"]] == [int(p) for p in part["proto"]]
        assert [int(x, 16) for x in pkt["ipvs.flags.v1"]] == [int(f) for f in part["flags"]]
        assert [int(x, 16) for x in pkt["ipvs.state"]] == [int(s) for s in part["state"]]
        for f in ("cport", "vport", "dport", "timeout"):
            assert pkt["ipvs." + f] == [str(v) for v in part[f]], f
        assert [int(x, 16) for x in pkt["ipvs.fwmark"]] == [int(v) for v in part["fwmark"]]
        for f in ("caddr", "vaddr", "daddr"):
            assert pkt["ipvs." + f] == [_dotted(v) for v in part[f]], f
    assert seen == len(recs)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (Makefile APT_TOOLS)")
def test_tshark_decodes_the_spec_message(tmp_path):
    pcap = str(tmp_path / "spec.pcap")
    write_pcap(pcap, [SPEC_MESSAGE])
    (pkt,) = tshark_fields(pcap)
    assert pkt["ipvs.conncount"] == ["2"] and pkt["ipvs.syncid"] == ["7"]
    assert pkt["ipvs.cport"] == ["40000", "0"] and pkt["ipvs.dport"] == ["8080", "53"]
    assert pkt["ipvs.caddr"] == ["10.0.0.1", "10.0.0.3"]
    assert pkt["ipvs.timeout"] == ["900", "300"]


def _dotted(v) -> str:
    v = int(v)
    return ".".join(str((v >> s) & 255) for s in (24, 16, 8, 0))
