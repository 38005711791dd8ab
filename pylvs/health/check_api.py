"""What every checker shares: its result and its target.

A checker is ``async def check(spec, addr, port) -> Result`` for one real
server ``addr:port`` (dotted quad, host-order port) and one
``pylvs.config.model.CheckSpec``. It never raises for what the network or
the server does (refused, reset, silence, garbage): those are failed
results whose ``text`` says what happened; it never blocks the loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

from ..config.model import CheckSpec


@dataclass(frozen=True)
class Result:
    """One probe's outcome. ``weight``: MISC_CHECK with misc_dynamic sets
    the real server's weight (0..253); None leaves the configured one."""

    ok: bool
    text: str
    weight: int | None = None


def target(spec: CheckSpec, addr: str, port: int) -> tuple[str, int]:
    """(connect_ip or the real server's address, connect_port or its port)."""
    return (spec.connect_ip or addr,
            spec.connect_port if spec.connect_port is not None else port)


def os_error_text(e: BaseException) -> str:
    """A short reason for a failed socket operation ("connection refused")."""
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, OSError) and e.errno:
        # asyncio's connect errors carry "Connect call failed (...)" as strerror.
        return os.strerror(e.errno).lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return type(e).__name__


async def within(aw, seconds: float):
    """``await aw``, raising TimeoutError (asyncio's is the builtin) after
    ``seconds``. asyncio.timeout rather than asyncio.wait_for: before
    Python 3.12 wait_for hands back the result of an awaitable that is
    done when its cancel arrives, swallowing the cancel; a read of a
    server that sends without end is always done at once, so the probe's
    budget (or a reload's cancel) never ended it."""
    async with asyncio.timeout(seconds):
        return await aw


async def open_tcp(spec: CheckSpec, host: str, port: int, ssl=None, sni: str | None = None):
    """A connected (reader, writer) within ``connect_timeout``, bound to
    ``bindto`` when given, the TLS handshake (``ssl``) naming ``sni`` as
    the server when given; raises OSError or asyncio.TimeoutError."""
    local = (spec.bindto, 0) if spec.bindto else None
    return await within(
        asyncio.open_connection(host, port, ssl=ssl, local_addr=local,
                                family=socket.AF_INET,
                                server_hostname=((sni or host) if ssl else None)),
        spec.connect_timeout)


async def close_writer(writer) -> None:
    """Close a stream without waiting on a peer that does not answer."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except Exception:
        # wait_closed() raises whatever ended the connection: a reset, a TLS
        # alert, any error the TLS layer met in the server's bytes, or our
        # timeout. Each is the server's doing after the verdict was made,
        # and the socket is closed on our side all the same.
        pass
