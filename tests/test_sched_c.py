"""Schedulers run by the engine (pylvs/_fast/ip_vs_sched.c) against the
Python schedulers (pylvs/sched, the reference), and the overload flag the
engines keep as the kernel's ip_vs_bind_dest / ip_vs_unbind_dest.

A scripted sequence of new conns, established and closed ones, weight,
threshold and dest-list changes runs through a Balancer and its engines
four ways: the C engine scheduling itself and forced to the upcall
(Balancer.c_sched False), the reference engine both ways; with one worker
and with two (two engines on one CounterSum, new conns alternating between
them, as two workers share counts, flags and the rr/wrr state). Every way
must pick the same real server for every SYN and leave the same counts and
flags after every step.
"""

from __future__ import annotations

import ipaddress
import random

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from pylvs import sched as schedmod
from pylvs.control.balancer import Balancer
from pylvs.engine import new_engine, states, tables

VIP, CIP = "10.0.0.1", "10.0.0.2"
LMAC, CMAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
RIPS = [f"192.168.1.{i}" for i in range(2, 10)]
KINDS = sorted(set(tables.SCHED_KINDS) - set(tables.SCHED_TABLE_SIZES))
HASHED = sorted(tables.SCHED_TABLE_SIZES)
ETH = tables.VNET_HDR_LEN
# Conns end by RST (CLOSE, 1 s) and the clock hand; nothing else expires
# while a script runs.
TIMEOUTS = np.full(states.N_TIMEOUTS, 1e6)
TIMEOUTS[states.STATE_NAMES.index("CLOSE")] = 1.0


