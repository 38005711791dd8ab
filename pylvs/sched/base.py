"""What every scheduler is, and the registry of them by ``ipvsadm -s`` name.

A scheduler is one short file named after its ``-s`` name (like the kernel's
ip_vs_wlc.c) that states its formula in its docstring and registers itself
with ``@register("name")``. The engine calls the service's scheduler when a
new flow arrives (an upcall from C), so ``schedule`` is on the new-connection
path: keep it free of allocation-heavy work.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np


class SchedDest(Protocol):
    """The scheduler's view of a real server."""

    slot: int    # the dest's stable slot: row of the counter arrays
    weight: int  # 0 = quiesced: no new conns, established ones continue


class Scheduler:
    """Base class. Subclasses implement ``schedule``; stateful ones ``update``."""

    name = ""

    def __init__(self, flags: frozenset[str] = frozenset()):
        self.flags = flags

    def update(self, dests: Sequence[SchedDest]) -> None:
        """The service's dest list or weights changed (as the kernel's update_service)."""

    def schedule(self, dests: Sequence[SchedDest], conns: np.ndarray,
                 caddr: int, cport: int) -> SchedDest | None:
        """Pick a dest for a new conn from client caddr:cport, or None.

        ``conns[d.slot, 0]`` is d's activeconns and ``conns[d.slot, 1]`` its
        inactconns (tables.ACTIVE, tables.INACTIVE), live from the engine.
        """
        raise NotImplementedError


_REGISTRY: dict[str, type[Scheduler]] = {}


def register(name: str) -> Callable[[type[Scheduler]], type[Scheduler]]:
    def deco(cls: type[Scheduler]) -> type[Scheduler]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def overhead(conns: np.ndarray, slot: int) -> int:
    """IPVS's ip_vs_dest_conn_overhead: active conns weigh 256 inactive ones."""
    return int(conns[slot, 0]) * 256 + int(conns[slot, 1])


def least_per_weight(dests: Sequence[SchedDest], cost: Callable[[int], int],
                     at_once: Callable[[int], bool] | None = None) -> SchedDest | None:
    """The dest with the least cost(slot) / weight, compared by
    cross-multiplying (h1 * w2 > h2 * w1, as ip_vs_wlc.c and its kin do);
    weight 0 skipped, the first in list order winning a tie; a dest whose
    cost ``at_once`` accepts is taken as soon as it is met (nq's idle
    dest). None when every dest has weight 0."""
    least = None
    loh = 0
    for d in dests:
        if d.weight <= 0:
            continue
        doh = cost(d.slot)
        if at_once is not None and at_once(doh):
            return d
        if least is None or loh * d.weight > doh * least.weight:
            least, loh = d, doh
    return least

