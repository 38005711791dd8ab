"""The engine's side of connection sync: one record per conn, as the IPVS
sync protocol describes it (``../shared/REFERENCE.md``, "Connection sync";
kernel ``include/net/ip_vs.h`` and ``net/netfilter/ipvs/ip_vs_sync.c``).

Engines fill records (``SYNC_DTYPE``) for the conns a master must announce
and install the records a backup hears; ``pylvs.sync`` turns them into wire
messages and back. Records hold host-order numbers: the wire codec does the
byte order.

Fields of SYNC_DTYPE:
    proto   IPPROTO_TCP (6) / IPPROTO_UDP (17)
    state   the kernel's state number: IP_VS_TCP_S_* for TCP (the numbering
            of ``pylvs.engine.states.STATE_NAMES``), IP_VS_UDP_S_NORMAL (0)
            for UDP; a template's is its template state
    flags   the kernel's IP_VS_CONN_F_* bits (the forwarding method in the
            low 3 bits, CONN_F_TEMPLATE, CONN_F_NOOUTPUT, ...)
    caddr cport vaddr vport daddr dport   the conn's tuple, IPv4 as u32
    fwmark  0 (no fwmark services yet)
    timeout seconds: the timeout of the conn's current state (the kernel
            sends cp->timeout / HZ), a template's own timeout
"""

from __future__ import annotations

import numpy as np

SYNC_DTYPE = np.dtype([
    ("proto", np.uint8),
    ("state", np.uint16),
    ("flags", np.uint32),
    ("caddr", np.uint32),
    ("cport", np.uint16),
    ("vaddr", np.uint32),
    ("vport", np.uint16),
    ("daddr", np.uint32),
    ("dport", np.uint16),
    ("fwmark", np.uint32),
    ("timeout", np.uint32),
], align=True)   # a C struct with natural alignment (the engines' view)

# IP_VS_CONN_F_* (include/uapi/linux/ip_vs.h): the bits that travel in sync.
CONN_F_FWD_MASK = 0x0007        # IP_VS_CONN_F_MASQ 0, LOCALNODE 1, TUNNEL 2, DROUTE 3
CONN_F_HASHED = 0x0040
CONN_F_NOOUTPUT = 0x0080
CONN_F_INACTIVE = 0x0100
CONN_F_OUT_SEQ = 0x0200
CONN_F_IN_SEQ = 0x0400
CONN_F_SEQ_MASK = 0x0600
CONN_F_NO_CPORT = 0x0800
CONN_F_TEMPLATE = 0x1000
CONN_F_ONE_PACKET = 0x2000
# The kernel keeps only these from a sync message (IP_VS_CONN_F_BACKUP_MASK)
# and sets IP_VS_CONN_F_SYNC on what it installs.
CONN_F_BACKUP_MASK = (CONN_F_FWD_MASK | CONN_F_NOOUTPUT | CONN_F_INACTIVE | CONN_F_SEQ_MASK
                      | CONN_F_NO_CPORT | CONN_F_TEMPLATE)
CONN_F_SYNC = 0x0020

IP_VS_UDP_S_NORMAL = 0

# --- the reference engine's sync rules (C: pylvs/_fast/ip_vs_sync.c) -------
#
# Imported after SYNC_DTYPE: tables.py imports this module for it.

import math  # noqa: E402

from . import states, tables  # noqa: E402

CTPL_S_LAST = 2               # template states: NONE, ASSURED (IP_VS_CTPL_S_LAST)
TPL_DEFAULT_TIMEOUT = 180     # s: a template's timeout when its record has none
QLEN_LIMIT = 1 << 24          # the most records a master's queue holds
# The TCP states in which a conn is sent (ip_vs_sync_conn_needed).
SYNC_TCP_STATES = frozenset((states.ESTABLISHED, states.FIN_WAIT, states.CLOSE,
                             states.CLOSE_WAIT, states.TIME_WAIT))
_SYS = tables.SYSCTL_INDEX
_THRESHOLD, _PERIOD = _SYS["sync_threshold"], _SYS["sync_period"]
_REFRESH, _RETRIES = _SYS["sync_refresh_period"], _SYS["sync_retries"]
_PERSIST_MODE = _SYS["sync_persist_mode"]


def sec16(t: float) -> int:
    """Whole seconds mod 2**16: the clock of a conn's ``sync_end`` (the
    kernel's sync_endtime, in jiffies there)."""
    return math.floor(t) & 0xFFFF


def _s16(x: int) -> int:
    x &= 0xFFFF
    return x - 0x10000 if x & 0x8000 else x


