"""``pylvs realserver setup|status|teardown|run``: argument parsing and output."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from . import config
from .config import RealServerError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pylvs realserver",
                                description="the real-server side of VS-DR, VS-Tun and VS-NAT "
                                            "(docs/realserver.md)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="configure this host as a real server (idempotent)")
    s.add_argument("--fwd", required=True, choices=config.FWDS)
    s.add_argument("--vip", action="append", default=[], help="DR/Tun: a VIP (repeatable)")
    s.add_argument("--dip", default="", help="NAT: the director's address on this network")
    s.add_argument("--clients", action="append", default=[],
                   help="NAT: route only this prefix via the DIP (repeatable; default: the "
                        "default route)")
    s.add_argument("--iface", default="", help="the interface facing the director "
                                              "(default: the default route's)")
    st = sub.add_parser("status", help="what is set up and whether it is in effect")
    st.add_argument("--json", action="store_true")
    sub.add_parser("teardown", help="restore what setup changed")
    r = sub.add_parser("run", help="user-space IPIP/GUE decapsulator (no ipip module)")
    r.add_argument("--iface", default="")
    r.add_argument("--vip", action="append", default=[])
    r.add_argument("--gue-port", type=int, default=None)
    r.add_argument("--tun-name", default=None, help="TUN device name (default plvsdec0)")
    return p


def _explainer():
    """Wrap an explanation under its line; one already given is not repeated."""
    seen: set[str] = set()

    def why(text: str) -> str:
        if text in seen:
            return ""
        seen.add(text)
        return textwrap.fill(text, 92, initial_indent=" " * 11,
                             subsequent_indent=" " * 11) + "\n"
    return why


def _setup(a) -> int:
    cfg = config.Config(a.fwd, a.vip, a.iface, a.dip, a.clients)
    steps, mode = config.setup(cfg)
    changed = [s for s in steps if s["changed"]]
    w = sys.stdout.write
    w(f"pylvs realserver setup --fwd {a.fwd} (state: {config.state_path()})\n")
    why = _explainer()
    for s in steps:
        w(f"  {'changed' if s['changed'] else 'ok':<8} {config.describe(s)}\n{why(s['why'])}")
    st = config.read_state() or {}
    if st.get("config", {}).get("fwd") == config.DR_TUN:
        w("  DR and Tun: set up for both (a DR dest of one service, a Tun dest of another);\n"
          f"       VIPs {' '.join(st['config']['vips'])}.\n")
    if mode == "kernel-ipip":
        w("  Tun: the kernel's ipip module decapsulates (tunl0).\n")
    elif mode == "decap" and (running := config.running_decap()):
        tun = f", TUN device {running['tun']}" if running["tun"] else ""
        w(f"  Tun: the user-space decapsulator runs (pid {running['pid']}{tun}).\n")
    elif mode == "decap":
        c = config.Config(**st.get("config", {"fwd": "tun"}))
        vips = " ".join(f"--vip {v}" for v in c.vips)
        w("  Tun: this kernel has no ipip module: start the user-space decapsulator,\n"
          f"       pylvs realserver run --iface {c.iface} {vips}\n"
          "       (add --gue-port N for GUE dests)\n")
    w(f"{len(changed)} change(s) made and recorded; 'pylvs realserver teardown' restores them.\n"
      if changed else "nothing changed: already set up.\n")
    return 0


def _status(a) -> int:
    st = config.status()
    warn = not st["setup"] or any(c["verdict"] != "ok" for c in st["checks"])
    if a.json:
        sys.stdout.write(json.dumps(st, indent=1) + "\n")
        return 1 if warn else 0
    w = sys.stdout.write
    if st["note"]:
        w(f"note: {st['note']}\n")
    if not st["setup"]:
        w(f"not set up by pylvs here (no {st['state_file']})\n")
    else:
        c = st["setup"]
        extra = (f" vip {' '.join(c['vips'])}" if c["vips"] else "") + (
            f" dip {c['dip']} clients {' '.join(c['clients'])}" if c["dip"] else "")
        mode = f" ({st['mode']})" if st["mode"] else ""
        w(f"set up: fwd {c['fwd']}{mode} iface {c['iface']}{extra}\n")
    why = _explainer()
    for ch in st["checks"]:
        w(f"  {ch['verdict']:<5} {ch['name']}: {ch['value']}\n{why(ch['why'])}")
    d = st["decapsulator"]
    if d:
        w(f"decapsulator: pid {d['pid']} on {d['iface']} -> {d['tun']}\n")
        w("".join(f"  {k:<24} {v}\n" for k, v in d["counters"].items()))
    return 1 if warn else 0


def _teardown(a) -> int:
    from . import run
    config._check_root()
    # The decapsulator first: it needs the settings it runs under.
    stopped = run.stop_running()
    for line in stopped:
        print(f"  {line}")
    done = config.teardown()
    if not done:
        print("no setup recorded in this namespace" if stopped else
              "nothing to tear down (no setup recorded in this namespace)")
        return 0
    for s, note in done:
        print(f"  {config.describe_undo(s)}"
              + (f" ({note})" if note else ""))
    print(f"{len(done)} change(s) undone.")
    return 0


def _run(a) -> int:
    from . import run
    return run.run(a.iface or None, a.vip, a.gue_port, a.tun_name or run.TUN_NAME)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        return {"setup": _setup, "status": _status, "teardown": _teardown,
                "run": _run}[a.cmd](a)
    except RealServerError as e:
        sys.stderr.write(f"pylvs realserver {a.cmd}: {e}\n")
        return 1
