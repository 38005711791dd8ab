"""Ones' complement helpers, and both engines' rewritten frames checked by scapy."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import raw
from scapy.utils import checksum as scapy_checksum

from engine_kit import (CIP, CLIENT_PORT, CMAC, IMPLS, LMAC, RIP, RMAC, RS_PORT, SMAC, VIP,
                        Env, diff_bytes, ip, random_frame, scapy_rebuild, tcp, udp, v)
from pylvs.engine import checksum as ck
from pylvs.engine import tables


# --- the helpers ------------------------------------------------------------------

def test_rfc1071_example():
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ck.ones_sum(data) == 0xDDF2
    assert ck.checksum(data) == 0x220D


def test_fold_and_sums():
    assert ck.fold(0x1FFFE) == 0xFFFF
    assert ck.fold(0x2_0003) == 0x0005
    assert ck.ones_sum(b"") == 0
    assert ck.ones_sum(b"\0\0\0") == 0
    assert ck.ones_sum(b"\xff\xff") == 0xFFFF
    assert ck.ones_sum(b"\x12") == 0x1200            # odd byte padded with zero
    assert ck.ones_sum(b"\x80\x00\x80\x00") == 0x0001  # end-around carry


@pytest.mark.parametrize("seed", range(5))
def test_ones_sum_matches_scapy(seed):
    rng = random.Random(seed)
    for n in range(0, 80):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert ck.checksum(data) == scapy_checksum(data), data.hex()


def test_ip_header_checksum_is_scapys():
    hdr = raw(IP(src=CIP, dst=VIP, id=99, ttl=5))
    zeroed = hdr[:10] + b"\0\0" + hdr[12:]
    assert ck.checksum(zeroed) == int.from_bytes(hdr[10:12], "big")
    assert ck.ones_sum(hdr) == 0xFFFF      # a correct header sums to all ones


@pytest.mark.parametrize("seed", range(3))
def test_incremental_updates_equal_recomputing(seed):
    rng = random.Random(seed)
    for _ in range(300):
        words = [rng.randrange(65536) for _ in range(10)]
        data = b"".join(w.to_bytes(2, "big") for w in words)
        c = ck.checksum(data)
        i = rng.randrange(10)
        new = rng.randrange(65536)
        words16 = list(words)
        words16[i] = new
        want = ck.checksum(b"".join(w.to_bytes(2, "big") for w in words16))
        assert ck.update16(c, words[i], new) == want
        j = rng.randrange(9)
        old32 = words[j] << 16 | words[j + 1]
        new32 = rng.randrange(2**32)
        words32 = list(words)
        words32[j:j + 2] = [new32 >> 16, new32 & 0xFFFF]
        want = ck.checksum(b"".join(w.to_bytes(2, "big") for w in words32))
        assert ck.update32(c, old32, new32) == want


def test_partial_sum_update_is_the_new_pseudo_header_sum():
    rng = random.Random(1)
    for _ in range(300):
        s, d, n = rng.randrange(2**32), rng.randrange(2**32), rng.randrange(2**32)
        length = rng.randrange(65536)
        old = ck.pseudo_header_sum(s, d, 6, length)
        assert ck.sum_update32(old, d, n) == ck.pseudo_header_sum(s, n, 6, length)


def test_l4_checksum_matches_scapy():
    seg = raw(TCP(sport=1, dport=2, flags="PA", chksum=0) / b"hello")
    want = TCP(raw(IP(src=CIP, dst=VIP) / TCP(sport=1, dport=2, flags="PA") / b"hello")[20:]).chksum
    assert ck.l4_checksum(ip(CIP), ip(VIP), 6, seg) == want
    useg = raw(UDP(sport=1, dport=2, chksum=0) / b"abc")
    uwant = UDP(raw(IP(src=CIP, dst=VIP) / UDP(sport=1, dport=2) / b"abc")[20:]).chksum
    assert ck.l4_checksum(ip(CIP), ip(VIP), 17, useg) == uwant


def test_udp_zero_result_is_ffff():
    # A segment whose checksum computes to 0: add the missing word to the data.
    base = raw(UDP(sport=7, dport=9, len=8 + 4, chksum=0)) + b"\0\0\0\0"
    s = ck.fold(ck.pseudo_header_sum(1, 2, 17, len(base)) + ck.ones_sum(base))
    seg = base[:8] + ((0xFFFF - s) % 0xFFFF).to_bytes(2, "big") + b"\0\0"
    assert ck.l4_checksum(1, 2, 17, seg) == 0xFFFF


# --- both engines' output, checked by scapy -----------------------------------------

def _check_by_scapy(out: bytes) -> None:
    vnet, eth = tables.strip_vnet(out)
    flags, gso = vnet[0], vnet[1]
    if flags & tables.VNET_F_NEEDS_CSUM and gso:
        # A GSO frame keeps a partial sum: the new pseudo-header sum.
        ihl = (eth[14] & 15) * 4
        tot = int.from_bytes(eth[16:18], "big")
        at = 14 + ihl + (16 if eth[23] == 6 else 6)
        ps = ck.pseudo_header_sum(int.from_bytes(eth[26:30], "big"),
                                  int.from_bytes(eth[30:34], "big"), eth[23], tot - ihl)
        assert int.from_bytes(eth[at:at + 2], "big") == ps
        hdr = eth[14:14 + ihl]
        assert scapy_checksum(hdr[:10] + b"\0\0" + hdr[10 + 2:]) == int.from_bytes(hdr[10:12], "big")
        return
    assert not flags & tables.VNET_F_NEEDS_CSUM, "a completed checksum clears NEEDS_CSUM"
    if eth[23] == 17:
        ihl = (eth[14] & 15) * 4
        if eth[14 + ihl + 6:14 + ihl + 8] == b"\0\0":
            # No UDP checksum: only the IP header is scapy's to check.
            rebuilt = scapy_rebuild(eth)
            assert rebuilt[:14 + ihl] == eth[:14 + ihl]
            return
    rebuilt = scapy_rebuild(eth)
    assert eth == rebuilt, diff_bytes(eth, rebuilt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(3))
def test_rewritten_frames_have_scapys_checksums(impl, seed):
    rng = random.Random(seed)
    env = Env(impl, capacity=512)
    sent = 0
    for i in range(120):
        proto = rng.choice([6, 17])
        dport = 80 if proto == 6 else 53
        cport = 1000 + i
        # Open the conn (a SYN for TCP), then send a random frame each way.
        if proto == 6:
            verdict, _, out = env.send(v(tcp(sport=cport)), CLIENT_PORT)
            assert verdict == tables.V_TX
            _check_by_scapy(out)
        first = random_frame(rng, proto, CIP, VIP, cport, dport, CMAC, LMAC)
        verdict, _, out = env.send(first, CLIENT_PORT)
        if verdict == tables.V_TX:
            _check_by_scapy(out)
            sent += 1
        rport = 8080 if proto == 6 else 5353
        back = random_frame(rng, proto, RIP, CIP, rport, cport, RMAC, SMAC)
        verdict, _, out = env.send(back, RS_PORT)
        if verdict == tables.V_TX:
            _check_by_scapy(out)
            sent += 1
    assert sent > 150


@pytest.mark.parametrize("impl", IMPLS)
def test_udp_without_checksum_keeps_none(impl):
    env = Env(impl)
    verdict, _, out = env.send(tables.with_vnet(udp(chksum=0, payload=b"abc")), CLIENT_PORT)
    assert verdict == tables.V_TX
    eth = out[10:]
    assert eth[40:42] == b"\0\0"
    assert ck.checksum(eth[14:34]) == 0
