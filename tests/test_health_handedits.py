"""An operator's hand edits of dests the health checks watch (docs/health.md
"What happens to a real server"): -e sets the configured weight whatever
the health; -d then -a of a real server the checks found dead must not
put it back into forwarding (pylvs adm -L would list a dest that
`pylvs status` calls down, and it would stay so while the check keeps
failing, since the checks only speak on a change)."""

from __future__ import annotations

import pytest

from pylvs.config.model import CheckSpec, RealServer, VirtualServer
from pylvs.control.balancer import Balancer
from pylvs.engine.tables import Counters
from pylvs.health.check_api import Result
from pylvs.health.manager import HealthManager

VIP, R1, R2 = "10.0.0.1", "10.0.1.2", "10.0.1.3"
TCP = CheckSpec("TCP_CHECK", delay_loop=6, retry=0)
OK, FAIL = Result(True, "ok"), Result(False, "refused")


def setup(**rs_kw):
    v = VirtualServer("TCP", VIP, 80, lvs_sched="rr", real_servers=(
        RealServer(R1, 80, weight=3, checks=(TCP,), **rs_kw),
        RealServer(R2, 80, weight=2, checks=(TCP,))))
    b = Balancer(Counters(max_services=4, max_dests=8))
    b.add_service("tcp", VIP, 80, sched="rr")
    for r in v.real_servers:
        b.add_dest("tcp", VIP, 80, r.addr, 80, fwd="masq", weight=r.weight)
    m = HealthManager(b)
    m.configure([v])
    return b, m, m._probes[(R1, 80, TCP)]


def forwarding(b: Balancer) -> dict[str, int]:
    svc = b.snapshot()["services"][0]
    return {d["daddr"]: d["weight"] for d in svc["dests"] if d["forwarding"]}


@pytest.mark.parametrize("desc, rs_kw, while_down", [
    ("removed on failure", {}, {R2: 2}),
    ("inhibit_on_failure", {"inhibit_on_failure": True}, {R1: 0, R2: 2}),
])
def test_delete_and_add_by_hand_keeps_a_dead_real_server_under_its_check(desc, rs_kw, while_down):
    b, m, p = setup(**rs_kw)
    p.result(FAIL)
    assert forwarding(b) == while_down
    b.del_dest("tcp", VIP, 80, R1, 80)
    b.add_dest("tcp", VIP, 80, R1, 80, fwd="masq", weight=7)
    assert forwarding(b) == while_down, desc
    p.result(OK)            # the check passes: in, with the operator's new weight
    assert forwarding(b) == {R1: 7, R2: 2}


def test_delete_and_add_by_hand_of_a_live_real_server_forwards_at_once():
    b, m, p = setup()
    p.result(FAIL)
    p.result(OK)
    b.del_dest("tcp", VIP, 80, R1, 80)
    b.add_dest("tcp", VIP, 80, R1, 80, fwd="masq", weight=5)
    assert forwarding(b) == {R1: 5, R2: 2}


def test_a_dest_the_checks_no_longer_watch_is_added_as_the_operator_says():
    b, m, p = setup()
    p.result(FAIL)
    b.del_dest("tcp", VIP, 80, R1, 80)
    m.configure([])         # a reload drops the checks: handed back
    b.add_dest("tcp", VIP, 80, R1, 80, fwd="masq", weight=4)
    assert forwarding(b) == {R1: 4, R2: 2}


def test_edit_by_hand_of_a_dead_real_server_applies_when_it_comes_back():
    b, m, p = setup()
    p.result(FAIL)
    b.edit_dest("tcp", VIP, 80, R1, 80, weight=9)
    assert forwarding(b) == {R2: 2}
    p.result(OK)
    assert forwarding(b) == {R1: 9, R2: 2}


def test_a_reloads_new_checker_of_a_dead_real_server_goes_down_on_one_failure():
    # keepalived's migrate_checkers: the new checker of a server that is
    # down needs no retries to take it out again.
    b, m, p = setup()
    p.result(FAIL)
    assert forwarding(b) == {R2: 2}
    http = CheckSpec("HTTP_GET", delay_loop=6, retry=3)
    v = VirtualServer("TCP", VIP, 80, lvs_sched="rr", real_servers=(
        RealServer(R1, 80, weight=3, checks=(http,)), RealServer(R2, 80, weight=2, checks=(TCP,))))
    m.configure([v])
    # Its only checker replaced, none failed: back in, as keepalived puts it.
    assert forwarding(b) == {R1: 3, R2: 2}
    new = m._probes[(R1, 80, http)]
    assert new.result(FAIL) == 6      # the next in delay_loop: no retry
    assert forwarding(b) == {R2: 2}
    # The live one's new checker keeps its retries.
    http2 = CheckSpec("HTTP_GET", delay_loop=6, retry=3, delay_before_retry=1)
    v2 = VirtualServer("TCP", VIP, 80, lvs_sched="rr", real_servers=(
        RealServer(R1, 80, weight=3, checks=(http,)), RealServer(R2, 80, weight=2, checks=(http2,))))
    m.configure([v2])
    assert m._probes[(R2, 80, http2)].result(FAIL) == 1
    assert forwarding(b) == {R2: 2}


def test_status_leaves_out_what_the_operator_deleted_by_hand_and_says_so():
    """`pylvs status` lists what is in the tables: a service deleted by
    hand (-D) or a real server (-d) is named once as such, not listed
    with its checks as if it were balanced; added again, it is back."""
    from pylvs.cli.status import format_status

    b, m, p = setup()
    b.add_service("tcp", VIP, 81, sched="rr")
    b.add_dest("tcp", VIP, 81, R1, 80, fwd="masq", weight=1)
    v80 = m._services[("TCP", VIP, 80, 0)].vs
    v81 = VirtualServer("TCP", VIP, 81, lvs_sched="rr", real_servers=(
        RealServer(R1, 80, weight=1, checks=(TCP,)),))
    m.configure([v80, v81])
    assert len(m.view()["checks"]) == 3 and m.view()["not_in_table"] == []
    b.del_service("tcp", VIP, 81)
    b.del_dest("tcp", VIP, 80, R2, 80)
    view = m.view()
    assert [(c["service"], c["real_server"]) for c in view["checks"]] == [
        (f"TCP {VIP}:80", f"{R1}:80")]
    assert [s["service"] for s in view["services"]] == [f"TCP {VIP}:80"]
    assert view["not_in_table"] == [f"TCP {VIP}:80 -> {R2}:80", f"TCP {VIP}:81"]
    text = format_status(view)
    assert f"TCP {VIP}:81" not in text.split("deleted by hand")[0]
    assert text.splitlines()[-2:] == [f"  TCP {VIP}:80 -> {R2}:80", f"  TCP {VIP}:81"]
    # The checks go on (R1's probe is shared with the deleted service).
    assert m._probes[(R1, 80, TCP)] is p
    b.add_service("tcp", VIP, 81, sched="rr")
    b.add_dest("tcp", VIP, 81, R1, 80, fwd="masq", weight=1)
    b.add_dest("tcp", VIP, 80, R2, 80, fwd="masq", weight=2)
    assert len(m.view()["checks"]) == 3 and m.view()["not_in_table"] == []
    # Everything deleted: still not "no health checks".
    b.clear()
    assert format_status(m.view()).startswith("deleted by hand")
