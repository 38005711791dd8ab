"""Least connection (``-s lc``), as the kernel's ip_vs_lc.c.

Pick the dest with the least overhead = activeconns * 256 + inactconns;
weight only counts as 0 = skip. The first dest in list order wins a tie.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import SchedDest, Scheduler, overhead, register


@register("lc")
class LeastConnection(Scheduler):
    def schedule(self, dests: Sequence[SchedDest], conns: np.ndarray,
                 caddr: int, cport: int) -> SchedDest | None:
        least = None
        loh = 0
        for d in dests:
            if d.weight <= 0:
                continue
            doh = overhead(conns, d.slot)
            if least is None or doh < loh:
                least, loh = d, doh
        return least
