"""Destination hashing (``-s dh``), as the kernel's ip_vs_dh.c.

A table of 256 buckets maps the packet's destination address: bucket =
hash_32(daddr, 8). The buckets are dealt to the dests in list order
(newest first), one each, cyclically; weights play no part in the table.
The bucket's dest takes the conn if available (weight > 0, not
overloaded), else there is none. For a service of one vaddr every packet
has the same daddr, so every conn goes to one dest.

``table`` (int32[256], dest slots, -1 empty) and ``bucket(daddr)`` are
what the C engine's lookup reads and computes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import HashTableScheduler, SchedCtx, SchedDest, register
from .hashes import fill_cyclic, hash_32

TAB_BITS = 8
TAB_SIZE = 1 << TAB_BITS


@register("dh")
class DestinationHashing(HashTableScheduler):
    table_size = TAB_SIZE

    def build(self, dests: Sequence[SchedDest]) -> np.ndarray:
        return fill_cyclic([d.slot for d in dests], [1] * len(dests), TAB_SIZE)

    @staticmethod
    def bucket(daddr: int, dport: int = 0) -> int:
        """The bucket of destination address daddr (host order); the port
        plays no part. An index into ``table``."""
        return hash_32(daddr, TAB_BITS)

    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        return self.pick(self.bucket(ctx.daddr), ctx)
