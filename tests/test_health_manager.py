"""The health manager's rules (keepalived's check epilogs and ipwrapper.c):
retries, alpha, quorum with hysteresis, the sorry server,
inhibit_on_failure, misc_dynamic, one probe per (real server, check),
configure() applying differences; and MISC_CHECK's exit codes. Results are
fed to the probes directly: no timers, no network."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace

import pytest

from pylvs.config.model import CheckSpec, RealServer, SorryServer, VirtualServer
from pylvs.control.balancer import Balancer
from pylvs.engine.tables import Counters
from pylvs.health import check_misc
from pylvs.health.check_api import Result
from pylvs.health.manager import HealthManager

VIP = "10.0.0.1"
R1, R2, SORRY = "10.0.1.2", "10.0.1.3", "10.0.1.9"
TCP = CheckSpec("TCP_CHECK", delay_loop=6, retry=2, delay_before_retry=1.5)
OK, FAIL = Result(True, "ok"), Result(False, "refused")


def vs(*rss, port=80, **kw) -> VirtualServer:
    return VirtualServer("TCP", VIP, port, lvs_sched="rr", real_servers=tuple(rss), **kw)


def rs(addr, weight=1, checks=(TCP,), **kw) -> RealServer:
    return RealServer(addr, 80, weight=weight, checks=tuple(checks), **kw)


def balancer_for(*services: VirtualServer) -> Balancer:
    b = Balancer(Counters(max_services=8, max_dests=16))
    for v in services:
        b.add_service("tcp", v.vaddr, v.vport, sched="rr")
        for r in v.real_servers:
            b.add_dest("tcp", v.vaddr, v.vport, r.addr, r.port, fwd="masq", weight=r.weight)
    return b


def forwarding(b: Balancer, port=80) -> dict[str, int]:
    """daddr -> weight of the dests that forward (what -L shows)."""
    svc = next(s for s in b.snapshot()["services"] if s["vport"] == port)
    return {d["daddr"]: d["weight"] for d in svc["dests"] if d["forwarding"]}


def probe(m: HealthManager, addr: str, spec: CheckSpec = TCP):
    return m._probes[(addr, 80, spec)]


def test_retries_before_down_and_one_success_brings_it_back():
    v = vs(rs(R1), rs(R2))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    p = probe(m, R1)
    assert p.result(OK) == 6
    # Up and failing: `retry` retries delay_before_retry apart, then down.
    assert p.result(FAIL) == 1.5 and p.result(FAIL) == 1.5 and p.up
    assert forwarding(b) == {R1: 1, R2: 1}
    assert p.result(FAIL) == 6 and not p.up
    assert forwarding(b) == {R2: 1}
    # Down: tried every delay_loop, no retries.
    assert p.result(FAIL) == 6
    assert p.result(OK) == 6 and p.up
    assert forwarding(b) == {R1: 1, R2: 1}
    row = next(r for r in m.status() if r["real_server"] == f"{R1}:80")
    assert (row["state"], row["result"], row["kind"], row["service"]) == (
        "up", "ok", "TCP_CHECK", f"TCP {VIP}:80")


def test_a_retry_success_resets_the_count():
    v = vs(rs(R1))
    m = HealthManager(balancer_for(v))
    m.configure([v])
    p = probe(m, R1)
    p.result(FAIL), p.result(FAIL), p.result(OK)
    assert p.result(FAIL) == 1.5 and p.up


def test_alpha_starts_down_until_its_first_success():
    spec = CheckSpec("TCP_CHECK", alpha=True, retry=0)
    v = vs(rs(R1, checks=[spec]), rs(R2, checks=[]))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    assert forwarding(b) == {R2: 1}      # no checker: always alive
    probe(m, R1, spec).result(OK)
    assert forwarding(b) == {R1: 1, R2: 1}


def test_all_checkers_must_be_up():
    http = CheckSpec("HTTP_GET", retry=0)
    v = vs(rs(R1, checks=[TCP, http]))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    probe(m, R1, http).result(FAIL)
    assert forwarding(b) == {}
    probe(m, R1).result(OK)
    assert forwarding(b) == {}
    probe(m, R1, http).result(OK)
    assert forwarding(b) == {R1: 1}


def test_inhibit_on_failure_keeps_the_dest_at_weight_zero():
    spec = CheckSpec("TCP_CHECK", retry=0)
    v = vs(rs(R1, weight=4, checks=[spec], inhibit_on_failure=True))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    probe(m, R1, spec).result(FAIL)
    assert forwarding(b) == {R1: 0}
    probe(m, R1, spec).result(OK)
    assert forwarding(b) == {R1: 4}


def test_misc_dynamic_sets_the_weight_the_operator_weight_stays_saved():
    spec = CheckSpec("MISC_CHECK", misc_path="x", misc_dynamic=True, retry=0)
    v = vs(rs(R1, weight=2, checks=[spec]))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    probe(m, R1, spec).result(Result(True, "exit 9", weight=7))
    assert forwarding(b) == {R1: 7}
    assert b.snapshot()["services"][0]["dests"][0]["config_weight"] == 2
    probe(m, R1, spec).result(Result(True, "exit 0"))
    assert forwarding(b) == {R1: 2}


def test_sorry_server_when_quorum_is_lost_and_back():
    spec = CheckSpec("TCP_CHECK", retry=0)
    v = vs(rs(R1, checks=[spec]), rs(R2, checks=[spec]), quorum=2,
           sorry_server=SorryServer(SORRY, 80))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    assert forwarding(b) == {R1: 1, R2: 1}
    probe(m, R1, spec).result(FAIL)
    # Quorum lost: every real server out, the sorry server in.
    assert forwarding(b) == {SORRY: 1}
    assert m.services()[0]["quorum"] == "down" and m.services()[0]["sorry_active"]
    probe(m, R1, spec).result(OK)
    assert forwarding(b) == {R1: 1, R2: 1}
    assert not m.services()[0]["sorry_active"]


def test_a_sorry_server_that_is_also_a_real_server_forwards_when_quorum_is_lost():
    """keepalived (s_svr_duplicates_rs): losing quorum takes the real
    servers out and adds the sorry server, here one of them, with weight
    1 whatever its own check says; quorum back, it is a real server
    again under its check."""
    spec = CheckSpec("TCP_CHECK", retry=0)
    v = vs(rs(R1, weight=3, checks=[spec]), rs(R2, weight=2, checks=[spec]), quorum=4,
           sorry_server=SorryServer(R2, 80))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    assert forwarding(b) == {R1: 3, R2: 2}
    probe(m, R1, spec).result(FAIL)
    assert forwarding(b) == {R2: 1} and m.services()[0]["sorry_active"]
    probe(m, R2, spec).result(FAIL)
    assert forwarding(b) == {R2: 1}
    probe(m, R1, spec).result(OK)
    probe(m, R2, spec).result(OK)
    assert forwarding(b) == {R1: 3, R2: 2} and not m.services()[0]["sorry_active"]
    # -S saves what the operator set throughout.
    assert [d["config_weight"] for d in b.snapshot()["services"][0]["dests"]] == [2, 3]


def test_sorry_server_inhibit_stays_at_weight_zero_while_quorum_holds():
    spec = CheckSpec("TCP_CHECK", retry=0)
    v = vs(rs(R1, checks=[spec]), sorry_server=SorryServer(SORRY, 80, inhibit=True))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    assert forwarding(b) == {R1: 1, SORRY: 0}
    probe(m, R1, spec).result(FAIL)
    assert forwarding(b) == {SORRY: 1}


def test_quorum_hysteresis():
    spec = CheckSpec("TCP_CHECK", retry=0)
    rss = [rs(a, checks=[spec]) for a in (R1, R2, "10.0.1.4", "10.0.1.5")]
    v = vs(*rss, quorum=3, hysteresis=1, sorry_server=SorryServer(SORRY, 80))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    assert m.services()[0]["quorum"] == "up"          # 4 >= 3 + 1
    probe(m, R1, spec).result(FAIL)
    probe(m, R2, spec).result(FAIL)
    assert m.services()[0]["quorum"] == "up"          # 2 is not below 3 - 1
    probe(m, "10.0.1.4", spec).result(FAIL)
    assert m.services()[0]["quorum"] == "down" and forwarding(b) == {SORRY: 1}
    probe(m, R1, spec).result(OK)
    probe(m, R2, spec).result(OK)
    assert m.services()[0]["quorum"] == "down"        # 3 is below 3 + 1
    probe(m, "10.0.1.4", spec).result(OK)
    assert m.services()[0]["quorum"] == "up" and SORRY not in forwarding(b)


def test_one_probe_per_real_server_and_check_shared_by_services():
    v80, v81 = vs(rs(R1), port=80), vs(rs(R1), port=81)
    b = balancer_for(v80, v81)
    m = HealthManager(b)
    m.configure([v80, v81])
    assert len(m._probes) == 1
    assert {r["shared"] for r in m.status()} == {2}
    p = probe(m, R1)
    for _ in range(3):
        p.result(FAIL)
    assert forwarding(b, 80) == {} and forwarding(b, 81) == {}


def test_configure_keeps_unchanged_probes_and_hands_back_removed_ones():
    other = CheckSpec("TCP_CHECK", connect_port=8080)
    v = vs(rs(R1), rs(R2))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    p1 = probe(m, R1)
    for _ in range(3):
        p1.result(FAIL)
        probe(m, R2).result(FAIL)
    assert forwarding(b) == {}
    # R1's check unchanged: same probe, still down. R2's check changed (it
    # checks another port): a new probe, starting up again. A real server no longer checked at all
    # is the operator's again.
    m.configure([vs(rs(R1), rs(R2, checks=[other]))])
    assert probe(m, R1) is p1 and not p1.up
    assert probe(m, R2, other).up and forwarding(b) == {R2: 1}
    m.configure([vs(rs(R2, checks=[other]))])
    assert forwarding(b) == {R1: 1, R2: 1}
    assert (R1, 80, TCP) not in m._probes


@pytest.mark.parametrize("kind, shortest, longest", [("MISC_CHECK", 0.39, 0.55),
                                                     ("TCP_CHECK", 0.69, 9)])
def test_a_misc_check_runs_every_delay_loop_from_its_start(kind, shortest, longest):
    """keepalived: a MISC_CHECK's next run is delay_loop after its last
    one started (misc_check_child_thread), the network checkers' is
    delay_loop after their result (check_api.c's epilog)."""
    starts = []

    async def slow(spec, addr, port):
        starts.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.3)
        return OK

    async def main():
        spec = CheckSpec(kind, delay_loop=0.4, misc_path="true")
        v = vs(rs(R1, checks=[spec]))
        m = HealthManager(balancer_for(v))
        m.configure([v])
        probe(m, R1, spec).check = slow
        await m.start()
        await asyncio.sleep(1.6)
        await m.stop()

    asyncio.run(main())
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps and all(shortest <= g < longest for g in gaps), gaps


