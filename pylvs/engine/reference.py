"""The pure-Python reference engine (docs/engine.md, the contract).

It does what ``pylvs._fast.Engine`` does, bit for bit: the same verdicts,
rewritten bytes, counters, conn states and expiry. Tests compare the two, and
``bench engine`` runs it as the ``python`` impl. Clarity beats speed here.

Conn slots, the expiry clock hand, eviction at the limit and the table's
memory are the conn table's business: pylvs/engine/conn.py (the C engine
keeps the same order and draws the same samples).

Choices where the contract leaves room (IPVS behaviour where there is one):

- A new conn starts with ``expires = now + timeouts[NONE]`` (IPVS gives a new
  conn a short timeout before the first state update). Most new conns get
  their state update on the same frame; those dropped before it
  (``drop_fwd_method``) keep that short life.
- ``drop_dest_gone`` and ``drop_fwd_method`` leave the conn untouched (no state
  change, no refresh of ``expires``, no traffic counters), as IPVS drops such
  packets before ``ip_vs_set_state``.
- The conflict check for a new conn's OUT key is a lookup like step 7: a conn
  found there whose ``expires <= now`` is expired on the spot and is no
  conflict. A new conn whose OUT key equals its own IN key (client, VIP and
  real server all one address:port) is a conflict too.
- Only the flags byte of the virtio_net_hdr is cleared when a partial
  checksum is completed; the other fields stay as they came.
- ``out_port[i]`` is written only for V_TX.
- An OUT hit (step 11) is forwarded whatever became of the dest: the
  contract checks the dest on the IN side only.
- A conn's transmitter (``xmit``: NAT, DR, or none yet for Tun/Local) and
  the state table of its client packets (``in_dir``) are bound when it is
  made (kernel ip_vs_bind_xmit); frames switch on them and never consult
  the dest's ``fwd`` again. Only NAT conns have an OUT key.
- The TTL check (docs step 12a) comes after the state update and before
  the MTU check; the IN side decrements before the MTU check (IPVS), the
  OUT side after it (ip_forward); an ICMP error with TTL <= 1 is dropped
  unanswered.
- A TCP SYN with FIN creates a conn (only SYN+ACK and RST are excluded).
- An IN hit goes through the kernel's ip_vs_in rules first (``_in_rules``):
  port reuse (conn_reuse_mode), weight-0 rescheduling and a gone dest
  (expire_nodest_conn).
- The scheduler's answer is taken with ``operator.index`` (as C's
  PyLong_AsLongAndOverflow): a non-integer is a ``sched_errors``, an integer
  too large for any slot a ``drop_no_dest``.
- The global counters reach ``counters.stats`` at the end of each
  ``process``/``expire`` call (the C engine writes them as it goes); the
  per-service and per-dest arrays are written at once, since schedulers read
  ``dest_conns`` during the batch.

API edges kept as the C engine has them: a frame longer than its batch slot
is a ValueError before any frame is handled; while the scheduler upcall runs,
``process``, ``expire``, ``set_tables`` and ``set_timeouts`` raise
RuntimeError (no re-entry); transitions must be uint8, timeouts float64 and
finite, capacity 1 .. 2**26.
"""

from __future__ import annotations

import collections
import operator
import sys
from typing import Callable

import numpy as np

from . import states, tables
from . import icmp, sched_c, sync, tunnel
from .conn import (CONNS_EXPIRED, CONNS_REUSED, MAX_LIMIT, TPL_LATE_TIMEOUT, TPL_PROTO, Conn,
                   ConnTable, tpl_held)
from .checksum import fold, ones_sum, pseudo_header_sum, sum_update32, update16, update32

_ST = tables.STAT_INDEX
_RX = _ST["rx_frames"]
_TX = _ST["tx_frames"]
_PASS_NOT_IPV4 = _ST["pass_not_ipv4"]
_PASS_NOT_OURS = _ST["pass_not_ours"]
_DROP_TRUNCATED = _ST["drop_truncated"]
_DROP_BAD_IP = _ST["drop_bad_ip"]
_DROP_BAD_L4 = _ST["drop_bad_l4"]
_DROP_FRAGMENT = _ST["drop_fragment"]
_DROP_NO_CONN = _ST["drop_no_conn"]
_DROP_NO_DEST = _ST["drop_no_dest"]
_DROP_TABLE_FULL = _ST["drop_table_full"]
_DROP_DEST_GONE = _ST["drop_dest_gone"]
_DROP_UNRESOLVED = _ST["drop_unresolved"]
_DROP_FWD_METHOD = _ST["drop_fwd_method"]
_DROP_CONFLICT = _ST["drop_conflict"]
_CONNS_CREATED = _ST["conns_created"]
_IP_OPTIONS = _ST["ip_options"]
_CSUM_PARTIAL_FIXED = _ST["csum_partial_fixed"]
_GSO_FRAMES = _ST["gso_frames"]
_SCHED_ERRORS = _ST["sched_errors"]
_DROP_BAD_IP_CSUM = _ST["drop_bad_ip_csum"]
_DROP_L2_OTHER_HOST = _ST["drop_l2_other_host"]
_DROP_L2_BCAST = _ST["drop_l2_bcast"]
_DROP_SOURCE_ROUTE = _ST["drop_source_route"]
_DROP_MARTIAN = _ST["drop_martian"]
_DROP_RP_FILTER = _ST["drop_rp_filter"]
_DROP_FRAG_NEEDED = _ST["drop_frag_needed"]
_DROP_GSO_TOO_BIG = _ST["drop_gso_too_big"]
_TX_FRAGMENTED = _ST["tx_fragmented"]
_ICMP_FORWARDED = _ST["icmp_forwarded"]
_EMIT_FRAMES = _ST["emit_frames"]
_EMIT_OVERFLOW = _ST["emit_overflow"]
_ICMP_UNREACH_SENT = _ST["icmp_unreach_sent"]
_ICMP_FRAG_NEEDED_SENT = _ST["icmp_frag_needed_sent"]
_RST_SENT = _ST["rst_sent"]
_ICMP_RATELIMITED = _ST["icmp_ratelimited"]
_RST_RATELIMITED = _ST["rst_ratelimited"]
_FRAG_OUT = _ST["frag_out"]
_TX_TUNNELED = _ST["tx_tunneled"]
_DROP_TTL = _ST["drop_ttl"]
_ICMP_TIME_EXCEEDED_SENT = _ST["icmp_time_exceeded_sent"]
_DROP_NO_ROUTE = _ST["drop_no_route"]
_TUN_PMTU_LEARNED = _ST["tun_pmtu_learned"]
_DROP_TUN_ICMP = _ST["drop_tun_icmp"]
_TUN_ICMP_RELAYED = _ST["tun_icmp_relayed"]
_DROP_UPCALL_LIMIT = _ST["drop_upcall_limit"]
_SCHED_LIMITED = -3   # _call_schedule: the upcall limit said no (SCHED_LIMITED)
_DROP_DEFENSE = _ST["drop_defense"]
_DROP_RS_NO_CONN = _ST["drop_rs_no_conn"]
_DROP_SYNC_NO_MAC = _ST["drop_sync_no_mac"]
_SYNC_QUEUED = _ST["sync_queued"]
_SYNC_QUEUE_FULL = _ST["sync_queue_full"]
_SYNC_L2_ROUTED = _ST["sync_l2_routed"]
_UPCALL_SHARE = tables.SYSCTL_INDEX["upcall_share"]
_FTP_PORT = 21   # ip_vs_sched_persist: an FTP service's templates have vport 0
# The upcall limit's bucket holds this many seconds of `now` at the share
# (ip_vs.h UPCALL_WINDOW).
_UPCALL_WINDOW = 0.01
_PRESSURE_WINDOW = 0.01   # s: pressure_conn_rate's burst (ip_vs.h PRESSURE_WINDOW)
_PRESSURE_CONN_RATE = tables.SYSCTL_INDEX["pressure_conn_rate"]
_DROP_PRESSURE = _ST["drop_pressure"]

_NO_DEST = (0, 0, 0, 0, 0, 0, 0, bytes(6), bytes(6), 0, 0, 0)  # a dest row with flags 0
_N_PEERS = 1024   # the per-destination ICMP limit's cache (C: ICMP_PEERS)
# Learned tunnel path MTUs (C: struct tun_pmtu and its comment in ip_vs.h):
# a fixed cache of 256 slots, slot (daddr * 0x9E3779B1 mod 2^32) >> 24, a
# newcomer replacing the holder of its slot.
_PMTU_SLOTS = 256
_PMTU_EXPIRES = 600.0  # net.ipv4.route.mtu_expires, s
_PMTU_MIN = 552        # net.ipv4.route.min_pmtu
_IPPROTO_IPIP = 4
_ICMP_SOURCE_QUENCH = 4
_DO_FRAGMENT = -1  # _mtu_refusal: not a refusal, fragment after the rewrite
V_PASS, V_TX, V_DROP, V_EMIT = tables.V_PASS, tables.V_TX, tables.V_DROP, tables.V_EMIT
TCP, UDP, ICMP = tables.PROTO_TCP, tables.PROTO_UDP, 1
_SYS = tables.SYSCTL_INDEX
_IN_KEEP, _IN_RESCHED, _IN_DROPPED = 0, 1, 2  # _in_rules
_IP_DF = 0x4000
_ICMP_DEST_UNREACH, _ICMP_PORT_UNREACH, _ICMP_FRAG_NEEDED = 3, 3, 4
_ICMP_TIME_EXCEEDED, _ICMP_EXC_TTL = 11, 0
# How a conn's packets leave, bound when it is made (kernel ip_vs_bind_xmit);
# as XMIT_* in ip_vs.h.
XMIT_NAT, XMIT_DR, XMIT_NONE, XMIT_TUN = 0, 1, 2, 3
_TUN_F_CSUM = 1        # dest tun_flags: pylvs.forward.tunnel.TUN_F_CSUM
_TUN_FRAG_MAX = 64     # fragments of one packet before encapsulation (C: TUN_FRAG_MAX)
_RESOLVED_OR_NO_ROUTE = tables.DEST_F_RESOLVED | tables.DEST_F_NO_ROUTE
_LSRR, _SSRR = 131, 137
ETH = tables.VNET_HDR_LEN          # offset of the Ethernet header
IP = ETH + 14                      # offset of the IPv4 header
_TCP_SYN, _TCP_ACK, _TCP_RST = states.TCP_SYN, states.TCP_ACK, states.TCP_RST


def _bind_xmit(dest: tuple) -> int:
    """The XMIT_* kind of a conn to this dest row (the kernel's ip_vs_bind_xmit)."""
    fwd = dest[4]
    if fwd == tables.FWD_MASQ:
        return XMIT_NAT
    if fwd == tables.FWD_ROUTE:
        return XMIT_DR
    if fwd == tables.FWD_TUNNEL and tunnel.tun_overhead(dest[9]):
        return XMIT_TUN
    return XMIT_NONE


def _option_malformed(o) -> bool:
    """An option (type, length, ...) the kernel's ip_options_compile refuses on
    receive: record route and source routes need a pointer >= 4 and room for
    the next address; a timestamp a pointer >= 5, room for its entry kind, or
    an overflow count below 15 once full."""
    t, n = o[0], len(o)
    if t in (7, _LSRR, _SSRR):
        if n < 3 or o[2] < 4:
            return True
        return t == 7 and o[2] <= n and o[2] + 3 > n
    if t == 68:
        if n < 4 or o[2] < 5:
            return True
        if o[2] <= n:
            kind = o[3] & 0x0F
            if kind == 0:
                return o[2] + 3 > n
            if kind in (1, 3):
                return o[2] + 7 > n
            return False
        return o[3] >> 4 == 0x0F
    return False


