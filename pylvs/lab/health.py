"""The health-check lab (netns-labs/health/, tests/netns/test_health_e2e.py,
bench/health.py): `pylvs run -c keepalived.conf` in a VS-NAT lab, one HTTP
service whose real servers rs1..rsN-1 are checked with HTTP_GET and rsN is
the sorry server. ``keepalived_conf()`` writes the configuration
(netns-labs/health/keepalived.conf is its default);
``python -m pylvs.lab.health check`` builds a lab, tells the lab's story
(netns-labs/health/README.md) and removes it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from .topology import HTTP_PORT, UDP_PORT, VIP, LabError, _repo_root, wait_for_file, wait_for_line

# delay_loop, connect_timeout, retry, delay_before_retry of the lab's checks.
TIMINGS = (1.0, 1.0, 1, 0.5)


def _num(x: float) -> str:
    return f"{x:g}"


def keepalived_conf(rips: list[str], sorry: str | None, delay_loop: float = TIMINGS[0],
                    connect_timeout: float = TIMINGS[1], retry: int = TIMINGS[2],
                    delay_before_retry: float = TIMINGS[3], inhibit: bool = False) -> str:
    """The lab's keepalived.conf: one virtual server on the lab's VIP:80."""
    lines = ["# The health lab's director (netns-labs/health/README.md):",
             "#   pylvs run -c keepalived.conf --iface eth0 --iface eth1",
             f"virtual_server {VIP} {HTTP_PORT} {{",
             f"    delay_loop {_num(delay_loop)}",
             "    lvs_sched rr",
             "    lvs_method NAT",
             "    protocol TCP",
             "    quorum 1"]
    if sorry:
        lines.append(f"    sorry_server {sorry} {HTTP_PORT}")
    for rip in rips:
        lines += [f"    real_server {rip} {HTTP_PORT} {{",
                  "        weight 1"]
        if inhibit:
            lines.append("        inhibit_on_failure")
        lines += ["        HTTP_GET {",
                  "            url {",
                  "                path /health",
                  "                status_code 200",
                  "            }",
                  f"            connect_timeout {_num(connect_timeout)}",
                  f"            retry {retry}",
                  f"            delay_before_retry {_num(delay_before_retry)}",
                  "        }",
                  "    }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- driving a lab from outside (tests, the lab's check) ---------------------


def start_director(lab, *extra: str, timings: tuple = TIMINGS, inhibit: bool = False,
                   timeout: float = 20.0) -> subprocess.Popen:
    """`pylvs run -c keepalived.conf` in ``lab``'s director namespace, its
    real servers rs1..rsN-1 and rsN the sorry server, the checks with
    ``timings`` (delay_loop, connect_timeout, retry, delay_before_retry);
    waits for "ready"."""
    conf = lab.log_path("keepalived").with_suffix(".conf")
    conf.write_text(keepalived_conf(lab.rips[:-1], lab.rips[-1], *timings, inhibit=inhibit))
    log = lab.log_path("director")
    argv = lab.pylvs_argv("run", "-c", str(conf), *lab.run_args(), *extra)
    with open(log, "wb") as err:
        p = lab.popen(lab.director, argv, key="director", stdout=err, stderr=err,
                      stdin=subprocess.DEVNULL, start_new_session=True)
    if not wait_for_file(log, " ready: ", timeout, proc=p):
        lab.stop_director()
        raise LabError(f"the health lab's director is not ready:\n{lab.director_log()[-3000:]}")
    return p


def stop_httpd(lab, i: int) -> None:
    """Kill real server i's HTTP server (0-based)."""
    lab.stop(f"httpd-{lab.rs_names[i]}", timeout=2.0)


def start_httpd(lab, i: int, timeout: float = 10.0) -> None:
    """Real server i's HTTP server again (as Lab.start_real_servers)."""
    name = lab.rs_names[i]
    p = lab.popen(lab.rs[i], [lab.python, "-m", "pylvs.lab.httpd", "--name", name, "--port",
                              str(HTTP_PORT), "--udp-port", str(UDP_PORT)],
                  key=f"httpd-{name}", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                  stdin=subprocess.DEVNULL, cwd=_repo_root(), start_new_session=True)
    if not wait_for_line(p, "ready", timeout):
        raise LabError(f"httpd in {name} did not become ready")


_DEST = re.compile(r"^  -> (\d+\.\d+\.\d+\.\d+):\d+\s+\S+\s+(\d+)", re.M)


def forwarding(lab, control: str | None = None) -> dict[str, int]:
    """{real server address: weight} of what forwards: `pylvs adm -L -n`,
    or with ``control`` (the director's --control path) the same from its
    snapshot, without a process per look (for timing)."""
    if control is None:
        return {a: int(w) for a, w in _DEST.findall(lab.adm("-L", "-n"))}
    from ..control import rpc

    with rpc.Client(control) as c:
        snap = c.call({"op": "snapshot"})
    return {d["daddr"]: d["weight"] for s in snap["services"] for d in s["dests"]
            if d.get("forwarding", True)}


