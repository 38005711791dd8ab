"""Locality-based least connection with replication (``-s lblcr``), as the
kernel's ip_vs_lblcr.c.

A cache maps the packet's destination address (daddr) to a *set* of dests
(newest member first):

    if cache[daddr] is empty:
        n <- wlc choice over the service; cache[daddr] <- {n}
    else:
        n <- wlc choice over the set's available members
        if the set has more than one member and was last changed more
                than ``expiration`` seconds ago (lblcr_expiration, 24 h):
            drop its most loaded member (the greatest overhead / weight
            among members of weight > 0, the first winning a tie)
        if n is none or "overloaded" (activeconns > weight while some
                dest of the service has activeconns * 2 < weight):
            n <- wlc choice over the service; add n to the set
    return n

wlc choice: the least overhead / weight, overhead = activeconns * 256 +
inactconns, over available dests (weight > 0, not overloaded by -x), the
first in list order winning a tie. Adding or dropping a member marks the
set changed; a hit refreshes the entry's last use. Whole entries expire
as lblc's do (lblc.ExpiringCache), with lblcr_expiration.

Dests deleted from the service leave every set at once (the kernel keeps
them as unavailable members until dropped as most loaded).
"""

from __future__ import annotations

from typing import Sequence

from .base import SchedCtx, SchedDest, least_per_weight, overhead, register
from .lblc import CachingScheduler, overloaded, wlc


def most_loaded(members: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
    """ip_vs_dest_set_max: the greatest overhead / weight among members of
    weight > 0 (the -x overload flag plays no part), the first winning a tie."""
    most = None
    moh = 0
    for d in members:
        if d.weight <= 0:
            continue
        doh = overhead(ctx.conns, d.slot)
        if most is None or moh * d.weight < doh * most.weight:
            most, moh = d, doh
    return most


@register("lblcr")
class LocalityBasedLeastConnectionReplication(CachingScheduler):
    def update(self, dests: Sequence[SchedDest]) -> None:
        present = {d.slot for d in dests}
        entries = self.cache.entries
        for daddr, en in list(entries.items()):
            members = [s for s in en[1] if s in present]
            if not members:
                del entries[daddr]
            elif len(members) != len(en[1]):
                en[1] = members

    def members(self, daddr: int) -> list[int]:
        """The dest slots cached for ``daddr``, newest first ([] if none)."""
        en = self.cache.entries.get(daddr)
        return list(en[1]) if en is not None else []

    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        self.cache.tick_until(ctx.now)
        entries = self.cache.entries
        en = entries.get(ctx.daddr)
        if en is None:
            d = wlc(dests, ctx)
            if d is not None:
                entries[ctx.daddr] = [ctx.now, [d.slot], ctx.now]
            return d
        en[0] = ctx.now
        by_slot = {d.slot: d for d in dests}
        members = [by_slot[s] for s in en[1] if s in by_slot]
        d = least_per_weight(members, ctx, lambda slot: overhead(ctx.conns, slot))
        if len(en[1]) > 1 and ctx.now > en[2] + self.cache.expiration:
            m = most_loaded(members, ctx)
            if m is not None:
                en[1].remove(m.slot)
                en[2] = ctx.now
        if d is not None and not overloaded(d, dests, ctx):
            return d
        d = wlc(dests, ctx)
        if d is None:
            return None
        if d.slot not in en[1]:
            en[1].insert(0, d.slot)
            en[2] = ctx.now
        return d
