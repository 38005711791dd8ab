"""The reference engine's side of pylvs/_fast/ip_vs_sched.c: the overload
flag kept as the kernel's ip_vs_bind_dest / ip_vs_unbind_dest keep it, and
the choice between a scheduler run by the engine and the upcall, over the
tables ``set_sched`` takes (tables.SCHED_SVC_DTYPE, SCHED_DEST_DTYPE,
DEST_THRESH_DTYPE, the sh/dh/mh buckets). The pick itself is the Python
scheduler's (pylvs/sched, the reference), run on the published list: rr's
and wrr's position is read from and written back to
``counters.sched_state`` (the words ip_vs_sched.h names), which every
worker's engine shares, and sh, dh and mh get the published table back as
dest slots, so the engine's hashing is what the tests compare.
"""

from __future__ import annotations

import numpy as np

from .. import sched as schedmod
from . import tables

ASK_PYTHON = -3  # pick(): the service has no scheduler in the engine

_KIND_NAMES = {v: k for k, v in tables.SCHED_KINDS.items()}
# Scheduler attributes kept in sched_state words 1.. (ip_vs_sched.h SW_*).
_STATE_ATTRS = {"rr": ("_pos", "_last_slot"), "wrr": ("_cl", "_cw", "_mw", "_di")}


def bind(counters: tables.Counters, thresholds: np.ndarray, d: int) -> None:
    """A conn was bound to dest slot d (its count already up): -x reached
    sets DEST_F_OVERLOAD (ip_vs_bind_dest)."""
    if d >= len(thresholds) or d >= counters.max_dests:
        return
    u = int(thresholds[d]["u_threshold"])
    if u and int(counters.dest_conns[d].sum()) >= u:
        counters.dest_flags[d] |= tables.DEST_F_OVERLOAD


def unbind(counters: tables.Counters, thresholds: np.ndarray, d: int) -> None:
    """A conn left dest slot d (its count already down): below -y, or
    without -y below 3/4 of -x, or without -x, the flag clears
    (ip_vs_unbind_dest)."""
    if d >= counters.max_dests:
        return
    u = l = 0
    if d < len(thresholds):
        u, l = int(thresholds[d]["u_threshold"]), int(thresholds[d]["l_threshold"])
    n = int(counters.dest_conns[d].sum())
    if (n < l) if l else (n * 4 < u * 3) if u else True:
        counters.dest_flags[d] &= ~np.uint8(tables.DEST_F_OVERLOAD)


class _Dest:
    __slots__ = ("slot", "weight")

    def __init__(self, slot: int, weight: int):
        self.slot, self.weight = slot, weight


def check_tables(svcs: np.ndarray, dests: np.ndarray, thresholds: np.ndarray,
                 table: np.ndarray, max_services: int, max_dests: int) -> None:
    """The checks the C engine's set_sched makes: TypeError for a wrong
    dtype, ValueError for rows out of range or an unknown kind."""
    for a, dt in ((svcs, tables.SCHED_SVC_DTYPE), (dests, tables.SCHED_DEST_DTYPE),
                  (thresholds, tables.DEST_THRESH_DTYPE), (table, np.dtype(np.int32))):
        if a.dtype != dt or a.ndim != 1:
            raise TypeError(f"set_sched wants one-dimensional arrays of {dt}")
    if len(svcs) > max_services or len(thresholds) > max_dests:
        raise ValueError("more rows than the counter arrays have")
    kinds = svcs["kind"]
    if len(kinds) and int(kinds.max()) > max(tables.SCHED_KINDS.values()):
        raise ValueError("unknown scheduler kind")
    used = kinds != tables.SCHED_UPCALL
    if np.any(svcs["first"][used].astype(np.int64) + svcs["count"][used] > len(dests)):
        raise ValueError("sched_svcs name dests beyond those given")
    if len(dests) and int(dests["slot"].max()) >= max_dests:
        raise ValueError("sched_dests name a slot beyond the counters")
    for name, size in tables.SCHED_TABLE_SIZES.items():
        hashed = kinds == tables.SCHED_KINDS[name]
        if np.any(svcs["table"][hashed].astype(np.int64) + size > len(table)):
            raise ValueError(f"a {name} table beyond the sched_table given")


