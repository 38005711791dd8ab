"""`pylvs check`: one line per check of the running director's set-up
(``ok`` / ``warn`` / ``FAIL`` and the fix), or ``--json``.

Exit status: 0 nothing failed (warnings allowed), 1 a check FAILed,
2 bad command line (a --client that cannot be a client's address included), no
director to talk to, no permission to probe, or a ``--tap`` director (its
addresses and routes live in pylvs, not in the kernel stack the probes use:
not supported yet).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import TextIO

from ..check import FAIL, run_checks
from ..check.checks import CheckInputError
from ..check.probe import Net
from ..control import rpc


def _address(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from None


def _wait(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.05 <= v <= 10:
        raise argparse.ArgumentTypeError(f"--wait takes 0.05 to 10 seconds, not {text!r}")
    return v


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pylvs check",
        description="Check the running director's set-up against the network, from its "
                    "namespace: services with a usable dest, the VIPs, DR real servers on "
                    "connected networks, the ARP problem, NAT real servers' reply routes, "
                    "Tun real servers' decapsulation and tunnel MTU, and the settings that "
                    "matter (docs/check.md). Needs root (raw packet sockets).")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    ap.add_argument("--control", metavar="PATH", help="the director's control socket "
                    "(default: this network namespace's)")
    ap.add_argument("--client", metavar="ADDR", type=_address, action="append", default=[],
                    help="a client address to probe NAT reply routes and rp_filter with "
                         "(repeatable; default: the VIP)")
    ap.add_argument("--wait", metavar="SECONDS", type=_wait, default=1.0,
                    help="how long each probe collects answers (default 1)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        client = rpc.Client(a.control or rpc.default_path())
        try:
            snap = client.call({"op": "snapshot"})
            taps = client.call({"op": "stats"}).get("tap") or []
        finally:
            client.close()
    except rpc.RpcError as e:
        err.write(f"pylvs check: {e}\n")
        return 2
    except (OSError, ValueError) as e:
        err.write(f"pylvs check: cannot reach the pylvs control socket: {e}\n"
                  "Is `pylvs run` running in this network namespace (or use --control)?\n")
        return 2
    if taps:
        err.write(f"pylvs check: the director runs on TAP ports ({', '.join(taps)}): pylvs "
                  f"check probes through the director's kernel stack (its addresses, routes, "
                  f"ARP), which a --tap director does not use, so it is not supported for "
                  f"--tap yet\n")
        return 2
    try:
        with Net() as net:
            results = run_checks(snap, net, a.client, a.wait)
    except PermissionError as e:
        err.write(f"pylvs check: cannot open packet sockets ({e}): run it as root\n")
        return 2
    except CheckInputError as e:
        err.write(f"pylvs check: {e}\n")
        return 2
    failed = any(r.verdict == FAIL for r in results)
    if a.json:
        out.write(json.dumps({"ok": not failed,
                              "checks": [r.as_dict() for r in results]}, indent=1) + "\n")
    else:
        if not snap.get("services"):
            out.write("the director has no services: only its settings are checked\n")
        for r in results:
            out.write(r.line() + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
