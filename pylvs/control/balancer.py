"""The Balancer: ipvsadm's model of virtual services and their dests.

The Balancer is the control plane's single source of truth. It validates
operations with IPVS semantics (and ipvsadm's error wording, so scripts that
match on messages keep working), keeps every service and dest in a *stable
slot*, and after every change builds brand-new service and dest arrays and
hands them to ``publish(services, dests)``. Published arrays are never
written again: the data path may still be reading them.

Threads: every method except ``schedule`` runs on the control thread (the
event loop). ``schedule`` is the engine's upcall on a new flow and runs on
the data thread; it reads an immutable per-service view that the control
thread swaps in whole, and holds a small lock only around the scheduler
object, whose state (rr position, wrr weights) the control thread updates.

Slots: a dest slot is not reused while ``counters.dest_conns[slot]`` is
non-zero, because conns in the engine still name it. As in the kernel's dest
trash, a dest that is deleted and added back while its old conns live gets
its old slot again, so those conns keep flowing. A deleted service whose
dests still hold conns keeps its slot (no other service gets it) and its
row in the published service table, so steering still hands its frames to
the engine, which drops those of the old conns (drop_dest_gone, as ip_vs_in
drops a conn's packet while its dest is not available); re-added, it takes
that slot back and its re-added dests their old slots, and the conns resume.
The hold ends when the last of those conns is gone (``release_replies``,
the estimator's periodic pass); until then a new conn to the deleted
service is refused as one to a service without dests, where the kernel,
which has no steering, would hand it to the local stack.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np

from .. import forward
from .. import sched as schedmod
from ..engine import states, tables
from ..engine.tables import (
    ACTIVE, CONN_F_TEMPLATE, CTPL_NAMES, DEST_DTYPE, DEST_F_NO_ROUTE, DEST_F_OVERLOAD, DEST_F_REPLIES, DEST_F_RESOLVED, DEST_F_USED, FWD_TUNNEL, INACTIVE,
    N_TRAFFIC, PROTO_TCP, PROTO_UDP, SERVICE_DTYPE, SVC_F_USED, SYSCTL_DEFAULTS, SYSCTL_NAMES,
    Counters,
)
from ..forward import tunnel
from .sched_tables import SchedTables
from .text import ascii_int, excerpt, quoted

log = logging.getLogger("pylvs.balancer")

PROTO_SCTP = 132
PROTO_NAMES = {PROTO_TCP: "TCP", PROTO_UDP: "UDP", PROTO_SCTP: "SCTP"}

IPVS_VERSION = "1.2.1"
CONN_TAB_SIZE = 4096          # what ipvsadm's header shows as (size=...)
# Table sizes of `pylvs run` (--max-services, --max-dests). The kernel has no
# fixed cap; these cost about 60 bytes per service and 150 per dest slot
# (tables, counters, rate estimator), 20 MB at the defaults. A dest row
# names its service in 16 bits: at most 65536 services.
DEFAULT_MAX_SERVICES = 16384
DEFAULT_MAX_DESTS = 131072
MAX_SERVICES_LIMIT = 1 << 16
DEFAULT_PERSISTENT_TIMEOUT = 300
MAX_TIMEOUT = 86400 * 31      # ipvsadm's upper bound for any timeout
MAX_WEIGHT = 65535
MAX_THRESHOLD = 2**31 - 1
NETMASK_ALL = 0xFFFFFFFF

SCHED_F1, SCHED_F2, SCHED_F3 = schedmod.SCHED_F1, schedmod.SCHED_F2, schedmod.SCHED_F3
_FLAG_BITS = {
    "flag-1": SCHED_F1, "flag-2": SCHED_F2, "flag-3": SCHED_F3,
    "sh-fallback": SCHED_F1, "sh-port": SCHED_F2,
    "mh-fallback": SCHED_F1, "mh-port": SCHED_F2,
}

# ipvsadm / libipvs wording.
E_SVC_EXISTS = "Service already exists"
E_NO_SVC = "No such service"
E_SVC_UNDEF = "Service not defined"
E_DEST_EXISTS = "Destination already exists"
E_NO_DEST = "No such destination"
E_NO_SCHED = "Scheduler or persistence engine not found"
E_ZERO_PORT = "Zero port specified for non-persistent service"
E_OPS = "One-Packet Scheduling is only for UDP virtual services"
E_WEIGHT = "illegal weight specified"
E_LOCAL_DEST = "local real servers (Local forwarding) are not supported yet"
E_RANGE = "Numerical result out of range"   # strerror(ERANGE)
E_NOMEM = "Memory allocation problem"
# ipvsadm's refusal of tunnel options with -m or -g.
E_TUN_FWD = "Tunnel options conflict with forward method"
# libipvs's text for EINVAL: ip_vs_new_dest refuses a real server whose
# inet_addr_type is neither RTN_UNICAST nor RTN_LOCAL.
E_INVAL = "Invalid operation.  Possibly wrong module version, address not unicast, ..."

INT_MAX = 2**31 - 1
# Accepted values; a knob not named here takes 0..INT_MAX (the kernel's
# proc_dointvec_minmax with a zero minimum, as for icmp_msgs_per_sec).
SYSCTL_RANGES = {
    "conn_reuse_mode": (0, 3),      # a bitmap of two bits (ip-sysctl / ipvs-sysctl.rst)
    "expire_nodest_conn": (0, 1),   # a boolean
    "expire_quiescent_template": (0, 1),
    "upcall_share": (0, 100),       # a percentage (docs/engine.md, "Upcall limit")
    "pressure_conn_rate": (0, 1 << 30),  # conns/s; 0: no limit (docs/engine.md, "Upcall limit")
    "sloppy_tcp": (0, 1),
    "nat_icmp_send": (0, 1),
    "pmtu_disc": (0, 1),
    "drop_entry": (0, 3),           # the kernel's proc_do_defense_mode: 0..3
    "drop_packet": (0, 3),
    "secure_tcp": (0, 3),
    # connection sync (docs/engine.md, "Sync"): the kernel clamps retries to 0..3
    "sync_retries": (0, 3),
    "sync_persist_mode": (0, 1),
    "sync_version": (1, 1),         # only version 1 is spoken (pylvs.sync drops v0)
    "sync_qlen_max": (1, 1 << 24),  # records a master's queue holds (pylvs.engine.sync.QLEN_LIMIT)
}
SYSCTL_RANGES.update({name: r[1:] for name, r in schedmod.SYSCTLS.items()})

def sysctl_defaults() -> dict[str, int]:
    """Every knob `pylvs sysctl` and `--sysctl` take, at its default: the
    engine's (tables.SYSCTL_NAMES), then the schedulers' (sched.SYSCTLS:
    lblc_expiration, ...; listed and set with the engine's, never in
    sysctl_array())."""
    out = dict(zip(SYSCTL_NAMES, SYSCTL_DEFAULTS))
    out.update({name: r[0] for name, r in schedmod.SYSCTLS.items()})
    return out


# sysctl(8) spellings of a knob's name: the kernel's own path prefixes are
# dropped so `net.ipv4.vs.expire_nodest_conn` names `expire_nodest_conn`.
_SYSCTL_PREFIXES = ("net.ipv4.vs.", "net/ipv4/vs/", "net.ipv4.", "net/ipv4/")


def sysctl_name(name: Any) -> Any:
    """A knob's pylvs name from any spelling sysctl(8) takes: `x`,
    `net.ipv4.vs.x`, `net/ipv4/vs/x`, `net.ipv4.x` (icmp_msgs_per_sec
    lives there). Non-strings come back unchanged (refused later)."""
    if isinstance(name, str):
        for prefix in _SYSCTL_PREFIXES:
            if name.startswith(prefix):
                return name[len(prefix):]
    return name


def expand_sysctls(values: dict) -> dict:
    """`{name: value}` with names as sysctl_name() reads them and the
    kernel's pair form of sync_threshold (`"3 50"`, two integers separated
    by white space, as /proc/sys/net/ipv4/vs/sync_threshold reads and takes
    them: proc_do_sync_threshold, ip_vs_ctl.c) split into sync_threshold
    and sync_period. Raises BalancerError for a pair that is not two
    fields."""
    out: dict = {}
    for name, value in values.items():
        name = sysctl_name(name)
        if name == "sync_threshold" and isinstance(value, str) and len(value.split()) > 1:
            fields = value.split()
            if len(fields) != 2:
                raise BalancerError(f"sysctl sync_threshold: {quoted(value)} is not "
                                    "THRESHOLD or \"THRESHOLD PERIOD\"")
            out["sync_threshold"], out["sync_period"] = fields
        else:
            out[name] = value
    return out


def _check_sync_pair(knobs: dict[str, int]) -> None:
    """The kernel's sync_threshold pair is one sysctl whose handler
    (proc_do_sync_threshold, ip_vs_ctl.c) refuses a threshold not below a
    non-zero period with EINVAL: pkts % period never equals such a
    threshold, so no established conn would ever be announced again."""
    t, p = knobs["sync_threshold"], knobs["sync_period"]
    if p and t >= p:
        raise BalancerError(f"sysctl sync_threshold: {t} is not below sync_period {p} "
                            "(set sync_period 0, or both in one command)")


TRAFFIC_KEYS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
RATE_KEYS = ("cps", "inpps", "outpps", "inbps", "outbps")


class BalancerError(Exception):
    """An operation IPVS would refuse; the message is what ipvsadm prints."""


class _FreeSlots:
    """Free slot numbers in FIFO order, with O(1) take-out of any one.

    A slot taken out of the middle (a service or dest revived in its old
    slot) leaves a stale queue entry behind; entries carry the slot's
    generation at the time it was freed, so a stale one is skipped."""

    def __init__(self, n: int):
        self._gen = [0] * n
        self._q: collections.deque[tuple[int, int]] = collections.deque((i, 0) for i in range(n))
        self._free = set(range(n))

    def __len__(self) -> int:
        return len(self._free)

    def __contains__(self, slot: int) -> bool:
        return slot in self._free

    def pop(self) -> int | None:
        """The slot freed longest ago, or None."""
        while self._q:
            slot, gen = self._q.popleft()
            if slot in self._free and gen == self._gen[slot]:
                self._free.remove(slot)
                return slot
        return None

    def take(self, slot: int) -> bool:
        """Take ``slot`` out if it is free."""
        if slot not in self._free:
            return False
        self._free.remove(slot)
        self._gen[slot] += 1
        return True

    def put(self, slot: int) -> None:
        if slot not in self._free:
            self._gen[slot] += 1
            self._free.add(slot)
            self._q.append((slot, self._gen[slot]))


# --- value normalisation (ops arrive from JSON, the CLI or Python callers) ---

def _proto(p: Any) -> int:
    if isinstance(p, str):
        key = p.strip().lower()
        p = {"tcp": PROTO_TCP, "udp": PROTO_UDP, "sctp": PROTO_SCTP}.get(key, key)
    if p == PROTO_SCTP:
        raise BalancerError("SCTP services are not supported yet")
    if p not in (PROTO_TCP, PROTO_UDP):
        raise BalancerError(f"unknown protocol {quoted(p)} (tcp or udp)")
    return int(p)


def _addr(a: Any, what: str = "address") -> int:
    if isinstance(a, bool):
        raise BalancerError(f"illegal {what} {quoted(a)}")
    if isinstance(a, int):
        if 0 <= a <= 0xFFFFFFFF:
            return a
        raise BalancerError(f"illegal {what} {quoted(a)}")
    try:
        return int(ipaddress.IPv4Address(str(a)))
    except ValueError:
        if isinstance(a, str) and ":" in a:
            raise BalancerError("IPv6 is not supported yet") from None
        raise BalancerError(f"illegal {what} {quoted(a)}") from None


def _strict_int(v: Any) -> int | None:
    """An int, or a string of decimal digits; None for anything else (bool,
    float, 80.5, "80.0"): JSON callers must not have values truncated."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return ascii_int(v)
    return None


