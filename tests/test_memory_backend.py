"""MemoryBackend: the same method names as the AF_PACKET backend, over queues."""

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
