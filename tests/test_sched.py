"""Every IPVS scheduler (rr, wrr, lc, wlc, sed, nq, fo, ovf, sh, dh, mh, lblc, lblcr,
twos) with the kernel's semantics: its rule, tie order (the kernel's dest list,
newest first), hash tables and flags."""

from __future__ import annotations

import ipaddress
import math
import pathlib
import random
import sys
import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest

from pylvs import sched
from pylvs.control import listing
from pylvs.control.balancer import Balancer
from pylvs.engine import tables
from pylvs.engine.tables import Counters


@dataclass
class Dest:
    slot: int
    weight: int
    daddr: int = 0
    dest_port: int = 0
    last_weight: int | None = None

    def __post_init__(self):
        if self.last_weight is None:
            self.last_weight = self.weight


def ctx(c=None, caddr=0x0A000002, cport=1000, daddr=0xC0A80001, dport=80, now=0.0,
        over=()) -> sched.SchedCtx:
    return sched.SchedCtx(conns({}) if c is None else c, caddr, cport, daddr, dport, now,
                          set(over).__contains__)


def dests(*weights: int, slots=None) -> list[Dest]:
    slots = slots or range(len(weights))
    return [Dest(s, w) for s, w in zip(slots, weights)]


def conns(rows: dict[int, tuple[int, int]], n: int = 16) -> np.ndarray:
    a = np.zeros((n, 2), dtype=np.int32)
    for slot, (active, inactive) in rows.items():
        a[slot] = (active, inactive)
    return a


def picks_staying_active(s: sched.Scheduler, ds: list[Dest], n: int) -> str:
    """n new conns, each staying active (its dest's activeconns + 1), as
    picks() spells them."""
    c = conns({})
    out = []
    for _ in range(n):
        d = s.schedule(ds, ctx(c))
        out.append("-" if d is None else "ABCDEFGH"[ds.index(d)])
        if d is not None:
            c[d.slot, 0] += 1
    return "".join(out)


def picks(s: sched.Scheduler, ds: list[Dest], n: int, c=None) -> str:
    c = conns({}) if c is None else c
    out = []
    for _ in range(n):
        d = s.schedule(ds, ctx(c))
        out.append("-" if d is None else "ABCDEFGH"[ds.index(d)])
    return "".join(out)


ALL = ("rr", "wrr", "lc", "wlc", "sed", "nq", "fo", "ovf", "sh", "dh", "mh", "lblc", "lblcr",
       "twos")


def test_registry():
    assert set(sched.names()) == set(ALL)
    assert sched.get("wlc").name == "wlc"
    assert sched.DEFAULT == "wlc"
    for name in ALL:
        module = sys.modules[sched.get(name).__module__]
        assert module.__name__.endswith("." + name) and module.__doc__, f"{name}.py must state its formula"


# --- rr -----------------------------------------------------------------------

def test_rr_order():
    assert picks(sched.get("rr")(), dests(1, 1, 1), 7) == "ABCABCA"


def test_rr_ignores_weight_but_skips_zero():
    assert picks(sched.get("rr")(), dests(5, 0, 1), 5) == "ACACA"


def test_rr_none_when_all_quiesced_or_empty():
    s = sched.get("rr")()
    assert picks(s, dests(0, 0), 2) == "--"
    assert s.schedule([], ctx()) is None


def test_rr_keeps_its_turn_across_updates():
    s = sched.get("rr")()
    ds = dests(1, 1, 1, 1)
    assert picks(s, ds, 2) == "AB"
    ds2 = [ds[0], ds[2], ds[3]]          # B (the last pick) deleted
    s.update(ds2)
    assert picks(s, ds2, 3) == "BCA"     # C, D, A of the old names
    ds3 = ds2 + [Dest(9, 1)]
    s.update(ds3)                        # a new dest: the turn stays on A
    assert picks(s, ds3, 4) == "BCDA"


# --- wrr ----------------------------------------------------------------------

def wrr(*weights: int):
    s = sched.get("wrr")()
    ds = dests(*weights)
    s.update(ds)
    return s, ds


def test_wrr_kernel_sequence_4_3_2():
    s, ds = wrr(4, 3, 2)
    assert picks(s, ds, 18) == "AABABCABC" * 2


def test_wrr_steps_by_gcd():
    s, ds = wrr(4, 2)
    assert picks(s, ds, 6) == "AAB" * 2
    s, ds = wrr(6, 4, 2)
    assert picks(s, ds, 12) == "AABABC" * 2


def test_wrr_equal_weights_is_rr():
    s, ds = wrr(5, 5, 5)
    assert picks(s, ds, 6) == "ABCABC"


def test_wrr_skips_weight_zero():
    s, ds = wrr(2, 0, 1)
    assert picks(s, ds, 9) == "AAC" * 3


def test_wrr_none_when_all_quiesced():
    s, ds = wrr(0, 0, 0)
    assert picks(s, ds, 2) == "--"
    s, ds = wrr()
    assert s.schedule(ds, ctx()) is None


def test_wrr_works_without_an_update():
    s = sched.get("wrr")()
    assert picks(s, dests(2, 1), 6) == "AABAAB"


def test_wrr_weight_change_through_update():
    s, ds = wrr(4, 3, 2)
    assert picks(s, ds, 2) == "AA"          # cw is now 3
    for d in ds:
        d.weight = 1
    s.update(ds)                            # cw > new max: restart at the max, from the head
    assert picks(s, ds, 6) == "ABCABC"
    ds[0].weight = 0                        # quiesce A
    s.update(ds)
    assert picks(s, ds, 4) == "BCBC"
    for d in ds:
        d.weight = 0
    s.update(ds)
    assert picks(s, ds, 2) == "--"
    ds[2].weight = 3
    s.update(ds)
    assert picks(s, ds, 3) == "CCC"


