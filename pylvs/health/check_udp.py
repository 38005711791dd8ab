"""UDP_CHECK (keepalived's check_udp.c): send ``payload`` (an empty
datagram without one) from a connected UDP socket and wait
``connect_timeout`` for an answer.

Without ``require_reply`` the check fails only on an ICMP error (port or
host unreachable: the socket reports it) and passes on a reply or on
silence. With ``require_reply`` it needs a reply whose length is within
``min_reply_length``..``max_reply_length`` (0: no maximum) and whose first
bytes match: as keepalived, the lesser of the reply's length and
require_reply's are compared.
"""

from __future__ import annotations

import asyncio
import socket

from ..config.model import CheckSpec
from .check_api import Result, os_error_text, target

MAX_DATAGRAM = 65535


def judge(spec: CheckSpec, reply: bytes) -> str | None:
    """None when ``reply`` passes, else the reason."""
    want = spec.require_reply
    if want is None:
        return None
    hi = spec.max_reply_length or MAX_DATAGRAM
    if not spec.min_reply_length <= len(reply) <= hi:
        return f"reply of {len(reply)} bytes, wanted {spec.min_reply_length}..{hi}"
    n = min(len(reply), len(want))
    if reply[:n] != want[:n]:
        return f"reply {reply[:16].hex()} does not match {want[:16].hex()}"
    return None


async def _exchange(sock: socket.socket, payload: bytes, timeout: float) -> bytes | None:
    """The first datagram back, None after ``timeout`` s of silence; raises
    OSError for the ICMP error the kernel reports on the socket."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def readable() -> None:
        if fut.done():
            return
        try:
            fut.set_result(sock.recv(MAX_DATAGRAM))
        except BlockingIOError:
            pass
        except OSError as e:
            fut.set_exception(e)

    loop.add_reader(sock.fileno(), readable)
    try:
        sock.send(payload)
        return await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        loop.remove_reader(sock.fileno())


async def check(spec: CheckSpec, addr: str, port: int) -> Result:
    """UDP_CHECK of real server ``addr`` (dotted quad) ``port`` (host
    order), or ``connect_ip``:``connect_port``: one datagram (``payload``
    bytes, empty without) from a connected socket bound to ``bindto`` when
    given. Up when no ICMP error arrives within ``connect_timeout`` s
    (a reply or silence), or with ``require_reply`` when a reply passing
    judge() does; down on an ICMP error the socket reports (port or host
    unreachable), a reply that does not pass, or silence when a reply is
    required. Raises nothing for what the network does."""
    host, p = target(spec, addr, port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if spec.bindto:
            sock.bind((spec.bindto, 0))
        sock.connect((host, p))
        reply = await _exchange(sock, spec.payload or b"", spec.connect_timeout)
    except OSError as e:
        return Result(False, f"udp {host}:{p}: {os_error_text(e)}")
    finally:
        sock.close()
    if reply is None:
        if spec.require_reply is not None:
            return Result(False, f"udp {host}:{p}: no reply within {spec.connect_timeout:g} s")
        return Result(True, f"udp {host}:{p}: no error within {spec.connect_timeout:g} s")
    why = judge(spec, reply)
    if why is not None:
        return Result(False, f"udp {host}:{p}: {why}")
    return Result(True, f"udp {host}:{p}: reply of {len(reply)} bytes")