def wait_for(lab, want, timeout: float, step: float = 0.05,
             control: str | None = None) -> float | None:
    """Poll ``forwarding(lab, control)`` until ``want(it)`` is true; the
    seconds it took, None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if want(forwarding(lab, control)):
            return time.monotonic() - t0
        time.sleep(step)
    return None


def removal_time(lab, i: int, timeout: float = 30.0, control: str | None = None,
                 step: float = 0.05) -> float | None:
    """Kill real server i's HTTP server; seconds from the kill until the
    director stops forwarding to it, None after ``timeout``."""
    rip = lab.rips[i]
    t0 = time.monotonic()
    stop_httpd(lab, i)
    took = wait_for(lab, lambda f: rip not in f, timeout, step, control)
    return None if took is None else time.monotonic() - t0


def return_time(lab, i: int, timeout: float = 30.0, control: str | None = None,
                step: float = 0.05) -> float | None:
    """Start real server i's HTTP server; seconds from its "ready" until
    the director forwards to it again, None after ``timeout``."""
    rip = lab.rips[i]
    start_httpd(lab, i)
    return wait_for(lab, lambda f: rip in f, timeout, step, control)


def _requests(lab, n: int) -> dict[str, int]:
    """n HTTP requests to the VIP, one connection each: answers per real server."""
    counts: dict[str, int] = {}
    for _ in range(n):
        p = lab.curl("/whoami", "-H", "Connection: close", check=False, max_time=3)
        who = p.stdout.strip() if p.returncode == 0 else f"curl error {p.returncode}"
        counts[who] = counts.get(who, 0) + 1
    return dict(sorted(counts.items()))


def check_main(argv: list[str]) -> int:
    """The lab's one-command check (netns-labs/health/lab.sh): up, the
    story, down. Exit status 0 when every step did what it should."""
    from .topology import Lab

    ap = argparse.ArgumentParser(prog="python -m pylvs.lab.health check")
    ap.add_argument("--name", default=f"hl{os.getpid()}")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    d, t, r, b = TIMINGS
    bound = d + r * (b + t) + t
    lab = Lab(a.name, servers=3)
    failed = []

    def step(title: str, ok: bool, detail: str = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {title}" + (f": {detail}" if detail else ""))
        if not ok:
            failed.append(title)

    # Looks go through an explicit control socket, polled from here: a
    # `pylvs adm` process per look would blur the timings on a busy machine.
    ctl = f"/run/pylvs/{lab.name}.sock"

    def show(*args: str) -> None:
        print(f"# pylvs {' '.join(args)}")
        print(lab.run(lab.director, lab.pylvs_argv(*args, "--control", ctl)).stdout.rstrip())

    try:
        lab.up()
        start_director(lab, "--workers", str(a.workers), "--control", ctl)
        print(f"# {lab.log_path('keepalived').with_suffix('.conf')}")
        print(keepalived_conf(lab.rips[:-1], lab.rips[-1]), end="")
        rs1, rs2, sorry = lab.rips
        step("rs1 and rs2 forward",
             wait_for(lab, lambda f: f == {rs1: 1, rs2: 1}, 5, control=ctl) is not None)
        show("adm", "-L", "-n")
        step("requests reach rs1 and rs2", set(_requests(lab, 10)) == {"rs1", "rs2"})
        took = removal_time(lab, 0, bound + 5, control=ctl, step=0.02)
        step("rs1's HTTP server killed: rs1 leaves", took is not None and took <= bound + 1,
             f"{took:.2f} s after the kill (bound {bound:.1f} s)" if took else "never")
        show("adm", "-L", "-n")
        show("status")
        step("requests reach rs2 only", set(_requests(lab, 6)) == {"rs2"})
        step("-S still saves rs1", f"-r {rs1}:80 -m -w 1" in lab.adm("-S", "-n", "--control", ctl))
        stop_httpd(lab, 1)
        step("rs2 killed too: the sorry server (rs3) takes the clients",
             wait_for(lab, lambda f: f == {sorry: 1}, bound + 5, control=ctl) is not None)
        show("adm", "-L", "-n")
        step("requests reach rs3 only", set(_requests(lab, 6)) == {"rs3"}, str(_requests(lab, 2)))
        start_httpd(lab, 0)
        took = wait_for(lab, lambda f: f == {rs1: 1}, d + t + 5, control=ctl, step=0.02)
        step("rs1's HTTP server back: rs1 forwards, the sorry server leaves", took is not None,
             f"{took:.2f} s after its start" if took is not None else "never")
        show("adm", "-L", "-n")
        show("status")
        step("requests reach rs1 only", set(_requests(lab, 6)) == {"rs1"})
    finally:
        lab.stop_director()
        errors = lab.down()
        if errors:
            print("teardown:", errors)
    print("health lab: " + ("all steps ok" if not failed else f"{len(failed)} step(s) failed"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    if argv[:1] == ["conf"]:
        from .topology import RIP_BASE, SERVER_NET

        sys.stdout.write(keepalived_conf([f"{SERVER_NET}.{RIP_BASE}", f"{SERVER_NET}.{RIP_BASE + 1}"],
                                         f"{SERVER_NET}.{RIP_BASE + 2}"))
        return 0
    sys.stderr.write("usage: python -m pylvs.lab.health check [--name NAME] [--workers N]\n"
                     "       python -m pylvs.lab.health conf    # the lab's keepalived.conf\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