def test_wrr_update_aligns_current_weight_to_new_gcd():
    s, ds = wrr(3, 1)
    assert picks(s, ds, 2) == "AA"          # cw: 3, then 2
    for d, w in zip(ds, (8, 4)):
        d.weight = w
    s.update(ds)                            # di 4, mw 5; cw 2 <= mw: (2 // 4) * 4 + 1 = 1
    assert picks(s, ds, 4) == "ABAA"


# --- lc -------------------------------------------------------------------------

def test_lc_least_overhead():
    ds = dests(1, 1, 1, slots=[4, 7, 2])
    c = conns({4: (1, 0), 7: (0, 200), 2: (0, 300)})   # 256, 200, 300
    assert picks(sched.get("lc")(), ds, 1, c) == "B"


def test_lc_active_weighs_256_inactive():
    ds = dests(1, 1)
    assert picks(sched.get("lc")(), ds, 1, conns({0: (1, 0), 1: (0, 255)})) == "B"
    assert picks(sched.get("lc")(), ds, 1, conns({0: (1, 0), 1: (0, 256)})) == "A"


def test_lc_ignores_weight_except_zero():
    ds = dests(1, 100, 0)
    c = conns({0: (0, 3), 1: (0, 4), 2: (0, 0)})
    assert picks(sched.get("lc")(), ds, 1, c) == "A"


def test_lc_first_wins_ties_and_none_when_quiesced():
    assert picks(sched.get("lc")(), dests(1, 1, 1), 1, conns({0: (0, 5), 1: (0, 2), 2: (0, 2)})) == "B"
    assert picks(sched.get("lc")(), dests(0, 0), 1) == "-"


# --- wlc ------------------------------------------------------------------------

def test_wlc_overhead_per_weight():
    ds = dests(1, 3)
    c = conns({0: (0, 10), 1: (0, 20)})      # 10/1 > 20/3
    assert picks(sched.get("wlc")(), ds, 1, c) == "B"
    c = conns({0: (0, 6), 1: (0, 20)})       # 6/1 < 20/3
    assert picks(sched.get("wlc")(), ds, 1, c) == "A"


def test_wlc_first_best_wins_ties():
    ds = dests(2, 1, 4)
    c = conns({0: (0, 10), 1: (0, 5), 2: (0, 20)})   # all 5 per weight unit
    assert picks(sched.get("wlc")(), ds, 1, c) == "A"


def test_wlc_skips_weight_zero_even_when_idle():
    ds = dests(0, 1, 2, slots=[3, 5, 8])
    c = conns({3: (0, 0), 5: (2, 0), 8: (3, 0)})     # 512/1 > 768/2
    assert picks(sched.get("wlc")(), ds, 1, c) == "C"
    assert picks(sched.get("wlc")(), dests(0, 0), 1) == "-"


def test_wlc_big_counts_do_not_overflow():
    ds = dests(65535, 1)
    c = conns({0: (2_000_000, 0), 1: (30, 0)})
    # 512e6/65535 = 7812.6 > 7680/1
    assert picks(sched.get("wlc")(), ds, 1, c) == "B"


# --- sed -----------------------------------------------------------------------

def test_sed_active_plus_one_per_weight():
    # (5+1)/3 = 2 vs (1+1)/1 = 2 vs (2+1)/2 = 1.5: C; inactive conns do not count.
    ds = dests(3, 1, 2)
    c = conns({0: (5, 900), 1: (1, 0), 2: (2, 0)})
    assert picks(sched.get("sed")(), ds, 1, c) == "C"


def test_sed_idle_dests_by_weight_not_order():
    # All idle: 1/w is least for the heaviest, which wlc (0/w, a tie) would not pick.
    ds = dests(1, 4, 2)
    assert picks(sched.get("sed")(), ds, 1) == "B"
    assert picks(sched.get("wlc")(), ds, 1) == "A"


def test_sed_first_wins_ties_and_skips_weight_zero():
    ds = dests(0, 2, 2)
    c = conns({1: (3, 0), 2: (3, 0)})
    assert picks(sched.get("sed")(), ds, 1, c) == "B"


def test_sed_scripted_sequence_follows_the_counts():
    """New conns that become active, one after another: the picks follow
    (active+1)/weight, weights 1, 2, 3."""
    got = picks_staying_active(sched.get("sed")(), dests(1, 2, 3), 12)
    # A model of the rule, ties to the first: C (1/3), B (1/2), C (2/3), ...
    want = ""
    active = [0, 0, 0]
    for _ in range(12):
        best = min(range(3), key=lambda i: ((active[i] + 1) / (i + 1), i))
        want += "ABC"[best]
        active[best] += 1
    assert got == want and got.count("C") == 6 and got.count("A") == 2


# --- nq ------------------------------------------------------------------------

def test_nq_idle_dest_first_whatever_its_weight():
    # B is idle (no active conn; inactive ones do not count): taken at once,
    # though C, idle too and heavier, is what sed would pick.
    ds = dests(5, 1, 9)
    c = conns({0: (1, 0), 1: (0, 50), 2: (0, 0)})
    assert picks(sched.get("nq")(), ds, 1, c) == "B"


def test_nq_without_idle_dests_is_sed():
    ds = dests(3, 1, 2)
    c = conns({0: (5, 0), 1: (1, 0), 2: (2, 0)})
    assert picks(sched.get("nq")(), ds, 1, c) == picks(sched.get("sed")(), ds, 1, c) == "C"


def test_nq_idle_weight_zero_is_still_skipped():
    ds = dests(0, 1)
    c = conns({0: (0, 0), 1: (7, 0)})
    assert picks(sched.get("nq")(), ds, 1, c) == "B"


# --- fo ------------------------------------------------------------------------

def test_fo_highest_weight_whatever_the_load():
    ds = dests(2, 5, 5, 1)
    c = conns({1: (10_000, 10_000)})
    assert picks(sched.get("fo")(), ds, 3, c) == "BBB"   # first of the two heaviest


