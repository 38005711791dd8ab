"""Connection sync, the engines' side (docs/engine.md, "Sync").

The kernel's rules (net/netfilter/ipvs/ip_vs_core.c ip_vs_in_hook, which
calls ip_vs_sync.c ip_vs_sync_conn after each client packet;
ip_vs_sync_conn_needed; ip_vs_proc_conn on the backup): a master sends a
TCP conn when it enters FIN_WAIT, CLOSE, CLOSE_WAIT or TIME_WAIT, and in
ESTABLISHED (and UDP) at the sync_threshold-th client packet of every
sync_period; a template with every sync call of a conn it controls; never a
one-packet conn. A backup creates or updates the conn keyed by its tuple,
bound to its own dest of that address and port, so that the conn's next
frames leave as they did from the master.

Every table runs on the C engine and on the reference, and the two are
compared row by row as well as with the expected values.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from pylvs.engine import new_engine, states, tables
from pylvs.engine import sync as esync
from pylvs.engine.sync import SYNC_DTYPE

from engine_kit import (CIP, DESTS, RIP, RIP2, RMAC, SERVICES, SMAC, VIP,
                        Env, build_tables, ip, tcp, udp, v)

IMPLS = ["python", "c"]
RS_PORT = 1
TO = states.timeout_array()
EST, FIN_WAIT, CLOSE_WAIT = states.ESTABLISHED, states.FIN_WAIT, states.CLOSE_WAIT
TCP_, UDP_ = tables.PROTO_TCP, tables.PROTO_UDP
INACTIVE, NOOUTPUT, TEMPLATE, SYNC = (esync.CONN_F_INACTIVE, esync.CONN_F_NOOUTPUT,
                                      esync.CONN_F_TEMPLATE, esync.CONN_F_SYNC)
MASQ, TUNNEL, ROUTE = tables.FWD_MASQ, tables.FWD_TUNNEL, tables.FWD_ROUTE

# Services of engine_kit used here: 0 TCP VIP:80 -> RIP:8080 NAT (dest 0),
# 1 UDP VIP:53 -> RIP:5353 NAT (dest 1), 3 TCP VIP:82 -> RIP2:82 DR (dest 3),
# 11 TCP VIP:88 -> RIP2:88 Tun IPIP (dest 13). Service 12 is added here: TCP
# VIP:90, persistent 600 s, to RIP:9090 NAT (dest 14); 13: UDP VIP:54 -o;
# service 0 gets a second dest, RIP2:8080 (17), that its scheduler never picks.
PSVC, PDEST, OPS_SVC, OPS_DEST, DEST2 = 12, 14, 13, 15, 17
SVCS = {**SERVICES, PSVC: (TCP_, VIP, 90), OPS_SVC: (UDP_, VIP, 54)}
DSTS = {**DESTS, PDEST: (PSVC, RIP, 9090, MASQ, DESTS[0][4]),
        OPS_DEST: (OPS_SVC, RIP, 5454, MASQ, DESTS[0][4]),
        DEST2: (0, RIP2, 8080, MASQ, DESTS[0][4])}
SCHED = {0: 0, 1: 1, 3: 3, 11: 13, PSVC: PDEST, OPS_SVC: OPS_DEST}


def world_tables() -> tuple[np.ndarray, np.ndarray]:
    svc, dst = build_tables(SVCS, DSTS)
    svc[PSVC]["timeout"], svc[PSVC]["netmask"] = 600, 0xFFFFFFFF
    svc[OPS_SVC]["flags"] |= tables.SVC_F_ONE_PACKET
    return svc, dst


class World(Env):
    """An engine_kit Env with the sync services; sysctls by name."""

    def __init__(self, impl: str, capacity: int = 64, schedule=None, counters=None, **sysctls):
        super().__init__(impl, capacity,
                         schedule=schedule or (lambda s, c, p: SCHED.get(s, -1)),
                         services=SVCS, dests=DSTS)
        if counters is not None:   # a worker's share of CounterSum
            self.counters = counters
            self.engine = new_engine(impl, capacity, counters=counters,
                                     schedule=schedule or (lambda s, c, p: SCHED.get(s, -1)),
                                     key=bytes(range(16)))
        self.engine.set_tables(*world_tables())
        values = tables.default_sysctls()
        for name, value in sysctls.items():
            values[tables.SYSCTL_INDEX[name]] = value
        self.engine.set_sysctls(values)

    def drain(self, n: int = 64) -> list[tuple]:
        out = np.zeros(n, SYNC_DTYPE)
        return out[:self.engine.sync_drain(out)].tolist()

    def install(self, recs, now: float) -> int:
        return self.engine.sync_install(records(recs), now)


def rec(proto, state, flags, caddr, cport, vport, daddr, dport, timeout, vaddr=VIP) -> tuple:
    """A SYNC_DTYPE record as a tuple (host order, fwmark 0)."""
    return (proto, state, flags, ip(caddr), cport, ip(vaddr), vport, ip(daddr), dport, 0,
            int(timeout))


def records(rows) -> np.ndarray:
    return np.array([tuple(r) for r in rows], dtype=SYNC_DTYPE)


def check(engine) -> None:
    """The C engine's own consistency check of slab and index (tests only)."""
    if hasattr(engine, "_check"):
        engine._check()


def sync_stats(env) -> dict[str, int]:
    return {k: n for k, n in env.stats().items() if k.startswith(("sync_", "drop_sync", "conns_"))}


# Client frames of one flow each (CIP:1000 unless said).
def syn(**kw):
    return v(tcp(flags="S", **kw))


def ack(**kw):
    return v(tcp(flags="A", seq=1001, **kw))


def fin(**kw):
    return v(tcp(flags="FA", seq=1001, **kw))


def dgram(**kw):
    return v(udp(**kw))


def reply(sport=8080, dport=1000, flags="A", src=RIP):
    """The real server's frame to the client (NAT replies pass the director)."""
    return v(tcp(src=src, dst=CIP, sport=sport, dport=dport, flags=flags, seq=5000,
                 smac=RMAC, dmac=SMAC))


# --- the master: which client frames queue which records -------------------

NAT_EST = rec(TCP_, EST, MASQ, CIP, 1000, 80, RIP, 8080, TO[EST])
# A client's FIN on an ESTABLISHED NAT conn: CLOSE_WAIT (the INPUT table).
NAT_FIN = rec(TCP_, CLOSE_WAIT, MASQ | INACTIVE, CIP, 1000, 80, RIP, 8080, TO[CLOSE_WAIT])
UDP_REC = rec(UDP_, esync.IP_VS_UDP_S_NORMAL, MASQ | INACTIVE, CIP, 1000, 53, RIP, 5353,
              TO[states.UDP_STATE])