def test_started_probes_run_on_the_loop_and_stop():
    calls = []
    three = None

    async def fake(spec, addr, port):
        calls.append(addr)
        if len(calls) == 3:
            three.set()
        return FAIL

    async def main():
        nonlocal three
        three = asyncio.Event()
        spec = CheckSpec("TCP_CHECK", delay_loop=0.05, retry=1, delay_before_retry=0.01)
        v = vs(rs(R1, checks=[spec]))
        b = balancer_for(v)
        m = HealthManager(b)
        m.configure([v])
        probe(m, R1, spec).check = fake
        await m.start()
        # The first run, its retry, the next: however slow the machine.
        await asyncio.wait_for(three.wait(), 10)
        await m.stop()
        n = len(calls)
        await asyncio.sleep(0.1)
        return b, n

    b, n = asyncio.run(main())
    assert 3 <= n == len(calls) and forwarding(b) == {}


# --- MISC_CHECK -------------------------------------------------------------

def misc(cmd, dynamic=False, timeout=2.0):
    return asyncio.run(check_misc.check(
        CheckSpec("MISC_CHECK", misc_path=cmd, misc_dynamic=dynamic, misc_timeout=timeout),
        R1, 80))


@pytest.mark.parametrize("code, dynamic, ok, weight", [
    (0, False, True, None), (1, False, False, None), (5, False, False, None),
    (0, True, True, None), (1, True, False, None), (2, True, True, 0), (9, True, True, 7),
    (255, True, True, 253),
])
def test_misc_exit_codes(code, dynamic, ok, weight):
    r = misc(f"{sys.executable} -c 'import sys; sys.exit({code})'", dynamic)
    assert (r.ok, r.weight) == (ok, weight)