def test_fo_fails_over_when_the_heaviest_is_quiesced():
    assert picks(sched.get("fo")(), dests(2, 0, 1), 2) == "AA"
    assert picks(sched.get("fo")(), dests(0, 0), 1) == "-"


# --- ovf -----------------------------------------------------------------------

def test_ovf_fills_the_heaviest_to_its_weight_then_overflows():
    """Conns that stay active: the weight-3 dest takes them while its
    active conns are <= 3 (so 4 of them), then the weight-2 one (3), then
    none: refused."""
    assert picks_staying_active(sched.get("ovf")(), dests(2, 3), 9) == "BBBBAAA--"


def test_ovf_counts_active_only_and_skips_weight_zero():
    ds = dests(0, 1, 1)
    c = conns({0: (0, 0), 1: (1, 500), 2: (0, 0)})
    assert picks(sched.get("ovf")(), ds, 1, c) == "B"   # 1 active <= weight 1: still available
    c[1, 0] = 2
    assert picks(sched.get("ovf")(), ds, 1, c) == "C"


HASHED = {"sh": ("sh-fallback",), "dh": (), "mh": ("mh-fallback",)}


def spread_picks(s: sched.Scheduler, ds: list[Dest], n: int, c=None, over=(), now=0.0) -> str:
    """n new conns from n different clients to n different daddrs, as
    picks() spells them."""
    c = conns({}) if c is None else c
    out = []
    for i in range(n):
        d = s.schedule(ds, ctx(c, caddr=0x0A000000 + 7919 * i, cport=1024 + i,
                               daddr=0xC0A80000 + 31 * i, over=over, now=now))
        out.append("-" if d is None else "ABCDEFGH"[ds.index(d)])
    return "".join(out)


@pytest.mark.parametrize("name", ALL)
def test_weight_zero_and_overloaded_never_picked(name):
    """Weight 0 and an -x overloaded dest are unavailable to every
    scheduler; a hash scheduler whose bucket holds one returns none unless
    its fallback flag is set."""
    ds = dests(0, 3, 2, 1)
    # Active conns within the weights, so ovf has dests available too.
    c = conns({0: (0, 0), 1: (2, 5), 2: (0, 0), 3: (1, 9)})
    for flags in ((), HASHED.get(name, ())):
        s = sched.get(name)(frozenset(flags))
        s.update(ds)
        got = spread_picks(s, ds, 60, c, over={ds[2].slot})
        if name in HASHED and not flags:
            assert set(got) <= {"B", "D", "-"}
        else:
            assert set(got) <= {"B", "D"} and "-" not in got, (name, flags, got)


# --- every count-based scheduler against a model of its kernel rule ------------

def _avail(ds, over):
    return [(i, d) for i, d in enumerate(ds) if d.weight > 0 and d.slot not in over]


def _oh(c, d):
    return int(c[d.slot, 0]) * 256 + int(c[d.slot, 1])


def _least(cands, key):
    return min(cands, key=lambda t: (key(t[1]), t[0]))[1] if cands else None


def model_lc(ds, c, over, state):
    return _least(_avail(ds, over), lambda d: _oh(c, d))


def model_wlc(ds, c, over, state):
    return _least(_avail(ds, over), lambda d: Fraction(_oh(c, d), d.weight))


def model_sed(ds, c, over, state):
    return _least(_avail(ds, over), lambda d: Fraction(int(c[d.slot, 0]) + 1, d.weight))


def model_nq(ds, c, over, state):
    idle = [d for _, d in _avail(ds, over) if c[d.slot, 0] == 0]
    return idle[0] if idle else model_sed(ds, c, over, state)


def model_fo(ds, c, over, state):
    return _least(_avail(ds, over), lambda d: -d.weight)


def model_ovf(ds, c, over, state):
    return _least([(i, d) for i, d in _avail(ds, over) if c[d.slot, 0] <= d.weight],
                  lambda d: -d.weight)


def model_rr(ds, c, over, state):
    """The next available dest after the last pick, cyclically."""
    last = state.get("last", -1)
    for step in range(1, len(ds) + 1):
        i = (last + step) % len(ds)
        if ds[i].weight > 0 and ds[i].slot not in over:
            state["last"] = i
            return ds[i]
    return None


def model_twos(ds, c, over, state):
    """Two weighted draws from the same random stream; the less loaded per
    weight wins, the first draw on a tie."""
    rng = state.setdefault("rng", random.Random(7))
    av = [d for _, d in _avail(ds, over)]
    if not av:
        return None
    total = sum(d.weight for d in av) + 1
    draws = [rng.getrandbits(32) % total for _ in range(2)]
    chosen = []
    for r in draws:
        acc = 0
        for d in av:
            acc += d.weight
            if r <= acc:
                chosen.append(d)
                break
    a, b = chosen
    return b if Fraction(_oh(c, b), b.weight) < Fraction(_oh(c, a), a.weight) else a


MODELS = {"lc": model_lc, "wlc": model_wlc, "sed": model_sed, "nq": model_nq,
          "fo": model_fo, "ovf": model_ovf, "rr": model_rr, "twos": model_twos}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_scripted_sequence_against_the_kernel_rule(name, seed):
    """A scripted day of a service: new conns stay active on their dest,
    active conns finish (become inactive) and inactive ones expire, weights
    change (the scheduler's update hook runs) and dests go in and out of -x
    overload. Every pick equals the model's."""
    rng = random.Random(seed)
    ds = dests(*(rng.randint(0, 4) for _ in range(5)), slots=[9, 3, 12, 0, 6])
    c = conns({})
    s = sched.get(name)(seed=7) if name == "twos" else sched.get(name)()
    s.update(ds)
    state: dict = {}
    over: set[int] = set()
    for step in range(400):
        r = rng.random()
        if r < 0.6:
            got = s.schedule(ds, ctx(c, over=over))
            want = MODELS[name](ds, c, over, state)
            assert got is want, (step, got, want)
            if got is not None:
                c[got.slot, 0] += 1
        elif r < 0.8:
            busy = [d for d in ds if c[d.slot, 0] > 0]
            if busy:
                d = rng.choice(busy)
                c[d.slot, 0] -= 1
                c[d.slot, 1] += 1
        elif r < 0.9:
            idle = [d for d in ds if c[d.slot, 1] > 0]
            if idle:
                c[rng.choice(idle).slot, 1] -= 1
        elif r < 0.95:
            rng.choice(ds).weight = rng.randint(0, 4)
            s.update(ds)
        else:
            over ^= {rng.choice(ds).slot}