DR_EST = rec(TCP_, EST, ROUTE | NOOUTPUT, CIP, 1000, 82, RIP2, 82, TO[EST])
TUN_EST = rec(TCP_, EST, TUNNEL | NOOUTPUT, CIP, 1000, 88, RIP2, 88, TO[EST])
P_EST = rec(TCP_, EST, MASQ, CIP, 1000, 90, RIP, 9090, TO[EST])
P_TPL = rec(TCP_, tables.CTPL_NONE, MASQ | INACTIVE | TEMPLATE, CIP, 0, 90, RIP, 9090, 600)
P_TPL_ASSURED = P_TPL[:1] + (tables.CTPL_ASSURED,) + P_TPL[2:]


def acks(n, **kw):
    return [ack(**kw)] * n


# (description, sysctls, frames [(frame, port, now)] or frames at now 0,
#  records expected after each frame, counters).
MASTER = [
    ("TCP NAT: the handshake is not sent; ESTABLISHED at the 3rd client packet "
     "(sync_threshold 3)",
     {}, [syn(), ack(), ack()], [[], [], [NAT_EST]], {"sync_queued": 1}),
    ("TCP NAT: then again at packet 53 (sync_period 50), not between",
     {}, [syn()] + acks(52), [[]] * 2 + [[NAT_EST]] + [[]] * 49 + [[NAT_EST]],
     {"sync_queued": 2}),
    ("TCP: a change to CLOSE_WAIT (client FIN) is sent at once (inactive), whatever the count",
     {}, [syn(), ack(), ack(), ack(), fin()], [[], [], [NAT_EST], [], [NAT_FIN]],
     {"sync_queued": 2}),
    ("TCP: a state that stays is not sent again before the period",
     {}, [syn(), ack(), ack(), fin(), fin()], [[], [], [NAT_EST], [NAT_FIN], []],
     {"sync_queued": 2}),
    ("UDP: the 3rd datagram, state IP_VS_UDP_S_NORMAL, inactive, the UDP timeout",
     {}, [dgram()] * 4, [[], [], [UDP_REC], []], {"sync_queued": 1}),
    ("DR: the method and NOOUTPUT (replies bypass the director)",
     {}, [syn(dport=82), ack(dport=82), ack(dport=82)], [[], [], [DR_EST]], {"sync_queued": 1}),
    ("Tun (IPIP)", {}, [syn(dport=88), ack(dport=88), ack(dport=88)], [[], [], [TUN_EST]],
     {"sync_queued": 1}),
    ("sync_threshold 1: from the first packet in a sync state",
     {"sync_threshold": 1}, [syn(), ack()] + acks(50), [[], []] + [[]] * 48 + [[NAT_EST], []],
     {"sync_queued": 1}),
    ("sync_period 0: only at packet sync_threshold, never again",
     {"sync_period": 0}, [syn()] + acks(52), [[], [], [NAT_EST]] + [[]] * 50,
     {"sync_queued": 1}),
    ("persistence: the template goes with every client packet of its conns, after the conn",
     {}, [syn(dport=90), ack(dport=90), ack(dport=90)],
     [[P_TPL], [P_TPL_ASSURED], [P_EST, P_TPL_ASSURED]], {"sync_queued": 4}),
    ("sync_persist_mode 1: a persistent service's conns are not sent, their templates are",
     {"sync_persist_mode": 1}, [syn(dport=90), ack(dport=90), ack(dport=90)],
     [[P_TPL], [P_TPL_ASSURED], [P_TPL_ASSURED]], {"sync_queued": 3}),
    ("one-packet UDP (-o): no datagram's conn is ever sent",
     {"sync_threshold": 1}, [dgram(dport=54)] * 3, [[], [], []], {}),
    ("sync_qlen_max 1: a second record waits for no drain, it is dropped and counted",
     {"sync_qlen_max": 1}, [syn(), ack(), ack(), syn(sport=1001), ack(sport=1001),
                            ack(sport=1001)],
     None, {"sync_queued": 1, "sync_queue_full": 1}),
]


def run_master(impl, sysctls, frames, drain=True):
    w = World(impl, **sysctls)
    w.engine.set_sync_master(True)
    got = []
    for f in frames:
        verdict, _, _ = w.send(f)
        assert verdict in (tables.V_TX, tables.V_EMIT)   # Tun: V_EMIT
        if drain:
            got.append(w.drain())
    return w, got


@pytest.mark.parametrize("desc,sysctls,frames,expected,counters", MASTER,
                         ids=[m[0][:60] for m in MASTER])
def test_master_rule(desc, sysctls, frames, expected, counters):
    runs = {impl: run_master(impl, sysctls, frames, drain=expected is not None)
            for impl in IMPLS}
    for impl, (w, got) in runs.items():
        if expected is not None:
            assert got == expected, impl
        else:
            assert len(w.drain()) == 1
        assert {k: n for k, n in w.stats().items() if k.startswith("sync_")} == counters, impl
    assert runs["c"][1] == runs["python"][1]


@pytest.mark.parametrize("impl", IMPLS)
def test_master_off_queues_nothing(impl):
    w = World(impl)
    for f in [syn(), ack(), ack(), fin()]:
        w.send(f)
    assert w.drain() == [] and w.stats().get("sync_queued", 0) == 0
    w.engine.set_sync_master(True)
    w.send(fin())
    w.engine.set_sync_master(False)   # the queue goes with master mode
    w.engine.set_sync_master(True)
    assert w.drain() == []


def test_refresh_period_and_retries():
    """sync_refresh_period 10 s: a conn whose expiry moved less than that
    since it was sent is not sent again at the next period; with
    sync_retries 1 it is, once, 10/8 s after the first send."""
    frames = [(syn(), 0.0), (ack(), 0.0), (ack(), 0.0)] + [(ack(), 0.5)] * 50 + \
             [(ack(), 2.0)] * 50 + [(ack(), 3.0)] * 50
    for retries, want in ((0, [0.0]), (1, [0.0, 2.0])):
        results = []
        for impl in IMPLS:
            w = World(impl, sync_refresh_period=10, sync_retries=retries)
            w.engine.set_sync_master(True)
            sent = []
            for f, now in frames:
                w.send(f, now=now)
                sent += [now] * len(w.drain())
            results.append(sent)
        assert results[0] == results[1] == want, retries


def test_refresh_retry_waits_an_eighth_of_the_period_unrounded():
    """The retry waits sync_refresh_period/8, 1.25 s for 10 s (the kernel
    shifts jiffies, ip_vs_sync_conn_needed), not a whole second."""
    frames = [(syn(), 0.0), (ack(), 0.0), (ack(), 0.0)] + [(ack(), 1.1)] * 50 + \
             [(ack(), 1.3)] * 50
    for impl in IMPLS:
        w = World(impl, sync_refresh_period=10, sync_retries=1)
        w.engine.set_sync_master(True)
        sent = []
        for f, now in frames:
            w.send(f, now=now)
            sent += [now] * len(w.drain())
        assert sent == [0.0, 1.3], impl


