"""I/O backends: each moves frames between interfaces and the engine.

Every backend has the same method names (``ports``, ``forward``, ``recv``,
``send``, ``set_filter``, ``close``), as websockets' asyncio/ and sync/
folders do, so the runtime and the tests can swap one for another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("pylvs")


@dataclass(frozen=True)
class Port:
    """An interface the director forwards on; ``index`` is the engine's port
    number. ``local``: the loopback port, the way in and out of clients on
    the director itself (pylvs/io/local.py)."""

    index: int
    name: str
    ifindex: int
    mac: bytes
    local: bool = False


class CopyLoop:
    """The forward path for engines written in Python, shared by the
    backends: ``recv`` into a Batch, ``process``, ``send`` (the C engine
    has its own loop in each backend)."""

    def _copy_forward(self, engine, now: float, timeout: float, batch=None) -> int:
        batch = batch if batch is not None else self._batch()
        n = self.recv(batch, timeout)
        if n:
            engine.process(batch, now)
            self.send(batch)
        return n

    def _batch(self):
        from ..engine import tables

        b = getattr(self, "_pybatch", None)
        if b is None:
            b = self._pybatch = tables.Batch(256, tables.MAX_FRAME)
        return b


KINDS = ("afpacket",)


def open_workers(kind: str, ifnames: list[str], n: int, **opts) -> list:
    """``n`` instances of a backend kind over the same interfaces, one per
    worker (docs/io.md, "Workers"): port numbers are the same in each. With
    n > 1 each interface's sockets form one fanout group, joined in worker
    order (worker i is member i, or members 2i and 2i+1 with the adaptive
    ring, ``ring="auto"``: its V3 ring and V2 lane; the kernel keeps that order when the
    interface goes down and up: sockets rejoin in creation order). ``opts``
    go to every instance, except ``pcap``: one file records the frames of
    all workers (the first instance owns it). ValueError for an unknown
    kind or n < 1; OSError from the sockets (everything opened is closed).
    """
    if n < 1:
        raise ValueError("workers must be at least 1")
    if kind != "afpacket":
        raise ValueError(f"unknown backend {kind!r}; choose from {', '.join(KINDS)}")
    from .afpacket import DEFAULT_RING, AfPacketBackend, FanoutSteering, LaneSwitch

    if n == 1:
        return [AfPacketBackend(ifnames, **opts)]
    pcap = opts.pop("pcap", None)
    auto = opts.get("ring", DEFAULT_RING) == "auto"
    try:
        opts["fanout_steer"] = FanoutSteering(n, lanes=auto)
    except OSError as e:
        log.warning("workers: %s; the classic fanout program keys tables too big for it "
                    "by address, then by source address alone (NAT replies may then reach "
                    "a worker without their conn; docs/io.md, \"Workers\")", e)
    if auto:
        # One choice for every worker's group members.
        opts["lanes"] = LaneSwitch(n, steer=opts.get("fanout_steer"))
    out: list = []
    try:
        for _ in range(n):
            # local=True adds the loopback port (pylvs/io/local.py), a group too.
            ids = out[0].fanout_ids if out else [0] * (len(ifnames) + bool(opts.get("local")))
            out.append(AfPacketBackend(ifnames, fanout=ids, **opts))
        if pcap is not None:
            from .pcap import PcapWriter
            out[0].pcap = PcapWriter(pcap, [r for b in out for r in b.rings])
    except BaseException:
        for b in out:
            b.close()
        if not out and opts.get("fanout_steer") is not None:
            opts["fanout_steer"].close()
        raise
    return out
