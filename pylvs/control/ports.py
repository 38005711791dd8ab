"""What the engine must know about this namespace's network: ports, routes, local addresses.

The engine refuses what the kernel's receive path would refuse (issue 5,
item 8) and answers frames too big for their egress link (item 4b); for that
it needs, per attached port, the director's primary IPv4 address, the MTU,
the MAC and the effective ``rp_filter``; the namespace's routes (for the
reverse-path check, kernel fib_validate_source) and the set of the
director's own addresses (martian sources, ip_route_input_slow).

``NetWatcher`` reads them from the kernel in its own thread (pyroute2 never
runs on the uvloop event loop) and calls ``on_change(NetState)`` from that
thread whenever they differ from the last state it reported.

It polls, every ``interval`` seconds (1 s by default), rather than listening
to netlink notifications: ``rp_filter`` is a sysctl file, not a netlink
object; a notification socket that overflows (ENOBUFS) loses events and
needs a full re-read anyway; and on a director (a few interfaces, a few
routes) the three dumps cost about a millisecond. The price is that a change
reaches the engine up to a second late. A namespace with a very large
routing table (a full BGP feed) would want a netlink monitor instead.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np

from ..engine.tables import (NO_PORT, PORT_DTYPE, PORT_F_CHECK_MAC, PORT_F_LOCAL, PORT_F_USED,
                             ROUTE_DTYPE, ROUTE_F_MAC)
from .neighbors import NUD_VALID, poke

log = logging.getLogger("pylvs.ports")

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3
IFA_F_SECONDARY = 0x01
SYSCTL_CONF = "/proc/sys/net/ipv4/conf"
# On-link hosts the kernel holds a neighbour entry for become /32 routes with
# their MAC (a synced NAT conn's reply to an on-link client it has not
# heard); at most this many, since a new flow's reverse-path check walks
# the routes.
MAX_HOST_ROUTES = 256


@dataclass(frozen=True)
class NetState:
    """``ports``: PORT_DTYPE, one row per backend port (index = port number).
    ``routes``: ROUTE_DTYPE, longest prefix first. ``local``: uint32, sorted,
    every IPv4 address of the namespace and every broadcast address of the
    local routing table (host order): the sources the kernel refuses as
    martian (fib_validate_source)."""

    ports: np.ndarray
    routes: np.ndarray
    local: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NetState):
            return NotImplemented
        return all(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
                   for a, b in ((self.ports, other.ports), (self.routes, other.routes),
                                (self.local, other.local)))

    __hash__ = None  # type: ignore[assignment]


# --- building the tables (pure: the tests feed them directly) -------------------


def port_table(ports, links: dict[int, tuple[int, bytes]], primary: dict[int, int],
               rp_filter: dict[str, int]) -> np.ndarray:
    """PORT_DTYPE rows for the backend's ``ports`` (objects with index, name,
    ifindex). ``links``: ifindex -> (mtu, mac); ``primary``: ifindex -> primary
    address; ``rp_filter``: name -> effective value. A port whose interface is
    gone gets an unused row (flags 0: the engine checks nothing on it)."""
    out = np.zeros(len(ports), dtype=PORT_DTYPE)
    for p in ports:
        link = links.get(p.ifindex)
        if link is None:
            continue
        mtu, mac = link
        row = out[p.index]
        row["addr"] = primary.get(p.ifindex, 0)
        row["mtu"] = mtu
        row["flags"] = PORT_F_USED
        if getattr(p, "local", False):
            # Loopback (pylvs/io/local.py): no MAC to check, and its
            # clients' local sources pass no reverse-path test.
            row["flags"] |= PORT_F_LOCAL
            continue
        if len(mac) == 6:
            row["mac"] = np.frombuffer(mac, dtype=np.uint8)
            row["flags"] |= PORT_F_CHECK_MAC
        row["rp_filter"] = min(max(rp_filter.get(p.name, 0), 0), 2)
    return out


def route_table(routes: Iterable[tuple], port_of: dict[int, int],
                neighbours: Optional[dict[tuple[int, int], bytes]] = None,
                max_hosts: int = MAX_HOST_ROUTES) -> np.ndarray:
    """ROUTE_DTYPE rows, sorted so that the first match is the kernel's choice.

    ``routes``: (prefix, plen, type, oif or None, metric[, gateway]) of the
    main table (gateway: host-order int, None or absent for a directly
    connected network). A unicast route through an attached interface gets
    its port; any other (an interface pylvs does not attach, blackhole,
    unreachable, prohibit, a route without a single oif) gets NO_PORT, which
    fails the reverse-path check as the kernel's fib_validate_source fails
    it (it wants a unicast route back through the receiving interface).
    Longest prefix first; for one prefix, lowest metric first (the route the
    kernel uses).

    ``neighbours``: (oif, address) -> MAC of the kernel's usable neighbour
    entries. A gateway route whose gateway has one carries that MAC
    (ROUTE_F_MAC); an address with one whose route is a directly connected
    network through the same oif gets a /32 row with its MAC (at most
    ``max_hosts``, lowest addresses first): what the engine needs to send a
    synced NAT conn's reply toward a client it has not heard (docs/engine.md,
    "Sync")."""
    neighbours = neighbours or {}
    rows = []
    for prefix, plen, rtype, oif, metric, *gw in routes:
        gateway = gw[0] if gw else None
        port = port_of.get(oif, NO_PORT) if rtype == RTN_UNICAST and oif is not None else NO_PORT
        mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0
        mac = neighbours.get((oif, gateway)) if gateway is not None and port != NO_PORT else None
        rows.append((-plen, prefix & mask, metric, port, plen, oif, gateway, mac))
    rows.sort(key=lambda r: r[:5])
    hosts = []
    for (oif, addr), mac in sorted(neighbours.items(), key=lambda kv: kv[0][1]):
        if len(hosts) >= max_hosts:
            break
        best = next((r for r in rows if addr & ((0xFFFFFFFF << (32 - r[4])) & 0xFFFFFFFF
                                                if r[4] else 0) == r[1]), None)
        if best is not None and best[4] < 32 and best[3] != NO_PORT and best[5] == oif \
                and best[6] is None:
            hosts.append((-32, addr, best[2], best[3], 32, oif, None, mac))
    rows = sorted(hosts + rows, key=lambda r: r[:5])
    out = np.zeros(len(rows), dtype=ROUTE_DTYPE)
    for i, (_, prefix, _, port, plen, _, _, mac) in enumerate(rows):
        out[i]["prefix"], out[i]["plen"], out[i]["port"] = prefix, plen, port
        if mac is not None and len(mac) == 6:
            out[i]["mac"] = np.frombuffer(mac, dtype=np.uint8)
            out[i]["flags"] = ROUTE_F_MAC
    return out


def effective_rp_filter(all_value: int, iface_value: int) -> int:
    """The kernel uses the larger of conf/all and conf/<iface> (IN_DEV_RPFILTER
    is IN_DEV_MAXCONF)."""
    return max(all_value, iface_value)


# --- reading the kernel ---------------------------------------------------------


def _ip(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def read_sysctl(name: str, iface: str, root: str = SYSCTL_CONF) -> int:
    """/proc/sys/net/ipv4/conf/<iface>/<name> of the caller's namespace."""
    with open(f"{root}/{iface}/{name}") as f:
        return int(f.read().strip())


