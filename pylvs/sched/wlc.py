"""Weighted least connection (``-s wlc``, the default), as ip_vs_wlc.c.

Pick the dest with the least overhead / weight, where overhead =
activeconns * 256 + inactconns. Ratios are compared by cross-multiplying
(h1 * w2 > h2 * w1) so no division is needed; dests of weight 0 or
overloaded are skipped and the first dest in list order wins a tie.
"""

from __future__ import annotations

from typing import Sequence

from .base import SchedCtx, SchedDest, Scheduler, least_per_weight, overhead, register


@register("wlc")
class WeightedLeastConnection(Scheduler):
    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        return least_per_weight(dests, ctx, lambda slot: overhead(ctx.conns, slot))