def test_misc_timeout_kills_the_command():
    r = misc(f"{sys.executable} -c 'import time; time.sleep(30)'", timeout=0.3)
    assert not r.ok and "timeout" in r.text


@pytest.mark.parametrize("cmd, words", [
    ("/nonexistent/check", "no such file"), ("", "empty"), ("'unbalanced", "misc_path"),
])
def test_misc_bad_commands_fail_clearly(cmd, words):
    r = misc(cmd)
    assert not r.ok and words in r.text.lower()


# --- the status view -----------------------------------------------------------

def test_status_view_text_and_the_control_operation():
    from pylvs.cli.status import format_status

    spec = CheckSpec("HTTP_GET", retry=0)
    v = vs(rs(R1, checks=[spec]), rs(R2, checks=[spec]), sorry_server=SorryServer(SORRY, 80))
    b = balancer_for(v)
    # Without a HealthManager the director answers, with nothing to show.
    assert b.apply({"op": "health"}) == {"checks": [], "services": []}
    assert format_status(b.apply({"op": "health"})).startswith("no health checks")
    m = HealthManager(b)
    m.configure([v])
    p = probe(m, R1, spec)
    p.result(Result(False, "GET /: connection refused"))
    st = {"checks": m.status(), "services": m.services()}
    text = format_status(st, now=p.since + 12)
    lines = text.splitlines()
    assert lines[0] == (f"TCP {VIP}:80  quorum up (alive weight 1, quorum 1, hysteresis 0)  "
                        f"sorry server {SORRY}:80 off")
    assert lines[2].split() == ["SERVICE", "REAL", "SERVER", "CHECK", "STATE", "SINCE", "LAST",
                                "RESULT"]
    row = next(line for line in lines if f"{R1}:80" in line)
    assert "HTTP_GET" in row and " down " in row and "(12 s ago)" in row
    assert row.endswith("GET /: connection refused")
    p2 = probe(m, R2, spec)
    p2.result(FAIL)
    assert "sorry server 10.0.1.9:80 ACTIVE" in format_status(
        {"checks": m.status(), "services": m.services()})


