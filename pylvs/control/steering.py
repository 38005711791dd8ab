"""nftables steering: keep the kernel away from the frames the director steals.

The AF_PACKET taps see a frame before nft netdev ingress, so dropping it at
ingress leaves pylvs the only one handling it: the kernel neither forwards
it, nor answers it with RST or ICMP. One table ``netdev pylvs`` per network
namespace holds an ingress chain per interface and three sets:

- ``services``: (vaddr . proto . vport) of virtual services: client -> VIP
  traffic is dropped.
- ``realservers``: (daddr . proto . dport) of dests: real server replies are
  dropped unless addressed to one of the director's own addresses
  (``local``), so its own connections to real servers (health checks,
  ssh) still work.
- ``local``: the director's addresses.

Everything goes through ``nft -f -`` so each change is one transaction.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess

from ..io import bpf

TABLE = "pylvs"
FAMILY = "netdev"
# Before anything else at ingress (tc, other netdev tables).
PRIORITY = -500


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
        svc = bpf.keys_of(services, "svc")
        rs = bpf.dest_keys(services, dests)
        local = sorted({int(ipaddress.IPv4Address(a)) for a in local_addrs})
        lines = [
            # Declaring then deleting makes the delete valid even when no
            # table exists, and replaces a stale one from a crashed run, all
            # in this one transaction.
            f"table {FAMILY} {TABLE}",
            f"delete table {FAMILY} {TABLE}",
            f"table {FAMILY} {TABLE} {{",
            "  set services { type ipv4_addr . inet_proto . inet_service; }",
            "  set realservers { type ipv4_addr . inet_proto . inet_service; }",
            "  set local { type ipv4_addr; }",
        ]
        for ifname in self.ifnames:
            lines += [
                f"  chain {_chain(ifname)} {{",
                f'    type filter hook ingress device "{ifname}" priority {PRIORITY}; policy accept;',
                "    ip daddr . meta l4proto . th dport @services drop",
                "    ip daddr != @local ip saddr . meta l4proto . th sport @realservers drop",
                "  }",
            ]
        lines.append("}")
        lines += self._element_lines(svc, rs, local)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _element_lines(svc, rs, local) -> list[str]:
        out = []
        if svc:
            out.append(f"add element {FAMILY} {TABLE} services {{ {_elements(svc)} }}")
        if rs:
            out.append(f"add element {FAMILY} {TABLE} realservers {{ {_elements(rs)} }}")
        if local:
            out.append(f"add element {FAMILY} {TABLE} local {{ {', '.join(_addr(a) for a in local)} }}")
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
        svc = bpf.keys_of(services, "svc")
        rs = bpf.dest_keys(services, dests)
        local = sorted({int(ipaddress.IPv4Address(a)) for a in local_addrs})
        lines = [f"flush set {FAMILY} {TABLE} {name}" for name in ("services", "realservers", "local")]
        lines += self._element_lines(svc, rs, local)
        self._run("\n".join(lines) + "\n", "updating the steering sets")

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