# --- the kernel's dest order through the Balancer ----------------------------

VIP = "10.0.0.2"


def balancer(sched_name, *weights, flags=None, **dest_kw):
    b = Balancer(Counters(max_services=4, max_dests=32))
    s = b.add_service("tcp", VIP, 80, sched=sched_name, flags=flags)
    names = {}
    for i, w in enumerate(weights):
        names[b.add_dest("tcp", VIP, 80, f"10.0.1.{i + 1}", 80, weight=w, **dest_kw)] = "ABCDEFGH"[i]
    return b, s, names


def bpicks(b, s, names, n, caddr=1, cport=1):
    return "".join(names.get(b.schedule(s, caddr, cport), "-") for _ in range(n))


def test_rr_through_the_balancer_is_newest_first():
    b, s, names = balancer("rr", 1, 1, 1)            # added A, B, C: the list is C, B, A
    assert bpicks(b, s, names, 6) == "CBACBA"
    b.edit_dest("tcp", VIP, 80, "10.0.1.3", 80, weight=2)   # -e: C stays where it is
    assert bpicks(b, s, names, 3) == "CBA"
    b.del_dest("tcp", VIP, 80, "10.0.1.2", 80)
    # Re-added, B is the newest: the list is B, C, A, and the turn after A.
    names[b.add_dest("tcp", VIP, 80, "10.0.1.2", 80)] = "B"
    assert bpicks(b, s, names, 6) == "BCABCA"


def test_wrr_published_example_and_the_kernel_add_sequence():
    """The LVS example (weights 4, 3, 2: A A B A B C A B C) holds for a
    list built at once. ipvsadm adds dests one by one, and the kernel's
    ip_vs_wrr_dest_changed runs each time: after -a A (weight 4) alone the
    gcd is 4, so mw = cw = 1, and cw stays 1 as B and C join; the first
    pass over C, B, A is for weight >= 1, then cw restarts at 4."""
    s, ds = wrr(4, 3, 2)
    assert picks(s, ds, 9) == "AABABCABC"
    b, sv, names = balancer("wrr", 4, 3, 2)
    assert bpicks(b, sv, names, 3 + 9 * 2) == "CBA" + "ABACBACBA" * 2
    # The same rules restored in one batch (pylvs adm -R): the same steps.
    b = Balancer(Counters(max_services=4, max_dests=32))
    b.apply_many([{"op": "add_service", "proto": "tcp", "vaddr": VIP, "vport": 80, "sched": "wrr"}]
                 + [{"op": "add_dest", "proto": "tcp", "vaddr": VIP, "vport": 80,
                     "daddr": f"10.0.1.{i + 1}", "dport": 80, "weight": w}
                    for i, w in enumerate((4, 3, 2))])
    s2 = b.services()[0].slot
    names2 = {d.slot: "ABC"[int(str(ipaddress.IPv4Address(d.daddr)).rsplit(".", 1)[1]) - 1]
              for d in b._sched_view[s2][1]}
    assert bpicks(b, s2, names2, 3 + 9) == "CBA" + "ABACBACBA"


def test_wlc_and_lc_ties_go_to_the_newest_dest():
    for name in ("lc", "wlc", "sed", "fo"):
        b, s, names = balancer(name, 1, 1, 1)
        assert bpicks(b, s, names, 1) == "C", name


def test_balancer_context_daddr_dport_now_and_overload():
    b, s, names = balancer("rr", 1, 1, u_threshold=2)
    seen = []

    class Spy(sched.Scheduler):
        def schedule(self, dests, ctx):
            seen.append((ctx.caddr, ctx.cport, ctx.daddr, ctx.dport, ctx.now,
                         [ctx.overloaded(d.slot) for d in dests], [d.slot for d in dests]))
            return dests[0]

    svc = b._services[(6, int(ipaddress.IPv4Address(VIP)), 80)]
    svc.scheduler = Spy()
    b._refresh_sched(svc, force=True)
    b.clock = lambda: 1234.5
    a, bb = sorted(names)
    b.counters.dest_flags[bb] = tables.DEST_F_OVERLOAD  # as the engines set it at -x 2
    assert b.schedule(s, 0x0B000001, 40000) == bb
    assert b.schedule(s, 0x0B000001, 40001, dport=8080) == bb
    assert seen[0] == (0x0B000001, 40000, int(ipaddress.IPv4Address(VIP)), 80, 1234.5,
                       [True, False], [bb, a])
    assert seen[1][3] == 8080


def test_flags_reach_the_scheduler_and_the_listing():
    b, s, names = balancer("sh", 1, 1, flags="flag-1,flag-2")
    sch = b._sched_view[s][0]
    assert sch.fallback and sch.use_port
    line = listing.list_all(b.snapshot()).splitlines()[3]
    assert line == f"TCP  {VIP}:80 sh (sh-fallback,sh-port)"
    b.edit_service("tcp", VIP, 80, sched="mh", flags="mh-port")
    sch = b._sched_view[s][0]
    assert not sch.fallback and sch.use_port and listing.list_all(
        b.snapshot()).splitlines()[3] == f"TCP  {VIP}:80 mh (mh-port)"
    b.edit_service("tcp", VIP, 80, sched="rr", flags="flag-1,flag-3")
    assert listing.list_all(b.snapshot()).splitlines()[3] == f"TCP  {VIP}:80 rr (flag-1,flag-3)"
    assert "-b flag-1,flag-3" in listing.save(b.snapshot())


