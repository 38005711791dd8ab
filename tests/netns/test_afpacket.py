"""The AF_PACKET backend on real veths (default offloads: csum and TSO on)."""

from __future__ import annotations

import pytest

from nsio import Trio

from pylvs.engine import tables

pytestmark = pytest.mark.netns


PRELUDE = """
import json, subprocess, sys, time
from pylvs.io.afpacket import AfPacketBackend
from pylvs.io.bpf import ip
from pylvs.engine import tables
C, R = sys.argv[1:3] if len(sys.argv) > 2 else (None, None)
def in_ns(ns, code):
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
"""


def scenario(trio: Trio, body: str, timeout: float = 40):
    code = PRELUDE + f"C, R = {trio.c!r}, {trio.r!r}\n" + body
    return trio.py(trio.d, code, timeout=timeout)


def test_ring_gets_partial_checksum_frames_and_filter_keeps_others_out(trio):
    res = scenario(trio, r"""
b = AfPacketBackend(["d0", "d1"])
b.set_filter([(6, ip("10.9.0.1"), 80), (17, ip("10.9.0.1"), 53)], [])
client = in_ns(C, '''
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in (9999, 53, 54):
    u.sendto(b"hello", ("10.9.0.1", port))
for port in (81, 80):
    s = socket.socket(); s.settimeout(0.5)
    try: s.connect(("10.9.0.1", port))
    except OSError: pass
''')
batch = tables.Batch(64, tables.MAX_FRAME)
seen = []
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    n = b.recv(batch, 0.1)
    for i in range(n):
        vnet, eth = tables.strip_vnet(batch.frame(i))
        ethertype = int.from_bytes(eth[12:14], "big")
        proto = eth[23] if ethertype == 0x800 else None
        dport = int.from_bytes(eth[36:38], "big") if ethertype == 0x800 else None
        seen.append(dict(vnet=vnet, port=int(batch.in_port[i]), ethertype=ethertype,
                         proto=proto, dport=dport))
    if client.poll() is not None and len(seen) >= 2 and n == 0:
        break
client.wait(10)
print(json.dumps(dict(seen=seen, stats=b.stats())))
b.close()
""")
    seen = res["seen"]
    # Only service traffic made it in: no ARP, no port 81 / 9999 / 54.
    assert {(s["proto"], s["dport"]) for s in seen} == {(6, 80), (17, 53)}, seen
    assert all(s["port"] == 0 and s["ethertype"] == 0x800 for s in seen)
    syn = next(s for s in seen if s["proto"] == 6)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = syn["vnet"]
    # A local socket's SYN through a veth with tx offload: checksum partial.
    assert flags & tables.VNET_F_NEEDS_CSUM
    assert gso_type == tables.VNET_GSO_NONE
    assert (csum_start, csum_offset) == (14 + 20, 16)
    udp = next(s for s in seen if s["proto"] == 17)
    assert udp["vnet"][0] & tables.VNET_F_NEEDS_CSUM
    assert (udp["vnet"][4], udp["vnet"][5]) == (34, 6)


