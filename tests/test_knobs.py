"""The connection knobs and the defence strategies under the kernel's names
(issue 8, items 4 and 5), on both engines: ``-o`` one-packet scheduling,
``--set`` on running conns, sloppy_tcp, nat_icmp_send, secure_tcp's
tcp_states_dos, drop_packet's rate, drop_entry's random drop, and the
control side that decides them once a second (control/defense.py)."""

from __future__ import annotations

import numpy as np
import pytest

from engine_kit import (CIP, CLIENT_PORT, IMPLS, LMAC, RIP, RMAC, RS_PORT, SMAC, Env,
                        build_tables, icmp_error_for, ip, mac, rst_for, tcp, udp, v)
from pylvs.control import defense
from pylvs.control.balancer import Balancer, BalancerError
from pylvs.engine import states, tables

TX, PASS, DROP = tables.V_TX, tables.V_PASS, tables.V_DROP
DIP_C, DIP_S = "10.0.0.254", "192.168.1.1"


def sysctls(env: Env, **values) -> None:
    s = tables.default_sysctls()
    for k, val in values.items():
        s[tables.SYSCTL_INDEX[k]] = val
    env.engine.set_sysctls(s)


def ports(env: Env, rs_addr: str | None = DIP_S) -> None:
    p = tables.empty_ports(2)
    for i, (addr, m) in enumerate([(DIP_C, LMAC), (rs_addr, SMAC)]):
        p[i]["addr"] = ip(addr) if addr else 0
        p[i]["mac"] = np.frombuffer(mac(m), np.uint8)
        p[i]["flags"] = tables.PORT_F_USED | tables.PORT_F_CHECK_MAC
    env.engine.set_ports(p)


def c2s(flags="A", sport=1000, dport=80, **kw) -> bytes:
    return v(tcp(sport=sport, dport=dport, flags=flags, **kw))


def s2c(flags="A", sport=8080, **kw) -> bytes:
    return v(tcp(src=RIP, dst=CIP, sport=sport, dport=1000, smac=RMAC, dmac=SMAC, flags=flags,
                 **kw))


def counted(env: Env, steps) -> tuple[list[int], dict[str, int]]:
    """Send (frame, in_port, now) steps one at a time: their verdicts and the
    counters' change."""
    before = env.counters.named()
    verdicts = [env.send(f, port, now)[0] for f, port, now in steps]
    after = env.counters.named()
    return verdicts, {k: after[k] - before[k] for k in after if after[k] != before[k]}


# --- -o: one-packet scheduling ---------------------------------------------------


def ops_env(impl: str, calls: list) -> Env:
    def schedule(svc, caddr, cport):
        calls.append((svc, caddr, cport))
        return {0: 0, 1: 1}[svc]

    env = Env(impl, schedule=schedule)
    svc, dst = build_tables()
    svc[1]["flags"] |= tables.SVC_F_ONE_PACKET   # UDP VIP:53
    svc[0]["flags"] |= tables.SVC_F_ONE_PACKET   # TCP VIP:80: the flag is for UDP only
    env.engine.set_tables(svc, dst)
    return env


@pytest.mark.parametrize("impl", IMPLS)
def test_one_packet_udp_schedules_every_datagram_and_keeps_no_conn(impl):
    calls: list = []
    env = ops_env(impl, calls)
    q = v(udp(sport=4000))
    verdicts, moved = counted(env, [(q, CLIENT_PORT, 1.0)] * 3)
    assert verdicts == [TX] * 3
    # Each datagram: scheduled, a conn made and expired at once (the
    # kernel's ip_vs_conn_put of an IP_VS_CONN_F_ONE_PACKET conn).
    assert calls == [(1, ip(CIP), 4000)] * 3
    assert moved == {"rx_frames": 3, "tx_frames": 3, "conns_created": 3, "conns_expired": 3}
    assert env.engine.conn_count == 0 and env.engine.conns() == []
    assert env.counters.dest_conns[1].tolist() == [0, 0]
    assert env.counters.svc_stats[1, tables.STAT_CONNS] == 3
    assert env.counters.dest_stats[1, tables.STAT_INPKTS] == 3
    # A NAT reply finds no conn: the kernel's copy stands (no conntrack here).
    reply = v(udp(src=RIP, dst=CIP, sport=5353, dport=4000, smac=RMAC, dmac=SMAC))
    assert counted(env, [(reply, RS_PORT, 1.5)])[1] == {"rx_frames": 1, "pass_not_ours": 1}


