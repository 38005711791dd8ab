"""Shortest expected delay (``-s sed``), as the kernel's ip_vs_sed.c.

Pick the dest with the least (activeconns + 1) / weight: the delay a new
conn expects if the dest serves its active conns at a rate proportional to
its weight. Inactive conns do not count (unlike wlc). Ratios are compared
by cross-multiplying, (h1 * w2 > h2 * w1); dests of weight 0 or overloaded are skipped and
the first dest in list order wins a tie.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import SchedCtx, SchedDest, Scheduler, least_per_weight, register


def expected_delay(conns: np.ndarray, slot: int) -> int:
    """ip_vs_sed_dest_overhead: activeconns + 1 (the new conn included)."""
    return int(conns[slot, 0]) + 1


@register("sed")
class ShortestExpectedDelay(Scheduler):
    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        return least_per_weight(dests, ctx, lambda slot: expected_delay(ctx.conns, slot))