def test_sendmmsg_batch_reaches_the_peer(trio):
    rmac = trio.mac(trio.r, "eth0")
    res = scenario(trio, rf"""
import socket, struct
server = in_ns(R, '''
import socket, json
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("10.9.1.2", 7001)); u.settimeout(2)
print("ready", flush=True)
got = []
try:
    while True:
        got.append(u.recv(2048).decode())
except socket.timeout:
    pass
print(json.dumps(got))
''')
assert server.stdout.readline().strip() == "ready"
b = AfPacketBackend(["d0", "d1"])
dmac = bytes.fromhex({rmac!r}.replace(":", ""))
smac = b.ports[1].mac
batch = tables.Batch(64, 2048)
def csum(data):
    if len(data) % 2: data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
for k in range(50):
    payload = f"datagram {{k}}".encode()
    udp = struct.pack("!HHHH", 7000, 7001, 8 + len(payload), 0) + payload
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), k, 0, 64, 17, 0,
                      socket.inet_aton("10.9.1.1"), socket.inet_aton("10.9.1.2"))
    iph = iph[:10] + struct.pack("!H", csum(iph)) + iph[12:]
    i = batch.append(tables.with_vnet(dmac + smac + b"\x08\x00" + iph + udp))
    batch.verdict[i] = tables.V_TX
    batch.out_port[i] = 1
sent = b.send(batch)
out, err = server.communicate(timeout=10)
print(json.dumps(dict(sent=sent, got=json.loads(out.strip().splitlines()[-1]), stats=b.stats())))
b.close()
""")
    assert res["sent"] == 50
    assert sorted(res["got"]) == sorted(f"datagram {k}" for k in range(50))
    assert res["stats"]["tx_errors"] == 0


# A user-space L2 forwarder between the client and the real server: the
# Python-engine path of forward() (recv -> process -> send).
GSO_BODY = r"""
from pylvs.control.steering import open_steering
import numpy as np
cmac = bytes.fromhex(CMAC.replace(":", "")); rmac = bytes.fromhex(RMAC.replace(":", ""))
subprocess.run(["sysctl", "-qw", f"net.ipv4.ip_forward={IP_FORWARD}"], check=True)
b = AfPacketBackend(["d0", "d1"], ring=RING)
keys = [(6, ip("10.9.1.2"), 5001)]
b.set_filter(keys, keys)
st = open_steering(["d0", "d1"])
st.apply(keys, keys, ["10.9.0.1", "10.9.1.1"])

class MacSwap:
    gso = 0
    biggest = 0
    def process(self, batch, now):
        for i in range(batch.count):
            f = batch.buf[i]
            vnet = tables.VNET_HDR.unpack_from(f.tobytes()[:10])
            if vnet[1] != tables.VNET_GSO_NONE:
                self.gso += 1
            self.biggest = max(self.biggest, int(batch.length[i]) - 10)
            to_r = batch.in_port[i] == 0
            dst, src = (rmac, b.ports[1].mac) if to_r else (cmac, b.ports[0].mac)
            f[10:16] = np.frombuffer(dst, np.uint8)
            f[16:22] = np.frombuffer(src, np.uint8)
            batch.verdict[i] = tables.V_TX
            batch.out_port[i] = 1 if to_r else 0
        return batch.count

server = in_ns(R, '''
import socket, hashlib, json
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("10.9.1.2", 5001)); l.listen(); l.settimeout(20)
print("ready", flush=True)
c, _ = l.accept(); c.settimeout(20)
h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d: break
    h.update(d); n += len(d)
c.sendall(json.dumps([n, h.hexdigest()]).encode()); c.close()
''')
assert server.stdout.readline().strip() == "ready"
client = in_ns(C, '''
import socket, hashlib, json, os
data = os.urandom(4 << 20)
s = socket.create_connection(("10.9.1.2", 5001), timeout=20)
s.sendall(data); s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = s.recv(4096)
    if not d: break
    reply += d
print(json.dumps(dict(sent=[len(data), hashlib.sha256(data).hexdigest()], reply=json.loads(reply))))
''')
eng = MacSwap()
deadline = time.monotonic() + 25
while client.poll() is None and time.monotonic() < deadline:
    b.forward(eng, time.monotonic(), 0.05)
client.wait(5)
out, err = client.communicate()
server.wait(5)
st.remove()
print(json.dumps(dict(client=json.loads(out.strip().splitlines()[-1]) if out.strip() else err,
                      gso=eng.gso, biggest=eng.biggest, stats=b.stats())))
b.close()
"""


