"""Maglev hashing (``-s mh``), as the kernel's ip_vs_mh.c.

A lookup table of M = 4093 (a prime; the kernel's default
CONFIG_IP_VS_MH_TAB_INDEX 12) entries maps the client: entry =
hsiphash(caddr + port, K1) mod M (u32 sum; port = the client's port with
``-b mh-port``, else 0), K1 = (2654435761, 2654435761).

Table (Maglev, NSDI 2016, section 3.4, with the kernel's weights): each
dest, in list order (newest first), gets offset = h(K1) mod M and skip =
h(K2) mod (M - 1) + 1, h = hsiphash(daddr + dest port),
K2 = (2654446892, 2654446892), and a number of turns = (last_weight / g)
>> s, at least 1 if last_weight > 0 (g = gcd of the positive last
weights, s = max(0, bit length of max(last_weight) / g - 6)). Rounds walk
the dests in order; in its turn a dest takes its next preferred free
entry (offset, offset + skip, ... mod M) turns times in a row, until the
M entries are taken. last_weight is the dest's last weight other than 0
(ip_vs_ctl.c), so quiescing a dest (-w 0) leaves the table as it was;
dests whose last_weight is 0 take no entry, and with none left every
entry is empty.

The entry's dest takes the conn if available (weight > 0, not
overloaded); else none, or with ``-b mh-fallback`` the first available
dest at entries hsiphash(r + caddr + port, K1) mod M for r = entry,
entry + 1, ... (mod M), stopping at an empty entry.

``table`` (int32[M], dest slots, -1 empty) and ``bucket(caddr, cport)``
are what the C engine's lookup reads and computes.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .base import HashTableScheduler, SchedCtx, SchedDest, register
from .hashes import U32, hsiphash_u32

TAB_SIZE = 4093
TAB_BITS = 6          # the kernel's IP_VS_MH_TAB_BITS: CONFIG_IP_VS_MH_TAB_INDEX / 2
KEY1 = (2654435761, 2654435761)
KEY2 = (2654446892, 2654446892)


def _hashkey(addr: int, port: int, key: tuple[int, int], offset: int = 0) -> int:
    return hsiphash_u32(key, (offset + port + addr) & U32)


def turns(last_weights: Sequence[int]) -> list[int]:
    """Entries each dest takes per round: the kernel's weight / gcd, shifted
    right so the largest fits in 6 bits; at least 1 for a positive weight."""
    g = 0
    for w in last_weights:
        if w > 0:
            g = math.gcd(g, w)
    if g < 1:
        return [0] * len(last_weights)
    shift = max(0, (max(last_weights) // g).bit_length() - TAB_BITS)
    return [((w // g) >> shift) or int(w != 0) for w in last_weights]


def build_table(dests: Sequence[SchedDest]) -> np.ndarray:
    """The lookup table for ``dests`` in list order: int32[TAB_SIZE] of slots.

    Each dest needs ``daddr``, ``dest_port`` (the dest's port as configured)
    and ``last_weight``."""
    table = np.full(TAB_SIZE, -1, dtype=np.int32)
    t = turns([d.last_weight for d in dests])
    if not any(t):
        return table
    perm = [_hashkey(d.daddr, d.dest_port, KEY1) % TAB_SIZE for d in dests]
    skip = [_hashkey(d.daddr, d.dest_port, KEY2) % (TAB_SIZE - 1) + 1 for d in dests]
    taken = bytearray(TAB_SIZE)
    n = 0
    while True:
        for i, d in enumerate(dests):
            for _ in range(t[i]):
                c = perm[i]
                while taken[c]:
                    c += skip[i]
                    if c >= TAB_SIZE:
                        c -= TAB_SIZE
                perm[i] = c
                taken[c] = 1
                table[c] = d.slot
                n += 1
                if n == TAB_SIZE:
                    return table


@register("mh")
class MaglevHashing(HashTableScheduler):
    table_size = TAB_SIZE

    @property
    def fallback(self) -> bool:
        return "mh-fallback" in self.flags

    @property
    def use_port(self) -> bool:
        return "mh-port" in self.flags

    def build(self, dests: Sequence[SchedDest]) -> np.ndarray:
        # The kernel refuses to rebuild for more dests than entries
        # (-EINVAL from ip_vs_mh_reassign) and keeps the table it had.
        return build_table(dests) if len(dests) <= TAB_SIZE else self.table

    def bucket(self, caddr: int, cport: int) -> int:
        """The entry of client caddr:cport (host order): an index into ``table``."""
        return _hashkey(caddr, cport if self.use_port else 0, KEY1) % TAB_SIZE

    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        ihash = self.bucket(ctx.caddr, ctx.cport)
        port = ctx.cport if self.use_port else 0
        return self.pick(ihash, ctx, (
            _hashkey(ctx.caddr, port, KEY1, (offset + ihash) % TAB_SIZE) % TAB_SIZE
            for offset in range(TAB_SIZE)) if self.fallback else None)
