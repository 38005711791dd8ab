"""bench engine: established-flow VS-NAT through Engine.process, from memory.

Scenario ``nat-established``: one TCP service VIP:80 with three Masq dests;
100k flows are created first with SYNs (not timed), then batches of 256
established client->VIP ACK frames carrying 64 bytes of data (full
checksums, so the incremental RFC 1624 path) are timed. Consecutive batches
walk the flows in a random order, so lookups touch the whole table as with
real traffic.

NAT rewrites frames in place, so each batch is first reloaded from a
pristine copy of its 64 header bytes per frame (every byte NAT, DR or Tun
writes is in them; the 64-byte payload is written once and never changes),
one ``np.copyto`` of 256 x 64 bytes from views made before the clock
starts. The reload is INCLUDED in the timed loop - it is the cost of
feeding frames to the engine - and measured alone as ``copy_ns_per_packet``.

No syscalls, no I/O: this is the data path's upper bound. impl ``c`` is
pylvs._fast.Engine, impl ``python`` the reference engine doing the same work.
"""

from __future__ import annotations

import argparse
import ipaddress
import resource
import statistics
import time

import numpy as np

from pylvs.engine import new_engine, tables

from .flowgen import VIP, VPORT, FrameMaker, flow_tuples

BATCH = 256
FLOWS = 100_000
PAYLOAD = 64
RIPS = [int(ipaddress.IPv4Address(f"10.0.1.{11 + i}")) for i in range(3)]
SMAC = bytes.fromhex("020000000101")
NOW = 1000.0
DEFAULT_CONN_MAX = 1 << 22  # pylvs run --conn-max
SETUP_CHUNK = 4096  # frames per process() call while conns are made


# Scenario -> the forwarding method of its dests (the same traffic otherwise).
FWD_OF = {"nat-established": tables.FWD_MASQ, "dr-established": tables.FWD_ROUTE,
          "tun-established": tables.FWD_TUNNEL}


def tables_for_bench(fwd: int = tables.FWD_MASQ):
    svcs = tables.empty_services(4)
    svcs[0] = (VIP, VPORT, tables.PROTO_TCP, tables.SVC_F_USED, 0, 0)
    dests = tables.empty_dests(8)
    for i, rip in enumerate(RIPS):
        dests[i]["daddr"] = rip
        dests[i]["dport"] = 80
        dests[i]["svc"] = 0
        dests[i]["weight"] = 1
        dests[i]["fwd"] = fwd   # tun_type 0: IPIP
        dests[i]["flags"] = tables.DEST_F_USED | tables.DEST_F_RESOLVED
        dests[i]["out_port"] = 1
        dests[i]["dmac"] = list(bytes([2, 0, 0, 0, 1, 0x11 + i]))
        dests[i]["smac"] = list(SMAC)
    return svcs, dests


