"""The engine's loopback port (docs/io.md, "Clients on the director"), on
both engines: a client on the director itself comes in there with one of
the director's own addresses as source, which is no martian on that port
(IPVS takes such packets at LOCAL_OUT, before any route input), and its
replies leave there: NAT replies by the conn's port as always, VS-DR/Tun
real servers' replies (from the VIP) handed over unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from engine_kit import (CIP, IMPLS, LMAC, RIP, RS_PORT, SMAC, VIP, Env, ip, mac, tcp,
                        tcp_out, v)
from pylvs.engine import tables

TX, PASS, DROP = tables.V_TX, tables.V_PASS, tables.V_DROP
DIP_C, DIP_S = "10.0.0.254", "192.168.1.1"
CLIENT, LOCAL = 0, 2
ZERO = "00:00:00:00:00:00"     # the loopback device's MAC, both ends
DR_PORT = 82                   # engine_kit: service 3, a DR dest


def setup_net(env: Env) -> None:
    p = tables.empty_ports(3)
    for i, (addr, m) in enumerate([(DIP_C, LMAC), (DIP_S, SMAC), ("127.0.0.1", ZERO)]):
        p[i]["addr"] = ip(addr)
        p[i]["mtu"] = 65536 if i == LOCAL else 1500
        p[i]["mac"] = np.frombuffer(mac(m), np.uint8)
        p[i]["flags"] = tables.PORT_F_USED | (
            tables.PORT_F_LOCAL if i == LOCAL else tables.PORT_F_CHECK_MAC)
        p[i]["rp_filter"] = 0 if i == LOCAL else 1
    env.engine.set_ports(p)
    r = tables.empty_routes(2)
    r["prefix"], r["plen"], r["port"] = (ip("192.168.1.0"), 0), (24, 0), (RS_PORT, CLIENT)
    env.engine.set_routes(r, np.array(sorted(ip(a) for a in (VIP, DIP_C, DIP_S)), np.uint32))


def local_syn(dport: int, dmac: str = ZERO) -> bytes:
    return v(tcp(src=DIP_C, dport=dport, smac=ZERO, dmac=dmac))


def dr_reply(client: str = DIP_C) -> bytes:
    # From the real server that holds the VIP, to the client's MAC path.
    return v(tcp(src=VIP, dst=client, sport=DR_PORT, dport=1000, flags="SA", ack=1001,
                 smac="02:00:00:00:01:02", dmac=LMAC))


# (description, frames sent before, frame, in_port, verdict, out_port,
#  expected frame or None (unchanged), counters that must grow)
CASES = [
    ("a SYN from the director's own address on the loopback port makes a conn",
     [], local_syn(DR_PORT), LOCAL, TX, None, None, {"conns_created": 1}),
    ("a SYN from 127.0.0.1 never leaves for a real server (ip_vs_xmit.c: "
     "stopping traffic from loopback address)",
     [], v(tcp(src="127.0.0.1", dst=VIP, dport=80, smac=ZERO, dmac=ZERO)), LOCAL, DROP,
     None, None, {"drop_martian": 1}),
    ("the same SYN on a client port is a martian (fib_validate_source)",
     [], local_syn(DR_PORT, LMAC), CLIENT, DROP, None, None, {"drop_martian": 1}),
    ("a DR real server's reply to the local client leaves by the loopback port unchanged",
     [(local_syn(DR_PORT), LOCAL)], dr_reply(), CLIENT, TX, LOCAL, "same", {"tx_frames": 1}),
    ("the same reply on the loopback port itself is not taken again (no loop)",
     [(local_syn(DR_PORT), LOCAL)], dr_reply(), LOCAL, PASS, None, None, {"pass_not_ours": 1}),
    ("a reply from the VIP to a remote DR client is the kernel's, as before",
     [(v(tcp(dport=DR_PORT)), CLIENT)], dr_reply(CIP), CLIENT, PASS, None, None,
     {"pass_not_ours": 1}),
    ("a NAT reply to the local client is de-NATed and leaves by the loopback port",
     [(local_syn(80), LOCAL)],
     v(tcp(src=RIP, dst=DIP_C, sport=8080, dport=1000, flags="SA", ack=1001,
           smac="02:00:00:00:01:02", dmac=SMAC)), RS_PORT, TX, LOCAL,
     tcp_out(src=VIP, dst=DIP_C, sport=80, dport=1000, flags="SA", ack=1001, smac=ZERO,
             dmac=ZERO), {"tx_frames": 1}),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_local_port(impl, case):
    _, before, frame, in_port, verdict, out_port, want, grows = case
    env = Env(impl)
    setup_net(env)
    for f, port in before:
        assert env.send(f, port)[0] == TX
    start = env.stats()
    got_v, got_port, got = env.send(frame, in_port)
    assert got_v == verdict, env.stats()
    if out_port is not None:
        assert got_port == out_port
    if want == "same":
        assert bytes(got) == frame
    elif want is not None:
        assert bytes(got)[tables.VNET_HDR_LEN:] == want
    now = env.stats()
    for name, n in grows.items():
        assert now.get(name, 0) - start.get(name, 0) == n, (name, start, now)