@pytest.mark.parametrize("ring", ["v2", "v3"])
@pytest.mark.parametrize("ip_forward", [0, 1])
def test_gso_frames_forwarded_intact(trio, ip_forward, ring):
    body = (f"CMAC, RMAC, IP_FORWARD, RING = {trio.mac(trio.c, 'eth0')!r}, "
            f"{trio.mac(trio.r, 'eth0')!r}, {ip_forward}, {ring!r}\n" + GSO_BODY)
    res = scenario(trio, body, timeout=60)
    assert isinstance(res["client"], dict), res["client"]
    sent, reply = res["client"]["sent"], res["client"]["reply"]
    assert reply == sent  # every byte arrived, in order, through user space
    assert res["gso"] > 0, res  # and it travelled as GSO frames
    assert res["biggest"] > 1514 * 4
    assert res["stats"]["rx_truncated"] == 0 and res["stats"]["tx_errors"] == 0
    if ring == "v2":   # frames bigger than a 2 KiB slot came through recv()
        assert res["stats"]["rx_copied"] > 0, res


@pytest.mark.parametrize("ring", ["v2", "v3", "auto"])
def test_c_forward_sees_every_frame_and_gives_blocks_back(trio, ring):
    # More retired blocks (V2: frames) than the ring has: they must go back
    # to the kernel.
    res = scenario(trio, f"RING = {ring!r}\n" + r"""
from pylvs import _fast
from pylvs.engine import new_engine
counters = tables.Counters()
engine = new_engine("c", 1024, counters=counters, schedule=lambda s, c, p: -1)
b = AfPacketBackend(["d0", "d1"], block_nr=4, ring=RING)
b.set_filter([(17, ip("10.9.0.1"), 7)], [])
client = in_ns(C, '''
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for k in range(60):
    for j in range(25):
        u.sendto(b"x" * 100, ("10.9.0.1", 7))
    time.sleep(0.004)
''')
seen = 0
deadline = time.monotonic() + 20
dropped = 0
while time.monotonic() < deadline and seen + dropped < 1500:
    seen += _fast.forward(engine, b.rings, time.monotonic(), 20)
    dropped = b.stats()["rx_dropped"]
client.wait(10)
print(json.dumps(dict(seen=seen, rx=counters.stat("rx_frames"), stats=b.stats(),
                      block_nr=b.rings[0].block_nr, frame_nr=b.rings[0].frame_nr)))
b.close()
""")
    # A loaded machine may stall the loop long enough to fill the ring: what
    # the kernel dropped is counted, everything else was seen.
    assert res["seen"] + res["stats"]["rx_dropped"] == 1500, res
    assert res["seen"] > 1000
    if ring == "v3":
        assert res["stats"]["rx_blocks"] > 2 * res["block_nr"]
    elif ring == "v2":
        assert res["seen"] > 2 * res["frame_nr"]
    else:   # forward() alone never switches: an idle director's frames go to the V2 lanes
        assert res["stats"]["rx_lane_slots"] == res["seen"] and res["stats"]["ring_lane"] == 1
    assert res["rx"] == res["seen"]  # the engine counted every frame forward gave it


def test_link_down_does_not_make_forward_spin(trio):
    res = scenario(trio, r"""
from pylvs import _fast
from pylvs.engine import new_engine
engine = new_engine("c", 64, counters=tables.Counters(), schedule=lambda *a: -1)
b = AfPacketBackend(["d0", "d1"])
subprocess.run(["ip", "link", "set", "d1", "down"], check=True)
t = time.monotonic(); calls = 0
while time.monotonic() - t < 0.5:
    _fast.forward(engine, b.rings, time.monotonic(), 20)
    calls += 1
subprocess.run(["ip", "link", "set", "d1", "up"], check=True)
print(json.dumps(dict(calls=calls, stats=b.stats(), err=b.rings[1].last_error)))
b.close()
""")
    import errno
    assert res["calls"] < 60  # each call waited its 20 ms
    assert res["stats"]["sock_errors"] >= 1 and res["err"] == errno.ENETDOWN


