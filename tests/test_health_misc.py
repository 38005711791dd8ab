"""MISC_CHECK's command as keepalived runs it: the verdict is the
command's exit (a background process it leaves behind holding the output
neither delays nor fails the check), its output is drained however much
it prints, and no command outlives its check: a check cancelled by a
reload or a stop kills the command's process group."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from pylvs.config.model import CheckSpec
from pylvs.health import check_misc


def spec(cmd: str, timeout: float = 5.0) -> CheckSpec:
    return CheckSpec("MISC_CHECK", misc_path=cmd, misc_timeout=timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:   # reaped between the kill and the read
        return False


def gone(pid: int, within: float = 2.5) -> bool:
    """Is ``pid`` dead within ``within`` s? (Blocks: the loop, if any,
    does not turn meanwhile.) Killed with SIGKILL if not."""
    end = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > end:
            os.kill(pid, 9)
            return False
        time.sleep(0.02)
    return True


def test_a_background_child_holding_the_output_does_not_fail_the_check(tmp_path):
    pidfile = tmp_path / "child"
    # The shell exits 0 at once; its child keeps stdout open for 30 s.
    cmd = f"sh -c 'echo checked; sleep 30 & echo $! > {pidfile}; exit 0'"
    t = time.monotonic()
    r = asyncio.run(check_misc.check(spec(cmd), "10.0.1.2", 80))
    took = time.monotonic() - t
    child = int(pidfile.read_text())
    try:
        assert r.ok and r.text == "exit 0: checked", r
        assert took < 2.0
        assert alive(child)     # left running, as keepalived leaves it
    finally:
        os.kill(child, 9)


def test_megabytes_of_output_are_drained_and_the_last_line_kept():
    cmd = (f"{sys.executable} -c \"import sys; sys.stdout.write('x' * (8 << 20));"
           f" print(); print('last'); sys.exit(3)\"")
    r = asyncio.run(check_misc.check(spec(cmd), "10.0.1.2", 80))
    assert not r.ok and r.text == "exit 3: last"


def test_a_cancelled_check_kills_its_command(tmp_path):
    pidfile = tmp_path / "pid"
    cmd = f"sh -c 'echo $$ > {pidfile}; exec sleep 60'"

    async def main() -> None:
        task = asyncio.ensure_future(check_misc.check(spec(cmd, timeout=60), "10.0.1.2", 80))
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    assert gone(int(pidfile.read_text())), "the command outlived its cancelled check"


def test_stopping_the_manager_kills_a_notify_command_still_running(tmp_path):
    from pylvs.config.model import RealServer, VirtualServer
    from pylvs.control.balancer import Balancer
    from pylvs.engine.tables import Counters
    from pylvs.health.check_api import Result
    from pylvs.health.manager import HealthManager

    pidfile = tmp_path / "pid"
    tcp = CheckSpec("TCP_CHECK", retry=0)
    v = VirtualServer("TCP", "10.0.0.1", 80, real_servers=(RealServer(
        "10.0.1.2", 80, checks=(tcp,),
        notify_down=f"sh -c 'echo $$ > {pidfile}; exec sleep 60'"),))
    b = Balancer(Counters(max_services=2, max_dests=4))
    b.add_service("tcp", "10.0.0.1", 80)
    b.add_dest("tcp", "10.0.0.1", 80, "10.0.1.2", 80, fwd="masq")

    async def main() -> bool:
        m = HealthManager(b)
        m.configure([v])
        m._probes[("10.0.1.2", 80, tcp)].result(Result(False, "refused"))
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            await asyncio.sleep(0.05)
        await m.stop()
        # The loop does not turn again from here (asyncio.run's own
        # cleanup would reap the task): stop() itself must have.
        return gone(int(pidfile.read_text()))

    assert asyncio.run(main()), "the notify command outlived the manager's stop()"


@pytest.mark.parametrize("command, words", [("  ", "no command"),
                                            ("/bin/echo 'down", "no closing quotation")])
def test_a_notify_command_that_cannot_run_is_logged_not_raised(caplog, command, words):
    """The parser refuses these; a HealthManager given them by other means
    logs them rather than leaving an exception no one retrieves."""
    from pylvs.health.manager import _run_notify

    asyncio.run(_run_notify(command, None))
    assert any(words in r.getMessage().lower() for r in caplog.records), caplog.records


def test_a_command_that_cannot_be_run_fails_clearly_and_leaks_no_pipe():
    before = len(os.listdir("/proc/self/fd"))
    for cmd, words in [("/nonexistent/check", "no such file"), ("bad\0name", "null byte"),
                       ("/etc", "permission denied")]:
        r = asyncio.run(check_misc.check(spec(cmd), "10.0.1.2", 80))
        assert not r.ok and words in r.text.lower(), (cmd, r)
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_output_line_in_the_result_has_no_control_characters():
    cmd = "printf '\\033[31mred\\033[0m\\tdone\\a\\n'"
    r = asyncio.run(check_misc.check(spec(f"sh -c \"{cmd}\""), "10.0.1.2", 80))
    assert r.ok and r.text == "exit 0: ?[31mred?[0m?done?", r


def test_a_timeout_sends_sigterm_first_then_sigkill_to_what_ignores_it(tmp_path, monkeypatch):
    """keepalived's misc_check_child_thread: SIGTERM to the command's
    group at the timeout (a script may clean up), SIGKILL to the group
    2 s later, or as soon as the command is gone (its children too)."""
    monkeypatch.setattr(check_misc, "TERM_GRACE", 0.5)
    cleaned, pidfile = tmp_path / "cleaned", tmp_path / "child"
    polite = f"sh -c 'trap \"echo bye > {cleaned}; exit 1\" TERM; sleep 30 & wait'"
    t = time.monotonic()
    r = asyncio.run(check_misc.check(spec(polite, timeout=0.3), "10.0.1.2", 80))
    assert not r.ok and r.text.startswith("timeout after 0.3 s")
    assert cleaned.read_text() == "bye\n" and time.monotonic() - t < 1.5
    # Ignores SIGTERM: killed after the grace, with the child it started.
    stubborn = f"sh -c 'trap \"\" TERM; sleep 30 & echo $! > {pidfile}; wait; sleep 30'"
    t = time.monotonic()
    r = asyncio.run(check_misc.check(spec(stubborn, timeout=0.3), "10.0.1.2", 80))
    took = time.monotonic() - t
    assert not r.ok and "timeout" in r.text and 0.75 <= took < 2.0
    assert gone(int(pidfile.read_text()), within=1.0)


@pytest.mark.parametrize("omega", [True, False])
def test_omega_runs_the_down_commands_as_the_director_stops(tmp_path, omega):
    """keepalived's omega: at shutdown, each real server in the pool runs
    its notify_down and the service its quorum_down (each killed after
    1 s); a real server already down is not notified again; without
    omega nothing runs."""
    from pylvs.config.model import RealServer, VirtualServer
    from pylvs.control.balancer import Balancer
    from pylvs.engine.tables import Counters
    from pylvs.health.check_api import Result
    from pylvs.health.manager import HealthManager

    log, pid = tmp_path / "log", tmp_path / "pid"
    tcp = CheckSpec("TCP_CHECK", retry=0)

    def note(word):
        return f"sh -c 'echo {word} >> {log}'"
    v = VirtualServer("TCP", "10.0.0.1", 80, omega=omega, quorum_down=note("quorum_down"),
                      real_servers=tuple(
                          RealServer(a, 80, checks=(tcp,), notify_down=note(a))
                          for a in ("10.0.1.2", "10.0.1.3")) + (RealServer(
                              "10.0.1.4", 80, checks=(tcp,),
                              notify_down=f"sh -c 'sleep 30 & echo $! > {pid}; wait'"),))
    b = Balancer(Counters(max_services=2, max_dests=4))
    b.add_service("tcp", "10.0.0.1", 80)
    for r in v.real_servers:
        b.add_dest("tcp", "10.0.0.1", 80, r.addr, 80, fwd="masq")

    async def main() -> float:
        m = HealthManager(b)
        m.configure([v])
        m._probes[("10.0.1.3", 80, tcp)].result(Result(False, "refused"))
        for _ in range(100):
            if log.exists():
                break
            await asyncio.sleep(0.02)
        t = time.monotonic()
        await m.stop()
        return time.monotonic() - t

    took = asyncio.run(main())
    lines = log.read_text().split()
    assert lines[0] == "10.0.1.3"       # its own notify_down, when it died
    if omega:
        assert sorted(lines[1:]) == ["10.0.1.2", "quorum_down"]
        assert 0.9 < took < 3           # the hung one is killed after 1 s
        # With what it started (SIGKILLed: gone within moments, not at once).
        assert gone(int(pid.read_text()))
    else:
        assert lines == ["10.0.1.3"] and took < 0.9
