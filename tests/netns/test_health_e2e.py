"""Health checks end to end (issue 9 items 1, 5, 7, 8): `pylvs run -c
keepalived.conf` with an HTTP_GET-checked service in a VS-NAT lab (rs1, rs2 real servers, rs3 the
sorry server). A real server's HTTP server dies: the director stops
forwarding to it within one delay_loop plus the retries, `pylvs status`
says why, `-S` still saves it; both die: the sorry server answers; one
comes back: it forwards again and the sorry server leaves; a reload
changing the checks' timings in between keeps the dead server out. With 1
and 2 workers."""

from __future__ import annotations

import json
import subprocess

import pytest

from pylvs.lab import health

DELAY, TIMEOUT, RETRY, DBR = 0.5, 0.5, 1, 0.3


def bound(retry: int) -> float:
    """keepalived's bound for a dead server's removal, plus polling and a
    loaded machine's slack."""
    return DELAY + retry * (DBR + TIMEOUT) + TIMEOUT + 1.5


BOUND = bound(RETRY + 1)   # after the reload below, one retry more


def whoami(lab, n: int = 8) -> set[str]:
    out = set()
    for _ in range(n):
        p = lab.curl("/whoami", "-H", "Connection: close", check=False, max_time=3)
        if p.returncode == 0:
            out.add(p.stdout.strip())
    return out


@pytest.mark.parametrize("workers", [1, 2], indirect=True)
def test_real_server_dies_leaves_and_comes_back_with_the_sorry_server(director_lab, workers):
    lab = director_lab(servers=3, start=False)
    # Timed looks go through the control socket: a `pylvs adm` process per
    # look costs a second on a loaded machine.
    ctl = f"/run/pylvs/{lab.name}.sock"
    health.start_director(lab, "--workers", str(workers), "--control", ctl,
                          timings=(DELAY, TIMEOUT, RETRY, DBR))
    rs1, rs2, sorry = lab.rips
    assert health.wait_for(lab, lambda f: f == {rs1: 1, rs2: 1}, 5, control=ctl) is not None
    assert whoami(lab) == {"rs1", "rs2"}

    took = health.removal_time(lab, 0, timeout=10, control=ctl, step=0.02)
    print(f"death to removal: {took:.2f} s (bound {bound(RETRY):.2f} s)")
    assert took is not None and took <= bound(RETRY)
    listing = lab.adm("-L", "-n", "--control", ctl)
    assert f"-> {rs2}:80 " in listing and rs1 not in listing
    assert whoami(lab) == {"rs2"}
    # The operator's rules still hold rs1; the status view says why it is out.
    assert f"-a -t {lab.vip}:80 -r {rs1}:80 -m -w 1" in lab.adm("-S", "-n", "--control", ctl)
    st = json.loads(lab.run(lab.director, lab.pylvs_argv("status", "--json", "--control",
                                                         ctl)).stdout)
    row = next(c for c in st["checks"] if c["real_server"] == f"{rs1}:80")
    assert row["state"] == "down" and "refused" in row["result"] and row["kind"] == "HTTP_GET"
    assert st["not_in_table"] == []
    text = lab.run(lab.director, lab.pylvs_argv("status", "--control", ctl)).stdout
    assert f"{rs1}:80" in text and "down" in text and "quorum up" in text

    # A reload that changes the checks' timings keeps rs1's verdict
    # (keepalived's migrate_checkers): it does not come back meanwhile.
    conf = lab.log_path("keepalived").with_suffix(".conf")
    conf.write_text(health.keepalived_conf([rs1, rs2], sorry, DELAY, TIMEOUT, RETRY + 1, DBR))
    lab.run(lab.director, lab.pylvs_argv("reload", "--control", ctl))
    assert health.wait_for(lab, lambda f: rs1 in f, 1.0, control=ctl) is None

    # Quorum lost: the sorry server takes the clients.
    health.stop_httpd(lab, 1)
    assert health.wait_for(lab, lambda f: f == {sorry: 1}, BOUND, control=ctl) is not None
    assert whoami(lab, 4) == {"rs3"}
    assert sorry not in lab.adm("-S", "-n", "--control", ctl)

    # rs1 back: forwarding to it again, the sorry server gone.
    health.start_httpd(lab, 0)
    assert health.wait_for(lab, lambda f: f == {rs1: 1}, BOUND, control=ctl) is not None
    assert whoami(lab, 4) == {"rs1"}


def test_the_lab_config_is_the_shipped_keepalived_conf():
    from pathlib import Path

    from pylvs.lab.topology import Lab

    lab = Lab("unused", servers=3)
    shipped = Path(__file__).parents[2] / "netns-labs/health/keepalived.conf"
    assert shipped.read_text() == health.keepalived_conf(lab.rips[:-1], lab.rips[-1])