def conn_timeout(c, timeouts) -> float:
    """The kernel's cp->timeout: a template's own, a conn's state's."""
    return c.tpl_timeout if c.template else timeouts[c.state]


def needed(c, pkts: int, now: float, sysctl: list[int], timeouts) -> bool:
    """ip_vs_sync_conn_needed for a reference Conn: is it (or a template) to
    be sent now, ``pkts`` its client packets (a template: the sync calls of
    the conns it controls)? ``now``: the engine's clock, seconds;
    ``sysctl``: the engine's sysctl values, indexed by
    tables.SYSCTL_INDEX (sync_threshold, sync_period, sync_refresh_period,
    sync_retries, sync_persist_mode are read); ``timeouts``: the
    engine's state timeouts, seconds, indexed by a conn's ``state``
    (conn_timeout). Updates
    ``sync_old`` (old state | retries << 4) and ``sync_end`` when it is."""
    timeout = conn_timeout(c, timeouts)
    orig, n = c.sync_end, sec16(now + timeout)
    retries = 0
    skip_rules = False
    if c.template:
        pass
    elif sysctl[_PERSIST_MODE] and c.control is not None:
        return False
    elif c.proto == tables.PROTO_TCP:
        if c.state not in SYNC_TCP_STATES:
            return False
        skip_rules = c.state != c.sync_old & 0x0F and c.state != states.ESTABLISHED
    if not skip_rules:
        refresh = sysctl[_REFRESH]
        if refresh > 0:
            lim = min(float(refresh), max(timeout / 2, 10.0))
            if abs(_s16(n - orig)) < lim:
                r = c.sync_old >> 4 & 3
                if r >= sysctl[_RETRIES]:
                    return False
                if _s16(orig - sec16(now + timeout - refresh / 8)) > 0:
                    return False
                retries = r + 1
        period = sysctl[_PERIOD]
        if period > 0:
            if not c.template and pkts % period != sysctl[_THRESHOLD]:
                return False
        elif refresh <= 0 and pkts != sysctl[_THRESHOLD]:
            return False
    c.sync_old = (c.state & 0x0F) | retries << 4
    c.sync_end = n
    return True


def record(c, timeouts) -> tuple:
    """The SYNC_DTYPE record of a reference Conn (ip_vs_sync_conn's fill)."""
    tcp = c.proto & 0x7F == tables.PROTO_TCP
    flags = c.fwd & CONN_F_FWD_MASK
    if c.fwd != tables.FWD_MASQ:
        flags |= CONN_F_NOOUTPUT
    if c.template or not (tcp and c.state in states.ACTIVE):
        flags |= CONN_F_INACTIVE
    if c.template:
        flags |= CONN_F_TEMPLATE
    if c.synced:
        flags |= CONN_F_SYNC
    state = c.state if c.template or tcp else IP_VS_UDP_S_NORMAL
    return (c.proto & 0x7F, state, flags, c.caddr, c.cport, c.vaddr, c.vport, c.daddr,
            c.dport, 0, int(conn_timeout(c, timeouts)))


def time_left(expires: float, now: float, whole: int) -> int:
    """Whole seconds a conn expiring at ``expires`` has left at ``now``
    (engine clock seconds), rounded up, at least 1 (a record's 0 means the
    state's timeout), at most ``whole``: what a bulk answer sends."""
    return max(1, min(whole, math.ceil(expires - now)))


def refusal(proto: int, state: int, flags: int, cport: int, fwmark: int) -> str | None:
    """Why a record cannot be installed before any table is looked at: the
    counter's name ("sync_rejected": a protocol, forwarding method or state
    the kernel's ip_vs_proc_sync_conn refuses, or a template with a client
    port; "sync_no_dest": a fwmark, no such services here), or None."""
    if proto not in (tables.PROTO_TCP, tables.PROTO_UDP) or flags & CONN_F_FWD_MASK > tables.FWD_ROUTE:
        return "sync_rejected"
    if flags & CONN_F_TEMPLATE:
        bad = state >= CTPL_S_LAST or cport != 0
    elif proto == tables.PROTO_TCP:
        bad = state >= states.N_TCP_STATES
    else:
        bad = state != IP_VS_UDP_S_NORMAL
    if bad:
        return "sync_rejected"
    return "sync_no_dest" if fwmark else None


def engine_state(proto: int, state: int, template: bool) -> int:
    """The engine's state for a record's: UDP's one state is states.UDP_STATE."""
    return states.UDP_STATE if not template and proto == tables.PROTO_UDP else state