def _decrease_ttl(f: memoryview) -> None:
    """TTL - 1 with the header checksum updated (RFC 1624), as every
    forwarded packet (kernel ip_decrease_ttl); the caller checked TTL > 1."""
    old = f[IP + 8] << 8 | f[IP + 9]
    f[IP + 8] -= 1
    hc = f[IP + 10] << 8 | f[IP + 11]
    f[IP + 10:IP + 12] = update16(hc, old, old - 0x100).to_bytes(2, "big")


def _report_unraisable(exc: BaseException, obj: object) -> None:
    """Hand a scheduler exception to sys.unraisablehook, as PyErr_WriteUnraisable does."""
    args = _unraisable_args(type(exc), exc, exc.__traceback__, None, obj)
    sys.unraisablehook(args)


def _unraisable_args(*fields):
    # The default hook insists on the interpreter's own UnraisableHookArgs
    # type, which Python code cannot name; capture it once from a real
    # unraisable exception (a __del__ that raises).
    global _UNRAISABLE_TYPE
    if _UNRAISABLE_TYPE is None:
        seen: list = []
        old = sys.unraisablehook
        sys.unraisablehook = seen.append
        try:
            class _Probe:
                def __del__(self):
                    raise RuntimeError("probe")
            _Probe()
        finally:
            sys.unraisablehook = old
        _UNRAISABLE_TYPE = type(seen[0]) if seen else False
    if _UNRAISABLE_TYPE:
        return _UNRAISABLE_TYPE(fields)
    import types
    return types.SimpleNamespace(exc_type=fields[0], exc_value=fields[1],
                                 exc_traceback=fields[2], err_msg=fields[3], object=fields[4])


_UNRAISABLE_TYPE = None


def _check_transitions(transitions) -> list:
    """A TCP state table (uint8 [3, 4, 11]) as nested lists; TypeError or
    ValueError as the C engine's."""
    t = np.asarray(transitions)
    if t.dtype != np.uint8:
        raise TypeError("transitions must have dtype uint8")
    if t.shape != (3, 4, states.N_TCP_STATES):
        raise ValueError(f"transitions must have shape (3, 4, {states.N_TCP_STATES})")
    if int(t.min()) < 0 or int(t.max()) >= states.N_TCP_STATES:
        raise ValueError("transitions must name TCP states")
    return t.astype(np.int64).tolist()


