"""Round robin (``-s rr``), as the kernel's ip_vs_rr.c.

Pick the next available dest (weight > 0, not overloaded) after the last
one picked, cyclically through the list in its kernel order (newest
first): every available dest gets one new conn in turn. Weights other
than 0 play no part.
"""

from __future__ import annotations

from typing import Sequence

from .base import SchedCtx, SchedDest, Scheduler, available, register


@register("rr")
class RoundRobin(Scheduler):
    def __init__(self, flags: frozenset[str] = frozenset()):
        super().__init__(flags)
        self._pos = -1           # index of the last pick; -1 is the list head
        self._last_slot = -1     # its slot, to find it again after an update

    def update(self, dests: Sequence[SchedDest]) -> None:
        # Keep the turn where it was: on the same dest if it is still there,
        # else on the one before it (ip_vs_rr_del_dest moves its mark to the
        # previous list entry when the marked dest is deleted). A dest added
        # at the head does not move the mark, but shifts its index.
        for i, d in enumerate(dests):
            if d.slot == self._last_slot:
                self._pos = i
                return
        self._pos = min(self._pos - 1, len(dests) - 1) if self._pos >= 0 else -1
        self._last_slot = dests[self._pos].slot if self._pos >= 0 else -1

    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        n = len(dests)
        for step in range(1, n + 1):
            i = (self._pos + step) % n
            d = dests[i]
            if available(d, ctx):
                self._pos, self._last_slot = i, d.slot
                return d
        return None
