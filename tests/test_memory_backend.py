"""MemoryBackend: the same method names as the AF_PACKET backend, over queues."""

import numpy as np

from pylvs.engine import tables
from pylvs.io.afpacket import AfPacketBackend
from pylvs.io.memory import MemoryBackend


class Echo:
    """Sends every frame back out of the other port."""

    def process(self, batch, now):
        batch.verdict[: batch.count] = tables.V_TX
        batch.out_port[: batch.count] = 1 - batch.in_port[: batch.count]
        return batch.count


def test_same_method_names():
    for name in ("forward", "recv", "send", "set_filter", "close"):
        assert callable(getattr(MemoryBackend, name)) and callable(getattr(AfPacketBackend, name))


def test_forward_moves_frames_between_ports():
    b = MemoryBackend(["a", "b"])
    assert [p.index for p in b.ports] == [0, 1]
    b.inject(tables.with_vnet(b"\x01" * 60), 0)
    b.inject(tables.with_vnet(b"\x02" * 60), 1)
    assert b.forward(Echo(), 0.0, 0.0) == 2
    assert b.sent[1] == [tables.with_vnet(b"\x01" * 60)]
    assert b.sent[0] == [tables.with_vnet(b"\x02" * 60)]
    assert b.forward(Echo(), 0.0, 0.01) == 0


class Answer:
    """Drops every frame and emits a reply on the port it came in on, plus
    one frame for a port that does not exist (the emit area as the engine
    contract defines it: offsets, lengths and ports of frames in emit_buf)."""

    def process(self, batch, now):
        batch.emit_n[:] = 0
        for i in range(batch.count):
            batch.verdict[i] = tables.V_DROP
            for port, frame in ((int(batch.in_port[i]), b"reply to " + batch.frame(i)),
                                (9, b"lost")):
                k, used = int(batch.emit_n[0]), int(batch.emit_n[1])
                batch.emit_buf[used:used + len(frame)] = np.frombuffer(frame, np.uint8)
                batch.emit_off[k], batch.emit_len[k], batch.emit_port[k] = used, len(frame), port
                batch.emit_n[:] = (k + 1, used + len(frame))
        return 0


def test_emitted_frames_reach_their_ports():
    b = MemoryBackend(["a", "b"])
    b.inject(b"first", 1)
    b.inject(b"second", 0)
    assert b.forward(Answer(), 0.0, 0.0) == 2
    assert b.sent == [[b"reply to second"], [b"reply to first"]]
    assert b.bad_port == 2
    # The next batch starts with an empty emit area.
    b.inject(b"third", 0)
    b.forward(Answer(), 0.0, 0.0)
    assert b.sent[0] == [b"reply to second", b"reply to third"] and b.bad_port == 3
