"""Tests of what is particular to the C engine (pylvs._fast.Engine).

The frame-by-frame behaviour both engines share is the business of the
comparison tests; here: argument checking (bad input must raise, never
crash), the conn index under load and churn (backward-shift deletion), the
expiry clock hand, expiry on lookup, the hash key, conns(), reference
counting, and a randomised run against the reference engine.
"""

from __future__ import annotations

import gc
import ipaddress
import random
import struct
import sys

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, Raw, raw

from pylvs.engine import states, tables
from pylvs.engine.tables import with_vnet

from pylvs import _fast  # always built (make test builds it): a missing one must fail, not skip
Engine = _fast.Engine

CIP, VIP, RIP = "10.0.0.2", "10.0.0.1", "192.168.1.2"
CMAC, LMAC = "02:00:00:00:00:02", "02:00:00:00:00:01"
SMAC, RMAC = "02:00:00:00:01:01", "02:00:00:00:01:02"
TCP_SVC, UDP_SVC, DR_SVC = 0, 1, 2
KEY = bytes(range(16))


def ip(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


def make_tables():
    svc = tables.empty_services(4)
    svc[TCP_SVC] = (ip(VIP), 80, tables.PROTO_TCP, tables.SVC_F_USED, 0, 0)
    svc[UDP_SVC] = (ip(VIP), 53, tables.PROTO_UDP, tables.SVC_F_USED, 0, 0)
    svc[DR_SVC] = (ip(VIP), 82, tables.PROTO_TCP, tables.SVC_F_USED, 0, 0)
    dst = tables.empty_dests(4)
    for d, (s, port, fwd) in enumerate([(TCP_SVC, 8080, tables.FWD_MASQ),
                                        (UDP_SVC, 5353, tables.FWD_MASQ),
                                        (DR_SVC, 82, tables.FWD_ROUTE)]):
        dst[d]["daddr"] = ip(RIP)
        dst[d]["dport"] = port
        dst[d]["svc"] = s
        dst[d]["weight"] = 1
        dst[d]["fwd"] = fwd
        dst[d]["flags"] = tables.DEST_F_USED | tables.DEST_F_RESOLVED
        dst[d]["out_port"] = 1
        dst[d]["dmac"] = np.frombuffer(mac(RMAC), np.uint8)
        dst[d]["smac"] = np.frombuffer(mac(SMAC), np.uint8)
    return svc, dst


def sched(svc: int, caddr: int, cport: int) -> int:
    return svc  # dest d serves service d


def engine(capacity=64, key=KEY, schedule=sched, counters=None, timeouts=None):
    counters = counters or tables.Counters(max_services=8, max_dests=8)
    e = Engine(capacity, key=key, transitions=states.TRANSITIONS,
               timeouts=states.timeout_array() if timeouts is None else timeouts,
               counters=counters, schedule=schedule)
    e.set_tables(*make_tables())
    return e, counters


def tcp(src=CIP, dst=VIP, sport=1000, dport=80, flags="S", smac=CMAC, dmac=LMAC,
        payload=b""):
    p = Ether(src=smac, dst=dmac) / IP(src=src, dst=dst, id=7) / TCP(
        sport=sport, dport=dport, flags=flags, seq=1, window=8192)
    if payload:
        p = p / Raw(payload)
    return with_vnet(raw(p))


def udp(src=CIP, dst=VIP, sport=1000, dport=53, smac=CMAC, dmac=LMAC, payload=b"q",
        chksum=None):
    return with_vnet(raw(Ether(src=smac, dst=dmac) / IP(src=src, dst=dst, id=7)
                         / UDP(sport=sport, dport=dport, chksum=chksum) / Raw(payload)))


class UdpFlows:
    """Many UDP frames fast: one scapy template without an L4 checksum
    (so only the ports change), patched per flow."""

    def __init__(self):
        self.req = bytearray(udp(chksum=0))
        self.rep = bytearray(udp(src=RIP, dst=CIP, sport=5353, dport=1000, smac=RMAC,
                                 dmac=SMAC, chksum=0))
        self.l4 = tables.VNET_HDR_LEN + 14 + 20

    def request(self, cport: int) -> bytes:
        struct.pack_into("!H", self.req, self.l4, cport)
        return bytes(self.req)

    def reply(self, cport: int) -> bytes:
        struct.pack_into("!H", self.rep, self.l4 + 2, cport)
        return bytes(self.rep)


_BATCH = tables.Batch(size=256, slot=2048)


def send(e, frames, now=0.0, in_port=0):
    """Process frames in batches; the list of (verdict, out_port, frame)."""
    frames = list(frames)
    out = []
    b = _BATCH
    for i in range(0, len(frames), 256):
        b.clear()
        for f in frames[i:i + 256]:
            b.append(f, in_port)
        e.process(b, now)
        out += [(int(b.verdict[k]), int(b.out_port[k]), b.frame(k)) for k in range(b.count)]
    return out


def verdicts(results):
    return [r[0] for r in results]


def stat(c, name):
    return c.stat(name)


# --- SipHash --------------------------------------------------------------


def test_siphash_reference_vectors():
    # The SipHash paper's SipHash-2-4 vectors (key 00..0f): the generic
    # implementation is right, and 1-3 only changes the round counts.
    assert _fast._siphash(bytes(range(16)), bytes(range(15)), 2, 4) == 0xA129CA6149BE45E5
    assert _fast._siphash(bytes(range(16)), b"", 2, 4) == 0x726FDB47DD0E0E31


def test_key_hash_is_siphash13_of_the_13_byte_tuple():
    # The conn index's key: SipHash-1-3 keyed by `key` of (a1, a2, p1, p2,
    # proto) as little-endian host-order values (ip_vs.h, key_hash).
    rng = random.Random(5)
    for _ in range(200):
        key = rng.randbytes(16)
        e, _ = engine(key=key)
        proto = rng.choice([6, 17])
        a1, a2 = rng.getrandbits(32), rng.getrandbits(32)
        p1, p2 = rng.getrandbits(16), rng.getrandbits(16)
        data = struct.pack("<IIHHB", a1, a2, p1, p2, proto)
        assert e._key_hash(proto, a1, p1, a2, p2) == _fast._siphash(key, data, 1, 3)


# --- bad input must raise, never crash ----------------------------------


def kwargs(**over):
    kw = dict(key=KEY, transitions=states.TRANSITIONS, timeouts=states.timeout_array(),
              counters=tables.Counters(8, 8), schedule=sched)
    kw.update(over)
    return kw


@pytest.mark.parametrize("capacity", [0, -1, _fast.ENGINE_MAX_CAPACITY + 1])
def test_capacity_out_of_range(capacity):
    with pytest.raises(ValueError, match="capacity"):
        Engine(capacity, **kwargs())


@pytest.mark.parametrize("over,exc,match", [
    (dict(key=b"short"), ValueError, "16 bytes"),
    (dict(key="not bytes but str!"), TypeError, None),
    (dict(transitions=states.TRANSITIONS.astype(np.int64)), TypeError, "uint8"),
    (dict(transitions=np.zeros((3, 4, 10), np.uint8)), ValueError, "dimension 2"),
    (dict(transitions=np.full((3, 4, 11), 11, np.uint8)), ValueError, "TCP states"),
    (dict(transitions=[[0]]), TypeError, "transitions"),
    (dict(timeouts=np.zeros(12, np.float32)), TypeError, "float64"),
    (dict(timeouts=np.zeros(11)), ValueError, "timeouts"),
    (dict(timeouts=np.full(12, np.nan)), ValueError, "finite"),
    (dict(timeouts=states.timeout_array()[::-1]), TypeError, "C-contiguous"),
    (dict(schedule=42), TypeError, "callable"),
    (dict(counters=object()), AttributeError, None),
])
def test_constructor_rejects(over, exc, match):
    with pytest.raises(exc, match=match):
        Engine(16, **kwargs(**over))


def test_constructor_rejects_bad_counters():
    c = tables.Counters(8, 8)
    c.stats = np.zeros(32, np.int64)
    with pytest.raises(TypeError, match="counters.stats"):
        Engine(16, **kwargs(counters=c))
    c = tables.Counters(8, 8)
    c.stats.flags.writeable = False
    with pytest.raises(TypeError, match="writable"):
        Engine(16, **kwargs(counters=c))
    c = tables.Counters(8, 8)
    c.dest_conns = np.zeros((9, 2), np.int32)
    with pytest.raises(ValueError, match="one row per dest"):
        Engine(16, **kwargs(counters=c))
    c = tables.Counters(8, 8)
    c.svc_stats = np.zeros((8, 4), np.uint64)
    with pytest.raises(ValueError, match="svc_stats"):
        Engine(16, **kwargs(counters=c))
    c = tables.Counters(8, 8)
    c.stats = np.zeros(31, np.uint64)
    with pytest.raises(ValueError, match="counters.stats"):
        Engine(16, **kwargs(counters=c))


def test_set_tables_rejects():
    e, _ = engine()
    svc, dst = make_tables()
    with pytest.raises(TypeError, match="SERVICE_DTYPE"):
        e.set_tables(np.zeros(4, np.uint64), dst)
    with pytest.raises(TypeError, match="DEST_DTYPE"):
        e.set_tables(svc, svc)
    with pytest.raises(TypeError):
        e.set_tables([1, 2], dst)
    with pytest.raises(ValueError, match="one-dimensional"):
        e.set_tables(svc.reshape(2, 2), dst)
    with pytest.raises(ValueError, match="room for 8"):
        e.set_tables(tables.empty_services(9), dst)
    with pytest.raises(ValueError, match="room for 8"):
        e.set_tables(svc, tables.empty_dests(9))
    with pytest.raises(TypeError, match="C-contiguous"):
        e.set_tables(tables.empty_services(8)[::2], dst)
    # still working with the tables it had
    assert verdicts(send(e, [tcp()])) == [tables.V_TX]


def test_set_timeouts_and_process_reject():
    e, _ = engine()
    with pytest.raises(ValueError):
        e.set_timeouts(np.zeros(3))
    with pytest.raises(TypeError):
        e.set_timeouts(np.zeros(12, np.int32))
    b = tables.Batch(4, 128)
    b.append(tcp())
    with pytest.raises(AttributeError):
        e.process(object(), 0.0)
    b.count = 5
    with pytest.raises(ValueError, match="count"):
        e.process(b, 0.0)
    b.count = -1
    with pytest.raises(ValueError, match="count"):
        e.process(b, 0.0)
    b.count = 1
    b.length[0] = 129
    with pytest.raises(ValueError, match="slot"):
        e.process(b, 0.0)
    b.length[0] = len(tcp())
    for name, bad in [("buf", np.zeros((4, 128), np.int8)),
                      ("buf", np.zeros((4, 256), np.uint8)[:, ::2]),
                      ("buf", np.zeros(512, np.uint8)),
                      ("length", np.zeros(4, np.uint64)),
                      ("in_port", np.zeros(4, np.uint32)),
                      ("verdict", np.zeros(4, np.uint8)[::-1]),
                      ("out_port", np.zeros(4, np.int16))]:
        good = getattr(b, name)
        setattr(b, name, bad)
        with pytest.raises((TypeError, ValueError), match=name):
            e.process(b, 0.0)
        setattr(b, name, good)
    ro = b.verdict.copy()
    ro.flags.writeable = False
    b.verdict, good = ro, b.verdict
    with pytest.raises(TypeError, match="writable"):
        e.process(b, 0.0)
    b.verdict = good
    assert e.process(b, 0.0) == 1
    with pytest.raises(TypeError):
        e.expire("now", 1)


def test_truncations_and_garbage_never_crash():
    e, c = engine()
    good = [tcp(payload=b"abcdef"), udp(payload=b"xyz"), tcp(flags="A", payload=b"1")]
    frames = []
    for f in good:
        frames += [f[:n] for n in range(len(f) + 1)]
    rng = random.Random(3)
    for _ in range(2000):
        f = bytearray(rng.choice(good))
        for _ in range(rng.randrange(1, 6)):
            f[rng.randrange(len(f))] = rng.randrange(256)
        frames.append(bytes(f[:rng.randrange(len(f) + 1)]))
    res = send(e, frames)
    assert all(v in (tables.V_PASS, tables.V_TX, tables.V_DROP) for v in verdicts(res))
    assert stat(c, "rx_frames") == len(frames)
    e._check()


# --- the index under load --------------------------------------------------


def test_fill_to_capacity_then_table_full():
    cap = 300
    e, c = engine(capacity=cap)
    f = UdpFlows()
    res = send(e, [f.request(2000 + i) for i in range(cap)])
    assert verdicts(res) == [tables.V_TX] * cap
    assert e.conn_count == cap == e.capacity
    # every conn is found under both keys: nothing new created
    res = send(e, [f.request(2000 + i) for i in range(cap)] +
               [f.reply(2000 + i) for i in range(cap)], in_port=1)
    assert verdicts(res) == [tables.V_TX] * (2 * cap)
    assert stat(c, "conns_created") == cap
    assert int(c.dest_conns[1, tables.INACTIVE]) == cap
    # full of UDP conns that saw a reply: a new one replaces one of them
    assert verdicts(send(e, [f.request(9999)])) == [tables.V_TX]
    assert stat(c, "conns_evicted") == 1 and stat(c, "drop_table_full") == 0
    assert e.conn_count == cap
    e._check()
    # full of established TCP conns: nothing gives way
    e, c = engine(capacity=3)
    for p in range(3):
        send(e, [tcp(sport=4000 + p, flags="S"), tcp(sport=4000 + p, flags="A")])
    assert verdicts(send(e, [tcp(sport=5000, flags="S")])) == [tables.V_DROP]
    assert stat(c, "drop_table_full") == 1 and stat(c, "conns_evicted") == 0
    e._check()


def test_churn_keeps_every_remaining_conn_reachable():
    """Random deletions (via expiry) and inserts, many rounds: backward-shift
    deletion must leave no conn cut off from its home bucket."""
    cap = 2048
    timeouts = states.timeout_array()
    e, c = engine(capacity=cap, timeouts=timeouts)
    f = UdpFlows()
    rng = random.Random(11)
    live: dict[int, float] = {}   # cport -> expires
    now = 0.0
    free_ports = list(range(1024, 60000))
    rng.shuffle(free_ports)
    for rnd in range(12):
        now += 1.0
        # new flows in groups, each group with its own lifetime
        new = [free_ports.pop() for _ in range(cap - len(live))]
        groups: dict[float, list[int]] = {}
        for port in new:
            groups.setdefault(rng.choice([1.5, 2.5, 3.5, 100.0]), []).append(port)
        for life, ports in groups.items():
            timeouts[states.UDP_STATE] = life
            e.set_timeouts(timeouts)
            res = send(e, [f.request(p) for p in ports], now)
            assert verdicts(res) == [tables.V_TX] * len(ports)
            live.update((p, now + life) for p in ports)
        assert e.conn_count == cap
        e._check()
        # sweep the whole slab: kills the conns whose time is up
        now += 1.0
        dead = [p for p, exp in live.items() if exp <= now]
        assert e.expire(now, cap) == len(dead)
        for p in dead:
            del live[p]
            free_ports.insert(0, p)
        assert e.conn_count == len(live)
        e._check()
        # every survivor is found in both directions without creating a conn
        created = stat(c, "conns_created")
        ports = list(live)
        res = send(e, [f.reply(p) for p in ports], now, in_port=1)
        assert verdicts(res) == [tables.V_TX] * len(ports)
        assert stat(c, "conns_created") == created
        for p in ports:  # the reply refreshed expires with the current timeout
            live[p] = now + timeouts[states.UDP_STATE]
    assert int(c.dest_conns[1].sum()) == e.conn_count


def test_many_conns_large_table():
    cap = 50_000
    e, c = engine(capacity=cap)
    f = UdpFlows()
    frames = [f.request(p) for p in range(1, cap + 1)]
    assert verdicts(send(e, frames)).count(tables.V_TX) == cap
    assert e.conn_count == cap
    e._check()
    # expire every other conn by hand-rolled time: none expire (900 s timeouts)
    assert e.expire(10.0, cap) == 0
    assert e.expire(1e9, cap // 2) == cap // 2
    e._check()
    assert e.expire(1e9, cap) == cap // 2
    assert e.conn_count == 0
    e._check()


# --- expiry ----------------------------------------------------------------


def udp_conns_in_slots(n, times):
    """An engine whose slot i holds a UDP conn created at times[i]."""
    e, c = engine(capacity=n)
    f = UdpFlows()
    for i, t in enumerate(times):
        send(e, [f.request(3000 + i)], now=t)
    return e, c, f


def test_clock_hand_visits_budget_slots_from_where_it_stopped():
    udp_to = states.timeout_array()[states.UDP_STATE]
    e, c, _ = udp_conns_in_slots(8, [float(i) for i in range(8)])
    assert [x[2] for x in e.conns()] == [3000 + i for i in range(8)]  # slot order
    now = 3.0 + udp_to  # conns of slots 0..3 are due
    assert e.expire(now, 2) == 2        # slots 0, 1
    assert e.conn_count == 6
    assert e.expire(now, 3) == 2        # slots 2, 3 (4 is not due)
    assert e.expire(now, 3) == 0        # slots 5, 6, 7
    assert e.expire(1e9, 1) == 0        # slot 0: empty
    assert e.expire(1e9, 2) == 0        # slots 1, 2: empty
    assert e.expire(1e9, 2) == 1        # slot 3: empty, slot 4: due now
    assert e.conn_count == 3
    assert stat(c, "conns_expired") == 5
    assert int(c.dest_conns[1, tables.INACTIVE]) == 3
    assert e.expire(1e9, 0) == 0 and e.expire(1e9, -5) == 0
    assert e.expire(1e9, 10**12) == 3   # more than a lap: every slot once
    assert e.conn_count == 0
    e._check()


def test_budget_beyond_capacity_moves_the_hand_by_budget():
    e, c, f = udp_conns_in_slots(4, [0.0] * 4)
    assert e.expire(0.0, 6) == 0        # hand: 6 mod 4 = 2
    assert e.expire(1e9, 1) == 1        # slot 2
    assert [x[2] for x in e.conns()] == [3000, 3001, 3003]
    assert e.expire(1e9, 1) == 1        # slot 3
    assert [x[2] for x in e.conns()] == [3000, 3001]


def test_freed_slot_is_reused_first():
    e, c, f = udp_conns_in_slots(4, [0.0, 0.0, 100.0, 0.0])
    udp_to = states.timeout_array()[states.UDP_STATE]
    assert e.expire(udp_to, 4) == 3     # slots 0, 1, 3 freed in that order
    send(e, [f.request(4000), f.request(4001)], now=udp_to)
    slots = [x[2] for x in e.conns()]
    # slot 3 was pushed last, so it is reused first; then slot 1
    assert slots == [4001, 3002, 4000]


def test_active_conn_expiry_decrements_active():
    e, c = engine()
    send(e, [tcp(flags="S")], 0.0)
    send(e, [tcp(src=RIP, dst=CIP, sport=8080, dport=1000, flags="SA", smac=RMAC,
                 dmac=SMAC)], 0.0, in_port=1)
    send(e, [tcp(flags="A")], 0.0)
    assert e.conns()[0][7] == states.ESTABLISHED
    assert c.dest_conns[0].tolist() == [1, 0]
    assert e.expire(900.0, 64) == 1
    assert c.dest_conns[0].tolist() == [0, 0]


def test_expired_on_lookup():
    e, c = engine()
    f = UdpFlows()
    udp_to = states.timeout_array()[states.UDP_STATE]
    send(e, [f.request(1000)], 0.0)
    assert e.conns()[0][8] == udp_to
    # the reply just before the deadline is a hit and refreshes it
    assert verdicts(send(e, [f.reply(1000)], udp_to - 1, in_port=1)) == [tables.V_TX]
    # at the deadline the reply finds an expired conn: expired on the spot, a miss
    res = send(e, [f.reply(1000)], 2 * udp_to - 1, in_port=1)
    assert verdicts(res) == [tables.V_PASS]
    assert e.conn_count == 0
    assert stat(c, "conns_expired") == 1 and stat(c, "pass_not_ours") == 1
    assert c.dest_conns[1].tolist() == [0, 0]
    # a request for a dead conn makes a new one in the same slot
    send(e, [f.request(2000)], 0.0)
    res = send(e, [f.request(2000)], 1000.0)
    assert verdicts(res) == [tables.V_TX]
    assert stat(c, "conns_expired") == 2 and stat(c, "conns_created") == 3
    assert e.conns()[0][8] == 1000.0 + udp_to
    # TCP: a non-SYN for an expired conn is dropped, the conn is gone
    send(e, [tcp(flags="S", sport=5000)], 0.0)
    res = send(e, [tcp(flags="A", sport=5000)], 1000.0)
    assert verdicts(res) == [tables.V_DROP]
    assert stat(c, "drop_no_conn") == 1
    assert [x[2] for x in e.conns()] == [2000]
    e._check()


def test_expired_holder_of_the_out_key_is_no_conflict():
    # Two services share the dest RIP:8080, so a client's second conn through
    # the other VIP would take the same OUT key.
    svc, dst = make_tables()
    svc[3] = (ip("10.0.0.9"), 80, tables.PROTO_TCP, tables.SVC_F_USED, 0, 0)
    dst[3] = dst[0]
    dst[3]["svc"] = 3
    e, c = engine(schedule=lambda s, a, p: {0: 0, 3: 3}.get(s, s))
    e.set_tables(svc, dst)
    send(e, [tcp(flags="S")], 0.0)
    assert verdicts(send(e, [tcp(dst="10.0.0.9", flags="S")], 1.0)) == [tables.V_DROP]
    assert stat(c, "drop_conflict") == 1
    # after the first conn's SYN_RECV timeout it no longer holds the key
    later = states.timeout_array()[states.SYN_RECV]
    assert verdicts(send(e, [tcp(dst="10.0.0.9", flags="S")], later)) == [tables.V_TX]
    assert stat(c, "conns_expired") == 1
    assert [(x[3], x[11]) for x in e.conns()] == [(ip("10.0.0.9"), 3)]
    e._check()


# --- the key, conns() ----------------------------------------------------


def test_different_keys_same_behaviour():
    rng = random.Random(2)
    f = UdpFlows()
    ops = []
    now = 0.0
    for _ in range(600):
        now += rng.random() * 5
        p = rng.randrange(1000, 1400)
        if rng.random() < 0.05:
            ops.append(("expire", now, rng.randrange(1, 40)))
        else:
            ops.append(("send", now, f.request(p) if rng.random() < 0.6 else f.reply(p)))
    out = []
    # Below the limit (400 ports, 400 conns at most): the key moves index
    # entries only. At the limit it also seeds the eviction samples.
    for key in (bytes(16), bytes(range(16)), rng.randbytes(16)):
        e, c = engine(capacity=400, key=key)
        res = []
        for op, t, arg in ops:
            res.append(e.expire(t, arg) if op == "expire" else send(e, [arg], t))
        out.append((res, e.conns(), c.stats.tolist(), c.dest_conns.tolist()))
        e._check()
    assert out[0] == out[1] == out[2]
    assert out[0][2][tables.STAT_INDEX["conns_expired"]] > 0


def test_conns_contents():
    e, c = engine()
    assert e.conns() == [] and e.conn_count == 0 and e.capacity == 64
    send(e, [tcp(flags="S")], 10.0)
    send(e, [udp(sport=7)], 11.0)
    to = states.timeout_array()
    assert e.conns() == [
        (6, ip(CIP), 1000, ip(VIP), 80, ip(RIP), 8080, states.SYN_RECV,
         10.0 + to[states.SYN_RECV], tables.FWD_MASQ, 0, TCP_SVC),
        (17, ip(CIP), 7, ip(VIP), 53, ip(RIP), 5353, states.UDP_STATE,
         11.0 + to[states.UDP_STATE], tables.FWD_MASQ, 1, UDP_SVC),
    ]
    # a DR dest: the conn carries the method it was bound to
    assert verdicts(send(e, [tcp(dport=82, flags="S")], 12.0)) == [tables.V_TX]
    assert e.conns()[2] == (6, ip(CIP), 1000, ip(VIP), 82, ip(RIP), 82, states.SYN_RECV,
                            12.0 + to[states.SYN_RECV], tables.FWD_ROUTE, 2, DR_SVC)
    assert e.conn_count == 3


# --- rewrite and checksums, checked with scapy ----------------------------


def checksums_ok(frame: bytes) -> bool:
    p = Ether(frame[tables.VNET_HDR_LEN:])
    l4 = p[TCP] if TCP in p else p[UDP]
    got_ip, got_l4 = p[IP].chksum, l4.chksum
    del p[IP].chksum
    del l4.chksum
    q = Ether(raw(p))
    want_l4 = (q[TCP] if TCP in q else q[UDP]).chksum
    return q[IP].chksum == got_ip and (want_l4 == got_l4 or (UDP in q and got_l4 == 0))


def test_nat_rewrite_and_checksums_both_ways():
    e, c = engine()
    [(v, port, out)] = send(e, [tcp(flags="S", payload=b"hello")], 0.0)
    assert (v, port) == (tables.V_TX, 1)
    p = Ether(out[10:])
    assert (p.src, p.dst, p[IP].src, p[IP].dst, p[TCP].dport) == (SMAC, RMAC, CIP, RIP, 8080)
    assert checksums_ok(out)
    reply = tcp(src=RIP, dst=CIP, sport=8080, dport=1000, flags="SA", smac=RMAC, dmac=SMAC,
                payload=b"world!")
    [(v, port, out)] = send(e, [reply], 0.0, in_port=3)
    assert (v, port) == (tables.V_TX, 0)
    p = Ether(out[10:])
    assert (p.src, p.dst, p[IP].src, p[IP].dst, p[TCP].sport) == (LMAC, CMAC, VIP, CIP, 80)
    assert checksums_ok(out)
    for payload, ck in [(b"odd", None), (b"even", None), (b"zero", 0)]:
        [(v, _, out)] = send(e, [udp(payload=payload, chksum=ck, sport=11)], 0.0)
        assert v == tables.V_TX and checksums_ok(out)
        if ck == 0:
            assert out[-len(payload) - 2:-len(payload)] == b"\0\0"


def partial(frame: bytes, gso: int) -> bytes:
    """As a sender with checksum offload: pseudo-header sum in the field."""
    eth = frame[tables.VNET_HDR_LEN:]
    p = Ether(eth)
    proto = p[IP].proto
    at = 14 + 20 + (16 if proto == 6 else 6)
    plen = p[IP].len - 20
    s = sum(struct.unpack("!4H", eth[26:34])) + proto + plen
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    eth = eth[:at] + struct.pack("!H", s) + eth[at + 2:]
    return with_vnet(eth, flags=tables.VNET_F_NEEDS_CSUM, gso_type=gso, csum_start=34,
                     csum_offset=at - 34, gso_size=1400 if gso else 0)


@pytest.mark.parametrize("make", [lambda: tcp(payload=b"x" * 33), lambda: udp(payload=b"y" * 9)])
def test_partial_checksum_completed(make):
    e, c = engine()
    [(v, _, out)] = send(e, [partial(make(), 0)])
    assert v == tables.V_TX and out[0] == 0 and checksums_ok(out)
    assert stat(c, "csum_partial_fixed") == 1


def test_gso_pseudo_header_sum_adjusted():
    e, c = engine()
    [(v, _, out)] = send(e, [partial(tcp(payload=b"z" * 100), tables.VNET_GSO_TCPV4)])
    assert v == tables.V_TX and stat(c, "gso_frames") == 1
    assert out[:10] == partial(tcp(payload=b"z" * 100), 1)[:10]  # vnet header kept
    # the field is now the pseudo-header sum of the rewritten addresses
    want = partial(with_vnet(out[10:]), tables.VNET_GSO_TCPV4)
    assert out[10 + 14 + 20 + 16:][:2] == want[10 + 14 + 20 + 16:][:2]


# --- the scheduler upcall -----------------------------------------------


def test_scheduler_errors_are_reported_not_raised(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda a: seen.append(a.exc_type))

    def boom(s, a, p):
        raise KeyError("no")

    e, c = engine(schedule=boom)
    assert verdicts(send(e, [tcp()])) == [tables.V_DROP]
    assert seen == [KeyError] and stat(c, "sched_errors") == 1
    for bad in (None, "1", 1.5):
        e, c = engine(schedule=lambda s, a, p, bad=bad: bad)
        assert verdicts(send(e, [tcp()])) == [tables.V_DROP]
        assert stat(c, "sched_errors") == 1
    for res in (-1, -7, 4, 8, 2**70, -(2**70), 1):  # dest 1 serves another service
        e, c = engine(schedule=lambda s, a, p, res=res: res)
        assert verdicts(send(e, [tcp()])) == [tables.V_DROP]
        assert stat(c, "drop_no_dest") == 1
    e, c = engine(schedule=lambda s, a, p: np.int64(0))
    assert verdicts(send(e, [tcp()])) == [tables.V_TX]


def test_scheduler_gets_host_order_ints():
    calls = []
    e, c = engine(schedule=lambda *a: calls.append(a) or 0)
    send(e, [tcp(src="1.2.3.4", sport=0xABCD)])
    assert calls == [(TCP_SVC, ip("1.2.3.4"), 0xABCD)]


def test_engine_cannot_be_changed_from_inside_the_upcall(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda a: seen.append(a.exc_value))
    holder = {}

    def meddle(s, a, p):
        holder["e"].set_tables(*make_tables())

    e, c = engine(schedule=meddle)
    holder["e"] = e
    assert verdicts(send(e, [tcp()])) == [tables.V_DROP]
    assert isinstance(seen[0], RuntimeError) and stat(c, "sched_errors") == 1

    def reenter(s, a, p):
        holder["e"].process(tables.Batch(1, 64), 0.0)

    e, c = engine(schedule=reenter)
    holder["e"] = e
    send(e, [tcp()])
    assert isinstance(seen[1], RuntimeError)
    # reading is fine
    e, c = engine(schedule=lambda s, a, p: len(holder["e"].conns()) + holder["e"].conn_count)
    holder["e"] = e
    assert verdicts(send(e, [tcp()])) == [tables.V_TX]


def test_engine_cannot_be_changed_while_reading_the_schedulers_answer(monkeypatch):
    # Turning the answer into a slot runs its __index__: Python code, while
    # the miss path is still half done.
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda a: seen.append(a.exc_value))
    holder = {}

    class Answer:
        def __index__(self):
            holder["e"].set_tables(*make_tables())
            return 0

    e, c = engine(schedule=lambda s, a, p: Answer())
    holder["e"] = e
    assert verdicts(send(e, [tcp()])) == [tables.V_DROP]
    assert isinstance(seen[0], RuntimeError) and stat(c, "sched_errors") == 1


def test_lengths_changed_during_the_upcall_stay_inside_the_slots():
    # process() checks every length first, but the scheduler is Python and
    # may write batch.length before the later frames are read.
    b = tables.Batch(size=2, slot=128)
    big = tcp(payload=b"p" * 200)          # IP total length 240: beyond the slot
    b.append(tcp())
    b.append(big[:128])

    def meddle(s, a, p):
        b.length[1] = len(big)
        return 0

    e, c = engine(schedule=meddle)
    e.process(b, 0.0)
    assert b.verdict[1] == tables.V_DROP and stat(c, "drop_bad_ip") == 1


def test_frames_the_scheduler_rewrites_are_parsed_again():
    # The batch path parses and hashes frames ahead of their turn; the
    # scheduler is Python and may rewrite a later frame of the batch first:
    # that frame must be handled as it is then, and its conn indexed under
    # its key as it is then.
    b = tables.Batch(size=12, slot=256)
    for k in range(12):
        b.append(tcp(sport=4000 + k))
    sport_at = tables.VNET_HDR_LEN + 14 + 20

    def meddle(s, a, p):
        if p == 4000:
            b.buf[5, sport_at:sport_at + 2] = np.frombuffer(struct.pack("!H", 4999), np.uint8)
        return s

    e, c = engine(schedule=meddle)
    assert e.process(b, 0.0) == 12
    e._check()
    assert sorted(cn[2] for cn in e.conns()) == sorted({4000 + k for k in range(12)} - {4005}
                                                       | {4999})
    acks = send(e, [tcp(sport=4999, flags="A")])
    assert verdicts(acks) == [tables.V_TX] and stat(c, "conns_created") == 12


def test_conns_made_in_a_batch_are_found_by_their_keys():
    # The batch path hashes tuples eight at a time (ip_vs_core.c,
    # parse_group); the conns it makes must sit where the one-at-a-time
    # hash of the conn table looks for them (_check), and be hit again.
    # UDP frames in between move the TCP ones across the eight lanes.
    e, c = engine(capacity=256)
    frames = []
    for k in range(21):
        frames.append(tcp(sport=2000 + k))
        if k % 5 == 0:
            frames.append(udp(sport=3000 + k))
    assert verdicts(send(e, frames)) == [tables.V_TX] * len(frames)
    e._check()
    assert e.conn_count == len(frames)
    acks = send(e, [tcp(sport=2000 + k, flags="A") for k in range(21)])
    assert verdicts(acks) == [tables.V_TX] * 21
    assert stat(c, "conns_created") == len(frames)


# --- references ------------------------------------------------------------


def test_tables_and_counters_outlive_their_python_names():
    c = tables.Counters(8, 8)
    e = Engine(16, **kwargs(counters=c))
    e.set_tables(*make_tables())
    stats = c.stats
    del c
    gc.collect()
    assert verdicts(send(e, [tcp()])) == [tables.V_TX]
    assert int(stats[tables.STAT_INDEX["tx_frames"]]) == 1


def test_cycle_through_the_scheduler_is_collected():
    import weakref

    class Balancer:
        def schedule(self, s, a, p):
            return 0

    b = Balancer()
    b.engine = Engine(16, **kwargs(schedule=b.schedule))
    r = weakref.ref(b)
    del b
    gc.collect()
    assert r() is None


# --- against the reference engine ------------------------------------------


def test_random_traffic_matches_reference():
    from pylvs.engine.reference import Engine as RefEngine

    rng = random.Random(7)
    pool = [tcp(flags=fl, sport=sp) for fl in ("S", "A", "F", "R", "SA", "PA")
            for sp in (1000, 1001)]
    pool += [tcp(src=RIP, dst=CIP, sport=8080, dport=sp, flags=fl, smac=RMAC, dmac=SMAC)
             for fl in ("SA", "A", "F", "R") for sp in (1000, 1001)]
    pool += [udp(sport=sp, chksum=ck) for sp in (1000, 1001) for ck in (None, 0)]
    pool += [tcp(dport=82), partial(tcp(payload=b"p" * 7), 0), partial(udp(), 1)]
    engines = []
    for cls in (Engine, RefEngine):
        c = tables.Counters(8, 8)
        e = cls(3, key=KEY, transitions=states.TRANSITIONS, timeouts=states.timeout_array(),
                counters=c, schedule=sched)
        e.set_tables(*make_tables())
        engines.append((e, c))
    now = 0.0
    for step in range(1500):
        now += rng.choice([0.0, 0.5, 5.0, 50.0])
        if rng.random() < 0.1:
            budget = rng.randrange(0, 7)
            assert len({e.expire(now, budget) for e, _ in engines}) == 1
            continue
        frames = [rng.choice(pool) for _ in range(rng.randrange(1, 5))]
        if rng.random() < 0.2:
            i = rng.randrange(len(frames))
            frames[i] = frames[i][:rng.randrange(len(frames[i]))]
        results = [send(e, frames, now) for e, _ in engines]
        assert results[0] == results[1], step
        (e1, c1), (e2, c2) = engines
        assert e1.conns() == e2.conns(), step
        for name in ("stats", "svc_stats", "dest_stats", "dest_conns"):
            assert (getattr(c1, name) == getattr(c2, name)).all(), (step, name)


def test_every_truncation_in_an_exact_size_buffer():
    """Each prefix of each frame kind in a batch whose slot is exactly that
    long: a read past `len` leaves the array (an ASan build reports it)."""
    kinds = [tcp(payload=b"abc"), udp(payload=b"xy"), tcp(flags="A"),
             partial(tcp(payload=b"p" * 5), 0), partial(udp(payload=b"u"), 1),
             tcp(src=RIP, dst=CIP, sport=8080, dport=1000, flags="A", smac=RMAC, dmac=SMAC)]
    e, c = engine()
    send(e, [tcp()])  # a conn, so that replies reach the rewrite
    for f in kinds:
        for n in range(len(f) + 1):
            b = tables.Batch(size=1, slot=max(n, 1))
            b.append(f[:n])
            e.process(b, 0.0)
            assert b.verdict[0] in (tables.V_PASS, tables.V_TX, tables.V_DROP)
    e._check()
