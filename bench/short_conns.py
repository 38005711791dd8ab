"""bench engine --scenario short-conns: many short TCP conns on a simulated clock.

Each conn is six frames, all at the same simulated instant: client SYN,
server SYN+ACK, client ACK, client FIN+ACK, server FIN+ACK, client ACK. The
conn ends in TIME_WAIT (120 s by default, as the kernel's), so at a steady
``rate`` of new conns the table holds about ``rate * 120`` of them. Conns
start ``1/rate`` simulated seconds apart, 42 to a batch of 252 frames, and
``expire(now, 512)`` runs after every batch, as the daemon's data loop
does. The run lasts ``sim_seconds`` of simulated time (past 120 s, so the
table reaches its steady size).

Reported per conn limit: conns attempted, created, refused
(``drop_table_full``), evicted, the table's conns and ``memory`` at the end
(bytes per conn), and how fast the C engine went in wall-clock time
(``conns_per_s``; frames generated outside the timed part). A limit carries
the rate when nothing is refused.

Frames: 64 bytes with the vnet header, IPv4 header checksums right (the
engine checks them); TCP checksums are not computed (the engine updates them
incrementally and never checks them).
"""

from __future__ import annotations

import ipaddress
import struct
import time

import numpy as np

from pylvs.engine import new_engine, states, tables

VIP = int(ipaddress.IPv4Address("10.0.0.100"))
RIP = int(ipaddress.IPv4Address("10.0.1.11"))
CLIENTS = int(ipaddress.IPv4Address("10.64.0.0"))
PORTS = 60_000                       # client ports 1024.. per client address
CONNS_PER_BATCH = 42                 # x 6 frames = 252 of a 256-frame batch
EXPIRE_BUDGET = 512                  # the daemon's expire_budget
CMAC, LMAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
RMAC, SMAC = bytes.fromhex("020000000111"), bytes.fromhex("020000000101")

# (from the client?, TCP flags) of the six frames of a conn.
STEPS = ((True, 0x02), (False, 0x12), (True, 0x10), (True, 0x11), (False, 0x11), (True, 0x10))
ETH = tables.VNET_HDR_LEN
IPO = ETH + 14
L4 = IPO + 20
FLEN = L4 + 20


def _template(from_client: bool, flags: int) -> np.ndarray:
    """A frame with the client's address and port zero (patched per conn)."""
    if from_client:
        eth = LMAC + CMAC
        saddr, daddr, sport, dport = 0, VIP, 0, 80
    else:
        eth = SMAC + RMAC
        saddr, daddr, sport, dport = RIP, 0, 8080, 0
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, saddr, daddr)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0)
    return np.frombuffer(tables.with_vnet(eth + b"\x08\x00" + ip + tcp), dtype=np.uint8).copy()


_TEMPLATES = np.stack([_template(*s) for s in STEPS])            # (6, FLEN)
_CLIENT_SIDE = np.array([s[0] for s in STEPS])


def _header_sum(t: np.ndarray) -> int:
    words = t[IPO:IPO + 20].reshape(10, 2).astype(np.uint32)
    return int((words[:, 0] << 8 | words[:, 1]).sum())


_BASE_SUM = np.array([_header_sum(t) for t in _TEMPLATES], dtype=np.uint64)