def _port(p: Any, what: str = "port") -> int:
    v = _strict_int(p)
    if v is None or not 0 <= v <= 65535:
        raise BalancerError(f"illegal {what} {quoted(p)}")
    return v


def _int_in(v: Any, lo: int, hi: int, msg: str) -> int:
    n = _strict_int(v)
    if n is None or not lo <= n <= hi:
        raise BalancerError(msg)
    return n


def _unicast_dest(daddr: int, broadcasts: Any = ()) -> None:
    """Refuse what the kernel's inet_addr_type calls RTN_BROADCAST or
    RTN_MULTICAST (ip_vs_new_dest): 0.0.0.0/8, 255.255.255.255, 224/4, and
    the director's subnet broadcast addresses (``broadcasts``)."""
    if daddr >> 24 == 0 or daddr == 0xFFFFFFFF or daddr >> 28 == 0xE or daddr in broadcasts:
        raise BalancerError(E_INVAL)


def _local_dest(daddr: int, local_nets: Any, vaddrs: Any) -> bool:
    """Whether IPVS would deliver to ``daddr`` locally (inet_addr_type
    RTN_LOCAL: 127.0.0.0/8, an address of the namespace in ``local_nets``
    (prefix, mask) pairs, or a VIP of a service in ``vaddrs``)."""
    return (daddr >> 24 == 127 or daddr in vaddrs
            or any(daddr & mask == net for net, mask in local_nets))


def _fwd(f: Any) -> forward.Method:
    try:
        return forward.lookup(f)
    except (KeyError, TypeError):
        raise BalancerError(
            f"unknown forwarding method {quoted(f)} (masq, route or tunnel)") from None


def _tun_type(t: Any) -> int:
    if isinstance(t, str) and t.strip().lower() in tunnel.TUN_TYPES:
        return tunnel.TUN_TYPES[t.strip().lower()]
    if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tunnel.TUN_TYPE_NAMES):
        return t
    raise BalancerError("illegal tunnel type specified")


def _tun_flags(f: Any) -> int:
    """One of nocsum, csum, remcsum (or tun-nocsum, ...; or 0, 1, 2)."""
    if isinstance(f, str):
        name = f.strip().lower()
        name = name if name.startswith("tun-") else "tun-" + name
        if name in tunnel.TUN_FLAG_OPTIONS:
            return tunnel.TUN_FLAG_OPTIONS.index(name)
    elif isinstance(f, int) and not isinstance(f, bool) and 0 <= f < len(tunnel.TUN_FLAG_OPTIONS):
        return f
    raise BalancerError(f"illegal tunnel flags {quoted(f)} (nocsum, csum or remcsum)")


def _tun_args(m: forward.Method, tun_type: Any, tun_port: Any,
              tun_flags: Any) -> tuple[int, int, int]:
    """(tun_type, tun_port, tun_flags) of a dest, checked as ipvsadm checks
    its tunnel options (None or 0: not given). Only tunnel dests take them;
    GRE, which ipvsadm offers, is refused: the engine cannot send it."""
    tt = 0 if tun_type is None else _tun_type(tun_type)
    tp = 0 if tun_port is None else _int_in(tun_port, 0, 65535, "illegal tunnel port specified")
    tf = 0 if tun_flags is None else _tun_flags(tun_flags)
    if m.fwd != FWD_TUNNEL:
        if tt or tp or tf:
            raise BalancerError(E_TUN_FWD)
        return 0, 0, 0
    given = ["tun-port"] if tp else []
    if tf:
        given.append(tunnel.TUN_FLAG_OPTIONS[tf])
    msg = tunnel.option_error(tt, given)
    if msg is not None:
        raise BalancerError(msg)
    if tt not in tunnel.ENGINE_TUN_TYPES:
        raise BalancerError(
            f"tunnel type {tunnel.TUN_TYPE_NAMES[tt]} is not supported by this director yet "
            "(ipip or gue)")
    return tt, tp, tf


def _flag_bits(flags: Any) -> int:
    if flags is None:
        return 0
    if isinstance(flags, int) and not isinstance(flags, bool):
        if flags & ~(SCHED_F1 | SCHED_F2 | SCHED_F3):
            raise BalancerError(f"invalid scheduler flags {flags:#x}")
        return flags
    if isinstance(flags, str):
        flags = [f for f in flags.split(",") if f]
    bits = 0
    for name in flags:
        if name not in _FLAG_BITS:
            raise BalancerError(f"invalid scheduler flag `{excerpt(name)}'")
        bits |= _FLAG_BITS[name]
    return bits


sched_flag_names = schedmod.flag_names


def _netmask(m: Any) -> int:
    if m is None:
        return NETMASK_ALL
    if isinstance(m, int) and not isinstance(m, bool):
        if 0 <= m <= 0xFFFFFFFF:
            return m
    elif isinstance(m, str):
        s = m.strip().lstrip("/")
        bits = ascii_int(s) if s.isdigit() else None
        if bits is not None and bits <= 32:
            return (NETMASK_ALL << (32 - bits)) & NETMASK_ALL
        try:
            return int(ipaddress.IPv4Address(s))
        except ValueError:
            pass
    raise BalancerError("illegal virtual server persistent mask specified")


def ip_str(a: int) -> str:
    return str(ipaddress.IPv4Address(a))


# --- the model --------------------------------------------------------------

class SchedDestView:
    """What a scheduler sees of a dest: rebuilt on every change, never mutated.

    ``dport`` is the port conns to it use (the service's for a dest of port
    0); ``dest_port`` the port as configured (the kernel's dest->port, which
    mh hashes); ``last_weight`` its last weight other than 0 (the kernel's
    dest->last_weight: mh keeps a quiesced dest's table entries)."""

    __slots__ = ("slot", "weight", "daddr", "dport", "u_threshold", "l_threshold",
                 "dest_port", "last_weight")

    def __init__(self, slot: int, weight: int, daddr: int, dport: int,
                 u_threshold: int, l_threshold: int, dest_port: int | None = None,
                 last_weight: int | None = None):
        self.slot = slot
        self.weight = weight
        self.daddr = daddr
        self.dport = dport
        self.u_threshold = u_threshold
        self.l_threshold = l_threshold
        self.dest_port = dport if dest_port is None else dest_port
        self.last_weight = weight if last_weight is None else last_weight

    def __repr__(self) -> str:
        return f"<dest {ip_str(self.daddr)}:{self.dport} slot={self.slot} w={self.weight}>"