@pytest.mark.parametrize("ring", ["v2", "v3", "auto"])
def test_full_ring_frames_are_processed_once(trio, ring):
    # Let the ring fill up while nobody reads, then drain it: every frame
    # must reach the engine exactly once (held blocks stay "user" until the
    # call ends, so a pass round the ring must stop at them).
    res = scenario(trio, f"RING = {ring!r}\n" + r"""
from pylvs import _fast
from pylvs.engine import new_engine
counters = tables.Counters()
engine = new_engine("c", 1024, counters=counters, schedule=lambda s, c, p: -1)
b = AfPacketBackend(["d0", "d1"], block_nr=4, block_size=1 << 16, ring=RING)
b.set_filter([(17, ip("10.9.0.1"), 7)], [])
client = in_ns(C, '''
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for k in range(2000):
    u.sendto(b"x" * 100, ("10.9.0.1", 7))
    if k % 50 == 0:
        time.sleep(0.002)
''')
client.wait(20)
time.sleep(0.1)
seen = 0
for _ in range(10):
    seen += _fast.forward(engine, b.rings, time.monotonic(), 10)
print(json.dumps(dict(seen=seen, rx=counters.stat("rx_frames"), stats=b.stats())))
b.close()
""")
    assert res["stats"]["rx_dropped"] > 0, res  # the ring did fill up
    assert res["seen"] + res["stats"]["rx_dropped"] == 2000, res
    assert res["rx"] == res["seen"]


def test_adaptive_ring_moves_frames_between_rings_and_loses_none(trio):
    # --ring auto: a burst moves the group's frames to the V3 rings, idleness
    # back to the V2 lanes; every frame reaches the engine exactly once
    # across the switches. Thresholds are lowered so a Python sender crosses
    # them on any machine.
    res = scenario(trio, r"""
from pylvs.engine import new_engine
from pylvs.io.afpacket import LaneSwitch
counters = tables.Counters()
engine = new_engine("c", 4096, counters=counters, schedule=lambda s, c, p: -1)
sw = LaneSwitch(1, up_pps=300, down_pps=50, window=0.05)
b = AfPacketBackend(["d0", "d1"], ring="auto", lanes=sw)
b.set_filter([(17, ip("10.9.0.1"), 7)], [])
client = in_ns(C, '''
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for k in range(3000):
    u.sendto(b"x" * 100, ("10.9.0.1", 7))
    if k % 100 == 0:
        time.sleep(0.005)
''')
seen, lanes = 0, set()
deadline = time.monotonic() + 20
while time.monotonic() < deadline and seen + b.stats()["rx_dropped"] < 3000:
    seen += b.forward(engine, time.monotonic(), 0.02)
    lanes.add(sw.lane)
busy = b.stats()
t = time.monotonic()
while time.monotonic() - t < 0.5:   # idle: back to the lanes
    seen += b.forward(engine, time.monotonic(), 0.02)
client.wait(10)
print(json.dumps(dict(seen=seen, rx=counters.stat("rx_frames"), busy=busy, lanes=sorted(lanes),
                      after=b.stats())))
b.close()
""")
    busy, after = res["busy"], res["after"]
    assert res["seen"] + after["rx_dropped"] == 3000, res
    assert res["rx"] == res["seen"], res
    assert res["lanes"] == [0, 1], res          # it went to V3 under load
    assert busy["rx_lane_slots"] > 0 and busy["rx_blocks"] > busy["rx_lane_slots"], res
    assert after["ring_lane"] == 1 and after["ring_lane_switches"] >= 2, res