def frames_for(first: int, n: int) -> np.ndarray:
    """The frames of conns first .. first+n-1 (n a multiple of 42), in batch
    order: (n // 42, 252, FLEN)."""
    i = np.arange(first, first + n, dtype=np.uint64)
    caddr = (CLIENTS + i // PORTS).astype(np.uint32)
    cport = (1024 + i % PORTS).astype(np.uint16)
    f = np.broadcast_to(_TEMPLATES, (n, 6, FLEN)).copy()
    a = caddr.view(np.uint8).reshape(n, 4)[:, ::-1]            # network order
    p = cport.view(np.uint8).reshape(n, 2)[:, ::-1]
    cl, sv = _CLIENT_SIDE, ~_CLIENT_SIDE
    f[:, cl, IPO + 12:IPO + 16] = a[:, None, :]
    f[:, cl, L4:L4 + 2] = p[:, None, :]
    f[:, sv, IPO + 16:IPO + 20] = a[:, None, :]
    f[:, sv, L4 + 2:L4 + 4] = p[:, None, :]
    s = _BASE_SUM[None, :] + (caddr >> 16).astype(np.uint64)[:, None] + \
        (caddr & 0xFFFF).astype(np.uint64)[:, None]
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    c = (~s & 0xFFFF).astype(np.uint16)
    f[:, :, IPO + 10] = (c >> 8).astype(np.uint8)
    f[:, :, IPO + 11] = (c & 0xFF).astype(np.uint8)
    g = n // CONNS_PER_BATCH
    return f.reshape(g, CONNS_PER_BATCH, 6, FLEN).transpose(0, 2, 1, 3).reshape(
        g, 6 * CONNS_PER_BATCH, FLEN)


def run_one(limit: int, rate: float, sim_seconds: float) -> dict:
    counters = tables.Counters(max_services=4, max_dests=4)
    e = new_engine("c", limit, counters=counters, schedule=lambda s, a, p: 0)
    svc = tables.empty_services(1)
    svc[0] = (VIP, 80, tables.PROTO_TCP, tables.SVC_F_USED, 0, 0)
    dst = tables.empty_dests(1)
    dst[0]["daddr"], dst[0]["dport"], dst[0]["svc"], dst[0]["weight"] = RIP, 8080, 0, 1
    dst[0]["fwd"], dst[0]["flags"] = tables.FWD_MASQ, tables.DEST_F_USED | tables.DEST_F_RESOLVED
    dst[0]["out_port"] = 1
    dst[0]["dmac"] = np.frombuffer(RMAC, np.uint8)
    dst[0]["smac"] = np.frombuffer(SMAC, np.uint8)
    e.set_tables(svc, dst)
    b = tables.Batch(256, 128)
    per = 6 * CONNS_PER_BATCH
    b.length[:per] = FLEN
    b.in_port[:per] = np.repeat(np.where(_CLIENT_SIDE, 0, 1), CONNS_PER_BATCH)
    b.count = per
    total = int(rate * sim_seconds) // CONNS_PER_BATCH * CONNS_PER_BATCH
    chunk = CONNS_PER_BATCH * 200
    busy = 0.0
    peak = 0
    for first in range(0, total, chunk):
        n = min(chunk, total - first)
        fr = frames_for(first, n)
        t0 = time.perf_counter()
        for g in range(fr.shape[0]):
            now = 1000.0 + (first + g * CONNS_PER_BATCH) / rate
            b.buf[:per, :FLEN] = fr[g]
            e.process(b, now)
            e.expire(now, EXPIRE_BUDGET)
        busy += time.perf_counter() - t0
        peak = max(peak, e.conn_count)
    st = counters.named()
    if st["tx_frames"] != 6 * st["conns_created"] or st["rx_frames"] != st["tx_frames"] + st["drop_table_full"]:
        raise RuntimeError(f"limit {limit}: frames lost besides refusals: {st}")
    return {
        "scenario": "short-conns", "impl": f"c limit={limit}", "limit": limit,
        "rate_offered": rate, "sim_seconds": sim_seconds,
        "time_wait_s": float(states.timeout_array()[states.TIME_WAIT]),
        "conns_attempted": total, "conns_created": st["conns_created"],
        "refused": st["drop_table_full"], "conns_evicted": st["conns_evicted"],
        "conns_reused": st["conns_reused"], "conns_expired": st["conns_expired"],
        "conns_at_end": e.conn_count, "conns_peak": peak,
        "memory_bytes": e.memory, "bytes_per_conn": e.memory / max(e.conn_count, 1),
        "wall_s": busy, "conns_per_s": total / busy,
        "pps": 6 * total / busy, "ns_per_packet": busy / (6 * total) * 1e9, "runs": 1,
    }


def run(rate: float, sim_seconds: float, limits: list[int]) -> tuple[list[dict], list[str]]:
    rows, summary = [], []
    for limit in limits:
        r = run_one(limit, rate, sim_seconds)
        rows.append(r)
        carried = "carried" if r["refused"] == 0 else "NOT carried"
        summary.append(
            f"short-conns limit {limit}: {rate:.0f} new conns/s for {sim_seconds:.0f} s simulated "
            f"{carried}: {r['conns_created']} created, {r['refused']} refused, "
            f"{r['conns_evicted']} evicted; {r['conns_at_end']} conns at the end in "
            f"{r['memory_bytes'] / 2**20:.1f} MiB ({r['bytes_per_conn']:.0f} B/conn); "
            f"the engine ran at {r['conns_per_s'] / 1e3:.0f} k conns/s wall clock")
    return rows, summary