def read_state(ipr, ports, root: str = SYSCTL_CONF) -> NetState:
    """One NetState from netlink (``ipr``: a pyroute2 IPRoute) and /proc/sys."""
    links = {}
    for msg in ipr.get_links():
        mac = msg.get_attr("IFLA_ADDRESS") or ""
        links[msg["index"]] = (int(msg.get_attr("IFLA_MTU") or 0),
                               bytes.fromhex(mac.replace(":", "")))
    primary: dict[int, int] = {}
    local = set()
    for msg in ipr.get_addr(family=socket.AF_INET):
        addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if addr is None:
            continue
        local.add(_ip(addr))
        if not msg["flags"] & IFA_F_SECONDARY:
            primary.setdefault(msg["index"], _ip(addr))
    all_rp = read_sysctl("rp_filter", "all", root)
    rp = {p.name: effective_rp_filter(all_rp, read_sysctl("rp_filter", p.name, root))
          for p in ports if p.ifindex in links}
    routes = []
    for msg in ipr.get_routes(family=socket.AF_INET):
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if table == RT_TABLE_LOCAL and msg["type"] in (RTN_LOCAL, RTN_BROADCAST):
            # fib_validate_source refuses a source whose route is not unicast:
            # our own addresses and the broadcasts the kernel adds for each
            # subnet (fib_add_ifaddr) alike.
            dst = msg.get_attr("RTA_DST")
            if dst and msg["dst_len"] == 32:
                local.add(_ip(dst))
            continue
        if table != RT_TABLE_MAIN:
            continue
        dst = msg.get_attr("RTA_DST")
        oif = msg.get_attr("RTA_OIF")
        if oif is None:
            # Multipath: the first nexthop through an attached port stands for
            # the route (the engine keeps one port per route).
            hops = [h.get("oif") for h in (msg.get_attr("RTA_MULTIPATH") or [])]
            oif = next((h for h in hops if h in {p.ifindex for p in ports}), None)
        gw = msg.get_attr("RTA_GATEWAY")
        routes.append((_ip(dst) if dst else 0, msg["dst_len"], msg["type"], oif,
                       msg.get_attr("RTA_PRIORITY") or 0, _ip(gw) if gw else None))
    port_of = {p.ifindex: p.index for p in ports}
    return NetState(
        ports=port_table(ports, links, primary, rp),
        routes=route_table(routes, port_of, read_neighbours(ipr, routes, port_of)),
        local=np.array(sorted(local), dtype=np.uint32),
    )


