"""Steering: keep the kernel away from the frames the director steals.

The AF_PACKET taps see a frame before tc ingress and nft netdev ingress, so
dropping it at ingress leaves pylvs the only one handling it: the kernel
neither forwards it, nor answers it with RST or ICMP. Two implementations
apply the same rules to the same sets:

- ``BpfSteering`` (the default): the BPF program pylvs/bpf/steer.bpf.c at
  tc ingress (tcx) of every interface, attached through BPF links that only
  the director's process holds (never pinned). When the director dies, even
  by ``kill -9``, the kernel closes its descriptors and detaches the
  program: the VIP traffic is the kernel's again (a connect gets a RST, or
  is served by a local listener) instead of being dropped until the next
  start. The sets are BPF hash maps, updated in place on every change
  (no reload, no reattach); ``not_host`` is a per-CPU array counter.
- ``NftSteering``: one table ``netdev pylvs`` per network namespace with an
  ingress chain per interface. The fallback where tcx cannot attach (kernel
  older than 6.6, no CAP_BPF). A director killed outright leaves this table
  behind, black-holing the VIPs until the next start, which replaces it
  (a BPF start removes it).

``open_steering`` picks one (``pylvs run --steering``). The sets:

- ``services``: (vaddr . proto . vport) of virtual services: client -> VIP
  traffic is dropped.
- ``realservers``: (daddr . proto . dport) of VS-NAT dests: real server
  replies are dropped unless addressed to one of the director's own
  addresses (``local``), so its own connections to real servers (health
  checks, ssh) still work.
- ``rsaddrs``: the VS-NAT dests' addresses: ICMP errors (destination
  unreachable, source quench, time exceeded) from a real server to anyone
  but the director are dropped too. The engine translates those that quote
  a NAT conn (ip_vs_out_icmp); the kernel must not also forward them with
  the real server's address in them. (An error from a real server about a
  flow the director does not track is lost, as an unknown TCP/UDP reply
  from a real server's service port is.)
- ``vips``: the services' addresses. ICMP errors to a VIP are NOT dropped:
  the engine gets a copy from the tap and forwards those that quote a NAT
  conn to the real server (ip_vs_in_icmp); the kernel's copy reaches the
  VIP, a local address, where no socket matches the quoted flow (the
  conn lives in pylvs, not in a kernel socket), so the kernel only counts
  it. Dropping it would lose errors about the director's own traffic.
- ``local``: the director's addresses. ICMP errors to them are never
  dropped: with a VS-Tun dest the socket filter also hands the engine a
  copy of those about the director's tunnel packets (a router on the path
  reporting a smaller MTU), which it learns from; the kernel's copy still
  updates the director's own route to the real server, as with IPVS.

Frames to a service, from a real server, or ICMP errors as above whose
packet type is not "host" (another host's MAC, broadcast, multicast: IPVS
ignores them, ip_vs_in_hook) are refused by the socket filter
(pylvs/io/bpf.py) and counted here, in ``not_host``, then left to the
kernel, which treats them as it would without IPVS. Non-first fragments
carry no ports and match nothing.

nft changes go through ``nft -f -`` so each is one transaction; BPF map
changes add the new keys first (``local`` first of all) and delete the old
ones after, so no frame of a kept key reaches the kernel meanwhile.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import struct
import subprocess
import threading
from pathlib import Path

from ..io import bpf

log = logging.getLogger("pylvs")

TABLE = "pylvs"
FAMILY = "netdev"
# Before anything else at ingress (tc, other netdev tables).
PRIORITY = -500
SETS = ("services", "realservers", "rsaddrs", "vips", "local")
L4_SETS = ("services", "realservers")   # (proto, addr, port) keys; the others addrs
# nft: the (addr, proto) of their port-0 keys, which match any port.
ANY_SETS = {"services": "services_any", "realservers": "realservers_any"}
PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}   # as nft lists them
PROTO_NUMBERS = {v: k for k, v in PROTO_NAMES.items()}
ICMP_ERRORS = "{ destination-unreachable, source-quench, time-exceeded }"  # bpf.ICMP_ERRORS


MODES = ("bpf", "nft")
BPF_OBJECT = Path(__file__).resolve().parents[1] / "bpf" / "steer.bpf.o"
BPF_PROG = "pylvs_steer"
# Most local addresses the BPF "local" set holds.
MAX_LOCAL = 16384


class SteeringError(RuntimeError):
    pass


def sets_of(services, dests, local_addrs) -> dict[str, list]:
    """The five sets (module docstring) for these tables: "services" and
    "realservers" as sorted (proto, addr, port) keys, the others as sorted
    addrs; addrs are host-order ints."""
    svc = bpf.keys_of(services, "svc")
    rs = bpf.dest_keys(services, dests)
    return {"services": svc, "realservers": rs,
            "rsaddrs": sorted({a for _, a, _ in rs}),
            "vips": sorted({a for _, a, _ in svc}),
            "local": sorted({int(ipaddress.IPv4Address(a)) for a in local_addrs})}


def _addr(a: int) -> str:
    return str(ipaddress.IPv4Address(int(a)))


def _chain(ifname: str) -> str:
    # Interface names may hold characters nft identifiers may not.
    return "in_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def _elements(keys) -> str:
    return ", ".join(f"{_addr(a)} . {p} . {port}" for p, a, port in keys)


class NftSteering:
    """Steering by the nftables table ``netdev pylvs`` (module docstring)."""

    kind = "nft"

    def __init__(self, ifnames: list[str], *, nft: str = "nft"):
        if not ifnames:
            raise ValueError("Steering needs at least one interface")
        for name in ifnames:
            # Names go into the nft script inside quotes.
            if not re.fullmatch(r'[^"\s/\\]{1,15}', name):
                raise SteeringError(f"nftables: unusable interface name {name!r}")
        self.ifnames = list(ifnames)
        self.nft = nft
        self.installed = False

    def _run(self, script: str, what: str) -> str:
        try:
            p = subprocess.run([self.nft, "-f", "-"], input=script, text=True,
                               capture_output=True, timeout=30)
        except FileNotFoundError as e:
            raise SteeringError(f"nftables: '{self.nft}' not found; install nftables") from e
        except subprocess.TimeoutExpired as e:
            raise SteeringError(f"nftables: '{self.nft} -f -' timed out while {what}") from e
        if p.returncode != 0:
            raise SteeringError(f"nftables: {what} failed: {p.stderr.strip()}\n"
                                f"--- script ---\n{script}")
        return p.stdout

    def script(self, services, dests, local_addrs) -> str:
        """The nft script that installs (or replaces) the whole table."""
        lines = [
            # Declaring then deleting makes the delete valid even when no
            # table exists, and replaces a stale one from a crashed run, all
            # in this one transaction.
            f"table {FAMILY} {TABLE}",
            f"delete table {FAMILY} {TABLE}",
            f"table {FAMILY} {TABLE} {{",
            "  set services { type ipv4_addr . inet_proto . inet_service; }",
            "  set realservers { type ipv4_addr . inet_proto . inet_service; }",
            # Their port-0 keys (a port-0 service, its dests given port 0):
            # every port of the address (ANY_SETS).
            "  set services_any { type ipv4_addr . inet_proto; }",
            "  set realservers_any { type ipv4_addr . inet_proto; }",
            "  set rsaddrs { type ipv4_addr; }",
            "  set vips { type ipv4_addr; }",
            "  set local { type ipv4_addr; }",
            "  counter not_host { }",
            # What the socket filter refuses as not PACKET_HOST: counted,
            # then the kernel's as if there were no IPVS.
            "  chain not_host {",
            '    ip daddr . meta l4proto . th dport @services counter name "not_host" accept',
            '    ip saddr . meta l4proto . th sport @realservers counter name "not_host" accept',
            '    ip daddr . meta l4proto @services_any counter name "not_host" accept',
            '    ip saddr . meta l4proto @realservers_any counter name "not_host" accept',
            f'    ip daddr @vips icmp type {ICMP_ERRORS} counter name "not_host" accept',
            f'    ip saddr @rsaddrs icmp type {ICMP_ERRORS} counter name "not_host" accept',
            "  }",
        ]
        for ifname in self.ifnames:
            lines += [
                f"  chain {_chain(ifname)} {{",
                f'    type filter hook ingress device "{ifname}" priority {PRIORITY}; policy accept;',
                "    meta pkttype != host jump not_host",
                "    ip daddr . meta l4proto . th dport @services drop",
                "    ip daddr . meta l4proto @services_any drop",
                "    ip daddr != @local ip saddr . meta l4proto . th sport @realservers drop",
                "    ip daddr != @local ip saddr . meta l4proto @realservers_any drop",
                f"    ip daddr != @local ip saddr @rsaddrs icmp type {ICMP_ERRORS} drop",
                "  }",
            ]
        lines.append("}")
        lines += self._element_lines(services, dests, local_addrs)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _element_lines(services, dests, local_addrs) -> list[str]:
        out = []
        for name, values in sets_of(services, dests, local_addrs).items():
            if not values:
                continue
            text = (_elements(values) if name in L4_SETS else ", ".join(map(_addr, values)))
            out.append(f"add element {FAMILY} {TABLE} {name} {{ {text} }}")
            anyport = sorted({(a, p) for p, a, port in values if port == 0}) \
                if name in L4_SETS else ()
            if anyport:
                text = ", ".join(f"{_addr(a)} . {p}" for a, p in anyport)
                out.append(f"add element {FAMILY} {TABLE} {ANY_SETS[name]} {{ {text} }}")
        return out

    def apply(self, services, dests, local_addrs, taken=None) -> None:
        """Make the sets say exactly this, in one transaction. ``taken``
        (the services pylvs takes frames for now, vipfollow.standby_view)
        does not matter here: the kernel is kept from every service's
        frames, a standby VIP's too (docs/failover.md).

        The first call builds the table (replacing a stale one); later calls
        only flush and refill the sets, so the chains (and their hooks) stay
        in place and no stolen frame slips through to the kernel meanwhile.
        """
        if not self.installed:
            self._run(self.script(services, dests, local_addrs), "installing the steering table")
            self.installed = True
            return
        lines = [f"flush set {FAMILY} {TABLE} {name}" for name in (*SETS, *ANY_SETS.values())]
        lines += self._element_lines(services, dests, local_addrs)
        self._run("\n".join(lines) + "\n", "updating the steering sets")

    def not_host(self) -> int:
        """Frames refused as not PACKET_HOST (see the module docstring), from
        the ``not_host`` counter; 0 before the table is installed."""
        if not self.installed:
            return 0
        p = subprocess.run([self.nft, "-j", "list", "counter", FAMILY, TABLE, "not_host"],
                           text=True, capture_output=True, timeout=30)
        if p.returncode:
            raise SteeringError(f"nftables: reading the not_host counter failed: {p.stderr.strip()}")
        for item in json.loads(p.stdout).get("nftables", []):
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise SteeringError("nftables: no not_host counter in the steering table")

    def remove(self) -> None:
        """Delete the table (quietly if it is already gone)."""
        self._run(f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n",
                  "removing the steering table")
        self.installed = False

    def listing(self) -> str:
        p = subprocess.run([self.nft, "list", "table", FAMILY, TABLE], text=True,
                           capture_output=True, timeout=30)
        if p.returncode:
            raise SteeringError(p.stderr.strip())
        return p.stdout

    def sets(self) -> dict[str, list] | None:
        """The table's sets as ``sets_of`` gives them (read back from nft),
        or None when there is no table."""
        p = subprocess.run([self.nft, "-j", "list", "table", FAMILY, TABLE], text=True,
                           capture_output=True, timeout=30)
        if p.returncode:
            return None
        out: dict[str, list] = {name: [] for name in SETS}
        for item in json.loads(p.stdout).get("nftables", []):
            st = item.get("set")
            if not st or st.get("name") not in out:
                continue
            for e in st.get("elem", []):
                if isinstance(e, dict) and "concat" in e:
                    a, proto, port = e["concat"]
                    num = PROTO_NUMBERS.get(proto) if isinstance(proto, str) else int(proto)
                    if num is None:
                        num = socket.getprotobyname(proto)
                    out[st["name"]].append((num, int(ipaddress.IPv4Address(a)), int(port)))
                else:
                    out[st["name"]].append(int(ipaddress.IPv4Address(e)))
        return {k: sorted(v) for k, v in out.items()}


def _l4_keys(keys) -> bytes:
    # struct l4_key of steer.bpf.c: addr, port (network order), proto, pad.
    return b"".join(struct.pack("!IHBx", a, port, p) for p, a, port in keys)


def _addr_keys(addrs) -> bytes:
    return b"".join(struct.pack("!I", a) for a in addrs)


def _encode(name: str, values) -> bytes:
    return _l4_keys(values) if name in L4_SETS else _addr_keys(values)


def sync_sets(maps: dict, current: dict[str, set], want: dict[str, list]) -> None:
    """Make the BPF hash maps ``maps[name]`` (of steer.bpf.c's key layouts)
    hold ``want[name]`` for every name in both, ``current`` being what they
    hold now (updated as it goes): new keys first, "local" first of all, then
    old keys out, so no kept key is missing meanwhile. OSError from the map
    (E2BIG: full), ``current`` then still true."""
    names = [n for n in ("local", *SETS[:-1]) if n in maps and n in want]
    for name in names:
        add = set(want[name]) - current[name]
        if add:
            maps[name].update(_encode(name, sorted(add)), b"\x01")
        current[name] |= add
    for name in reversed(names):
        drop = current[name] - set(want[name])
        if drop:
            maps[name].delete(_encode(name, sorted(drop)))
        current[name] -= drop


# The sets of steer_key.h's steer_client_mix, which the eBPF fanout
# (pylvs/bpf/fanout.bpf.c) and TAP steering (tap_steer.bpf.c) programs read.
CLIENT_SETS = ("services", "realservers", "vips", "rsaddrs")
# Their one-entry map of the client-address bits steering ignores
# (steer_key.h STEER_MASK: ~bpf.client_mask of the tables).
STEER_MASK = "steer_mask"


def write_mask(maps: dict, services) -> None:
    """Put ~client_mask(services) in the program's STEER_MASK map (OSError
    from the map)."""
    maps[STEER_MASK].update(struct.pack("I", 0),
                            struct.pack("I", ~bpf.client_mask(services) & 0xFFFFFFFF))


def client_set_sizes(max_services: int, max_dests: int) -> dict[str, int]:
    """max_entries of the CLIENT_SETS maps for the director's limits."""
    return {"services": max_services, "vips": max_services, "realservers": max_dests,
            "rsaddrs": max_dests}


