"""A master and a backup sync daemon in two namespaces, one process: run by
tests/netns/test_sync.py as ``python sync_pair.py NS_A IF_A NS_B IF_B``.

Each daemon's sockets are made inside its namespace (the thread enters it
with setns(2) for start() and comes back), so the multicast between them
crosses the veth the test made. The engines are the stand-ins of
tests/test_sync_daemon.py (contract 3 in Python): this checks the sockets,
the timing and the bulk resync, not the engines. Prints one JSON line."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import struct
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from test_sync_daemon import StandInEngine, rows  # noqa: E402

from pylvs.engine import tables  # noqa: E402
from pylvs.sync import daemon as sd  # noqa: E402
from pylvs.sync import wire  # noqa: E402

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def netns(name: str):
    """This thread in network namespace ``name`` for the block."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        yield
    finally:
        _libc.setns(home, CLONE_NEWNET)
        os.close(target)
        os.close(home)


def workers(n: int) -> list:
    return [SimpleNamespace(engine=StandInEngine(), lock=threading.Lock()) for _ in range(n)]


BAD = [b"", b"\0\7\0", wire.encode(np.array(rows(2), dtype=wire.SYNC_DTYPE), 7)[0][:-3],
       wire.encode(np.array(rows(2), dtype=wire.SYNC_DTYPE), 8)[0], bytes([0, 7, 0, 8, 0, 2, 0, 0]),
       bytes([3, 7, 0, 4])]


async def main(ns_a: str, if_a: str, ns_b: str, if_b: str) -> dict:
    mw, bw = workers(2), workers(2)
    for i, w in enumerate(mw):
        w.engine.table = rows(300, base=0x0A100000 + (i << 12))   # the master's table
    queued = [rows(50, base=0x0A200000 + (i << 12)) for i in range(len(mw))]
    sent = sorted(r[3] for w, q in zip(mw, queued) for r in w.engine.table + q)
    services = tables.empty_services(0)
    master = sd.SyncDaemons(lambda: mw, lambda: services)
    backup = sd.SyncDaemons(lambda: bw, lambda: services)
    t0 = time.monotonic()
    # The backup first: its first bulk request finds no master and goes
    # unanswered; the retry a second later is answered.
    with netns(ns_b):
        await backup.start({"state": "backup", "mcast_ifn": if_b, "syncid": 7})
    await asyncio.sleep(0.2)
    with netns(ns_a):
        await master.start({"state": "master", "mcast_ifn": if_a, "syncid": 7})
    t_queue = time.monotonic()
    for w, q in zip(mw, queued):   # conns the engines' sync rule queued
        w.engine.queue = list(q)
    b = backup.running["backup"]
    while time.monotonic() - t0 < 10 and b.stats["installed"] < len(sent):
        await asyncio.sleep(0.05)
    installed_at = time.monotonic() - t_queue
    await asyncio.wait_for(b.bulk_done.wait(), 5)
    before = b.stats["installed"]
    with netns(ns_a):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 9999))   # test_sync.py's BAD_SPORT: kept out of its decoding
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                     socket.inet_aton("0.0.0.0") * 2 + struct.pack("i", socket.if_nametoindex(if_a)))
    for msg in BAD:
        s.sendto(msg, (wire.SYNC_GROUP, wire.SYNC_PORT))
    s.close()
    # Each datagram is counted by the time it is read: wait for the six,
    # bounded (the exact counts are the test's to check).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sum(b.drops.values()) < len(BAD):
        await asyncio.sleep(0.02)
    out = {
        "rcvbuf": b.inp.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        "installed": [sorted(r[3] for r in w.engine.table) for w in bw],
        "installed_at": installed_at,
        "installed_after_bad": b.stats["installed"] - before,
        "stats": master.stats() | backup.stats(),
        "list": master.list() + backup.list(),
        "sent": sent,
    }
    await master.close()
    await backup.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:5]))))
