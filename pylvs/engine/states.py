"""The IPVS TCP state machine and connection timeouts, as tables.

Defined once here and handed to the C engine as arrays (Katran's rule: the
control side builds tables, the data path only indexes them). The layout
follows the kernel's ip_vs_proto_tcp.c: a transition is looked up as
``TRANSITIONS[direction, event, state]``.

Direction: INPUT (client -> real server through the director), OUTPUT (real
server -> client, NAT only) and INPUT_ONLY (DR/TUN, where replies bypass the
director). Event: the highest-priority TCP flag of the segment,
rst > syn > fin > ack; a segment with none of them does not change state.
"""

from __future__ import annotations

import numpy as np

# Order and numbering as the kernel's IP_VS_TCP_S_*: the numbers travel in
# the sync protocol, so they must not change.
STATE_NAMES = (
    "NONE",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "SYNACK",
)
(
    NONE,
    ESTABLISHED,
    SYN_SENT,
    SYN_RECV,
    FIN_WAIT,
    TIME_WAIT,
    CLOSE,
    CLOSE_WAIT,
    LAST_ACK,
    LISTEN,
    SYNACK,
) = range(len(STATE_NAMES))
N_TCP_STATES = len(STATE_NAMES)

# UDP conns have one state; it takes the slot after the TCP states in the
# timeout array so that one array serves both protocols.
UDP_STATE = N_TCP_STATES
N_TIMEOUTS = N_TCP_STATES + 1

INPUT, OUTPUT, INPUT_ONLY = 0, 1, 2
EV_SYN, EV_FIN, EV_ACK, EV_RST = 0, 1, 2, 3

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10


def tcp_event(flags: int) -> int:
    """The event a TCP segment's flags raise, or -1 for none (rst > syn > fin > ack)."""
    if flags & TCP_RST:
        return EV_RST
    if flags & TCP_SYN:
        return EV_SYN
    if flags & TCP_FIN:
        return EV_FIN
    if flags & TCP_ACK:
        return EV_ACK
    return -1


def _rows(text: str) -> list[list[int]]:
    names = {
        "sNO": NONE, "sES": ESTABLISHED, "sSS": SYN_SENT, "sSR": SYN_RECV,
        "sFW": FIN_WAIT, "sTW": TIME_WAIT, "sCL": CLOSE, "sCW": CLOSE_WAIT,
        "sLA": LAST_ACK, "sLI": LISTEN, "sSA": SYNACK,
    }
    return [[names[w] for w in line.split()] for line in text.strip().splitlines()]


# Columns: the current state, in STATE_NAMES order. Rows: syn, fin, ack, rst.
_INPUT = _rows("""
sSR sES sES sSR sSR sSR sSR sSR sSR sSR sSR
sCL sCW sSS sTW sTW sTW sCL sCW sLA sLI sTW
sES sES sSS sES sFW sTW sCL sCW sCL sLI sES
sCL sCL sCL sSR sCL sCL sCL sCL sLA sLI sSR
""")
_OUTPUT = _rows("""
sSS sES sSS sSR sSS sSS sSS sSS sSS sLI sSR
sTW sFW sSS sTW sFW sTW sCL sTW sLA sLI sTW
sES sES sSS sES sFW sTW sCL sCW sLA sES sES
sCL sCL sSS sCL sCL sTW sCL sCL sCL sCL sCL
""")
_INPUT_ONLY = _rows("""
sSR sES sES sSR sSR sSR sSR sSR sSR sSR sSR
sCL sFW sSS sTW sFW sTW sCL sCW sLA sLI sTW
sES sES sSS sES sFW sTW sCL sCW sCL sLI sES
sCL sCL sCL sSR sCL sCL sCL sCL sLA sLI sCL
""")

TRANSITIONS = np.array([_INPUT, _OUTPUT, _INPUT_ONLY], dtype=np.uint8)
TRANSITIONS.flags.writeable = False

# The kernel's tcp_states_dos, in force while secure_tcp is 2 or 3
# (tcp_timeout_change): a client's ACK no longer completes a handshake
# the real server has not answered (SYN_RECV + ack stays SYN_RECV on
# INPUT), the server's SYN+ACK moves SYN_RECV to SYNACK, and a DR/Tun
# conn's first SYN starts in SYNACK. Only the table changes, not the
# timeouts. docs/engine.md, "Defence".
_INPUT_DOS = _rows("""
sSR sES sES sSR sSR sSR sSR sSR sSR sSR sSA
sCL sCW sSS sTW sTW sTW sCL sCW sLA sLI sSA
sES sES sSS sSR sFW sTW sCL sCW sCL sLI sSA
sCL sCL sCL sSR sCL sCL sCL sCL sLA sLI sCL
""")
_OUTPUT_DOS = _rows("""
sSS sES sSS sSA sSS sSS sSS sSS sSS sLI sSA
sTW sFW sSS sTW sFW sTW sCL sTW sLA sLI sTW
sES sES sSS sES sFW sTW sCL sCW sLA sES sES
sCL sCL sSS sCL sCL sTW sCL sCL sCL sCL sCL
""")
_INPUT_ONLY_DOS = _rows("""
sSA sES sES sSR sSA sSA sSA sSA sSA sSA sSA
sCL sFW sSS sTW sFW sTW sCL sCW sLA sLI sTW
sES sES sSS sES sFW sTW sCL sCW sCL sLI sES
sCL sCL sCL sSR sCL sCL sCL sCL sLA sLI sCL
""")

TRANSITIONS_DOS = np.array([_INPUT_DOS, _OUTPUT_DOS, _INPUT_ONLY_DOS], dtype=np.uint8)
TRANSITIONS_DOS.flags.writeable = False

# Seconds, as the kernel's tcp_timeouts and udp_timeouts.
DEFAULT_TIMEOUTS = {
    "NONE": 2,
    "ESTABLISHED": 15 * 60,
    "SYN_SENT": 2 * 60,
    "SYN_RECV": 1 * 60,
    "FIN_WAIT": 2 * 60,
    "TIME_WAIT": 2 * 60,
    "CLOSE": 10,
    "CLOSE_WAIT": 60,
    "LAST_ACK": 30,
    "LISTEN": 2 * 60,
    "SYNACK": 2 * 60,
    "UDP": 5 * 60,
}


def timeout_array(tcp: float = 0, tcpfin: float = 0, udp: float = 0) -> np.ndarray:
    """Timeouts indexed by state (UDP last), with ipvsadm --set's three knobs.

    As ``ipvsadm --set tcp tcpfin udp``: tcp sets ESTABLISHED, tcpfin sets
    FIN_WAIT, udp sets UDP; 0 leaves a value at its default.
    """
    t = np.array(
        [DEFAULT_TIMEOUTS[n] for n in STATE_NAMES] + [DEFAULT_TIMEOUTS["UDP"]],
        dtype=np.float64,
    )
    if tcp:
        t[ESTABLISHED] = tcp
    if tcpfin:
        t[FIN_WAIT] = tcpfin
    if udp:
        t[UDP_STATE] = udp
    return t


def next_state(direction: int, flags: int, state: int) -> int:
    ev = tcp_event(flags)
    if ev < 0:
        return state
    return int(TRANSITIONS[direction, ev, state])