def test_refresh_period_resends_after_it():
    """A conn resent once its expiry moved by the refresh period (the
    threshold rule still picks the packet)."""
    for impl in IMPLS:
        w = World(impl, sync_refresh_period=10)
        w.engine.set_sync_master(True)
        sent = []
        for now, n in ((0.0, 3), (5.0, 50), (11.0, 50)):
            for i in range(n):
                w.send(syn() if now == 0.0 and i == 0 else ack(), now=now)
                sent += [now] * len(w.drain())
        assert sent == [0.0, 11.0], impl


def test_master_two_workers():
    """Each worker's engine queues its own conns; draining every worker
    gets them all (the daemon drains every worker)."""
    for impl in IMPLS:
        cs = tables.CounterSum(16, 32, 2)
        ws = [World(impl, counters=cs.parts[i]) for i in range(2)]
        got = []
        for i, w in enumerate(ws):
            w.engine.set_sync_master(True)
            for f in (syn(sport=2000 + i), ack(sport=2000 + i), ack(sport=2000 + i)):
                w.send(f)
            got += w.drain()
        assert sorted(r[4] for r in got) == [2000, 2001]
        assert cs.stat("sync_queued") == 2


# --- the backup: records -> conns -------------------------------------------

BACKUP_DEFAULT = rec(TCP_, EST, MASQ, CIP, 1000, 80, RIP, 8080, 900)


def tuple_of(c):
    """A conns() tuple without expires, and its expires."""
    return c[:8] + c[9:], c[8]


# (description, records, installed, conns() after (without expires), expires,
#  counters, dest_conns rows, dest_persist rows)
BACKUP = [
    ("NAT TCP ESTABLISHED: a conn bound to this director's dest, active, timeout from the record",
     [BACKUP_DEFAULT], 1,
     [(TCP_, ip(CIP), 1000, ip(VIP), 80, ip(RIP), 8080, EST, MASQ, 0, 0)], [910.0],
     {"sync_installed": 1, "conns_created": 1}, {0: (1, 0)}, {}),
    ("the same conn again, CLOSE_WAIT: updated in place, its count moves to inactive",
     [BACKUP_DEFAULT, NAT_FIN], 2,
     [(TCP_, ip(CIP), 1000, ip(VIP), 80, ip(RIP), 8080, CLOSE_WAIT, MASQ, 0, 0)], [70.0],
     {"sync_installed": 1, "sync_updated": 1, "conns_created": 1}, {0: (0, 1)}, {}),
    ("UDP: state NORMAL is the engine's UDP state; no timeout in the record: the table's",
     [UDP_REC[:10] + (0,)], 1,
     [(UDP_, ip(CIP), 1000, ip(VIP), 53, ip(RIP), 5353, states.UDP_STATE, MASQ, 1, 1)],
     [10.0 + TO[states.UDP_STATE]], {"sync_installed": 1, "conns_created": 1}, {1: (0, 1)}, {}),
    ("DR and Tun conns; the record's method is not the dest's: the dest's wins (ip_vs_bind_dest)",
     [DR_EST, TUN_EST[:2] + (MASQ,) + TUN_EST[3:]], 2,
     [(TCP_, ip(CIP), 1000, ip(VIP), 82, ip(RIP2), 82, EST, ROUTE, 3, 3),
      (TCP_, ip(CIP), 1000, ip(VIP), 88, ip(RIP2), 88, EST, TUNNEL, 13, 11)], [910.0, 910.0],
     {"sync_installed": 2, "conns_created": 2}, {3: (1, 0), 13: (1, 0)}, {}),
    ("a template: its own timeout, counted in the dest's persistconns",
     [P_TPL_ASSURED], 1,
     [(TCP_, ip(CIP), 0, ip(VIP), 90, ip(RIP), 9090, tables.CTPL_ASSURED,
       MASQ | tables.CONN_F_TEMPLATE, PDEST, PSVC)], [610.0],
     {"sync_installed": 1, "conns_created": 1}, {}, {PDEST: 1}),
    ("a template without a timeout lives 3 minutes (ip_vs_proc_conn)",
     [P_TPL[:10] + (0,)], 1,
     [(TCP_, ip(CIP), 0, ip(VIP), 90, ip(RIP), 9090, 0, MASQ | tables.CONN_F_TEMPLATE,
       PDEST, PSVC)], [190.0], {"sync_installed": 1, "conns_created": 1}, {}, {PDEST: 1}),
    ("the conn went to another real server here: an active record replaces it",
     [BACKUP_DEFAULT, BACKUP_DEFAULT[:7] + (ip(RIP2), 8080) + BACKUP_DEFAULT[9:]], 2,
     [(TCP_, ip(CIP), 1000, ip(VIP), 80, ip(RIP2), 8080, EST, MASQ, DEST2, 0)], [910.0],
     {"sync_installed": 2, "conns_created": 2, "conns_expired": 1}, {0: (0, 0), DEST2: (1, 0)},
     {}),
    ("... an inactive one is the last word of the replaced conn: ignored (stale)",
     [BACKUP_DEFAULT, NAT_FIN[:7] + (ip(RIP2), 8081) + NAT_FIN[9:]], 1,
     [(TCP_, ip(CIP), 1000, ip(VIP), 80, ip(RIP), 8080, EST, MASQ, 0, 0)], [910.0],
     {"sync_installed": 1, "sync_stale": 1, "conns_created": 1}, {0: (1, 0)}, {}),
]

BAD = [
    ("ICMP", (1,) + BACKUP_DEFAULT[1:], "sync_rejected"),
    ("SCTP", (132,) + BACKUP_DEFAULT[1:], "sync_rejected"),
    ("protocol 0", (0,) + BACKUP_DEFAULT[1:], "sync_rejected"),
    ("forwarding method 4 (BYPASS)", BACKUP_DEFAULT[:2] + (4,) + BACKUP_DEFAULT[3:],
     "sync_rejected"),
    ("forwarding method 7", BACKUP_DEFAULT[:2] + (7,) + BACKUP_DEFAULT[3:], "sync_rejected"),
    ("TCP state 11", BACKUP_DEFAULT[:1] + (11,) + BACKUP_DEFAULT[2:], "sync_rejected"),
    ("TCP state 65535", BACKUP_DEFAULT[:1] + (65535,) + BACKUP_DEFAULT[2:], "sync_rejected"),
    ("UDP state 1", UDP_REC[:1] + (1,) + UDP_REC[2:], "sync_rejected"),
    ("template state 2", P_TPL[:1] + (2,) + P_TPL[2:], "sync_rejected"),
    ("template with a client port", P_TPL[:4] + (1000,) + P_TPL[5:], "sync_rejected"),
    ("a fwmark (no fwmark services)", BACKUP_DEFAULT[:9] + (7, 900), "sync_no_dest"),
    ("no such service", rec(TCP_, EST, MASQ, CIP, 1000, 9999, RIP, 8080, 900), "sync_no_dest"),
    ("no such virtual address", rec(TCP_, EST, MASQ, CIP, 1000, 80, RIP, 8080, 900,
                                    vaddr="10.9.9.9"), "sync_no_dest"),
    ("no such dest in the service", rec(TCP_, EST, MASQ, CIP, 1000, 80, "192.168.1.9", 8080,
                                        900),
     "sync_no_dest"),
    ("the dest's port differs", rec(TCP_, EST, MASQ, CIP, 1000, 80, RIP, 8081, 900),
     "sync_no_dest"),
]