class ClientSets:
    """The CLIENT_SETS maps of a loaded program and what they hold, kept
    following the published tables (``follow``), one caller at a time."""

    def __init__(self, maps: dict):
        self.maps = maps
        self._current: dict[str, set] = {name: set() for name in CLIENT_SETS}
        self._tables = None
        self._lock = threading.Lock()

    def follow(self, services, dests) -> None:
        """Make the maps hold these tables' sets (sets_of; sync_sets: new
        keys first, then old ones out); the same tables again: nothing to
        do. OSError (E2BIG) when a set outgrows its map."""
        with self._lock:
            if self._tables is not None and self._tables[0] is services \
                    and self._tables[1] is dests:
                return
            sync_sets(self.maps, self._current, sets_of(services, dests, ()))
            write_mask(self.maps, services)
            self._tables = (services, dests)


def _decode(name: str, raw: bytes) -> list:
    if name in L4_SETS:
        return sorted((p, a, port) for a, port, p in struct.iter_unpack("!IHBx", raw))
    return sorted(a for (a,) in struct.iter_unpack("!I", raw))


def _why(e: Exception) -> str:
    # pylvs._bpf's OSError text already names what failed (and what libbpf
    # said): no "[Errno N]" before it; KeyError's text without its quotes.
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.strip()
    return str(e.args[0] if isinstance(e, KeyError) and e.args else e)


