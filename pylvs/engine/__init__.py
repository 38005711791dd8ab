"""The sans-IO data plane: frames and ``now`` in, frames and verdicts out.

Two engines implement docs/engine.md: ``pylvs._fast.Engine`` (C, the product)
and ``pylvs.engine.reference.Engine`` (pure Python, the reference).
"""

from __future__ import annotations

import secrets
from typing import Callable

import numpy as np

from . import states, tables

IMPLS = ("c", "python")
DEFAULT_CAPACITY = 1 << 16


def engine_class(impl: str = "c"):
    """The Engine class of an impl: "c" (pylvs._fast) or "python" (the reference)."""
    if impl == "c":
        from pylvs._fast import Engine
        return Engine
    if impl == "python":
        from .reference import Engine
        return Engine
    raise ValueError(f"unknown engine impl {impl!r}; choose from {', '.join(IMPLS)}")


def new_engine(impl: str = "c", capacity: int = DEFAULT_CAPACITY, *,
               counters: tables.Counters,
               schedule: Callable[[int, int, int], int],
               timeouts: np.ndarray | None = None,
               key: bytes | None = None):
    """An engine with the IPVS state table, default timeouts and a fresh hash key."""
    cls = engine_class(impl)
    return cls(
        capacity,
        key=secrets.token_bytes(16) if key is None else key,
        transitions=states.TRANSITIONS,
        timeouts=states.timeout_array() if timeouts is None else timeouts,
        counters=counters,
        schedule=schedule,
    )


__all__ = ["IMPLS", "DEFAULT_CAPACITY", "engine_class", "new_engine"]