# --- the kernel's hash functions ------------------------------------------------

def test_hash_32_is_the_golden_ratio_multiplier():
    from pylvs.sched.hashes import GOLDEN_RATIO_32, hash_32
    phi = (1 + 5 ** 0.5) / 2
    # include/linux/hash.h: 2^32 / phi, negated mod 2^32 (0x9E3779B9 -> 0x61C88647).
    assert GOLDEN_RATIO_32 == 2 ** 32 - round(2 ** 32 / phi)
    for v in (0, 1, 0x0A000002, 0xFFFFFFFF, 0xC0A80001 + 443):
        assert hash_32(v, 8) == (v * GOLDEN_RATIO_32 % 2 ** 32) // 2 ** 24


@pytest.mark.parametrize("n, want", [
    # lib/siphash_kunit.c's hsiphash vectors (64-bit), key 00 01 .. 0f, input 00 01 .. n-1.
    (0, 0x050FC4DC), (1, 0x7D57CA93), (4, 0x88D38328), (7, 0x9BB11140),
    (8, 0x8D299A8E), (15, 0x2A519956), (16, 0x7D908B66)])
def test_hsiphash_kernel_vectors(n, want):
    from pylvs.sched.hashes import siphash13
    key = (0x0706050403020100, 0x0F0E0D0C0B0A0908)
    assert siphash13(*key, bytes(range(n))) & 0xFFFFFFFF == want


def test_hsiphash_u32_is_siphash13_of_four_little_endian_bytes():
    from pylvs.sched.hashes import hsiphash_u32, siphash13
    rng = random.Random(4)
    for _ in range(500):
        key, v = (rng.getrandbits(64), rng.getrandbits(64)), rng.getrandbits(32)
        assert hsiphash_u32(key, v) == siphash13(*key, v.to_bytes(4, "little")) & 0xFFFFFFFF


def test_siphash13_equals_pythons_own_with_a_zero_key():
    """CPython 3.11+ hashes bytes with SipHash-1-3; PYTHONHASHSEED=0 zeroes
    its key: an independent implementation to compare with (b"" is special:
    CPython hashes it to 0)."""
    import subprocess
    msgs = [b"\x01\x02\x03\x04", b"maglev!", b"12345678", b"0123456789abcdef0"]
    out = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys.hash_info.algorithm);"
         f"print(*[hash(m) % 2**64 for m in {msgs!r}])"],
        env={"PYTHONHASHSEED": "0"}, capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "siphash13":
        pytest.skip(f"this Python hashes with {out[0]}")
    from pylvs.sched.hashes import siphash13
    for m, h in zip(msgs, out[1:]):
        want = int(h)
        got = siphash13(0, 0, m)
        # CPython maps a hash of -1 to -2.
        assert got == want or (got == 2 ** 64 - 1 and want == 2 ** 64 - 2)


# --- sh -----------------------------------------------------------------------

def sh(*weights, flags=()):
    s = sched.get("sh")(frozenset(flags))
    ds = dests(*weights, slots=[10 + i for i in range(len(weights))])
    s.update(ds)
    return s, ds


def test_sh_table_deals_weight_buckets_in_list_order():
    s, ds = sh(2, 1, 0)
    # A A B C, repeated: weight 0 still takes one bucket (unavailable there).
    assert list(s.table[:8]) == [10, 10, 11, 12, 10, 10, 11, 12]
    assert s.table.dtype == np.int32 and len(s.table) == 256
    assert [int((s.table == 10 + i).sum()) for i in range(3)] == [128, 64, 64]
    s.update([])
    assert (s.table == -1).all()


def test_sh_bucket_is_hash_32_of_caddr_plus_port():
    s, ds = sh(1, 1, 1)
    sp, _ = sh(1, 1, 1, flags=("sh-port",))
    caddr = 0x0A000002
    assert s.bucket(caddr, 5555) == s.bucket(caddr, 1) == (caddr * 0x61C88647 % 2 ** 32) >> 24
    assert sp.bucket(caddr, 5555) == ((caddr + 5555) * 0x61C88647 % 2 ** 32) >> 24
    for caddr in (0x0A000002, 0xC0A80164, 0x7F000001):
        d = s.schedule(ds, ctx(caddr=caddr))
        assert d.slot == s.table[s.bucket(caddr, 0)]


def test_sh_same_client_same_dest_and_weights_spread_clients():
    s, ds = sh(3, 1)
    rng = random.Random(5)
    clients = [rng.getrandbits(32) for _ in range(20000)]
    got = [s.schedule(ds, ctx(caddr=a, cport=rng.randrange(65536))).slot for a in clients]
    assert got == [s.schedule(ds, ctx(caddr=a, cport=1)).slot for a in clients]
    share = got.count(10) / len(got)
    assert 0.70 < share < 0.80                     # 192 of 256 buckets: 3/4


def test_sh_port_spreads_one_client_over_dests():
    s, ds = sh(1, 1, 1, 1, flags=("sh-port",))
    got = {s.schedule(ds, ctx(caddr=0x0A000002, cport=p)).slot for p in range(1024, 1100)}
    assert got == {10, 11, 12, 13}