class Dest:
    __slots__ = ("slot", "daddr", "dport", "fwd", "weight", "u_threshold", "l_threshold",
                 "tun_type", "tun_port", "tun_flags", "replies_pending", "last_weight",
                 "health_down", "inhibit", "health_weight", "sorry")

    def __init__(self, slot: int, daddr: int, dport: int, fwd: int, weight: int,
                 u_threshold: int, l_threshold: int, tun: tuple[int, int, int] = (0, 0, 0)):
        self.slot = slot
        self.daddr = daddr
        self.dport = dport
        self.fwd = fwd
        self.weight = weight
        # The last weight other than 0 (ip_vs_ctl.c's __ip_vs_update_dest).
        self.last_weight = weight
        self.u_threshold = u_threshold
        self.l_threshold = l_threshold
        self.tun_type, self.tun_port, self.tun_flags = tun
        # -e moved it off a method whose replies come through the director
        # while its old conns may live on (they keep their method).
        self.replies_pending = False
        # The health overlay (set_dest_health): kept apart from ``weight``,
        # which stays what the operator set (-S saves it).
        self.health_down = False
        self.inhibit = False
        self.health_weight: int | None = None
        self.sorry = False      # added by the health checks, not the operator

    @property
    def forwarding(self) -> bool:
        """In the tables the engines forward with: a dest whose health is
        down is out of them (keepalived's removal), unless inhibited."""
        return not self.health_down or self.inhibit

    @property
    def active_weight(self) -> int:
        """The weight the schedulers use (what `-L` shows): 0 while down
        with inhibit_on_failure, misc_dynamic's weight while it gives one,
        else the operator's."""
        if self.health_down:
            return 0
        return self.weight if self.health_weight is None else self.health_weight


class Service:
    def __init__(self, slot: int, proto: int, vaddr: int, vport: int):
        self.slot = slot
        self.proto = proto
        self.vaddr = vaddr
        self.vport = vport
        self.sched_name = schedmod.DEFAULT
        self.sched_flags = 0
        self.timeout = 0          # persistence timeout; 0 = not persistent
        self.netmask = NETMASK_ALL
        self.pe = ""
        self.ops = False
        self.scheduler: schedmod.Scheduler | None = None
        self.dests: dict[tuple[int, int], Dest] = {}

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.proto, self.vaddr, self.vport)


