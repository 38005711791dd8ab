"""`make demo`: pylvs balancing real HTTP traffic in a namespace lab.

Builds a lab (pylvs/lab/topology.py; by default the mixed one: rs1 behind
VS-NAT, rs2 VS-DR, rs3 VS-Tun through the user-space decapsulator; `--fwd
nat|dr|tun` for one method), starts `pylvs run` in the director namespace,
adds a wlc service on VIP:80 with three real servers of weights 1, 2 and 3
through `pylvs adm`, each with its method, sends a few hundred HTTP requests
with curl from the client namespace, shows the `pylvs adm -L -n --stats`
listing and which real server answered how many requests, and removes the
lab again - also after Ctrl-C, SIGTERM or a failure. Exits non-zero when
traffic did not flow.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import sys
import time
import uuid

REQUESTS = 300
WEIGHTS = (1, 2, 3)


class _Stop(Exception):
    pass


_MAIN_PID = os.getpid()


def _on_signal(signum, frame):
    if os.getpid() != _MAIN_PID:
        # A forked helper inherited this handler (pyroute2 forks to create a
        # namespace and ends the child with SIGTERM): die as it expects,
        # never run the demo's teardown in the child.
        os._exit(128 + signum)
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pylvs.lab.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=REQUESTS)
    ap.add_argument("--scheduler", default="wlc")
    ap.add_argument("--fwd", default="mixed", choices=("mixed", "nat", "dr", "tun"),
                    help="the forwarding method of the real servers (mixed: one of each)")
    ap.add_argument("--keep", action="store_true",
                    help="leave the lab up at the end (remove it with `pylvs lab down --name NAME`)")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from pylvs.lab.topology import ADM_FLAG, Lab, LabError

    con = Console(stderr=False, highlight=False)
    if os.geteuid() != 0:
        con.print("[red]the demo needs root (network namespaces, raw sockets, nftables)[/]")
        return 2
    missing = [t for t in ("ip", "nft", "curl") if shutil.which(t) is None]
    if missing:
        con.print(f"[red]missing tools: {' '.join(missing)} (run `make deps`)[/]")
        return 2

    global _MAIN_PID
    _MAIN_PID = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    lab = Lab(f"pldemo{uuid.uuid4().hex[:5]}", servers=len(WEIGHTS), fwd=args.fwd)
    vip = f"{lab.vip}:80"
    ok = False
    try:
        with con.status("building the namespace lab ..."):
            lab.up()
        con.print(f"[bold]lab {lab.name}[/]: client {lab.cip} -> vip {lab.vip} "
                  f"\\[director, dip {lab.dip}] -> real servers {', '.join(lab.rips)}")

        with con.status("starting pylvs run in the director namespace ..."):
            lab.start_director()
        con.print(f"pylvs run is ready in [cyan]{lab.director}[/]")

        cmds = [("-A", "-t", vip, "-s", args.scheduler)]
        for rip, kind, w in zip(lab.rips, lab.kinds, WEIGHTS):
            cmds.append(("-a", "-t", vip, "-r", f"{rip}:80", ADM_FLAG[kind], "-w", str(w)))
        for c in cmds:
            con.print(f"  [dim]$[/] pylvs adm {' '.join(c)}")
            lab.adm(*c)
        # The first SYN to a dest whose MAC is unknown is dropped (and
        # retransmitted a second later): let ARP finish first.
        if not lab.wait_resolved(lab.rips):
            con.print("[yellow]the director has not resolved every real server yet[/]")

        n = max(1, args.requests)
        con.print(f"sending {n} HTTP requests (one TCP connection each) from the client "
                  f"to http://{lab.vip}/whoami ...")
        t0 = time.monotonic()
        answers = _requests(lab, n)
        took = time.monotonic() - t0

        con.print()
        con.print(lab.adm("-L", "-n", "--stats").rstrip(), markup=False)
        con.print()
        con.print(lab.adm("-L", "-n").rstrip(), markup=False)
        con.print()

        counts = collections.Counter(answers)
        table = Table(title=f"who answered ({args.scheduler}, {took:.1f} s)")
        table.add_column("real server")
        table.add_column("rip")
        table.add_column("method")
        table.add_column("weight", justify="right")
        table.add_column("answers", justify="right")
        table.add_column("share", justify="right")
        table.add_column("expected", justify="right")
        total_w = sum(WEIGHTS)
        method = {"nat": "VS-NAT (-m)", "dr": "VS-DR (-g)", "tun": "VS-Tun (-i)"}
        for name, rip, kind, w in zip(lab.rs_names, lab.rips, lab.kinds, WEIGHTS):
            c = counts.get(name, 0)
            table.add_row(name, rip, method[kind], str(w), str(c), f"{100 * c / n:.0f}%",
                          f"{100 * w / total_w:.0f}%")
        failed = n - sum(counts[x] for x in lab.rs_names)
        con.print(table)
        if failed:
            con.print(f"[yellow]{failed} requests got no answer[/]")
        ok = sum(counts[x] for x in lab.rs_names) >= 0.95 * n and all(
            counts.get(x, 0) > 0 for x in lab.rs_names)
        con.print("[bold green]traffic flowed through pylvs[/]" if ok
                  else "[bold red]traffic did not flow as expected[/]")
    except _Stop as e:
        con.print(f"[yellow]stopped by {e}[/]")
    except KeyboardInterrupt:
        con.print("[yellow]interrupted[/]")
    except LabError as e:
        con.print(f"[red]{e}[/]")
        log = lab.director_log()
        if log:
            con.print("[dim]director log (tail):[/]")
            con.print(log[-2000:], markup=False)
    finally:
        # A second Ctrl-C during teardown must not leave namespaces behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if args.keep and ok:
            lab.procs.clear()
            con.print(f"lab kept: `pylvs lab down --name {lab.name}` removes it")
        else:
            with con.status("removing the lab ..."):
                lab.stop_director()
                errors = lab.down()
            for e in errors:
                con.print(f"[red]teardown: {e}[/]")
    return 0 if ok else 1


def _requests(lab, n: int) -> list[str]:
    """n requests, each on its own TCP connection; the answering rs names."""
    url = f"http://{lab.vip}:80/whoami"
    # One curl for all URLs keeps the demo fast; "Connection: close" makes
    # every request a new TCP connection, i.e. a new scheduling decision.
    argv = ["curl", "-s", "--noproxy", "*", "--connect-timeout", "3", "--max-time", "5",
            "-H", "Connection: close", *([url] * n)]
    p = lab.run(lab.client, argv, timeout=60 + n * 0.2, check=False)
    return [line.strip() for line in p.stdout.splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
