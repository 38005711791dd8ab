"""The TCP state machine, timeouts and expiry, with numbers for time, on both engines."""

from __future__ import annotations

import numpy as np
import pytest

from engine_kit import (CIP, CLIENT_PORT, IMPLS, RIP, RMAC, RS_PORT, SMAC, VIP, Env, build_tables, ip, tcp, udp, v)
from pylvs.engine import states, tables
from pylvs.engine.states import (CLOSE, CLOSE_WAIT, ESTABLISHED, FIN_WAIT, LAST_ACK, NONE,
                                 SYN_RECV, TIME_WAIT, UDP_STATE)

ACTIVE, INACTIVE = tables.ACTIVE, tables.INACTIVE


@pytest.fixture(params=IMPLS)
def env(request) -> Env:
    return Env(request.param)


def client(env: Env, flags: str, now: float, cport: int = 1000):
    return env.send(v(tcp(flags=flags, sport=cport)), CLIENT_PORT, now)


def server(env: Env, flags: str, now: float, cport: int = 1000):
    return env.send(v(tcp(src=RIP, dst=CIP, sport=8080, dport=cport, smac=RMAC, dmac=SMAC,
                          flags=flags)), RS_PORT, now)


def state(env: Env, cport: int = 1000) -> tuple[int, float]:
    c = env.conn(cport=cport)
    assert c is not None, "no conn"
    return c[7], c[8]


def counts(env: Env, dest: int = 0) -> list[int]:
    return env.counters.dest_conns[dest].tolist()


def test_syn_makes_a_syn_recv_conn(env):
    verdict, _, _ = client(env, "S", 100.0)
    assert verdict == tables.V_TX
    assert env.engine.conns() == [(6, ip(CIP), 1000, ip(VIP), 80, ip(RIP), 8080, SYN_RECV, 160.0,
                                   tables.FWD_MASQ, 0, 0)]
    assert env.engine.conn_count == 1
    # SYN_RECV counts active (the kernel's tcp_state_active_table).
    assert counts(env) == [1, 0]
    assert env.counters.svc_stats[0, tables.STAT_CONNS] == 1
    assert env.counters.dest_stats[0, tables.STAT_CONNS] == 1


def test_handshake_through_the_reply(env):
    client(env, "S", 0.0)
    server(env, "SA", 1.0)
    assert state(env) == (SYN_RECV, 61.0)
    assert counts(env) == [1, 0]
    client(env, "A", 2.0)
    assert state(env) == (ESTABLISHED, 902.0)
    assert counts(env) == [1, 0]


def test_reply_ack_establishes(env):
    client(env, "S", 0.0)
    server(env, "A", 1.5)   # OUTPUT ack in SYN_RECV
    assert state(env) == (ESTABLISHED, 901.5)
    assert counts(env) == [1, 0]


def test_segment_without_flags_keeps_state_refreshes_expiry(env):
    client(env, "S", 0.0)
    client(env, "", 30.0)
    assert state(env) == (SYN_RECV, 90.0)


def test_client_closes_first(env):
    client(env, "S", 0.0)
    server(env, "SA", 0.1)
    client(env, "A", 0.2)
    client(env, "FA", 10.0)         # INPUT fin in ESTABLISHED
    assert state(env) == (CLOSE_WAIT, 70.0)
    assert counts(env) == [0, 1]
    server(env, "FA", 11.0)         # OUTPUT fin in CLOSE_WAIT
    assert state(env) == (TIME_WAIT, 131.0)
    client(env, "A", 12.0)
    assert state(env) == (TIME_WAIT, 132.0)
    assert counts(env) == [0, 1]


def test_syn_reusing_a_port_in_time_wait_opens_a_new_conn(env):
    """conn_reuse_mode=1: the old conn goes, the SYN is scheduled afresh."""
    client(env, "S", 0.0)
    server(env, "SA", 0.1)
    client(env, "A", 0.2)
    client(env, "FA", 1.0)
    server(env, "FA", 1.1)
    client(env, "A", 1.2)
    assert state(env) == (TIME_WAIT, 121.2)
    before = env.counters.stat("conns_created")
    verdict, _, _ = client(env, "S", 5.0)
    assert verdict == tables.V_TX
    assert state(env) == (SYN_RECV, 65.0)
    assert env.engine.conn_count == 1
    assert env.counters.stat("conns_created") == before + 1
    assert env.counters.svc_stats[0, tables.STAT_CONNS] == 2
    assert counts(env) == [1, 0]


