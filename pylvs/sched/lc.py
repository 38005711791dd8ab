"""Least connection (``-s lc``), as the kernel's ip_vs_lc.c.

Pick the dest with the least overhead = activeconns * 256 + inactconns;
weight only counts as 0 = skip, and an overloaded dest is skipped. The first dest in list order wins a tie.
"""

from __future__ import annotations

from typing import Sequence

from .base import SchedCtx, SchedDest, Scheduler, available, overhead, register


@register("lc")
class LeastConnection(Scheduler):
    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        least = None
        loh = 0
        for d in dests:
            if not available(d, ctx):
                continue
            doh = overhead(ctx.conns, d.slot)
            if least is None or doh < loh:
                least, loh = d, doh
        return least
