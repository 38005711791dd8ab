"""VS-NAT, "masquerading" (ipvsadm ``-m``, listed as Masq).

What the director rewrites: on the way in, the destination address and port
of the client's packet become the real server's (RIP:port; the port may
differ from the service's); on the way back, the real server's reply has
its source rewritten to the VIP and service port. IP and L4 checksums are
updated for both (ip_vs_xmit.c ip_vs_nat_xmit, ip_vs_core.c handle_response).

What the real server must do: send its replies back through the director,
usually by having the director's address (DIP) as its default gateway, or
at least as the route to the clients. It needs no VIP and no special ARP
settings; the clients must not share its L2 segment, or its replies would
bypass the director and arrive with the wrong source address.

Because replies return through the director, each conn is also keyed by
its real-server side (the OUT key), the state table sees both directions
(INPUT and OUTPUT), and the director steals the replies from the kernel
(nftables steering, the socket filter).

Reference rewrite: today the NAT rewrite is part of the reference engine's
frame path (pylvs/engine/reference.py); with the engine's per-method split
it belongs in this module, after DESCRIPTOR.
"""

from __future__ import annotations

from ..engine import states, tables
from .method import Method

DESCRIPTOR = Method(
    fwd=tables.FWD_MASQ,
    flag="-m",
    long_options=("masquerading",),
    name="Masq",
    key="masq",
    aliases=("masquerading", "nat", "m"),
    replies_via_director=True,
    in_direction=states.INPUT,
    uses_output=True,
    needs_connected_network=False,
    port_remap_allowed=True,
    overhead=(),
)