def install_world(impl, recs, now=10.0, capacity=64):
    w = World(impl, capacity=capacity)
    n = w.install(recs, now) if len(recs) else 0
    check(w.engine)
    return w, n


@pytest.mark.parametrize("desc,recs,installed,conns,expires,counters,active,persist",
                         BACKUP, ids=[b[0][:60] for b in BACKUP])
def test_backup_install(desc, recs, installed, conns, expires, counters, active, persist):
    seen = {}
    for impl in IMPLS:
        w, n = install_world(impl, recs)
        got = [tuple_of(c) for c in w.engine.conns()]
        assert n == installed, impl
        assert [g[0] for g in got] == conns, impl
        assert [g[1] for g in got] == expires, impl
        assert sync_stats(w) == counters, impl
        for d, (a, i) in active.items():
            assert tuple(w.counters.dest_conns[d]) == (a, i), (impl, d)
        for d, p in persist.items():
            assert w.counters.dest_persist[d] == p, (impl, d)
        seen[impl] = (n, w.engine.conns(), w.stats(), w.counters.dest_conns.tolist())
    assert seen["c"] == seen["python"]


@pytest.mark.parametrize("desc,record,counter", BAD, ids=[b[0] for b in BAD])
def test_backup_bad_records(desc, record, counter):
    """A record that makes no sense, or names what this director has not,
    installs nothing and is counted."""
    for impl in IMPLS:
        w, n = install_world(impl, [record])
        assert n == 0 and w.engine.conns() == [] and w.engine.conn_count == 0, impl
        assert sync_stats(w) == {counter: 1}, impl
        assert not w.counters.dest_conns.any() and not w.counters.dest_persist.any()


def test_backup_port_zero_service_and_dest():
    """A port-0 service (ip_vs_service_find's catch-all) and a dest of port
    0 (ip_vs_find_dest's second lookup) take records of any port."""
    svcs = {14: (TCP_, "10.0.0.20", 0)}
    dests = {20: (14, RIP, 0, MASQ, DESTS[0][4])}
    seen = []
    for impl in IMPLS:
        w = Env(impl, services=svcs, dests=dests)
        r = rec(TCP_, EST, MASQ, CIP, 1000, 443, RIP, 443, 900, vaddr="10.0.0.20")
        assert w.engine.sync_install(records([r]), 0.0) == 1
        seen.append(w.engine.conns())
        assert seen[-1][0][:7] == (TCP_, ip(CIP), 1000, ip("10.0.0.20"), 443, ip(RIP), 443)
    assert seen[0] == seen[1]


def test_backup_table_full():
    """No room and no conn that may give way (only ESTABLISHED ones):
    counted, nothing replaced."""
    for impl in IMPLS:
        w, _ = install_world(impl, [BACKUP_DEFAULT], capacity=1)
        n = w.install([BACKUP_DEFAULT[:4] + (1001,) + BACKUP_DEFAULT[5:]], 10.0)
        assert n == 0 and w.engine.conn_count == 1
        assert sync_stats(w) == {"sync_installed": 1, "sync_table_full": 1, "conns_created": 1}


def test_backup_nat_out_key_held():
    """The real-server side of a NAT record is a live conn's already (its
    client came to another VIP port): refused, the holder kept."""
    svcs = {**SVCS, 14: (TCP_, VIP, 8000)}
    dests = {**DSTS, 16: (14, RIP, 8080, MASQ, DESTS[0][4])}
    for impl in IMPLS:
        w = Env(impl, services=svcs, dests=dests)
        a = rec(TCP_, EST, MASQ, CIP, 1000, 80, RIP, 8080, 900)
        b = rec(TCP_, EST, MASQ, CIP, 1000, 8000, RIP, 8080, 900)
        assert w.engine.sync_install(records([a, b]), 0.0) == 1
        assert [c[4] for c in w.engine.conns()] == [80]
        assert w.stats()["sync_rejected"] == 1


