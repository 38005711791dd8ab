"""Never queue (``-s nq``), as the kernel's ip_vs_nq.c.

A dest with no active conn takes the new conn at once (the first such in
list order): nobody queues while a server is idle. Otherwise, as sed, the
least (activeconns + 1) / weight, compared by cross-multiplying, the first
dest in list order winning a tie. Dests of weight 0 or overloaded are
skipped, idle or not.
"""

from __future__ import annotations

from typing import Sequence

from .base import SchedCtx, SchedDest, Scheduler, least_per_weight, register
from .sed import expected_delay


@register("nq")
class NeverQueue(Scheduler):
    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        # An expected delay of 1: no active conn, idle: taken at once.
        return least_per_weight(dests, ctx, lambda slot: expected_delay(ctx.conns, slot),
                                at_once=lambda delay: delay == 1)
