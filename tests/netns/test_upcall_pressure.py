"""Established flows keep flowing through a flood of new ones, on every
backend (docs/engine.md, "Upcall limit").

The director is stopped (SIGSTOP) while a client sends datagrams of new
flows, each from a fresh socket, with one datagram of an established flow
every 20th; then it runs again and finds its receive ring (AF_PACKET
ring, XSK rx ring, TAP queue) backed up. With ``upcall_share=0`` no new
flow may call the scheduler while that lasts: they are dropped and
counted, and every datagram of the established flow reaches the real
server. (Here the ring holds the whole burst, so the established flow would
get through without the limit too, only later: what this test pins down is
that each backend reports its backlog as pressure. The limit's effect on
a sustained flood is measured by `bench e2e`, flood row.)
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

pytestmark = pytest.mark.netns

PORT = 5002
EST_PORT = 40000  # the established flow's client port
EVERY = 20

# Sink on the real server: the established flow's datagrams ("est-K") seen,
# until WANT of them have come or 15 s pass without one (the flood is sent
# while the director is stopped: on a loaded machine that takes seconds).
SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)   # SO_RCVBUFFORCE: the burst fits
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(15.0)
want, seen = int(sys.argv[3]), set()
print("ready", flush=True)
try:
    while len(seen) < want:
        d = s.recv(2048)
        if d.startswith(b"est-"):
            seen.add(d)
except socket.timeout:
    pass
print(len(seen), flush=True)
"""

# The client: "first" sends est-0 from EST_PORT; "flood N" sends N
# datagrams of new flows and est-1.. every EVERY of them.
CLIENT = """
import socket, sys
vip, port, est_port, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
est = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
est.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
est.bind(("0.0.0.0", est_port))
if mode == "first":
    est.sendto(b"est-0", (vip, port))
else:
    k = 0
    for i in range(int(sys.argv[5])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"new", (vip, port))
        s.close()
        if i % int(sys.argv[6]) == 0:
            k += 1
            est.sendto(b"est-%d" % k, (vip, port))
print(k if mode != "first" else 0)
"""

# New-flow datagrams sent while the director is stopped: what its receive
# side holds without losing one (the XSK rx ring has 2048 slots, a TAP
# queue 500 frames).
BACKENDS = {"afpacket": 1600, "xdp": 1600, "tap": 400}


@pytest.mark.parametrize("io", list(BACKENDS))
def test_established_flow_keeps_flowing_through_a_flood_of_new_flows(director_lab, io):
    lab = director_lab(servers=1, start=False, io=io)
    # The limit meters the Python scheduler: wlc would run in the engine.
    # pressure_conn_rate off: the upcall limit alone decides (its own
    # flood test: tests/netns/test_synflood.py).
    lab.start_director("--sysctl", "upcall_share=0", "--sysctl", "pressure_conn_rate=0",
                       "--sched-impl", "python")
    lab.nat_service("udp", PORT, (1,))
    new = BACKENDS[io]
    k = len(range(0, new, EVERY))
    sink = lab.popen(lab.rs[0], [lab.python, "-c", SINK, lab.rips[0], str(PORT), str(k + 1)],
                     key="sink", stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    client = [lab.python, "-c", CLIENT, lab.vip, str(PORT), str(EST_PORT)]
    lab.run(lab.client, [*client, "first"], timeout=20)
    deadline = time.monotonic() + 10
    while lab.stats().get("conns_created", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    director = lab.procs["director"]
    director.send_signal(signal.SIGSTOP)
    try:
        sent = lab.run(lab.client, [*client, "flood", str(new), str(EVERY)], timeout=60)
        time.sleep(0.2)
    finally:
        director.send_signal(signal.SIGCONT)
    assert int(sent.stdout.strip()) == k
    got = int(sink.communicate(timeout=30)[0])
    st = lab.stats()
    assert got == k + 1, (got, str({n: v for n, v in st.items() if v}))   # est-0 and every one sent
    # Nothing was lost before the engine, and the backlog was pressure:
    # most new flows never reached the scheduler.
    assert st["rx_frames"] >= new + k + 1, st
    assert st["drop_upcall_limit"] >= new // 2, st
