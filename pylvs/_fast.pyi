# --- Engine (pylvs/_fast/ip_vs*.{c,h}, engine_type.c; contract: docs/engine.md) -----------------
from typing import Callable

import numpy as np

ENGINE_MAX_CAPACITY: int

class Engine:
    """The C data path: conn table, NAT rewrite, checksums."""

    def __init__(self, capacity: int, *, key: bytes, transitions: np.ndarray,
                 timeouts: np.ndarray, counters: object,
                 schedule: Callable[[int, int, int], int]) -> None: ...
    def set_tables(self, services: np.ndarray, dests: np.ndarray) -> None: ...
    def set_sched(self, sched_svcs: np.ndarray, sched_dests: np.ndarray,
                  thresholds: np.ndarray, sched_table: np.ndarray) -> None:
        """Schedulers run in C and the dests' -x/-y (tables.SCHED_SVC_DTYPE,
        SCHED_DEST_DTYPE, DEST_THRESH_DTYPE, int32 sh/dh/mh buckets)."""
    def set_timeouts(self, timeouts: np.ndarray) -> None: ...
    def set_sysctls(self, values: np.ndarray) -> None: ...
    def set_transitions(self, transitions: np.ndarray) -> None: ...
    def set_drop_rate(self, rate: int, counter: int = -1) -> None: ...
    def drop_entries(self, now: float) -> int: ...
    def expire_nodest(self) -> int: ...
    def process(self, batch: object, now: float) -> int: ...
    def expire(self, now: float, budget: int) -> int: ...
    def conns(self) -> list[tuple[int, int, int, int, int, int, int, int, float, int, int, int]]:
        """(proto, caddr, cport, vaddr, vport, daddr, dport, state, expires, fwd,
        dest_slot, svc_slot) of every conn, in slab order."""
        ...
    def conns_chunk(self, start: int, count: int) -> tuple[list[tuple], int]:
        """conns() in pieces: from slot ``start``, at most ``count`` conns,
        and the slot to go on from (-1 at the end); the engine's lock is
        held for one piece, so the frame loop goes on between pieces.
        ValueError for count < 1."""
        ...
    # Connection sync (docs/engine.md, "Sync"; kernel net/netfilter/ipvs/ip_vs_sync.c).
    # Records are pylvs.engine.sync.SYNC_DTYPE (also tables.SYNC_DTYPE), host
    # order; any other dtype: TypeError; not one-dimensional: ValueError.
    def set_sync_master(self, on: bool) -> None:
        """Master mode on: every client frame of a conn runs the kernel's rule
        (ip_vs_sync_conn_needed: the sync_threshold / sync_period pair, TCP
        state changes, sync_refresh_period and sync_retries,
        sync_persist_mode) and queues the conn's record, then its template's;
        the queue holds sync_qlen_max records as set now (1 .. 2**24), a
        record beyond it is dropped and counted (sync_queue_full). Off: the
        queue and its records are dropped, and frames cost nothing more.
        MemoryError when the queue cannot be had."""
    def sync_drain(self, out: np.ndarray) -> int:
        """Move up to len(out) queued records into ``out`` (writable, else
        ValueError), oldest first; returns how many (0 with master mode
        off)."""
    def sync_install(self, records: np.ndarray, now: float) -> int:
        """The backup: create or update a conn or template per record as the
        kernel's ip_vs_proc_conn (service by (proto, vaddr, vport), dest by
        daddr:dport then daddr with port 0; the forwarding method this
        director's dest has; state, in_pkts = sync_threshold, expiry now +
        the record's timeout, s). Returns the records installed or updated;
        every record bumps one counter: sync_installed, sync_updated,
        sync_stale, sync_rejected (protocol not TCP/UDP, forwarding method
        above 3, state out of range, template with a client port, NAT
        real-server side held by another conn), sync_no_dest (fwmark, no such
        service or dest here), sync_table_full. Never raises for a record's
        contents. RuntimeError from inside a scheduler upcall."""
    def sync_chunk(self, start: int, out: np.ndarray,
                   now: float | None = None) -> tuple[int, int]:
        """The bulk walk: the records of the conns and templates of slots
        ``start``.. (the same records the master queues), as many as ``out``
        holds: (records filled, the slot to go on from, -1 at the end). One
        lock hold per call, so the frame loop goes on between chunks.
        ``now`` (engine clock seconds): a conn's record carries the whole
        seconds it has left (rounded up, 1 at least, at most its state's
        timeout) instead of the state's timeout, so a bulk answer does not
        restart its timer on the backup; templates keep their timeout
        (pylvs's bulk resync has no kernel counterpart)."""
    def _key_hash(self, proto: int, a1: int, p1: int, a2: int, p2: int) -> int: ...
    def _check(self) -> None: ...
    @property
    def conn_count(self) -> int: ...
    @property
    def capacity(self) -> int:
        """The conn limit."""
        ...
    @property
    def memory(self) -> int:
        """Bytes the conn table holds now (slab in use + index)."""
        ...
    @property
    def pressure(self) -> bool:
        """The receive ring is backed up: new flows may spend only the
        ``upcall_share`` sysctl's percent of the time in the scheduler
        upcall; the frame loops set it (docs/engine.md, "Upcall limit")."""
        ...
    @pressure.setter
    def pressure(self, on: bool) -> None: ...
    @property
    def upcall_cost(self) -> float:
        """Seconds one scheduler upcall takes, as control measured it; the
        upcall limit meters with it (0: unknown, no limit). ValueError
        outside 0..1."""
        ...
    @upcall_cost.setter
    def upcall_cost(self, seconds: float) -> None: ...