def _ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError as e:
        raise SteeringError(f"steering: no interface {name!r} in this namespace") from e


def load_object(path, sizes: dict[str, int], maps, attach) -> dict:
    """Open and load the compiled BPF object at ``path`` (the named maps
    sized by ``sizes``), open its maps named in ``maps``, call
    ``attach(obj)``, then free the object: what ``attach`` made (links, a
    device's reference) holds the program, and the maps returned (name ->
    _bpf.Map) hold the maps. OSError, KeyError, ValueError from
    pylvs._bpf, the maps opened closed again; OSError too when it is not
    built."""
    try:
        from .. import _bpf
    except ImportError as e:
        raise OSError(f"pylvs._bpf is not built ({e})") from None

    opened: dict = {}
    obj = _bpf.Object(str(path), sizes)
    try:
        for name in maps:
            opened[name] = obj.map(name)
        attach(obj)
    except BaseException:
        for m in opened.values():
            m.close()
        raise
    finally:
        obj.close()
    return opened


class BpfSteering:
    """Steering by the tcx BPF program pylvs/bpf/steer.bpf.c (module
    docstring): loaded and attached at construction, with empty sets (it
    passes everything until the first ``apply``).

    ``max_services`` sizes "services" and "vips", ``max_dests``
    "realservers" and "rsaddrs" (hash maps allocated as they fill);
    ``apply`` raises SteeringError when a set outgrows its map. Raises
    SteeringError when the program cannot be loaded or attached (no tcx
    before kernel 6.6, no CAP_BPF/CAP_NET_ADMIN, pylvs._bpf not built),
    detaching whatever it had attached.
    """

    kind = "bpf"

    def __init__(self, ifnames: list[str], *, max_services: int = 16384,
                 max_dests: int = 131072, obj_path: Path | str = BPF_OBJECT):
        if not ifnames:
            raise ValueError("Steering needs at least one interface")
        self.ifnames = list(ifnames)
        ifindexes = [_ifindex(n) for n in self.ifnames]
        sizes = {"services": max_services, "vips": max_services, "realservers": max_dests,
                 "rsaddrs": max_dests, "local": MAX_LOCAL}
        self.links: list = []
        self.maps: dict = {}

        def attach(obj) -> None:
            for index in ifindexes:
                self.links.append(obj.attach_tcx_ingress(BPF_PROG, index))
        try:
            self.maps = load_object(obj_path, sizes, (*SETS, "counters"), attach)
        except (OSError, KeyError, ValueError) as e:
            self.remove()
            raise SteeringError(f"BPF steering: {_why(e)}") from e
        self._current: dict[str, set] = {name: set() for name in SETS}

    def apply(self, services, dests, local_addrs, taken=None) -> None:
        """Make the maps hold exactly these sets: new keys in first (local
        first of all, so the director's own replies are never taken), then
        old keys out; the program stays attached throughout. ``taken``: as
        NftSteering.apply."""
        if not self.links:
            raise SteeringError("BPF steering: already removed")
        try:
            sync_sets(self.maps, self._current, sets_of(services, dests, local_addrs))
        except OSError as e:
            raise SteeringError(f"BPF steering: {_why(e)}") from e

    def sets(self) -> dict[str, list]:
        """The maps' contents as ``sets_of`` gives them, read from the kernel."""
        return {name: _decode(name, self.maps[name].keys()) for name in SETS}

    def not_host(self) -> int:
        """Frames refused as not PACKET_HOST (module docstring), summed over CPUs."""
        return int(self.maps["counters"].sum_u64(0)) if self.maps else 0

    def remove(self) -> None:
        """Detach from every interface and drop the maps (again: no-op)."""
        for link in self.links:
            link.close()
        for m in self.maps.values():
            m.close()
        self.links, self.maps = [], {}


