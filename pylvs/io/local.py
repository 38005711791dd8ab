"""Clients on the director itself (docs/io.md, "Clients on the director").

A process on the director that connects to a virtual service must be
balanced like any client: the kernel's IPVS catches such packets at its
LOCAL_OUT hook (net/netfilter/ipvs/ip_vs_core.c, ip_vs_local_request4). The
VIP is one of the director's own addresses, so the kernel sends such a
connect through the loopback device, where pylvs meets it:

- **in**: an AF_PACKET port on ``lo`` (``AfPacketBackend(local=True)``;
  with ``--io xdp``, one of the XDP backend's AF_PACKET taps). The
  loopback transmit re-enters the frame at lo's receive path, where the
  port's socket (in the workers' fanout group, keyed by client address as on
  every port) takes it and the steering program at tcx ingress of ``lo``
  drops it, so the local stack does not answer it. That program also
  records the client's (address, port), so a real server's reply to it is
  taken from the kernel too (pylvs/bpf/steer.bpf.c ``local_clients``).
- **out**: what the engine sends to that port (a NAT reply, a DR/Tun real
  server's reply) goes to the local stack as an IP packet on a raw socket
  (``raw_socket``): it reaches the client socket with a route attached. A
  frame sent on ``lo`` through AF_PACKET would instead meet the route
  input's martian check (net/ipv4/fib_frontend.c fib_validate_source: a
  packet from one of our own addresses is refused unless accept_local).
- **source**: connecting to a local VIP, the kernel takes the VIP as the
  source (the preferred source of the VIP's local route). A DR or Tun real
  server holds the VIP too, and would answer itself. ``LocalSource`` puts
  a second local route for the VIP in front of the kernel's, with another
  address of the VIP's interface as preferred source (as ``ip route
  prepend local VIP dev D src DIP table local`` would), through a TUN
  device that only this process holds: when the process ends, even by
  ``kill -9``, the kernel removes the device and its routes with it, and
  the kernel's route is the only one again.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess

log = logging.getLogger("pylvs")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
# The kernel picks the first free name.
ANCHOR_NAME = "pylvsl%d"


def loopback_name() -> str:
    """This namespace's loopback interface (ifindex 1, LOOPBACK_IFINDEX)."""
    return socket.if_indextoname(1)


def raw_socket() -> socket.socket:
    """A raw IPv4 socket that sends whole IP packets (IPPROTO_RAW implies
    IP_HDRINCL): the loopback port's way to the local stack. OSError
    (EPERM) without CAP_NET_RAW."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setblocking(False)
    return s


def _ip(a) -> int:
    return int(ipaddress.IPv4Address(a))


def _s(a: int) -> str:
    return str(ipaddress.IPv4Address(int(a)))


class LocalSource:
    """Preferred sources for local connects to the VIPs (module docstring).

    ``apply(vips)`` keeps one route per VIP that is a local address of an
    interface with another address; ``close()`` (or the process's end)
    removes the anchor device and so every route. OSError when the TUN
    device cannot be made (no /dev/net/tun, no CAP_NET_ADMIN)."""

    def __init__(self, ip: str = "ip"):
        self.ip = ip
        self._fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = fcntl.ioctl(self._fd, TUNSETIFF,
                              struct.pack("16sH22x", ANCHOR_NAME.encode(), IFF_TUN | IFF_NO_PI))
            self.name = ifr[:16].rstrip(b"\0").decode()
            self._run("link", "set", "dev", self.name, "up")
        except BaseException:
            os.close(self._fd)
            raise
        self.routes: dict[int, int] = {}   # vip -> source, host-order ints

    def _run(self, *args: str) -> None:
        p = subprocess.run([self.ip, *args], capture_output=True, text=True, timeout=10)
        if p.returncode:
            raise OSError(f"{self.ip} {' '.join(args)}: {p.stderr.strip()}")

    def _json(self, *args: str) -> list:
        # `ip -j`, not pyroute2: this runs on the control thread's event
        # loop, where pyroute2's own asyncio sockets fail under uvloop.
        p = subprocess.run([self.ip, "-j", "-4", *args], capture_output=True, text=True,
                           timeout=10)
        if p.returncode:
            raise OSError(f"{self.ip} -j -4 {' '.join(args)}: {p.stderr.strip()}")
        return json.loads(p.stdout or "[]")

    def sources(self, vips) -> dict[int, int]:
        """{vip: source} for the VIPs (host-order ints) whose local route
        (table local, not ours) takes a VIP as preferred source: another
        address of the route's interface, the first that is not a VIP (the
        interface's primary, in the kernel's order). A VIP that is not a
        local address, whose route already prefers a non-VIP source (a
        secondary address: the kernel takes the primary), or whose
        interface has no other address is left out. OSError from ip."""
        vips = {int(v) for v in vips}
        if not vips:
            return {}
        by_if = {link["ifname"]: [_ip(a["local"]) for a in link.get("addr_info", [])
                                  if a.get("family") == "inet" and "local" in a]
                 for link in self._json("addr", "show")}
        chosen: dict[int, tuple[str, int]] = {}   # vip -> (dev, prefsrc) of the kernel's route
        for r in self._json("route", "show", "table", "local", "type", "local"):
            dst, dev = r.get("dst", ""), r.get("dev")
            if "/" in dst or dev == self.name:
                continue
            try:
                vip = _ip(dst)
            except ValueError:
                continue
            if vip in vips and vip not in chosen:
                chosen[vip] = (dev, _ip(r.get("prefsrc", dst)))
        out = {}
        for vip, (dev, prefsrc) in chosen.items():
            if prefsrc not in vips:
                continue
            src = next((a for a in by_if.get(dev, []) if a not in vips and a >> 24 != 127), None)
            if src is not None:
                out[vip] = src
        return out

    def apply(self, vips) -> None:
        """Routes for exactly these VIPs (host-order ints); OSError from ip."""
        want = self.sources(vips) if self._fd >= 0 else {}
        for vip, src in list(self.routes.items()):
            if want.get(vip) != src:
                self._run("-4", "route", "del", "local", _s(vip), "dev", self.name,
                          "table", "local")
                del self.routes[vip]
        for vip, src in want.items():
            if vip in self.routes:
                continue
            # prepend: before the kernel's route of the same key, so the
            # lookup takes this one while it exists.
            self._run("-4", "route", "prepend", "local", _s(vip), "dev", self.name,
                      "table", "local", "proto", "static", "scope", "host", "src", _s(src))
            self.routes[vip] = src
            log.info("local clients: connects to %s leave from %s (route through %s)",
                     _s(vip), _s(src), self.name)

    def close(self) -> None:
        """Remove the anchor device; the kernel drops its routes (again: no-op)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.routes = {}
