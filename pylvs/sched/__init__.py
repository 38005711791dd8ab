"""IPVS schedulers, one module per ``ipvsadm -s`` name."""

from __future__ import annotations

import importlib
import pkgutil

from .base import (Scheduler, SchedCtx, SchedDest, available, never_overloaded, overhead, register,
                   _REGISTRY)

DEFAULT = "wlc"

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


__all__ = ["SYSCTLS", "Scheduler", "SchedCtx", "SchedDest", "available", "never_overloaded", "overhead",
           "register", "names", "get", "DEFAULT"]