def _siphash(key: bytes, data: bytes, c: int = 1, d: int = 3) -> int: ...
def sched_update(state: np.ndarray, svc: int, kind: int, dests: np.ndarray,
                 reset: bool) -> None:
    """The rr/wrr row of counters.sched_state after service svc's dest list
    became ``dests`` (SCHED_DEST_DTYPE), as the kernel's rr del_dest / wrr
    dest_changed; reset: a scheduler freshly bound."""
# --- end Engine ---------------------------------------------------------------

# --- AF_PACKET forwarder (pylvs/_fast/afpacket.c) ---------------------------
from typing import Sequence

import numpy as np

class Ring:
    """The TPACKET_V3 (or V2) receive ring of a configured AF_PACKET socket."""
    fd: int
    block_size: int
    block_nr: int
    rx_frames: int
    rx_blocks: int
    rx_truncated: int
    rx_vlan: int
    rx_oversize: int
    tx_frames: int
    tx_errors: int
    tx_bad_port: int
    sock_errors: int
    emit_sent: int
    emit_errors: int
    tx_emsgsize: int
    polls: int
    poll_timeouts: int
    fwd_calls: int
    fwd_budget_cuts: int
    fwd_blocks: int
    fwd_max_blocks: int
    last_error: int
    last_tx_error: int
    version: int
    frame_nr: int
    rx_copied: int
    capture: object | None   # a pylvs._fast.Capture (capture.c)
    lane: Ring | None
    def __init__(self, fd: int, block_size: int = ..., block_nr: int = ...,
                 frame_size: int = ..., retire_ms: int = ..., version: int = ...) -> None: ...
    def close(self) -> None: ...
    def set_capture(self, capture: object | None) -> None: ...
    def set_lane(self, lane: Ring | None) -> None:
        """Also read this TPACKET_V2 ring's frames as this ring's port
        (forward, ring_recv). ValueError: not V2, itself, or has a lane;
        RuntimeError: a ring is in use."""

def forward(engine: Engine, rings: Sequence[Ring], now: float, timeout_ms: int = 0,
            budget: int = 4096) -> int: ...
def ring_recv(rings: Sequence[Ring], buf: np.ndarray, length: np.ndarray,
              in_port: np.ndarray, timeout_ms: int = 0) -> int: ...
def ring_send(rings: Sequence[Ring], buf: np.ndarray, length: np.ndarray,
              verdict: np.ndarray, out_port: np.ndarray, count: int) -> int: ...
def emit_send(rings: Sequence[Ring], emit_buf: np.ndarray, emit_off: np.ndarray,
              emit_len: np.ndarray, emit_port: np.ndarray, emit_n: np.ndarray) -> int: ...
# --- end AF_PACKET forwarder -----------------------------------------------

# --- TAP forwarder (tap.c) ------------------------------------------------------
def tap_forward(engine: Engine, fds: Sequence[int], now: float, timeout_ms: int,
                buf: np.ndarray, emit: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                counters: np.ndarray) -> tuple[int, list[tuple[int, bytes]]]: ...

# --- ICMP errors, resets, fragments, NAT ICMP (pylvs/_fast/ip_vs_icmp.c) ---
# Test hooks only: the engine calls the C functions directly. `emit` is
# (buf uint8, off uint32, len uint32, port uint16, n uint32[2]), as
# pylvs.engine.icmp.Emit.arrays; `frame` is an Ethernet frame whose IPv4
# packet of ip_len bytes starts at byte 14. Twins: pylvs.engine.icmp.
def _icmp_error(emit: tuple[np.ndarray, ...], port: int, frame: bytes, ip_len: int,
                type: int, code: int, info: int, saddr: int, ip_id: int) -> int: ...
def _tcp_reset(emit: tuple[np.ndarray, ...], port: int, frame: bytes, ip_len: int) -> int: ...
def _ip_fragment(emit: tuple[np.ndarray, ...], port: int, frame: bytes, ip_len: int,
                 mtu: int) -> int: ...
def _icmp_inner(ip: bytes, ip_len: int) -> tuple[int, int, int, int, int, int, int, int, int,
                                                  int] | None:
    """(type, code, proto, saddr, sport, daddr, dport, icmp_off, inner_off, l4_off)."""
    ...
def _nat_icmp(ip: bytearray, ip_len: int, out: bool, addr: int, port: int) -> bool: ...
# --- end ICMP -----------------------------------------------------------------

# --- VS-Tun encapsulation, GSO segmentation (pylvs/_fast/ip_vs_xmit_tun.c) ---
# Test hooks only: the engine calls the C functions directly. `emit` as
# above; `tun` is (type 0 ipip | 1 gue, csum, sport, dport, saddr, daddr) as
# pylvs.engine.tunnel.Tun; `frame` is a virtio_net_hdr, then an Ethernet
# frame whose IPv4 packet of ip_len bytes starts at byte 24. Twins:
# pylvs.engine.tunnel.
def _tun_encap(emit: tuple[np.ndarray, ...], port: int, eth_out: bytes, ip: bytes, ip_len: int,
               tun: tuple[int, int, int, int, int, int], ip_id: int) -> int:
    """Frame length emitted (via pylvs_ipip_encap / pylvs_gue_encap), or 0."""
    ...
def _gso_segments(emit: tuple[np.ndarray, ...], port: int, eth_out: bytes, frame: bytes,
                  ip_len: int, tun: tuple[int, int, int, int, int, int] | None,
                  ip_id: int) -> int:
    """Frames emitted (all or nothing), or 0."""
    ...
def _csum_complete(frame: bytearray, ip_len: int) -> int:
    """1 completed, 0 no NEEDS_CSUM, -1 refused (frame unchanged)."""
    ...
# --- end VS-Tun ---------------------------------------------------------------
