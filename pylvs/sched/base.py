"""What every scheduler is, and the registry of them by ``ipvsadm -s`` name.

A scheduler is one short file named after its ``-s`` name (like the kernel's
ip_vs_wlc.c) that states its formula in its docstring and registers itself
with ``@register("name")``. The engine calls the service's scheduler when a
new flow arrives (an upcall from C), so ``schedule`` is on the new-connection
path: keep it free of allocation-heavy work.

Dest order: ``dests`` is the service's list as the kernel keeps it, newest
first (ip_vs_ctl.c's __ip_vs_update_dest adds a dest with list_add_rcu at the
head; ``-e`` leaves it in place). Round-robin turns, tie breaks and the
sh/dh/mh table layouts all follow that order.

Availability: a dest is *available* when its weight is > 0 and it is not
overloaded by its ``-x``/``-y`` thresholds (the kernel's IP_VS_DEST_F_OVERLOAD,
``ctx.overloaded(slot)``). ``dests`` holds every dest of the service; each
scheduler applies those two tests itself, at the point its kernel file does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np


class SchedDest(Protocol):
    """The scheduler's view of a real server."""

    slot: int    # the dest's stable slot: row of the counter arrays
    weight: int  # 0 = quiesced: no new conns, established ones continue


def never_overloaded(slot: int) -> bool:
    """The overload test of a service without -x thresholds."""
    return False


@dataclass(slots=True)
class SchedCtx:
    """What the kernel's schedule(svc, skb, iph) sees besides the dest list.

    - ``conns``: int array [max_dests, 2], ``conns[slot, 0]`` the dest's
      activeconns, ``conns[slot, 1]`` its inactconns (tables.ACTIVE,
      tables.INACTIVE; counters.dest_conns, live from the engines);
    - ``caddr, cport``: the client's address and port, host order;
    - ``daddr, dport``: the packet's destination (the service's vaddr and
      the packet's destination port), host order;
    - ``now``: seconds on the balancer's clock (float), for expiry;
    - ``overloaded(slot) -> bool``: the dest's IP_VS_DEST_F_OVERLOAD flag.
    """

    conns: np.ndarray
    caddr: int = 0
    cport: int = 0
    daddr: int = 0
    dport: int = 0
    now: float = 0.0
    overloaded: Callable[[int], bool] = never_overloaded


class Scheduler:
    """Base class. Subclasses implement ``schedule``; stateful ones ``update``."""

    name = ""
    # update() depends on the order of changes, not only on the new list
    # (wrr's current weight): the Balancer then hands it the dests a batch
    # added one at a time, as the kernel's add_dest hook sees them.
    stepwise = False

    def __init__(self, flags: frozenset[str] = frozenset()):
        # The names ipvsadm shows for the service's flag bits (sh-port,
        # flag-1, ...); -E may change them later, read them when used.
        self.flags = flags

    def update(self, dests: Sequence[SchedDest]) -> None:
        """The service's dest list or weights changed (the kernel's
        add_dest / del_dest / upd_dest hooks)."""

    def configure(self, sysctls: Mapping[str, int]) -> None:
        """The sysctls (name: value) as they are now; a scheduler takes its
        own (sched.SYSCTLS) from them."""

    def schedule(self, dests: Sequence[SchedDest], ctx: SchedCtx) -> SchedDest | None:
        """Pick a dest of ``dests`` (newest first) for a new conn, or None
        when the kernel's scheduler would return NULL."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Scheduler]] = {}


def register(name: str) -> Callable[[type[Scheduler]], type[Scheduler]]:
    def deco(cls: type[Scheduler]) -> type[Scheduler]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def available(d: SchedDest, ctx: SchedCtx) -> bool:
    """Weight > 0 and not overloaded: may take a new conn."""
    return d.weight > 0 and not ctx.overloaded(d.slot)


def overhead(conns: np.ndarray, slot: int) -> int:
    """IPVS's ip_vs_dest_conn_overhead: active conns weigh 256 inactive ones."""
    return int(conns[slot, 0]) * 256 + int(conns[slot, 1])


def least_per_weight(dests: Sequence[SchedDest], ctx: SchedCtx, cost: Callable[[int], int],
                     at_once: Callable[[int], bool] | None = None) -> SchedDest | None:
    """The available dest with the least cost(slot) / weight, compared by
    cross-multiplying (h1 * w2 > h2 * w1, as ip_vs_wlc.c and its kin do);
    the first in list order winning a tie; a dest whose cost ``at_once``
    accepts is taken as soon as it is met (nq's idle dest). None when no
    dest is available."""
    least = None
    loh = 0
    for d in dests:
        if not available(d, ctx):
            continue
        doh = cost(d.slot)
        if at_once is not None and at_once(doh):
            return d
        if least is None or loh * d.weight > doh * least.weight:
            least, loh = d, doh
    return least


class HashTableScheduler(Scheduler):
    """sh, dh and mh: a table of dest slots (``table``, numpy int32, -1
    empty) built in ``update``, looked up by a hash of the packet."""

    table_size = 0

    def __init__(self, flags: frozenset[str] = frozenset()):
        super().__init__(flags)
        self.table = np.full(self.table_size, -1, dtype=np.int32)
        self._by_slot: dict[int, SchedDest] = {}

    def update(self, dests: Sequence[SchedDest]) -> None:
        self._by_slot = {d.slot: d for d in dests}
        self.table = self.build(dests)

    def build(self, dests: Sequence[SchedDest]) -> np.ndarray:
        raise NotImplementedError

    def pick(self, index: int, ctx: SchedCtx,
             fallback: Iterable[int] | None = None) -> SchedDest | None:
        """The dest at ``table[index]`` if available; else, given the
        ``fallback`` indices, the first available dest at them, stopping
        at an empty entry (ip_vs_sh/mh_get_fallback)."""
        d = self._by_slot.get(int(self.table[index]))
        if d is None or available(d, ctx):
            return d
        for i in fallback or ():
            d = self._by_slot.get(int(self.table[i]))
            if d is None:
                return None
            if available(d, ctx):
                return d
        return None
