"""The shape of a forwarding method's descriptor (one per module here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """What the control plane needs to know about one forwarding method.

    - ``fwd``: the kernel's number (IP_VS_CONN_F_FWD_MASK values,
      tables.FWD_*), stored in dest rows and conns;
    - ``flag``: ipvsadm's short option (``-m``, ``-g``, ``-i``), also what
      ``-S`` prints;
    - ``long_options``: the long options ipvsadm accepts for it, without
      the leading dashes;
    - ``name``: the Forward column of ``ipvsadm -L`` (Masq, Route, Tunnel);
    - ``key``: pylvs's lower-case name (snapshots, JSON operations);
    - ``aliases``: other names the Balancer accepts for it (``nat``, ``dr``);
    - ``replies_via_director``: replies come back through the director, so
      a conn needs an OUT key, and the replies need steering (nftables) and
      the socket filter (BPF); True only for masquerading;
    - ``in_direction``: the state table a client's packets follow
      (states.INPUT or states.INPUT_ONLY); ``uses_output``: the real
      server's replies follow states.OUTPUT;
    - ``needs_connected_network``: the real server must be on a network
      directly connected to the director (the frame only changes MACs);
    - ``port_remap_allowed``: a dest may listen on another port than the
      service's (ipvsadm forces the service's port for -g and -i);
    - ``overhead``: bytes the method adds in front of the packet, indexed
      by tunnel type for tunnels; empty when it adds nothing.
    """

    fwd: int
    flag: str
    long_options: tuple[str, ...]
    name: str
    key: str
    aliases: tuple[str, ...]
    replies_via_director: bool
    in_direction: int
    uses_output: bool
    needs_connected_network: bool
    port_remap_allowed: bool
    overhead: tuple[int, ...]

    def header_overhead(self, tun_type: int = 0) -> int:
        """Bytes added in front of the forwarded IP packet (0 for none);
        ValueError for a tunnel type the method has no encapsulation for."""
        if not self.overhead:
            return 0
        if 0 <= tun_type < len(self.overhead):
            return self.overhead[tun_type]
        raise ValueError(f"{self.key}: no encapsulation for tunnel type {tun_type}")