@pytest.mark.parametrize("impl", IMPLS)
def test_one_packet_flag_on_tcp_keeps_conns(impl):
    calls: list = []
    env = ops_env(impl, calls)
    verdicts, moved = counted(env, [(c2s("S"), CLIENT_PORT, 0.0), (c2s("A"), CLIENT_PORT, 0.1)])
    assert verdicts == [TX, TX] and len(calls) == 1
    assert env.engine.conn_count == 1 and "conns_expired" not in moved


def test_balancer_publishes_ops_and_refuses_it_for_tcp():
    b = Balancer(tables.Counters(8, 8))
    seen = []
    b.publish = lambda svcs, dests: seen.append(svcs.copy())
    slot = b.add_service("udp", "10.0.0.1", 53, ops=True)
    assert seen[-1][slot]["flags"] == tables.SVC_F_USED | tables.SVC_F_ONE_PACKET
    b.edit_service("udp", "10.0.0.1", 53, ops=False)
    assert seen[-1][slot]["flags"] == tables.SVC_F_USED
    with pytest.raises(BalancerError, match="only for UDP"):
        b.add_service("tcp", "10.0.0.1", 80, ops=True)


# --- --set: the timeout table on running and new conns ----------------------------

# (description, service port (80 NAT, 82 DR), steps before, the --set values,
#  the step after, state, seconds left)
SET_ROWS = [
    ("an ESTABLISHED conn takes the new tcp timeout at its next packet", 80,
     [("S", 0.0), ("A", 1.0)], dict(tcp=100), ("A", 10.0), states.ESTABLISHED, 100.0),
    ("a DR conn's FIN moves it to FIN_WAIT with the new tcpfin", 82,
     [("S", 0.0), ("A", 1.0)], dict(tcpfin=7), ("FA", 10.0), states.FIN_WAIT, 7.0),
    ("other states keep their table value", 80, [("S", 0.0)], dict(tcp=100, tcpfin=7),
     ("S", 2.0), states.SYN_RECV, 60.0),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", SET_ROWS, ids=[r[0] for r in SET_ROWS])
def test_set_applies_to_running_conns_at_their_next_packet(impl, row):
    _, dport, before, values, (flags, now), state, left = row
    env = Env(impl)
    for f, t in before:
        assert env.send(c2s(f, dport=dport), CLIENT_PORT, t)[0] == TX
    c = env.conn()
    old_expires = c[8]
    env.engine.set_timeouts(states.timeout_array(**values))
    assert env.conn()[8] == old_expires   # no packet, no change (the kernel's timer)
    assert env.send(c2s(flags, dport=dport), CLIENT_PORT, now)[0] == TX
    c = env.conn()
    assert (c[7], c[8]) == (state, now + left)


@pytest.mark.parametrize("impl", IMPLS)
def test_set_udp_timeout_applies_to_running_udp_conns(impl):
    env = Env(impl)
    env.send(v(udp()), CLIENT_PORT, 0.0)
    assert env.conn(tables.PROTO_UDP)[8] == 300.0
    env.engine.set_timeouts(states.timeout_array(udp=20))
    env.send(v(udp()), CLIENT_PORT, 5.0)
    assert env.conn(tables.PROTO_UDP)[8] == 25.0


def test_balancer_set_keeps_values_given_as_zero_and_hands_the_table_on():
    b = Balancer(tables.Counters(8, 8))
    handed = []
    b.on_timeouts = handed.append
    b.set_timeouts(100, 0, 0)
    b.set_timeouts(0, 50, 20)
    assert b.timeouts() == {"tcp": 100, "tcpfin": 50, "udp": 20}
    t = handed[-1]
    assert (t[states.ESTABLISHED], t[states.FIN_WAIT], t[states.UDP_STATE]) == (100, 50, 20)


# --- sloppy_tcp ------------------------------------------------------------------

# (description, sloppy, flags, verdict, counters, conn state or None)
SLOPPY_ROWS = [
    ("an ACK without a conn: refused and reset", 0, "A", DROP,
     {"drop_no_conn": 1, "rst_sent": 1, "emit_frames": 1}, None),
    ("sloppy: the ACK takes the flow over, ESTABLISHED at once", 1, "A", TX,
     {"conns_created": 1, "tx_frames": 1}, states.ESTABLISHED),
    ("sloppy: a FIN too (INPUT fin from NONE: CLOSE)", 1, "FA", TX,
     {"conns_created": 1, "tx_frames": 1}, states.CLOSE),
    ("sloppy: a SYN+ACK makes a conn", 1, "SA", TX,
     {"conns_created": 1, "tx_frames": 1}, states.SYN_RECV),
    ("sloppy: never a RST", 1, "R", DROP, {"drop_no_conn": 1}, None),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", SLOPPY_ROWS, ids=[r[0] for r in SLOPPY_ROWS])
def test_sloppy_tcp(impl, row):
    _, sloppy, flags, verdict, moved, state = row
    env = Env(impl)
    sysctls(env, sloppy_tcp=sloppy)
    verdicts, got = counted(env, [(c2s(flags), CLIENT_PORT, 0.0)])
    assert verdicts == [verdict]
    assert got == {"rx_frames": 1, **moved}
    c = env.conn()
    assert (c[7] if c else None) == state
    if verdict == DROP and flags != "R":
        assert env.emitted == [(CLIENT_PORT, rst_for(tcp(flags=flags)))]


# --- nat_icmp_send ------------------------------------------------------------------

# (description, nat_icmp_send, the frame from the real-server side, its RS port
#  address, verdict, counters, ICMP answered)
NAT_ICMP_ROWS = [
    ("off: a NAT real server's packet without a conn is the kernel's", 0, s2c(), DIP_S,
     PASS, {"pass_not_ours": 1}, False),
    ("on: dropped and answered with port unreachable", 1, s2c(), DIP_S, DROP,
     {"drop_rs_no_conn": 1, "icmp_unreach_sent": 1, "emit_frames": 1}, True),
    ("on: UDP too", 1, v(udp(src=RIP, dst=CIP, sport=5353, dport=1000, smac=RMAC, dmac=SMAC)),
     DIP_S, DROP, {"drop_rs_no_conn": 1, "icmp_unreach_sent": 1, "emit_frames": 1}, True),
    ("on: a TCP RST goes on as before", 1, s2c("R"), DIP_S, PASS, {"pass_not_ours": 1}, False),
    ("on: another port of the real server is not a real service", 1, s2c(sport=22), DIP_S,
     PASS, {"pass_not_ours": 1}, False),
    ("on: a UDP real service's port over TCP is not one", 1, s2c(sport=5353), DIP_S, PASS,
     {"pass_not_ours": 1}, False),
    ("on: a port without an address drops without an answer", 1, s2c(), None, DROP,
     {"drop_rs_no_conn": 1}, False),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", NAT_ICMP_ROWS, ids=[r[0] for r in NAT_ICMP_ROWS])
def test_nat_icmp_send(impl, row):
    _, on, frame, addr, verdict, moved, answered = row
    env = Env(impl)
    ports(env, addr)
    sysctls(env, nat_icmp_send=on)
    verdicts, got = counted(env, [(frame, RS_PORT, 0.0)])
    assert verdicts == [verdict]
    assert got == {"rx_frames": 1, **moved}
    want = [(RS_PORT, icmp_error_for(frame[10:], 3, 3, DIP_S))] if answered else []
    assert env.emitted == want


@pytest.mark.parametrize("impl", IMPLS)
def test_nat_icmp_send_leaves_live_conns_alone(impl):
    env = Env(impl)
    ports(env)
    sysctls(env, nat_icmp_send=1)
    assert env.send(c2s("S"), CLIENT_PORT, 0.0)[0] == TX
    assert env.send(s2c("SA"), RS_PORT, 0.1)[0] == TX


# --- secure_tcp: the kernel's tcp_states_dos -----------------------------------------

S = states
# (description, client frames "c:FLAGS" / server "s:FLAGS" on a NAT conn,
#  states after each with tcp_states, and with tcp_states_dos)
DOS_ROWS = [
    ("the client's ACK does not complete a handshake the server never answered",
     ["c:S", "c:A"], [S.SYN_RECV, S.ESTABLISHED], [S.SYN_RECV, S.SYN_RECV]),
    ("the server's SYN+ACK moves SYN_RECV to SYNACK, the client's ACK then establishes",
     ["c:S", "s:SA", "c:A"], [S.SYN_RECV, S.SYN_RECV, S.ESTABLISHED],
     [S.SYN_RECV, S.SYNACK, S.SYNACK]),
    ("the server's ACK establishes in both tables",
     ["c:S", "s:SA", "s:A"], [S.SYN_RECV, S.SYN_RECV, S.ESTABLISHED],
     [S.SYN_RECV, S.SYNACK, S.ESTABLISHED]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("row", DOS_ROWS, ids=[r[0] for r in DOS_ROWS])
def test_secure_tcp_state_table(impl, secure, row):
    _, steps, normal, dos = row
    env = Env(impl)
    if secure:
        env.engine.set_transitions(states.TRANSITIONS_DOS)
    got = []
    for i, step in enumerate(steps):
        side, flags = step.split(":")
        frame, port = (c2s(flags), CLIENT_PORT) if side == "c" else (s2c(flags), RS_PORT)
        assert env.send(frame, port, float(i))[0] == TX
        got.append(env.conn()[7])
    assert got == (dos if secure else normal)


@pytest.mark.parametrize("impl", IMPLS)
def test_secure_tcp_dr_conn_starts_in_synack(impl):
    env = Env(impl)
    env.engine.set_transitions(states.TRANSITIONS_DOS)
    assert env.send(c2s("S", dport=82), CLIENT_PORT, 0.0)[0] == TX
    assert env.conn()[7] == states.SYNACK
    env.engine.set_transitions(states.TRANSITIONS)
    assert env.send(c2s("A", dport=82), CLIENT_PORT, 1.0)[0] == TX
    assert env.conn()[7] == states.ESTABLISHED


@pytest.mark.parametrize("impl", IMPLS)
def test_set_transitions_refuses_bad_tables(impl):
    env = Env(impl)
    with pytest.raises(TypeError):
        env.engine.set_transitions(states.TRANSITIONS.astype(np.int32))
    with pytest.raises(ValueError):
        env.engine.set_transitions(np.full((3, 4, 11), 11, dtype=np.uint8))


# --- drop_packet: ip_vs_todrop ---------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rate,counter,dropped", [
    (3, 3, [3, 6, 9]),       # the automatic modes restart the countdown at the rate
    (3, -1, [1, 4, 7]),      # mode 3 leaves it: the first one goes, then every third
    (1, 1, list(range(1, 10))),
    (0, -1, []),
])
def test_drop_packet_rate(impl, rate, counter, dropped):
    env = Env(impl, capacity=64)
    assert env.send(c2s("S", sport=999), CLIENT_PORT, 0.0)[0] == TX   # before: no rate
    env.engine.set_drop_rate(rate, counter)
    verdicts, moved = counted(env, [(c2s("S", sport=1000 + i), CLIENT_PORT, 0.1)
                                    for i in range(1, 10)])
    assert [i for i, vd in enumerate(verdicts, 1) if vd == DROP] == dropped
    assert moved.get("drop_defense", 0) == len(dropped)
    # Packets of existing conns never count down.
    assert env.send(c2s("A", sport=999), CLIENT_PORT, 0.2)[0] == TX


@pytest.mark.parametrize("impl", IMPLS)
def test_drop_rate_refuses_negative(impl):
    with pytest.raises(ValueError):
        Env(impl).engine.set_drop_rate(-1)


# --- drop_entry: ip_vs_random_dropentry -------------------------------------------------


def flows(env: Env, now: float = 0.0) -> None:
    """A small table: 2 half-open, 2 established with 2 client packets, 2
    established with 9, 2 in TIME_WAIT (NAT, via the server's side), 2
    UDP with one datagram, all last seen at `now`."""
    steps = []
    for p in (1, 2):
        steps.append((c2s("S", sport=p), CLIENT_PORT))
    for p in (3, 4):
        steps += [(c2s("S", sport=p), CLIENT_PORT), (c2s("A", sport=p), CLIENT_PORT)]
    for p in (5, 6):
        steps += [(c2s("S", sport=p), CLIENT_PORT)] + [(c2s("A", sport=p), CLIENT_PORT)] * 8
    for p in (7, 8):
        steps += [(c2s("S", sport=p), CLIENT_PORT), (c2s("A", sport=p), CLIENT_PORT),
                  (c2s("FA", sport=p), CLIENT_PORT),
                  (v(tcp(src=RIP, dst=CIP, sport=8080, dport=p, smac=RMAC, dmac=SMAC,
                         flags="FA")), RS_PORT)]
    for p in (9, 10):
        steps.append((v(udp(sport=p)), CLIENT_PORT))
    for f, port in steps:
        assert env.send(f, port, now)[0] == TX


def survivors(env: Env) -> list[int]:
    return sorted(c[2] for c in env.engine.conns())


@pytest.mark.parametrize("impl", IMPLS)
def test_drop_entry_takes_half_open_first_and_idle_light_flows_after_60s(impl):
    env = Env(impl, capacity=64)
    flows(env)
    # Within 60 s of their last packet only half-open conns go.
    for _ in range(100):
        env.engine.drop_entries(30.0)
    assert survivors(env) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert env.counters.stat("conns_dropped") == 2
    # Later, ESTABLISHED and UDP conns with at most 8 client packets go too;
    # 9 packets, or TIME_WAIT, never.
    for _ in range(400):
        env.engine.drop_entries(100.0)
    assert survivors(env) == [5, 6, 7, 8]
    assert env.counters.stat("conns_dropped") == 6
    assert env.counters.dest_conns[:2].sum() == 4


def test_drop_entry_draws_the_same_conns_in_both_engines():
    envs = {impl: Env(impl, capacity=64) for impl in IMPLS}
    trace = {}
    for impl, env in envs.items():
        flows(env)
        trace[impl] = []
        for i in range(40):
            n = env.engine.drop_entries(70.0 + i)
            trace[impl].append((n, survivors(env)))
    assert trace["c"] == trace["python"]


@pytest.mark.parametrize("impl", IMPLS)
def test_drop_entry_on_an_empty_table(impl):
    assert Env(impl).engine.drop_entries(0.0) == 0


# --- control: update_defense_level ------------------------------------------------------

BASE = dict(drop_entry=0, drop_packet=0, secure_tcp=0, amemthresh=1024, am_droprate=10)
# (description, sysctls, available pages, rewritten sysctls, levels)
LEVEL_ROWS = [
    ("all off", {}, 0, {}, defense.Levels(False, 0, -1, False)),
    ("automatic, memory enough: stays 1", dict(drop_entry=1, drop_packet=1, secure_tcp=1),
     2000, {}, defense.Levels(False, 0, -1, False)),
    ("automatic, short of memory: turns on and reads 2",
     dict(drop_entry=1, drop_packet=1, secure_tcp=1), 512,
     dict(drop_entry=2, drop_packet=2, secure_tcp=2), defense.Levels(True, 2, 2, True)),
    ("automatic and on, memory back: off and reads 1",
     dict(drop_entry=2, drop_packet=2, secure_tcp=2), 1024,
     dict(drop_entry=1, drop_packet=1, secure_tcp=1), defense.Levels(False, 0, -1, False)),
    ("the rate is amemthresh / (amemthresh - available)", dict(drop_packet=2), 1000, {},
     defense.Levels(False, 42, 42, False)),
    ("no memory at all: every new flow dropped", dict(drop_packet=1), 0, dict(drop_packet=2),
     defense.Levels(False, 1, 1, False)),
    ("always: am_droprate, the countdown left running",
     dict(drop_entry=3, drop_packet=3, secure_tcp=3, am_droprate=7), 5000, {},
     defense.Levels(True, 7, -1, True)),
    ("amemthresh 0: never short of memory", dict(drop_packet=1, amemthresh=0), 0, {},
     defense.Levels(False, 0, -1, False)),
]


@pytest.mark.parametrize("row", LEVEL_ROWS, ids=[r[0] for r in LEVEL_ROWS])
def test_update_defense_level(row):
    _, values, avail, changes, levels = row
    assert defense.update_defense_level({**BASE, **values}, avail) == (changes, levels)


class Recorder:
    def __init__(self):
        self.calls: list = []

    def __call__(self, name, *args):
        self.calls.append((name, args))


def test_defense_tick_drives_the_engines_and_rewrites_the_modes():
    b = Balancer(tables.Counters(8, 8))
    b.set_sysctls({"secure_tcp": 1, "drop_packet": 1, "drop_entry": 1, "amemthresh": 100})
    rec = Recorder()
    room = [100 * 32]       # free conn slots: 100 pages' worth (128 bytes a conn)
    d = defense.Defense(b, rec, lambda: room[0], meminfo=lambda: 10**6, clock=lambda: 5.0)
    d.tick()
    assert rec.calls == [("set_drop_rate", (0, -1))]
    assert b.sysctl("secure_tcp") == {"secure_tcp": 1}
    room[0] = 50 * 32       # half the threshold: rate 100 / 50
    rec.calls.clear()
    d.tick()
    assert [c[0] for c in rec.calls] == ["set_transitions", "set_drop_rate", "drop_entries"]
    assert rec.calls[0][1][0] is states.TRANSITIONS_DOS
    assert rec.calls[1:] == [("set_drop_rate", (2, 2)), ("drop_entries", (5.0,))]
    assert {k: b.sysctls()[k] for k in defense.MODES} == dict.fromkeys(defense.MODES, 2)
    room[0] = 10**6
    rec.calls.clear()
    d.tick()
    assert rec.calls[0] == ("set_transitions", (states.TRANSITIONS,))
    assert {k: b.sysctls()[k] for k in defense.MODES} == dict.fromkeys(defense.MODES, 1)


def test_available_memory_is_the_lesser_of_memavailable_and_table_room():
    d = defense.Defense(None, Recorder(), lambda: 3200, meminfo=lambda: 50)
    assert d.available() == 50
    d.meminfo = lambda: None
    assert d.available() == 100


def test_mem_available_pages_reads_meminfo(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:  100 kB\nMemAvailable:   8 kB\n")
    assert defense.mem_available_pages(str(p)) == 2
    assert defense.mem_available_pages(str(tmp_path / "none")) is None


# --- the sysctls under their names ----------------------------------------------------

KERNEL_DEFAULTS = dict(sloppy_tcp=0, nat_icmp_send=0, pmtu_disc=1, drop_entry=0, drop_packet=0,
                       secure_tcp=0, amemthresh=1024, am_droprate=10, conn_reuse_mode=1,
                       expire_nodest_conn=0)


def test_sysctls_have_the_kernels_defaults_and_ranges():
    b = Balancer(tables.Counters(8, 8))
    got = b.sysctls()
    assert {k: got[k] for k in KERNEL_DEFAULTS} == KERNEL_DEFAULTS
    for name in ("drop_entry", "drop_packet", "secure_tcp"):
        assert b.sysctl(name, 3) == {name: 3}
        with pytest.raises(BalancerError, match="out of range"):
            b.sysctl(name, 4)
    arr = b.sysctl_array()
    assert arr[tables.SYSCTL_INDEX["secure_tcp"]] == 3
    assert len(arr) == tables.N_SYSCTL == len(tables.SYSCTL_DEFAULTS)


# --- expire_nodest_conn: the flush when a dest is deleted -------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_expire_nodest_flushes_the_conns_of_deleted_dests_only(impl):
    env = Env(impl)
    for p in (1, 2):
        assert env.send(c2s("S", sport=p), CLIENT_PORT, 0.0)[0] == TX             # dest 0
        assert env.send(c2s("S", sport=p, dport=82), CLIENT_PORT, 0.0)[0] == TX   # dest 3
    assert env.engine.expire_nodest() == 0
    env.engine.set_tables(*build_tables(gone=(0,)))
    before = env.counters.stat("conns_expired")
    assert env.engine.expire_nodest() == 2
    assert sorted((c[10], c[2]) for c in env.engine.conns()) == [(3, 1), (3, 2)]
    assert env.counters.stat("conns_expired") - before == 2
    assert env.counters.dest_conns[0].tolist() == [0, 0]


def dest_rows(*rows) -> np.ndarray:
    d = tables.empty_dests(len(rows))
    for i, (flags, svc) in enumerate(rows):
        d[i]["flags"], d[i]["svc"] = flags, svc
    return d


U = tables.DEST_F_USED
# (description, old (flags, svc) rows, new rows, a dest went)
GONE_ROWS = [
    ("no old table", None, [(U, 0)], False),
    ("nothing changed", [(U, 0), (0, 0)], [(U, 0), (0, 0)], False),
    ("a dest added", [(U, 0)], [(U, 0), (U, 1)], False),
    ("a dest deleted", [(U, 0), (U, 1)], [(U, 0), (0, 0)], True),
    ("its slot taken by another service's dest", [(U, 0)], [(U, 2)], True),
    ("a shorter table", [(U, 0), (U, 0)], [(U, 0)], True),
    ("a trashed dest kept for its replies is gone", [(U, 0)],
     [(tables.DEST_F_REPLIES, 0)], True),
]


@pytest.mark.parametrize("row", GONE_ROWS, ids=[r[0] for r in GONE_ROWS])
def test_dests_gone(row):
    _, old, new, gone = row
    assert tables.dests_gone(None if old is None else dest_rows(*old), dest_rows(*new)) is gone


# --- pmtu_disc: tunnelled DF packets too big are fragmented, not refused ---------------


def tunnel_run(impl: str, pmtu_disc: int, frame: bytes, mtu_rs: int = 1000):
    """A Tun conn (IPIP to RIP2) on a link of mtu_rs, then `frame` on it:
    (verdict, emitted, counters moved)."""
    from test_engine_answers import ports as net_ports
    from test_forward_tun import tun_in

    env = Env(impl)
    env.engine.set_ports(net_ports(mtu_rs=mtu_rs))
    sysctls(env, pmtu_disc=pmtu_disc)
    assert env.send(v(tun_in()), CLIENT_PORT, 0.0)[0] == tables.V_EMIT
    verdicts, moved = counted(env, [(frame, CLIENT_PORT, 0.5)])
    return verdicts[0], env.emitted, moved


def outer_packets(emitted) -> list:
    from scapy.layers.inet import IP as ScapyIP
    from scapy.layers.l2 import Ether

    out = []
    for port, fr in emitted:
        assert port == RS_PORT
        o = Ether(fr[10:])[ScapyIP]
        assert o.proto == 4 and o.dst == "192.168.1.3"
        out.append(o)
    return out


def reassembled(outer: list) -> bytes:
    """The payload of IP fragments (in order) put back together."""
    from scapy.packet import raw

    assert all(o.id == outer[0].id for o in outer)
    assert [bool(o.flags.MF) for o in outer] == [True] * (len(outer) - 1) + [False]
    data = b""
    for o in outer:
        assert o.frag * 8 == len(data)
        data += raw(o)[o.ihl * 4:o.len]
    return data


@pytest.mark.parametrize("pmtu_disc,outer_df", [(1, True), (0, False)])
def test_pmtu_disc_outer_df(pmtu_disc, outer_df):
    from test_forward_tun import tun_in

    got = [tunnel_run(impl, pmtu_disc, v(tun_in(flags="A", ip_flags="DF"))) for impl in IMPLS]
    assert got[0][1] == got[1][1]
    verdict, emitted, _ = got[0]
    (o,) = outer_packets(emitted)
    assert bool(o.flags.DF) is outer_df


def test_pmtu_disc_0_fragments_the_outer_packet_of_a_df_packet_too_big():
    from scapy.layers.inet import IP as ScapyIP
    from scapy.layers.l2 import Ether
    from scapy.packet import raw
    from test_engine_answers import BIG
    from test_forward_tun import tun_in

    frame = v(tun_in(flags="PA", payload=BIG[:1200], ip_flags="DF"))
    verdict, _, moved = tunnel_run("c", 1, frame)
    assert verdict == DROP and moved.get("drop_frag_needed") == 1
    got = [tunnel_run(impl, 0, frame) for impl in IMPLS]
    assert got[0] == got[1]
    verdict, emitted, moved = got[0]
    assert verdict == tables.V_EMIT
    assert moved == {"rx_frames": 1, "tx_tunneled": 1, "emit_frames": 2, "frag_out": 2}
    outer = outer_packets(emitted)
    assert len(outer) == 2 and all(o.len <= 1000 for o in outer)
    inner = ScapyIP(reassembled(outer))
    want = Ether(frame[10:])[ScapyIP]
    want.ttl -= 1
    del want.chksum
    assert raw(inner) == raw(ScapyIP(raw(want)))   # intact, DF and all: one hop older


def test_pmtu_disc_0_gso_segments_too_big_are_fragmented_each():
    import random

    from scapy.layers.inet import IP as ScapyIP, TCP as ScapyTCP
    from engine_kit import partial_vnet
    from test_forward_tun import tun_in

    payload = bytes(random.Random(5).randrange(256) for _ in range(2900))
    frame = partial_vnet(tun_in(flags="PA", payload=payload, ip_flags="DF", seq=7000),
                         gso_type=tables.VNET_GSO_TCPV4, gso_size=1448)
    got = [tunnel_run(impl, 0, frame) for impl in IMPLS]
    assert got[0] == got[1]
    verdict, emitted, moved = got[0]
    # Segments of 1448 + 40 + 20 bytes: two fragments each on a 1000 link;
    # the last segment (4 bytes) fits whole.
    assert verdict == tables.V_EMIT and moved["frag_out"] == 4
    outer = outer_packets(emitted)
    ids = sorted({o.id for o in outer}, key=[o.id for o in outer].index)
    assert len(ids) == 3
    data = b""
    for pid in ids:
        seg = ScapyIP(reassembled([o for o in outer if o.id == pid]))
        assert seg[ScapyTCP].seq == 7000 + len(data) and seg.flags.DF
        data += bytes(seg[ScapyTCP].payload)
    assert data == payload
