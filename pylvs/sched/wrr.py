"""Weighted round robin (``-s wrr``), interleaved, as the kernel's ip_vs_wrr.c.

A current weight ``cw`` starts at ``mw = max(weights) - (gcd - 1)`` and steps
down by ``di = gcd(weights > 0)`` each time the list is walked to its end
(back to ``mw`` below 1). Walking the list from the last pick, the next dest
with ``weight >= cw`` is picked. Over one cycle each dest gets ``weight/gcd``
conns, interleaved: weights 4, 3, 2 give A A B A B C A B C. An overloaded
dest is passed over; weight 0 never reaches ``cw`` >= 1.
"""

from __future__ import annotations

import math
from typing import Sequence

from .base import SchedCtx, SchedDest, Scheduler, register


@register("wrr")
class WeightedRoundRobin(Scheduler):
    stepwise = True

    def __init__(self, flags: frozenset[str] = frozenset()):
        super().__init__(flags)
        self._cl = -1   # index of the last pick; -1 is the list head
        self._cw = 0    # current weight
        self._mw = 0    # max weight, less (gcd - 1)
        self._di = 1    # gcd of the positive weights: the step of cw
        self._fresh = True

    def update(self, dests: Sequence[SchedDest]) -> None:
        # As ip_vs_wrr_dest_changed: restart from the head, keep cw where it
        # was when it still fits, aligned to the new gcd.
        self._fresh = False
        self._cl = -1
        g = 0
        for d in dests:
            if d.weight > 0:
                g = math.gcd(g, d.weight)
        self._di = g or 1
        self._mw = max((d.weight for d in dests), default=0) - (self._di - 1)
        if self._cw > self._mw or self._cw == 0:
            self._cw = self._mw
        elif self._di > 1:
            self._cw = (self._cw // self._di) * self._di + 1

    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        if self._fresh:
            self.update(dests)
        if self._mw <= 0:
            return None
        n = len(dests)
        last = self._cl
        pos = last
        stop = None
        last_pass = restarted = False
        while True:
            for i in range(pos + 1, n):
                if dests[i].weight >= self._cw and not ctx.overloaded(dests[i].slot):
                    self._cl = i
                    return dests[i]
                if i == stop:
                    self._cl = i
                    return None
            pos = -1
            self._cw -= self._di
            if self._cw <= 0:
                self._cw = self._mw
                # Every dest was tried against weight >= 1 already: none left.
                if last_pass or last == -1:
                    self._cl = -1
                    return None
                restarted = True
            last_pass = self._cw <= self._di
            if last_pass and restarted and last != -1:
                # The weight >= 1 pass began after `last`; finish it there.
                stop = last
