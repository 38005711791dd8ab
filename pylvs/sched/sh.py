"""Source hashing (``-s sh``), as the kernel's ip_vs_sh.c.

A table of 256 buckets maps the client: bucket = hash_32(caddr + port, 8)
(u32 sum; port = the client's port with ``-b sh-port``, else 0). The
buckets are dealt to the dests in list order (newest first), cyclically,
each dest taking ``weight`` buckets in a row (at least one: a dest of
weight 0 keeps one bucket, where it is unavailable). The bucket's dest
takes the conn if available (weight > 0, not overloaded); else none, or
with ``-b sh-fallback`` the first available dest found by walking buckets
(2 * bucket + i) mod 256, i = 0..255 (the kernel re-hashes with offset
bucket + i), stopping at an empty bucket.

``table`` (int32[256], dest slots, -1 empty) and ``bucket(caddr, cport)``
are what the C engine's lookup reads and computes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import HashTableScheduler, SchedCtx, SchedDest, register
from .hashes import U32, fill_cyclic, hash_32

TAB_BITS = 8
TAB_SIZE = 1 << TAB_BITS
TAB_MASK = TAB_SIZE - 1


@register("sh")
class SourceHashing(HashTableScheduler):
    table_size = TAB_SIZE

    @property
    def fallback(self) -> bool:
        return "sh-fallback" in self.flags

    @property
    def use_port(self) -> bool:
        return "sh-port" in self.flags

    def build(self, dests: Sequence[SchedDest]) -> np.ndarray:
        return fill_cyclic([d.slot for d in dests], [d.weight for d in dests], TAB_SIZE)

    def _hash(self, caddr: int, cport: int, offset: int) -> int:
        port = cport if self.use_port else 0
        return (offset + hash_32((port + caddr) & U32, TAB_BITS)) & TAB_MASK

    def bucket(self, caddr: int, cport: int) -> int:
        """The bucket of client caddr:cport (host order): an index into ``table``."""
        return self._hash(caddr, cport, 0)

    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        ihash = self.bucket(ctx.caddr, ctx.cport)
        return self.pick(ihash, ctx, (
            self._hash(ctx.caddr, ctx.cport, (offset + ihash) & TAB_MASK)
            for offset in range(TAB_SIZE)) if self.fallback else None)
