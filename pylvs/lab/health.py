"""The health-check lab's director (netns-labs/health/, tests/netns/
test_health_e2e.py): `pylvs run` with one HTTP service whose real servers
are health-checked, configured from Python as a keepalived.conf would::

    virtual_server VIP 80 {
        delay_loop D   lvs_sched rr   lvs_method NAT   protocol TCP
        quorum 1   sorry_server SORRY 80
        real_server RIP 80 {          # one per --rip
            weight 1
            HTTP_GET { url { path /health status_code 200 }
                       connect_timeout T  retry R  delay_before_retry B }
        }
    }

Run inside the director's namespace::

    python -m pylvs.lab.health --iface eth0 --iface eth1 --rip 10.0.1.11 \\
        --rip 10.0.1.12 --sorry 10.0.1.13 [--delay-loop 1] [--workers N]

It logs "ready" as `pylvs run` does, once the service, its dests and the
health checks are in. ``python -m pylvs.lab.health check`` builds a lab,
tells the lab's story (netns-labs/health/README.md) and removes it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from ..config.model import CheckSpec, RealServer, SorryServer, UrlSpec, VirtualServer
from .topology import HTTP_PORT, UDP_PORT, VIP, LabError, _repo_root, wait_for_file, wait_for_line


def lab_config(rips: list[str], sorry: str | None, delay_loop: float = 1.0,
               connect_timeout: float = 1.0, retry: int = 1,
               delay_before_retry: float = 0.5, inhibit: bool = False) -> list[VirtualServer]:
    """The lab's one virtual server, as the parser would give it."""
    check = CheckSpec("HTTP_GET", delay_loop=delay_loop, connect_timeout=connect_timeout,
                      retry=retry, delay_before_retry=delay_before_retry,
                      urls=(UrlSpec("/health", frozenset({200})),))
    return [VirtualServer(
        "TCP", VIP, HTTP_PORT, lvs_sched="rr", lvs_method="NAT", delay_loop=delay_loop,
        quorum=1, sorry_server=SorryServer(sorry, HTTP_PORT) if sorry else None,
        real_servers=tuple(RealServer(r, HTTP_PORT, weight=1, inhibit_on_failure=inhibit,
                                      checks=(check,)) for r in rips))]


def apply(balancer, health, config: list[VirtualServer]) -> None:
    """Services and dests into the Balancer (the operator's part), then the
    health checks over them."""
    for vs in config:
        balancer.add_service(vs.protocol, vs.vaddr, vs.vport, sched=vs.lvs_sched)
        for rs in vs.real_servers:
            balancer.add_dest(vs.protocol, vs.vaddr, vs.vport, rs.addr, rs.port,
                              fwd={"NAT": "masq", "DR": "route", "TUN": "tunnel"}[vs.lvs_method],
                              weight=rs.weight)
    health.configure(config)


# --- driving a lab from outside (tests, the lab's check) ---------------------


def start_director(lab, *extra: str, timeout: float = 20.0) -> subprocess.Popen:
    """This module's director in ``lab``'s director namespace, its real
    servers rs1..rsN-1 and rsN the sorry server; waits for "ready"."""
    log = lab.log_path("director")
    rips = [a for r in lab.rips[:-1] for a in ("--rip", r)]
    argv = [lab.python, "-m", "pylvs.lab.health", *lab.run_args(), *rips,
            "--sorry", lab.rips[-1], *extra]
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
    d, t, r, b = 1.0, 1.0, 1, 0.5
    bound = d + r * (b + t) + t
    lab = Lab(a.name, servers=3)
    failed = []

    def step(title: str, ok: bool, detail: str = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {title}" + (f": {detail}" if detail else ""))
        if not ok:
            failed.append(title)

    def show(*args: str) -> None:
        print(f"# pylvs {' '.join(args)}")
        print(lab.run(lab.director, lab.pylvs_argv(*args)).stdout.rstrip())

    try:
        lab.up()
        start_director(lab, "--workers", str(a.workers), "--delay-loop", str(d),
                       "--connect-timeout", str(t), "--retry", str(r),
                       "--delay-before-retry", str(b))
        rs1, rs2, sorry = lab.rips
        step("rs1 and rs2 forward", wait_for(lab, lambda f: f == {rs1: 1, rs2: 1}, 5) is not None)
        show("adm", "-L", "-n")
        step("requests reach rs1 and rs2", set(_requests(lab, 10)) == {"rs1", "rs2"})
        took = removal_time(lab, 0, bound + 5)
        step("rs1's HTTP server killed: rs1 leaves", took is not None and took <= bound + 1,
             f"{took:.2f} s after the kill (bound {bound:.1f} s)" if took else "never")
        show("adm", "-L", "-n")
        show("status")
        step("requests reach rs2 only", set(_requests(lab, 6)) == {"rs2"})
        step("-S still saves rs1", f"-r {rs1}:80 -m -w 1" in lab.adm("-S", "-n"))
        stop_httpd(lab, 1)
        step("rs2 killed too: the sorry server (rs3) takes the clients",
             wait_for(lab, lambda f: f == {sorry: 1}, bound + 5) is not None)
        show("adm", "-L", "-n")
        step("requests reach rs3 only", set(_requests(lab, 6)) == {"rs3"}, str(_requests(lab, 2)))
        start_httpd(lab, 0)
        took = wait_for(lab, lambda f: f == {rs1: 1}, d + t + 5)
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
    from ..runtime.daemon import Daemon, Options, setup_logging

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return check_main(argv[1:])

    ap = argparse.ArgumentParser(prog="python -m pylvs.lab.health",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--iface", action="append", default=[])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--control")
    ap.add_argument("--rip", action="append", default=[], required=True)
    ap.add_argument("--sorry")
    ap.add_argument("--delay-loop", type=float, default=1.0)
    ap.add_argument("--connect-timeout", type=float, default=1.0)
    ap.add_argument("--retry", type=int, default=1)
    ap.add_argument("--delay-before-retry", type=float, default=0.5)
    ap.add_argument("--inhibit", action="store_true", help="inhibit_on_failure")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    setup_logging(a.verbose)
    config = lab_config(a.rip, a.sorry, a.delay_loop, a.connect_timeout, a.retry,
                        a.delay_before_retry, a.inhibit)
    daemon = Daemon(Options(ifaces=a.iface, workers=a.workers, control=a.control))
    daemon.on_start = lambda balancer: apply(balancer, daemon.health, config)
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