class EngineSched:
    """One reference engine's scheduler tables and its picks."""

    def __init__(self, counters: tables.Counters):
        self.counters = counters
        self.svcs, self._dests, self.thresholds, self._table = tables.empty_sched(0, 0)
        self._lists: dict[int, tuple[_Dest, ...]] = {}
        self._objs = {k: schedmod.get(name)() for k, name in _KIND_NAMES.items()
                      if name not in tables.SCHED_TABLE_SIZES}
        self._hashed: dict[int, schedmod.Scheduler] = {}

    def set(self, svcs: np.ndarray, dests: np.ndarray, thresholds: np.ndarray,
            table: np.ndarray) -> None:
        check_tables(svcs, dests, thresholds, table, self.counters.max_services,
                     self.counters.max_dests)
        self.svcs, self._dests, self.thresholds, self._table = svcs, dests, thresholds, table
        self._lists, self._hashed = {}, {}

    def needs_upcall(self, svc: int) -> bool:
        return svc >= len(self.svcs) or int(self.svcs[svc]["kind"]) == tables.SCHED_UPCALL

    def _list(self, svc: int) -> tuple[_Dest, ...]:
        dl = self._lists.get(svc)
        if dl is None:
            row = self.svcs[svc]
            first, count = int(row["first"]), int(row["count"])
            part = self._dests[first:first + count]
            dl = tuple(_Dest(s, w) for s, w in zip(part["slot"].tolist(),
                                                   part["weight"].tolist()))
            self._lists[svc] = dl
        return dl

    def _hash_sched(self, svc: int, kind: int) -> schedmod.Scheduler:
        """sh, dh or mh with the published table (as dest slots) and -b bits."""
        obj = self._hashed.get(svc)
        if obj is None:
            name, row = _KIND_NAMES[kind], self.svcs[svc]
            obj = schedmod.get(name)(frozenset(schedmod.flag_names(name, int(row["flags"]))))
            dl = self._list(svc)
            at = int(row["table"])
            idx = self._table[at:at + tables.SCHED_TABLE_SIZES[name]]
            slots = np.array([d.slot for d in dl] + [-1], dtype=np.int32)
            # The table the Python scheduler built, and its dests by slot
            # (what its update() leaves), read back from what C reads.
            obj.table = slots[np.where((idx >= 0) & (idx < len(dl)), idx, -1)]
            obj._by_slot = {d.slot: d for d in dl}
            self._hashed[svc] = obj
        return obj

    def pick(self, svc: int, caddr: int, cport: int, daddr: int) -> int:
        """The dest slot the service's scheduler picks for a new conn from
        caddr:cport to daddr (host order), -1 for none, or ASK_PYTHON."""
        if self.needs_upcall(svc):
            return ASK_PYTHON
        kind = int(self.svcs[svc]["kind"])
        obj = self._objs.get(kind) or self._hash_sched(svc, kind)
        dests = self._list(svc)
        attrs = _STATE_ATTRS.get(_KIND_NAMES[kind], ())
        st = self.counters.sched_state[svc]
        for i, a in enumerate(attrs):
            setattr(obj, a, int(st[1 + i]))
        if kind == tables.SCHED_KINDS["wrr"]:
            obj._fresh = False   # the state words hold its update already
        flags = self.counters.dest_flags
        ctx = schedmod.SchedCtx(self.counters.dest_conns, caddr, cport, daddr,
                                overloaded=lambda slot: bool(flags[slot] & tables.DEST_F_OVERLOAD))
        d = obj.schedule(dests, ctx) if dests else None
        for i, a in enumerate(attrs):
            st[1 + i] = getattr(obj, a)
        return -1 if d is None else d.slot
