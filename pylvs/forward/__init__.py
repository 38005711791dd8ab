"""The forwarding methods, one module each, by their LVS names.

- masq.py: VS-NAT (ipvsadm -m, listed Masq): replies return through the director;
- route.py: VS-DR (-g, ipvsadm's default, listed Route): the frame goes
  to the real server's MAC, replies go straight to the client;
- tunnel.py: VS-Tun (-i, listed Tunnel): IPIP or GUE to the real server,
  replies go straight to the client.

Each module states what the method rewrites and what the real server must
do, and holds its DESCRIPTOR (a ``Method``). ``METHODS`` maps the kernel's
fwd numbers (tables.FWD_*) to them; the balancer, the listings, ``pylvs
adm``, the socket filter and the steering rules read this table and no
other.
"""

from __future__ import annotations

from typing import Any

from . import masq, route, tunnel
from .method import Method

METHODS: dict[int, Method] = {m.fwd: m for m in (masq.DESCRIPTOR, route.DESCRIPTOR,
                                                  tunnel.DESCRIPTOR)}
DEFAULT = route.DESCRIPTOR  # ipvsadm's default when no method is given

_BY_FLAG = {m.flag: m for m in METHODS.values()}
_BY_NAME = {n: m for m in METHODS.values() for n in (m.key, *m.aliases)}

# fwd numbers whose replies come back through the director (OUT keys,
# reply steering, the socket filter's real-server keys).
REPLY_FWDS = tuple(m.fwd for m in METHODS.values() if m.replies_via_director)


def by_fwd(fwd: int) -> Method:
    """The method of a kernel fwd number; KeyError if pylvs has none."""
    return METHODS[fwd]


def by_flag(flag: str) -> Method:
    """The method of ipvsadm's switch: "-m", "-g", "-i" or a long option
    ("--masquerading", "--gatewaying", "--ipip"); KeyError otherwise."""
    m = _BY_FLAG.get(flag)
    if m is None and flag.startswith("--"):
        m = next((x for x in METHODS.values() if flag[2:] in x.long_options), None)
    if m is None:
        raise KeyError(flag)
    return m


def by_name(name: str) -> Method:
    """The method of a name, case-insensitive: its key (masq, route,
    tunnel), an alias (nat, dr, ipip, ...) or its listing name; KeyError
    otherwise."""
    m = _BY_NAME.get(name.strip().lower())
    if m is None:
        raise KeyError(name)
    return m


def lookup(value: Any) -> Method:
    """A method from a fwd number or a name (JSON operations carry either);
    KeyError or TypeError for anything else."""
    if isinstance(value, str):
        return by_name(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return by_fwd(value)
    raise TypeError(f"not a forwarding method: {value!r}")
