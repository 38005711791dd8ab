"""Weighted failover (``-s fo``), as the kernel's ip_vs_fo.c.

Every new conn goes to the available dest with the highest weight: the
first in list order among equals. Weight 0 and a dest overloaded by its
``-x`` threshold are not available. Conn counts play no part: the others are
spares that take over only when the heavier ones are quiesced or gone.
"""

from __future__ import annotations

from typing import Sequence

from .base import SchedCtx, SchedDest, Scheduler, register


@register("fo")
class WeightedFailover(Scheduler):
    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        best = None
        for d in dests:
            if not ctx.overloaded(d.slot) and d.weight > (0 if best is None else best.weight):
                best = d
        return best
