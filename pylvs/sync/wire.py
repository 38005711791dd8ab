"""The IPVS connection sync protocol, version 1, on the wire.

Authority: the kernel's ``net/netfilter/ipvs/ip_vs_sync.c`` (struct
ip_vs_sync_mesg, struct ip_vs_sync_v4/v6, ip_vs_process_message,
ip_vs_proc_sync_conn); facts in ``../shared/REFERENCE.md``, "Connection
sync"; docs/sync.md describes the format and pylvs's additions.

A message (one UDP datagram, network byte order)::

    header, 8 bytes:  reserved u8 = 0 | syncid u8 | size be16 (whole message)
                      nr_conns u8 | version s8 = 1 | spare be16 = 0
    nr_conns conns:   type u8 (bit 0: IPv6) | protocol u8 |
                      ver_size be16 (version in the top 4 bits = 0, the
                      conn's size in bytes, options included, below) |
                      flags be32 | state be16 | cport be16 | vport be16 |
                      dport be16 | fwmark be32 | timeout be32 (seconds) |
                      caddr vaddr daddr (4 bytes each, 16 for IPv6)
                      then options: type u8, length u8 (> 0), data;
                      each conn after the first starts on a 4-byte
                      boundary (the padding counts in the message size,
                      not in the conn's).

Records are ``pylvs.engine.sync.SYNC_DTYPE`` rows (host order).

``encode`` packs records into messages of at most ``maxlen`` bytes (the
UDP payload: the kernel's sync_maxlen) and at most 255 conns (nr_conns is
a byte). ``decode`` is strict and never raises: a message that breaks the
framing in any place installs nothing (the kernel keeps the conns it had
already taken before the fault; pylvs takes none of a broken message), and
a conn the kernel would skip on its own (unknown protocol, a conn's state
out of its protocol's range, an unknown mandatory option, an IPv6 conn,
persistence-engine data pylvs has no engine for) is skipped and counted
alone, and so is a template whose state is not NONE or ASSURED, which the
kernel installs (with a debug message) and pylvs refuses (``_records``). Every drop has a
reason counted under its name in the ``counts`` dict the caller passes.
"""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np

from ..engine import states, tables
from ..engine.sync import CONN_F_HASHED, CONN_F_TEMPLATE, SYNC_DTYPE

SYNC_GROUP = "224.0.0.81"   # IP_VS_SYNC_GROUP
SYNC_PORT = 8848            # IP_VS_SYNC_PORT
SYNC_TTL = 1
SYNC_PROTO_VER = 1

HEADER = struct.Struct("!BBHBbH")          # struct ip_vs_sync_mesg
HEADER_LEN = HEADER.size                   # 8
HEADER_V0_LEN = 4                          # struct ip_vs_sync_mesg_v0
CONN_V4_LEN = 36                           # struct ip_vs_sync_v4 (WIRE_V4 below)
CONN_V6_LEN = CONN_V4_LEN - 12 + 3 * 16     # 72
MAX_CONNS = 255                            # nr_conns is a u8

STYPE_F_INET6 = 0x01
SVER_SHIFT = 12
SVER_MASK = 0x0FFF
# Options (ip_vs_sync.c IPVS_OPT_*): bit 6 of the type marks an optional
# parameter a receiver may skip; any other unknown type makes it skip the conn.
OPT_SEQ_DATA = 1
OPT_PE_DATA = 2
OPT_PE_NAME = 3
OPT_F_PARAM = 1 << 6
SEQ_OPT_LEN = 24            # struct ip_vs_sync_conn_options: two ip_vs_seq of 3 be32
PEDATA_MAXLEN = 255         # IP_VS_PEDATA_MAXLEN
PENAME_MAXLEN = 16          # IP_VS_PENAME_MAXLEN
CTPL_S_LAST = len(tables.CTPL_NAMES)       # IP_VS_CTPL_S_LAST
UDP_S_LAST = 1                             # IP_VS_UDP_S_LAST