def attached(ifname: str) -> dict | None:
    """What steers at tcx ingress of ``ifname`` in this namespace, seen from
    any process (root): {"prog_id", "sets"} of a pylvs steering program, or
    None when none is attached. For tests and debugging (bpftool before 7.3
    does not show tcx)."""
    from .. import _bpf

    for prog_id in _bpf.tcx_query(_ifindex(ifname)):
        info = _bpf.prog_info(prog_id)
        if info["name"] != BPF_PROG:
            continue
        maps = [_bpf.map_from_id(i) for i in info["map_ids"]]
        try:
            return {"prog_id": prog_id,
                    "sets": {m.name: _decode(m.name, m.keys()) for m in maps if m.name in SETS}}
        finally:
            for m in maps:
                m.close()
    return None




def _readable(name: str, values: list) -> list[str]:
    if name not in L4_SETS:
        return [_addr(a) for a in values]
    return [f"{_addr(a)} . {PROTO_NAMES.get(p, p)} . {port}" for p, a, port in values]


def describe(ifname: str, nft: str = "nft") -> dict | None:
    """How ``ifname`` is steered in this namespace, readable: {"kind": "bpf"
    or "nft", "sets": {name: ["10.9.0.1 . tcp . 80", ...] or ["10.9.0.1",
    ...]}}, or None when neither a pylvs tcx program nor the nft table is
    there. ``python -m pylvs.control.steering IFNAME...`` prints it (root)."""
    st = attached(ifname)
    if st is not None:
        kind, sets = "bpf", st["sets"]
    else:
        kind, sets = "nft", NftSteering([ifname], nft=nft).sets()
    if sets is None:
        return None
    return {"kind": kind, "sets": {k: _readable(k, v) for k, v in sets.items()}}