def test_stop_ends_a_probe_whose_check_swallows_the_cancel():
    """Before Python 3.12 asyncio.wait_for may swallow a cancel; stop()
    must end the probe all the same (the director's shutdown waits on it)."""
    async def stubborn(spec, addr, port):
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass
        return OK

    async def main():
        spec = CheckSpec("TCP_CHECK", delay_loop=0.01)
        v = vs(rs(R1, checks=[spec]))
        m = HealthManager(balancer_for(v))
        m.configure([v])
        p = probe(m, R1, spec)
        p.check = stubborn
        await m.start()
        await asyncio.sleep(0.02)
        await asyncio.wait_for(m.stop(), 2)
        return p

    # In a thread of its own: a stop() that never ends must fail the test,
    # not hang it.
    import threading

    box = []
    t = threading.Thread(target=lambda: box.append(asyncio.run(main())), daemon=True)
    t.start()
    t.join(10)
    assert box and box[0].task is None


def test_dr_real_server_is_the_service_port_dest_whatever_port_it_is_checked_on():
    spec = CheckSpec("TCP_CHECK", retry=0)
    v = VirtualServer("TCP", VIP, 80, lvs_method="DR", sorry_server=SorryServer(SORRY, 8080),
                      real_servers=(RealServer(R1, 8080, checks=(spec,)),))
    b = Balancer(Counters(max_services=8, max_dests=16))
    b.add_service("tcp", VIP, 80, sched="rr")
    b.add_dest("tcp", VIP, 80, R1, 80, fwd="route")
    m = HealthManager(b)
    m.configure([v])
    assert probe_at(m, R1, 8080, spec).port == 8080
    probe_at(m, R1, 8080, spec).result(FAIL)
    # Out, and the sorry server in on the service's port, routed.
    snap = b.snapshot()["services"][0]["dests"]
    assert {(d["daddr"], d["dport"], d["fwd"], d["forwarding"]) for d in snap} == {
        (R1, 80, "route", False), (SORRY, 80, "route", True)}


