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
- An OUT hit (step 10) is forwarded whatever became of the dest: the
  contract checks the dest on the IN side only.
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

import operator
import sys
from typing import Callable

import numpy as np

from . import states, tables
from .conn import CONNS_EXPIRED, CONNS_REUSED, MAX_LIMIT, Conn, ConnTable
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
_SYS = tables.SYSCTL_INDEX
_IN_KEEP, _IN_RESCHED, _IN_DROPPED = 0, 1, 2  # _in_rules

V_PASS, V_TX, V_DROP = tables.V_PASS, tables.V_TX, tables.V_DROP
TCP, UDP = tables.PROTO_TCP, tables.PROTO_UDP
ETH = tables.VNET_HDR_LEN          # offset of the Ethernet header
IP = ETH + 14                      # offset of the IPv4 header
_TCP_SYN, _TCP_ACK, _TCP_RST = states.TCP_SYN, states.TCP_ACK, states.TCP_RST


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
        t = np.asarray(transitions)
        if t.dtype != np.uint8:
            raise TypeError("transitions must have dtype uint8")
        if t.shape != (3, 4, states.N_TCP_STATES):
            raise ValueError(f"transitions must have shape (3, 4, {states.N_TCP_STATES})")
        if int(t.min()) < 0 or int(t.max()) >= states.N_TCP_STATES:
            raise ValueError("transitions must name TCP states")
        if not callable(schedule):
            raise TypeError("schedule must be callable")
        self._busy = False  # inside the scheduler upcall
        self._trans = t.astype(np.int64).tolist()
        self.set_timeouts(timeouts)
        self._counters = counters
        self._schedule = schedule
        self._pend = [0] * tables.N_STATS
        # The reference indexes conns in a dict of Python tuples. CPython's
        # tuple-of-int hash is not keyed, so clients could flood a chain; the
        # C engine hashes with keyed SipHash for that reason.
        self._ct = ConnTable(capacity, key, counters, self._pend)
        self._index = self._ct.index
        self._sysctl = list(tables.SYSCTL_DEFAULTS)
        self._svc_by_key: dict[tuple[int, int, int], int] = {}
        self._dests: list[tuple] = []
        self._dest_table = tables.empty_dests(0)
        self._svc_table = tables.empty_services(0)

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

    def set_tables(self, services: np.ndarray, dests: np.ndarray) -> None:
        self._refuse_if_busy()
        if services.dtype != tables.SERVICE_DTYPE or dests.dtype != tables.DEST_DTYPE:
            raise TypeError("services and dests must use SERVICE_DTYPE and DEST_DTYPE")
        if services.ndim != 1 or dests.ndim != 1:
            raise ValueError("services and dests must be one-dimensional")
        if len(services) > self._counters.max_services or len(dests) > self._counters.max_dests:
            raise ValueError("more slots than the counter arrays have rows")
        by_key: dict[tuple[int, int, int], int] = {}
        for s, (vaddr, vport, proto, flags) in enumerate(services.tolist()):
            if flags & tables.SVC_F_USED:
                # The lowest slot wins if the control plane ever lists a
                # service twice.
                by_key.setdefault((proto, vaddr, vport), s)
        ds = []
        for d in range(len(dests)):
            r = dests[d]
            ds.append((int(r["daddr"]), int(r["dport"]), int(r["svc"]), int(r["weight"]),
                       int(r["fwd"]), int(r["flags"]), int(r["out_port"]),
                       bytes(r["dmac"].tobytes()), bytes(r["smac"].tobytes())))
        self._svc_table, self._dest_table = services, dests
        self._svc_by_key, self._dests = by_key, ds

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

    def conns(self) -> list[tuple]:
        return [(c.proto, c.caddr, c.cport, c.vaddr, c.vport, c.daddr, c.dport,
                 c.state, c.expires, c.fwd, c.dest, c.svc)
                for c in self._ct.conns()]

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
        try:
            for i in range(batch.count):
                n = int(batch.length[i])
                self._pend[_RX] += 1
                verdict, out_port = self._frame(batch.buf[i].data, n, int(batch.in_port[i]), now)
                batch.verdict[i] = verdict
                if verdict == V_TX:
                    batch.out_port[i] = out_port
                    self._pend[_TX] += 1
                    tx += 1
        finally:
            self._flush()
        return tx

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

        # 7: conn lookup.
        key = (proto, saddr, sport, daddr, dport)
        hit = self._lookup(key, now)
        if hit is not None and hit[1] == states.INPUT:
            rule = self._in_rules(hit[0], proto, tcp_flags)
            if rule == _IN_DROPPED:
                return V_DROP, 0
            if rule == _IN_RESCHED:
                hit = None
        if hit is None:
            # 8: a new conn, if a service wants it.
            verdict, hit = self._conn_new(f, key, proto, saddr, sport, daddr, dport, tcp_flags,
                                          in_port, now)
            if hit is None:
                return verdict, 0

        c, direction = hit
        cnt = self._counters
        if direction == states.INPUT:
            # 9: client -> real server.
            dests = self._dests
            if c.dest >= len(dests) or not dests[c.dest][5] & tables.DEST_F_USED or dests[c.dest][2] != c.svc:
                pend[_DROP_DEST_GONE] += 1
                return V_DROP, 0
            if c.fwd != tables.FWD_MASQ:
                pend[_DROP_FWD_METHOD] += 1
                return V_DROP, 0
            dest = dests[c.dest]
            cnt.svc_stats[c.svc, tables.STAT_INPKTS] += 1
            cnt.svc_stats[c.svc, tables.STAT_INBYTES] += totlen
            cnt.dest_stats[c.dest, tables.STAT_INPKTS] += 1
            cnt.dest_stats[c.dest, tables.STAT_INBYTES] += totlen
            self._set_state(c, direction, proto, tcp_flags, now)
            if not dest[5] & tables.DEST_F_RESOLVED:
                pend[_DROP_UNRESOLVED] += 1
                return V_DROP, 0
            # Rewrite daddr:dport, then the MACs toward the real server.
            old_addr, new_addr, addr_at = daddr, c.daddr, IP + 16
            old_port, new_port, port_at = dport, c.dport, l4 + 2
            f[ETH:ETH + 6] = dest[7]
            f[ETH + 6:ETH + 12] = dest[8]
            out_port = dest[6]
        else:
            # 10: real server -> client.
            cnt.svc_stats[c.svc, tables.STAT_OUTPKTS] += 1
            cnt.svc_stats[c.svc, tables.STAT_OUTBYTES] += totlen
            cnt.dest_stats[c.dest, tables.STAT_OUTPKTS] += 1
            cnt.dest_stats[c.dest, tables.STAT_OUTBYTES] += totlen
            self._set_state(c, direction, proto, tcp_flags, now)
            old_addr, new_addr, addr_at = saddr, c.vaddr, IP + 12
            old_port, new_port, port_at = sport, c.vport, l4
            f[ETH:ETH + 6] = c.cmac
            f[ETH + 6:ETH + 12] = c.lmac
            out_port = c.in_port

        f[addr_at:addr_at + 4] = new_addr.to_bytes(4, "big")
        f[port_at:port_at + 2] = new_port.to_bytes(2, "big")
        # 12: checksums.
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
            f[csum_at:csum_at + 2] = b"\0\0"
            new_saddr = int.from_bytes(f[IP + 12:IP + 16], "big")
            new_daddr = int.from_bytes(f[IP + 16:IP + 20], "big")
            s = pseudo_header_sum(new_saddr, new_daddr, proto, plen) + ones_sum(f[l4:l4 + plen])
            full = ~fold(s) & 0xFFFF
            if proto == UDP and full == 0:
                full = 0xFFFF
            f[csum_at:csum_at + 2] = full.to_bytes(2, "big")
            f[0] = 0
            pend[_CSUM_PARTIAL_FIXED] += 1
        else:
            check = f[csum_at] << 8 | f[csum_at + 1]
            if not (proto == UDP and check == 0):
                check = update16(update32(check, old_addr, new_addr), old_port, new_port)
                if proto == UDP and check == 0:
                    check = 0xFFFF
                f[csum_at:csum_at + 2] = check.to_bytes(2, "big")
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

    def _conn_new(self, f: memoryview, key: tuple, proto: int, saddr: int, sport: int,
                  daddr: int, dport: int, tcp_flags: int, in_port: int, now: float):
        """Step 8: (verdict, None) counted, or (None, (conn, INPUT)) for a new conn."""
        pend = self._pend
        svc = self._svc_by_key.get((proto, daddr, dport))
        if svc is None:
            pend[_PASS_NOT_OURS] += 1
            return V_PASS, None
        if proto == TCP and (not tcp_flags & _TCP_SYN or tcp_flags & (_TCP_ACK | _TCP_RST)):
            pend[_DROP_NO_CONN] += 1
            return V_DROP, None
        # At the limit the conn to replace is chosen before the upcall, so a
        # full table refuses a flood without calling the scheduler.
        ct = self._ct
        victim = None
        if ct.full():
            victim = ct.victim(now)
            if victim is None:
                pend[_DROP_TABLE_FULL] += 1
                return V_DROP, None
        self._busy = True
        try:
            d = operator.index(self._schedule(svc, saddr, sport))
        except Exception as exc:  # reported, never propagated (as the C upcall)
            _report_unraisable(exc, self._schedule)
            pend[_SCHED_ERRORS] += 1
            return V_DROP, None
        finally:
            self._busy = False
        dests = self._dests
        if not 0 <= d < len(dests) or not dests[d][5] & tables.DEST_F_USED or dests[d][2] != svc:
            pend[_DROP_NO_DEST] += 1
            return V_DROP, None
        dest = dests[d]
        out_key = (proto, dest[0], dest[1], saddr, sport)
        if out_key == key or self._lookup(out_key, now) is not None:
            pend[_DROP_CONFLICT] += 1
            return V_DROP, None
        c = Conn()
        c.proto, c.caddr, c.cport, c.vaddr, c.vport = proto, saddr, sport, daddr, dport
        c.daddr, c.dport = dest[0], dest[1]
        c.state = states.NONE
        c.expires = now + self._timeouts[states.NONE]
        c.fwd, c.dest, c.svc = dest[4], d, svc
        c.cmac = bytes(f[ETH + 6:ETH + 12])
        c.lmac = bytes(f[ETH:ETH + 6])
        c.in_port = in_port
        c.in_key, c.out_key = key, out_key
        c.replied = False
        ct.add(c, victim, now)
        pend[_CONNS_CREATED] += 1
        cnt = self._counters
        cnt.dest_conns[d, tables.INACTIVE] += 1
        cnt.svc_stats[svc, tables.STAT_CONNS] += 1
        cnt.dest_stats[d, tables.STAT_CONNS] += 1
        return None, (c, states.INPUT)

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
            was_active = old == states.ESTABLISHED
            is_active = new == states.ESTABLISHED
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
