"""IPVS schedulers, one module per ``ipvsadm -s`` name."""

from __future__ import annotations

import importlib
import pkgutil

from .base import (Scheduler, SchedCtx, SchedDest, available, never_overloaded, overhead, register,
                   _REGISTRY)

DEFAULT = "wlc"

# Scheduler flag bits (-b), as IP_VS_SVC_F_SCHED1..3. Their names depend on
# the scheduler (sh and mh name the first two), as ipvsadm prints them.
SCHED_F1, SCHED_F2, SCHED_F3 = 0x08, 0x10, 0x20


def flag_names(sched_name: str, bits: int) -> list[str]:
    """The flag names ipvsadm shows for these -b bits under this scheduler."""
    if sched_name in ("sh", "mh"):
        names_ = [f"{sched_name}-fallback", f"{sched_name}-port", "flag-3"]
    else:
        names_ = ["flag-1", "flag-2", "flag-3"]
    return [n for n, b in zip(names_, (SCHED_F1, SCHED_F2, SCHED_F3)) if bits & b]

# The kernel's net.ipv4.vs.* knobs of schedulers: name -> (default, least,
# most). Seconds, as proc_dointvec_jiffies reads them (at most INT_MAX /
# HZ, HZ = 1000). The Balancer lists and sets them with the engine's
# sysctls and hands them to every scheduler (Scheduler.configure); no
# engine reads them.
SYSCTLS = {
    "lblc_expiration": (24 * 60 * 60, 0, (2**31 - 1) // 1000),
    "lblcr_expiration": (24 * 60 * 60, 0, (2**31 - 1) // 1000),
}


_loaded = False


def _load_all() -> None:
    # Once: every -A and -E looks a scheduler up, and listing the package
    # directory each time made a 10,000-service -R spend seconds here.
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "hashes"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[Scheduler]:
    """The scheduler class for an ``-s`` name; KeyError if unknown."""
    _load_all()
    return _REGISTRY[name]


__all__ = ["SCHED_F1", "SCHED_F2", "SCHED_F3", "SYSCTLS", "flag_names", "Scheduler", "SchedCtx", "SchedDest", "available", "never_overloaded", "overhead",
           "register", "names", "get", "DEFAULT"]