def probe_at(m, addr, port, spec):
    return m._probes[(addr, port, spec)]


def test_a_change_of_several_dests_is_one_publish():
    """Quorum lost: the sorry server in and every real server out reach
    the data path as one table; configure() with alpha checks publishes
    once too, so no alpha dest forwards before its checks pass."""
    spec = CheckSpec("TCP_CHECK", retry=0)
    alpha = CheckSpec("TCP_CHECK", alpha=True)
    v = vs(rs(R1, checks=[spec]), rs(R2, checks=[spec]), rs("10.0.1.4", checks=[spec]),
           quorum=3, sorry_server=SorryServer(SORRY, 80))
    tables = []
    b = balancer_for(v)
    b.publish = lambda s, d: tables.append(d)
    m = HealthManager(b)
    m.configure([v])
    tables.clear()
    probe(m, R1, spec).result(FAIL)
    assert len(tables) == 1 and forwarding(b) == {SORRY: 1}
    va = vs(rs(R1, checks=[alpha]), rs(R2, checks=[alpha]))
    b2 = balancer_for()
    b2.add_service("tcp", VIP, 80, sched="rr")
    published = []
    b2.publish = lambda s, d: published.append(d.copy())
    with b2.held():
        for r in va.real_servers:
            b2.add_dest("tcp", VIP, 80, r.addr, 80, fwd="masq")
        HealthManager(b2).configure([va])
    assert len(published) == 1 and forwarding(b2) == {}


def test_the_verdicts_of_one_turn_of_the_loop_are_one_publish():
    """40 real servers behind a dead switch, their probes failing on the
    same turn of the loop: one publish, not 40 (each costs every worker's
    tables and filters; 200 of them held the director's loop for 17 s)."""
    spec = CheckSpec("TCP_CHECK", retry=0, warmup=0, delay_loop=60)
    v = vs(*(rs(f"10.0.1.{i}", checks=[spec]) for i in range(10, 50)), quorum=1)
    b = Balancer(Counters(max_services=8, max_dests=64))
    b.add_service("tcp", VIP, 80, sched="rr")
    for r in v.real_servers:
        b.add_dest("tcp", VIP, 80, r.addr, 80, fwd="masq")
    m = HealthManager(b)
    m.configure([v])
    tables = []
    b.publish = lambda s, d: tables.append(d)

    async def fail(spec, addr, port):
        return FAIL

    async def main():
        for p in m._probes.values():
            p.check = fail
        await m.start()
        for _ in range(100):
            if all(p.has_run for p in m._probes.values()):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        await m.stop()

    asyncio.run(main())
    assert forwarding(b) == {} and m.services()[0]["quorum"] == "down"
    assert len(tables) == 1, len(tables)


def test_notify_and_quorum_commands_run_on_changes(tmp_path):
    log = tmp_path / "events"

    def cmd(word):
        return f"{sys.executable} -c \"open('{log}', 'a').write('{word}\\n')\""

    spec = CheckSpec("TCP_CHECK", retry=0)
    v = vs(rs(R1, checks=[spec], notify_up=cmd("rs-up"), notify_down=cmd("rs-down")),
           quorum_up=cmd("quorum-up"), quorum_down=cmd("quorum-down"))

    async def main():
        m = HealthManager(balancer_for(v))
        m.configure([v])
        p = probe(m, R1, spec)
        p.result(FAIL)
        await asyncio.sleep(0.01)
        p.result(OK)
        for _ in range(200):
            if log.exists() and len(log.read_text().split()) == 4:
                break
            await asyncio.sleep(0.05)
        await m.stop()

    asyncio.run(main())
    # No command at the start (nothing changed); then in the order of the
    # changes, the real server's before the quorum's (ipwrapper.c).
    assert log.read_text().split() == ["rs-down", "quorum-down", "rs-up", "quorum-up"]