def test_sh_unavailable_bucket_none_or_fallback():
    s, ds = sh(1, 1, 1, 1)
    sf, dsf = sh(1, 1, 1, 1, flags=("sh-fallback",))
    caddr = next(a for a in range(1, 10000) if s.table[s.bucket(a, 0)] == 11)
    assert s.schedule(ds, ctx(caddr=caddr)).slot == 11
    over = {11}
    assert s.schedule(ds, ctx(caddr=caddr, over=over)) is None
    # Fallback: buckets (2 * b + i) mod 256, the first available one.
    b = s.bucket(caddr, 0)
    want = next(int(sf.table[(2 * b + i) % 256]) for i in range(256)
                if sf.table[(2 * b + i) % 256] != 11)
    assert sf.schedule(dsf, ctx(caddr=caddr, over=over)).slot == want
    dsf[1].weight = 0                # quiesced: weight 0 keeps one bucket, as weight 1 did
    sf.update(dsf)
    assert sf.table[b] == 11 and sf.schedule(dsf, ctx(caddr=caddr)).slot == want
    for d in dsf:
        d.weight = 0
    sf.update(dsf)
    assert sf.schedule(dsf, ctx(caddr=caddr)) is None


# --- dh -----------------------------------------------------------------------

def test_dh_table_ignores_weights_and_keys_the_daddr():
    s = sched.get("dh")()
    ds = dests(5, 1, 0, slots=[4, 5, 6])
    s.update(ds)
    assert list(s.table[:6]) == [4, 5, 6, 4, 5, 6]
    daddr = 0xC0A80001
    assert s.bucket(daddr) == (daddr * 0x61C88647 % 2 ** 32) >> 24
    # One service address: every client goes to one dest.
    got = {s.schedule(ds, ctx(caddr=a, daddr=daddr)).slot for a in range(1, 500)}
    assert len(got) == 1
    spread = [s.schedule(ds, ctx(daddr=0xC0A80000 + i)) for i in range(3000)]
    assert {d.slot for d in spread if d} == {4, 5} and spread.count(None) > 800


# --- mh -----------------------------------------------------------------------

def mh_dests(*weights, base=0x0A000101):
    return [Dest(20 + i, w, daddr=base + i, dest_port=80) for i, w in enumerate(weights)]


