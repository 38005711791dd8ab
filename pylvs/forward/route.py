"""VS-DR, direct routing or "gatewaying" (ipvsadm ``-g``, its default;
listed as Route).

What the director rewrites: nothing in the IP packet but the TTL (decremented,
header checksum updated, as for every forwarded packet). The Ethernet frame
is addressed to the real server's MAC, from the director's MAC on the egress
interface, and leaves on the interface where the real server's network is
directly connected (ip_vs_xmit.c ip_vs_dr_xmit; the kernel's route to the
RIP must have the RIP itself as next hop).

What the real server must do: be on a network directly connected to the
director (same L2 segment); hold the VIP on an interface that does not
answer ARP for it (usually ``lo`` as a /32) with arp_ignore=1 and
arp_announce=2 (the "ARP problem": otherwise clients reach it directly),
and accept the packet to the VIP (rp_filter relaxed where needed). It
replies straight to the client with the VIP as source: the director sees
only the client's side, so conns follow the INPUT_ONLY state table and get
no OUT key, and the port cannot change (ipvsadm forces the service's port).

A DR dest whose route is not a directly connected network is accepted, as
IPVS accepts it; the balancer logs it once and flags its row
tables.DEST_F_NO_ROUTE so the engine drops and counts its frames.

Reference rewrite: belongs in this module, after DESCRIPTOR, with the
engine's per-method split.
"""

from __future__ import annotations

from ..engine import states, tables
from .method import Method

DESCRIPTOR = Method(
    fwd=tables.FWD_ROUTE,
    flag="-g",
    long_options=("gatewaying",),
    name="Route",
    key="route",
    aliases=("gatewaying", "dr", "droute", "g"),
    replies_via_director=False,
    in_direction=states.INPUT_ONLY,
    uses_output=False,
    needs_connected_network=True,
    port_remap_allowed=False,
    overhead=(),
)