def test_a_check_that_never_ends_fails_after_its_budget():
    from pylvs.health.manager import verdict_budget

    async def forever(spec, addr, port):
        await asyncio.sleep(3600)

    async def main():
        spec = CheckSpec("HTTP_GET", delay_loop=0.1, connect_timeout=0.05, retry=0)
        v = vs(rs(R1, checks=[spec]))
        b = balancer_for(v)
        m = HealthManager(b)
        m.configure([v])
        p = probe(m, R1, spec)
        p.check = forever
        await m.start()
        for _ in range(100):
            if not p.up:
                break
            await asyncio.sleep(0.02)
        await m.stop()
        return b, p

    b, p = asyncio.run(main())
    assert not p.up and p.text == "no verdict within 0.15 s" and forwarding(b) == {}
    assert verdict_budget(CheckSpec("MISC_CHECK", delay_loop=2, misc_timeout=10)) == 10 + 2 + 5


def test_a_checker_whose_timings_change_keeps_its_verdict():
    """As keepalived's migrate_checkers: a reload that changes retry or
    delay_loop does not bring a dead real server back; a changed target
    (another url) is a new check, which starts up."""
    v = vs(rs(R1), rs(R2))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    for _ in range(3):
        probe(m, R1).result(FAIL)
    assert forwarding(b) == {R2: 1}
    slower = CheckSpec("TCP_CHECK", delay_loop=30, retry=5, delay_before_retry=2)
    m.configure([vs(rs(R1, checks=[slower]), rs(R2))])
    p = probe(m, R1, slower)
    assert not p.up and "refused" in p.text and forwarding(b) == {R2: 1}
    # Still a check of its own: its retries count afresh from here.
    assert p.retry_it == 0 and p.result(OK) == 30 and forwarding(b) == {R1: 1, R2: 1}
    other = CheckSpec("TCP_CHECK", connect_port=81)
    for _ in range(6):
        p.result(FAIL)
    m.configure([vs(rs(R1, checks=[other]), rs(R2))])
    assert probe(m, R1, other).up and forwarding(b) == {R1: 1, R2: 1}


@pytest.mark.parametrize("desc,new_retry,retry_it,fails_to_down", [
    ("delay_loop alone changed: the retries used carry over", 3, 2, 2),
    ("fewer retries than used: one short of the new count", 2, 1, 2),
    ("retry 0: down on the next failure", 0, 0, 1),
])
def test_a_reload_mid_retries_keeps_the_retries_used(desc, new_retry, retry_it, fails_to_down):
    """keepalived's migrate_checkers carries retry_it over to a checker
    whose timings changed (capped at the new retry - 1): a reload while a
    server fails its retries does not give it a fresh set."""
    spec = CheckSpec("TCP_CHECK", delay_loop=6, retry=3, delay_before_retry=1)
    v = vs(rs(R1, checks=[spec]), rs(R2))
    b = balancer_for(v)
    m = HealthManager(b)
    m.configure([v])
    probe(m, R1, spec).result(OK)
    probe(m, R1, spec).result(FAIL)
    probe(m, R1, spec).result(FAIL)
    assert probe(m, R1, spec).retry_it == 2 and forwarding(b) == {R1: 1, R2: 1}
    m.configure([v])        # unchanged: the same probe, its count with it
    assert probe(m, R1, spec).retry_it == 2
    changed = replace(spec, delay_loop=7, retry=new_retry)
    m.configure([vs(rs(R1, checks=[changed]), rs(R2))])
    p = probe(m, R1, changed)
    assert p.up and p.retry_it == retry_it
    for _ in range(fails_to_down - 1):
        assert p.result(FAIL) == 1 and forwarding(b) == {R1: 1, R2: 1}
    assert p.result(FAIL) == 7 and forwarding(b) == {R2: 1}
