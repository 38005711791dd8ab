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
1000 new conns/s (the figure of docs/sync.md).

``--lab``: the same measure on a real network: the VS-NAT lab
(pylvs/lab/topology.py), `pylvs run` with a master sync daemon on the
director's server-side interface, wrk in the client namespace making
HTTP/1.1 requests with ``Connection: close`` (every request a new conn:
handshake, request, response, FIN) for ``--seconds``; the conns are the
engine's ``conns_created``, the traffic the master's own counters
(``pylvs stats``: sync.master.messages and .bytes, plus 42 bytes of
headers per message), read 3 s after wrk stops (the 2 s flush).
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
    for m in buf.take(now + buf.flush_after):   # the last partial message, as its flush sends it
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


def run_lab(seconds: float, conns: int = 8) -> dict:
    """Real HTTP conns through the VS-NAT lab, the master's counters."""
    import json
    import time
    import uuid

    from pylvs.lab.topology import Lab

    lab = Lab(f"sy{uuid.uuid4().hex[:5]}", servers=2)
    try:
        lab.up()
        lab.start_director("--workers", "1")
        lab.nat_service("tcp", 80, [1, 1])
        lab.adm("--start-daemon", "master", "--mcast-interface", "eth1", "--syncid", "1")

        def stats() -> dict:
            p = lab.run(lab.director, lab.pylvs_argv("stats", "--json"), timeout=20)
            return json.loads(p.stdout)
        before = stats()
        wrk = lab.run(lab.client, ["wrk", "-t1", f"-c{conns}", f"-d{seconds:.0f}s",
                                   "-H", "Connection: close", f"http://{lab.vip}/whoami"],
                      timeout=seconds + 30, check=False)
        time.sleep(3.0)
        after = stats()
    finally:
        lab.down()
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed: {wrk.stderr}")
    made = after["engine"]["conns_created"] - before["engine"]["conns_created"]
    m0, m1 = before.get("sync", {}).get("master", {}), after["sync"]["master"]
    msgs = m1.get("messages", 0) - m0.get("messages", 0)
    recs = m1.get("conns", 0) - m0.get("conns", 0)
    nbytes = m1.get("bytes", 0) - m0.get("bytes", 0) + HEADERS * msgs
    rate = made / seconds
    k = rate / 1000.0
    return {
        "scenario": "lab-http-close", "impl": "pylvs run", "rate": rate, "sim_seconds": seconds,
        "conns": made, "records": recs, "messages": msgs, "bytes": nbytes,
        "records_per_conn": recs / max(made, 1),
        "messages_per_s": msgs / seconds, "bytes_per_s": nbytes / seconds,
        "messages_per_s_per_1000": msgs / seconds / k if k else None,
        "bytes_per_s_per_1000": nbytes / seconds / k if k else None,
        "pps": msgs / seconds, "ns_per_packet": None, "runs": 1,
        "wrk": wrk.stdout.strip().splitlines()[-2:] if wrk.stdout else [],
    }


def run(rest: list[str], runs: int | None = None, quick: bool = False) -> dict:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench sync")
    ap.add_argument("--rates", default=",".join(map(str, RATES)),
                    help="new conns per simulated second, comma-separated")
    ap.add_argument("--sim-seconds", type=float, default=2.0 if quick else 20.0)
    ap.add_argument("--lab", action="store_true",
                    help="also measure real HTTP conns through the VS-NAT lab (root)")
    ap.add_argument("--seconds", type=float, default=3.0 if quick else 10.0,
                    help="--lab: how long wrk runs")
    a = ap.parse_args(rest)
    rows = [run_one(float(r), a.sim_seconds) for r in a.rates.split(",")]
    if a.lab:
        rows.append(run_lab(a.seconds))
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

    sim = [r for r in doc["results"] if r["scenario"] == "short-conns"]
    lab = [r for r in doc["results"] if r["scenario"] != "short-conns"]
    rates = [r["rate"] for r in sim]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rates, [r["bytes_per_s"] / 1e3 for r in sim], "o-", label="kB/s (engine, simulated clock)")
    ax.plot(rates, [r["messages_per_s"] for r in sim], "s-", label="packets/s (engine, simulated clock)")
    for r in lab:
        ax.plot([r["rate"]], [r["bytes_per_s"] / 1e3], "o", color="C2",
                label="kB/s (lab: HTTP conns, pylvs run)")
        ax.plot([r["rate"]], [r["messages_per_s"]], "s", color="C3",
                label="packets/s (lab: HTTP conns, pylvs run)")
    ax.set_xlabel("new conns/s (VS-NAT)")
    ax.set_ylabel("sync traffic from the master")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("pylvs connection sync traffic")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