def remove_stale_nft_table(nft: str = "nft") -> bool:
    """Delete a ``netdev pylvs`` table left by a killed nft-steered run or an
    older pylvs (it would keep dropping the VIPs' frames); True if one was
    there. Quiet when nft is not installed (then no table can exist)."""
    try:
        p = subprocess.run([nft, "list", "table", FAMILY, TABLE], capture_output=True,
                           text=True, timeout=30)
    except FileNotFoundError:
        return False
    if p.returncode:
        return False
    p = subprocess.run([nft, "delete", "table", FAMILY, TABLE], capture_output=True,
                       text=True, timeout=30)
    if p.returncode:
        raise SteeringError(f"nftables: removing the stale table failed: {p.stderr.strip()}")
    log.info("steering: removed the nft table %s %s left by an earlier run", FAMILY, TABLE)
    return True


def open_steering(ifnames: list[str], mode: str | None = None, **limits) -> "BpfSteering | NftSteering":
    """Steering for ``ifnames``: ``mode`` "bpf" (SteeringError if it cannot
    attach), "nft", or None: BPF, falling back to nft with one warning.
    ``limits``: BpfSteering's max_services / max_dests."""
    if mode not in (None, *MODES):
        raise ValueError(f"steering mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "nft":
        log.info("steering: nftables table %s %s (left behind if pylvs is killed)", FAMILY, TABLE)
        return NftSteering(ifnames)
    try:
        st = BpfSteering(ifnames, **limits)
    except SteeringError as e:
        if mode == "bpf":
            raise
        log.warning("steering: %s; falling back to nftables, whose table a killed director "
                    "leaves behind (black-holing the VIPs until the next start)", e)
        return NftSteering(ifnames)
    remove_stale_nft_table()
    log.info("steering: BPF at tcx ingress of %s (detached by the kernel when pylvs exits)",
             ", ".join(ifnames))
    return st


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or ["eth0"]:
        print(name, json.dumps(describe(name), indent=1))
