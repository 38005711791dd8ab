"""Workers: the data-path threads of `pylvs run` (docs/io.md, "Workers").

A worker owns an engine (its conn table), one backend instance (its sockets,
rings and send queues) and its Counters (traffic and engine stats; the
per-dest conn counts are one array shared by every worker). Its thread runs
``backend.forward`` (the C frame loop, without the GIL) and the conn expiry
clock hand, and between two calls takes what control left for it: the latest
tables, timeouts and engine inputs (ports, routes, sysctls).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("pylvs")


class UpcallMeter:
    """A worker's scheduler upcall, timed: ``cost`` is the moving mean of
    what one call takes (seconds, time.perf_counter; each call weighs 1/64),
    which the worker gives its engine as ``upcall_cost`` for the upcall
    limit (docs/engine.md, "Upcall limit"). The time to take the GIL back
    before the call is not in it."""

    WEIGHT = 1 / 64

    def __init__(self, schedule, cost: float = 20e-6):
        """``schedule``: the Balancer's (svc_slot, caddr, cport) -> dest slot;
        ``cost``: the first guess, seconds, until calls are timed."""
        self._schedule = schedule
        self.cost = cost

    def __call__(self, svc_slot: int, caddr: int, cport: int) -> int:
        t0 = time.perf_counter()
        try:
            return self._schedule(svc_slot, caddr, cport)
        finally:
            self.cost += (time.perf_counter() - t0 - self.cost) * self.WEIGHT


class Worker:
    """One data-path thread. ``index``: its number (the fanout member it
    reads); ``fwd_engine``: what ``backend.forward`` is given (the engine,
    or for a Python engine a wrapper that takes ``lock``); ``meter``: its
    engine's timed scheduler, whose cost the thread hands the engine before
    each forward call (None: the engine's upcall_cost is left as it is)."""

    def __init__(self, index: int, engine, backend, counters, *, fwd_engine=None,
                 lock: threading.Lock | None = None, meter: UpcallMeter | None = None):
        self.index = index
        self.meter = meter
        self.engine = engine
        self.backend = backend
        self.counters = counters
        self.fwd_engine = engine if fwd_engine is None else fwd_engine
        # Python engines are not safe to read (conns) while the thread runs
        # them; the C engine has a lock of its own (engine_type.c).
        self.lock = lock or threading.Lock()
        self._pending_lock = threading.Lock()
        self._tables: tuple | None = None
        self._timeouts = None
        self.pending_io: dict[str, tuple] = {}
        self.tables_taken = threading.Event()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.loops = 0

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # --- control's side --------------------------------------------------

    def offer_tables(self, services, dests) -> None:
        """Hand new tables to the thread (taken between two forward calls;
        ``tables_taken`` is set once the latest tables offered are in the
        engine), or set them now when it is not running."""
        if self.running:
            with self._pending_lock:
                self.tables_taken.clear()
                self._tables = (services, dests)
        else:
            with self.lock:
                self.engine.set_tables(services, dests)
            self.tables_taken.set()

    def set_timeouts(self, timeouts) -> None:
        with self._pending_lock:
            self._timeouts = timeouts

    def call(self, name: str, *args) -> None:
        """engine.<name>(*args) between two forward calls (the latest call
        of each name wins), or at once when the thread is not running."""
        if self.running:
            with self._pending_lock:
                self.pending_io[name] = args
        else:
            with self.lock:
                getattr(self.engine, name)(*args)

    # Conns listed per lock hold: a listing of millions (`-L -c`) must not
    # stop the frame loop, which needs the engine's lock for every batch
    # (a fresh-user test saw 750k conns stall forwarding for 1.9 s).
    CONNS_CHUNK = 4096

    def conns(self) -> list:
        """The engine's conns, read a chunk at a time (conns_chunk); conns
        made or ended meanwhile may be missed or listed as they were, as a
        listing of the kernel's table walked under RCU may."""
        out: list = []
        start = 0
        while start >= 0:
            with self.lock:
                part, start = self.engine.conns_chunk(start, self.CONNS_CHUNK)
            out.extend(part)
        return out

    def info(self) -> dict:
        e = self.engine
        return {"conn_count": int(e.conn_count), "capacity": int(e.capacity),
                "memory": getattr(e, "memory", None),
                "upcall_cost": getattr(e, "upcall_cost", None)}

    # --- the thread ------------------------------------------------------

    def take_pending(self) -> None:
        """What the thread does between two forward calls: apply what
        control left, the latest of each."""
        with self._pending_lock:
            tables, self._tables = self._tables, None
            timeouts, self._timeouts = self._timeouts, None
            calls, self.pending_io = self.pending_io, {}
        with self.lock:
            if tables is not None:
                self.engine.set_tables(*tables)
            if timeouts is not None:
                self.engine.set_timeouts(timeouts)
            for name, args in calls.items():
                getattr(self.engine, name)(*args)
        if tables is not None:
            with self._pending_lock:
                # Newer tables offered during this swap: "taken" is for them.
                if self._tables is None:
                    self.tables_taken.set()

    def _has_pending(self) -> bool:
        return self._tables is not None or self._timeouts is not None or bool(self.pending_io)

    def run(self, stop: threading.Event, poll_timeout: float, expire_budget: int,
            on_error) -> None:
        engine, backend, lock, meter = self.engine, self.backend, self.lock, self.meter
        try:
            while not stop.is_set():
                if self._has_pending():
                    self.take_pending()
                if meter is not None:
                    engine.upcall_cost = min(meter.cost, 1.0)
                backend.forward(self.fwd_engine, time.monotonic(), poll_timeout)
                with lock:
                    engine.expire(time.monotonic(), expire_budget)
                self.loops += 1
        except BaseException as e:  # the director must not limp on
            self.error = e
            log.exception("worker %d failed", self.index)
            on_error()

    def start(self, stop: threading.Event, poll_timeout: float, expire_budget: int,
              on_error) -> None:
        name = "pylvs-data" if self.index == 0 else f"pylvs-data-{self.index}"
        self.thread = threading.Thread(target=self.run, name=name, daemon=True,
                                       args=(stop, poll_timeout, expire_budget, on_error))
        self.thread.start()


class LockedEngine:
    """A Python engine as a worker drives it: process() under the lock that
    control takes to read conns."""

    def __init__(self, engine, lock: threading.Lock):
        self._engine, self._lock = engine, lock

    def process(self, batch, now: float) -> int:
        with self._lock:
            return self._engine.process(batch, now)


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