def rss_bytes() -> int:
    """This process's resident set size now (/proc/self/statm), bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def make_conns(engine, n: int, start: int = 0, now: float = NOW) -> None:
    """Establish flows start..start+n-1 (flowgen numbering) in `engine`: a
    SYN (-> SYN_RECV, scheduled) and the client's ACK (-> ESTABLISHED) for
    each, SETUP_CHUNK flows at a time."""
    syn, ack = FrameMaker(0x02), FrameMaker(0x10)
    batch = tables.Batch(SETUP_CHUNK, 128)
    for lo in range(start, start + n, SETUP_CHUNK):
        k = min(SETUP_CHUNK, start + n - lo)
        caddr, cport = flow_tuples(np.arange(lo, lo + k))
        for fm in (syn, ack):
            batch.clear()
            fm.fill(batch.buf, caddr, cport)
            batch.length[:k] = fm.length
            batch.in_port[:k] = 0
            batch.count = k
            engine.process(batch, now)


class Setup:
    """One engine of one impl, holding n established flows, and its frames.

    ``table_rss`` is what the process's RSS grew by while the conns were
    made (the slab and index pages touched, plus the set-up's own buffers,
    a few MB); ``engine.memory`` is the table's own count of its bytes."""

    def __init__(self, impl: str, n: int, seed: int = 1, fwd: int = tables.FWD_MASQ):
        self.impl = impl
        self.counters = tables.Counters()
        rr = [0]

        def schedule(svc, caddr, cport):
            rr[0] = (rr[0] + 1) % len(RIPS)
            return rr[0]

        rss0 = rss_bytes()
        self.engine = new_engine(impl, capacity=max(n, 1024), counters=self.counters,
                                 schedule=schedule)
        svcs, dests = tables_for_bench(fwd)
        self.engine.set_tables(svcs, dests)
        make_conns(self.engine, n)
        if self.engine.conn_count != n:
            raise RuntimeError(f"{impl}: {self.engine.conn_count} conns after set-up, want {n}")
        self.table_rss = rss_bytes() - rss0
        payload = bytes(range(PAYLOAD))
        est = FrameMaker(0x18, payload)
        self.flen = est.length
        # Every byte any forwarding method rewrites (MACs, TTL, addresses,
        # ports, checksums) lies in the headers; the payload is never
        # written. The pool keeps only the headers, one row per flow in
        # walk order (a random permutation of the flows); the payload is
        # written into the batch once.
        self.head = self.flen - PAYLOAD
        self.sample = est.template
        order = np.random.default_rng(seed).permutation(n)
        self.pool = np.empty((n, self.head), dtype=np.uint8)
        for lo in range(0, n, 1 << 20):
            caddr, cport = flow_tuples(order[lo:lo + (1 << 20)])
            est.fill(self.pool[lo:], caddr, cport, width=self.head)
        self.batch = tables.Batch(BATCH, 2048)
        self.n = n

    def _reloads(self, packets: int) -> list:
        """The pool's rows for each batch of a run, as views (made before the
        clock starts), with the batch made ready for them."""
        b = self.batch
        b.buf[:, :self.flen] = self.sample
        b.length[:] = self.flen
        b.in_port[:] = 0
        b.count = BATCH
        nb = max(1, packets // BATCH)
        return [self.pool[(k * BATCH) % (self.n - BATCH + 1):][:BATCH] for k in range(nb)]

    def timed(self, packets: int) -> tuple[float, float, int]:
        """Process about `packets` established frames; (seconds of wall clock,
        seconds of this thread's CPU time, frames sent)."""
        b, eng = self.batch, self.engine
        srcs = self._reloads(packets)
        heads = b.buf[:, :self.head]
        copyto = np.copyto
        tx0 = self.sent()
        now = NOW
        c0 = time.thread_time()
        t0 = time.perf_counter()
        for src in srcs:
            copyto(heads, src)  # the reload: NAT rewrote the last batch in place
            eng.process(b, now)
        dt = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        sent = self.sent() - tx0
        return dt, cpu, sent

    def sent(self) -> int:
        """Frames that left: rewritten in place (NAT, DR) or encapsulated (Tun)."""
        return self.counters.stat("tx_frames") + self.counters.stat("tx_tunneled")

    def copy_only(self, packets: int) -> float:
        """Seconds of timed()'s reloads alone."""
        srcs = self._reloads(packets)
        heads = self.batch.buf[:, :self.head]
        copyto = np.copyto
        t0 = time.perf_counter()
        for src in srcs:
            copyto(heads, src)
        return time.perf_counter() - t0


def run(argv: list[str], runs: int | None = None, quick: bool = False) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench engine")
    ap.add_argument("--flows", type=int, default=20_000 if quick else FLOWS)
    ap.add_argument("--impl", action="append", choices=("c", "python"))
    ap.add_argument("--seconds", type=float, default=0.3 if quick else 1.0,
                    help="target duration of one run of the C engine")
    ap.add_argument("--scenario", choices=(*FWD_OF, "short-conns", "table-scale", "new-conn"),
                    default="nat-established")
    ap.add_argument("--sizes", default=None,
                    help="table-scale: table sizes in flows, comma-separated "
                    "(default 10000,1000000,10000000; --quick 10000,200000)")
    ap.add_argument("--sched", action="append",
                    help="new-conn: schedulers to run (default: every -s name)")
    ap.add_argument("--rate", type=float, default=20_000,
                    help="short-conns: new conns per simulated second")
    ap.add_argument("--sim-seconds", type=float, default=150 if quick else 300,
                    help="short-conns: simulated duration")
    ap.add_argument("--limits", default=f"{DEFAULT_CONN_MAX},1000000",
                    help="short-conns: conn limits to run, comma-separated")
    args = ap.parse_args(argv)
    if args.scenario == "short-conns":
        from . import short_conns
        rows, summary = short_conns.run(args.rate, args.sim_seconds,
                                        [int(x) for x in args.limits.split(",")])
        return {"results": rows, "summary": summary}
    runs = runs or (3 if quick else 7)
    impls = args.impl or ["c", "python"]
    if args.scenario == "table-scale":
        from . import table_scale
        sizes = args.sizes or ("10000,200000" if quick else table_scale.DEFAULT_SIZES)
        rows, summary = table_scale.run([int(x) for x in sizes.split(",")], runs,
                                        args.seconds)
        return {"results": rows, "summary": summary}
    if args.scenario == "new-conn":
        from . import new_conn
        rows, summary = new_conn.run(args.sched or new_conn.sched_names(), impls, runs,
                                     0.1 if quick else args.seconds / 4)
        return {"results": rows, "summary": summary}

    rows, setups = {}, {}
    for impl in impls:
        row = {"scenario": args.scenario, "impl": impl, "batch": BATCH,
               "flows": args.flows, "frame_bytes": None, "copy_included": True}
        rows[impl] = row
        try:
            t0 = time.perf_counter()
            st = Setup(impl, args.flows, fwd=FWD_OF[args.scenario])
            row["setup_s"] = round(time.perf_counter() - t0, 2)
            row["frame_bytes"] = st.flen - tables.VNET_HDR_LEN
            # Calibrate the packet count so one run lasts about --seconds.
            dt, _, _ = st.timed(BATCH * 4)
            per = dt / (BATCH * 4)
            st.packets = int(min(max(args.seconds / max(per, 1e-9), BATCH * 4), 50_000_000))
            setups[impl] = st
            row.update(samples=[], cpu_samples=[], copy=[])
        except Exception as e:  # report and go on with the other impl
            row.update(pps=None, ns_per_packet=None, error=f"{type(e).__name__}: {e}")

    # Runs of the impls interleave (alternating who goes first), so a busy
    # moment of this shared machine hits both alike and the ratio stays fair.
    for r in range(runs):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))
        for impl in order:
            st, row = setups[impl], rows[impl]
            if "error" in row:
                continue
            try:
                dt, cpu, sent = st.timed(st.packets)
                want = (st.packets // BATCH) * BATCH
                if sent != want:
                    raise RuntimeError(f"{impl}: {sent} of {want} frames left: "
                                       f"{st.counters.named()}")
                row["samples"].append(sent / dt)
                row["cpu_samples"].append(cpu / sent * 1e9)
                row["copy"].append(st.copy_only(st.packets) / want * 1e9)
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {e}")
    results = []
    for impl in impls:
        row = rows[impl]
        if row.get("samples"):
            med = statistics.median(row["samples"])
            row.update(pps=med, ns_per_packet=1e9 / med, runs=len(row["samples"]), median=med,
                       packets_per_run=(setups[impl].packets // BATCH) * BATCH,
                       copy_ns_per_packet=statistics.median(row.pop("copy")),
                       cpu_ns_per_packet=statistics.median(row["cpu_samples"]))
        else:
            row.pop("copy", None)
            row.setdefault("pps", None)
            row.setdefault("ns_per_packet", None)
        results.append(row)

    by = {r["impl"]: r for r in results}
    summary = []
    if by.get("c", {}).get("pps") and by.get("python", {}).get("pps"):
        ratio = by["c"]["pps"] / by["python"]["pps"]
        by["c"]["ratio"] = ratio
        by["c"]["ratio_of"] = "c/python"
        per_run = [a / b for a, b in zip(by["c"]["samples"], by["python"]["samples"])]
        by["c"]["ratio_per_run_median"] = statistics.median(per_run)
        summary.append(f"c/python = {ratio:.1f}x (ratio of medians; median of per-run "
                       f"ratios {statistics.median(per_run):.1f}x; target >= 50x)")
    for r in results:
        if r.get("copy_ns_per_packet") is not None:
            summary.append(f"{r['impl']}: includes {r['copy_ns_per_packet']:.1f} ns/packet "
                           f"of frame reload (pristine headers); "
                           f"{r['cpu_ns_per_packet']:.1f} ns/packet of the thread's CPU time "
                           f"(wall clock less the time other tenants held the core)")
    return {"results": results, "summary": summary}
