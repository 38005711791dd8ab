"""`pylvs status`: the health checks of a running director (docs/health.md).

One line per service (its quorum and sorry server), then one per (real
server, check): the check's state, when it last changed and the text of its
last result. What forwards is `pylvs adm -L`'s; this says why.

Exit status: 0 done, 1 the director refused, 2 bad command line or no
director to talk to.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from .tools import _call, _run


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    stamp = time.strftime("%H:%M:%S", time.localtime(t))
    return f"{stamp} ({max(0, int(now - t))} s ago)"


def format_status(st: dict, now: float | None = None) -> str:
    """The text `pylvs status` prints for the "health" op's answer."""
    now = time.time() if now is None else now
    gone = st.get("not_in_table") or []
    if not st.get("services") and not st.get("checks") and not gone:
        return "no health checks (a keepalived.conf's checkers start them: docs/health.md)\n"
    lines = []
    for s in st.get("services", []):
        line = (f"{s['service']}  quorum {s['quorum']} (alive weight {s['alive_weight']}, "
                f"quorum {s['quorum_needed']}, hysteresis {s['hysteresis']})")
        if s.get("sorry_server"):
            line += f"  sorry server {s['sorry_server']} {'ACTIVE' if s['sorry_active'] else 'off'}"
        lines.append(line)
    if st.get("checks"):
        rows = [("SERVICE", "REAL SERVER", "CHECK", "STATE", "SINCE", "LAST RESULT")]
        rows += [(c["service"], c["real_server"], c["kind"], c["state"], _ago(c["since"], now),
                  c["result"]) for c in st["checks"]]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines.append("")
        lines += ["  ".join(f"{v:<{w}}" for v, w in zip(r[:5], widths)) + "  " + r[5]
                  for r in rows]
    if gone:
        lines += [""] * bool(lines) + ["deleted by hand (ipvsadm -D/-d), not in the table; their checks go on "
                  "and apply when it is added again:"] + [f"  {g}" for g in gone]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None, client_factory=None) -> int:
    ap = argparse.ArgumentParser(
        prog="pylvs status",
        description="The health checks of a running director: each service's quorum and "
                    "sorry server, and each real server's checks with their state (up/down), "
                    "when it last changed and their last result (docs/health.md). "
                    "`pylvs adm -L` shows what forwards.")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    ap.add_argument("--control", metavar="PATH", help="the director's control socket "
                    "(default: this network namespace's)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out, err = stdout or sys.stdout, stderr or sys.stderr

    def show(out, factory):
        st = _call(a.control, {"op": "health"}, factory)
        out.write(json.dumps(st, indent=1) + "\n" if a.json else format_status(st))
        return 0
    return _run("pylvs status", show, out, err, client_factory)
