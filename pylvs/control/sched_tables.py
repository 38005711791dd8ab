"""The tables of the schedulers the engines run themselves (docs/engine.md,
"Schedulers in C"): control builds them, the data path only indexes them.

Per service slot a tables.SCHED_SVC_DTYPE row (kind, -b flags, its run of
SCHED_DEST_DTYPE rows: dest slot and weight in the order the service's
Python scheduler sees them; for sh, dh and mh the Python scheduler's
``table`` in sched_table, as indices into the run), and per dest slot its
-x/-y (DEST_THRESH_DTYPE), which the engines read to keep the overload flag.
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
from ..engine.tables import DEST_F_OVERLOAD, SCHED_KINDS, SCHED_TABLE_SIZES, SCHED_UPCALL


class _Regions:
    """One array of per-service regions: a region that outgrows its room
    moves to the end; ``waste`` tells when packing them again pays."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.array = np.zeros(64, dtype=dtype)
        self.end = 0                          # entries used or left over
        self.room: dict[int, int] = {}        # service slot -> entries at its start
        self.at: dict[int, int] = {}          # service slot -> its start
        self.reserved = 0

    def put(self, svc_slot: int, values: np.ndarray) -> int:
        """values written at the service's region (moved if too small): its start."""
        n = len(values)
        if n > self.room.get(svc_slot, 0):
            room = max(4, 1 << (n - 1).bit_length())
            need = self.end + room
            if need > len(self.array):
                grown = np.zeros(1 << (need - 1).bit_length(), dtype=self.dtype)
                grown[:self.end] = self.array[:self.end]
                self.array = grown
            self.reserved += room - self.room.get(svc_slot, 0)
            self.room[svc_slot], self.at[svc_slot], self.end = room, self.end, need
        first = self.at.get(svc_slot, 0)
        self.array[first:first + n] = values
        return first

    def drop(self, svc_slot: int) -> None:
        self.reserved -= self.room.pop(svc_slot, 0)
        self.at.pop(svc_slot, None)

    def waste(self) -> bool:
        return self.end - self.reserved > max(1024, self.reserved)

    def clear(self) -> None:
        self.__init__(self.dtype)


class SchedTables:
    """``published()``: the arrays last built, to hand to every engine's
    ``set_sched``. ``counters``: for the shared ``dest_flags`` and
    ``sched_state``."""

    def __init__(self, counters):
        self.counters = counters
        self.svcs, _, self.thresholds, _ = tables.empty_sched(counters.max_services,
                                                             counters.max_dests)
        self._runs = _Regions(tables.SCHED_DEST_DTYPE)
        self._tabs = _Regions(np.int32)
        # service slot -> (kind, -b bits, run, hash table in run indices or None)
        self._rows: dict[int, tuple[int, int, np.ndarray, np.ndarray | None]] = {}
        self._members: dict[int, tuple[int, ...]] = {}
        self._sched_obj: dict[int, object] = {}
        self._shared = False                # the arrays were handed out: copy first
        self.dirty = False                  # changed since published()

    def _own(self) -> None:
        self.dirty = True
        if self._shared:
            self.svcs, self.thresholds = self.svcs.copy(), self.thresholds.copy()
            self._runs.array, self._tabs.array = self._runs.array.copy(), self._tabs.array.copy()
            self._shared = False

    def update(self, svc_slot: int, sched_name: str, sched_flags: int, scheduler: object,
               views: Sequence, c_sched: bool) -> None:
        """The service's scheduler sees ``views`` now (objects with slot,
        weight, u_threshold, l_threshold, in its order), after its
        ``update``. Also moves the rr/wrr state in counters.sched_state as
        the kernel's del_dest/dest_changed (a new ``scheduler`` object starts
        afresh, as init_service)."""
        kind = SCHED_KINDS.get(sched_name, SCHED_UPCALL)
        run = np.array([(v.slot, v.weight) for v in views], dtype=tables.SCHED_DEST_DTYPE)
        self._own()
        thresh = self.thresholds
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
        tab = None
        if sched_name in SCHED_TABLE_SIZES:
            tab = _run_indices(np.asarray(scheduler.table, dtype=np.int32), run["slot"])
        self._rows[svc_slot] = (kind, sched_flags, run, tab)
        self._write(svc_slot, c_sched)
        if self._runs.waste() or self._tabs.waste():
            self.rebuild(c_sched)

    def _write(self, svc_slot: int, c_sched: bool) -> None:
        kind, sched_flags, run, tab = self._rows[svc_slot]
        first = self._runs.put(svc_slot, run)
        at = 0
        if tab is not None:
            at = self._tabs.put(svc_slot, tab)
        else:
            self._tabs.drop(svc_slot)
        self.svcs[svc_slot] = (kind if c_sched else SCHED_UPCALL, sched_flags, 0, first,
                               len(run), at)

    def set_flags(self, svc_slot: int, sched_flags: int) -> None:
        """-E -b alone: the service's -b bits, its scheduler kept."""
        row = self._rows.get(svc_slot)
        if row is not None:
            self._own()
            self._rows[svc_slot] = (row[0], sched_flags, row[2], row[3])
            self.svcs[svc_slot]["flags"] = sched_flags

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

    def remove(self, svc_slot: int) -> None:
        """The service is gone: its row asks Python (which has no view for
        it), its dests' thresholds are cleared."""
        self._rows.pop(svc_slot, None)
        self._runs.drop(svc_slot)
        self._tabs.drop(svc_slot)
        self._sched_obj.pop(svc_slot, None)
        self._own()
        for slot in self._members.pop(svc_slot, ()):
            self.thresholds[slot] = 0
        self.svcs[svc_slot] = 0

    def rebuild(self, c_sched: bool) -> None:
        """Every region packed again from the start (also: c_sched switched)."""
        self._own()
        self._runs.clear()
        self._tabs.clear()
        self.svcs[:] = 0
        for svc_slot in self._rows:
            self._write(svc_slot, c_sched)

    def published(self) -> tuple[np.ndarray, ...]:
        """(svcs, dests, thresholds, sched_table), not written again."""
        self._shared, self.dirty = True, False
        return self.svcs, self._runs.array, self.thresholds, self._tabs.array


def _run_indices(table: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """A hash table of dest slots as indices into the run (-1: empty, or a
    slot not in the run, as the Python scheduler finds no dest there)."""
    if not len(slots):
        return np.full(len(table), -1, dtype=np.int32)
    lut = np.full(max(int(slots.max()), int(table.max(initial=-1))) + 1, -1, dtype=np.int32)
    lut[slots] = np.arange(len(slots), dtype=np.int32)
    return np.where(table >= 0, lut[np.maximum(table, 0)], -1).astype(np.int32)