class Balancer:
    """Services, dests and schedulers with ipvsadm semantics; publishes tables.

    ``resolver.resolve(daddr) -> (out_port, dmac, smac) | None`` gives a
    dest's egress; ``publish(services, dests)`` receives every new table pair.
    Attributes the runtime may set after construction:

    - ``conns_source``: ``() -> engine.conns()`` list, for ``-L -c`` (the
      tuples may carry a 13th field, the worker holding the conn: "worker");
    - ``clock``: the engine's time base for conn expiry (default monotonic);
    - ``on_timeouts``: called with ``states.timeout_array(...)`` after
      ``set_timeouts``, to hand the new timeouts to the engine;
    - ``publish_sched(svcs, dests, thresholds, table)``: every engine's
      ``set_sched`` (docs/engine.md, "Schedulers in C"), and ``c_sched``.
    """

    def __init__(self, counters: Counters, resolver=None,
                 publish: Callable[[np.ndarray, np.ndarray], None] | None = None):
        self.counters = counters
        self.resolver = resolver
        self.publish = publish
        self.conns_source: Callable[[], list] | None = None
        self.clock: Callable[[], float] = time.monotonic
        self.on_timeouts: Callable[[np.ndarray], None] | None = None
        # Called with the int64 sysctl array (SYSCTL_NAMES order) after a
        # change; the runtime hands it to engine.set_sysctls.
        self.publish_sysctls: Callable[[np.ndarray], None] = lambda values: None
        # () -> {"conn_count", "capacity", "memory"?}: the engine's view, for
        # `pylvs stats`; None when no engine is attached.
        self.engine_info: Callable[[], dict] | None = None
        self._sysctls = sysctl_defaults()
        self.conn_tab_size = CONN_TAB_SIZE

        self._services: dict[tuple[int, int, int], Service] = {}
        self._vaddrs: collections.Counter[int] = collections.Counter()  # services per VIP
        self._svc_free = _FreeSlots(counters.max_services)
        self._dest_free = _FreeSlots(counters.max_dests)
        # Deleted but still referenced by conns: (svc key, daddr, dport) <-> slot.
        self._dest_trash: dict[tuple, int] = {}
        self._dest_trash_key: dict[int, tuple] = {}
        self._svc_last_slot: dict[tuple[int, int, int], int] = {}
        # Deleted services whose dests still hold conns: slot -> key.
        self._svc_held: dict[int, tuple[int, int, int]] = {}
        # Trashed dests whose replies came through the director: slot ->
        # (proto, daddr, dport, svc slot, fwd), kept in the steering view and
        # in the dest table (a DEST_F_REPLIES row without DEST_F_USED: the
        # engine sends no new packet to it, the socket filter and steering
        # still take its replies) while conns live.
        self._trash_replies: dict[int, tuple[int, int, int, int, int]] = {}
        self._svc_last_key: dict[int, tuple[int, int, int]] = {}
        # Who holds a slot now, and the dest slots of each daddr (for the
        # resolver's answers): the rows to rewrite after a change.
        self._svc_at: dict[int, Service] = {}
        self._dest_at: dict[int, tuple[Service, Dest]] = {}
        self._by_daddr: dict[int, set[int]] = {}
        self._dirty_svc: set[int] = set()
        self._dirty_dest: set[int] = set()
        self._full_rebuild = True
        self._sched_dirty: dict[int, Service] = {}
        self._publish_soon = False

        # The upcall's view, indexed by service slot: (scheduler, dests newest
        # first, any -x threshold, vaddr, vport) or None.
        self._sched_view: list[tuple[schedmod.Scheduler, tuple[SchedDestView, ...], bool,
                                     int, int] | None] = [None] * counters.max_services
        self._sched_lock = threading.Lock()
        # The schedulers the engines run themselves (sched_tables.py): after
        # each change publish_sched(svcs, dests, thresholds, table) hands the
        # tables to every engine's set_sched; c_sched False: Python for all.
        self._c_tables = SchedTables(counters)
        self.publish_sched: Callable[..., None] = lambda svcs, dests, thresholds, table: None
        self._c_sched = True
        self._c_hold = 0   # inside flush: one publish_sched at its end

        self._timeouts = {"tcp": states.DEFAULT_TIMEOUTS["ESTABLISHED"],
                          "tcpfin": states.DEFAULT_TIMEOUTS["FIN_WAIT"],
                          "udp": states.DEFAULT_TIMEOUTS["UDP"]}

        # Rate estimator state (the kernel's ip_vs_est): last counter values
        # and smoothed per-second rates, for every service and dest row.
        self._est_time: float | None = None
        self._est_svc_last = np.zeros((counters.max_services, N_TRAFFIC), dtype=np.float64)
        self._est_svc_avg = np.zeros((counters.max_services, N_TRAFFIC), dtype=np.float64)
        self._est_dest_last = np.zeros((counters.max_dests, N_TRAFFIC), dtype=np.float64)
        self._est_dest_avg = np.zeros((counters.max_dests, N_TRAFFIC), dtype=np.float64)

        self._batching = 0
        self._dirty = False
        # The health checks' last say of each dest they watch, other than
        # "up" (svc key, daddr, dport) -> (down, inhibit, weight): kept when
        # the operator deletes the dest, so re-adding it by hand (-a) does
        # not forward to a real server the checks found dead.
        self._health_said: dict[tuple, tuple[bool, bool, int | None]] = {}
        # DR dests already logged as not directly connected: (svc key, daddr, dport).
        self._no_route_logged: set[tuple] = set()
        self.services_table: np.ndarray = np.zeros(counters.max_services, dtype=SERVICE_DTYPE)
        self.dests_table: np.ndarray = np.zeros(counters.max_dests, dtype=DEST_DTYPE)
        self.generation = 0

    # --- the engine's upcall (data thread) ---------------------------------

    def schedule(self, svc_slot: int, caddr: int, cport: int, dport: int | None = None) -> int:
        """Pick a dest slot for a new conn of service ``svc_slot`` from
        caddr:cport (host order), or -1. ``dport``: the packet's destination
        port; None means the service's port (the same for every service
        with a port; port-0 services pass the packet's)."""
        try:
            view = self._sched_view[svc_slot]
        except IndexError:
            return -1
        if view is None:
            return -1
        sched, dests, thresholds, vaddr, vport = view
        if not dests:
            return -1
        # Workers call this from several threads: the overload hysteresis
        # and the scheduler's state change under one lock.
        with self._sched_lock:
            # The overload flag the engines keep (counters.dest_flags: set
            # at -x, cleared below -y, as ip_vs_bind_dest/ip_vs_unbind_dest).
            overloaded = self._overloaded if thresholds else schedmod.never_overloaded
            ctx = schedmod.SchedCtx(self.counters.dest_conns, caddr, cport, vaddr,
                                    vport if dport is None else dport, self.clock(),
                                    overloaded)
            d = sched.schedule(dests, ctx)
        return -1 if d is None else d.slot

    def _overloaded(self, slot: int) -> bool:
        return bool(self.counters.dest_flags[slot] & DEST_F_OVERLOAD)

    @property
    def c_sched(self) -> bool:
        """True (the default): the engines run rr, wrr, lc, wlc, sed, nq, fo
        and ovf themselves (docs/engine.md, "Schedulers in C"); False: every
        new conn asks the Python scheduler (``pylvs run --sched-impl
        python``), as tests and benchmarks compare."""
        return self._c_sched

    @c_sched.setter
    def c_sched(self, on: bool) -> None:
        self._c_sched = bool(on)
        self._c_tables.rebuild(self._c_sched)
        self.publish_sched(*self._c_tables.published())

    # --- lookups ------------------------------------------------------------

    def _svc_key(self, proto: Any, vaddr: Any, vport: Any) -> tuple[int, int, int]:
        return (_proto(proto), _addr(vaddr, "virtual server address"),
                _port(vport, "virtual server port"))

    def _get_svc(self, proto, vaddr, vport, missing: str = E_NO_SVC) -> Service:
        svc = self._services.get(self._svc_key(proto, vaddr, vport))
        if svc is None:
            raise BalancerError(missing)
        return svc

    def services(self) -> list[Service]:
        return list(self._services.values())

    # --- services -----------------------------------------------------------

    def _check_sched(self, name: str) -> type[schedmod.Scheduler]:
        try:
            return schedmod.get(name)
        except KeyError:
            raise BalancerError(E_NO_SCHED) from None

    @staticmethod
    def _persistence(persistent: Any) -> int:
        if persistent is None or persistent is False or persistent == 0:
            return 0
        if persistent is True:
            return DEFAULT_PERSISTENT_TIMEOUT
        return _int_in(persistent, 1, MAX_TIMEOUT,
                       f"invalid timeout value `{excerpt(str(persistent))}' specified")

    @staticmethod
    def _check_pe(pe: Any) -> str:
        pe = pe or ""
        if pe and pe != "sip":
            raise BalancerError(E_NO_SCHED)
        return pe

    def add_service(self, proto: Any, vaddr: Any, vport: Any, sched: str | None = None,
                    flags: Any = None, persistent: Any = 0, netmask: Any = None,
                    ops: bool = False, pe: str | None = None, fwmark: int = 0) -> int:
        """ipvsadm -A. Returns the service slot."""
        if fwmark:
            raise BalancerError("fwmark services are not supported yet")
        key = self._svc_key(proto, vaddr, vport)
        sched = sched or schedmod.DEFAULT
        cls = self._check_sched(sched)
        bits = _flag_bits(flags)
        timeout = self._persistence(persistent)
        mask = _netmask(netmask)
        pe = self._check_pe(pe)
        if key[2] == 0 and not timeout:
            raise BalancerError(E_ZERO_PORT)
        if ops and key[0] != PROTO_UDP:
            raise BalancerError(E_OPS)
        if key in self._services:
            raise BalancerError(E_SVC_EXISTS)
        slot = self._alloc_svc_slot(key)
        svc = Service(slot, *key)
        svc.sched_name, svc.sched_flags = sched, bits
        svc.timeout, svc.netmask, svc.pe, svc.ops = timeout, mask, pe, bool(ops)
        svc.scheduler = cls(frozenset(sched_flag_names(sched, bits)))
        self._services[key] = svc
        self._vaddrs[svc.vaddr] += 1
        self._svc_at[slot] = svc
        self._dirty_svc.add(slot)
        self._svc_last_slot[key] = slot
        self._svc_last_key[slot] = key
        self._refresh_sched(svc)
        self._changed()
        return slot

    def edit_service(self, proto: Any, vaddr: Any, vport: Any, sched: str | None = None,
                     flags: Any = None, persistent: Any = None, netmask: Any = None,
                     ops: bool | None = None, pe: str | None = None, fwmark: int = 0) -> int:
        """ipvsadm -E. Arguments left None keep their value (the CLI passes all)."""
        if fwmark:
            raise BalancerError("fwmark services are not supported yet")
        svc = self._get_svc(proto, vaddr, vport)
        new_sched = sched or svc.sched_name
        cls = self._check_sched(new_sched)
        bits = svc.sched_flags if flags is None else _flag_bits(flags)
        timeout = svc.timeout if persistent is None else self._persistence(persistent)
        mask = svc.netmask if netmask is None else _netmask(netmask)
        new_pe = svc.pe if pe is None else self._check_pe(pe)
        new_ops = svc.ops if ops is None else bool(ops)
        if svc.vport == 0 and not timeout:
            raise BalancerError(E_ZERO_PORT)
        if new_ops and svc.proto != PROTO_UDP:
            raise BalancerError(E_OPS)
        if new_sched != svc.sched_name:
            # A new scheduler object: the kernel also binds a fresh scheduler
            # on a change of -s; conns already made are not touched.
            svc.scheduler = cls(frozenset(sched_flag_names(new_sched, bits)))
            svc.sched_name, svc.sched_flags = new_sched, bits
            self._refresh_sched(svc, force=True)
        elif bits != svc.sched_flags:
            # -b alone: ip_vs_edit_service rewrites svc->flags and keeps the
            # scheduler and its state (rr's turn, lblc's cache).
            with self._sched_lock:
                svc.scheduler.flags = frozenset(sched_flag_names(new_sched, bits))
                self._c_tables.set_flags(svc.slot, bits)
            svc.sched_flags = bits
            self.publish_sched(*self._c_tables.published())
        svc.timeout, svc.netmask, svc.pe, svc.ops = timeout, mask, new_pe, new_ops
        self._dirty_svc.add(svc.slot)
        self._changed()
        return svc.slot

    def del_service(self, proto: Any, vaddr: Any, vport: Any) -> None:
        """ipvsadm -D: the service and all its dests (their conns then drain)."""
        svc = self._get_svc(proto, vaddr, vport)
        self._remove_service(svc)
        self._changed()

    def clear(self) -> None:
        """ipvsadm -C."""
        for svc in list(self._services.values()):
            self._remove_service(svc)
        self._changed()

    def _remove_service(self, svc: Service) -> None:
        self._sched_view[svc.slot] = None
        self._c_tables.remove(svc.slot)   # published by the flush that follows
        self._sched_dirty.pop(svc.slot, None)
        held = any(self._conns_on(d.slot) for d in svc.dests.values())
        for d in list(svc.dests.values()):
            self._release_dest(svc, d)
        svc.dests.clear()
        del self._services[svc.key]
        self._vaddrs[svc.vaddr] -= 1
        if not self._vaddrs[svc.vaddr]:
            del self._vaddrs[svc.vaddr]
        del self._svc_at[svc.slot]
        self._dirty_svc.add(svc.slot)
        if held:
            self._svc_held[svc.slot] = svc.key
        else:
            self._svc_free.put(svc.slot)

    # --- dests --------------------------------------------------------------

    def _dest_args(self, svc: Service, daddr: Any, dport: Any, fwd: Any, weight: Any,
                   u_threshold: Any, l_threshold: Any, tun_type: Any = None,
                   tun_port: Any = None, tun_flags: Any = None) -> tuple:
        da = _addr(daddr, "real server address")
        _unicast_dest(da, getattr(self.resolver, "broadcasts", ()))
        if _local_dest(da, getattr(self.resolver, "local_nets", ()), self._vaddrs):
            raise BalancerError(E_LOCAL_DEST)
        dp = svc.vport if dport is None else _port(dport, "real server port")
        m = _fwd(fwd)
        w = _int_in(weight, 0, MAX_WEIGHT, E_WEIGHT)
        ut = _int_in(u_threshold or 0, 0, MAX_THRESHOLD, "illegal u_threshold specified")
        lt = _int_in(l_threshold or 0, 0, MAX_THRESHOLD, "illegal l_threshold specified")
        if lt > ut:
            # ip_vs_add_dest / ip_vs_edit_dest: -ERANGE, even with no upper
            # threshold; libipvs has no text of its own for it.
            raise BalancerError(E_RANGE)
        tun = _tun_args(m, tun_type, tun_port, tun_flags)
        if not m.port_remap_allowed and dp != svc.vport:
            # ipvsadm gives -g and -i dests the service's port itself: only
            # a caller other than `pylvs adm` gets here.
            raise BalancerError(
                f"the real server port must equal the service port ({svc.vport}) "
                f"with forwarding method {m.key}")
        return da, dp, m.fwd, w, ut, lt, tun

    def add_dest(self, proto: Any, vaddr: Any, vport: Any, daddr: Any, dport: Any = None,
                 fwd: Any = "masq", weight: Any = 1, u_threshold: Any = 0,
                 l_threshold: Any = 0, tun_type: Any = None, tun_port: Any = None,
                 tun_flags: Any = None) -> int:
        """ipvsadm -a. ``dport`` None means the service port. ``fwd``: a
        method name (masq, route, tunnel, or an alias) or fwd number.
        Tunnel dests take ``tun_type`` (ipip, gue), ``tun_port`` (gue's UDP
        port, required for gue) and ``tun_flags`` (nocsum, csum, remcsum),
        with ipvsadm's rules and messages. Returns the dest slot."""
        svc = self._get_svc(proto, vaddr, vport, E_SVC_UNDEF)
        da, dp, f, w, ut, lt, tun = self._dest_args(svc, daddr, dport, fwd, weight,
                                                    u_threshold, l_threshold,
                                                    tun_type, tun_port, tun_flags)
        old = svc.dests.get((da, dp))
        if old is not None and old.sorry:
            # The operator adds what the health checks had put in as the
            # sorry server: it becomes the operator's dest, under the checks'
            # say of that real server (if any), no longer the sorry server's
            # (an inhibited sorry server's weight 0 must not stick).
            with self.held():
                old.sorry = False
                said = self._health_said.get((svc.key, da, dp), (False, False, None))
                self._set_health(svc, old, *said)
                return self.edit_dest(proto, vaddr, vport, daddr, dport, fwd, weight,
                                      u_threshold, l_threshold, tun_type, tun_port, tun_flags)
        if old is not None:
            raise BalancerError(E_DEST_EXISTS)
        slot = self._alloc_dest_slot((svc.key, da, dp))
        d = svc.dests[(da, dp)] = Dest(slot, da, dp, f, w, ut, lt, tun)
        said = self._health_said.get((svc.key, da, dp))
        if said is not None:
            d.health_down, d.inhibit, d.health_weight = said
        self._dest_at[slot] = (svc, d)
        self._by_daddr.setdefault(da, set()).add(slot)
        self._dirty_dest.add(slot)
        # Tables first, then the scheduler: the engine should know a dest
        # before the upcall can name it.
        self._changed()
        self._refresh_sched(svc)
        return slot

    def edit_dest(self, proto: Any, vaddr: Any, vport: Any, daddr: Any, dport: Any = None,
                  fwd: Any = None, weight: Any = None, u_threshold: Any = None,
                  l_threshold: Any = None, tun_type: Any = None, tun_port: Any = None,
                  tun_flags: Any = None) -> int:
        """ipvsadm -e. Arguments left None keep their value (the CLI passes
        all); the tunnel options, all left None, are dropped when the dest
        stops being a tunnel dest. A change of method applies to new conns:
        the engine binds a conn's method when it creates the conn."""
        svc = self._get_svc(proto, vaddr, vport, E_SVC_UNDEF)
        da = _addr(daddr, "real server address")
        dp = svc.vport if dport is None else _port(dport, "real server port")
        d = svc.dests.get((da, dp))
        if d is None or d.sorry:
            raise BalancerError(E_NO_DEST)
        new_fwd = d.fwd if fwd is None else fwd
        if tun_type is None and tun_port is None and tun_flags is None and (
                _fwd(new_fwd).fwd == d.fwd):
            tun_type, tun_port, tun_flags = d.tun_type, d.tun_port, d.tun_flags
        _, _, f, w, ut, lt, tun = self._dest_args(
            svc, da, dp, new_fwd, d.weight if weight is None else weight,
            d.u_threshold if u_threshold is None else u_threshold,
            d.l_threshold if l_threshold is None else l_threshold,
            tun_type, tun_port, tun_flags)
        replied = forward.by_fwd(d.fwd).replies_via_director
        if forward.by_fwd(f).replies_via_director:
            d.replies_pending = False
        elif replied and self._conns_on(d.slot):
            d.replies_pending = True
        d.fwd, d.weight, d.u_threshold, d.l_threshold = f, w, ut, lt
        if w:
            d.last_weight = w
        d.tun_type, d.tun_port, d.tun_flags = tun
        self._dirty_dest.add(d.slot)
        if w == 0:
            self._refresh_sched(svc)   # quiesce before anything else sees it
            self._changed()
        else:
            self._changed()
            self._refresh_sched(svc)
        return d.slot

    def del_dest(self, proto: Any, vaddr: Any, vport: Any, daddr: Any, dport: Any = None) -> None:
        """ipvsadm -d. The dest's conns stay in the engine and drain."""
        svc = self._get_svc(proto, vaddr, vport, E_SVC_UNDEF)
        da = _addr(daddr, "real server address")
        dp = svc.vport if dport is None else _port(dport, "real server port")
        d = svc.dests.get((da, dp))
        if d is None or d.sorry:
            raise BalancerError(E_NO_DEST)
        self._remove_dest(svc, d)

    def _remove_dest(self, svc: Service, d: Dest) -> None:
        """A dest out of its service (-d, a sorry server switched off): its
        slot released, the scheduler and the tables told."""
        del svc.dests[(d.daddr, d.dport)]
        self._release_dest(svc, d)
        self._refresh_sched(svc)
        self._changed()

    # --- the health overlay (pylvs.health) -----------------------------------

    @contextlib.contextmanager
    def held(self):
        """Changes made inside go out in one publish at the end (as a
        batch): the health checks' say about several dests at once (quorum
        lost: every real server out, the sorry server in) is one change
        for the data path. Nested: the outermost one publishes."""
        self._batching += 1
        try:
            yield self
        finally:
            self._batching -= 1
            if not self._batching:
                self.flush()

    def set_dest_health(self, proto: Any, vaddr: Any, vport: Any, daddr: Any, dport: Any,
                        up: bool, inhibit: bool = False, weight: int | None = None) -> bool:
        """What the health checks say of a dest, kept apart from the
        operator's weight. ``up`` False: out of the tables as after ``-d``
        (keepalived removes a failed real server; its conns drain as the
        kernel's do for a deleted dest), or, with ``inhibit``
        (inhibit_on_failure), kept with weight 0. ``weight``: misc_dynamic's
        weight (0..65535) while up; None: the operator's. Returns whether
        anything changed; raises BalancerError for an unknown dest (the
        operator may have deleted it) or a bad weight. The say outlives
        the dest: an operator's later ``-a`` of it starts under it (down,
        inhibited or weighted) until the checks say otherwise."""
        key = self._svc_key(proto, vaddr, vport)
        da = _addr(daddr, "real server address")
        dp = key[2] if dport is None else _port(dport, "real server port")
        if weight is not None:
            weight = _int_in(weight, 0, MAX_WEIGHT, E_WEIGHT)
        said = (not up, bool(inhibit), weight)
        # Remembered even for a dest the operator deleted: an -a brings it
        # back under the checks' say (add_dest).
        if said == (False, False, None):
            self._health_said.pop((key, da, dp), None)
        else:
            self._health_said[(key, da, dp)] = said
        svc = self._get_svc(proto, vaddr, vport, E_SVC_UNDEF)
        d = svc.dests.get((da, dp))
        if d is None or d.sorry:
            raise BalancerError(E_NO_DEST)
        return self._set_health(svc, d, *said)

    def _set_health(self, svc: Service, d: Dest, down: bool, inhibit: bool,
                    weight: int | None) -> bool:
        new = (down, inhibit, weight)
        if (d.health_down, d.inhibit, d.health_weight) == new:
            return False
        was = (d.forwarding, d.active_weight)
        d.health_down, d.inhibit, d.health_weight = new
        if was == (d.forwarding, d.active_weight):
            return True
        if d.active_weight:
            d.last_weight = d.active_weight   # what mh keeps for a quiesced dest
        self._dirty_dest.add(d.slot)
        if not d.forwarding or not d.active_weight:
            # Out of the schedulers before the tables drop it, as del_dest.
            self._refresh_sched(svc)
            self._changed()
        else:
            self._changed()
            self._refresh_sched(svc)
        return True

    def set_sorry_server(self, proto: Any, vaddr: Any, vport: Any, daddr: Any, dport: Any,
                         fwd: Any = "masq", state: str = "off") -> bool:
        """keepalived's ``sorry_server`` of a service: ``state`` "on" (quorum
        lost: a dest of weight 1), "inhibit" (sorry_server_inhibit while
        quorum holds: a dest of weight 0) or "off" (removed; its conns
        drain as after ``-d``). The dest is the health checks', not the
        operator's: ``-L`` lists it, ``-S`` does not save it, ``-e``/``-d``
        do not find it, ``-a`` of the same address takes it over. A real
        server of the operator at that address is left alone. Returns
        whether the tables changed."""
        if state not in ("on", "inhibit", "off"):
            raise BalancerError(f"sorry server state {quoted(state)} (on, inhibit or off)")
        svc = self._get_svc(proto, vaddr, vport, E_SVC_UNDEF)
        da = _addr(daddr, "real server address")
        dp = svc.vport if dport is None else _port(dport, "real server port")
        d = svc.dests.get((da, dp))
        if d is not None and not d.sorry:
            return False
        if state == "off":
            if d is None:
                return False
            self._remove_dest(svc, d)
            return True
        if d is not None:
            return self._set_health(svc, d, state == "inhibit", True, None)
        # Added and set in one publish: an inhibited sorry server never
        # forwards with weight 1 in between.
        with self.held():
            self.add_dest(proto, vaddr, vport, daddr, dp, fwd, 1)
            d = svc.dests[(da, dp)]
            d.sorry = True
            self._set_health(svc, d, state == "inhibit", True, None)
        return True

    # --- slots --------------------------------------------------------------

    def _alloc_svc_slot(self, key: tuple[int, int, int]) -> int:
        old = self._svc_last_slot.get(key)
        if old is not None and (self._svc_held.get(old) == key or self._svc_free.take(old)):
            self._svc_held.pop(old, None)
            # Back in its old slot: revived dests then match their old conns.
            slot = old
        else:
            slot = self._svc_free.pop()
            if slot is None:
                raise BalancerError(f"{E_NOMEM} (all {self.counters.max_services} service slots in use)")
            prev = self._svc_last_key.pop(slot, None)
            if prev is not None and prev != key:
                del self._svc_last_slot[prev]
            self.counters.zero_svc(slot)
        self._est_svc_last[slot] = self.counters.svc_stats[slot]
        self._est_svc_avg[slot] = 0
        return slot

    def _conns_on(self, slot: int) -> bool:
        c = self.counters.dest_conns[slot]
        return bool(c[ACTIVE] or c[INACTIVE])

    def _slot_named(self, slot: int) -> bool:
        """Conns or persistence templates still name the dest slot: it is
        not reused (a template would send its clients to the newcomer)."""
        return self._conns_on(slot) or bool(self.counters.dest_persist[slot])

    def _alloc_dest_slot(self, trash_key: tuple) -> int:
        old = self._dest_trash.pop(trash_key, None)
        if old is not None:
            del self._dest_trash_key[old]
            self._trash_replies.pop(old, None)
            if self._dest_free.take(old):
                # Revived with its counters: its old conns count on it still.
                return old
        # FIFO and skipping slots conns still name: a freed slot goes to the
        # back of the line, so it is not handed out again right away.
        for _ in range(len(self._dest_free)):
            slot = self._dest_free.pop()
            if slot is None:
                break
            if self._slot_named(slot):
                self._dest_free.put(slot)
                continue
            tk = self._dest_trash_key.pop(slot, None)
            if tk is not None:
                del self._dest_trash[tk]
            self._trash_replies.pop(slot, None)
            self.counters.zero_dest(slot)
            self._est_dest_last[slot] = 0
            self._est_dest_avg[slot] = 0
            return slot
        raise BalancerError(f"{E_NOMEM} (all {self.counters.max_dests} dest slots in use "
                            "or held by conns)")

    def _release_dest(self, svc: Service, d: Dest) -> None:
        if self._slot_named(d.slot):
            tk = (svc.key, d.daddr, d.dport)
            self._dest_trash[tk] = d.slot
            self._dest_trash_key[d.slot] = tk
            if forward.by_fwd(d.fwd).replies_via_director or d.replies_pending:
                self._trash_replies[d.slot] = (svc.proto, d.daddr, self._dport(svc, d),
                                               svc.slot, d.fwd)
        self._dest_at.pop(d.slot, None)
        self._no_route_logged.discard((svc.key, d.daddr, d.dport))
        slots = self._by_daddr.get(d.daddr)
        if slots is not None:
            slots.discard(d.slot)
            if not slots:
                del self._by_daddr[d.daddr]
                forget = getattr(self.resolver, "forget", None)
                if forget is not None:
                    forget(d.daddr)   # no dest uses it: stop resolving it
        self._dirty_dest.add(d.slot)
        self._dest_free.put(d.slot)

    # --- the scheduler view -------------------------------------------------

    def _refresh_sched(self, svc: Service, force: bool = False,
                       only: Callable[[int], bool] | None = None) -> None:
        """Hand the scheduler the service's dests (``only``: the dest slots
        to keep). Inside a batch this waits for the batch's end."""
        if only is None and (self._batching or self._dirty):
            # Changes wait to be published: flush() orders the two.
            self._sched_dirty[svc.slot] = svc
            return
        # Newest first, as the kernel's list (svc.dests is oldest first).
        views = tuple(SchedDestView(d.slot, d.active_weight, d.daddr, self._dport(svc, d),
                                    d.u_threshold, d.l_threshold, d.dport, d.last_weight)
                      for d in reversed(svc.dests.values())
                      if d.forwarding and (only is None or only(d.slot)))
        with self._sched_lock:
            sched = svc.scheduler
            sched.configure(self._sysctls)
            if sched.stepwise:
                # The kernel calls add_dest once per dest: a batch (-R)
                # adding several replays those steps, newest last.
                old = self._sched_view[svc.slot]
                known = {v.slot for v in old[1]} if old else set()
                added = 0
                while added < len(views) and views[added].slot not in known:
                    added += 1
                for k in range(added - 1, 0, -1):
                    sched.update(views[k:])
                    self._c_tables.step(svc.slot, svc.sched_name, sched, views[k:])
            sched.update(views)
            self._sched_view[svc.slot] = (sched, views,
                                          any(v.u_threshold for v in views),
                                          svc.vaddr, svc.vport)
            self._c_tables.update(svc.slot, svc.sched_name, svc.sched_flags, sched, views,
                                  self._c_sched)
        if not self._c_hold:
            self.publish_sched(*self._c_tables.published())

    # --- publishing ---------------------------------------------------------

    def _changed(self) -> None:
        self._dirty = True
        if not self._batching:
            self.flush()

    @staticmethod
    def _dport(svc: Service, d: Dest) -> int:
        """The port a conn to ``d`` uses: a NAT dest given port 0 takes the
        service's port (kernel ip_vs_schedule: a zero dest port means the
        packet's destination port). The listing still shows 0."""
        return d.dport or svc.vport

    def _write_svc(self, svcs: np.ndarray, slot: int) -> None:
        svc = self._svc_at.get(slot)
        if svc is not None:
            svcs[slot] = (svc.vaddr, svc.vport, svc.proto,
                          SVC_F_USED | (tables.SVC_F_ONE_PACKET if svc.ops else 0),
                          svc.timeout, svc.netmask)
        elif slot in self._svc_held:
            proto, vaddr, vport = self._svc_held[slot]
            svcs[slot] = (vaddr, vport, proto, SVC_F_USED, 0, NETMASK_ALL)
        else:
            svcs[slot] = _ZERO_SVC

    def _write_dest(self, dests: np.ndarray, slot: int, resolve) -> None:
        ent = self._dest_at.get(slot)
        if ent is None:
            dests[slot] = _ZERO_DEST
            held = self._trash_replies.get(slot)
            if held is not None:
                # IPVS forwards a trashed dest's replies as long as its conns
                # live (ip_vs_out does not look at the dest): keep them ours.
                _, daddr, dport, svc_slot, fwd = held
                row = dests[slot]
                row["daddr"], row["dport"], row["svc"] = daddr, dport, svc_slot
                row["fwd"], row["flags"] = fwd, DEST_F_REPLIES
            return
        svc, d = ent
        if not d.forwarding:
            # Out of the tables as after -d (its conns' packets are dropped,
            # or expired with expire_nodest_conn), its slot kept for its
            # return; a NAT dest's replies still come through us.
            dests[slot] = _ZERO_DEST
            if forward.by_fwd(d.fwd).replies_via_director or d.replies_pending:
                row = dests[slot]
                row["daddr"], row["dport"], row["svc"] = d.daddr, self._dport(svc, d), svc.slot
                row["fwd"], row["flags"] = d.fwd, DEST_F_REPLIES
            return
        flags, out_port, dmac, smac = DEST_F_USED, 0, _NO_MAC, _NO_MAC
        ans = resolve(d.daddr) if resolve is not None else None
        if ans is not None:
            out_port, dmac, smac = ans
            flags |= DEST_F_RESOLVED
        if forward.by_fwd(d.fwd).needs_connected_network and not self._connected(svc, d):
            flags |= DEST_F_NO_ROUTE
        if d.replies_pending:
            flags |= DEST_F_REPLIES
        dests[slot] = (d.daddr, self._dport(svc, d), svc.slot, d.active_weight, d.fwd, flags,
                       out_port, tuple(bytes(dmac)), tuple(bytes(smac)),
                       d.tun_type, d.tun_flags, d.tun_port)

    def _connected(self, svc: Service, d: Dest) -> bool:
        """False when the resolver knows the route to a DR dest goes through a
        gateway. IPVS accepts such a dest (its frames then go nowhere
        useful); the director says so in its log, once per dest and route
        change, and the engine drops and counts the dest's frames."""
        ask = getattr(self.resolver, "connected", None)
        direct = ask(d.daddr) if ask is not None else None
        key = (svc.key, d.daddr, d.dport)
        if direct is False:
            if key not in self._no_route_logged:
                self._no_route_logged.add(key)
                log.warning("DR real server %s:%d of %s %s:%d is not on a directly connected "
                            "network: its frames are dropped (drop_no_route) until it is",
                            ip_str(d.daddr), d.dport, PROTO_NAMES[svc.proto],
                            ip_str(svc.vaddr), svc.vport)
            return False
        self._no_route_logged.discard(key)
        return True

    def build_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Fresh service and dest arrays for the current model."""
        svcs = np.zeros(self.counters.max_services, dtype=SERVICE_DTYPE)
        dests = np.zeros(self.counters.max_dests, dtype=DEST_DTYPE)
        resolve = getattr(self.resolver, "resolve", None)
        for slot in (*self._svc_at, *self._svc_held):
            self._write_svc(svcs, slot)
        for slot in self._dest_at:
            self._write_dest(dests, slot, resolve)
        return svcs, dests

    def republish(self) -> None:
        """Publish new tables (also after the resolver learned a MAC).

        The new arrays are copies of the last published ones with the rows
        changed since rewritten: a change costs a copy, not a rebuild of
        every row."""
        if self._full_rebuild:
            svcs, dests = self.build_tables()
        else:
            # An array without changed rows is handed on as it is: published
            # arrays are never written, so sharing one is safe.
            svcs, dests = self.services_table, self.dests_table
            if self._dirty_svc:
                svcs = svcs.copy()
                for slot in self._dirty_svc:
                    self._write_svc(svcs, slot)
            if self._dirty_dest:
                dests = dests.copy()
                resolve = getattr(self.resolver, "resolve", None)
                for slot in self._dirty_dest:
                    self._write_dest(dests, slot, resolve)
        self._dirty_svc.clear()
        self._dirty_dest.clear()
        self._full_rebuild = False
        self.services_table, self.dests_table = svcs, dests
        self.generation += 1
        self._dirty = False
        if self.publish is not None:
            self.publish(svcs, dests)

    def on_resolved(self, daddr: int | None = None) -> None:
        """The resolver learned or changed an answer: publish if a dest uses it.

        On an event loop the publish is deferred to the loop's next turn, so
        answers for many dests arriving together cost one publish."""
        if daddr is None:
            self._full_rebuild = True
        else:
            slots = self._by_daddr.get(int(daddr))
            if not slots:
                return
            self._dirty_dest.update(slots)
        self._dirty = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if not self._publish_soon:
            self._publish_soon = True
            loop.call_soon(self._deferred_publish)

    def _deferred_publish(self) -> None:
        self._publish_soon = False
        if not self._batching:
            self.flush()

    refresh = on_resolved

    # --- counters and rates -------------------------------------------------

    def zero(self, proto: Any = None, vaddr: Any = None, vport: Any = None) -> None:
        """ipvsadm -Z: zero the traffic counters of one service or of all."""
        if proto is None and vaddr is None:
            svcs = list(self._services.values())
        else:
            svcs = [self._get_svc(proto, vaddr, vport)]
        for svc in svcs:
            self.counters.zero_svc(svc.slot)
            self._est_svc_last[svc.slot] = 0
            self._est_svc_avg[svc.slot] = 0
            for d in svc.dests.values():
                self.counters.zero_dest(d.slot)
                self._est_dest_last[d.slot] = 0
                self._est_dest_avg[d.slot] = 0

    def release_replies(self) -> None:
        """Stop taking the replies of dests moved off NAT, and the frames of
        deleted services, once none of their conns is left (called with the
        estimator, every 2 seconds)."""
        done = [d for svc in self._services.values() for d in svc.dests.values()
                if d.replies_pending and not self._conns_on(d.slot)]
        for d in done:
            d.replies_pending = False
            self._dirty_dest.add(d.slot)
        gone = [slot for slot in self._trash_replies if not self._conns_on(slot)]
        for slot in gone:
            del self._trash_replies[slot]
            self._dirty_dest.add(slot)
        freed = []
        if self._svc_held:
            live = {tk[0] for tk, slot in self._dest_trash.items() if self._conns_on(slot)}
            freed = [slot for slot, key in self._svc_held.items() if key not in live]
        for slot in freed:
            del self._svc_held[slot]
            self._dirty_svc.add(slot)
            self._svc_free.put(slot)
        if done or gone or freed:
            self._changed()

    def estimate(self, now: float | None = None) -> None:
        """One step of the kernel's rate estimator (call every 2 seconds).

        rate = counter delta / elapsed; avg = avg * 3/4 + rate / 4.
        """
        now = time.monotonic() if now is None else now
        svc_now = self.counters.svc_stats.astype(np.float64)
        dest_now = self.counters.dest_stats.astype(np.float64)
        if self._est_time is not None and now > self._est_time:
            dt = now - self._est_time
            for cur, last, avg in ((svc_now, self._est_svc_last, self._est_svc_avg),
                                   (dest_now, self._est_dest_last, self._est_dest_avg)):
                # A counter zeroed under us reads as a negative delta: no rate.
                rate = np.maximum(cur - last, 0) / dt
                avg += (rate - avg) / 4
        self._est_time = now
        self._est_svc_last[:] = svc_now
        self._est_dest_last[:] = dest_now

    # --- timeouts -----------------------------------------------------------

    def set_timeouts(self, tcp: Any = 0, tcpfin: Any = 0, udp: Any = 0) -> dict[str, int]:
        """ipvsadm --set tcp tcpfin udp; 0 leaves a value unchanged."""
        vals = {}
        for k, v in (("tcp", tcp), ("tcpfin", tcpfin), ("udp", udp)):
            vals[k] = _int_in(v or 0, 0, MAX_TIMEOUT, f"invalid timeout value `{v}' specified")
        for k, v in vals.items():
            if v:
                self._timeouts[k] = v
        if self.on_timeouts is not None:
            self.on_timeouts(self.timeout_array())
        return self.timeouts()

    def timeouts(self) -> dict[str, int]:
        return dict(self._timeouts)

    def timeout_array(self) -> np.ndarray:
        t = self._timeouts
        return states.timeout_array(t["tcp"], t["tcpfin"], t["udp"])

    # --- sysctls ------------------------------------------------------------

    def _check_sysctl(self, name: Any, value: Any) -> tuple[str, int]:
        if not isinstance(name, str) or name not in self._sysctls:
            raise BalancerError(f"unknown sysctl {quoted(name)} (`pylvs sysctl` lists them all)")
        lo, hi = SYSCTL_RANGES.get(name, (0, INT_MAX))
        v = _strict_int(value)
        if v is None:
            raise BalancerError(f"sysctl {name}: {quoted(value)} is not an integer")
        if not lo <= v <= hi:
            raise BalancerError(f"sysctl {name}: {v} is out of range ({lo}..{hi})")
        return name, v

    def set_sysctls(self, values: Any) -> dict[str, int]:
        """Set several knobs at once ``{name: value}``: all are checked before
        any changes; the engine gets the new array. Returns every knob."""
        if not isinstance(values, dict):
            raise BalancerError("sysctls: expected an object of name: value")
        values = expand_sysctls(values)
        checked = [self._check_sysctl(k, v) for k, v in values.items()]
        _check_sync_pair(self._sysctls | dict(checked))
        if checked:
            self._sysctls.update(checked)
            self.publish_sysctls(self.sysctl_array())
            with self._sched_lock:
                for svc in self._services.values():
                    svc.scheduler.configure(self._sysctls)
        return self.sysctls()

    def sysctl(self, name: Any = None, value: Any = None) -> dict[str, int]:
        """``pylvs sysctl``: every knob (no name), one knob, or set one."""
        if name is None:
            return self.sysctls()
        name = sysctl_name(name)
        if value is None:
            self._check_sysctl(name, 0)
            return {name: self._sysctls[name]}
        n, _ = self._check_sysctl(name, value)
        return {n: self.set_sysctls({name: value})[n]}

    def sysctls(self) -> dict[str, int]:
        return dict(self._sysctls)

    def sysctl_array(self) -> np.ndarray:
        """int64[len(SYSCTL_NAMES)], as engine.set_sysctls takes it."""
        return np.array([self._sysctls[n] for n in SYSCTL_NAMES], dtype=np.int64)

    # --- engine counters ----------------------------------------------------

    def stats(self) -> dict:
        """``pylvs stats``: every engine counter by its stable name
        (tables.STAT_NAMES) under "engine" (and, the same object, under
        "counters", the key's older name), the conn table's use and limit,
        and the service and dest slots in use and their limits. (`pylvs
        run` adds "io" and "steering" on the control socket.)"""
        raw = self.counters.stats
        info = {}
        if self.engine_info is not None:
            info = self.engine_info()
        engine = {n: int(raw[i]) for i, n in enumerate(tables.STAT_NAMES)}
        return {
            "engine": engine,
            "counters": engine,
            "conns": {"count": info.get("conn_count"), "limit": info.get("capacity"),
                      "memory": info.get("memory")},
            "services": {"count": len(self._services), "limit": self.counters.max_services},
            "dests": {"count": len(self._dest_at), "limit": self.counters.max_dests},
        }

    # --- views for clients and the runtime ----------------------------------

    def snapshot(self) -> dict:
        """Everything ``pylvs adm -L`` and ``-S`` print, as plain JSON data."""
        c = self.counters
        # Read once: with workers each read is a sum over them.
        conns, svc_stats, dest_stats = c.dest_conns, c.svc_stats, c.dest_stats
        persist = c.dest_persist
        out = []
        for svc in self._services.values():
            dests = []
            for d in reversed(svc.dests.values()):   # the kernel's order, newest first
                m = forward.by_fwd(d.fwd)
                dests.append({
                    "daddr": ip_str(d.daddr), "dport": d.dport,
                    "fwd": m.key, "fwd_name": m.name,
                    "tun_type": tunnel.TUN_TYPE_NAMES[d.tun_type], "tun_port": d.tun_port,
                    "tun_flags": d.tun_flags,
                    # "weight": what forwards (-L); "config_weight": what the
                    # operator set (-S); "forwarding" False: out of the
                    # tables (health down), listed by -S only.
                    "weight": d.active_weight if d.forwarding else 0,
                    "config_weight": d.weight, "forwarding": d.forwarding,
                    "health": "down" if d.health_down else "up", "sorry": d.sorry,
                    "u_threshold": d.u_threshold,
                    "l_threshold": d.l_threshold,
                    "activeconns": int(conns[d.slot, ACTIVE]),
                    "inactconns": int(conns[d.slot, INACTIVE]),
                    "persistconns": int(persist[d.slot]),
                    "stats": _traffic(dest_stats[d.slot]),
                    "rates": _rates(self._est_dest_avg[d.slot]),
                    "resolved": bool(self.dests_table[d.slot]["flags"] & DEST_F_RESOLVED),
                    "slot": d.slot,
                })
            out.append({
                "proto": PROTO_NAMES[svc.proto], "protocol": svc.proto,
                "vaddr": ip_str(svc.vaddr), "vport": svc.vport, "fwmark": 0,
                "sched": svc.sched_name, "sched_flags": svc.sched_flags,
                "flags": sched_flag_names(svc.sched_name, svc.sched_flags),
                "persistent": bool(svc.timeout), "timeout": svc.timeout,
                "netmask": ip_str(svc.netmask), "pe": svc.pe, "ops": svc.ops,
                "stats": _traffic(svc_stats[svc.slot]),
                "rates": _rates(self._est_svc_avg[svc.slot]),
                "slot": svc.slot, "dests": dests,
            })
        return {"version": IPVS_VERSION, "size": self.conn_tab_size,
                "services": out, "timeouts": self.timeouts()}

    def conns(self) -> list[dict]:
        """The engine's conns for ``-L -c``: expiry in whole seconds from now."""
        if self.conns_source is None:
            raise BalancerError("the connection table is not available from this director")
        now = self.clock()
        out = []
        for t in self.conns_source():
            proto, caddr, cport, vaddr, vport, daddr, dport, state, expires, flags = t[:10]
            if expires <= now:
                continue   # dead, waiting for the engine's clock hand
            if flags & CONN_F_TEMPLATE:   # ip_vs_state_name of a template
                sname = CTPL_NAMES[state] if state < len(CTPL_NAMES) else "ERR!"
            elif proto == PROTO_UDP or state >= states.N_TCP_STATES:
                sname = "UDP"
            else:
                sname = states.STATE_NAMES[state]
            out.append({
                "proto": PROTO_NAMES.get(proto, str(proto)),
                "caddr": ip_str(caddr), "cport": int(cport),
                "vaddr": ip_str(vaddr), "vport": int(vport),
                "daddr": ip_str(daddr), "dport": int(dport),
                "state": sname, "expires": max(0, int(expires - now)),
            })
            if len(t) > 12:   # `pylvs run` says which worker holds it
                out[-1]["worker"] = int(t[12])
        return out

    def steering_view(self) -> dict[str, list[tuple[int, int, int]]]:
        """Sockets to steal: services (proto, vaddr, vport) and real servers
        (proto, daddr, dport) whose replies come back through the director;
        also those of deleted services and dests while their conns live
        (see the module docstring)."""
        svcs, reals = [], set()
        for svc in self._services.values():
            svcs.append(svc.key)
            for d in svc.dests.values():
                if forward.by_fwd(d.fwd).replies_via_director or d.replies_pending:
                    reals.add((svc.proto, d.daddr, self._dport(svc, d)))
        svcs += sorted(set(self._svc_held.values()) - set(svcs))
        reals.update(k[:3] for slot, k in self._trash_replies.items() if self._conns_on(slot))
        return {"services": svcs, "real_servers": sorted(reals)}

    # --- operations as data (the RPC, -R, pylvs run -c) ---------------------

    _OPS = {
        "add_service": ("add_service", ("proto", "vaddr", "vport", "sched", "flags",
                                        "persistent", "netmask", "ops", "pe", "fwmark")),
        "edit_service": ("edit_service", ("proto", "vaddr", "vport", "sched", "flags",
                                          "persistent", "netmask", "ops", "pe", "fwmark")),
        "del_service": ("del_service", ("proto", "vaddr", "vport")),
        "clear": ("clear", ()),
        "add_dest": ("add_dest", ("proto", "vaddr", "vport", "daddr", "dport", "fwd",
                                  "weight", "u_threshold", "l_threshold", "tun_type",
                                  "tun_port", "tun_flags")),
        "edit_dest": ("edit_dest", ("proto", "vaddr", "vport", "daddr", "dport", "fwd",
                                    "weight", "u_threshold", "l_threshold", "tun_type",
                                    "tun_port", "tun_flags")),
        "del_dest": ("del_dest", ("proto", "vaddr", "vport", "daddr", "dport")),
        "zero": ("zero", ("proto", "vaddr", "vport")),
        "set_timeouts": ("set_timeouts", ("tcp", "tcpfin", "udp")),
        "timeouts": ("timeouts", ()),
        "snapshot": ("snapshot", ()),
        "conns": ("conns", ()),
        "steering_view": ("steering_view", ()),
        "stats": ("stats", ()),
        "sysctl": ("sysctl", ("name", "value")),
        "set_sysctls": ("set_sysctls", ("values",)),
        "health": ("health", ()),
    }

    def health(self) -> dict:
        """``pylvs status``: the health checks' view. Without checks (no
        keepalived.conf checkers) it is empty; `pylvs run` merges in its
        HealthManager's status (docs/health.md)."""
        return {"checks": [], "services": []}

    def apply(self, op: dict) -> Any:
        """Run one operation dict ``{"op": name, ...}``; raises BalancerError."""
        if not isinstance(op, dict):
            raise BalancerError("an operation must be a JSON object")
        name = op.get("op")
        if name == "batch":
            ops = op.get("ops") or []
            if not isinstance(ops, list):
                raise BalancerError("batch: ops must be a list of operations")
            more = op.get("more", False)
            if not isinstance(more, bool):
                raise BalancerError("batch: more must be true or false")
            return self.apply_many(ops, hold=more)
        if name == "ping":
            return "pong"
        spec = self._OPS.get(name) if isinstance(name, str) else None
        if spec is None:
            raise BalancerError(f"unknown operation {quoted(name)}")
        meth, allowed = spec
        extra = set(op) - set(allowed) - {"op"}
        if extra:
            raise BalancerError(f"{name}: unknown argument(s) {excerpt(', '.join(sorted(extra)))}")
        kwargs = {k: op[k] for k in allowed if k in op}
        try:
            return getattr(self, meth)(**kwargs)
        except TypeError as e:
            raise BalancerError(f"{name}: {e}") from None

    def apply_many(self, ops: Iterable[dict], hold: bool = False) -> list[dict]:
        """Apply ops in order, publishing once at the end; as ``ipvsadm -R``,
        an op that fails does not stop the ones after it.

        ``hold``: more batches follow (a long -R in several requests): the
        publish waits for the next change made without ``hold``, or for
        ``flush()`` (the control socket calls it when a client leaves)."""
        results = []
        self._batching += 1
        try:
            for op in ops:
                try:
                    results.append({"ok": True, "result": self.apply(op)})
                except BalancerError as e:
                    results.append({"ok": False, "error": str(e)})
        finally:
            self._batching -= 1
            if not self._batching and not hold:
                self.flush()
        return results

    def flush(self) -> None:
        """Publish what is pending (changes made in batches with ``hold``)."""
        self._c_hold += 1
        try:
            self._flush_pending()
        finally:
            self._c_hold -= 1
        if self._c_tables.dirty:
            self.publish_sched(*self._c_tables.published())

    def _flush_pending(self) -> None:
        # As outside a batch: a scheduler never names a dest the engine's
        # tables do not have yet, nor one already gone from them. Dests the
        # batch removed (or quiesced) leave the schedulers first, the tables
        # follow, then the added dests join.
        pending, self._sched_dirty = self._sched_dirty, {}
        pub = self.dests_table
        if self._dirty and len(pub):
            for svc in pending.values():
                self._refresh_sched(svc, only=lambda slot, s=svc.slot: bool(
                    pub[slot]["flags"] & DEST_F_USED) and int(pub[slot]["svc"]) == s)
        if self._dirty:
            self.republish()
        for svc in pending.values():
            self._refresh_sched(svc)


_ZERO_SVC = np.zeros((), dtype=SERVICE_DTYPE)
_ZERO_DEST = np.zeros((), dtype=DEST_DTYPE)
_NO_MAC = b"\0" * 6


def _traffic(row: np.ndarray) -> dict[str, int]:
    return {k: int(row[i]) for i, k in enumerate(TRAFFIC_KEYS)}


def _rates(row: np.ndarray) -> dict[str, int]:
    return {k: int(row[i] + 0.5) for i, k in enumerate(RATE_KEYS)}
