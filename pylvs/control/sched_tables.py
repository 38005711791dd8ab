"""The tables of the schedulers the engines run themselves (docs/engine.md,
"Schedulers in C"): control builds them, the data path only indexes them.

Per service slot a tables.SCHED_SVC_DTYPE row (kind, -b flags, its run of
SCHED_DEST_DTYPE rows: dest slot and weight in the order the service's
Python scheduler sees them), and per dest slot its -x/-y
(DEST_THRESH_DTYPE), which the engines read to keep the overload flag.
The first change after a publish copies the published arrays (which are
never written again) and rewrites one service's rows; later changes until
the next publish write the copies: a change costs at most a copy, never a
rebuild. A run that outgrows its room moves to the end, and the runs are
packed again once half of the rows are left-over room.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..engine import tables
from ..engine.tables import DEST_F_OVERLOAD, SCHED_KINDS, SCHED_UPCALL


class SchedTables:
    """``svcs``, ``dests``, ``thresholds``: the arrays last built (to hand
    to every engine's ``set_sched``). ``counters``: for the shared
    ``dest_flags`` and ``sched_state``."""

    def __init__(self, counters):
        self.counters = counters
        self.svcs, _, self.thresholds = tables.empty_sched(counters.max_services,
                                                          counters.max_dests)
        self.dests = np.zeros(64, dtype=tables.SCHED_DEST_DTYPE)
        self._end = 0                       # rows of `dests` in use or left over
        self._room: dict[int, int] = {}     # service slot -> rows reserved at its `first`
        self._rows: dict[int, tuple[int, int, np.ndarray]] = {}
        self._reserved = 0                  # rows of `dests` some service's room
        self._members: dict[int, tuple[int, ...]] = {}
        self._sched_obj: dict[int, object] = {}
        self._shared = False                # the arrays were handed out: copy first

    def _own(self) -> None:
        if self._shared:
            self.svcs, self.dests = self.svcs.copy(), self.dests.copy()
            self.thresholds = self.thresholds.copy()
            self._shared = False

    def update(self, svc_slot: int, sched_name: str, sched_flags: int, scheduler: object,
               views: Sequence, c_sched: bool) -> None:
        """The service's scheduler sees ``views`` now (objects with slot,
        weight, u_threshold, l_threshold, in its order). Also moves the rr/wrr
        state in counters.sched_state as the kernel's del_dest/dest_changed
        (a new ``scheduler`` object starts afresh, as init_service)."""
        kind = SCHED_KINDS.get(sched_name, SCHED_UPCALL)
        run = np.array([(v.slot, v.weight) for v in views], dtype=tables.SCHED_DEST_DTYPE)
        self._own()
        svcs, thresh = self.svcs, self.thresholds
        flags = self.counters.dest_flags
        for v in views:
            row = thresh[v.slot]
            # __ip_vs_update_dest: no -x, or a higher one, ends the overload.
            if v.u_threshold == 0 or v.u_threshold > int(row["u_threshold"]):
                flags[v.slot] &= ~np.uint8(DEST_F_OVERLOAD)
            row["u_threshold"], row["l_threshold"] = v.u_threshold, v.l_threshold
        kept = {v.slot for v in views}
        for slot in self._members.get(svc_slot, ()):
            if slot not in kept:
                thresh[slot] = 0
        self._members[svc_slot] = tuple(kept)
        self._step(svc_slot, kind, scheduler, run)
        self._rows[svc_slot] = (kind, sched_flags, run)
        first = int(svcs[svc_slot]["first"])
        if len(run) > self._room.get(svc_slot, 0):
            first = self._reserve(svc_slot, len(run))
        self.dests[first:first + len(run)] = run
        svcs[svc_slot] = (kind if c_sched else SCHED_UPCALL, sched_flags, 0, first, len(run))
        if self._end - self._reserved > max(1024, self._reserved):
            self.rebuild(c_sched)

    def step(self, svc_slot: int, sched_name: str, scheduler: object, views: Sequence) -> None:
        """One of the kernel's per-dest add_dest calls a batch replays
        (Scheduler.stepwise) before ``update`` gives the final list: the
        rr/wrr state moves as the Python scheduler's does."""
        run = np.array([(v.slot, v.weight) for v in views], dtype=tables.SCHED_DEST_DTYPE)
        self._step(svc_slot, SCHED_KINDS.get(sched_name, SCHED_UPCALL), scheduler, run)

    def _step(self, svc_slot: int, kind: int, scheduler: object, run: np.ndarray) -> None:
        fresh = self._sched_obj.get(svc_slot) is not scheduler
        self._sched_obj[svc_slot] = scheduler
        if kind in (SCHED_KINDS["rr"], SCHED_KINDS["wrr"]):
            from .. import _fast
            _fast.sched_update(self.counters.sched_state, svc_slot, kind, run, fresh)

    def _reserve(self, svc_slot: int, n: int) -> int:
        """Room for n rows at the end of `dests` (grown as needed): the first."""
        room = max(4, 1 << (n - 1).bit_length())
        need = self._end + room
        if need > len(self.dests):
            dests = np.zeros(1 << (need - 1).bit_length(), dtype=tables.SCHED_DEST_DTYPE)
            dests[:self._end] = self.dests[:self._end]
            self.dests = dests
        first, self._end = self._end, need
        self._reserved += room - self._room.get(svc_slot, 0)
        self._room[svc_slot] = room
        return first

    def remove(self, svc_slot: int) -> None:
        """The service is gone: its row asks Python (which has no view for
        it), its dests' thresholds are cleared."""
        self._rows.pop(svc_slot, None)
        self._reserved -= self._room.pop(svc_slot, 0)
        self._sched_obj.pop(svc_slot, None)
        self._own()
        for slot in self._members.pop(svc_slot, ()):
            self.thresholds[slot] = 0
        self.svcs[svc_slot] = 0

    def rebuild(self, c_sched: bool) -> None:
        """Every run packed again from the start (also: c_sched switched)."""
        self._own()
        self._end, self._room, self._reserved = 0, {}, 0
        self.dests = np.zeros(64, dtype=tables.SCHED_DEST_DTYPE)
        self.svcs[:] = 0
        for svc_slot, (kind, sched_flags, run) in self._rows.items():
            first = self._reserve(svc_slot, len(run))
            self.dests[first:first + len(run)] = run
            self.svcs[svc_slot] = (kind if c_sched else SCHED_UPCALL, sched_flags, 0, first,
                                   len(run))

    def published(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The arrays to publish; they are not written again."""
        self._shared = True
        return self.svcs, self.dests, self.thresholds
