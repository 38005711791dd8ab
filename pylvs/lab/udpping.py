"""A UDP client for the lab: send datagrams to VIP:port, report who answered.

    python -m pylvs.lab.udpping HOST PORT [--count N] [--timeout S]

Each datagram goes from its own socket (its own source port, i.e. its own
flow, so the director schedules each one), and the real servers' echo
(pylvs.lab.httpd) prefixes the answer with their name. Prints one JSON line:
``{"sent": N, "answers": [{"from": "VIP:PORT", "server": "rs2", "ok": true}, ...]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args(argv)

    answers = []
    # Every socket stays open to the end: a closed one's port may be handed
    # to the next, whose datagram would then ride the first one's conn and
    # not be scheduled (seen in CI: 11/10/9 instead of 10/10/10 over wrr).
    with contextlib.ExitStack() as held:
        for i in range(args.count):
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            s.settimeout(args.timeout)
            payload = (f"ping {i} ".encode() + b"x" * args.size)[: max(args.size, 8)]
            s.sendto(payload, (args.host, args.port))
            t0 = time.monotonic()
            try:
                data, peer = s.recvfrom(65535)
            except socket.timeout:
                answers.append({"ok": False, "error": "timeout"})
                continue
            name, _, echo = data.partition(b" ")
            answers.append({"ok": echo == payload, "from": f"{peer[0]}:{peer[1]}",
                            "server": name.decode(errors="replace"),
                            "rtt_ms": round((time.monotonic() - t0) * 1e3, 3)})
    print(json.dumps({"sent": args.count, "answers": answers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
