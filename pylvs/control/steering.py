"""nftables steering: keep the kernel away from the frames the director steals.

The AF_PACKET taps see a frame before nft netdev ingress, so dropping it at
ingress leaves pylvs the only one handling it: the kernel neither forwards
it, nor answers it with RST or ICMP. One table ``netdev pylvs`` per network
namespace holds an ingress chain per interface and these sets:

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
(pylvs/io/bpf.py) and counted here, in the named counter ``not_host``, then
left to the kernel, which treats them as it would without IPVS.

Everything goes through ``nft -f -`` so each change is one transaction.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess

from ..io import bpf

TABLE = "pylvs"
FAMILY = "netdev"
# Before anything else at ingress (tc, other netdev tables).
PRIORITY = -500
SETS = ("services", "realservers", "rsaddrs", "vips", "local")
ICMP_ERRORS = "{ destination-unreachable, source-quench, time-exceeded }"  # bpf.ICMP_ERRORS


class SteeringError(RuntimeError):
    pass


def _addr(a: int) -> str:
    return str(ipaddress.IPv4Address(int(a)))


def _chain(ifname: str) -> str:
    # Interface names may hold characters nft identifiers may not.
    return "in_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def _elements(keys) -> str:
    return ", ".join(f"{_addr(a)} . {p} . {port}" for p, a, port in keys)


class Steering:
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
            "  set rsaddrs { type ipv4_addr; }",
            "  set vips { type ipv4_addr; }",
            "  set local { type ipv4_addr; }",
            "  counter not_host { }",
            # What the socket filter refuses as not PACKET_HOST: counted,
            # then the kernel's as if there were no IPVS.
            "  chain not_host {",
            '    ip daddr . meta l4proto . th dport @services counter name "not_host" accept',
            '    ip saddr . meta l4proto . th sport @realservers counter name "not_host" accept',
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
                "    ip daddr != @local ip saddr . meta l4proto . th sport @realservers drop",
                f"    ip daddr != @local ip saddr @rsaddrs icmp type {ICMP_ERRORS} drop",
                "  }",
            ]
        lines.append("}")
        lines += self._element_lines(services, dests, local_addrs)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _element_lines(services, dests, local_addrs) -> list[str]:
        svc = bpf.keys_of(services, "svc")
        rs = bpf.dest_keys(services, dests)
        addrs = {
            "vips": sorted({a for _, a, _ in svc}),
            "rsaddrs": sorted({a for _, a, _ in rs}),
            "local": sorted({int(ipaddress.IPv4Address(a)) for a in local_addrs}),
        }
        out = []
        if svc:
            out.append(f"add element {FAMILY} {TABLE} services {{ {_elements(svc)} }}")
        if rs:
            out.append(f"add element {FAMILY} {TABLE} realservers {{ {_elements(rs)} }}")
        for name, values in addrs.items():
            if values:
                out.append(f"add element {FAMILY} {TABLE} {name} {{ {', '.join(map(_addr, values))} }}")
        return out

    def apply(self, services, dests, local_addrs) -> None:
        """Make the sets say exactly this, in one transaction.

        The first call builds the table (replacing a stale one); later calls
        only flush and refill the sets, so the chains (and their hooks) stay
        in place and no stolen frame slips through to the kernel meanwhile.
        """
        if not self.installed:
            self._run(self.script(services, dests, local_addrs), "installing the steering table")
            self.installed = True
            return
        lines = [f"flush set {FAMILY} {TABLE} {name}" for name in SETS]
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
