"""The IPVS defence strategies: drop_entry, drop_packet, secure_tcp.

The kernel's ``update_defense_level`` (net/netfilter/ipvs/ip_vs_ctl.c) runs
once a second from ``defense_work`` (and on a write of one of the sysctls):
it compares the available memory with ``amemthresh`` and, per strategy,
turns it on or off. Modes, as Documentation/networking/ipvs-sysctl.rst:
0 never, 1 automatic and off now, 2 automatic and on now (the kernel
rewrites the sysctl between 1 and 2 itself, so a read shows which), 3
always. Here control does the same once a second (``Defense.tick``) and
hands the engines what they need, so the data path stays sans-IO:

- ``drop_packet`` on: ``engine.set_drop_rate(rate, counter)``, the kernel's
  ``drop_rate``: amemthresh / (amemthresh - available) in the automatic
  mode (the countdown restarted each second), ``am_droprate`` in mode 3
  (countdown left running); the engine drops 1 in ``rate`` packets that
  would make a new conn (``drop_defense``, kernel ``ip_vs_todrop``).
- ``secure_tcp`` on: ``engine.set_transitions(states.TRANSITIONS_DOS)``
  (kernel ``tcp_timeout_change``), back to ``TRANSITIONS`` when off.
- ``drop_entry`` on: ``engine.drop_entries(now)`` each second, the kernel's
  ``ip_vs_random_dropentry`` (``conns_dropped``).

"Available memory" for pylvs (the kernel's ``si_meminfo`` free + buffer
pages) is, in pages of 4096 bytes, the lesser of the system's
MemAvailable (/proc/meminfo) and the room left in the conn tables: free
conn slots summed over the workers' engines times ``CONN_BYTES``. A full
conn table is out of memory for pylvs as an exhausted slab is for the
kernel, while the flood eviction of docs/engine.md keeps working beneath.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..engine import states

log = logging.getLogger(__name__)

PAGE = 4096
# What one conn costs at most: its 64-byte slab entry and up to 64 bytes of
# index (docs/engine.md, "Conn table").
CONN_BYTES = 128
MODES = ("drop_entry", "drop_packet", "secure_tcp")


@dataclass(frozen=True)
class Levels:
    """What the data path applies until the next update."""

    dropentry: bool     # drop_entries runs this second
    drop_rate: int      # drop 1 in drop_rate new-flow packets (0: none)
    drop_counter: int   # the countdown to restart (-1: leave it running)
    secure: bool        # tcp_states_dos in force


def _auto(mode: int, nomem: bool) -> tuple[int, bool]:
    """A strategy's mode after an update and whether it is on (modes 1/2
    flip with the memory state; 0 and 3 never change)."""
    if mode == 0:
        return 0, False
    if mode == 3:
        return 3, True
    return (2, True) if nomem else (1, False)


def update_defense_level(sysctls: dict[str, int], availmem: int) -> tuple[dict[str, int], Levels]:
    """The kernel's update_defense_level on these sysctl values and
    ``availmem`` pages: (the sysctls it rewrites, the levels)."""
    amemthresh = max(int(sysctls["amemthresh"]), 0)
    nomem = availmem < amemthresh
    changes: dict[str, int] = {}
    on = {}
    for name in MODES:
        mode, on[name] = _auto(int(sysctls[name]), nomem)
        if mode != sysctls[name]:
            changes[name] = mode
    rate, counter = 0, -1
    if on["drop_packet"]:
        if int(sysctls["drop_packet"]) == 3:
            rate = int(sysctls["am_droprate"])
        else:
            rate = counter = amemthresh // (amemthresh - availmem)
    return changes, Levels(on["drop_entry"], rate, counter, on["secure_tcp"])


def mem_available_pages(path: str = "/proc/meminfo") -> int | None:
    """The system's MemAvailable in pages, or None when it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // PAGE
    except (OSError, ValueError, IndexError):
        pass
    return None


class Defense:
    """Runs the defence once a second for a daemon.

    ``balancer``: its ``sysctls()`` are read and the mode flips written back
    with ``set_sysctls``; ``engine_call(name, *args)`` calls a method on
    every worker's engine; ``table_room()`` is the number of free conn
    slots over all engines; ``meminfo()`` the system's available pages (or
    None); ``clock`` the workers' clock (``now`` of ``drop_entries``)."""

    def __init__(self, balancer: Any, engine_call: Callable[..., None],
                 table_room: Callable[[], int],
                 meminfo: Callable[[], int | None] = mem_available_pages,
                 clock: Callable[[], float] = time.monotonic):
        self.balancer = balancer
        self.engine_call = engine_call
        self.table_room = table_room
        self.meminfo = meminfo
        self.clock = clock
        self.secure = False
        self.levels: Levels | None = None

    def available(self) -> int:
        """Available memory in pages (see the module docstring)."""
        room = max(int(self.table_room()), 0) * CONN_BYTES // PAGE
        mem = self.meminfo()
        return room if mem is None else min(mem, room)

    def tick(self) -> Levels:
        changes, levels = update_defense_level(self.balancer.sysctls(), self.available())
        if changes:
            self.balancer.set_sysctls(changes)
        if levels.secure != self.secure:
            self.engine_call("set_transitions",
                             states.TRANSITIONS_DOS if levels.secure else states.TRANSITIONS)
            self.secure = levels.secure
        if levels != self.levels or levels.drop_counter >= 0:
            self.engine_call("set_drop_rate", levels.drop_rate, levels.drop_counter)
        if levels.dropentry:
            self.engine_call("drop_entries", self.clock())
        self.levels = levels
        return levels

    async def run(self, period: float = 1.0) -> None:
        """tick() every `period` seconds (the kernel's DEFENSE_TIMER_PERIOD)."""
        import asyncio

        while True:
            try:
                self.tick()
            except Exception:  # a failed second must not end the defence
                log.exception("defence update failed")
            await asyncio.sleep(period)
