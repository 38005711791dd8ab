"""Frames the engine makes (the emit area) leave on their ports, and a send
the egress link refuses is counted, never silent."""

from __future__ import annotations

import errno

import pytest

from test_afpacket import scenario

from pylvs import _fast

_SNAPLEN = _fast.PCAP_SNAPLEN

pytestmark = pytest.mark.netns

# Runs in the director's namespace after test_afpacket's PRELUDE.
KIT = r"""
import socket, struct
import numpy as np
from pylvs import _fast

def csum(data):
    if len(data) % 2: data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def udp_frame(dmac, smac, payload, ident=1):
    udp = struct.pack("!HHHH", 7000, 7001, 8 + len(payload), 0) + payload
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident, 0, 64, 17, 0,
                      socket.inet_aton("10.9.1.1"), socket.inet_aton("10.9.1.2"))
    iph = iph[:10] + struct.pack("!H", csum(iph)) + iph[12:]
    return tables.with_vnet(dmac + smac + b"\x08\x00" + iph + udp)

def emit(batch, frame, port):
    k, used = int(batch.emit_n[0]), int(batch.emit_n[1])
    batch.emit_buf[used:used + len(frame)] = np.frombuffer(frame, np.uint8)
    batch.emit_off[k], batch.emit_len[k], batch.emit_port[k] = used, len(frame), port
    batch.emit_n[:] = (k + 1, used + len(frame))

SERVER = '''
import socket, json
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("10.9.1.2", 7001)); u.settimeout(1.5)
print("ready", flush=True)
got = []
try:
    while True:
        got.append(u.recv(4096).decode()[:20])
except socket.timeout:
    pass
print(json.dumps(got))
'''
def serve():
    server = in_ns(R, SERVER)
    assert server.stdout.readline().strip() == "ready"
    return server

def received(server):
    out, err = server.communicate(timeout=10)
    return json.loads(out.strip().splitlines()[-1])
"""


def test_send_delivers_the_emit_area_after_the_tx_frames(trio):
    rmac = trio.mac(trio.r, "eth0")
    res = scenario(trio, KIT + rf"""
server = serve()
b = AfPacketBackend(["d0", "d1"])
dmac, smac = bytes.fromhex({rmac!r}.replace(":", "")), b.ports[1].mac
batch = tables.Batch(8, 2048)
i = batch.append(udp_frame(dmac, smac, b"ring frame"))
batch.verdict[i], batch.out_port[i] = tables.V_TX, 1
for k in range(3):
    emit(batch, udp_frame(dmac, smac, f"emitted {{k}}".encode(), ident=10 + k), 1)
emit(batch, udp_frame(dmac, smac, b"to no port"), 7)
sent = b.send(batch)
# An emit area whose entry lies beyond its buffer: counted, not read.
batch.emit_n[:] = (1, 0)
batch.emit_off[0], batch.emit_len[0], batch.emit_port[0] = len(batch.emit_buf) - 4, 60, 1
bad = _fast.emit_send(b.rings, batch.emit_buf, batch.emit_off, batch.emit_len,
                      batch.emit_port, batch.emit_n)
print(json.dumps(dict(sent=sent, bad=bad, got=received(server), stats=b.stats())))
b.close()
""")
    st = res["stats"]
    assert res["sent"] == 4 and res["bad"] == 0, res
    assert res["got"] == ["ring frame", "emitted 0", "emitted 1", "emitted 2"], res
    assert (st["tx_frames"], st["emit_sent"], st["tx_bad_port"]) == (1, 3, 2), st
    assert st["tx_errors"] == st["emit_errors"] == 0, st


def test_frames_beyond_the_egress_mtu_are_counted(trio):
    # issue 5, item 4b: the send fails with EMSGSIZE; it must show in the
    # counters the daemon logs without -v.
    rmac = trio.mac(trio.r, "eth0")
    res = scenario(trio, KIT + rf"""
subprocess.run(["ip", "link", "set", "d1", "mtu", "1000"], check=True)
server = serve()
b = AfPacketBackend(["d0", "d1"])
dmac, smac = bytes.fromhex({rmac!r}.replace(":", "")), b.ports[1].mac
batch = tables.Batch(8, 2048)
for payload in (b"small ring" , b"big ring".ljust(1400, b".")):
    i = batch.append(udp_frame(dmac, smac, payload))
    batch.verdict[i], batch.out_port[i] = tables.V_TX, 1
emit(batch, udp_frame(dmac, smac, b"big emitted".ljust(1400, b".")), 1)
emit(batch, udp_frame(dmac, smac, b"small emitted"), 1)
sent = b.send(batch)
print(json.dumps(dict(sent=sent, got=received(server), stats=b.stats(),
                      last=b.rings[1].last_tx_error)))
b.close()
""")
    st = res["stats"]
    assert res["sent"] == 2 and res["got"] == ["small ring", "small emitted"], res
    assert (st["tx_frames"], st["tx_errors"], st["emit_sent"], st["emit_errors"]) == (1, 1, 1, 1), st
    assert st["tx_emsgsize"] == 2 and res["last"] == errno.EMSGSIZE, res