IPHDR_UDPHDR = 20 + 8
DEFAULT_MAXLEN = 1500 - IPHDR_UDPHDR       # the master's sync_maxlen: 1472

# Why a whole message was dropped (nothing from it is installed) ...
DROP_REASONS = (
    "too_long",       # longer than the backup's sync_maxlen (read cut short; the daemon counts it)
    "short",          # shorter than a v0 header (4 bytes)
    "bad_size",       # the header's size is not the datagram's length
    "wrong_syncid",   # syncid is not ours (ours is not 0)
    "v0",             # a version 0 message (first byte, v0's nr_conns, not 0)
    "bad_version",    # reserved 0 but version not 1 or spare not 0
    "truncated",      # nr_conns says more conns than the message holds
    "conn_size",      # a conn's size is below its fixed part or past the end
    "conn_version",   # a conn's version nibble is not 0
    "bad_type",       # a conn's type is neither IPv4 (0) nor IPv6 (1)
    "bad_option",     # an option runs past its conn, has length 0, a wrong
                      # length for its type or comes twice
    "nr_conns",       # bytes left after the nr_conns conns the header counts
)
# ... and why one conn was skipped (the others of its message still count).
SKIP_REASONS = (
    "skip_ipv6",      # an IPv6 conn (pylvs balances IPv4 only)
    "skip_proto",     # not TCP or UDP
    "skip_state",     # state out of range for its protocol, or a template's
                      # beyond ASSURED (pylvs's rule: the kernel installs those)
    "skip_option",    # an unknown mandatory option
    "skip_pe",        # persistence-engine data (no engine in pylvs)
)


def sync_maxlen(role: str, mtu: int = 1500, given: int = 0) -> int:
    """The largest message (UDP payload, bytes) a daemon sends (master) or
    reads (backup), as start_sync_thread computes it: ``given``
    (--sync-maxlen) clamped to [1 (master) or 1024 (backup), 65535 - 28];
    else the link MTU minus the IPv4 and UDP headers, where a master
    always assumes an MTU of 1500 and a backup takes the interface's,
    clamped to [1500, 65535]."""
    if given:
        return max(1 if role == "master" else 1024, min(given, 65535 - IPHDR_UDPHDR))
    mtu = 1500 if role == "master" else max(1500, min(mtu, 65535))
    return mtu - IPHDR_UDPHDR


# struct ip_vs_sync_v4 as a numpy record (packed, big endian): records are
# packed and unpacked a message at a time, not a field at a time.
WIRE_V4 = np.dtype([("type", "u1"), ("proto", "u1"), ("ver_size", ">u2"), ("flags", ">u4"),
                    ("state", ">u2"), ("cport", ">u2"), ("vport", ">u2"), ("dport", ">u2"),
                    ("fwmark", ">u4"), ("timeout", ">u4"), ("caddr", ">u4"), ("vaddr", ">u4"),
                    ("daddr", ">u4")])
assert WIRE_V4.itemsize == CONN_V4_LEN
_FIELDS = ("proto", "state", "cport", "vport", "dport", "fwmark", "timeout", "caddr", "vaddr",
           "daddr")


def conns_bytes(records: np.ndarray) -> bytes:
    """SYNC_DTYPE records as consecutive struct ip_vs_sync_v4 (36 bytes
    each, no options: pylvs keeps no sequence adjustment or
    persistence-engine data; flags without IP_VS_CONN_F_HASHED, as
    ip_vs_sync_conn sends them)."""
    w = np.zeros(len(records), dtype=WIRE_V4)
    w["ver_size"] = CONN_V4_LEN
    for f in _FIELDS:
        w[f] = records[f]
    w["flags"] = records["flags"] & np.uint32(~CONN_F_HASHED & 0xFFFFFFFF)
    return w.tobytes()


def check_syncid(syncid: int) -> int:
    """``syncid`` itself when it is 0..255 (a u8 on the wire; 0 = any),
    else ValueError."""
    if isinstance(syncid, bool) or not isinstance(syncid, (int, np.integer)) \
            or not 0 <= syncid <= 255:
        raise ValueError(f"syncid {syncid!r} is out of range (0..255)")
    return syncid


