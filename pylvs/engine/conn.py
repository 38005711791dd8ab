"""The reference engine's conn table (docs/engine.md, "Conn table").

The C engine (pylvs/_fast/ip_vs_conn.c) keeps the same slots, in the same
order, and draws the same eviction samples; this module says how in plain
Python. What the two share bit for bit:

- Slots. ``limit`` is the most conns the table holds (the kernel has no such
  cap; pylvs has one so that memory stays bounded). A new conn takes the
  slot freed last (a LIFO free list), else the next never-used slot
  ``high``; slots ``[0, high)`` are the ones ever used.
- Expiry. ``expire(now, budget)`` walks a clock hand over ``[0, high)``.
- Eviction. When ``limit`` conns exist, a new one replaces one found by
  sampling (``victim``): up to ``EVICT_SAMPLES`` slots drawn with splitmix64
  from a state seeded with ``k0 ^ k1`` (the hash key's two little-endian
  64-bit words), each ``slot = ((r >> 32) * high) >> 32``. Draws may repeat
  a slot; each draw counts. A dead conn drawn is taken at once (no more
  draws); otherwise, after all draws, the conn of the lowest class drawn and,
  in that class, the one idle longest: the smallest ``expires -
  timeouts[state]`` (its last packet; ties: the first drawn); none (only
  ESTABLISHED drawn): ``drop_table_full``.
- Memory (``memory``): the C slab made usable (64 bytes a conn, in 2 MiB
  units, the whole table at once when it is smaller than one unit, rounded
  to 4 KiB) plus the index (8 bytes a bucket, 16 buckets at first, doubled
  while 4 x conns would exceed it). The reference computes what the C
  engine holds; its own Python objects are larger.
"""

from __future__ import annotations

from typing import Callable

from . import states, tables

_ST = tables.STAT_INDEX
CONNS_EXPIRED = _ST["conns_expired"]
CONNS_EVICTED = _ST["conns_evicted"]
CONNS_REUSED = _ST["conns_reused"]
CONNS_DROPPED = _ST["conns_dropped"]

MAX_LIMIT = 1 << 26
CONN_BYTES = 64          # struct conn: one cache line
BUCKET_BYTES = 8         # struct bucket: tag, ref
SLAB_UNIT = 2 << 20      # the slab grows a huge page at a time
SLAB_PAGE = 4096
INDEX_MIN = 16
INDEX_PER_CONN = 3      # buckets per conn at least: load <= 2/3 (ip_vs.h)
EVICT_SAMPLES = 32

_M64 = (1 << 64) - 1
TCP = tables.PROTO_TCP


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


TPL_PROTO = 0x80         # or'ed into a template's protocol: no frame's tuple reaches it
TPL_LATE_TIMEOUT = 60    # s: a template expiring while it controls conns waits again


class Conn:
    __slots__ = ("proto", "caddr", "cport", "vaddr", "vport", "daddr", "dport",
                 "state", "expires", "fwd", "dest", "svc", "cmac", "lmac",
                 "in_port", "slot", "in_key", "out_key", "replied", "xmit", "in_dir",
                 "template", "control", "n_control", "tpl_timeout", "in_pkts",
                 "synced", "no_l2", "sync_old", "sync_end")
    # xmit: the reference engine's XMIT_* kind, bound at creation (ip_vs_bind_xmit);
    # in_dir: the state table of client packets (INPUT for NAT, else INPUT_ONLY);
    # out_key: None for all but NAT conns (only their replies pass the director),
    # and for an invalidated template also in_key (out of the index);
    # template: a persistence template (docs/engine.md, "Persistence"), whose
    # n_control counts the conns naming it in `control` (the kernel's
    # cp->control, n_control); tpl_timeout: a template's timeout in s;
    # in_pkts: client packets (the kernel's atomic_t, wrapping at 2**32; read
    # by drop_entry's todrop_entry and the sync rule); synced: installed by
    # sync_install (IP_VS_CONN_F_SYNC); no_l2: so installed and its client's
    # MACs and port not learnt yet; sync_old, sync_end: the sync rule's
    # memory (pylvs.engine.sync.needed).

    def __init__(self) -> None:
        self.template = False
        self.control = None
        self.n_control = 0
        self.in_pkts = 0
        self.synced = False
        self.no_l2 = False
        self.sync_old = 0
        self.sync_end = 0