def test_ack_in_time_wait_keeps_the_old_conn(env):
    client(env, "S", 0.0)
    client(env, "A", 0.1)
    client(env, "FA", 1.0)
    server(env, "FA", 1.1)
    client(env, "SA", 2.0)   # not a plain SYN: the old conn takes it, per the table
    assert env.counters.svc_stats[0, tables.STAT_CONNS] == 1
    assert state(env) == (SYN_RECV, 62.0)


def test_server_closes_first(env):
    client(env, "S", 0.0)
    client(env, "A", 1.0)
    server(env, "FA", 5.0)          # OUTPUT fin in ESTABLISHED
    assert state(env) == (FIN_WAIT, 125.0)
    assert counts(env) == [0, 1]
    client(env, "FA", 6.0)          # INPUT fin in FIN_WAIT
    assert state(env) == (TIME_WAIT, 126.0)


def test_close_wait_holds_until_the_server_closes(env):
    client(env, "S", 0.0)
    client(env, "A", 1.0)
    client(env, "F", 2.0)
    assert state(env)[0] == CLOSE_WAIT
    client(env, "F", 3.0)           # another fin from the client in CLOSE_WAIT
    assert state(env) == (CLOSE_WAIT, 63.0)
    server(env, "A", 4.0)
    assert state(env) == (CLOSE_WAIT, 64.0)


@pytest.mark.parametrize("side", ["client", "server"])
def test_rst_closes_and_deactivates(env, side):
    client(env, "S", 0.0)
    client(env, "A", 1.0)
    assert counts(env) == [1, 0]
    (client if side == "client" else server)(env, "R", 7.0)
    assert state(env) == (CLOSE, 17.0)
    assert counts(env) == [0, 1]


def test_rst_in_syn_recv_from_client_keeps_syn_recv(env):
    client(env, "S", 0.0)
    client(env, "R", 1.0)           # INPUT rst in SYN_RECV: the table keeps SYN_RECV
    assert state(env) == (SYN_RECV, 61.0)


def test_syn_again_on_established(env):
    client(env, "S", 0.0)
    client(env, "A", 1.0)
    client(env, "S", 2.0)           # INPUT syn in ESTABLISHED stays ESTABLISHED
    assert state(env) == (ESTABLISHED, 902.0)
    assert counts(env) == [1, 0]


def test_udp_state_and_timeout(env):
    env.send(v(udp()), CLIENT_PORT, 5.0)
    c = env.conn(proto=tables.PROTO_UDP)
    assert c[7] == UDP_STATE and c[8] == 305.0
    assert counts(env, 1) == [0, 1]
    env.send(v(udp(src=RIP, dst=CIP, sport=5353, dport=1000, smac=RMAC, dmac=SMAC)), RS_PORT, 6.0)
    assert env.conn(proto=tables.PROTO_UDP)[8] == 306.0
    assert counts(env, 1) == [0, 1]


def test_expiry_at_exactly_expires(env):
    client(env, "S", 0.0)
    assert env.engine.expire(59.999, env.engine.capacity) == 0
    assert env.engine.conn_count == 1
    assert env.engine.expire(60.0, env.engine.capacity) == 1
    assert env.engine.conn_count == 0
    assert env.engine.conns() == []
    assert counts(env) == [0, 0]
    assert env.counters.stat("conns_expired") == 1


def test_expiry_of_an_established_conn_drops_active(env):
    client(env, "S", 0.0)
    client(env, "A", 1.0)
    client(env, "S", 0.0, cport=1001)
    assert counts(env) == [2, 0]     # ESTABLISHED and SYN_RECV are both active
    assert env.engine.expire(100.0, env.engine.capacity) == 1
    assert counts(env) == [1, 0]
    assert env.engine.expire(901.0, env.engine.capacity) == 1
    assert counts(env) == [0, 0]


def test_expire_budget_and_hand(env):
    # Slots are handed out 0, 1, 2, ...; the hand walks them in that order.
    for p in range(5):
        client(env, "S", 0.0, cport=2000 + p)
    e = env.engine
    assert e.expire(100.0, 2) == 2      # slots 0, 1
    assert e.conn_count == 3
    assert {c[2] for c in e.conns()} == {2002, 2003, 2004}
    assert e.expire(100.0, 0) == 0
    assert e.expire(100.0, -3) == 0
    assert e.expire(100.0, 1) == 1      # slot 2
    assert e.expire(100.0, e.capacity) == 2


