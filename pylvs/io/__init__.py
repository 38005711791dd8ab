"""I/O backends: each moves frames between interfaces and the engine.

Every backend has the same method names (``ports``, ``forward``, ``recv``,
``send``, ``set_filter``, ``close``), as websockets' asyncio/ and sync/
folders do, so the runtime and the tests can swap one for another.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Port:
    """An interface the director forwards on; ``index`` is the engine's port number."""

    index: int
    name: str
    ifindex: int
    mac: bytes
