"""What `pylvs adm -e` on a Tun dest does to its running conns, both engines.

As in the kernel: a conn holds its dest, and ip_vs_tunnel_xmit reads the
tunnel parameters (dest->tun_type, tun_port, tun_flags) from the dest for
every packet, so changing them reaches running conns at once; the
forwarding method is bound when the conn is created (ip_vs_bind_xmit), so
changing it reaches new conns only (test_forward_dr.py has the DR side).
"""

from __future__ import annotations

import pytest

from engine_kit import CLIENT_PORT, FIRST_ICMP_ID, IMPLS, RIP2, RS_PORT, SMAC, RMAC, Env, \
    build_tables, tcp_out, v
from pylvs.engine import tables
from test_engine_answers import EMIT, TX
from test_forward_tun import TUN_DEST, TUN_PORT, encap, gue, tun_in


@pytest.mark.parametrize("impl", IMPLS)
def test_tunnel_parameters_reach_running_conns_the_method_new_ones(impl):
    env = Env(impl)
    assert env.send(v(tun_in()), CLIENT_PORT, 0.0)[0] == EMIT
    assert env.emitted == [(RS_PORT, encap(tcp_out(dport=TUN_PORT)))]

    # -e --tun-type gue --tun-port 6080 --tun-csum: the running conn's next
    # packet already leaves as GUE with a checksum.
    gue(csum=True)(env)
    assert env.send(v(tun_in(flags="A")), CLIENT_PORT, 1.0)[0] == EMIT
    assert env.emitted == [(RS_PORT, encap(tcp_out(dport=TUN_PORT, flags="A"), gue=True,
                                           csum=True, ip_id=FIRST_ICMP_ID + 1))]

    # -e -m: the running conn stays Tun (back to IPIP, the dest's parameters
    # now); a new conn of the same dest is NAT.
    svc, dst = build_tables()
    dst[TUN_DEST]["fwd"] = tables.FWD_MASQ
    env.engine.set_tables(svc, dst)
    assert env.send(v(tun_in(flags="PA")), CLIENT_PORT, 2.0)[0] == EMIT
    assert env.emitted == [(RS_PORT, encap(tcp_out(dport=TUN_PORT, flags="PA"),
                                           ip_id=FIRST_ICMP_ID + 2))]
    assert env.conn()[9] == tables.FWD_TUNNEL
    verdict, port, out = env.send(v(tun_in(sport=2000)), CLIENT_PORT, 2.0)
    assert (verdict, port) == (TX, RS_PORT)
    assert out == v(tcp_out(dst=RIP2, sport=2000, dport=TUN_PORT, smac=SMAC, dmac=RMAC))
    assert env.conn(cport=2000)[9] == tables.FWD_MASQ