def ip(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def seg(cport: int, flags: str, caddr: str = CIP) -> bytes:
    f = (Ether(src=CMAC, dst=LMAC) / IP(src=caddr, dst=VIP)
         / TCP(sport=cport, dport=80, flags=flags))
    return tables.with_vnet(raw(f))


class Resolver:
    def resolve(self, daddr):
        return (1, b"\x02\0\0\0\x01\x02", b"\x02\0\0\0\x01\x01")

    def connected(self, daddr):
        return True


class World:
    """A Balancer with one service and ``workers`` engines of one impl."""

    def __init__(self, impl: str, workers: int, c_sched: bool, sched: str, flags=(),
                 persistent: int = 0):
        self.counters = tables.CounterSum(8, 32, workers)
        self.b = Balancer(self.counters, resolver=Resolver(), publish=self._publish)
        self.upcalls = 0
        self.engines = [new_engine(impl, 4096, counters=part, schedule=self._upcall,
                                   timeouts=TIMEOUTS, key=bytes(range(16)))
                        for part in self.counters.parts]
        self.published: tuple = ()
        self.b.publish_sched = self._publish_sched
        self.b.c_sched = c_sched
        self.b.add_service("tcp", VIP, 80, sched=sched, flags=",".join(flags),
                           persistent=persistent)
        self.batch = tables.Batch(size=4, slot=256)
        self.now = 0.0
        self.next_port = 1000
        # conn id (client port) -> (engine index, client address)
        self.conns: dict[int, tuple[int, str]] = {}

    def _upcall(self, svc: int, caddr: int, cport: int) -> int:
        self.upcalls += 1
        return self.b.schedule(svc, caddr, cport)

    def _publish_sched(self, *t):
        self.published = t
        for e in self.engines:
            e.set_sched(*t)

    def _publish(self, svcs, dests):
        for e in self.engines:
            e.set_tables(svcs, dests)

    def send(self, cport: int, flags: str) -> str | None:
        """One segment through the conn's engine: the RIP it went to, or None."""
        b = self.batch
        b.clear()
        worker, caddr = self.conns[cport]
        b.append(seg(cport, flags, caddr))
        self.engines[worker].process(b, self.now)
        if b.verdict[0] != tables.V_TX:
            return None
        return str(ipaddress.IPv4Address(bytes(b.buf[0, ETH + 30:ETH + 34])))

    # --- script steps ------------------------------------------------------

    def syn(self, n: int, clients: list[str] | None = None) -> list:
        """n new conns, from CIP or from ``clients`` in turn (a worker per
        client address, as steering hands them)."""
        out = []
        for k in range(n):
            cport, self.next_port = self.next_port, self.next_port + 1
            caddr = clients[k % len(clients)] if clients else CIP
            self.conns[cport] = (ip(caddr) if clients else cport) % len(self.engines), caddr
            out.append(self.send(cport, "S"))
        return out

    def ack(self, *ids: int) -> list:
        """Established: the nth conns made (those the engine kept)."""
        return [self.send(1000 + i, "A") for i in ids]

    def rst(self, *ids: int) -> list:
        """Closed and, a clock tick later, gone (a RST in SYN_RECV leaves
        the state as it is, in the kernel's table: an ACK first)."""
        out = [self.send(1000 + i, "A") and self.send(1000 + i, "R") for i in ids]
        self.now += 2.0
        for e in self.engines:
            e.expire(self.now, 1 << 20)
        return out

    def dest(self, i: int, **kw) -> None:
        self.b.edit_dest("tcp", VIP, 80, RIPS[i], 80, **kw)

    def add(self, i: int, weight: int = 1, **kw) -> None:
        self.b.add_dest("tcp", VIP, 80, RIPS[i], 80, fwd="masq", weight=weight, **kw)

    def delete(self, i: int) -> None:
        self.b.del_dest("tcp", VIP, 80, RIPS[i], 80)

    def state(self) -> dict:
        """Per RIP listed: active, inactive, overload flag."""
        out = {}
        for svc in self.b.snapshot()["services"]:
            for d in svc["dests"]:
                out[ipaddress.IPv4Address(d["daddr"]).exploded if isinstance(d["daddr"], int)
                    else d["daddr"]] = (d["activeconns"], d["inactconns"],
                                        int(self.counters.dest_flags[d["slot"]]))
        return out


# Each step: (method, args, kwargs). Weights, thresholds and the list change
# between bursts of new conns; some conns become established (active count,
# 256 inactive ones' worth for lc/wlc), some close and leave.
SCRIPT = [
    ("add", (0,), {"weight": 3}), ("add", (1,), {"weight": 2}), ("add", (2,), {"weight": 1}),
    ("syn", (12,), {}),
    ("ack", (0, 1, 2, 5, 8), {}),
    ("syn", (7,), {}),
    ("dest", (1,), {"weight": 0}),
    ("syn", (5,), {}),
    ("rst", (3, 4, 6, 7, 9), {}),
    ("add", (3,), {"weight": 4}),
    ("syn", (9,), {}),
    ("dest", (1,), {"weight": 5}),
    ("ack", (12, 13, 14, 20, 21), {}),
    ("syn", (8,), {}),
    ("delete", (0,), {}),
    ("syn", (6,), {}),
    ("add", (4,), {"weight": 2}), ("add", (0,), {"weight": 6}),
    ("syn", (10,), {}),
    ("rst", tuple(range(10, 30)), {}),
    ("syn", (10,), {}),
]

# -x/-y on top: dests fill up, get flagged, drain and come back.
THRESHOLD_SCRIPT = [
    ("add", (0,), {"weight": 5, "u_threshold": 4, "l_threshold": 2}),
    ("add", (1,), {"weight": 2, "u_threshold": 6}),
    ("add", (2,), {"weight": 1}),
    ("syn", (14,), {}),
    ("ack", (0, 1, 2), {}),
    ("syn", (6,), {}),
    ("rst", (0, 1, 3, 4, 5), {}),
    ("syn", (6,), {}),
    ("dest", (0,), {"u_threshold": 20, "l_threshold": 2}),
    ("syn", (6,), {}),
    ("rst", tuple(range(6, 26)), {}),
    ("syn", (12,), {}),
]


def run(script, impl: str, workers: int, c_sched: bool, sched: str) -> list:
    w = World(impl, workers, c_sched, sched)
    trace = []
    for name, args, kw in script:
        picked = getattr(w, name)(*args, **kw)
        trace.append((name, args, picked if name == "syn" else None, w.state()))
    return trace


WAYS = [("c", 1, True), ("c", 2, True), ("python", 1, True), ("python", 2, True),
        ("python", 1, False)]


@pytest.mark.parametrize("sched", KINDS)
def test_c_schedulers_pick_as_the_python_ones(sched):
    """Row by row: the C engine scheduling itself, with one and two
    workers, and the reference engine both ways, against the C engine
    asking the Python scheduler for every conn."""
    want = run(SCRIPT, "c", 1, False, sched)
    # The script makes picks (ovf runs out of dests in places: half-open
    # conns count active, as the kernel's tcp_state_active_table).
    assert any(p for _, _, p, _ in want if p) and any(d is not None for d in want[3][2])
    for impl, workers, c_sched in WAYS:
        got = run(SCRIPT, impl, workers, c_sched, sched)
        for i, (g, e) in enumerate(zip(got, want)):
            assert g == e, f"{impl} x{workers} c_sched={c_sched}: step {i} {e[0]}{e[1]}"


@pytest.mark.parametrize("sched", KINDS)
def test_thresholds_hold_off_dests_the_same_way(sched):
    want = run(THRESHOLD_SCRIPT, "c", 1, False, sched)
    assert any(flag for *_, st in want for (_, _, flag) in st.values())
    for impl, workers, c_sched in WAYS:
        assert run(THRESHOLD_SCRIPT, impl, workers, c_sched, sched) == want, (impl, workers)


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("workers", [1, 2])
def test_wrr_published_example_through_the_engine(impl, workers):
    """Weights 4, 3, 2 listed in that order interleave as A A B A B C A B C
    (ip_vs_wrr.c's comment)."""
    w = World(impl, workers, True, "wrr")
    w.add(0, weight=4)
    w.add(1, weight=3)
    if [v.weight for v in w.b._sched_view[0][1]] == [3, 4]:   # newest first
        w.delete(1)
        w.delete(0)
        order = ((2, 2), (1, 3), (0, 4))
    else:
        order = ((2, 2),)
    for i, weight in order:
        w.add(i, weight=weight)
    assert [v.weight for v in w.b._sched_view[0][1]] == [4, 3, 2]
    a, b, c = RIPS[0], RIPS[1], RIPS[2]
    # Added one by one, the dests left cw at 1 (dest_changed keeps a cw
    # that fits): one pass at weight >= 1 first, then the cycles from mw.
    assert w.syn(21) == [a, b, c] + [a, a, b, a, b, c, a, b, c] * 2


# --- the overload flag (ip_vs_bind_dest / ip_vs_unbind_dest) ---------------

# (description, -x, -y, steps, flag after each step): "+n" n new conns,
# "-n" n conns closed and gone, "a" the oldest open conn established.
OVERLOAD = [
    ("set at -x, cleared below -y", 4, 2,
     ["+3", "+1", "-1", "-1", "-1", "+1"], [0, 1, 1, 1, 0, 0]),
    ("no -y: cleared below 3/4 of -x", 4, 0,
     ["+4", "-1", "-1", "+2"], [1, 1, 0, 1]),
    ("established conns count too", 3, 1,
     ["+2", "a", "+1", "-2", "-1"], [0, 0, 1, 1, 0]),
    ("no -x: never set", 0, 0, ["+6", "-6"], [0, 0]),
    ("-y equal to -x: refused conns leave it set", 2, 2,
     ["+2", "-1", "+1", "+1", "-1"], [1, 0, 1, 1, 0]),
]


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("desc,u,l,steps,flags", OVERLOAD, ids=[r[0] for r in OVERLOAD])
def test_overload_flag_follows_the_kernel(impl, workers, desc, u, l, steps, flags):
    w = World(impl, workers, True, "wlc")
    w.add(0, weight=1, u_threshold=u, l_threshold=l)
    slot = w.b.snapshot()["services"][0]["dests"][0]["slot"]
    open_ids: list[int] = []
    made = 0
    got = []
    for step in steps:
        if step == "a":
            w.ack(open_ids[0])
        elif step[0] == "+":
            n = int(step[1:])
            # An overloaded dest takes no new conn: count those it took.
            picked = w.syn(n)
            open_ids += [made + i for i, p in enumerate(picked) if p]
            made += n
        else:
            n = int(step[1:])
            gone, open_ids = open_ids[:n], open_ids[n:]
            w.rst(*gone)
        got.append(int(w.counters.dest_flags[slot]))
    assert got == flags, desc


@pytest.mark.parametrize("impl", ["c", "python"])
def test_an_overloaded_dest_gets_no_new_conn(impl):
    w = World(impl, 1, True, "rr")
    w.add(0, weight=1, u_threshold=2, l_threshold=1)
    w.add(1, weight=1)
    x, y = RIPS[0], RIPS[1]
    p, q = (str(ipaddress.IPv4Address(v.daddr)) for v in w.b._sched_view[0][1])
    picked = w.syn(4)
    assert picked == [p, q, p, q]                    # x reached -x 2 with its second
    assert w.syn(2) == [y, y]
    w.rst(*[i for i, a in enumerate(picked) if a == x])   # 0 < -y 1: back
    assert w.syn(2) == [x, y]


# --- the switch and the tables ---------------------------------------------

@pytest.mark.parametrize("impl", ["c", "python"])
def test_c_sched_switch_decides_who_schedules(impl):
    """c_sched on: no upcall for a kind the engine runs; off (pylvs run
    --sched-impl python): one per new conn; on again: none, and the rr turn
    goes on where the engine left it."""
    w = World(impl, 1, True, "rr")
    for i in range(3):
        w.add(i)
    first = w.syn(4)
    assert w.upcalls == 0 and len(set(first)) == 3
    w.b.c_sched = False
    w.syn(3)
    assert w.upcalls == 3
    w.b.c_sched = True
    assert w.syn(2) == first[1:3] and w.upcalls == 3


def test_set_sched_refuses_tables_that_do_not_fit():
    for impl in ("c", "python"):
        counters = tables.Counters(4, 8)
        e = new_engine(impl, 16, counters=counters, schedule=lambda *a: -1)
        svcs, dests, thresh, tab = tables.empty_sched(4, 8)
        e.set_sched(svcs, dests, thresh, tab)
        bad = svcs.copy()
        bad[1] = (tables.SCHED_KINDS["rr"], 0, 0, 0, 3, 0)
        with pytest.raises(ValueError):
            e.set_sched(bad, dests, thresh, tab)   # a run beyond the dests given
        bad[1] = (99, 0, 0, 0, 0, 0)
        with pytest.raises(ValueError):
            e.set_sched(bad, dests, thresh, tab)   # no such kind
        bad[1] = (tables.SCHED_KINDS["mh"], 0, 0, 0, 0, 0)
        with pytest.raises(ValueError):            # 4093 entries, 256 given
            e.set_sched(bad, dests, thresh, np.full(256, -1, dtype=np.int32))
        bad[1] = (tables.SCHED_KINDS["sh"], 0, 0, 0, 0, 0)
        e.set_sched(bad, dests, thresh, np.full(256, -1, dtype=np.int32))
        far = np.array([(8, 1)], dtype=tables.SCHED_DEST_DTYPE)
        with pytest.raises(ValueError):
            e.set_sched(svcs, far, thresh, tab)    # a slot the counters do not have
        with pytest.raises(ValueError):
            e.set_sched(*tables.empty_sched(5, 8))  # more services than counters
        with pytest.raises(TypeError):
            e.set_sched(svcs, dests, np.zeros(8, dtype=np.uint64), tab)


def test_every_c_kind_is_a_python_scheduler():
    assert set(tables.SCHED_KINDS) <= set(schedmod.names())


@pytest.mark.parametrize("sched", ["rr", "wrr"])
@pytest.mark.parametrize("impl", ["c", "python"])
def test_a_restored_batch_starts_where_python_does(sched, impl):
    """ipvsadm -R: dests a batch adds reach the scheduler as the kernel's
    one add_dest at a time (Scheduler.stepwise); the engine's rr/wrr state
    takes the same steps."""
    def picks(c_sched: bool) -> list:
        w = World(impl, 2, c_sched, sched)
        w.b.apply_many([{"op": "add_dest", "proto": "tcp", "vaddr": VIP, "vport": 80,
                         "daddr": RIPS[i], "dport": 80, "fwd": "masq", "weight": weight}
                        for i, weight in enumerate((4, 6, 2, 6))])
        return w.syn(24)
    assert picks(True) == picks(False)


# --- sh, dh, mh: the engine hashes, control builds the table ----------------

HASH_FLAGS = [(), ("fallback",), ("port",), ("fallback", "port")]


HASH_CASES = [(s, f) for s in HASHED for f in HASH_FLAGS if s != "dh" or not f]  # dh: no -b


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("sched,flags", HASH_CASES,
                         ids=[f"{s}-{'-'.join(f) or 'none'}" for s, f in HASH_CASES])
def test_hash_lookups_equal_the_python_choice_on_random_clients(sched, flags, impl):
    """Random clients (seeded) against dests of weights 3, 1, 0, 2, 1, the
    fourth overloaded: the engine's bucket, fallback walk and availability
    give the Python scheduler's pick for every one; then a weight change."""
    rnd = random.Random(f"{sched}{flags}")
    clients = [str(ipaddress.IPv4Address(rnd.getrandbits(32) & 0x0AFFFFFF | 0x0A000000))
               for _ in range(60)]

    def picks(c_sched: bool) -> list:
        w = World(impl, 2, c_sched, sched, flags=[f"{sched}-{f}" for f in flags])
        for i, weight in enumerate((3, 1, 0, 2, 1)):
            w.add(i, weight=weight, u_threshold=1000)
        # As the engines set it once 1000 conns are bound.
        slot = {d["daddr"]: d["slot"] for d in w.b.snapshot()["services"][0]["dests"]}
        w.counters.dest_flags[slot[RIPS[3]]] = tables.DEST_F_OVERLOAD
        out = w.syn(120, clients)
        w.dest(1, weight=0)
        w.dest(2, weight=4)
        return out + w.syn(120, clients)
    want = picks(False)
    assert len(set(want) - {None}) >= (1 if sched == "dh" else 2)
    assert picks(True) == want


@pytest.mark.parametrize("impl", ["c", "python"])
def test_sh_fallback_flag_edited_alone_reaches_the_engine(impl):
    """-E -b sh-fallback keeps the scheduler (its table) and the engine
    starts walking for a client whose bucket's dest is quiesced."""
    w = World(impl, 1, True, "sh")
    w.add(0, weight=1)
    w.add(1, weight=1)
    quiesced = RIPS[0]
    w.dest(0, weight=0)
    clients = [f"10.9.0.{i}" for i in range(1, 40)]
    before = w.syn(len(clients), clients)
    assert None in before and quiesced not in before
    w.b.edit_service("tcp", VIP, 80, flags="sh-fallback")
    assert w.syn(len(clients), clients) == [RIPS[1]] * len(clients)


@pytest.mark.parametrize("impl", ["c", "python"])
def test_the_upcall_limit_spares_services_the_engine_schedules(impl):
    """Under receive pressure with upcall_share spent, a SYN that would call
    Python is dropped (drop_upcall_limit); one the engine schedules itself
    costs no upcall and is never limited."""
    def dropped(c_sched: bool) -> int:
        w = World(impl, 1, c_sched, "wlc")
        w.add(0)
        e = w.engines[0]
        values = tables.default_sysctls()
        values[tables.SYSCTL_INDEX["upcall_share"]] = 1
        values[tables.SYSCTL_INDEX["pressure_conn_rate"]] = 0   # off: the upcall limit alone
        e.set_sysctls(values)
        e.pressure, e.upcall_cost = True, 1.0   # one upcall spends the bucket
        w.syn(20)
        return w.counters.stat("drop_upcall_limit")
    assert dropped(True) == 0
    assert dropped(False) == 19


@pytest.mark.parametrize("impl", ["c", "python"])
def test_the_upcall_limit_spares_a_persistent_clients_template(impl):
    """A client whose persistence template names its dest needs no
    scheduler, so the upcall limit never turns it away; a new client of the
    same (Python-scheduled) service is metered."""
    w = World(impl, 1, False, "wlc", persistent=300)
    w.add(0)
    w.add(1)
    first = w.syn(1, ["10.7.0.1"])     # its template, made without pressure
    e = w.engines[0]
    values = tables.default_sysctls()
    values[tables.SYSCTL_INDEX["upcall_share"]] = 1
    values[tables.SYSCTL_INDEX["pressure_conn_rate"]] = 0   # off: the upcall limit alone
    e.set_sysctls(values)
    e.pressure, e.upcall_cost = True, 1.0   # one upcall spends the bucket
    assert w.syn(5, ["10.7.0.1"]) == first * 5
    assert w.counters.stat("drop_upcall_limit") == 0
    fresh = w.syn(3, ["10.7.0.2", "10.7.0.3", "10.7.0.4"])
    assert fresh[0] is not None and fresh[1:] == [None, None]
    assert w.counters.stat("drop_upcall_limit") == 2


def test_a_deleted_service_leaves_no_scheduler_and_no_thresholds():
    w = World("c", 1, True, "rr")
    w.add(0, u_threshold=5, l_threshold=2)
    d = w.b.snapshot()["services"][0]["dests"][0]["slot"]
    svcs, _, thresh, _ = w.published
    assert svcs[0]["kind"] == tables.SCHED_KINDS["rr"] and tuple(thresh[d]) == (5, 2)
    w.b.del_service("tcp", VIP, 80)
    svcs, _, thresh, _ = w.published
    assert svcs[0]["kind"] == 0 and tuple(thresh[d]) == (0, 0)
    assert w.syn(1) == [None] and w.counters.stat("pass_not_ours") == 1


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("sched", ["rr", "wlc", "sh"])
def test_persistence_wraps_the_engine_scheduler(impl, sched):
    """-p: a client's later conns follow its template whoever picked the
    first; the scheduler in the engine picks for new clients only, as the
    upcall does, with the same counts and flags after."""
    clients = [f"10.7.0.{i}" for i in range(1, 7)]

    def run(c_sched: bool):
        w = World(impl, 2, c_sched, sched, persistent=300)
        for i in range(3):
            w.add(i, weight=i + 1, u_threshold=9)
        first = w.syn(6, clients)
        again = w.syn(12, clients)
        return first, again, w.state()
    got, want = run(True), run(False)
    assert got == want
    first, again, _ = got
    assert again == first * 2 and len(set(first)) >= 2


def random_script(seed: int, steps: int = 40) -> list:
    """A seeded mix of the steps SCRIPT uses: new conns, established and
    closed ones, weight and threshold edits, dests added and deleted."""
    rnd = random.Random(seed)
    script, live, made = [], {0}, 0
    script.append(("add", (0,), {"weight": 2}))
    for _ in range(steps):
        op = rnd.choice(["syn", "syn", "syn", "ack", "rst", "weight", "thresh", "add", "del"])
        if op == "syn":
            n = rnd.randint(1, 8)
            script.append(("syn", (n,), {}))
            made += n
        elif op in ("ack", "rst") and made:
            ids = tuple(sorted(rnd.sample(range(made), min(made, rnd.randint(1, 5)))))
            script.append((op, ids, {}))
        elif op == "weight":
            script.append(("dest", (rnd.choice(sorted(live)),), {"weight": rnd.randint(0, 5)}))
        elif op == "thresh":
            u = rnd.choice([0, 2, 4, 8])
            script.append(("dest", (rnd.choice(sorted(live)),),
                           {"u_threshold": u, "l_threshold": rnd.randint(0, u)}))
        elif op == "add" and len(live) < len(RIPS):
            i = min(set(range(len(RIPS))) - live)
            live.add(i)
            script.append(("add", (i,), {"weight": rnd.randint(0, 5)}))
        elif op == "del" and len(live) > 1:
            i = rnd.choice(sorted(live))
            live.discard(i)
            script.append(("delete", (i,), {}))
    return script


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sched", KINDS + HASHED)
def test_random_scripts_pick_as_the_python_ones(sched, seed):
    script = random_script(seed)
    want = run(script, "c", 1, False, sched)
    got = run(script, "c", 2, True, sched)
    for i, (g, e) in enumerate(zip(got, want)):
        assert g == e, f"step {i} {e[0]}{e[1]}"
