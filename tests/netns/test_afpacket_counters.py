"""The data thread's own counters on the AF_PACKET rings.

They are what tells the two ways a forwarder loses frames apart: a thread
that sleeps through arrivals (polls that time out while frames wait) and a
thread that never gets to sleep (every call cut by the budget, no polls, the
kernel freezing the ring once per call). No timing is asserted here, only
that each counter counts what it says.
"""

from __future__ import annotations

import pytest

from test_afpacket import scenario

pytestmark = pytest.mark.netns


def test_forward_counts_polls_calls_blocks_and_budget_cuts(trio):
    res = scenario(trio, r"""
from pylvs import _fast
from pylvs.engine import new_engine
counters = tables.Counters()
engine = new_engine("c", 1024, counters=counters, schedule=lambda s, c, p: -1)
b = AfPacketBackend(["d0", "d1"])
b.set_filter([(17, ip("10.9.0.1"), 7)], [])
r0 = b.rings[0]
# Nothing arrives: one poll, which times out; one call that took no block.
idle = _fast.forward(engine, b.rings, time.monotonic(), 10)
after_idle = dict(seen=idle, polls=r0.polls, timeouts=r0.poll_timeouts, calls=r0.fwd_calls,
                  blocks=r0.fwd_blocks)
client = in_ns(C, '''
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for k in range(300):
    u.sendto(b"x" * 100, ("10.9.0.1", 7))
''')
client.wait(10)
time.sleep(0.05)  # every block retired (1 ms timer)
# A budget smaller than a block: the call stops after its first block.
seen = _fast.forward(engine, b.rings, time.monotonic(), 20, budget=1)
cut = dict(seen=seen, cuts=r0.fwd_budget_cuts, calls=r0.fwd_calls)
deadline = time.monotonic() + 5
while seen < 300 and time.monotonic() < deadline:
    seen += _fast.forward(engine, b.rings, time.monotonic(), 20)
print(json.dumps(dict(idle=after_idle, cut=cut, seen=seen, stats=b.stats(),
                      ring_blocks=sum(r.rx_blocks for r in b.rings + b.lane_rings))))
b.close()
""")
    assert res["idle"] == dict(seen=0, polls=1, timeouts=1, calls=1, blocks=0), res
    assert res["cut"]["cuts"] == 1 and res["cut"]["calls"] == 2, res
    assert 1 <= res["cut"]["seen"] < 300, res
    st = res["stats"]
    assert res["seen"] + st["rx_dropped"] == 300, res
    # forward() is the only reader here: every block it took is counted once.
    assert st["fwd_blocks"] == res["ring_blocks"] >= 1, res
    assert 1 <= st["fwd_max_blocks"] <= st["fwd_blocks"], res
    assert st["fwd_calls"] >= 3 and st["polls"] <= st["fwd_calls"], res
    assert st["rx_freezes"] == 0, res  # nothing held the ring for long