@pytest.mark.parametrize("impl", ["c", "python"])
def test_an_engine_reply_reaches_the_client(trio, impl):
    # A UDP service without real servers: the engine answers ICMP port
    # unreachable (ip_vs_leave), which forward() (C) or send() (Python
    # batch) must put on the wire; steering keeps the kernel from answering.
    res = scenario(trio, rf"""
from pylvs.control.steering import open_steering
from pylvs.engine import new_engine
svc = tables.empty_services(1)
svc[0] = (ip("10.9.0.1"), 7, 17, tables.SVC_F_USED, 0, 0)
dests = tables.empty_dests(1)
engine = new_engine({impl!r}, 1024, counters=tables.Counters(), schedule=lambda s, c, p: -1)
engine.set_tables(svc, dests)
steering = open_steering(["d0", "d1"])
steering.apply(svc, dests, ["10.9.0.1", "10.9.1.1"])
b = AfPacketBackend(["d0", "d1"])
b.set_filter(svc, dests)
client = in_ns(C, '''
import socket, json
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(("10.9.0.1", 7)); u.settimeout(3)
u.send(b"anyone?")
try:
    u.recv(100); print(json.dumps("answer"))
except ConnectionRefusedError:
    print(json.dumps("refused"))
except socket.timeout:
    print(json.dumps("timeout"))
''')
deadline = time.monotonic() + 5
while client.poll() is None and time.monotonic() < deadline:
    b.forward(engine, time.monotonic(), 0.02)
out, err = client.communicate(timeout=10)
steering.remove()
print(json.dumps(dict(client=json.loads(out.strip().splitlines()[-1]), stats=b.stats())))
b.close()
""")
    assert res["client"] == "refused", res
    assert res["stats"]["emit_sent"] >= 1 and res["stats"]["emit_errors"] == 0, res


def test_pcap_copy_of_sent_frames_drops_records_not_frames(trio, tmp_path):
    # --pcap: a writer that falls behind (here: never drains before stop)
    # must cost records, counted, never frames on the wire.
    rmac = trio.mac(trio.r, "eth0")
    pcap = tmp_path / "sent.pcap"
    res = scenario(trio, KIT + rf"""
from pylvs.io.pcap import PcapWriter
b = AfPacketBackend(["d0", "d1"])
try:
    b.rings[0].set_capture(object())
    type_error = False
except TypeError:
    type_error = True
w = PcapWriter({str(pcap)!r}, b.rings, buffer_bytes=_fast.PCAP_SNAPLEN + 16, period=3600)
dmac, smac = bytes.fromhex({rmac!r}.replace(":", "")), b.ports[1].mac
batch = tables.Batch(64, 2048)
first = None
sent = 0
for k in range(64):
    batch.count = 0
    for j in range(64):
        f = udp_frame(dmac, smac, b"x" * 18, ident=k * 64 + j)
        first = first or f
        i = batch.append(f)
        batch.verdict[i], batch.out_port[i] = tables.V_TX, 1
    sent += b.send(batch)
during = w.stats()
w.stop()
print(json.dumps(dict(sent=sent, during=during, type_error=type_error,
                      first=first[tables.VNET_HDR.size:].hex(), stats=b.stats())))
b.close()
""")
    from scapy.utils import RawPcapReader
    n = 64 * 64
    assert res["type_error"]
    assert res["sent"] == n and res["stats"]["tx_frames"] == n, res["stats"]
    d = res["during"]
    # 60-byte frames, 76-byte records: the 256 KiB buffer holds 3449 of 4096.
    assert d["pcap_frames"] == (_SNAPLEN + 16) // 76 and d["pcap_frames"] + d["pcap_dropped"] == n, d
    records = list(RawPcapReader(str(pcap)))
    assert len(records) == d["pcap_frames"]
    data, meta = records[0]
    assert data.hex() == res["first"] and meta.wirelen == meta.caplen == 60
    assert {len(r[0]) for r in records} == {60}
