"""VS-Tun, IP tunnelling (ipvsadm ``-i``, listed as Tunnel).

What the director rewrites: nothing inside the client's packet but the TTL
(decremented, header checksum updated); it puts a new outer IPv4 header in
front (ip_vs_xmit.c ip_vs_tunnel_xmit): source = the director's address on
the egress interface the route to the RIP picks, destination = the RIP,
protocol 4 (IPIP), TOS and DF copied from the inner header, TTL = the inner
TTL after the decrement, a fresh IP ID. With ``--tun-type gue --tun-port P``
the outer header carries UDP (source port from the flow's hash, destination
P) and a 4-byte GUE header before the inner packet; ``--tun-csum`` asks for
the outer UDP checksum, ``--tun-nocsum`` (the default) sends it as zero,
``--tun-remcsum`` asks for remote checksum offload. The packet grows by the
overhead below, so the MTU left for the inner packet is the route's MTU
less that (a DF packet that does not fit is answered with frag-needed).

What the real server must do: decapsulate (the ipip module, or fou/GUE on
the tunnel port; or ``pylvs realserver run`` where neither exists), hold
the VIP on a non-ARPing interface (arp_ignore=1, arp_announce=2) with
rp_filter relaxed on the tunnel interface, and accept the inner packet
addressed to the VIP. It replies straight to the client from the VIP: as
for DR, conns follow the INPUT_ONLY state table and get no OUT key, and the
port cannot change (ipvsadm forces the service's port). The real server
may sit on any routed network the director reaches.

Tunnel types, flags and the options each type takes are ipvsadm 1.31's
(and the kernel's IP_VS_CONN_F_TUNNEL_TYPE_* / IP_VS_TUNNEL_ENCAP_FLAG_*
values, stored as such in a dest row's tun_type and tun_flags).

Reference rewrite: belongs in this module, after DESCRIPTOR, with the
engine's per-method split.
"""

from __future__ import annotations

from typing import Iterable

from ..engine import states, tables
from .method import Method

# Tunnel types: the kernel's IP_VS_CONN_F_TUNNEL_TYPE_* numbers.
TUN_IPIP, TUN_GUE, TUN_GRE = 0, 1, 2
TUN_TYPE_NAMES = ("ipip", "gue", "gre")
TUN_TYPES = {name: i for i, name in enumerate(TUN_TYPE_NAMES)}
# Types this director can send. GRE is accepted by ipvsadm's rules but the
# engine has no GRE encapsulation yet: the Balancer refuses it.
ENGINE_TUN_TYPES = frozenset({TUN_IPIP, TUN_GUE})

# Encapsulation flags: IP_VS_TUNNEL_ENCAP_FLAG_* (NOCSUM is no bit at all).
# ipvsadm accepts one of the three options, so a dest holds one value.
TUN_F_NOCSUM, TUN_F_CSUM, TUN_F_REMCSUM = 0, 1, 2
TUN_FLAG_OPTIONS = ("tun-nocsum", "tun-csum", "tun-remcsum")  # by flag value

# Outer headers: IPv4 20; GUE adds UDP 8 and its 4-byte header.
IPIP_OVERHEAD = 20
GUE_OVERHEAD = 20 + 8 + 4

# ipvsadm's tunnel_types_v_options: per type, the rule for each of
# TUN_RULE_OPTIONS ('+' required, 'x' illegal, '1' at most one of the '1's).
TUN_RULE_OPTIONS = ("tun-port", "tun-nocsum", "tun-csum", "tun-remcsum")
TUN_RULES = {TUN_IPIP: "xxxx", TUN_GUE: "+111", TUN_GRE: "x11x"}

DESCRIPTOR = Method(
    fwd=tables.FWD_TUNNEL,
    flag="-i",
    long_options=("ipip",),
    name="Tunnel",
    key="tunnel",
    aliases=("ipip", "tun", "i"),
    replies_via_director=False,
    in_direction=states.INPUT_ONLY,
    uses_output=False,
    needs_connected_network=False,
    port_remap_allowed=False,
    overhead=(IPIP_OVERHEAD, GUE_OVERHEAD),  # by tun type: ipip, gue
)


def option_error(tun_type: int, given: Iterable[str]) -> str | None:
    """ipvsadm's message for a tunnel option ``given`` (names as in
    TUN_RULE_OPTIONS; others are ignored) that ``tun_type`` refuses or
    requires, or None when the combination is legal. Options are checked
    in TUN_RULE_OPTIONS order, as ipvsadm's tunnel_opt_check does."""
    given = set(given)
    rules = TUN_RULES[tun_type]
    type_name = TUN_TYPE_NAMES[tun_type]
    first: str | None = None
    for opt, rule in zip(TUN_RULE_OPTIONS, rules):
        if opt not in given:
            if rule == "+":
                return f"You need to supply the '{opt}' option for the '{type_name}' tunnel type"
            continue
        if rule == "x":
            return f"Illegal '{opt}' option with the '{type_name}' tunnel type"
        if rule == "1":
            if first is not None:
                return (f"The option '{opt}' conflicts with the '{first}' option "
                        f"in the '{type_name}' tunnel type")
            first = opt
    return None