def tpl_held(c: Conn) -> bool:
    """A template that controls conns: it never leaves the table."""
    return c.template and c.n_control > 0


def evict_class(c: Conn, now: float) -> int:
    """0: reclaimed first (dead, TCP TIME_WAIT or CLOSE, or not ESTABLISHED
    and never answered by the real server: half-open TCP, one-way UDP);
    1: any other conn not ESTABLISHED; -1: never evicted (ESTABLISHED).
    A template: -1 while it controls conns, else 0 until ASSURED, then 1."""
    if c.template:
        return -1 if c.n_control else (1 if c.state & tables.CTPL_ASSURED else 0)
    if c.expires <= now:
        return 0
    if c.proto == TCP:
        if c.state == states.ESTABLISHED:
            return -1
        if c.state in (states.TIME_WAIT, states.CLOSE):
            return 0
    return 1 if c.replied else 0


class ConnTable:
    """Conns by slot, indexed by their IN and OUT keys.

    ``index`` maps a key (proto, addr, port, addr, port) to (conn, direction)
    with direction states.INPUT for the IN key (client -> VIP) and
    states.OUTPUT for the OUT key (real server -> client), which only NAT
    conns have (``out_key`` None otherwise). Removals bump a
    counter in ``pend`` (the engine's pending global counters) and the dest's
    ACTIVE or INACTIVE count in ``counters.dest_conns``.
    """

    def __init__(self, limit: int, key: bytes, counters: tables.Counters, pend: list[int]):
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"capacity must be 1..{MAX_LIMIT}, not {limit}")
        self.limit = limit
        self.counters = counters
        self.pend = pend
        self.index: dict[tuple, tuple[Conn, int]] = {}
        self.slots: list[Conn | None] = []   # len(slots) == high
        self.free: list[int] = []            # LIFO: pop() is the slot freed last
        self.hand = 0
        self.count = 0
        self.nbuckets = INDEX_MIN
        self.rng = int.from_bytes(key[:8], "little") ^ int.from_bytes(key[8:16], "little")
        self.todrop_counter = [0] * 9   # drop_entry's countdown per in_pkts (kernel's static)
        # Called with a dest slot after a conn left it (the engine's overload flag).
        self.unbind: Callable[[int], None] = lambda d: None

    @property
    def high(self) -> int:
        return len(self.slots)

    @property
    def memory(self) -> int:
        slab = 0
        if self.high:
            slab = min(_round_up(self.high * CONN_BYTES, SLAB_UNIT),
                       _round_up(self.limit * CONN_BYTES, SLAB_PAGE))
        return slab + self.nbuckets * BUCKET_BYTES

    def full(self) -> bool:
        return self.count >= self.limit

    def conns(self) -> list[Conn]:
        return [c for c in self.slots if c is not None]

    def lookup(self, key: tuple, now: float):
        """(conn, direction) for a live conn under `key`, else None; a dead
        one found is removed on the spot (conns_expired)."""
        hit = self.index.get(key)
        if hit is not None and hit[0].expires <= now:
            self.remove(hit[0], CONNS_EXPIRED)
            return None
        return hit

    def remove(self, c: Conn, stat: int) -> None:
        if c.in_key is not None:
            del self.index[c.in_key]
        if c.out_key is not None:
            del self.index[c.out_key]
        if c.template:
            if c.dest < self.counters.max_dests:
                self.counters.dest_persist[c.dest] -= 1
        else:
            col = tables.ACTIVE if (c.proto == TCP and c.state in states.ACTIVE) else tables.INACTIVE
            if c.control is not None:
                c.control.n_control -= 1
                c.control = None
            if c.dest < self.counters.max_dests:
                self.counters.dest_conns[c.dest, col] -= 1
        if c.dest < self.counters.max_dests:
            self.unbind(c.dest)
        self.slots[c.slot] = None
        self.free.append(c.slot)
        self.count -= 1
        self.pend[stat] += 1

    def _rand(self) -> int:
        """splitmix64 (Steele, Lea, Flood 2014)."""
        self.rng = (self.rng + 0x9E3779B97F4A7C15) & _M64
        z = self.rng
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)

    def victim(self, now: float, timeouts: list[float]) -> Conn | None:
        """At the limit: the conn a new one may replace, or None. `timeouts`
        (seconds by state) date each conn's last packet."""
        best, best_key = None, None
        high = self.high
        for _ in range(EVICT_SAMPLES):
            c = self.slots[((self._rand() >> 32) * high) >> 32]
            if c.expires <= now and not tpl_held(c):
                return c
            k = evict_class(c, now)
            key = (k, c.expires - timeouts[c.state])
            if k >= 0 and (best_key is None or key < best_key):
                best, best_key = c, key
        return best

    def add(self, c: Conn, victim: Conn | None, now: float) -> None:
        """Put `c` (its keys set) in a slot: when the table is full, `victim`
        (from victim(), same `now`) leaves first (conns_evicted, or
        conns_expired if it was dead anyway)."""
        if self.full():
            self.remove(victim, CONNS_EXPIRED if victim.expires <= now else CONNS_EVICTED)
        while INDEX_PER_CONN * (self.count + 1) > self.nbuckets:
            self.nbuckets *= 2
        if self.free:
            c.slot = self.free.pop()
            self.slots[c.slot] = c
        else:
            c.slot = len(self.slots)
            self.slots.append(c)
        if c.in_key is not None:
            self.index[c.in_key] = (c, states.INPUT)
        if c.out_key is not None:
            self.index[c.out_key] = (c, states.OUTPUT)
        self.count += 1

    def unhash(self, c: Conn) -> None:
        """An invalidated template leaves the index and shows cport 0, vport
        and dport 65535 (the kernel rehashes it there) until it expires."""
        if c.in_key is not None:
            del self.index[c.in_key]
            c.in_key = None
            c.cport, c.vport, c.dport = 0, 0xFFFF, 0xFFFF

    def _todrop_entry(self, c: Conn, now: float, timeouts: list[float]) -> bool:
        """The kernel's todrop_entry: a conn whose last packet is less than
        60 s old stays, so does one with no or more than 8 client packets;
        of those with i (1..8), every i-th met goes, the first at once."""
        if now + timeouts[c.state] < c.expires + 60.0:
            return False
        i = c.in_pkts
        if i == 0 or i > 8:
            return False
        self.todrop_counter[i] -= 1
        if self.todrop_counter[i] > 0:
            return False
        self.todrop_counter[i] = i
        return True

    def drop_entries(self, now: float, timeouts: list[float]) -> int:
        """drop_entry, the kernel's ip_vs_random_dropentry: ceil(high / 32)
        slots drawn as ``victim`` draws them (the kernel looks at 1/32 of
        its table a second); free slots and dead conns are passed over.
        Half-open TCP (SYN_RECV, SYNACK) goes at once, ESTABLISHED TCP and
        UDP as ``_todrop_entry`` says, other TCP states stay. Returns the
        conns removed (conns_dropped)."""
        high = self.high
        dropped = 0
        for _ in range((high + 31) >> 5):
            c = self.slots[((self._rand() >> 32) * high) >> 32]
            if c is None or c.expires <= now or c.template:   # templates stay, as in C
                continue
            if c.proto == TCP:
                drop = c.state in (states.SYN_RECV, states.SYNACK) or (
                    c.state == states.ESTABLISHED and self._todrop_entry(c, now, timeouts))
            else:
                drop = self._todrop_entry(c, now, timeouts)
            if drop:
                self.remove(c, CONNS_DROPPED)
                dropped += 1
        return dropped

    def expire(self, now: float, budget: int) -> int:
        """Move the hand `budget` slots over [0, high), removing dead conns;
        a budget beyond high visits each slot once and still moves the hand
        by `budget` (mod high)."""
        high = self.high
        if budget <= 0 or high == 0:
            return 0
        n = 0
        for i in range(min(budget, high)):
            c = self.slots[(self.hand + i) % high]
            if c is not None and c.expires <= now:
                if tpl_held(c):   # ip_vs_conn_expire: it waits again, by this timeout now
                    c.tpl_timeout = TPL_LATE_TIMEOUT
                    c.expires = now + TPL_LATE_TIMEOUT
                    continue
                self.remove(c, CONNS_EXPIRED)
                n += 1
        self.hand = (self.hand + budget) % high
        return n