def test_freed_slot_is_reused_first(env):
    e = env.engine
    for p in range(3):
        client(env, "S", 0.0, cport=3000 + p)   # slots 0, 1, 2
    client(env, "A", 10.0, cport=3000)
    client(env, "A", 10.0, cport=3002)
    assert e.expire(65.0, 3) == 1                # slot 1; one lap of [0, high): back at 0
    client(env, "S", 66.0, cport=3003)           # takes slot 1 again
    # Two steps of the hand visit slots 0 and 1: conns 3000 and 3003.
    assert e.expire(10_000.0, 2) == 2
    assert {c[2] for c in e.conns()} == {3002}


@pytest.mark.parametrize("impl", IMPLS)
def test_set_timeouts_like_ipvsadm_set(impl):
    t = states.timeout_array(tcp=30, tcpfin=15, udp=5)
    assert t[ESTABLISHED] == 30 and t[FIN_WAIT] == 15 and t[UDP_STATE] == 5
    assert t[SYN_RECV] == 60 and t[CLOSE] == 10 and t[LAST_ACK] == 30 and t[NONE] == 2
    assert states.timeout_array().tolist() == [2, 900, 120, 60, 120, 120, 10, 60, 30, 120, 120, 300]
    env = Env(impl, timeouts=t)
    client(env, "S", 0.0)
    client(env, "A", 1.0)
    assert state(env) == (ESTABLISHED, 31.0)
    server(env, "F", 2.0)
    assert state(env) == (FIN_WAIT, 17.0)
    env.send(v(udp()), CLIENT_PORT, 3.0)
    assert env.conn(proto=tables.PROTO_UDP)[8] == 8.0
    # Changed at run time: the next packet of each conn uses the new values.
    env.engine.set_timeouts(states.timeout_array())
    server(env, "F", 4.0)
    assert state(env) == (FIN_WAIT, 124.0)
    env.send(v(udp()), CLIENT_PORT, 4.0)
    assert env.conn(proto=tables.PROTO_UDP)[8] == 304.0


def test_unresolved_dest_still_moves_state(env):
    verdict, _, _ = env.send(v(tcp(dport=81)), CLIENT_PORT, 0.0)
    assert verdict == tables.V_DROP
    c = env.conn()
    assert c[7] == SYN_RECV and c[8] == 60.0 and c[10] == 2
    assert env.counters.dest_stats[2, tables.STAT_INPKTS] == 1


def test_fwd_method_drop_leaves_new_conn_untouched(env):
    # A GRE tunnel dest (not forwarded yet): the conn is made (state NONE,
    # expires now + timeouts[NONE]) but the frame is dropped before the state
    # update.
    svc, dst = build_tables()
    dst[13]["tun_type"] = 2
    env.engine.set_tables(svc, dst)
    env.send(v(tcp(dport=88)), CLIENT_PORT, 0.0)
    c = env.conn()
    assert c[7] == NONE and c[8] == 2.0 and c[9] == tables.FWD_TUNNEL
    assert env.counters.dest_stats[13, tables.STAT_INPKTS] == 0
    assert counts(env, 13) == [0, 1]


def test_traffic_counters(env):
    client(env, "S", 0.0)                       # 40 bytes at the IP layer
    server(env, "SA", 0.0)
    env.send(v(tcp(flags="PA", payload=b"x" * 60)), CLIENT_PORT, 0.0)
    st = env.counters
    assert st.svc_stats[0].tolist() == [1, 2, 1, 140, 40]
    assert st.dest_stats[0].tolist() == [1, 2, 1, 140, 40]


def test_state_table_matches_kernel_spot_checks():
    T = states.TRANSITIONS
    assert T[states.INPUT, states.EV_SYN, NONE] == SYN_RECV
    assert T[states.INPUT, states.EV_ACK, SYN_RECV] == ESTABLISHED
    assert T[states.OUTPUT, states.EV_FIN, ESTABLISHED] == FIN_WAIT
    assert T[states.INPUT, states.EV_FIN, ESTABLISHED] == CLOSE_WAIT
    assert T[states.INPUT_ONLY, states.EV_FIN, ESTABLISHED] == FIN_WAIT
    assert states.next_state(states.INPUT, 0, SYN_RECV) == SYN_RECV
    assert states.tcp_event(states.TCP_SYN | states.TCP_RST) == states.EV_RST
    assert not T.flags.writeable
    assert np.all(T < states.N_TCP_STATES)