class Engine:
    """The reference engine. See docs/engine.md for what every method does."""

    def __init__(self, capacity: int, *, key: bytes, transitions: np.ndarray,
                 timeouts: np.ndarray, counters: tables.Counters,
                 schedule: Callable[[int, int, int], int]):
        capacity = operator.index(capacity)
        if not 1 <= capacity <= MAX_LIMIT:
            raise ValueError(f"capacity must be 1..{MAX_LIMIT}, not {capacity}")
        key = bytes(key)
        if len(key) != 16:
            raise ValueError(f"key must be 16 bytes, not {len(key)}")
        trans = _check_transitions(transitions)
        if not callable(schedule):
            raise TypeError("schedule must be callable")
        self._busy = False  # inside the scheduler upcall
        self._trans = trans
        self.set_timeouts(timeouts)
        self._counters = counters
        self._schedule = schedule
        self._pend = [0] * tables.N_STATS
        # The reference indexes conns in a dict of Python tuples. CPython's
        # tuple-of-int hash is not keyed, so clients could flood a chain; the
        # C engine hashes with keyed SipHash for that reason.
        self._ct = ConnTable(capacity, key, counters, self._pend)
        # Schedulers run by the engine and the overload flag (sched_c.py).
        self._sched = sched_c.EngineSched(counters)
        self._ct.unbind = lambda d: sched_c.unbind(counters, self._sched.thresholds, d)
        self._index = self._ct.index
        self._sysctl = list(tables.SYSCTL_DEFAULTS)
        self._svc_by_key: dict[tuple[int, int, int], int] = {}
        self._svc_persist: dict[int, tuple[int, int, int]] = {}  # slot: (timeout, netmask, vport)
        self._nullsvc = 0   # used services of port 0
        self._dests: list[tuple] = []
        self._dest_table = tables.empty_dests(0)
        self._svc_table = tables.empty_services(0)
        self._ports: list[tuple[int, int, bytes, int, int]] = []
        self._routes: list[tuple[int, int, int]] | None = None  # None: never set
        self._local: frozenset[int] = frozenset()
        self._sysctl = list(tables.SYSCTL_DEFAULTS)
        # Token buckets [tokens, last now or None] for the messages the
        # engine makes on its own (docs/engine.md, rate limits).
        self._icmp_bucket: list = [0.0, None]
        self._rst_bucket: list = [0.0, None]
        self._peers: list = [None] * _N_PEERS  # [addr, tokens (ms), last now]
        self._pmtu: list = [None] * _PMTU_SLOTS  # (daddr, mtu, expires)
        self._ip_id = int.from_bytes(key[:8], "little") & 0xFFFF
        self._emit: icmp.Emit | None = None
        self.pressure = False  # the receive ring is backed up (docs/engine.md, "Upcall limit")
        self._upcall_cost = 0.0
        self._upcall_bucket: list = [0.0, None]  # [seconds of upcall time, last now]
        self._pressure_bucket: list = [0.0, None]  # [conns, last now]: pressure_conn_rate
        # Defence (docs/engine.md, "Defence"): drop_packet's rate and
        # countdown, set by control; a one-packet conn made by the frame
        # being processed, removed once it is done.
        self._drop_rate = 0
        self._drop_counter = 0
        self._ops_conn: Conn | None = None
        # Sync master (docs/engine.md, "Sync"): the records queued for
        # sync_drain and the queue's size; None while master mode is off.
        self._sync_q: collections.deque | None = None
        self._sync_cap = 0

    # --- configuration ----------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._ct.limit

    @property
    def conn_count(self) -> int:
        return self._ct.count

    @property
    def memory(self) -> int:
        """Bytes the C engine's conn table would hold now (conn.py)."""
        return self._ct.memory

    @property
    def upcall_cost(self) -> float:
        """Seconds one scheduler upcall takes, as control measured it (0:
        unknown, no limit); ValueError outside 0..1."""
        return self._upcall_cost

    @upcall_cost.setter
    def upcall_cost(self, seconds: float) -> None:
        v = float(seconds)
        if not 0.0 <= v <= 1.0:
            raise ValueError("upcall_cost must be 0..1 seconds")
        self._upcall_cost = v

    def _refuse_if_busy(self) -> None:
        if self._busy:
            raise RuntimeError("Engine is inside a scheduler upcall and cannot be changed or re-entered")

    def set_timeouts(self, timeouts: np.ndarray) -> None:
        self._refuse_if_busy()
        t = np.asarray(timeouts)
        if t.dtype != np.float64:
            raise TypeError("timeouts must have dtype float64")
        if t.shape != (states.N_TIMEOUTS,):
            raise ValueError(f"timeouts must have shape ({states.N_TIMEOUTS},)")
        if not np.all(np.isfinite(t)):
            raise ValueError("timeouts must be finite numbers")
        self._timeouts = [float(x) for x in t]

    def set_transitions(self, transitions: np.ndarray) -> None:
        """The TCP state table from now on (uint8 [3, 4, 11]): control hands
        states.TRANSITIONS_DOS while secure_tcp is on, else TRANSITIONS."""
        self._refuse_if_busy()
        self._trans = _check_transitions(transitions)

    def set_drop_rate(self, rate: int, counter: int = -1) -> None:
        """drop_packet: drop 1 in `rate` new-flow packets (0: none); a
        `counter` >= 0 restarts the countdown (the kernel's drop_counter)."""
        rate, counter = operator.index(rate), operator.index(counter)
        if rate < 0:
            raise ValueError("drop rate must not be negative")
        self._drop_rate = rate
        if counter >= 0:
            self._drop_counter = counter

    def drop_entries(self, now: float) -> int:
        """drop_entry: the kernel's ip_vs_random_dropentry (conn.py,
        ConnTable.drop_entries); returns the conns dropped."""
        self._refuse_if_busy()
        try:
            return self._ct.drop_entries(float(now), self._timeouts)
        finally:
            self._flush()

    def expire_nodest(self) -> int:
        """expire_nodest_conn's flush after a dest is deleted (the kernel's
        ip_vs_expire_nodest_conn_flush): every conn whose dest is gone is
        expired (conns_expired); returns how many."""
        self._refuse_if_busy()
        n = 0
        for c in self._ct.conns():   # slot order, as the C engine's scan
            if self._conn_dest(c) is not None or tpl_held(c):
                continue
            tpl = c.control
            self._ct.remove(c, CONNS_EXPIRED)
            n += 1
            if tpl is not None and tpl.n_control == 0 and tpl.slot < c.slot:
                self._ct.remove(tpl, CONNS_EXPIRED)
                n += 1
        self._flush()
        return n

    def set_tables(self, services: np.ndarray, dests: np.ndarray) -> None:
        self._refuse_if_busy()
        if services.dtype != tables.SERVICE_DTYPE or dests.dtype != tables.DEST_DTYPE:
            raise TypeError("services and dests must use SERVICE_DTYPE and DEST_DTYPE")
        if services.ndim != 1 or dests.ndim != 1:
            raise ValueError("services and dests must be one-dimensional")
        if len(services) > self._counters.max_services or len(dests) > self._counters.max_dests:
            raise ValueError("more slots than the counter arrays have rows")
        # Only used rows are converted (the control plane publishes arrays
        # with room for every slot it may ever use); the others read as
        # flags 0, which every step treats as "no such dest".
        by_key: dict[tuple[int, int, int], int] = {}
        used = np.flatnonzero(services["flags"] & tables.SVC_F_USED)
        rows = services[used]
        persist: dict[int, tuple[int, int, int]] = {}
        for s, vaddr, vport, proto, timeout, netmask in zip(
                used.tolist(), rows["vaddr"].tolist(), rows["vport"].tolist(),
                rows["proto"].tolist(), rows["timeout"].tolist(), rows["netmask"].tolist()):
            # The lowest slot wins if the control plane ever lists a service twice.
            by_key.setdefault((proto, vaddr, vport), s)
            persist[s] = (timeout, netmask, vport)
        self._svc_persist = persist
        self._nullsvc = int(np.count_nonzero(rows["vport"] == 0))
        ds = [_NO_DEST] * len(dests)
        used = np.flatnonzero(dests["flags"])
        rows = dests[used]
        dmacs, smacs = rows["dmac"].tobytes(), rows["smac"].tobytes()
        for i, (d, daddr, dport, svc, weight, fwd, flags, out_port, tt, tf, tp) in enumerate(zip(
                used.tolist(), rows["daddr"].tolist(), rows["dport"].tolist(),
                rows["svc"].tolist(), rows["weight"].tolist(), rows["fwd"].tolist(),
                rows["flags"].tolist(), rows["out_port"].tolist(), rows["tun_type"].tolist(),
                rows["tun_flags"].tolist(), rows["tun_port"].tolist())):
            ds[d] = (daddr, dport, svc, weight, fwd, flags, out_port,
                     dmacs[6 * i:6 * i + 6], smacs[6 * i:6 * i + 6], tt, tf, tp)
        self._svc_table, self._dest_table = services, dests
        self._svc_by_key, self._dests = by_key, ds

    def set_sched(self, sched_svcs: np.ndarray, sched_dests: np.ndarray,
                  thresholds: np.ndarray, sched_table: np.ndarray) -> None:
        self._refuse_if_busy()
        self._sched.set(sched_svcs, sched_dests, thresholds, sched_table)

    def set_ports(self, ports: np.ndarray) -> None:
        """The I/O ports' facts (PORT_DTYPE, index = port): address, MTU, MAC, rp_filter."""
        self._refuse_if_busy()
        if not isinstance(ports, np.ndarray) or ports.dtype != tables.PORT_DTYPE:
            raise TypeError("ports must be an array of PORT_DTYPE")
        if ports.ndim != 1:
            raise ValueError("ports must be one-dimensional")
        self._ports = [(int(r["addr"]), int(r["mtu"]), bytes(r["mac"].tobytes()),
                        int(r["flags"]), int(r["rp_filter"])) for r in ports]

    def set_routes(self, routes: np.ndarray, local: np.ndarray) -> None:
        """The namespace's routes (ROUTE_DTYPE, longest prefix first) and its own
        addresses (uint32, host order, ascending)."""
        self._refuse_if_busy()
        if not isinstance(routes, np.ndarray) or routes.dtype != tables.ROUTE_DTYPE:
            raise TypeError("routes must be an array of ROUTE_DTYPE")
        if not isinstance(local, np.ndarray) or local.dtype != np.uint32:
            raise TypeError("local must be an array of uint32")
        if routes.ndim != 1 or local.ndim != 1:
            raise ValueError("routes and local must be one-dimensional")
        if len(local) > 1 and not bool(np.all(local[1:] >= local[:-1])):
            raise ValueError("local must be sorted ascending")
        rs = []
        for r in routes:
            plen = int(r["plen"])
            if plen > 32:
                raise ValueError(f"route prefix length {plen} is over 32")
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            mac = bytes(r["mac"].tobytes()) if int(r["flags"]) & tables.ROUTE_F_MAC else None
            rs.append((int(r["prefix"]) & mask, mask, int(r["port"]), mac))
        self._routes = rs
        self._local = frozenset(int(a) for a in local.tolist())

    def set_sysctls(self, values: np.ndarray) -> None:
        """The knobs of tables.SYSCTL_NAMES, int64[N_SYSCTL]; negative values are refused."""
        self._refuse_if_busy()
        v = np.asarray(values)
        if v.dtype != np.int64:
            raise TypeError("sysctls must have dtype int64")
        if v.shape != (tables.N_SYSCTL,):
            raise ValueError(f"sysctls must have shape ({tables.N_SYSCTL},)")
        if int(v.min()) < 0:
            raise ValueError("sysctl values must not be negative")
        self._sysctl = [int(x) for x in v]

    # --- conns ------------------------------------------------------------

    @staticmethod
    def _conn_tuple(c: Conn) -> tuple:
        if c.template:
            return (c.proto & ~TPL_PROTO, c.caddr, c.cport, c.vaddr, c.vport, c.daddr, c.dport,
                    c.state, c.expires, c.fwd | tables.CONN_F_TEMPLATE, c.dest, c.svc)
        return (c.proto, c.caddr, c.cport, c.vaddr, c.vport, c.daddr, c.dport,
                c.state, c.expires, c.fwd, c.dest, c.svc)

    def conns(self) -> list[tuple]:
        return [self._conn_tuple(c) for c in self._ct.conns()]

    def conns_chunk(self, start: int, count: int) -> tuple[list[tuple], int]:
        """conns() in pieces, as the C engine: from slot ``start``, at most
        ``count`` conns, and the slot to go on from (-1 at the end).
        ValueError for count < 1."""
        start, count = operator.index(start), operator.index(count)
        if count < 1:
            raise ValueError("conns_chunk: count must be at least 1")
        slots = self._ct.slots
        out: list[tuple] = []
        i = max(0, start)
        while i < len(slots) and len(out) < count:
            if slots[i] is not None:
                out.append(self._conn_tuple(slots[i]))
            i += 1
        return out, i if i < len(slots) else -1

    # --- sync (docs/engine.md, "Sync"; C: ip_vs_sync.c) --------------------

    def set_sync_master(self, on: bool) -> None:
        """Queue conns for sync_drain as the kernel's master (on), or stop and
        drop the queue (off). The queue holds sync_qlen_max records as set
        when master mode starts (1 .. 2**24)."""
        self._refuse_if_busy()
        if not on:
            self._sync_q, self._sync_cap = None, 0
        elif self._sync_q is None:
            self._sync_cap = min(max(self._sysctl[_SYS["sync_qlen_max"]], 1), sync.QLEN_LIMIT)
            self._sync_q = collections.deque()

    def _sync_conn(self, c: Conn, ops: bool, now: float) -> None:
        """ip_vs_sync_conn: the conn (never a one-packet one) and its template."""
        if not ops and sync.needed(c, c.in_pkts, now, self._sysctl, self._timeouts):
            self._sync_queue(c)
        t = c.control
        if t is not None:
            t.in_pkts = (t.in_pkts + 1) & 0xFFFFFFFF
            if sync.needed(t, t.in_pkts, now, self._sysctl, self._timeouts):
                self._sync_queue(t)

    def _sync_queue(self, c: Conn) -> None:
        if c.template and c.in_key is None:
            return   # an invalidated template: nothing a backup could use
        if len(self._sync_q) >= min(self._sysctl[_SYS["sync_qlen_max"]], self._sync_cap):
            self._pend[_SYNC_QUEUE_FULL] += 1
            return
        self._sync_q.append(sync.record(c, self._timeouts))
        self._pend[_SYNC_QUEUED] += 1

    def _route(self, addr: int) -> tuple[int, int, int, bytes | None] | None:
        """The first (longest) route matching addr: (prefix, mask, port, next
        hop's MAC or None), or None (the kernel's fib_lookup, main table)."""
        for r in self._routes or ():
            if addr & r[1] == r[0]:
                return r
        return None

    def _sync_route_l2(self, c: Conn) -> bool:
        """A synced conn sending toward a client it has not heard: bind its
        client side from the route to caddr when control gave that route the
        next hop's MAC (ROUTE_F_MAC), as the kernel routes the packet (FIB,
        neighbour table). False: no such route (the caller drops as before)."""
        r = self._route(c.caddr)
        if r is None or r[3] is None:
            return False
        p = self._port_row(r[2])
        if p is None or p[3] & tables.PORT_F_LOCAL:
            return False
        c.cmac, c.lmac, c.in_port, c.no_l2 = r[3], p[2], r[2], False
        self._pend[_SYNC_L2_ROUTED] += 1
        return True

    @staticmethod
    def _sync_learn_l2(c: Conn, f: memoryview, in_port: int) -> None:
        c.cmac = bytes(f[ETH + 6:ETH + 12])
        c.lmac = bytes(f[ETH:ETH + 6])
        c.in_port = in_port
        c.no_l2 = False

    @staticmethod
    def _records(out: np.ndarray, what: str) -> np.ndarray:
        if not isinstance(out, np.ndarray) or out.dtype != sync.SYNC_DTYPE:
            raise TypeError(f"{what} must have dtype tables.SYNC_DTYPE")
        if out.ndim != 1:
            raise ValueError(f"{what} must be one-dimensional")
        return out

    def sync_drain(self, out: np.ndarray) -> int:
        """Move up to len(out) queued records into out, oldest first; returns
        how many. 0 while master mode is off."""
        self._refuse_if_busy()
        out = self._records(out, "out")
        if not out.flags.writeable:
            raise ValueError("out must be writable")
        q = self._sync_q
        n = min(len(out), len(q)) if q is not None else 0
        for i in range(n):
            out[i] = q.popleft()
        return n

    def sync_chunk(self, start: int, out: np.ndarray,
                   now: float | None = None) -> tuple[int, int]:
        """The table as records from slot ``start`` (templates included),
        as many as ``out`` holds: (records filled, the slot to go on from or
        -1 at the end). ``now``: conns carry the time they have left
        (sync.time_left), as in the C engine."""
        start = operator.index(start)
        out = self._records(out, "out")
        if not out.flags.writeable:
            raise ValueError("out must be writable")
        slots = self._ct.slots
        i, n = max(0, start), 0
        while i < len(slots) and n < len(out):
            c = slots[i]
            if c is not None and not (c.template and c.in_key is None):
                out[n] = sync.record(c, self._timeouts)
                if now is not None and not c.template:
                    out[n]["timeout"] = sync.time_left(c.expires, float(now),
                                                       int(out[n]["timeout"]))
                n += 1
            i += 1
        return n, i if i < len(slots) else -1

    def sync_install(self, records: np.ndarray, now: float) -> int:
        """Create or update conns and templates from records, as the kernel's
        ip_vs_proc_conn; returns the records installed or updated. Each
        record bumps one sync_* counter."""
        self._refuse_if_busy()
        records = self._records(records, "records")
        now = float(now)
        done = 0
        try:
            for r in records.tolist():
                st = self._sync_install_one(*r, now)
                self._pend[_ST[st]] += 1
                done += st in ("sync_installed", "sync_updated")
        finally:
            self._flush()
        return done

    def _sync_install_one(self, proto: int, state: int, flags: int, caddr: int, cport: int,
                          vaddr: int, vport: int, daddr: int, dport: int, fwmark: int,
                          timeout: int, now: float) -> str:
        why = sync.refusal(proto, state, flags, cport, fwmark)
        if why is not None:
            return why
        tpl = bool(flags & sync.CONN_F_TEMPLATE)
        key = (proto | TPL_PROTO if tpl else proto, caddr, cport, vaddr, vport)
        hit = self._index.get(key)
        if hit is not None and hit[1] != states.INPUT:
            hit = None
        c = hit[0] if hit is not None else None
        if c is not None and c.expires <= now and not tpl_held(c):
            self._ct.remove(c, CONNS_EXPIRED)
            c = None
        if c is not None and not tpl and (c.daddr != daddr or c.dport != dport):
            # Another real server here: an active record replaces the conn,
            # an inactive one is the last word of a conn already replaced.
            if flags & sync.CONN_F_INACTIVE:
                return "sync_stale"
            self._ct.remove(c, CONNS_EXPIRED)
            c = None
        if c is not None:
            self._sync_apply(c, proto, state, timeout, now)
            return "sync_updated"
        svc = self._find_service(proto, vaddr, vport)
        if svc is None:
            return "sync_no_dest"
        d = self._sync_find_dest(svc, daddr, dport)
        if d is None:
            return "sync_no_dest"
        dest = self._dests[d]
        fwd = dest[4]   # ip_vs_bind_dest: this director's dest decides the method
        xmit = XMIT_NONE if tpl else _bind_xmit(dest)
        out_key = None
        if xmit == XMIT_NAT:
            out_key = (proto, daddr, dport, caddr, cport)
            if out_key == key or self._lookup(out_key, now) is not None:
                return "sync_rejected"   # another conn holds the real-server side
        ct = self._ct
        victim = ct.victim(now, self._timeouts) if ct.full() else None
        if ct.full() and victim is None:
            return "sync_table_full"
        c = Conn()
        c.proto, c.caddr, c.cport, c.vaddr, c.vport = key
        c.daddr, c.dport, c.fwd, c.svc, c.dest = daddr, dport, fwd, svc, d
        c.cmac = c.lmac = bytes(6)
        c.in_port, c.replied, c.xmit = tables.NO_PORT, False, xmit
        c.in_dir = states.INPUT if xmit == XMIT_NAT else states.INPUT_ONLY
        c.in_key, c.out_key = key, out_key
        c.template, c.synced, c.no_l2 = tpl, True, not tpl
        c.tpl_timeout = 0
        c.state = 0 if tpl else sync.engine_state(proto, state, False)
        c.sync_end = sync.sec16(now)
        c.expires = now
        ct.add(c, victim, now)
        self._pend[_CONNS_CREATED] += 1
        cnt = self._counters
        if tpl:
            cnt.dest_persist[d] += 1
        else:
            active = proto == TCP and c.state in states.ACTIVE
            cnt.dest_conns[d, tables.ACTIVE if active else tables.INACTIVE] += 1
        sched_c.bind(cnt, self._sched.thresholds, d)
        self._sync_apply(c, proto, state, timeout, now)
        return "sync_installed"

    def _sync_find_dest(self, svc: int, daddr: int, dport: int) -> int | None:
        """The dest of the service at daddr:dport, else at daddr with port 0
        (the kernel's ip_vs_find_dest)."""
        zero = None
        for d, row in enumerate(self._dests):
            if row[5] & tables.DEST_F_USED and row[2] == svc and row[0] == daddr:
                if row[1] == dport:
                    return d
                if row[1] == 0 and zero is None:
                    zero = d
        return zero

    def _sync_apply(self, c: Conn, proto: int, state: int, timeout: int, now: float) -> None:
        """What every install sets (ip_vs_proc_conn's tail): the state (the
        dest's active/inactive count follows), the sync memory, in_pkts at
        sync_threshold, the timer from the record's timeout."""
        st = sync.engine_state(proto, state, c.template)
        if not c.template and c.dest < self._counters.max_dests:
            was = c.proto == TCP and c.state in states.ACTIVE
            now_active = c.proto == TCP and st in states.ACTIVE
            if was != now_active:
                v = 1 if now_active else -1
                self._counters.dest_conns[c.dest, tables.ACTIVE] += v
                self._counters.dest_conns[c.dest, tables.INACTIVE] -= v
        c.state = st
        c.sync_old = st & 0x0F
        c.in_pkts = self._sysctl[_SYS["sync_threshold"]] & 0xFFFFFFFF
        if c.template:
            c.tpl_timeout = timeout or sync.TPL_DEFAULT_TIMEOUT
            c.expires = now + c.tpl_timeout
        else:
            c.expires = now + (timeout or self._timeouts[st])

    def _lookup(self, key: tuple, now: float):
        return self._ct.lookup(key, now)

    def expire(self, now: float, budget: int) -> int:
        now = float(now)
        budget = operator.index(budget)
        self._refuse_if_busy()
        n = self._ct.expire(now, budget)
        self._flush()
        return n

    def _flush(self) -> None:
        pend = self._pend
        stats = self._counters.stats
        for i, v in enumerate(pend):
            if v:
                stats[i] += v
                pend[i] = 0

    # --- frames -----------------------------------------------------------

    def process(self, batch: tables.Batch, now: float) -> int:
        now = float(now)
        self._refuse_if_busy()
        slot = batch.buf.shape[1]
        for i in range(batch.count):
            if int(batch.length[i]) > slot:
                raise ValueError(f"batch.length[{i}] = {int(batch.length[i])} is longer than "
                                 f"the {slot}-byte slot")
        tx = 0
        self._emit = icmp.Emit(batch.emit_buf, batch.emit_off, batch.emit_len,
                               batch.emit_port, batch.emit_n)
        self._emit.clear()
        try:
            for i in range(batch.count):
                n = int(batch.length[i])
                self._pend[_RX] += 1
                verdict, out_port = self._frame(batch.buf[i].data, n, int(batch.in_port[i]), now)
                if self._ops_conn is not None:
                    self._ops_done()
                batch.verdict[i] = verdict
                if verdict == V_TX:
                    batch.out_port[i] = out_port
                    self._pend[_TX] += 1
                    tx += 1
        finally:
            self._emit = None
            self._flush()
        return tx

    # --- what the engine makes: ICMP errors, RSTs, fragments ---------------

    def _allow(self, bucket: list, now: float, per_sec: int, burst: int) -> bool:
        """A token bucket: full at first use, refilled by per_sec a second of `now`."""
        if bucket[1] is None:
            bucket[0], bucket[1] = float(burst), now
        elif now > bucket[1]:
            bucket[0] = min(float(burst), bucket[0] + (now - bucket[1]) * per_sec)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        return False

    def _peer_allow(self, daddr: int, now: float) -> bool:
        """The kernel's per-destination ICMP limit (icmpv4_xrlim_allow,
        inet_peer_xrlim_allow): one error per icmp_ratelimit ms to a host,
        a burst of 6 (XRLIM_BURST_FACTOR). Peers live in a 1024-entry cache
        indexed by a multiplicative hash of the address; a newcomer in a slot
        starts with a full burst, as a new inet_peer does."""
        rl = self._sysctl[_SYS["icmp_ratelimit"]]
        i = ((daddr * 0x9E3779B1) & 0xFFFFFFFF) >> 22
        peer = self._peers[i]
        if peer is None or peer[0] != daddr:
            peer = [daddr, 6.0 * rl, now]
            self._peers[i] = peer
        elif now > peer[2]:
            peer[1] = min(6.0 * rl, peer[1] + (now - peer[2]) * 1000.0)
            peer[2] = now
        if peer[1] >= rl:
            peer[1] -= rl
            return True
        return False

    def _room(self, need: int) -> bool:
        """Room in the emit area for one frame of `need` bytes (as C's emit_room)."""
        em = self._emit
        return (em is not None and int(em.n[0]) < em.max
                and len(em.buf) - int(em.n[1]) >= need)

    def _send_rst(self, f: memoryview, ihl: int, totlen: int, in_port: int, now: float) -> None:
        """Answer a TCP segment that matches no conn, as the kernel's stack would."""
        sc, pend = self._sysctl, self._pend
        if not self._allow(self._rst_bucket, now, sc[_SYS["tcp_rst_per_sec"]],
                           sc[_SYS["tcp_rst_burst"]]):
            pend[_RST_RATELIMITED] += 1
            return
        if not self._room(ETH + 14 + 40):
            pend[_EMIT_OVERFLOW] += 1
            return
        ip = f[IP:IP + totlen]
        if icmp.tcp_reset(self._emit, in_port, f[ETH:ETH + 14], ip, ip[ihl:], totlen - ihl):
            pend[_EMIT_FRAMES] += 1
            pend[_RST_SENT] += 1

    def _send_icmp(self, f: memoryview, totlen: int, in_port: int, now: float, icmp_type: int,
                   code: int, info: int, saddr: int) -> None:
        """An ICMP error about the frame, back out of its port. Frag-needed is
        exempt from the rate limit (kernel icmpv4_mask_allow)."""
        self._send_icmp_about(f[ETH:ETH + 14], f[IP:IP + totlen], totlen, in_port, now,
                              icmp_type, code, info, saddr)

    def _send_icmp_about(self, eth, ip, totlen: int, port: int, now: float, icmp_type: int,
                         code: int, info: int, saddr: int) -> None:
        """An ICMP error about the packet `ip` (totlen bytes) that came with
        Ethernet header `eth`, out of `port` (C: send_icmp)."""
        sc, pend = self._sysctl, self._pend
        frag_needed = icmp_type == _ICMP_DEST_UNREACH and code == _ICMP_FRAG_NEEDED
        if not frag_needed and not (
                self._allow(self._icmp_bucket, now, sc[_SYS["icmp_msgs_per_sec"]],
                            sc[_SYS["icmp_msgs_burst"]])
                and self._peer_allow(int.from_bytes(ip[12:16], "big"), now)):
            pend[_ICMP_RATELIMITED] += 1
            return
        if not self._room(ETH + 14 + 28 + min(totlen, icmp.ICMP_ERR_MAX - 28)):
            pend[_EMIT_OVERFLOW] += 1
            return
        if icmp.icmp_error(self._emit, port, eth, ip, totlen,
                           icmp_type, code, info, saddr, self._ip_id):
            self._ip_id = (self._ip_id + 1) & 0xFFFF
            pend[_EMIT_FRAMES] += 1
            pend[_ICMP_TIME_EXCEEDED_SENT if icmp_type == _ICMP_TIME_EXCEEDED
                 else _ICMP_FRAG_NEEDED_SENT if frag_needed else _ICMP_UNREACH_SENT] += 1

    def _ttl_exceeded(self, f: memoryview, totlen: int, in_port: int, now: float, saddr: int,
                      answer: bool) -> int:
        """A frame to forward with TTL <= 1 (kernel ip_forward, IPVS
        decrement_ttl): drop_ttl, answered with ICMP time exceeded from
        `saddr` unless `answer` is false (an ICMP error gets no ICMP error)."""
        if answer:
            self._send_icmp(f, totlen, in_port, now, _ICMP_TIME_EXCEEDED, _ICMP_EXC_TTL, 0, saddr)
        return _DROP_TTL

    def _xmit_refusal(self, f: memoryview, dest: tuple, xmit: int, totlen: int, in_port: int,
                      now: float, saddr: int, answer: bool) -> int | None:
        """Why a client-side frame of a conn cannot leave toward its dest, in
        the kernel's order: the route (DEST_F_NO_ROUTE, for conns bound to
        DR only: a conn bound to another method keeps going when ``-e``
        makes its dest an unreachable DR dest), the TTL, the neighbour
        (DEST_F_RESOLVED); None when it can."""
        mask = _RESOLVED_OR_NO_ROUTE if xmit == XMIT_DR else tables.DEST_F_RESOLVED
        if dest[5] & mask == tables.DEST_F_RESOLVED and f[IP + 8] > 1:
            return None
        if dest[5] & mask & tables.DEST_F_NO_ROUTE:
            return _DROP_NO_ROUTE
        if f[IP + 8] <= 1:
            return self._ttl_exceeded(f, totlen, in_port, now, saddr, answer)
        return _DROP_UNRESOLVED

    def _reply_icmp_saddr(self, c: Conn, in_port: int) -> int:
        """The source of an ICMP error about a reply: the in port's address, else the VIP."""
        p = self._port_row(in_port)
        return p[0] if p is not None and p[0] else c.vaddr

    # --- what the kernel's receive path would refuse -----------------------

    def _count_traffic(self, c: Conn, pkts: int, bytes_col: int, totlen: int) -> None:
        """One packet of `totlen` bytes (IP length) for the conn's service and
        dest, in one direction's columns."""
        cnt = self._counters
        cnt.svc_stats[c.svc, pkts] += 1
        cnt.svc_stats[c.svc, bytes_col] += totlen
        cnt.dest_stats[c.dest, pkts] += 1
        cnt.dest_stats[c.dest, bytes_col] += totlen

    def _conn_dest(self, c: Conn) -> tuple | None:
        """The conn's dest while it is still the one the conn was made for (a
        dest deleted, or its slot reused by another service's, is gone)."""
        if c.dest < len(self._dests):
            dest = self._dests[c.dest]
            if dest[5] & tables.DEST_F_USED and dest[2] == c.svc:
                return dest
        return None

    def _port_row(self, port: int):
        if port < len(self._ports) and self._ports[port][3] & tables.PORT_F_USED:
            return self._ports[port]
        return None

    def _refusal(self, f: memoryview, ihl: int, in_port: int) -> int | None:
        """The counter refusing a frame the kernel would not take in, or None:
        not for this host's MAC (ip_rcv_core, ip_forward), a bad header
        checksum (ip_rcv_core), malformed options or a source route
        (ip_options_compile, accept_source_route=0)."""
        p = self._port_row(in_port)
        if p is not None and p[3] & tables.PORT_F_CHECK_MAC:
            if f[ETH] & 1:
                return _DROP_L2_BCAST
            if bytes(f[ETH:ETH + 6]) != p[2]:
                return _DROP_L2_OTHER_HOST
        if fold(ones_sum(f[IP:IP + ihl])) != 0xFFFF:
            return _DROP_BAD_IP_CSUM
        i, end = IP + 20, IP + ihl
        while i < end:
            t = f[i]
            if t == 0:
                break
            if t == 1:
                i += 1
                continue
            if i + 1 >= end or f[i + 1] < 2 or i + f[i + 1] > end:
                return _DROP_BAD_IP
            if _option_malformed(f[i:i + f[i + 1]]):
                return _DROP_BAD_IP
            if t == _LSRR or t == _SSRR:
                return _DROP_SOURCE_ROUTE
            i += f[i + 1]
        return None

    def _is_local_port(self, port: int) -> bool:
        p = self._port_row(port)
        return p is not None and bool(p[3] & tables.PORT_F_LOCAL)

    def _tcp_may_open(self, tcp_flags: int) -> bool:
        """May a TCP segment matching no conn make one? A SYN without ACK or
        RST; with sloppy_tcp any segment but a RST (tcp_conn_schedule)."""
        if tcp_flags & _TCP_RST:
            return False
        return bool(self._sysctl[_SYS["sloppy_tcp"]]) or (
            tcp_flags & (_TCP_SYN | _TCP_ACK)) == _TCP_SYN

    def _todrop(self) -> bool:
        """drop_packet's countdown (the kernel's ip_vs_todrop)."""
        self._drop_counter -= 1
        if self._drop_counter > 0:
            return False
        self._drop_counter = self._drop_rate
        return True

    def _ops_done(self) -> None:
        """A one-packet conn leaves the table once its frame is done (the
        kernel's ip_vs_conn_put of an OPS conn)."""
        c, self._ops_conn = self._ops_conn, None
        if self._ct.slots[c.slot] is c:
            self._ct.remove(c, CONNS_EXPIRED)

    def _rs_no_conn(self, f: memoryview, totlen: int, proto: int, tcp_flags: int, saddr: int,
                    sport: int, in_port: int, now: float) -> bool:
        """nat_icmp_send (ip_vs_out, ip_vs_has_real_service): a packet from a
        NAT real server matching no conn, not a TCP RST, is dropped
        (drop_rs_no_conn) and answered with ICMP port unreachable from the
        in port's address. False when the rule does not apply."""
        if proto == TCP and tcp_flags & _TCP_RST:
            return False
        svcs = self._svc_table
        for d in self._dests:
            if (d[5] & tables.DEST_F_USED and d[4] == tables.FWD_MASQ and d[0] == saddr
                    and d[1] == sport and d[2] < len(svcs) and int(svcs[d[2]]["proto"]) == proto):
                p = self._port_row(in_port)
                if p is not None and p[0]:
                    self._send_icmp(f, totlen, in_port, now, _ICMP_DEST_UNREACH,
                                    _ICMP_PORT_UNREACH, 0, p[0])
                self._pend[_DROP_RS_NO_CONN] += 1
                return True
        return False

    def _local_reply(self, proto: int, saddr: int, sport: int, daddr: int, dport: int,
                     totlen: int, in_port: int, now: float) -> tuple[int, int]:
        """A frame no conn and no service claims: a VS-DR/Tun real server's
        reply (from vaddr:vport) to a client on the director itself, whose
        frames came in on the loopback port, goes out there unchanged, to
        the local stack (docs/io.md, "Clients on the director"); anything
        else is the kernel's."""
        if not self._is_local_port(in_port):
            hit = self._lookup((proto, daddr, dport, saddr, sport), now)
            if hit is not None and hit[1] == states.INPUT:
                c = hit[0]
                if c.xmit in (XMIT_DR, XMIT_TUN) and self._is_local_port(c.in_port):
                    self._count_traffic(c, tables.STAT_OUTPKTS, tables.STAT_OUTBYTES, totlen)
                    return V_TX, c.in_port
        self._pend[_PASS_NOT_OURS] += 1
        return V_PASS, 0

    def _martian(self, saddr: int, in_port: int) -> int | None:
        """The counter refusing a new flow's source, or None: martian sources
        (kernel ip_route_input_slow: 0/8, 127/8, multicast, limited broadcast;
        fib_validate_source: one of our own addresses) and the reverse path
        check of the port's rp_filter (1 strict: the route back must leave by
        the port the frame came in on; 2 loose: a route back must exist).
        None for the loopback port: what this host sends, the kernel's IPVS
        takes at LOCAL_OUT (ip_vs_local_request4), before any route input;
        except a loopback source, which never leaves for a real server (all
        are remote here): ip_vs_xmit.c, "Stopping traffic from loopback
        address"."""
        if self._is_local_port(in_port):
            return _DROP_MARTIAN if saddr >> 24 == 127 else None
        if (saddr >> 24 == 0 or saddr >> 24 == 127 or saddr >> 28 == 14
                or saddr == 0xFFFFFFFF or saddr in self._local):
            return _DROP_MARTIAN
        p = self._port_row(in_port)
        if p is not None and p[4] and self._routes is not None:
            r = self._route(saddr)
            back = r[2] if r is not None else None
            if back is None or (p[4] == 1 and back != in_port):
                return _DROP_RP_FILTER
        return None

    def _egress_mtu(self, port: int, overhead: int = 0, learned: int = 0) -> int:
        """The MTU a packet may have leaving on `port` once `overhead` bytes of
        tunnel headers are added (0: no MTU known, no check); never below 68.
        `learned`: a learned path MTU (0: none) that lowers the port's."""
        p = self._port_row(port)
        mtu = p[1] if p is not None else 0
        if learned and (mtu == 0 or learned < mtu):
            mtu = learned
        if mtu == 0:
            return 0
        return mtu - overhead if mtu > overhead + 68 else 68

    # --- the tunnel path MTU (docs/engine.md, "Tunnel path MTU") -------------

    @staticmethod
    def _pmtu_slot(daddr: int) -> int:
        return ((daddr * 0x9E3779B1) & 0xFFFFFFFF) >> 24

    def _pmtu_get(self, daddr: int, now: float) -> int:
        """The path MTU learned towards daddr and not yet expired, or 0."""
        e = self._pmtu[self._pmtu_slot(daddr)]
        return e[1] if e is not None and e[0] == daddr and e[2] > now else 0

    def _pmtu_learn(self, daddr: int, egress: int, reported: int, now: float) -> int:
        """A router's next-hop MTU for the outer packets to daddr (kernel
        __ip_rt_update_pmtu): above the current path MTU it is no news; below
        min_pmtu it is taken as min_pmtu (never above the current one); the
        entry lives mtu_expires seconds. Returns the path MTU in force."""
        cur = self._egress_mtu(egress, 0, self._pmtu_get(daddr, now)) or 0xFFFF
        if reported > cur:
            return cur
        mtu = reported if reported >= _PMTU_MIN else min(cur, _PMTU_MIN)
        self._pmtu[self._pmtu_slot(daddr)] = (daddr, mtu, now + _PMTU_EXPIRES)
        return mtu

    def _own_addr(self, addr: int) -> bool:
        """One of the director's addresses: a port's, or one of `local`."""
        return any(p[3] & tables.PORT_F_USED and p[0] == addr for p in self._ports) or \
            addr in self._local

    def _tun_icmp_quote(self, f: memoryview, ihl: int, totlen: int) -> tuple | None:
        """(outer, outer_hl, inner, tun type) when this ICMP error (type 3, 4
        or 11) is about one of the director's tunnel packets: to an address of
        the director's, quoting an outer header from that same address that
        carries IPIP, or UDP starting with pylvs's GUE header (00 04 00 00).
        Offsets from the outer IP header; outer_hl 0: the outer header is
        malformed or a non-first fragment; inner 0: cut off. None: the
        ordinary ICMP path decides."""
        ip = f[IP:IP + totlen]
        o = ihl + 8
        if totlen < o + 20 or ip[ihl] not in (_ICMP_DEST_UNREACH, _ICMP_SOURCE_QUENCH,
                                              _ICMP_TIME_EXCEEDED):
            return None
        daddr = int.from_bytes(ip[16:20], "big")
        if ip[o] >> 4 != 4 or int.from_bytes(ip[o + 12:o + 16], "big") != daddr:
            return None
        hl = (ip[o] & 15) * 4
        whole = hl >= 20 and o + hl <= totlen and not (ip[o + 6] << 8 | ip[o + 7]) & 0x1FFF
        inner = o + hl
        if ip[o + 9] == _IPPROTO_IPIP:
            kind = tunnel.TUN_IPIP
        elif (ip[o + 9] == UDP and whole and inner + 12 <= totlen
              and bytes(ip[o + hl + 8:o + hl + 12]) == b"\x00\x04\x00\x00"):
            kind = tunnel.TUN_GUE
            inner += 12
        else:
            return None
        if not self._own_addr(daddr):
            return None
        return o, hl if whole else 0, inner if whole and inner + 20 <= totlen else 0, kind

    def _tun_icmp(self, f: memoryview, ihl: int, totlen: int, in_port: int, now: float,
                  quote: tuple) -> tuple[int, int]:
        """The kernel's ip_vs_in_icmp for its tunnels (C: tun_icmp): a
        router's frag-needed about an outer packet of a Tun conn is learned
        (_pmtu_learn) and, when the inner packet had DF, the client gets a
        frag-needed from the VIP with the path MTU less the tunnel's headers,
        quoting the inner packet as far as the router quoted it; V_PASS,
        tun_pmtu_learned (the director's kernel takes its copy too). Other
        errors (type 3, 4, 11) are relayed to the client as they came:
        V_PASS, tun_icmp_relayed. Malformed quotes, no such conn: V_DROP,
        drop_tun_icmp."""
        pend = self._pend
        refusal = self._refusal(f, ihl, in_port)
        if refusal is None:
            refusal = self._martian(int.from_bytes(f[IP + 12:IP + 16], "big"), in_port)
        if refusal is not None:
            pend[refusal] += 1
            return V_DROP, 0
        o, ohl, inner, kind = quote
        ip = f[IP:IP + totlen]
        if not inner or ones_sum(ip[ihl:totlen]) != 0xFFFF:
            pend[_DROP_TUN_ICMP] += 1
            return V_DROP, 0
        avail, hl, proto = totlen - inner, (ip[inner] & 15) * 4, ip[inner + 9]
        if (ip[inner] >> 4 != 4 or hl < 20 or hl + 8 > avail
                or (ip[inner + 6] << 8 | ip[inner + 7]) & 0x1FFF or proto not in (TCP, UDP)):
            pend[_DROP_TUN_ICMP] += 1
            return V_DROP, 0
        inner_len = ip[inner + 2] << 8 | ip[inner + 3]
        if inner_len < avail:  # no bytes beyond the inner packet in the answer
            avail = max(inner_len, hl + 8)
        # The quoted packet went client -> VIP: the conn's IN key as it is.
        l4 = inner + hl
        key = (proto, int.from_bytes(ip[inner + 12:inner + 16], "big"), ip[l4] << 8 | ip[l4 + 1],
               int.from_bytes(ip[inner + 16:inner + 20], "big"), ip[l4 + 2] << 8 | ip[l4 + 3])
        hit = self._lookup(key, now)
        c = hit[0] if hit is not None else None
        dest = self._conn_dest(c) if c is not None else None
        if (c is None or hit[1] != states.INPUT or c.xmit != XMIT_TUN or dest is None
                or c.daddr != int.from_bytes(ip[o + 16:o + 20], "big") or dest[9] != kind
                or (kind == tunnel.TUN_GUE
                    and (ip[o + ohl + 2] << 8 | ip[o + ohl + 3]) != dest[11])):
            pend[_DROP_TUN_ICMP] += 1
            return V_DROP, 0
        if c.no_l2:   # synced, its client not heard: its route, if it knows
            self._sync_route_l2(c)
        # As if the inner packet had come in from the client.
        eth_c = c.lmac + c.cmac + b"\x08\x00"
        if ip[ihl] != _ICMP_DEST_UNREACH or ip[ihl + 1] != _ICMP_FRAG_NEEDED:
            # ip_vs_in_icmp relays the other errors as they are (type, code
            # and the word after them), about the inner packet.
            self._send_icmp_about(eth_c, ip[inner:inner + avail], avail, c.in_port, now,
                                  ip[ihl], ip[ihl + 1],
                                  int.from_bytes(ip[ihl + 4:ihl + 8], "big"), c.vaddr)
            pend[_TUN_ICMP_RELAYED] += 1
            return V_PASS, 0
        mtu = self._pmtu_learn(c.daddr, dest[6], ip[ihl + 6] << 8 | ip[ihl + 7], now)
        if (ip[inner + 6] << 8 | ip[inner + 7]) & _IP_DF:
            ovh = tunnel.tun_overhead(kind)
            self._send_icmp_about(eth_c, ip[inner:inner + avail], avail, c.in_port, now,
                                  _ICMP_DEST_UNREACH, _ICMP_FRAG_NEEDED,
                                  mtu - ovh if mtu > 68 + ovh else mtu, c.vaddr)
        pend[_TUN_PMTU_LEARNED] += 1
        return V_PASS, 0

    def _mtu_refusal(self, f: memoryview, ihl: int, totlen: int, proto: int, in_port: int,
                     mtu: int, icmp_saddr: int, now: float) -> int | None:
        """Step 12: does the packet fit `mtu` (_egress_mtu; 0: no check)? None: send it as it is.
        Else the verdict counter: DF set (or TCP GSO) answered with ICMP
        frag-needed carrying the MTU (RFC 1191, kernel ip_forward /
        ip_vs ensure_mtu_is_adequate); a plain frame with DF clear is
        fragmented later (_DO_FRAGMENT); a GSO frame without DF is dropped."""
        if mtu == 0:
            return None
        gso = f[0] & tables.VNET_F_NEEDS_CSUM and f[1] != tables.VNET_GSO_NONE
        if gso:
            l4 = IP + ihl
            hdr = ihl + ((f[l4 + 12] >> 4) * 4 if proto == TCP else 8)
            gso_size = tables.VNET_HDR.unpack_from(f, 0)[3]
            need = hdr + gso_size if gso_size else totlen
        else:
            need = totlen
        if need <= mtu:
            return None
        df = (f[IP + 6] << 8 | f[IP + 7]) & _IP_DF
        if df or (gso and (f[1] & 0x7F) in (tables.VNET_GSO_TCPV4, tables.VNET_GSO_TCPV6)):
            self._send_icmp(f, totlen, in_port, now, _ICMP_DEST_UNREACH, _ICMP_FRAG_NEEDED, mtu,
                            icmp_saddr)
            return _DROP_FRAG_NEEDED
        if gso:
            return _DROP_GSO_TOO_BIG
        return _DO_FRAGMENT

    def _frame(self, f: memoryview, n: int, in_port: int, now: float) -> tuple[int, int]:
        pend = self._pend
        # 1-2: Ethernet.
        if n < IP:
            pend[_DROP_TRUNCATED] += 1
            return V_DROP, 0
        if f[ETH + 12] != 0x08 or f[ETH + 13] != 0x00:
            pend[_PASS_NOT_IPV4] += 1
            return V_PASS, 0
        # 3: IPv4 header.
        avail = n - IP
        if avail < 20:
            pend[_DROP_TRUNCATED] += 1
            return V_DROP, 0
        vihl = f[IP]
        ihl = (vihl & 0x0F) * 4
        totlen = f[IP + 2] << 8 | f[IP + 3]
        if vihl >> 4 != 4 or ihl < 20 or ihl > avail or totlen < ihl or totlen > avail:
            pend[_DROP_BAD_IP] += 1
            return V_DROP, 0
        if ihl > 20:
            pend[_IP_OPTIONS] += 1
        # 4: fragments (MF or a fragment offset).
        if (f[IP + 6] << 8 | f[IP + 7]) & 0x3FFF:
            pend[_DROP_FRAGMENT] += 1
            return V_DROP, 0
        # 5: protocol.
        proto = f[IP + 9]
        if proto == ICMP:
            return self._icmp(f, ihl, totlen, in_port, now)
        if proto != TCP and proto != UDP:
            pend[_PASS_NOT_OURS] += 1
            return V_PASS, 0
        # 6: L4 header, within the IP packet (not the frame: padding is no payload).
        l4 = IP + ihl
        plen = totlen - ihl
        if proto == TCP:
            if plen < 20:
                pend[_DROP_BAD_L4] += 1
                return V_DROP, 0
            doff = (f[l4 + 12] >> 4) * 4
            if doff < 20 or doff > plen:
                pend[_DROP_BAD_L4] += 1
                return V_DROP, 0
            tcp_flags = f[l4 + 13]
        else:
            if plen < 8 or (f[l4 + 4] << 8 | f[l4 + 5]) != plen:
                pend[_DROP_BAD_L4] += 1
                return V_DROP, 0
            tcp_flags = 0
        saddr = int.from_bytes(f[IP + 12:IP + 16], "big")
        daddr = int.from_bytes(f[IP + 16:IP + 20], "big")
        sport = f[l4] << 8 | f[l4 + 1]
        dport = f[l4 + 2] << 8 | f[l4 + 3]
        key = (proto, saddr, sport, daddr, dport)

        # 7: what the kernel would not take in, if the frame is ours at all.
        refusal = self._refusal(f, ihl, in_port)
        if refusal is not None:
            if key in self._index or self._find_service(proto, daddr, dport) is not None:
                pend[refusal] += 1
                return V_DROP, 0
            pend[_PASS_NOT_OURS] += 1
            return V_PASS, 0

        # 8: conn lookup.
        hit = self._lookup(key, now)
        if hit is not None and hit[1] == states.INPUT:
            rule = self._in_rules(hit[0], proto, tcp_flags)
            if rule == _IN_DROPPED:
                return V_DROP, 0
            if rule == _IN_RESCHED:
                hit = None
        if hit is None:
            # 9: a new conn, if a service wants it.
            svc = self._find_service(proto, daddr, dport)
            if svc is None:
                if self._sysctl[_SYS["nat_icmp_send"]] and self._rs_no_conn(
                        f, totlen, proto, tcp_flags, saddr, sport, in_port, now):
                    return V_DROP, 0
                return self._local_reply(proto, saddr, sport, daddr, dport, totlen, in_port, now)
            refusal = self._martian(saddr, in_port)
            if refusal is not None:
                pend[refusal] += 1
                return V_DROP, 0
            if proto == TCP and not self._tcp_may_open(tcp_flags):
                pend[_DROP_NO_CONN] += 1
                if not tcp_flags & _TCP_RST:
                    self._send_rst(f, ihl, totlen, in_port, now)
                return V_DROP, 0
            if self._drop_rate and self._todrop():
                pend[_DROP_DEFENSE] += 1
                return V_DROP, 0
            verdict, hit = self._conn_new(f, key, svc, proto, saddr, sport, daddr, dport,
                                          totlen, in_port, now)
            if hit is None:
                return verdict, 0
            if proto == UDP and int(self._svc_table[svc]["flags"]) & tables.SVC_F_ONE_PACKET:
                self._ops_conn = hit[0]

        c, direction = hit
        if direction == states.INPUT:
            # 10: client -> real server.
            dest = self._conn_dest(c)
            if dest is None:
                pend[_DROP_DEST_GONE] += 1
                return V_DROP, 0
            if c.xmit == XMIT_NONE:
                pend[_DROP_FWD_METHOD] += 1
                return V_DROP, 0
            if c.no_l2:
                self._sync_learn_l2(c, f, in_port)
            self._count_traffic(c, tables.STAT_INPKTS, tables.STAT_INBYTES, totlen)
            self._set_state(c, c.in_dir, proto, tcp_flags, now)
            if self._sync_q is not None:   # ip_vs_in_hook: after the state
                self._sync_conn(c, c is self._ops_conn, now)
            refusal = self._xmit_refusal(f, dest, c.xmit, totlen, in_port, now, daddr, True)
            if refusal is not None:
                pend[refusal] += 1
                return V_DROP, 0
            out_port = dest[6]
            # IPVS decrements before its MTU check (__ip_vs_get_out_rt): a
            # frag-needed quotes the packet one hop older. A refused frame is
            # given back as it came.
            ttl_word = bytes(f[IP + 8:IP + 12])
            _decrease_ttl(f)
            if c.xmit == XMIT_TUN:
                path_mtu = self._egress_mtu(out_port, tunnel.tun_overhead(dest[9]),
                                            self._pmtu_get(c.daddr, now))
            else:
                path_mtu = self._egress_mtu(out_port)
            # pmtu_disc 0: a tunnelled packet is never refused for its size
            # (ensure_mtu_is_adequate); the outer packet is fragmented instead.
            nodf = c.xmit == XMIT_TUN and self._sysctl[_SYS["pmtu_disc"]] == 0
            mtu = None if nodf else self._mtu_refusal(f, ihl, totlen, proto, in_port, path_mtu,
                                                      daddr, now)
            if mtu is not None and mtu != _DO_FRAGMENT:
                f[IP + 8:IP + 12] = ttl_word
                pend[mtu] += 1
                return V_DROP, 0
            if c.xmit == XMIT_TUN:
                return self._tun_xmit(
                    f, c, dest, ihl, totlen, proto, path_mtu if mtu == _DO_FRAGMENT else 0,
                    self._egress_mtu(out_port, 0, self._pmtu_get(c.daddr, now)) if nodf else 0)
            f[ETH:ETH + 6] = dest[7]
            f[ETH + 6:ETH + 12] = dest[8]
            if c.xmit == XMIT_DR:
                # The packet as it came but for the TTL (kernel ip_vs_dr_xmit).
                if f[0] & tables.VNET_F_NEEDS_CSUM:
                    if f[1] != tables.VNET_GSO_NONE:
                        pend[_GSO_FRAMES] += 1   # no address changed: the partial sum holds
                    else:
                        self._complete_csum(f, l4, plen, proto)
                return self._leave(f, totlen, mtu, out_port)
            # NAT: rewrite daddr:dport; the MACs are the real server's.
            old_addr, new_addr, addr_at = daddr, c.daddr, IP + 16
            old_port, new_port, port_at = dport, c.dport, l4 + 2
        else:
            # 11: real server -> client (NAT conns only have an OUT key).
            if c.no_l2 and not self._sync_route_l2(c):
                pend[_DROP_SYNC_NO_MAC] += 1
                return V_DROP, 0
            self._count_traffic(c, tables.STAT_OUTPKTS, tables.STAT_OUTBYTES, totlen)
            self._set_state(c, direction, proto, tcp_flags, now)
            out_port = c.in_port
            if f[IP + 8] <= 1:
                pend[self._ttl_exceeded(f, totlen, in_port, now,
                                        self._reply_icmp_saddr(c, in_port), True)] += 1
                return V_DROP, 0
            mtu = self._mtu_refusal(f, ihl, totlen, proto, in_port, self._egress_mtu(out_port),
                                    self._reply_icmp_saddr(c, in_port), now)
            if mtu is not None and mtu != _DO_FRAGMENT:
                pend[mtu] += 1
                return V_DROP, 0
            # ip_forward: frag-needed above quoted the packet as it came.
            _decrease_ttl(f)
            old_addr, new_addr, addr_at = saddr, c.vaddr, IP + 12
            old_port, new_port, port_at = sport, c.vport, l4
            f[ETH:ETH + 6] = c.cmac
            f[ETH + 6:ETH + 12] = c.lmac

        f[addr_at:addr_at + 4] = new_addr.to_bytes(4, "big")
        f[port_at:port_at + 2] = new_port.to_bytes(2, "big")
        # 14: checksums.
        hc = f[IP + 10] << 8 | f[IP + 11]
        f[IP + 10:IP + 12] = update32(hc, old_addr, new_addr).to_bytes(2, "big")
        csum_at = l4 + (16 if proto == TCP else 6)
        vflags, gso_type = f[0], f[1]
        if vflags & tables.VNET_F_NEEDS_CSUM and gso_type != tables.VNET_GSO_NONE:
            # The field is the pseudo-header sum; ports are not in it.
            partial = f[csum_at] << 8 | f[csum_at + 1]
            f[csum_at:csum_at + 2] = sum_update32(partial, old_addr, new_addr).to_bytes(2, "big")
            pend[_GSO_FRAMES] += 1
        elif vflags & tables.VNET_F_NEEDS_CSUM:
            self._complete_csum(f, l4, plen, proto)
        else:
            check = f[csum_at] << 8 | f[csum_at + 1]
            if not (proto == UDP and check == 0):
                check = update16(update32(check, old_addr, new_addr), old_port, new_port)
                if proto == UDP and check == 0:
                    check = 0xFFFF
                f[csum_at:csum_at + 2] = check.to_bytes(2, "big")
        return self._leave(f, totlen, mtu, out_port)

    @staticmethod
    def _gue_sport(c: Conn) -> int:
        """The GUE source port of a conn, spread over 32768-60999 by a hash of
        the client side (as C's gue_sport)."""
        h = ((c.caddr * 0x9E3779B1) ^ (c.cport * 0x85EBCA6B)) & 0xFFFFFFFF
        return 32768 + h % 28232

    def _tun_xmit(self, f: memoryview, c: Conn, dest: tuple, ihl: int, totlen: int, proto: int,
                  frag_mtu: int, outer_mtu: int = 0) -> tuple[int, int]:
        """VS-Tun (kernel ip_vs_tunnel_xmit): the packet, its TTL already
        decremented, leaves encapsulated (IPIP or GUE) in the emit area; a GSO
        frame cut into segments first, a partial checksum completed, a too-big
        packet with DF clear cut into IP fragments of frag_mtu (when not 0)
        encapsulated one by one; with outer_mtu (pmtu_disc 0) the outer
        packets cut to it instead (_tun_outer)."""
        pend = self._pend
        out_port = dest[6]
        eth_out = dest[7] + dest[8] + b"\x08\x00"
        p = self._port_row(out_port)
        t = tunnel.Tun(dest[9], int(dest[10] == _TUN_F_CSUM), self._gue_sport(c), dest[11],
                       p[0] if p is not None and p[0] else c.vaddr, c.daddr,
                       int(self._sysctl[_SYS["pmtu_disc"]] == 0))
        ip = f[IP:IP + totlen]
        ids = 0
        if outer_mtu and self._tun_outer_size(f, ihl, totlen, proto, t) > outer_mtu:
            n, ids = self._tun_outer(f, out_port, eth_out, ihl, totlen, proto, t, outer_mtu)
        elif f[0] & tables.VNET_F_NEEDS_CSUM and f[1] != tables.VNET_GSO_NONE:
            n = tunnel.gso_segments(self._emit, out_port, eth_out, f[:ETH], ip, totlen, t,
                                    self._ip_id)
        else:
            if f[0] & tables.VNET_F_NEEDS_CSUM:
                self._complete_csum(f, IP + ihl, totlen - ihl, proto)
            if frag_mtu:
                n = self._tun_fragments(out_port, eth_out, ip, totlen, t, frag_mtu)
            else:
                n = 1 if tunnel.tun_encap(self._emit, out_port, eth_out, ip, totlen, t,
                                          self._ip_id) else 0
        if not n:
            pend[_EMIT_OVERFLOW] += 1
            return V_DROP, 0
        self._ip_id = (self._ip_id + (ids or n)) & 0xFFFF
        pend[_EMIT_FRAMES] += n
        pend[_TX_TUNNELED] += 1
        return V_EMIT, 0

    @staticmethod
    def _tun_outer_size(f: memoryview, ihl: int, totlen: int, proto: int, t: tunnel.Tun) -> int:
        """The largest outer packet the frame makes: for a GSO frame one
        segment (headers + gso_size), else the packet; plus the tunnel."""
        size = totlen
        if f[0] & tables.VNET_F_NEEDS_CSUM and f[1] != tables.VNET_GSO_NONE:
            gso_size = f[4] | f[5] << 8
            l4 = IP + ihl
            hdr = ihl + ((f[l4 + 12] >> 4) * 4 if proto == TCP else 8)
            if gso_size and hdr + gso_size < totlen:
                size = hdr + gso_size
        return size + tunnel.tun_overhead(t.type)

    def _tun_outer(self, f: memoryview, port: int, eth_out: bytes, ihl: int, totlen: int,
                   proto: int, t: tunnel.Tun, outer_mtu: int) -> tuple[int, int]:
        """pmtu_disc 0 (the kernel's ip_vs_tunnel_xmit with df 0): the packet,
        or each GSO segment, encapsulated whole with the outer DF clear, and
        each outer packet bigger than `outer_mtu` cut into IP fragments of
        the outer packet (the kernel's ip_fragment after the tunnel). All or
        nothing: (frames emitted, outer packets made), or (0, 0)."""
        scratch = icmp.Emit.new(64 * 1024 + 4096, _TUN_FRAG_MAX)
        ip = f[IP:IP + totlen]
        if f[0] & tables.VNET_F_NEEDS_CSUM and f[1] != tables.VNET_GSO_NONE:
            k = tunnel.gso_segments(scratch, port, eth_out, f[:ETH], ip, totlen, t, self._ip_id)
        else:
            if f[0] & tables.VNET_F_NEEDS_CSUM:
                self._complete_csum(f, IP + ihl, totlen - ihl, proto)
            k = 1 if tunnel.tun_encap(scratch, port, eth_out, ip, totlen, t, self._ip_id) else 0
        em = self._emit
        saved = (int(em.n[0]), int(em.n[1]))
        frags = 0
        hdr = ETH + 14
        for _, fr in scratch.frames()[:k]:
            olen = len(fr) - hdr
            if olen <= outer_mtu:
                d = em.reserve(len(fr), port)
                if d is None:
                    break
                d[:] = fr
                continue
            m = icmp.ip_fragment(em, port, eth_out, fr[hdr:], olen, outer_mtu)
            if not m:
                break
            frags += m
        else:
            if k:
                self._pend[_FRAG_OUT] += frags
                return int(em.n[0]) - saved[0], k
        em.n[0], em.n[1] = saved
        return 0, 0

    def _tun_fragments(self, port: int, eth_out: bytes, ip: memoryview, totlen: int,
                       t: tunnel.Tun, mtu: int) -> int:
        """The IP fragments of a packet too big for the tunnel, each fitting
        `mtu` (the path's MTU less the tunnel's headers), each encapsulated:
        all or nothing."""
        overhead = tunnel.tun_overhead(t.type)
        scratch = icmp.Emit.new(64 * 1024 + 4096, _TUN_FRAG_MAX)
        k = icmp.ip_fragment(scratch, port, eth_out, ip, totlen, mtu)
        frags = [fr for _, fr in scratch.frames()]
        em = self._emit
        need = sum(len(fr) + overhead for fr in frags)
        if not k or int(em.n[0]) + k > em.max or len(em.buf) - int(em.n[1]) < need:
            return 0
        hdr = ETH + 14
        for i, fr in enumerate(frags):
            tunnel.tun_encap(em, port, eth_out, fr[hdr:], len(fr) - hdr, t,
                             (self._ip_id + i) & 0xFFFF)
        self._pend[_FRAG_OUT] += k
        return k

    def _complete_csum(self, f: memoryview, l4: int, plen: int, proto: int) -> None:
        """A partial L4 checksum without GSO (TP_STATUS_CSUMNOTREADY) computed
        in full over pseudo header and segment; the vnet flags cleared."""
        csum_at = l4 + (16 if proto == TCP else 6)
        f[csum_at:csum_at + 2] = b"\0\0"
        saddr = int.from_bytes(f[IP + 12:IP + 16], "big")
        daddr = int.from_bytes(f[IP + 16:IP + 20], "big")
        s = pseudo_header_sum(saddr, daddr, proto, plen) + ones_sum(f[l4:l4 + plen])
        full = ~fold(s) & 0xFFFF
        if proto == UDP and full == 0:
            full = 0xFFFF
        f[csum_at:csum_at + 2] = full.to_bytes(2, "big")
        f[0] = 0
        self._pend[_CSUM_PARTIAL_FIXED] += 1

    def _leave(self, f: memoryview, totlen: int, mtu: int | None, out_port: int) -> tuple[int, int]:
        """The rewritten frame leaves on out_port, or (13: DF clear and too
        big) as IP fragments in the emit area instead."""
        if mtu != _DO_FRAGMENT:
            return V_TX, out_port
        pend = self._pend
        k = icmp.ip_fragment(self._emit, out_port, f[ETH:ETH + 14], f[IP:IP + totlen],
                             totlen, self._ports[out_port][1])
        if not k:
            pend[_EMIT_OVERFLOW] += 1
            return V_DROP, 0
        pend[_EMIT_FRAMES] += k
        pend[_FRAG_OUT] += k
        pend[_TX_FRAGMENTED] += 1
        return V_EMIT, 0

    def _icmp(self, f: memoryview, ihl: int, totlen: int, in_port: int,
              now: float) -> tuple[int, int]:
        """An ICMP error about a conn goes where the conn's packets go (kernel
        ip_vs_in_icmp / ip_vs_out_icmp): translated for NAT, as it is for DR;
        its TTL drops by one and it is never answered. Any other ICMP is the
        kernel's."""
        pend = self._pend
        quote = self._tun_icmp_quote(f, ihl, totlen)
        if quote is not None:
            return self._tun_icmp(f, ihl, totlen, in_port, now, quote)
        inner = icmp.icmp_inner(f[IP:IP + totlen], totlen)
        if inner is None:
            pend[_PASS_NOT_OURS] += 1
            return V_PASS, 0
        iproto, isaddr, isport = inner.proto, inner.saddr, inner.sport
        idaddr, idport = inner.daddr, inner.dport
        # The quoted packet went the other way: its reverse is the conn's key.
        hit = self._lookup((iproto, idaddr, idport, isaddr, isport), now)
        if hit is None or hit[0].xmit == XMIT_NONE:
            pend[_PASS_NOT_OURS] += 1
            return V_PASS, 0
        refusal = self._refusal(f, ihl, in_port)
        if refusal is None:
            # The kernel's route input refuses the error's own source first.
            refusal = self._martian(int.from_bytes(f[IP + 12:IP + 16], "big"), in_port)
        if refusal is not None:
            pend[refusal] += 1
            return V_DROP, 0
        c, direction = hit
        if direction == states.INPUT:
            # From the client side, about a reply the client got: to the real server.
            dest = self._conn_dest(c)
            if dest is None:
                pend[_DROP_DEST_GONE] += 1
                return V_DROP, 0
            refusal = self._xmit_refusal(f, dest, c.xmit, totlen, in_port, now, 0, False)
            if refusal is not None:
                pend[refusal] += 1
                return V_DROP, 0
            if c.xmit == XMIT_NAT:
                f[IP + 8] -= 1  # nat_icmp sums the outer header afresh
                icmp.nat_icmp(f[IP:IP + totlen], totlen, False, c.daddr, c.dport)
            else:
                _decrease_ttl(f)
            self._count_traffic(c, tables.STAT_INPKTS, tables.STAT_INBYTES, totlen)
            if c.xmit == XMIT_TUN:
                # Through the tunnel, as the conn's packets (ip_vs_icmp_xmit).
                pend[_ICMP_FORWARDED] += 1
                return self._tun_xmit(f, c, dest, ihl, totlen, ICMP, 0)
            f[ETH:ETH + 6] = dest[7]
            f[ETH + 6:ETH + 12] = dest[8]
            out_port = dest[6]
        else:
            # From the real server's side, about a packet it got: to the client.
            if c.no_l2 and not self._sync_route_l2(c):   # its client not heard yet
                pend[_DROP_SYNC_NO_MAC] += 1
                return V_DROP, 0
            if f[IP + 8] <= 1:
                pend[_DROP_TTL] += 1
                return V_DROP, 0
            f[IP + 8] -= 1
            icmp.nat_icmp(f[IP:IP + totlen], totlen, True, c.vaddr, c.vport)
            f[ETH:ETH + 6] = c.cmac
            f[ETH + 6:ETH + 12] = c.lmac
            out_port = c.in_port
            self._count_traffic(c, tables.STAT_OUTPKTS, tables.STAT_OUTBYTES, totlen)
        pend[_ICMP_FORWARDED] += 1
        return V_TX, out_port

    def _in_rules(self, c: Conn, proto: int, tcp_flags: int) -> int:
        """The kernel's ip_vs_in rules for a live conn found by an IN lookup
        (see conn_in_rules in ip_vs_core.c): a SYN reschedules a conn in
        TIME_WAIT or CLOSE (conn_reuse_mode; bit 2 adds FIN_WAIT without a
        reply) or one whose dest has weight 0 (expire_nodest_conn); a gone
        dest drops the frame, or with expire_nodest_conn expires the conn
        and schedules the frame afresh."""
        dests = self._dests
        dest_ok = c.dest < len(dests) and dests[c.dest][5] & tables.DEST_F_USED and dests[c.dest][2] == c.svc
        nodest = self._sysctl[_SYS["expire_nodest_conn"]]
        reuse = self._sysctl[_SYS["conn_reuse_mode"]]
        # is_new_conn: a segment that would open a conn on a miss (see ip_vs_core.c).
        if proto == TCP and tcp_flags & (_TCP_SYN | _TCP_ACK | _TCP_RST) == _TCP_SYN:
            if nodest and dest_ok and dests[c.dest][3] == 0:
                resched = True
            elif reuse:
                resched = (c.state in (states.TIME_WAIT, states.CLOSE)
                           or bool(reuse & 2 and c.state == states.FIN_WAIT and not c.replied))
            else:
                resched = False
            if resched:
                self._ct.remove(c, CONNS_REUSED)
                return _IN_RESCHED
        if dest_ok:
            return _IN_KEEP
        if nodest:
            self._ct.remove(c, CONNS_EXPIRED)
            return _IN_RESCHED
        self._pend[_DROP_DEST_GONE] += 1
        return _IN_DROPPED

    def _upcall_allowed(self, now: float) -> bool:
        """The upcall limit (docs/engine.md, "Upcall limit"): the bucket, in
        seconds of upcall time, refills at the upcall_share percent of
        ``now``'s pace up to _UPCALL_WINDOW's worth; an upcall may start
        while any is left and takes ``upcall_cost``."""
        b = self._upcall_bucket
        share = self._sysctl[_UPCALL_SHARE] / 100.0
        cap = share * _UPCALL_WINDOW
        if b[1] is None:
            b[0], b[1] = cap, now
        elif now > b[1]:
            b[0], b[1] = min(cap, b[0] + (now - b[1]) * share), now
        if b[0] <= 0.0:
            return False
        b[0] -= self._upcall_cost
        return True

    def _pressure_admits(self, now: float) -> bool:
        """pressure_admits in ip_vs_core.c: while the ring backs up, new
        conns pass at pressure_conn_rate a second (0: all)."""
        rate = int(self._sysctl[_PRESSURE_CONN_RATE])
        if rate == 0:
            return True
        return self._allow(self._pressure_bucket, now, rate, max(1, int(rate * _PRESSURE_WINDOW)))

    def _conn_new(self, f: memoryview, key: tuple, svc: int, proto: int, saddr: int,
                  sport: int, daddr: int, dport: int, totlen: int, in_port: int, now: float):
        """Step 9 from the room check on: (verdict, None) counted, or
        (None, (conn, INPUT)) for a new conn of service `svc`."""
        pend = self._pend
        # At the limit the conn to replace is chosen before the upcall, so a
        # full table refuses a flood without calling the scheduler.
        if self.pressure and not self._pressure_admits(now):
            pend[_DROP_PRESSURE] += 1
            return V_DROP, None
        ct = self._ct
        victim = None
        if ct.full():
            victim = ct.victim(now, self._timeouts)
            if victim is None:
                pend[_DROP_TABLE_FULL] += 1
                return V_DROP, None
        try:
            d, tpl, victim = self._persist_dest(svc, proto, saddr, sport, daddr, dport, now, victim)
        except Exception as exc:  # reported, never propagated (as the C upcall)
            _report_unraisable(exc, self._schedule)
            pend[_SCHED_ERRORS] += 1
            return V_DROP, None
        if d == _SCHED_LIMITED:
            pend[_DROP_UPCALL_LIMIT] += 1
            return V_DROP, None
        dests = self._dests
        if not 0 <= d < len(dests) or not dests[d][5] & tables.DEST_F_USED or dests[d][2] != svc:
            pend[_DROP_NO_DEST] += 1
            # ip_vs_leave: the client hears at once that nobody serves.
            self._send_icmp(f, totlen, in_port, now, _ICMP_DEST_UNREACH, _ICMP_PORT_UNREACH, 0,
                            daddr)
            return V_DROP, None
        dest = dests[d]
        # ip_vs_bind_xmit: the transmitter is chosen here, once; only NAT
        # conns get an OUT key (the others' replies bypass the director).
        xmit = _bind_xmit(dest)
        rport = dest[1] if dest[1] and dport == self._svc_persist[svc][2] else dport
        out_key = None
        if xmit == XMIT_NAT:
            out_key = (proto, dest[0], rport, saddr, sport)
            if out_key == key or self._lookup(out_key, now) is not None:
                pend[_DROP_CONFLICT] += 1
                return V_DROP, None
        c = Conn()
        c.proto, c.caddr, c.cport, c.vaddr, c.vport = proto, saddr, sport, daddr, dport
        c.daddr, c.dport = dest[0], rport
        c.state = states.NONE
        c.expires = now + self._timeouts[states.NONE]
        c.fwd, c.dest, c.svc = dest[4], d, svc
        c.cmac = bytes(f[ETH + 6:ETH + 12])
        c.lmac = bytes(f[ETH:ETH + 6])
        c.in_port = in_port
        c.in_key, c.out_key = key, out_key
        c.replied = False
        c.xmit = xmit
        # The kernel's IP_VS_CONN_F_NOOUTPUT conns use the INPUT_ONLY table.
        c.in_dir = states.INPUT if xmit == XMIT_NAT else states.INPUT_ONLY
        if ct.full() and victim is None:   # no conn may give way (victim_but)
            pend[_DROP_TABLE_FULL] += 1
            return V_DROP, None
        if tpl is not None:   # ip_vs_control_add
            c.control = tpl
            tpl.n_control += 1
        c.in_pkts = 0
        c.sync_end = sync.sec16(now)
        ct.add(c, victim, now)
        pend[_CONNS_CREATED] += 1
        cnt = self._counters
        cnt.dest_conns[d, tables.INACTIVE] += 1
        sched_c.bind(cnt, self._sched.thresholds, d)
        cnt.svc_stats[svc, tables.STAT_CONNS] += 1
        cnt.dest_stats[d, tables.STAT_CONNS] += 1
        return None, (c, states.INPUT)

    def _find_service(self, proto: int, vaddr: int, vport: int) -> int | None:
        """The service slot of (proto, vaddr, vport), else of its port-0
        service (the kernel's ip_vs_service_find: "catch-all port"), or None."""
        s = self._svc_by_key.get((proto, vaddr, vport))
        if s is None and self._nullsvc and vport:
            s = self._svc_by_key.get((proto, vaddr, 0))
        return s

    def _call_schedule(self, svc: int, saddr: int, sport: int, now: float) -> int:
        """call_schedule in ip_vs_core.c: the engine's scheduler, else the
        upcall if the upcall limit lets it run (_SCHED_LIMITED if not)."""
        d = self._sched.pick(svc, saddr, sport, int(self._svc_table[svc]["vaddr"]))
        if d != sched_c.ASK_PYTHON:
            return d
        if (self.pressure and self._sysctl[_UPCALL_SHARE] < 100 and self._upcall_cost > 0
                and not self._upcall_allowed(now)):
            return _SCHED_LIMITED
        self._busy = True
        try:
            return operator.index(self._schedule(svc, saddr, sport))
        finally:
            self._busy = False

    def _victim_but(self, now: float, keep: Conn):
        """victim_but in ip_vs_core.c: `keep` counts as held during the draw."""
        if not self._ct.full():
            return None
        keep.n_control += 1
        try:
            return self._ct.victim(now, self._timeouts)
        finally:
            keep.n_control -= 1

    def _persist_dest(self, svc: int, proto: int, saddr: int, sport: int, daddr: int,
                      dport: int, now: float, victim):
        """(dest slot, template or None, victim): persist_dest in
        ip_vs_core.c (docs/engine.md, "Persistence"). The scheduler's
        exception propagates."""
        timeout, netmask, vport = self._svc_persist[svc]
        if not timeout:
            return (self._call_schedule(svc, saddr, sport, now) if vport == dport else -1), None, victim
        whole = dport == vport and vport != _FTP_PORT
        tvport = dport if whole else 0
        key = (proto | TPL_PROTO, saddr & netmask, 0, daddr, tvport)
        ct = self._ct
        hit = self._index.get(key)
        t = hit[0] if hit is not None else None
        if t is not None and t.expires <= now:   # its timer fired before the clock hand came
            if tpl_held(t):
                t.tpl_timeout = TPL_LATE_TIMEOUT
            else:
                ct.remove(t, CONNS_EXPIRED)
                t = None
        if t is not None and self._tpl_valid(t, svc):
            if victim is t:
                victim = self._victim_but(now, t)
        else:
            d = self._call_schedule(svc, saddr, sport, now)
            dests = self._dests
            if not 0 <= d < len(dests) or not dests[d][5] & tables.DEST_F_USED or dests[d][2] != svc:
                return d, None, victim
            dest = dests[d]
            t = Conn()
            t.proto, t.caddr, t.cport, t.vaddr, t.vport = key
            t.daddr, t.dport = dest[0], dest[1] if whole else 0
            t.state, t.fwd, t.svc, t.dest = tables.CTPL_NONE, dest[4], svc, d
            t.cmac = t.lmac = bytes(6)
            t.in_port, t.replied, t.xmit, t.in_dir = 0, False, XMIT_NONE, 0
            t.in_key, t.out_key = key, None
            t.template, t.tpl_timeout = True, timeout
            t.expires = now + timeout
            t.sync_end = sync.sec16(now)
            if ct.full() and victim is None:
                return d, None, victim   # no room (tpl_new: NO_SLOT)
            ct.add(t, victim, now)
            self._pend[_CONNS_CREATED] += 1
            self._counters.dest_persist[d] += 1
            sched_c.bind(self._counters, self._sched.thresholds, d)
            victim = self._victim_but(now, t)
        t.expires = now + t.tpl_timeout
        return t.dest, t, victim

    def _tpl_valid(self, t: Conn, svc: int) -> bool:
        """ip_vs_check_template; an invalid template leaves the index."""
        dest = self._conn_dest(t)
        if (dest is not None and t.svc == svc
                and not (self._sysctl[_SYS["expire_quiescent_template"]] and dest[3] == 0)):
            return True
        self._ct.unhash(t)
        return False

    def _set_state(self, c: Conn, direction: int, proto: int, tcp_flags: int, now: float) -> None:
        """11: the state transition, the active/inactive count, the new expiry."""
        if proto == TCP:
            old = c.state
            if tcp_flags & _TCP_RST:
                ev = states.EV_RST
            elif tcp_flags & _TCP_SYN:
                ev = states.EV_SYN
            elif tcp_flags & states.TCP_FIN:
                ev = states.EV_FIN
            elif tcp_flags & _TCP_ACK:
                ev = states.EV_ACK
            else:
                ev = -1
            new = self._trans[direction][ev][old] if ev >= 0 else old
            was_active = old in states.ACTIVE
            is_active = new in states.ACTIVE
            if was_active != is_active:
                dc = self._counters.dest_conns
                if is_active:
                    dc[c.dest, tables.ACTIVE] += 1
                    dc[c.dest, tables.INACTIVE] -= 1
                else:
                    dc[c.dest, tables.ACTIVE] -= 1
                    dc[c.dest, tables.INACTIVE] += 1
            c.state = new
        else:
            c.state = states.UDP_STATE
        c.expires = now + self._timeouts[c.state]
        if direction == states.OUTPUT:
            c.replied = True
        else:
            c.in_pkts = (c.in_pkts + 1) & 0xFFFFFFFF
        # ip_vs_control_assure_ct: TCP on reaching ESTABLISHED, UDP on a reply.
        if c.control is not None and (c.state == states.ESTABLISHED != old if proto == TCP
                                      else direction == states.OUTPUT):
            c.control.state |= tables.CTPL_ASSURED