def test_scheduler_cannot_close_or_reenter_the_rings_forward_holds(trio):
    # forward() holds blocks (and frame pointers into them) across the
    # scheduler upcall: closing a ring there unmapped them under it
    # (SIGSEGV), a nested forward/recv gave the held block back to the kernel.
    res = scenario(trio, r"""
from pylvs import _fast
from pylvs.engine import new_engine
counters = tables.Counters()
calls = []
def sched(s, c, p):
    for what, fn in (("close", lambda: b.rings[0].close()),
                     ("forward", lambda: _fast.forward(engine, b.rings, time.monotonic(), 0)),
                     ("recv", lambda: b.recv(tables.Batch(4, 2048), 0))):
        try:
            fn()
            calls.append((what, "done"))
        except RuntimeError as e:
            calls.append((what, str(e)))
    return -1
engine = new_engine("c", 64, counters=counters, schedule=sched)
svc = tables.empty_services(1)
svc[0] = (ip("10.9.0.1"), 7, 17, 1, 0, 0)
engine.set_tables(svc, tables.empty_dests(0))
b = AfPacketBackend(["d0", "d1"])
b.set_filter([(17, ip("10.9.0.1"), 7)], [])
client = in_ns(C, '''
import socket, time
for k in range(5):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"x" * 100, ("10.9.0.1", 7))
    time.sleep(0.01)
''')
deadline = time.monotonic() + 10
while time.monotonic() < deadline and counters.stat("drop_no_dest") < 5:
    _fast.forward(engine, b.rings, time.monotonic(), 20)
client.wait(10)
print(json.dumps(dict(calls=calls, stats=counters.named(), open=b.rings[0].block_nr)))
b.close()
""")
    assert res["stats"]["drop_no_dest"] == 5, res
    assert res["calls"] and all(r != "done" and "in use" in r for _, r in res["calls"]), res


@pytest.mark.parametrize("ring", ["v2", "v3"])
def test_a_backed_up_ring_is_pressure_for_the_upcall_limit(trio, ring):
    # 2000 datagrams with no conn (the scheduler finds no dest, so each is
    # a new flow) wait in the ring before anyone reads: while an eighth
    # of the ring is still ready ahead, the engine is told of pressure and
    # (upcall_share 0) calls no scheduler; once the backlog is down to
    # less, the rest are scheduled. Every frame is one or the other.
    res = scenario(trio, f"RING = {ring!r}\n" + r"""
from pylvs import _fast
from pylvs.engine import new_engine
counters = tables.Counters()
seen_pressure = []
def sched(s, c, p):
    seen_pressure.append(engine.pressure)
    return -1
engine = new_engine("c", 4096, counters=counters, schedule=sched)
svc = tables.empty_services(1)
svc[0] = (ip("10.9.0.1"), 7, 17, 1, 0, 0)
engine.set_tables(svc, tables.empty_dests(0))
vals = tables.default_sysctls()
vals[tables.SYSCTL_INDEX["upcall_share"]] = 0
vals[tables.SYSCTL_INDEX["pressure_conn_rate"]] = 0   # the upcall limit alone
engine.set_sysctls(vals)
engine.upcall_cost = 1e-5
b = AfPacketBackend(["d0", "d1"], block_nr=64, block_size=1 << 16, ring=RING)
b.set_filter([(17, ip("10.9.0.1"), 7)], [])
client = in_ns(C, '''
import socket, time
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
for k in range(2000):
    socks[k % 50].sendto(b"x" * 100, ("10.9.0.1", 7))
    if k % 50 == 49:
        time.sleep(0.002)
''')
client.wait(20)
time.sleep(0.1)
seen = 0
for _ in range(20):
    seen += _fast.forward(engine, b.rings, time.monotonic(), 10)
print(json.dumps(dict(seen=seen, stats=counters.named(), io=b.stats(), calls=len(seen_pressure),
                      any_pressure=any(seen_pressure))))
b.close()
""")
    st = res["stats"]
    assert res["io"]["rx_dropped"] == 0, res     # the ring held them all
    assert st["drop_upcall_limit"] >= 500, res  # the backlog was pressure
    assert res["calls"] > 0 and not res["any_pressure"], res  # the tail was not
    assert st["drop_upcall_limit"] + st["drop_no_dest"] == res["seen"] == 2000, res
