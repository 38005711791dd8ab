"""`pylvs lab`: build, list and remove the namespace labs by hand.

    pylvs lab up [--name NAME] [--fwd nat|dr|tun|mixed] [--io afpacket|tap] [--servers N]
                 [--ip-forward 0|1]
    pylvs lab down [--name NAME | --all]
    pylvs lab status

The labs are the ones the tests and `make demo` use (pylvs/lab/topology.py):
``--fwd nat`` (the default) the VS-NAT lab netns-labs/nat/README.md walks
through; ``dr``, ``tun`` and ``mixed`` the routed labs (client behind a
router; DR real servers on the director's segment, Tun real servers on a
network behind the router, mixed: NAT, DR and Tun in turn), their real
servers prepared with `pylvs realserver setup` (and `run` for Tun).
``--io tap``: the same lab, but the director's namespace only bridges each
of its interfaces with a TAP, and `pylvs run --tap` owns the director's
addresses (netns-labs/tap/README.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..control.text import ascii_int
from ..lab.topology import FWDS, IOS

DEFAULT_NAME = "pylvs"
MAX_SERVERS = 200  # as topology.Lab


def _name(s: str) -> str:
    # The name becomes namespace names and /run/pylvs/labs/NAME.json.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", s):
        raise argparse.ArgumentTypeError(
            f"invalid lab name {s!r} (letters, digits, '_', '.', '-'; at most 64)")
    return s


def _servers(s: str) -> int:
    n = ascii_int(s) or 0
    if not 1 <= n <= MAX_SERVERS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_SERVERS}, not {s!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pylvs lab", description="namespace labs for VS-NAT, "
                                                              "VS-DR and VS-Tun")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the lab and start the real servers' httpd")
    up.add_argument("--name", type=_name, default=DEFAULT_NAME,
                    help=f"lab name; namespaces are called NAME-client, NAME-director, ... "
                         f"(default {DEFAULT_NAME})")
    up.add_argument("--fwd", choices=FWDS, default="nat",
                    help="nat (default): the VS-NAT lab; dr, tun: every real server of that "
                         "method; mixed: NAT, DR and Tun real servers in turn")
    up.add_argument("--io", choices=IOS, default="afpacket",
                    help="afpacket (default): pylvs run --iface on the director's interfaces; "
                         "xdp: the same with --io xdp, and the other namespaces' tx checksum "
                         "offload off (XDP frames carry no partial-checksum note); "
                         "tap: each interface bridged with a TAP, pylvs run --tap")
    up.add_argument("--servers", type=_servers, default=3, help="number of real servers (default 3)")
    up.add_argument("--ip-forward", type=int, choices=(0, 1), default=0,
                    help="the director's net.ipv4.ip_forward (pylvs needs neither)")
    down = sub.add_parser("down", help="stop the lab's processes and remove its namespaces")
    g = down.add_mutually_exclusive_group()
    g.add_argument("--name", type=_name, default=None)
    g.add_argument("--all", action="store_true", help="every lab recorded in /run/pylvs/labs")
    sub.add_parser("status", help="list the labs and their namespaces")
    return ap


def main(argv: list[str] | None = None) -> int:
    from pylvs.lab import topology

    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("pylvs lab: needs root (network namespaces)", file=sys.stderr)
        return 1

    if args.cmd == "up":
        lab = topology.Lab(args.name, servers=args.servers, ip_forward=args.ip_forward,
                           fwd=args.fwd, io=args.io)
        try:
            lab.up()
        except topology.LabError as e:
            print(f"pylvs lab up: {e}", file=sys.stderr)
            return 1
        # The httpd processes outlive this command; down() must not run here.
        lab.procs.clear()
        print(lab.howto())
        return 0

    if args.cmd == "down":
        if args.all:
            errors = topology.destroy_all()
        else:
            errors = topology.destroy(args.name or DEFAULT_NAME)
        for e in errors:
            print(f"pylvs lab down: {e}", file=sys.stderr)
        return 1 if errors else 0

    if args.cmd == "status":
        recs = topology.records()
        if not recs:
            print("no labs")
        for rec in recs:
            nss = rec.get("namespaces", [])
            alive = [ns for ns in nss if topology.netns_exists(ns)]
            io = " over tap" if rec.get("io") == "tap" else ""
            print(f"{rec['name']}: {rec.get('fwd', 'nat')}{io}, {len(alive)}/{len(nss)} "
                  f"namespaces present")
            for ns in nss:
                print(f"  {'up  ' if ns in alive else 'gone'} {ns}")
            d = rec.get("director")
            if d:
                print(f"  vip {d['vip']}  dip {d['dip']}  cip {rec['client']['cip']}  rips "
                      + " ".join(r["rip"] for r in rec.get("real_servers", [])))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