def message(syncid: int, body: bytes) -> bytes:
    """A v1 message around ``body``, whole IPv4 conns without options (so
    36 bytes each and no padding between them), at most 255 of them.
    ValueError for a syncid out of 0..255 (check_syncid)."""
    check_syncid(syncid)
    return HEADER.pack(0, syncid, HEADER_LEN + len(body), len(body) // CONN_V4_LEN,
                       SYNC_PROTO_VER, 0) + body


def per_message(maxlen: int) -> int:
    """How many IPv4 conns one message of at most ``maxlen`` bytes holds,
    and at least one: a sync_maxlen (1..65507 for a master) too small for a
    header and a conn makes messages of one conn each, since
    ip_vs_sync_buff_create sizes a buffer as the larger of sync_maxlen and
    what the conn needs (ip_vs_sync.c)."""
    return max(1, min(MAX_CONNS, (maxlen - HEADER_LEN) // CONN_V4_LEN))


def encode(records: np.ndarray, syncid: int, maxlen: int = DEFAULT_MAXLEN) -> list[bytes]:
    """SYNC_DTYPE records → v1 messages, in record order, each at most
    ``maxlen`` bytes (one conn when ``maxlen`` holds none) and 255 conns.
    ``syncid``: 0..255, ValueError out of it (even for no records)."""
    check_syncid(syncid)
    step = per_message(maxlen) * CONN_V4_LEN
    body = conns_bytes(records)
    return [message(syncid, body[i:i + step]) for i in range(0, len(body), step)]


class Buffer:
    """The master's sync buffer (ip_vs_sync_buff): conns go in as records
    arrive; full messages are ready at once, the partial one when it is
    ``flush_after`` seconds old (the kernel's IPVS_SYNC_FLUSH_TIME, 2 s:
    "do not delay entries in buffer for more than 2 seconds")."""

    def __init__(self, syncid: int, maxlen: int, flush_after: float = 2.0):
        """``syncid`` 0..255 (ValueError otherwise), ``maxlen`` the largest
        message in bytes (per_message), ``flush_after`` seconds."""
        self.syncid, self.flush_after = check_syncid(syncid), flush_after
        self.per_message = per_message(maxlen)
        self._body = b""
        self._first = 0.0
        self.ready: list[bytes] = []

    def add(self, records: np.ndarray, now: float) -> None:
        """Queue SYNC_DTYPE ``records`` (host order) at ``now``, seconds of
        a monotonic clock (the master's time.monotonic): every message
        they fill is ready at once, the rest waits in the partial one,
        whose age counts from the first conn in it."""
        if not len(records):
            return
        if not self._body:
            self._first = now
        body = self._body + conns_bytes(records)
        step = self.per_message * CONN_V4_LEN
        full = len(body) // step * step
        self.ready += [message(self.syncid, body[i:i + step]) for i in range(0, full, step)]
        if full and full < len(body):
            self._first = now   # the conns left over arrived now
        self._body = body[full:]

    def take(self, now: float) -> list[bytes]:
        """The messages due at ``now`` (seconds, the clock of ``add``): the
        full ones, and the partial one once it is ``flush_after`` old.
        (There is no flush on stop: the kernel's master drops its partial
        buffer when its thread stops.)"""
        if self._body and now - self._first >= self.flush_after:
            self.ready.append(message(self.syncid, self._body))
            self._body = b""
        out, self.ready = self.ready, []
        return out

    def __len__(self) -> int:
        """Conns waiting in the partial message."""
        return len(self._body) // CONN_V4_LEN


def new_counts() -> Counter:
    """A counter with every reason at 0 (so `pylvs stats` lists them all)."""
    return Counter({k: 0 for k in DROP_REASONS + SKIP_REASONS})


def _options(buf: bytes, p: int, end: int) -> str | None:
    """Check a conn's options in buf[p:end]: a drop reason, a skip reason,
    or None when the conn is good."""
    seen = 0
    skip = None
    while p < end:
        if p + 2 > end:
            return "bad_option"
        ptype, plen = buf[p], buf[p + 1]
        p += 2
        if plen == 0 or p + plen > end:
            return "bad_option"
        kind = ptype & ~OPT_F_PARAM
        if kind in (OPT_SEQ_DATA, OPT_PE_DATA, OPT_PE_NAME):
            limit = {OPT_SEQ_DATA: SEQ_OPT_LEN, OPT_PE_DATA: PEDATA_MAXLEN,
                     OPT_PE_NAME: PENAME_MAXLEN}[kind]
            if (kind == OPT_SEQ_DATA and plen != limit) or plen > limit or seen & (1 << kind):
                return "bad_option"
            seen |= 1 << kind
            if kind == OPT_PE_DATA:
                skip = skip or "skip_pe"
        elif not ptype & OPT_F_PARAM:
            # ip_vs_proc_sync_conn stops there and skips the conn: what
            # follows is not read, so a malformed option after it costs
            # only this conn, not the message.
            return "skip_option"
        p += plen
    return skip


def is_v1(buf: bytes) -> bool:
    """Does this datagram carry a v1 header (reserved 0, version 1, spare 0)?"""
    return len(buf) >= HEADER_LEN and buf[0] == 0 and buf[5] == SYNC_PROTO_VER \
        and buf[6] == 0 and buf[7] == 0


def decode(buf: bytes, syncid: int, counts: Counter | None = None) -> np.ndarray:
    """One received datagram → the SYNC_DTYPE records to install (possibly
    none); never raises. ``syncid``: the backup's, 0 accepts any (as the
    kernel's bcfg.syncid). Drops and skips are added to ``counts`` under
    the names of DROP_REASONS / SKIP_REASONS; records keep the flags as
    sent (the engine applies IP_VS_CONN_F_BACKUP_MASK)."""
    counts = counts if counts is not None else Counter()
    try:
        reason, out, skips = _decode(bytes(buf), syncid)
    except Exception:   # a bug must not cost the daemon; count it as bad framing
        reason, out, skips = "conn_size", None, []
    if reason is not None:
        counts[reason] += 1
        return np.zeros(0, dtype=SYNC_DTYPE)
    for s in skips:
        counts[s] += 1
    return out


def _records(w: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Wire conns (WIRE_V4) → the SYNC_DTYPE records to install, and the
    skip reason of each other. A conn (not a template) needs protocol TCP
    or UDP and a state below that protocol's count, as ip_vs_proc_sync_conn
    checks. A template, whatever its protocol, needs a state below
    IP_VS_CTPL_S_LAST (NONE or ASSURED): pylvs's stricter rule. The kernel
    only logs such a template at debug level and installs it (listed with
    state "ERR!"); no IPVS or pylvs master sends one, and pylvs's engines
    keep a template's state as the ASSURED bit, where a larger value would
    read as something it is not (engine/sync.refusal and the C engine's
    sync_install refuse it too)."""
    template = (w["flags"] & CONN_F_TEMPLATE) != 0
    tcp, udp = w["proto"] == tables.PROTO_TCP, w["proto"] == tables.PROTO_UDP
    state = w["state"]
    ok_state = np.where(template, state < CTPL_S_LAST,
                        np.where(tcp, state < states.N_TCP_STATES, state < UDP_S_LAST))
    bad_proto = ~template & ~tcp & ~udp
    good = ~bad_proto & ok_state
    skips: list[str] = []
    if not good.all():
        skips = ["skip_proto"] * int(bad_proto.sum()) \
            + ["skip_state"] * int((~bad_proto & ~ok_state).sum())
        w = w[good]
    out = np.empty(len(w), dtype=SYNC_DTYPE)
    for f in _FIELDS + ("flags",):
        out[f] = w[f]
    return out, skips


def _decode(buf: bytes, syncid: int) -> tuple[str | None, np.ndarray | None, list[str]]:
    n = len(buf)
    if n < HEADER_V0_LEN:
        return "short", None, []
    if int.from_bytes(buf[2:4], "big") != n:
        return "bad_size", None, []
    if syncid != 0 and buf[1] != syncid:
        return "wrong_syncid", None, []
    if buf[0] != 0:
        return "v0", None, []
    if not is_v1(buf):
        return ("short" if n < HEADER_LEN else "bad_version"), None, []
    nr = buf[4]
    if n == HEADER_LEN + nr * CONN_V4_LEN:   # the usual message: IPv4 conns without options
        w = np.frombuffer(buf, dtype=WIRE_V4, count=nr, offset=HEADER_LEN)
        if (w["type"] == 0).all() and (w["ver_size"] == CONN_V4_LEN).all():
            out, skips = _records(w)
            return None, out, skips
    taken: list[bytes] = []
    skips: list[str] = []
    p = HEADER_LEN
    end = HEADER_LEN
    for _ in range(nr):
        if p + CONN_V4_LEN > n:
            return "truncated", None, []
        ver_size = int.from_bytes(buf[p + 2:p + 4], "big")
        size = ver_size & SVER_MASK
        if ver_size >> SVER_SHIFT:
            return "conn_version", None, []
        ctype = buf[p]
        if ctype & STYPE_F_INET6:
            fixed = CONN_V6_LEN
        elif ctype == 0:
            fixed = CONN_V4_LEN
        else:
            return "bad_type", None, []
        end = p + size
        if size < fixed or end > n:
            return "conn_size", None, []
        why = _options(buf, p + fixed, end)
        if why is not None and not why.startswith("skip_"):
            return why, None, []
        if why is None and ctype & STYPE_F_INET6:
            why = "skip_ipv6"
        if why is None:
            taken.append(buf[p:p + CONN_V4_LEN])
        else:
            skips.append(why)
        p += (size + 3) & ~3   # the next conn starts 32-bit aligned
    if end != n and not (n == p and not any(buf[end:n])):
        return "nr_conns", None, []   # (a zero tail up to the next 4-byte boundary is padding)
    out, more = _records(np.frombuffer(b"".join(taken), dtype=WIRE_V4))
    return None, out, skips + more


# --- pylvs's bulk resync messages (docs/sync.md, "Bulk resync") ----------
#
# Shaped so an IPVS backup installs nothing from them: the first byte is 0
# and the version byte is not 1, so ip_vs_process_message takes the v0 path
# with nr_conns 0 (its first byte) and stops there.
CONTROL = struct.Struct("!BBHBbH4sBBHI")
CONTROL_LEN = CONTROL.size      # 20
CONTROL_VERSION = 0x70          # b"p"
CONTROL_MAGIC = b"PLVS"
BULK_REQUEST = 1                # a backup asks for the whole table
BULK_END = 2                    # the master's answer to that request is complete


def control_message(kind: int, syncid: int, nonce: int) -> bytes:
    """A bulk resync message: ``kind`` BULK_REQUEST or BULK_END,
    ``nonce`` the request's number (u32) the END answers."""
    return CONTROL.pack(0, syncid, CONTROL_LEN, 0, CONTROL_VERSION, 0, CONTROL_MAGIC,
                        kind, 0, 0, nonce & 0xFFFFFFFF)


def parse_control(buf: bytes) -> tuple[int, int, int] | None:
    """(kind, syncid, nonce) of a bulk resync message, else None."""
    if len(buf) != CONTROL_LEN:
        return None
    (z, syncid, size, nr, ver, spare, magic, kind, _r1, _r2, nonce) = CONTROL.unpack(buf)
    if (z, size, nr, ver, spare, magic) != (0, CONTROL_LEN, 0, CONTROL_VERSION, 0, CONTROL_MAGIC):
        return None
    if kind not in (BULK_REQUEST, BULK_END):
        return None
    return kind, syncid, nonce