def test_backup_garbage_never_crashes():
    """Random records: no exception, no table damage, both engines alike,
    every record counted once."""
    rng = np.random.default_rng(9)
    raw = rng.integers(0, 256, size=400 * SYNC_DTYPE.itemsize, dtype=np.uint8)
    recs = raw.view(SYNC_DTYPE).copy()
    # Some near-sense: real protocols and services, random rest.
    recs["proto"][::2] = TCP_
    recs["vaddr"][::3] = ip(VIP)
    recs["vport"][::3] = 80
    recs["daddr"][::3] = ip(RIP)
    recs["dport"][::3] = 8080
    recs["fwmark"][::3] = 0
    recs["state"][::3] %= 12
    recs["flags"][::3] &= 0x1FFF & ~0x1004
    seen = []
    for impl in IMPLS:
        w = World(impl, capacity=32)
        n = w.engine.sync_install(recs, 5.0)
        check(w.engine)
        counted = sum(w.stats().get(k, 0) for k in (
            "sync_installed", "sync_updated", "sync_stale", "sync_rejected", "sync_no_dest",
            "sync_table_full"))
        assert counted == len(recs)
        assert n > 0
        seen.append((n, w.engine.conns(), w.stats(), w.counters.dest_conns.tolist()))
    assert seen[0] == seen[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_api_errors(impl):
    w = World(impl)
    with pytest.raises(TypeError):
        w.engine.sync_install(np.zeros(2, np.uint64), 0.0)
    with pytest.raises(TypeError):
        w.engine.sync_drain(np.zeros(4, tables.DEST_DTYPE))
    with pytest.raises(ValueError):
        w.engine.sync_install(np.zeros((2, 2), SYNC_DTYPE), 0.0)
    out = np.zeros(4, SYNC_DTYPE)
    out.flags.writeable = False
    with pytest.raises(ValueError):
        w.engine.sync_drain(out)
    with pytest.raises(ValueError):
        w.engine.sync_chunk(0, out)
    assert w.engine.sync_install(np.zeros(0, SYNC_DTYPE), 0.0) == 0


# --- master -> records -> backup: the flow goes on ---------------------------

def strip_outer_id(frame: bytes) -> bytes:
    """A tunnelled frame without the outer IP ID (each engine's own counter)
    and the header checksum that covers it."""
    p = Ether(frame[tables.VNET_HDR_LEN:])
    p[IP].id = 0
    p[IP].chksum = 0
    return bytes(p)


def forward(env, frame, port=0, now=0.0):
    verdict, out_port, out = env.send(frame, in_port=port, now=now)
    if verdict == tables.V_EMIT:
        return verdict, [(p, strip_outer_id(f)) for p, f in env.emitted]
    return verdict, out_port, out


# (description, the flow's frames on the master, the frames after failover:
#  (frame, in port)); each next frame must leave the backup as it leaves the
# master (the same verdict, port and bytes).
ROUND_TRIP = [
    ("NAT TCP: client and real server both ways",
     [(syn(), 0), (reply(flags="SA"), RS_PORT), (ack(), 0), (ack(), 0)],
     [(ack(payload=b"more"), 0), (reply(), RS_PORT), (fin(), 0), (reply(flags="FA"), RS_PORT)]),
    ("NAT UDP", [(dgram(), 0)] * 3,
     [(dgram(payload=b"next"), 0),
      (v(udp(src=RIP, dst=CIP, sport=5353, dport=1000, smac=RMAC, dmac=SMAC)), RS_PORT)]),
    ("DR TCP", [(syn(dport=82), 0), (ack(dport=82), 0), (ack(dport=82), 0)],
     [(ack(dport=82, payload=b"x"), 0), (fin(dport=82), 0)]),
    ("Tun TCP (IPIP)", [(syn(dport=88), 0), (ack(dport=88), 0), (ack(dport=88), 0)],
     [(ack(dport=88, payload=b"y"), 0), (fin(dport=88), 0)]),
    ("persistent NAT: conn and template",
     [(syn(dport=90), 0), (ack(dport=90), 0), (ack(dport=90), 0)],
     [(ack(dport=90, payload=b"z"), 0), (reply(sport=9090), RS_PORT)]),
]


@pytest.mark.parametrize("desc,before,after", ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
def test_round_trip(desc, before, after):
    """The master's records, through a numpy array, installed in a fresh
    backup: the established flow's next frames leave the backup exactly as
    they leave the master."""
    per_impl = []
    for impl in IMPLS:
        master = World(impl)
        master.engine.set_sync_master(True)
        for f, port in before:
            assert master.send(f, in_port=port, now=1.0)[0] in (tables.V_TX, tables.V_EMIT)
        recs = np.array(master.drain(), dtype=SYNC_DTYPE)
        assert len(recs) >= 1
        backup = World(impl, schedule=lambda s, c, p: -1)   # a new flow here would fail
        assert backup.engine.sync_install(recs, 2.0) == len(recs)
        outs = []
        for f, port in after:
            want = forward(master, f, port, now=3.0)
            got = forward(backup, f, port, now=3.0)
            assert got == want, (impl, f)
            assert got[0] in (tables.V_TX, tables.V_EMIT)
            outs.append(got)
        assert [c[:8] for c in backup.engine.conns()] == [c[:8] for c in master.engine.conns()]
        check(backup.engine)
        per_impl.append(outs)
    assert per_impl[0] == per_impl[1]


def test_round_trip_template_keeps_new_conns():
    """After a failover, the client's NEW conn to the persistent service
    goes to the template's dest with no scheduler call (the backup's
    scheduler would refuse it)."""
    for impl in IMPLS:
        master = World(impl)
        master.engine.set_sync_master(True)
        for f in (syn(dport=90), ack(dport=90), ack(dport=90)):
            master.send(f)
        backup = World(impl, schedule=lambda s, c, p: -1)
        backup.install(master.drain(), 1.0)
        verdict, port, out = backup.send(syn(dport=90, sport=3000), now=2.0)
        assert (verdict, port) == (tables.V_TX, RS_PORT)
        assert Ether(out[tables.VNET_HDR_LEN:])[IP].dst == RIP


def rs_icmp() -> bytes:
    """The real server's port unreachable about a client packet it got."""
    inner = IP(src=CIP, dst=RIP) / TCP(sport=1000, dport=8080, flags="A")
    return v(raw(Ether(src=RMAC, dst=SMAC) / IP(src=RIP, dst=CIP) / ICMP(type=3, code=3)
                 / raw(inner)[:28]))


def test_reply_before_client_frame():
    """A NAT conn installed by sync does not know its client's MAC and port
    until the client's next frame: a reply (or an ICMP error from the real
    server) that comes first is dropped and counted (the real server sends
    it again), the client's frame teaches them, and the next reply leaves as
    on the master."""
    for impl in IMPLS:
        master = World(impl)
        master.engine.set_sync_master(True)
        for f in (syn(), ack(), ack()):
            master.send(f)
        backup = World(impl)
        backup.install(master.drain(), 1.0)
        assert backup.send(reply(), in_port=RS_PORT, now=2.0)[0] == tables.V_DROP
        assert backup.send(rs_icmp(), in_port=RS_PORT, now=2.0)[0] == tables.V_DROP
        assert backup.stats()["drop_sync_no_mac"] == 2
        assert [c[7] for c in backup.engine.conns()] == [EST]   # untouched
        backup.send(ack(), now=2.0)
        master.send(ack(), now=2.0)
        for f in (reply(), rs_icmp()):
            got = backup.send(f, in_port=RS_PORT, now=2.5)
            assert got == master.send(f, in_port=RS_PORT, now=2.5) and got[0] == tables.V_TX


def test_bulk_chunks():
    """sync_chunk walks the whole table, templates included, in pieces; the
    same records the master would queue; installing them gives the backup
    the master's table."""
    flows = [syn(), ack(), dgram(), syn(dport=82), syn(dport=90), ack(dport=90),
             syn(sport=1001), syn(dport=88)]
    per_impl = []
    for impl in IMPLS:
        master = World(impl)
        for f in flows:
            master.send(f)
        whole = []
        start, calls = 0, 0
        while start != -1:
            out = np.zeros(3, SYNC_DTYPE)
            n, start = master.engine.sync_chunk(start, out)
            whole += out[:n].tolist()
            calls += 1
        assert len(whole) == master.engine.conn_count == 7   # 6 conns and a template
        assert calls == 3
        assert sum(1 for r in whole if r[2] & TEMPLATE) == 1
        backup = World(impl)
        assert backup.install(whole, 0.0) == 7
        assert sorted(c[:8] for c in backup.engine.conns()) == \
            sorted(c[:8] for c in master.engine.conns())
        out = np.zeros(100, SYNC_DTYPE)
        assert master.engine.sync_chunk(10**6, out) == (0, -1)
        per_impl.append(whole)
    assert per_impl[0] == per_impl[1]


def test_bulk_records_carry_the_time_a_conn_has_left():
    """With ``now`` a bulk answer gives each conn the whole seconds it has
    left (1 at least), a template its whole timeout: a conn whose end was
    lost is not kept alive by directors asking each other for the table."""
    per_impl = []
    for impl in IMPLS:
        master = World(impl)
        master.send(syn(), now=0.0)
        master.send(ack(), now=0.0)                # ESTABLISHED, 900 s from 0
        master.send(syn(dport=90), now=0.0)       # persistent: a template and a SYN_RECV conn
        master.send(ack(dport=90), now=0.0)
        master.send(syn(sport=1001), now=0.0)     # SYN_RECV, 60 s from 0
        out = np.zeros(16, SYNC_DTYPE)
        whole = out[:master.engine.sync_chunk(0, out)[0]].tolist()
        left = out[:master.engine.sync_chunk(0, out, 100.25)[0]].tolist()
        timeout = {(r[4], r[6], bool(r[2] & TEMPLATE)): r[10] for r in whole}
        got = {(r[4], r[6], bool(r[2] & TEMPLATE)): r[10] for r in left}
        assert timeout[(1000, 80, False)] == 900 and got[(1000, 80, False)] == 800
        assert got[(1000, 90, False)] == 800
        assert got[(1001, 80, False)] == 1         # expired meanwhile: 1, not 0
        assert got[(0, 90, True)] == timeout[(0, 90, True)]
        backup = World(impl)
        assert backup.install(left, 100.25) == len(left)
        backup.engine.expire(100.25 + 2, 1000)
        assert backup.engine.conn_count == 3       # the SYN_RECV conn's 1 s is over
        backup.engine.expire(100.25 + 801, 1000)
        assert backup.engine.conn_count == 0       # 800 s, not a fresh 900
        per_impl.append(left)
    assert per_impl[0] == per_impl[1]


def test_backup_two_workers_share_dest_counts():
    """Two backup workers (engines sharing dest_conns): each installs the
    records of its clients; the dest's counts are the sum."""
    for impl in IMPLS:
        cs = tables.CounterSum(16, 32, 2)
        ws = [World(impl, counters=cs.parts[i]) for i in range(2)]
        for i, w in enumerate(ws):
            w.install([BACKUP_DEFAULT[:4] + (3000 + i,) + BACKUP_DEFAULT[5:]], 0.0)
        assert tuple(cs.dest_conns[0]) == (2, 0)
        assert cs.stat("sync_installed") == 2


def test_c_drain_while_forwarding():
    """C: sync_drain and sync_install from another thread while frames run
    (the engine's lock); nothing lost, the table intact."""
    w = World("c", capacity=1024)
    w.engine.set_sync_master(True)
    got, stop = [], threading.Event()

    def drainer():
        while not stop.is_set():
            got.extend(w.drain())
    t = threading.Thread(target=drainer)
    t.start()
    try:
        for port in range(2000, 2200):
            w.send_many([(syn(sport=port), 0), (ack(sport=port), 0), (ack(sport=port), 0)])
    finally:
        stop.set()
        t.join()
    got += w.drain()
    assert len(got) == 200 and w.stats()["sync_queued"] == 200
    check(w.engine)


def test_sync_sysctl_defaults():
    """The kernel's defaults (ipvs-sysctl.rst): sync_threshold 3 50,
    sync_refresh_period 0, sync_retries 0, sync_persist_mode 0,
    sync_version 1; sync_qlen_max in records."""
    d = dict(zip(tables.SYSCTL_NAMES, tables.SYSCTL_DEFAULTS))
    assert (d["sync_threshold"], d["sync_period"], d["sync_refresh_period"], d["sync_retries"],
            d["sync_persist_mode"], d["sync_version"]) == (3, 50, 0, 0, 0, 1)
    assert d["sync_qlen_max"] == 65536


def test_balancer_sync_sysctls():
    """`pylvs sysctl` takes the sync knobs under their kernel names, in the
    kernel's ranges, and hands them to the engine."""
    from pylvs.control.balancer import Balancer, BalancerError

    got = []
    b = Balancer(tables.Counters(max_services=8, max_dests=16), publish=lambda s, d: None)
    b.publish_sysctls = got.append
    b.set_sysctls({"sync_threshold": 1, "sync_period": 10, "sync_retries": 3,
                   "sync_refresh_period": 30, "sync_persist_mode": 1, "sync_qlen_max": 100})
    arr = got[-1]
    for name, value in (("sync_threshold", 1), ("sync_period", 10), ("sync_retries", 3),
                        ("sync_refresh_period", 30), ("sync_persist_mode", 1),
                        ("sync_qlen_max", 100), ("sync_version", 1)):
        assert arr[tables.SYSCTL_INDEX[name]] == value, name
    for name, bad in (("sync_retries", 4), ("sync_persist_mode", 2), ("sync_version", 2),
                      ("sync_version", 0), ("sync_qlen_max", 0), ("sync_threshold", -1)):
        with pytest.raises(BalancerError):
            b.sysctl(name, bad)


@pytest.mark.parametrize("seed", range(6))
def test_master_random_against_reference(seed):
    """Random client and real-server frames of a few flows (every service
    kind), random times and sync knobs: the C engine queues, frame by frame,
    exactly the records the reference does."""
    rng = np.random.default_rng(seed)
    sysctls = {"sync_threshold": int(rng.integers(0, 4)),
               "sync_period": int(rng.choice([0, 3, 7, 50])),
               "sync_refresh_period": int(rng.choice([0, 2, 10, 100])),
               "sync_retries": int(rng.integers(0, 4)),
               "sync_persist_mode": int(rng.integers(0, 2)),
               "sync_qlen_max": int(rng.choice([4, 65536]))}
    frames, now = [], float(rng.uniform(-5, 5))
    for _ in range(400):
        now += float(rng.choice([0.0, 0.1, 1.0, 7.0, 40.0]))
        kind = int(rng.integers(0, 6))
        cport = 1000 + int(rng.integers(0, 3))
        flags = str(rng.choice(["S", "A", "A", "A", "FA", "R", "PA"]))
        if kind == 0:
            frames.append((v(udp(sport=cport)), 0, now))
        elif kind == 1:
            frames.append((v(tcp(src=RIP, dst=CIP, sport=8080, dport=cport, flags=flags,
                                 smac=RMAC, dmac=SMAC)), RS_PORT, now))
        else:
            dport = (80, 82, 88, 90)[kind - 2]
            frames.append((v(tcp(sport=cport, dport=dport, flags=flags)), 0, now))
    logs = []
    for impl in IMPLS:
        w = World(impl, **sysctls)
        w.engine.set_sync_master(True)
        log = []
        for i, (f, port, t) in enumerate(frames):
            r = w.send(f, in_port=port, now=t)
            log.append((r[0], w.drain(2) if i % 3 else []))   # a queue left to fill at times
        log.append((w.stats(), w.engine.conns()))
        logs.append(log)
    assert logs[0] == logs[1]
    assert logs[0][-1][0].get("sync_queued", 0) > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_scheduler_reentry(impl):
    """A scheduler calling back into its own engine: queue and table
    changes are refused (RuntimeError, reported as a scheduler error), a
    chunk of the table may be read (as conns_chunk)."""
    seen = []

    def schedule(svc, caddr, cport):
        out = np.zeros(4, SYNC_DTYPE)
        seen.append(w.engine.sync_chunk(0, out)[0])
        for call in (lambda: w.engine.sync_drain(out), lambda: w.engine.set_sync_master(False),
                     lambda: w.engine.sync_install(records([BACKUP_DEFAULT]), 0.0)):
            with pytest.raises(RuntimeError):
                call()
        return 0
    w = World(impl, schedule=schedule)
    assert w.send(syn())[0] == tables.V_TX
    assert seen == [0]


@pytest.mark.parametrize("change,ok", [
    ({"sync_threshold": 60}, False),                       # period 50: never announced again
    ({"sync_threshold": 50}, False),
    ({"sync_threshold": 49}, True),
    ({"sync_period": 3}, False),                           # threshold 3
    ({"sync_period": 0, "sync_threshold": 60}, True),      # period 0: only at packet 60
    ({"sync_threshold": 60, "sync_period": 100}, True),    # the pair in one command
])
def test_sync_threshold_must_stay_below_a_nonzero_period(change, ok):
    """The kernel's sync_threshold pair refuses threshold >= period when
    period is not 0 (proc_do_sync_threshold, EINVAL): `pylvs sysctl
    sync_threshold=60` under the default period 50 used to be taken, and
    no established conn was announced again. A refused command changes
    nothing."""
    from pylvs.control.balancer import Balancer, BalancerError

    got = []
    b = Balancer(tables.Counters(max_services=8, max_dests=16), publish=lambda s, d: None)
    b.publish_sysctls = got.append
    if ok:
        assert b.set_sysctls(change).items() >= change.items()
        return
    with pytest.raises(BalancerError, match="not below sync_period"):
        b.set_sysctls(change)
    with pytest.raises(BalancerError):
        b.sysctl(*next(iter(change.items())))
    assert (b.sysctls()["sync_threshold"], b.sysctls()["sync_period"]) == (3, 50)
    assert got == []


# --- a synced conn's client side from its route (docs/engine.md, "Sync") ------
#
# The kernel's backup routes a synced NAT conn's reply to its client with
# its FIB and neighbour table (ip_vs_nat_xmit's route, then the neighbour
# output), client frame or not. Here control gives the engine the route's
# next-hop MAC (ROUTE_F_MAC: a gateway's neighbour entry, or a /32 row for
# an on-link host the kernel knows): the reply binds the conn's client side
# as a client frame would and leaves as on the master. Without that MAC:
# drop_sync_no_mac, as before.

GW_ROUTES = [("192.168.1.0", 24, RS_PORT, None), ("0.0.0.0", 0, 0, "02:00:00:00:00:02")]
ON_LINK = [("192.168.1.0", 24, RS_PORT, None), ("10.0.0.2", 32, 0, "02:00:00:00:00:02"),
           ("10.0.0.0", 24, 0, None)]
NO_MAC = [("192.168.1.0", 24, RS_PORT, None), ("0.0.0.0", 0, 0, None)]
ODD_PORT = [("0.0.0.0", 0, 7, "02:00:00:00:00:02")]   # a port with no row

# (description, routes (prefix, plen, port, next hop MAC) or None (never
#  set), frames from the real server before any client frame, forwarded as
#  on the master?, counters)
ROUTED = [
    ("gateway route with its MAC: the reply leaves for the gateway", GW_ROUTES,
     [reply()], True, {"sync_l2_routed": 1}),
    ("gateway route with its MAC: the real server's ICMP error too", GW_ROUTES,
     [rs_icmp(), reply()], True, {"sync_l2_routed": 1}),
    ("on-link client with a neighbour entry (/32 row)", ON_LINK,
     [reply(), reply(flags="PA")], True, {"sync_l2_routed": 1}),
    ("gateway not resolved (no MAC): counted drop", NO_MAC,
     [reply(), rs_icmp()], False, {"drop_sync_no_mac": 2}),
    ("no routes set: counted drop", None, [reply()], False, {"drop_sync_no_mac": 1}),
    ("route through a port without a row: counted drop", ODD_PORT,
     [reply()], False, {"drop_sync_no_mac": 1}),
]


def set_net(env, routes) -> None:
    """Ports 0 (client side, LMAC) and 1 (real servers, SMAC), and routes."""
    p = tables.empty_ports(2)
    for port, m in ((0, "02:00:00:00:00:01"), (RS_PORT, SMAC)):
        p[port]["mtu"], p[port]["flags"] = 1500, tables.PORT_F_USED | tables.PORT_F_CHECK_MAC
        p[port]["mac"] = np.frombuffer(bytes.fromhex(m.replace(":", "")), np.uint8)
    env.engine.set_ports(p)
    if routes is None:
        return
    r = tables.empty_routes(len(routes))
    for i, (prefix, plen, port, nh) in enumerate(routes):
        r["prefix"][i], r["plen"][i], r["port"][i] = ip(prefix), plen, port
        if nh is not None:
            r["mac"][i] = np.frombuffer(bytes.fromhex(nh.replace(":", "")), np.uint8)
            r["flags"][i] = tables.ROUTE_F_MAC
    env.engine.set_routes(r, np.array([ip(VIP)], np.uint32))


@pytest.mark.parametrize("desc,routes,frames,forwarded,counters", ROUTED,
                         ids=[r[0] for r in ROUTED])
def test_reply_routed_before_client_frame(desc, routes, frames, forwarded, counters):
    """A synced NAT conn's real server speaks first (a download after a
    failover: the client only ACKs what it gets): with a next-hop MAC for
    the client's route the frames leave the backup byte for byte as they
    leave the master, which learnt the client from its frames; without one
    they are dropped and counted, the conn untouched."""
    per_impl = []
    for impl in IMPLS:
        master, backup = World(impl), World(impl, schedule=lambda s, c, p: -1)
        for env in (master, backup):
            set_net(env, routes)
        master.engine.set_sync_master(True)
        for f in (syn(), reply(flags="SA"), ack(), ack()):
            master.send(f, in_port=RS_PORT if f == reply(flags="SA") else 0, now=1.0)
        assert backup.install(master.drain(), 1.5) >= 1
        before = backup.stats()
        outs = []
        for f in frames:
            got = backup.send(f, in_port=RS_PORT, now=2.0)
            want = master.send(f, in_port=RS_PORT, now=2.0)
            if forwarded:
                assert got == want and got[0] == tables.V_TX and got[1] == 0, (impl, desc)
            else:
                assert got[0] == tables.V_DROP, (impl, desc)
            outs.append(got)
        after = backup.stats()
        changed = {k: after[k] - before.get(k, 0) for k in after
                   if k.startswith(("sync_", "drop_sync")) and after[k] != before.get(k, 0)}
        assert changed == counters, (impl, desc)
        state = [c[7] for c in backup.engine.conns()]
        assert state == [c[7] for c in master.engine.conns()] if forwarded else state == [EST]
        # The client's next frame changes nothing the route taught (the
        # same MAC and port as the master learnt).
        if forwarded:
            assert backup.send(ack(payload=b"n"), now=2.5) == master.send(ack(payload=b"n"),
                                                                        now=2.5)
        check(backup.engine)
        per_impl.append(outs)
    assert per_impl[0] == per_impl[1]


def test_backup_state_follows_master_through_the_wire():
    """A NAT download's whole life on a master, its records through the v1
    wire (pylvs.sync.wire) to a backup after every frame: the backup's conn
    always has the state the master last sent, and its expiry that state's
    timeout from the install; at the end both hold TIME_WAIT with the same
    expiry. (A report had ESTABLISHED conns of the master listed as
    TIME_WAIT on the backup: the directors' roles had swapped at the
    takeover, and a backup trails its master by the sync flush time,
    docs/failover.md "Reading both directors' tables"; never the other
    way.)"""
    from pylvs.sync import wire

    life = ([(syn(), 0), (reply(flags="SA"), RS_PORT), (ack(), 0)]
            + [(ack(), 0), (reply(), RS_PORT)] * 60
            + [(reply(flags="FA"), RS_PORT), (ack(), 0), (fin(), 0), (reply(), RS_PORT)])
    for impl in IMPLS:
        master, backup = World(impl), World(impl)
        master.engine.set_sync_master(True)
        sent, t = None, 1.0
        for f, port in life:
            assert master.send(f, in_port=port, now=t)[0] == tables.V_TX
            recs = np.array(master.drain(), dtype=SYNC_DTYPE)
            if len(recs):
                got = np.concatenate([wire.decode(m, 7) for m in wire.encode(recs, 7)])
                assert got.tolist() == recs.tolist()
                assert backup.engine.sync_install(got, t) == len(got)
                sent = int(recs[-1]["state"])
            if sent is not None:
                (c,) = backup.engine.conns()
                assert c[7] == sent, (impl, t)
                if len(recs):
                    assert c[8] == pytest.approx(t + TO[sent]), (impl, t)
            t += 0.01
        (m,), (b,) = master.engine.conns(), backup.engine.conns()
        assert m[7] == b[7] == states.TIME_WAIT, impl
        # The real server's last ACK (no record: not a client frame)
        # restarted the master's timer one step after the backup's.
        assert b[8] == pytest.approx(m[8] - 0.01), impl


def test_tun_relayed_error_routed_before_client_frame():
    """A router's host unreachable about a synced Tun conn's tunnel packet,
    before any frame of its client reached the backup: relayed to the
    client by its route's next-hop MAC (an on-link client the kernel
    knows: a /32 row), as the master relays it to the client it heard."""
    from test_engine_answers import ports, routes
    from test_forward_tun import from_router, outer_sent, tun_in

    base, local = routes()
    r = tables.empty_routes(len(base) + 1)
    r[1:] = base
    r["prefix"][0], r["plen"][0], r["port"][0] = ip(CIP), 32, 0
    r["mac"][0] = np.frombuffer(bytes.fromhex("020000000002"), np.uint8)
    r["flags"][0] = tables.ROUTE_F_MAC
    per_impl = []
    for impl in IMPLS:
        master, backup = World(impl), World(impl, schedule=lambda s, c, p: -1)
        for env in (master, backup):
            env.engine.set_ports(ports())
            env.engine.set_routes(r, local)
        master.engine.set_sync_master(True)
        for f in (tun_in(ip_flags="DF"), tun_in(flags="A", ip_flags="DF"),
                  tun_in(flags="A", ip_flags="DF")):
            assert master.send(v(f), now=1.0)[0] == tables.V_EMIT
        assert backup.install(master.drain(), 1.5) == 1
        err = from_router(outer_sent(), code=1, mtu=0)
        # The ICMP error's IP ID aside: the master's counter also numbered
        # the tunnel packets it sent.
        got = (backup.send(err, in_port=RS_PORT, now=2.0),
               [(p, strip_outer_id(f)) for p, f in backup.emitted])
        want = (master.send(err, in_port=RS_PORT, now=2.0),
                [(p, strip_outer_id(f)) for p, f in master.emitted])
        assert got == want and got[0][0] == tables.V_PASS, impl
        assert [p for p, _ in got[1]] == [0], impl
        assert backup.stats()["sync_l2_routed"] == 1, impl
        per_impl.append(got)
    assert per_impl[0] == per_impl[1]


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_host_rows_find_their_client(order):
    """Many on-link host rows (control sorts them ascending; the C engine
    then bisects them instead of walking them) and a connected route: each
    synced client's reply leaves with its own host row's MAC, a client with
    no row is a counted drop; the same in a shuffled order (walked)."""
    rng = np.random.default_rng(5)
    hosts = sorted(int(a) for a in rng.choice(np.arange(ip("10.0.0.10"), ip("10.0.0.250")),
                                               40, replace=False))
    rows = [(h, 32, 0, bytes([2, 0, 0, 0, 1, h & 0xFF])) for h in hosts]
    if order == "shuffled":
        rng.shuffle(rows)
    rows += [(ip("192.168.1.0"), 24, RS_PORT, None), (ip("10.0.0.0"), 24, 0, None)]
    r = tables.empty_routes(len(rows))
    for i, (prefix, plen, port, m) in enumerate(rows):
        r["prefix"][i], r["plen"][i], r["port"][i] = prefix, plen, port
        if m is not None:
            r["mac"][i], r["flags"][i] = np.frombuffer(m, np.uint8), tables.ROUTE_F_MAC
    clients = hosts[::4] + [ip("10.0.0.5"), ip("10.0.0.251")]   # the last two: no row
    recs = [(TCP_, EST, MASQ, c, 1000, ip(VIP), 80, ip(RIP), 8080, 0, TO[EST]) for c in clients]
    per_impl = []
    for impl in IMPLS:
        w = World(impl)
        set_net(w, None)
        w.engine.set_routes(r, np.array([ip(VIP)], np.uint32))
        assert w.engine.sync_install(records(recs), 1.0) == len(recs)
        got = []
        for c in clients:
            ca = ".".join(str(c >> s & 0xFF) for s in (24, 16, 8, 0))
            verdict, port, out = w.send(v(tcp(src=RIP, dst=ca, sport=8080, dport=1000, flags="A",
                                              smac=RMAC, dmac=SMAC)), in_port=RS_PORT, now=2.0)
            dst = bytes(out[tables.VNET_HDR_LEN:tables.VNET_HDR_LEN + 6]) if verdict == tables.V_TX \
                else None
            got.append((verdict, dst))
        want = [(tables.V_TX, bytes([2, 0, 0, 0, 1, c & 0xFF])) for c in hosts[::4]]
        assert got == want + [(tables.V_DROP, None)] * 2, impl
        assert w.stats()["drop_sync_no_mac"] == 2 and w.stats()["sync_l2_routed"] == len(want)
        per_impl.append(got)
    assert per_impl[0] == per_impl[1]
