"""Power of two choices (``-s twos``), as the kernel's ip_vs_twos.c.

Over the available dests (weight > 0, not overloaded), total = sum of
weights + 1; two random numbers r1, r2 = rand32() mod total. Walking the
dests in list order, each r is decreased by the dest's weight; the first
dest at which r1 reaches <= 0 is choice 1, for r2 choice 2. Choice 2 wins
when its overhead / weight is smaller (w2 * oh1 > w1 * oh2, overhead =
activeconns * 256 + inactconns), else choice 1. So a dest is drawn in
proportion to its weight (the first one once more: r = 0) and the less
loaded of two draws takes the conn.

The random source is ``self.rng`` (random.Random; ``seed`` fixes it for
tests), in place of the kernel's get_random_u32.
"""

from __future__ import annotations

import random
from typing import Sequence

from .base import SchedCtx, SchedDest, Scheduler, available, overhead, register


@register("twos")
class TwoChoices(Scheduler):
    def __init__(self, flags: frozenset[str] = frozenset(), seed: int | None = None):
        super().__init__(flags)
        self.rng = random.Random(seed)

    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        avail = [d for d in dests if available(d, ctx)]
        if not avail:
            return None
        total = sum(d.weight for d in avail) + 1
        r1 = self.rng.getrandbits(32) % total
        r2 = self.rng.getrandbits(32) % total
        choice1 = choice2 = None
        for d in avail:
            r1 -= d.weight
            r2 -= d.weight
            if r1 <= 0 and choice1 is None:
                choice1 = d
            if r2 <= 0 and choice2 is None:
                choice2 = d
            if choice1 is not None and choice2 is not None:
                break
        oh1, oh2 = overhead(ctx.conns, choice1.slot), overhead(ctx.conns, choice2.slot)
        return choice2 if choice2.weight * oh1 > choice1.weight * oh2 else choice1
