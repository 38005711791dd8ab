"""An in-memory backend: queues instead of interfaces (tests, replays).

Same method names as the AF_PACKET backend. ``inject`` puts a frame (with
its virtio_net_hdr) on a port's receive queue; ``sent[port]`` collects what
the director transmitted on each port.
"""

from __future__ import annotations

import collections
import threading

from ..engine import tables
from . import Port


class MemoryBackend:
    def __init__(self, ifnames: list[str], macs: list[bytes] | None = None):
        self.ports = [
            Port(i, name, i + 1, macs[i] if macs else bytes([2, 0, 0, 0, 0, i + 1]))
            for i, name in enumerate(ifnames)
        ]
        self.rx: collections.deque[tuple[bytes, int]] = collections.deque()
        self.sent: list[list[bytes]] = [[] for _ in self.ports]
        self.filter: tuple | None = None
        self.bad_port = 0
        self._cond = threading.Condition()
        self._batch: tables.Batch | None = None
        self.closed = False

    def inject(self, frame: bytes, port: int = 0) -> None:
        with self._cond:
            self.rx.append((frame, port))
            self._cond.notify_all()

    def recv(self, batch: tables.Batch, timeout: float) -> int:
        batch.clear()
        with self._cond:
            if not self.rx and timeout > 0:
                self._cond.wait(timeout)
            while self.rx and batch.count < batch.size:
                frame, port = self.rx.popleft()
                batch.append(frame, port)
        return batch.count

    def send(self, batch: tables.Batch) -> int:
        """Deliver V_TX frames, then the batch's emit area, to ``sent[port]``
        (a port beyond the list: counted in ``bad_port``); returns frames sent."""
        out = [(int(batch.out_port[i]), batch.frame(i))
               for i in range(batch.count) if batch.verdict[i] == tables.V_TX]
        out += batch.emitted()
        n = 0
        for port, frame in out:
            if port < len(self.sent):
                self.sent[port].append(frame)
                n += 1
            else:
                self.bad_port += 1
        return n

    def forward(self, engine, now: float, timeout: float) -> int:
        if self._batch is None:
            self._batch = tables.Batch(256, tables.MAX_FRAME)
        n = self.recv(self._batch, timeout)
        if n:
            engine.process(self._batch, now)
            self.send(self._batch)
        return n

    def set_filter(self, services, dests, own_addrs=()) -> None:
        self.filter = (services, dests)
        self.own_addrs = tuple(own_addrs)

    def close(self) -> None:
        self.closed = True
