"""`pylvs stats` and `pylvs sysctl`: a running director's counters (engine,
I/O, steering) and run-time knobs, over the control socket (as `pylvs adm`).

Exit status: 0 done, 1 the director refused (unknown knob, bad value),
2 bad command line or no director to talk to.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, TextIO

from ..control import rpc
from ..control.balancer import BalancerError, expand_sysctls, sysctl_name


def _call(path: str | None, op: dict, factory: Callable[[str], Any] | None) -> Any:
    client = (factory or rpc.Client)(path or rpc.default_path())
    try:
        return client.call(op)
    finally:
        client.close()


def _run(prog: str, fn, out: TextIO, err: TextIO, factory) -> int:
    try:
        return fn(out, factory)
    except (rpc.RpcError, BalancerError) as e:
        err.write(f"{prog}: {e}\n")
        return 1
    except (OSError, ValueError) as e:
        err.write(f"{prog}: cannot reach the pylvs control socket: {e}\n"
                  "Is `pylvs run` running in this network namespace (or use --control)?\n")
        return 2


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _counter_lines(counters: dict, prefix: str = "") -> list[str]:
    width = max((len(prefix + n) for n in counters), default=0)
    return [f"{prefix + name:<{width}}  {'-' if v is None else v}"
            for name, v in counters.items()]


def format_stats(st: dict) -> str:
    """The text `pylvs stats` prints: tables first, then every engine
    counter by name, then (from `pylvs run`) the I/O backend's as
    ``io.NAME`` and the steering table's as ``steering.NAME``, each section
    after a blank line (docs/control.md)."""
    conns, svcs, dests = st["conns"], st["services"], st["dests"]

    def val(v):
        return "-" if v is None else str(v)
    lines = [f"conns     {val(conns['count'])} of {val(conns['limit'])}"
             + (f" ({_human_bytes(conns['memory'])})" if conns.get("memory") is not None else ""),
             f"services  {svcs['count']} of {svcs['limit']}",
             f"dests     {dests['count']} of {dests['limit']}",
             ""]
    lines += _counter_lines(st.get("engine", st["counters"]))
    for section in ("io", "steering"):
        if st.get(section):
            lines += [""] + _counter_lines(st[section], section + ".")
    for role, counters in (st.get("sync") or {}).items():   # running sync daemons (docs/sync.md)
        flat = {}
        for k, v in counters.items():
            flat.update({f"{k}.{n}": x for n, x in v.items()} if isinstance(v, dict) else {k: v})
        lines += [""] + _counter_lines(flat, f"sync.{role}.")
    return "\n".join(lines) + "\n"


def stats_main(argv: list[str] | None = None, *, stdout: TextIO | None = None,
               stderr: TextIO | None = None, client_factory=None) -> int:
    ap = argparse.ArgumentParser(
        prog="pylvs stats",
        description="Print a running director's counters by their stable names "
                    "(the engine's; io.*: the AF_PACKET rings', summed over ports; "
                    "steering.not_host: frames to another host's MAC, broadcast or "
                    "multicast refused; sync.master.* and sync.backup.*: the connection sync "
                    "daemons', docs/sync.md), its conn count and conn table limit, and the "
                    "service and dest slots in use (docs/control.md). With several "
                    "workers every figure is the sum over them; --json adds "
                    "\"workers\": each worker's engine, conns and io counters.")
    ap.add_argument("--json", action="store_true",
                    help="one JSON object (with the per-worker split)")
    ap.add_argument("--control", metavar="PATH", help="the director's control socket "
                    "(default: this network namespace's)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out, err = stdout or sys.stdout, stderr or sys.stderr

    def show(out, factory):
        st = _call(a.control, {"op": "stats"}, factory)
        out.write(json.dumps(st, indent=1) + "\n" if a.json else format_stats(st))
        return 0
    return _run("pylvs stats", show, out, err, client_factory)


def sysctl_main(argv: list[str] | None = None, *, stdout: TextIO | None = None,
                stderr: TextIO | None = None, client_factory=None) -> int:
    ap = argparse.ArgumentParser(
        prog="pylvs sysctl",
        description="Read or set a running director's knobs: conn_reuse_mode, "
                    "expire_nodest_conn, expire_quiescent_template, sloppy_tcp, nat_icmp_send, "
                    "pmtu_disc, drop_entry, drop_packet, secure_tcp, amemthresh, am_droprate, "
                    "lblc_expiration, lblcr_expiration, sync_threshold (with sync_period, "
                    "its pair's second), sync_refresh_period, sync_retries, "
                    "sync_persist_mode, sync_qlen_max and sync_version as the kernel's "
                    "net.ipv4.vs.*, icmp_msgs_per_sec, icmp_msgs_burst and icmp_ratelimit "
                    "as net.ipv4.*, tcp_rst_per_sec, tcp_rst_burst, upcall_share "
                    "and pressure_conn_rate pylvs's own (README, the sysctl table). No argument lists them all, "
                    "NAME reads one, NAME=VALUE sets one; the settings of one command "
                    "apply together or not at all.")
    ap.add_argument("setting", nargs="*", metavar="NAME[=VALUE]",
                    help="a knob by its name or sysctl(8)'s (net.ipv4.vs.NAME); "
                    "sync_threshold also takes the kernel's pair, sync_threshold=\"3 50\", "
                    "and read as net.ipv4.vs.sync_threshold shows it (with sync_period)")
    # sysctl(8)'s switches, so its command lines work unchanged: -w (write)
    # and -a (all) change nothing here, NAME=VALUE already writes.
    ap.add_argument("-w", "--write", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-a", "--all", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-n", "--values", action="store_true",
                    help="print the values only, one a line (as sysctl -n)")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="print nothing for settings (as sysctl -q)")
    ap.add_argument("-e", "--ignore", action="store_true",
                    help="skip unknown names instead of failing (as sysctl -e: a "
                    "sysctl.conf written for the kernel's IPVS has knobs pylvs lacks)")
    ap.add_argument("--json", action="store_true",
                    help="one JSON object (with the per-worker split)")
    ap.add_argument("--control", metavar="PATH", help="the director's control socket "
                    "(default: this network namespace's)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out, err = stdout or sys.stdout, stderr or sys.stderr

    def work(out, factory):
        if not a.setting:
            result = _call(a.control, {"op": "sysctl"}, factory)
        else:
            known = _call(a.control, {"op": "sysctl"}, factory) if a.ignore else None
            names, values = [], {}
            for item in a.setting:
                given, eq, value = item.partition("=")
                name = sysctl_name(given)
                if known is not None and name not in known:
                    continue
                if eq:
                    # sysctl(8) users quote the pair: sync_threshold="3 50"
                    value = value.strip().strip('"\'')
                    names.extend(n for n in expand_sysctls({name: value}) if n not in names)
                    values[name] = value
                else:
                    # The kernel's sync_threshold (by its sysctl name) is
                    # the pair: both knobs, as setting it shows them.
                    shown = ((name, "sync_period") if name == "sync_threshold" and given != name
                             else (name,))
                    names.extend(n for n in shown if n not in names)
            # Names read first (an unknown one fails before anything is
            # set), then every setting in one request: the director checks
            # them all before it changes any.
            result = {}
            for name in names:
                if name not in values:
                    result.update(_call(a.control, {"op": "sysctl", "name": name}, factory))
            if values:
                every = _call(a.control, {"op": "set_sysctls", "values": values}, factory)
                result = {name: every[name] for name in names}
        if a.quiet and values:
            return 0
        if a.json:
            out.write(json.dumps(result) + "\n")
        else:
            out.write("".join(f"{v}\n" if a.values else f"{k} = {v}\n"
                              for k, v in result.items()))
        return 0
    return _run("pylvs sysctl", work, out, err, client_factory)


def reload_main(argv: list[str] | None = None, *, stdout: TextIO | None = None,
                stderr: TextIO | None = None, client_factory=None) -> int:
    ap = argparse.ArgumentParser(
        prog="pylvs reload",
        description="Make a running director re-read its `pylvs run -c` file "
                    "(keepalived.conf or pylvs adm -S rules) and apply only the "
                    "difference: unchanged services and dests are not touched, so no "
                    "established conn notices (as SIGHUP; docs/config.md). A file that "
                    "does not parse changes nothing. Exit status 0 when all applied, 1 "
                    "when the file was refused or an operation failed (named on stderr), "
                    "2 when no director answers.")
    ap.add_argument("--json", action="store_true", help="the director's answer as JSON")
    ap.add_argument("--control", metavar="PATH", help="the director's control socket "
                    "(default: this network namespace's)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out, err = stdout or sys.stdout, stderr or sys.stderr

    def work(out, factory):
        r = _call(a.control, {"op": "reload"}, factory)
        if a.json:
            out.write(json.dumps(r) + "\n")
        else:
            from ..config.apply import reload_summary

            out.write(f"reloaded {r['file']} ({r['format']}): {r['services']} service(s); "
                      f"{reload_summary(r['operations'], r.get('health', 0))}\n")
            for line in r["warnings"]:
                err.write(f"warning: {line}\n")
        for line in r["refused"] + r["errors"]:
            err.write(f"{line}\n")
        return 1 if r["errors"] or r["refused"] else 0
    return _run("pylvs reload", work, out, err, client_factory)
