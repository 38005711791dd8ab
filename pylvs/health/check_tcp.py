"""TCP_CHECK: the real server accepts a TCP connection within
``connect_timeout`` (keepalived's check_tcp.c: a completed connect is
success; the connection is closed at once)."""

from __future__ import annotations

import asyncio

from ..config.model import CheckSpec
from .check_api import Result, close_writer, open_tcp, os_error_text, target


async def check(spec: CheckSpec, addr: str, port: int) -> Result:
    """TCP_CHECK of real server ``addr`` (dotted quad) ``port`` (host
    order): up when a connect to ``connect_ip``:``connect_port`` (default
    ``addr``:``port``), from ``bindto`` when given, completes within
    ``connect_timeout`` s; down, with the reason in the text ("connection
    refused", "timeout", "no route to host"), otherwise. Raises nothing
    for what the network does."""
    host, p = target(spec, addr, port)
    try:
        _reader, writer = await open_tcp(spec, host, p)
    except (OSError, asyncio.TimeoutError) as e:
        return Result(False, f"connect to {host}:{p}: {os_error_text(e)}")
    await close_writer(writer)
    return Result(True, f"connected to {host}:{p}")