def maglev_model(ds):
    """The Maglev table as the paper states it (section 3.4), with the
    kernel's hashes and turns, written independently of pylvs.sched.mh."""
    from pylvs.sched.hashes import hsiphash_u32
    M = 4093
    k1, k2 = (2654435761,) * 2, (2654446892,) * 2
    ws = [d.last_weight for d in ds]
    g = 0
    for w in ws:
        g = math.gcd(g, w)
    if not g:
        return [-1] * M
    shift = max(0, (max(ws) // g).bit_length() - 6)
    turns = [max((w // g) >> shift, 1 if w else 0) for w in ws]

    def prefs(d):
        key = (d.daddr + d.dest_port) % 2 ** 32
        offset, skip = hsiphash_u32(k1, key) % M, hsiphash_u32(k2, key) % (M - 1) + 1
        j = 0
        while True:
            yield (offset + j * skip) % M
            j += 1

    gens = [prefs(d) for d in ds]
    entry = [-1] * M
    filled = 0
    while filled < M:
        for i, d in enumerate(ds):
            for _ in range(turns[i]):
                c = next(gens[i])
                while entry[c] >= 0:
                    c = next(gens[i])
                entry[c] = d.slot
                filled += 1
                if filled == M:
                    return entry
    return entry


def mh(ds, flags=()):
    s = sched.get("mh")(frozenset(flags))
    s.update(ds)
    return s


def test_mh_table_is_the_maglev_table_with_the_kernel_hashes():
    for weights in ((1, 1, 1), (3, 1, 2, 0), (100, 1000, 7)):
        ds = mh_dests(*weights)
        s = mh(ds)
        assert s.table.dtype == np.int32 and len(s.table) == 4093
        assert list(s.table) == maglev_model(ds), weights


def test_mh_turns_shift_large_weights():
    from pylvs.sched.mh import turns
    assert turns([4, 2, 6]) == [2, 1, 3]             # / gcd 2
    assert turns([1, 200]) == [1, 50]                # 200 needs 8 bits: >> 2; 1 >> 2 = 0 -> 1
    assert turns([0, 0]) == [0, 0]
    assert turns([65535, 1]) == [63, 1]              # 16 bits: >> 10


def test_mh_tables_identical_between_runs():
    """Nothing random or process-dependent: another interpreter with
    another hash seed builds the same table."""
    import subprocess
    ds = mh_dests(2, 1, 1, 3)
    s = mh(ds)
    code = ("import sys, zlib; sys.path.insert(0, %r)\n"
            "from pylvs.sched.mh import build_table\n"
            "class D:\n"
            "    def __init__(s, slot, w, a): s.slot, s.weight, s.last_weight, s.daddr, s.dest_port = slot, w, w, a, 80\n"
            "ds = [D(20 + i, w, 0x0A000101 + i) for i, w in enumerate((2, 1, 1, 3))]\n"
            "print(zlib.crc32(build_table(ds).tobytes()))\n") % (str(pathlib.Path(sched.__file__).parents[2]),)
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed},
                             capture_output=True, text=True, check=True).stdout
        assert int(out) == zlib.crc32(s.table.tobytes())
    assert (mh(mh_dests(2, 1, 1, 3)).table == s.table).all()


def test_mh_weights_proportional():
    ds = mh_dests(1, 2, 3, 4)
    s = mh(ds)
    counts = [int((s.table == d.slot).sum()) for d in ds]
    for w, n in zip((1, 2, 3, 4), counts):
        assert abs(n - 4093 * w / 10) < 4093 * 0.01, counts


@pytest.mark.parametrize("n", [5, 10, 20])
def test_mh_disruption_when_one_of_n_leaves_is_about_1_over_n(n):
    ds = mh_dests(*[1] * n)
    before = mh(ds).table.copy()
    gone = ds[n // 2]
    after = mh([d for d in ds if d is not gone]).table
    moved = int((before != after).sum()) / 4093
    owned = int((before == gone.slot).sum()) / 4093
    assert abs(owned - 1 / n) < 0.2 / n
    # Only the leaving dest's entries must move; Maglev moves a few more.
    assert 1 / n * 0.95 < moved < 1 / n * 1.6, moved


def test_mh_quiesced_dest_keeps_its_entries_and_fallback():
    ds = mh_dests(1, 1, 1)
    s = mh(ds)
    table = s.table.copy()
    ds[1].weight = 0                 # -e -w 0: last_weight stays 1
    s.update(ds)
    assert (s.table == table).all()
    sf = mh(ds, ("mh-fallback",))
    caddr = next(a for a in range(1, 10000) if s.table[s.bucket(a, 0)] == ds[1].slot)
    assert s.schedule(ds, ctx(caddr=caddr)) is None
    d = sf.schedule(ds, ctx(caddr=caddr))
    assert d is not None and d is not ds[1]
    from pylvs.sched.hashes import hsiphash_u32
    b = s.bucket(caddr, 0)
    want = next(int(table[hsiphash_u32((2654435761,) * 2, (b + i) % 4093 + caddr) % 4093])
                for i in range(4093)
                if table[hsiphash_u32((2654435761,) * 2, (b + i) % 4093 + caddr) % 4093] != ds[1].slot)
    assert d.slot == want
    ds[0].last_weight = ds[1].last_weight = ds[2].last_weight = 0
    s.update(ds)
    assert (s.table == -1).all() and s.schedule(ds, ctx()) is None


def test_mh_port_flag_and_bucket():
    from pylvs.sched.hashes import hsiphash_u32
    ds = mh_dests(1, 1, 1, 1)
    s, sp = mh(ds), mh(ds, ("mh-port",))
    caddr = 0x0A000002
    assert s.bucket(caddr, 999) == hsiphash_u32((2654435761,) * 2, caddr) % 4093
    assert sp.bucket(caddr, 999) == hsiphash_u32((2654435761,) * 2, caddr + 999) % 4093
    assert len({sp.schedule(ds, ctx(caddr=caddr, cport=p)).slot for p in range(2000, 2100)}) == 4
    assert len({s.schedule(ds, ctx(caddr=caddr, cport=p)).slot for p in range(2000, 2100)}) == 1


# --- lblc / lblcr ---------------------------------------------------------------

def lb(name, *weights):
    s = sched.get(name)()
    ds = dests(*weights)
    s.update(ds)
    return s, ds


def test_lblc_cache_reuse_then_overload_rule():
    s, ds = lb("lblc", 2, 2)
    c = conns({})
    X = 0xC0A80001
    first = s.schedule(ds, ctx(c, daddr=X, now=1))
    assert first is ds[0]                             # wlc, tie to the first
    c[0, 0] = 2                                       # A: 2 active, not > weight 2
    assert s.schedule(ds, ctx(c, daddr=X, now=2)) is ds[0]
    assert s.schedule(ds, ctx(c, daddr=0xC0A80002, now=2)) is ds[1]   # another daddr: wlc
    c[0, 0] = 3                                       # > weight, and B has 0 * 2 < 2
    assert s.schedule(ds, ctx(c, daddr=X, now=3)) is ds[1]
    c[0, 0] = 0                                       # cached now: B, kept while fine
    c[1, 0] = 2
    assert s.schedule(ds, ctx(c, daddr=X, now=4)) is ds[1]
    c[1, 0] = 3
    c[0, 0] = 1                                       # A: 1 * 2 < 2 is false: no one is light
    assert s.schedule(ds, ctx(c, daddr=X, now=5)) is ds[1]
    ds[1].weight = 0                                  # quiesced: chosen afresh
    s.update(ds)
    assert s.schedule(ds, ctx(c, daddr=X, now=6)) is ds[0]


def test_lblc_ignores_the_x_overload_flag_on_a_hit():
    s, ds = lb("lblc", 1, 1)
    X = 7
    assert s.schedule(ds, ctx(daddr=X)) is ds[0]
    assert s.schedule(ds, ctx(daddr=X, over={ds[0].slot})) is ds[0]
    assert s.schedule(ds, ctx(daddr=8, over={ds[0].slot})) is ds[1]


def test_lblc_expiry_on_the_30_minute_full_check():
    """Ticks every 60 s from the first conn; the 30th (t0 + 1800) drops
    entries unused for lblc_expiration seconds."""
    s, ds = lb("lblc", 1, 1)
    s.expiration = 500
    c = conns({})
    X, Y = 1, 2
    assert s.schedule(ds, ctx(c, daddr=X, now=0)) is ds[0]
    assert s.schedule(ds, ctx(c, daddr=Y, now=0)) is ds[0]
    c[0, 1] = 5                                        # A is now the busier one
    assert s.schedule(ds, ctx(c, daddr=X, now=1000)) is ds[0]     # hit: last use 1000
    assert s.schedule(ds, ctx(c, daddr=Y, now=1500)) is ds[0]     # hit: last use 1500
    # t = 1800: X unused since 1000 (>= 500 s): dropped; Y (1500) stays.
    assert s.schedule(ds, ctx(c, daddr=X, now=1801)) is ds[1]
    assert s.schedule(ds, ctx(c, daddr=Y, now=1802)) is ds[0]
    # Full checks at 3600 and 5400: Y, used at 3599, survives the first
    # (3600 < 3599 + 500) and not the second.
    assert s.schedule(ds, ctx(c, daddr=Y, now=3599)) is ds[0]
    assert s.schedule(ds, ctx(c, daddr=X, now=3601)) is ds[1]
    assert Y in s.cache.entries
    assert s.schedule(ds, ctx(c, daddr=Y, now=5401)) is ds[1]


def test_lblc_default_expiration_is_a_day():
    s, ds = lb("lblc", 1, 1)
    assert s.expiration == 86400
    c = conns({})
    assert s.schedule(ds, ctx(c, daddr=1, now=0)) is ds[0]
    c[0, 1] = 9
    assert s.schedule(ds, ctx(c, daddr=1, now=86000)) is ds[0]
    assert s.schedule(ds, ctx(c, daddr=2, now=86000 + 86400 + 1800)) is ds[1]
    assert s.schedule(ds, ctx(c, daddr=1, now=86000 + 86400 + 1801)) is ds[1]


def test_lblcr_set_grows_on_overload_and_sheds_after_expiration():
    s, ds = lb("lblcr", 2, 2, 2)
    s.expiration = 100
    c = conns({})
    X = 0xC0A80001
    assert s.schedule(ds, ctx(c, daddr=X, now=0)) is ds[0]
    assert s.members(X) == [ds[0].slot]
    c[0, 0] = 3                                        # A overloaded (3 > 2), B, C light
    assert s.schedule(ds, ctx(c, daddr=X, now=10)) is ds[1]
    assert s.members(X) == [ds[1].slot, ds[0].slot]    # newest member first
    c[1, 0] = 1
    # The set's least loaded member: B (256 / 2) over A (768 / 2).
    assert s.schedule(ds, ctx(c, daddr=X, now=20)) is ds[1]
    c[1, 0] = 3                                        # both members overloaded: C joins
    assert s.schedule(ds, ctx(c, daddr=X, now=30)) is ds[2]
    assert s.members(X) == [2, 1, 0]
    c[2, 0] = 1
    # Last changed at 30; at 131 (> 30 + 100) the most loaded member goes:
    # A and B tie at 768 / 2, the first in the set (B) is dropped.
    assert s.schedule(ds, ctx(c, daddr=X, now=131)) is ds[2]
    assert s.members(X) == [2, 0]
    assert s.schedule(ds, ctx(c, daddr=X, now=200)) is ds[2]
    assert s.members(X) == [2, 0]                     # changed at 131: not yet
    assert s.schedule(ds, ctx(c, daddr=X, now=232)) is ds[2]
    assert s.members(X) == [2]


def test_lblcr_deleted_dest_leaves_the_sets():
    s, ds = lb("lblcr", 1, 1)
    assert s.schedule(ds, ctx(daddr=5)) is ds[0]
    s.update(ds[1:])
    assert s.members(5) == []
    assert s.schedule(ds[1:], ctx(daddr=5)) is ds[1]


# --- twos -----------------------------------------------------------------------

def test_twos_seeded_reproducible_and_weighted():
    ds = dests(1, 3, 6)
    a = spread_picks(sched.get("twos")(seed=3), ds, 200)
    assert a == spread_picks(sched.get("twos")(seed=3), ds, 200)
    # Idle dests tie: the first draw wins, drawn in proportion to weight.
    got = spread_picks(sched.get("twos")(seed=11), ds, 5000)
    assert abs(got.count("C") / 5000 - 6 / 11) < 0.03
    assert abs(got.count("A") / 5000 - 2 / 11) < 0.03   # r = 0 also lands on the first


def test_twos_less_loaded_of_two_wins():
    ds = dests(1, 1)
    c = conns({0: (10, 0)})
    got = spread_picks(sched.get("twos")(seed=1), ds, 3000, c)
    # B wins unless both draws are A: (2/3)^2 of the time A only.
    assert abs(got.count("A") / 3000 - 4 / 9) < 0.04


def test_lblc_expiration_sysctls_reach_the_schedulers():
    from pylvs.control.balancer import BalancerError
    from pylvs.engine.tables import SYSCTL_NAMES
    b, s, names = balancer("lblc", 1, 1)
    assert b.sysctl("lblc_expiration") == {"lblc_expiration": 86400}
    assert b.sysctl()["lblcr_expiration"] == 86400
    assert b._sched_view[s][0].expiration == 86400
    b.sysctl("lblc_expiration", 300)
    assert b._sched_view[s][0].expiration == 300
    s2 = b.add_service("tcp", VIP, 81, sched="lblcr")
    b.add_dest("tcp", VIP, 81, "10.0.1.1", 81)
    assert b._sched_view[s2][0].expiration == 86400
    b.set_sysctls({"lblcr_expiration": 60})
    assert b._sched_view[s2][0].expiration == 60 and b._sched_view[s][0].expiration == 300
    with pytest.raises(BalancerError, match="out of range"):
        b.sysctl("lblc_expiration", 2**31 // 1000 + 1)
    assert len(b.sysctl_array()) == len(SYSCTL_NAMES)   # the engine never sees them
    # The cache follows the knob: an entry unused for 300 s goes at the
    # 30-minute check.
    sch = b._sched_view[s][0]
    clock = [0.0]
    b.clock = lambda: clock[0]
    first = b.schedule(s, 1, 1)
    b.counters.dest_conns[first] = (0, 5)          # busier for wlc, not overloaded
    clock[0] = 1000.0
    assert b.schedule(s, 1, 1) == first
    clock[0] = 1801.0
    assert b.schedule(s, 1, 1) != first and len(sch.cache.entries) == 1


def test_edit_flags_alone_keeps_the_scheduler_state():
    """-E -b on the same scheduler: the kernel rewrites svc->flags only."""
    b, s, names = balancer("rr", 1, 1, 1)
    assert bpicks(b, s, names, 2) == "CB"
    b.edit_service("tcp", VIP, 80, flags="flag-2")
    assert bpicks(b, s, names, 2) == "AC"
    b, s, names = balancer("sh", 1, 1, 1, 1)
    sch = b._sched_view[s][0]
    assert len({b.schedule(s, 0x0A000002, p) for p in range(1000, 1060)}) == 1
    b.edit_service("tcp", VIP, 80, flags="sh-port")
    assert b._sched_view[s][0] is sch and sch.use_port and not sch.fallback
    assert len({b.schedule(s, 0x0A000002, p) for p in range(1000, 1060)}) == 4
    b.edit_service("tcp", VIP, 80, sched="mh")       # a new scheduler; the bit is mh-port now
    assert b._sched_view[s][0] is not sch and b._sched_view[s][0].use_port
