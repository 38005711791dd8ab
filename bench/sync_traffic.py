"""bench sync: the connection sync traffic a master sends per 1000 new conns/s.

The C engine, master mode on, forwards short VS-NAT conns (bench
short_conns: SYN, SYN+ACK, ACK, FIN+ACK, FIN+ACK, ACK, six frames at one
simulated instant) at ``rate`` new conns per simulated second; after every
batch the sync daemon's path runs on the same clock: ``sync_drain`` into
the master's buffer (pylvs.sync.wire.Buffer: full messages go at once, a
partial one after 2 s), messages of at most 1472 bytes. What goes on the
wire is counted as the master sends it: packets, and bytes with the UDP,
IPv4 and Ethernet headers (28 + 14 per packet).

Reported per rate: conns, records sent (the kernel's rule: which states
and packets announce a conn), messages, bytes; the same per second and per
1000 new conns/s (the figure of docs/sync.md). Nothing goes over a real
network here: tests/netns/test_sync.py checks the same messages do.
"""

from __future__ import annotations

import numpy as np

from pylvs.engine import new_engine, tables
from pylvs.engine.sync import SYNC_DTYPE
from pylvs.sync import wire

from . import short_conns as sc

HEADERS = 28 + 14     # IPv4 + UDP, Ethernet
RATES = (1000, 5000, 20000)


def run_one(rate: float, sim_seconds: float) -> dict:
    counters = tables.Counters(max_services=4, max_dests=4)
    e = new_engine("c", 1 << 22, counters=counters, schedule=lambda s, a, p: 0)
    svc = tables.empty_services(1)
    svc[0] = (sc.VIP, 80, tables.PROTO_TCP, tables.SVC_F_USED, 0, 0)
    dst = tables.empty_dests(1)
    dst[0]["daddr"], dst[0]["dport"], dst[0]["svc"], dst[0]["weight"] = sc.RIP, 8080, 0, 1
    dst[0]["fwd"], dst[0]["flags"] = tables.FWD_MASQ, tables.DEST_F_USED | tables.DEST_F_RESOLVED
    dst[0]["out_port"] = 1
    dst[0]["dmac"] = np.frombuffer(sc.RMAC, np.uint8)
    dst[0]["smac"] = np.frombuffer(sc.SMAC, np.uint8)
    e.set_tables(svc, dst)
    e.set_sync_master(True)
    buf = wire.Buffer(syncid=1, maxlen=wire.DEFAULT_MAXLEN)
    out = np.zeros(4096, dtype=SYNC_DTYPE)
    b = tables.Batch(256, 128)
    per = 6 * sc.CONNS_PER_BATCH
    b.length[:per] = sc.FLEN
    b.in_port[:per] = np.repeat(np.where(sc._CLIENT_SIDE, 0, 1), sc.CONNS_PER_BATCH)
    b.count = per
    total = int(rate * sim_seconds) // sc.CONNS_PER_BATCH * sc.CONNS_PER_BATCH
    records = msgs = nbytes = 0
    t0 = 1000.0
    now = t0
    chunk = sc.CONNS_PER_BATCH * 200
    for first in range(0, total, chunk):
        fr = sc.frames_for(first, min(chunk, total - first))
        for g in range(fr.shape[0]):
            now = t0 + (first + g * sc.CONNS_PER_BATCH) / rate
            b.buf[:per, :sc.FLEN] = fr[g]
            e.process(b, now)
            e.expire(now, sc.EXPIRE_BUDGET)
            while (n := e.sync_drain(out)) > 0:
                records += n
                buf.add(out[:n], now)
            for m in buf.take(now):
                msgs += 1
                nbytes += len(m) + HEADERS
    for m in buf.take(now, force=True):
        msgs += 1
        nbytes += len(m) + HEADERS
    seconds = total / rate
    k = rate / 1000.0
    return {
        "scenario": "short-conns", "impl": "c", "rate": rate, "sim_seconds": seconds,
        "conns": total, "records": records, "messages": msgs, "bytes": nbytes,
        "records_per_conn": records / total,
        "messages_per_s": msgs / seconds, "bytes_per_s": nbytes / seconds,
        "messages_per_s_per_1000": msgs / seconds / k,
        "bytes_per_s_per_1000": nbytes / seconds / k,
        "pps": msgs / seconds, "ns_per_packet": None, "runs": 1,
    }


def run(rest: list[str], runs: int | None = None, quick: bool = False) -> dict:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench sync")
    ap.add_argument("--rates", default=",".join(map(str, RATES)),
                    help="new conns per simulated second, comma-separated")
    ap.add_argument("--sim-seconds", type=float, default=2.0 if quick else 20.0)
    a = ap.parse_args(rest)
    rows = [run_one(float(r), a.sim_seconds) for r in a.rates.split(",")]
    for r in rows:
        print(f"{r['rate']:>7.0f} new conns/s: {r['records_per_conn']:.2f} records/conn, "
              f"{r['messages_per_s']:.0f} packets/s, {r['bytes_per_s'] / 1e3:.1f} kB/s "
              f"= per 1000 new conns/s {r['messages_per_s_per_1000']:.1f} packets/s, "
              f"{r['bytes_per_s_per_1000'] / 1e3:.1f} kB/s")
    return {"results": rows}


def plot(doc: dict, png) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    rates = [r["rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rates, [r["bytes_per_s"] / 1e3 for r in rows], "o-", label="kB/s")
    ax.plot(rates, [r["messages_per_s"] for r in rows], "s-", label="packets/s")
    ax.set_xlabel("new conns/s (short VS-NAT conns)")
    ax.set_ylabel("sync traffic from the master")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("pylvs connection sync traffic")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
