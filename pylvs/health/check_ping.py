"""PING_CHECK (keepalived's check_ping.c): an ICMP echo request to the
real server (``connect_ip`` when given) answered by an echo reply with our
identifier, sequence and payload within ``connect_timeout``.

The socket is an unprivileged ICMP datagram socket where
net.ipv4.ping_group_range admits our group (the kernel then keeps the
identifier and hands us only our replies), else a raw ICMP socket (root or
CAP_NET_RAW), where every ICMP packet of the host arrives and ours are
picked out by source address, identifier and sequence.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time

from ..config.model import CheckSpec
from ..engine.checksum import checksum
from .check_api import Result, os_error_text, target

ICMP_ECHO, ICMP_ECHOREPLY = 8, 0
_seq = itertools.count(1)


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, checksum(head + payload), ident, seq) + payload


def _open() -> tuple[socket.socket, bool]:
    """(socket, raw?)."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP), False
    except PermissionError:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), True


def is_our_reply(packet: bytes, raw: bool, src: str, host: str, ident: int, seq: int,
                 payload: bytes) -> bool:
    if raw:
        if src != host or len(packet) < 20:
            return False
        packet = packet[(packet[0] & 0x0F) * 4:]
    if len(packet) < 8:
        return False
    typ, _code, _sum, rid, rseq = struct.unpack("!BBHHH", packet[:8])
    # A datagram socket's identifier is the kernel's (its "port"), not ours.
    return (typ == ICMP_ECHOREPLY and rseq == seq and (not raw or rid == ident)
            and packet[8:] == payload)


async def check(spec: CheckSpec, addr: str, port: int) -> Result:
    """PING_CHECK of real server ``addr`` (dotted quad; ``connect_ip``
    when given; ``port`` unused): one ICMP echo request, from ``bindto``
    when given. Up when our echo reply (identifier, sequence, payload)
    comes back within ``connect_timeout`` s, the text giving the round
    trip in ms; down on silence, an error the socket reports, or no ICMP
    socket to be had (neither ping_group_range nor CAP_NET_RAW). Raises
    nothing for what the network does."""
    host, _ = target(spec, addr, port)
    loop = asyncio.get_running_loop()
    try:
        sock, raw = _open()
    except OSError as e:
        return Result(False, f"ping {host}: no ICMP socket: {os_error_text(e)}")
    ident = os.getpid() & 0xFFFF
    seq = next(_seq) & 0xFFFF
    payload = b"pylvs-health" + struct.pack("!d", time.time())
    fut = loop.create_future()

    def readable() -> None:
        while not fut.done():
            try:
                packet, (src, _p) = sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError as e:
                fut.set_exception(e)
                return
            if is_our_reply(packet, raw, src, host, ident, seq, payload):
                fut.set_result(None)

    try:
        sock.setblocking(False)
        if spec.bindto:
            sock.bind((spec.bindto, 0))
        loop.add_reader(sock.fileno(), readable)
        try:
            sent = time.monotonic()
            sock.sendto(echo_request(ident, seq, payload), (host, 0))
            await asyncio.wait_for(fut, spec.connect_timeout)
        finally:
            loop.remove_reader(sock.fileno())
    except (OSError, asyncio.TimeoutError) as e:
        return Result(False, f"ping {host}: {os_error_text(e)}")
    finally:
        sock.close()
    return Result(True, f"ping {host}: reply in {(time.monotonic() - sent) * 1000:.1f} ms "
                        f"({'raw' if raw else 'datagram'} socket)")