def read_neighbours(ipr, routes, port_of: dict[int, int]) -> dict[tuple[int, int], bytes]:
    """(oif, address) -> MAC of the usable IPv4 neighbour entries on attached
    interfaces. A gateway of a route through one that has none is used with
    NTF_USE, so the kernel ARPs for it (as its first transmit there would)
    and the next read finds it."""
    found: dict[tuple[int, int], bytes] = {}
    for n in ipr.get_neighbours(family=socket.AF_INET):
        dst, mac = n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR")
        if n["ifindex"] in port_of and dst and mac and n["state"] & NUD_VALID:
            found[(n["ifindex"], _ip(dst))] = bytes.fromhex(mac.replace(":", ""))
    for _, _, rtype, oif, _, gw in routes:
        if rtype == RTN_UNICAST and gw is not None and oif in port_of and (oif, gw) not in found:
            poke(ipr, oif, str(ipaddress.IPv4Address(gw)))
    return found


class NetWatcher:
    """Polls the namespace every ``interval`` s in its own thread; calls
    ``on_change(state)`` (from that thread) with each new NetState, the
    first one included. ``state`` is the last one read (None before)."""

    def __init__(self, ports, *, interval: float = 1.0,
                 on_change: Optional[Callable[[NetState], None]] = None,
                 sysctl_root: str = SYSCTL_CONF):
        self.ports = list(ports)
        self.interval = interval
        self.on_change = on_change
        self.root = sysctl_root
        self.state: NetState | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="pylvs-net", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    def poll(self, ipr) -> NetState | None:
        """Read once; report and return the state if it changed."""
        try:
            state = read_state(ipr, self.ports, self.root)
        except Exception as e:  # a netlink or /proc hiccup must not kill the thread
            self.errors += 1
            log.warning("reading ports and routes failed: %s", e)
            return None
        if state == self.state:
            return None
        old, self.state = self.state, state
        # Neighbour entries (next-hop MACs, /32 rows) come and go with the
        # kernel's garbage collection: only other changes are worth a line.
        quiet = old is not None and (old.ports.tobytes() == state.ports.tobytes()
                                     and old.local.tobytes() == state.local.tobytes()
                                     and _kernel_routes(old) == _kernel_routes(state))
        (log.debug if quiet else log.info)(
            "ports: %s; %d route(s), %d local address(es)", describe_ports(self.ports, state.ports),
            len(state.routes), len(state.local))
        cb = self.on_change
        if cb is not None:
            try:
                cb(state)
            except Exception:
                log.exception("on_change callback failed")
        return state

    def _run(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            while not self._stop.is_set():
                self.poll(ipr)
                self._stop.wait(self.interval)


def _kernel_routes(state: NetState) -> list[tuple[int, int, int]]:
    """The routes without what neighbour entries add (MACs, host rows)."""
    r = state.routes
    keep = ~((r["plen"] == 32) & ((r["flags"] & ROUTE_F_MAC) != 0))
    return list(zip(r["prefix"][keep].tolist(), r["plen"][keep].tolist(), r["port"][keep].tolist()))


def describe_ports(ports, rows: np.ndarray) -> str:
    out = []
    for p in ports:
        r = rows[p.index]
        if not r["flags"] & PORT_F_USED:
            out.append(f"{p.name} gone")
            continue
        out.append(f"{p.name} {ipaddress.IPv4Address(int(r['addr']))} mtu {int(r['mtu'])} "
                   f"rp_filter {int(r['rp_filter'])}")
    return ", ".join(out)
