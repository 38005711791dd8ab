"""Weighted overflow (``-s ovf``), as the kernel's ip_vs_ovf.c.

Every new conn goes to the dest with the highest weight among those whose
active conns do not exceed their weight (activeconns <= weight), the first
in list order among equals: the heaviest dest fills up to its weight, then
the next one takes the overflow. Weight 0 and an overloaded dest are never available; with every
dest full, there is none (the conn is refused, as the kernel's returns
NULL).
"""

from __future__ import annotations

from typing import Sequence

from .base import SchedCtx, SchedDest, Scheduler, available, register


@register("ovf")
class WeightedOverflow(Scheduler):
    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        best = None
        for d in dests:
            if not available(d, ctx) or int(ctx.conns[d.slot, 0]) > d.weight:
                continue
            if best is None or d.weight > best.weight:
                best = d
        return best
