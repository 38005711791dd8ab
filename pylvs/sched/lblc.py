"""Locality-based least connection (``-s lblc``), as the kernel's ip_vs_lblc.c.

A cache maps the packet's destination address (daddr) to a dest:

    if cache[daddr] is empty, or its dest is gone or has weight 0, or it
            is "overloaded": activeconns > weight while some dest of the
            service has activeconns * 2 < weight:
        cache[daddr] <- the wlc choice: least overhead / weight over the
            available dests (weight > 0, not overloaded by -x), overhead =
            activeconns * 256 + inactconns, the first in list order
            winning a tie
    return cache[daddr]

Note the cache does not look at the ``-x`` overload flag; only a fresh
choice does. A cache hit refreshes the entry's last use. Expiry runs on a
60 s tick (counted on ``ctx.now`` from the first conn): every 30th tick
drops entries unused for ``expiration`` seconds (the lblc_expiration
sysctl, default 24 h), and a tick that finds more than 16384 entries
drops entries unused for 6 min until (entries - 16384) * 4/3 (at most
8192) are gone. The kernel walks its hash buckets from a rover; this
walks entries oldest first.

Dests deleted from the service leave the cache at once (the kernel keeps
a deleted dest's entry until it is next used, and then replaces it).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from .base import SchedCtx, SchedDest, Scheduler, least_per_weight, overhead, register

CHECK_EXPIRE_INTERVAL = 60.0
ENTRY_TIMEOUT = 6 * 60.0
DEFAULT_EXPIRATION = 24 * 60 * 60.0
COUNT_FOR_FULL_EXPIRATION = 30
MAX_SIZE = (1 << 10) * 16      # IP_VS_LBLC_TAB_SIZE * 16


def wlc(dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
    """__ip_vs_lblc_schedule: the weighted least-connection available dest."""
    return least_per_weight(dests, ctx, lambda slot: overhead(ctx.conns, slot))


def overloaded(d: SchedDest, dests: Sequence[SchedDest], ctx: SchedCtx) -> bool:
    """The cache's rule: d has more active conns than its weight while some
    dest has fewer than half its weight."""
    conns = ctx.conns
    if int(conns[d.slot, 0]) <= d.weight:
        return False
    return any(int(conns[o.slot, 0]) * 2 < o.weight for o in dests)


class ExpiringCache:
    """Entries keyed by daddr with a ``lastuse`` time, and the kernel's
    periodic garbage collection of lblc/lblcr, replayed tick by tick."""

    expiration = DEFAULT_EXPIRATION

    def __init__(self) -> None:
        self.entries: dict[int, list] = {}   # daddr -> [lastuse, ...]
        self._next_tick: float | None = None
        self._counter = 1

    def tick_until(self, now: float) -> None:
        if self._next_tick is None:
            self._next_tick = now + CHECK_EXPIRE_INTERVAL
        while now >= self._next_tick:
            self._check(self._next_tick)
            self._next_tick += CHECK_EXPIRE_INTERVAL

    def _check(self, now: float) -> None:
        if self._counter % COUNT_FOR_FULL_EXPIRATION == 0:
            self._drop(lambda last: now >= last + self.expiration)
            self._counter = 1
        elif len(self.entries) <= MAX_SIZE:
            self._counter += 1
        else:
            goal = min((len(self.entries) - MAX_SIZE) * 4 // 3, MAX_SIZE // 2)
            self._drop(lambda last: now >= last + ENTRY_TIMEOUT, goal)

    def _drop(self, stale, goal: int | None = None) -> None:
        for daddr in [k for k, e in self.entries.items() if stale(e[0])]:
            del self.entries[daddr]
            if goal is not None:
                goal -= 1
                if goal <= 0:
                    return


class CachingScheduler(Scheduler):
    """lblc and lblcr: a scheduler with an ExpiringCache keyed by daddr."""

    def __init__(self, flags: frozenset[str] = frozenset()):
        super().__init__(flags)
        self.cache = ExpiringCache()

    @property
    def expiration(self) -> float:
        """Seconds an unused entry lives (the lblc_expiration or
        lblcr_expiration sysctl; lblcr's sets shed a member after as long
        without change)."""
        return self.cache.expiration

    @expiration.setter
    def expiration(self, seconds: float) -> None:
        self.cache.expiration = seconds

    def configure(self, sysctls: Mapping[str, int]) -> None:
        self.expiration = sysctls.get(self.name + "_expiration", self.expiration)


@register("lblc")
class LocalityBasedLeastConnection(CachingScheduler):

    def update(self, dests: Sequence[SchedDest]) -> None:
        present = {d.slot for d in dests}
        entries = self.cache.entries
        for daddr in [k for k, e in entries.items() if e[1] not in present]:
            del entries[daddr]

    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        self.cache.tick_until(ctx.now)
        entries = self.cache.entries
        en = entries.get(ctx.daddr)
        if en is not None:
            en[0] = ctx.now
            for d in dests:
                if d.slot == en[1]:
                    if d.weight > 0 and not overloaded(d, dests, ctx):
                        return d
                    break
        d = wlc(dests, ctx)
        if d is None:
            return None
        if en is None or en[1] != d.slot:
            # A new entry (a replaced one starts afresh, at the newest end).
            entries.pop(ctx.daddr, None)
            entries[ctx.daddr] = [ctx.now, d.slot]
        return d
