"""MISC_CHECK (keepalived's check_misc.c): run ``misc_path`` (split as a
shell would split words, run without a shell) with a timeout of
``misc_timeout`` (``delay_loop`` when not given).

Exit status 0 passes, anything else fails; with ``misc_dynamic``, 1 fails,
0 passes with the configured weight and 2..255 pass with weight
``status - 2`` (keepalived.conf(5)). A command still running at the timeout
is killed (SIGKILL to its process group) and the check fails; so does one
killed by a signal or that cannot be started.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal

from ..config.model import CheckSpec
from .check_api import Result

OUTPUT_LIMIT = 64 << 10   # bytes of the command's output read, the rest dropped


def verdict(spec: CheckSpec, status: int) -> Result:
    """The result of a command that exited with ``status`` (a negative
    number: killed by that signal)."""
    if status < 0:
        return Result(False, f"killed by signal {-status}")
    if spec.misc_dynamic and status >= 2:
        return Result(True, f"exit {status}: weight {status - 2}", weight=status - 2)
    if status == 0:
        return Result(True, "exit 0")
    return Result(False, f"exit {status}")


async def check(spec: CheckSpec, addr: str, port: int) -> Result:
    try:
        argv = shlex.split(spec.misc_path or "")
    except ValueError as e:
        return Result(False, f"misc_path: {e}")
    if not argv:
        return Result(False, "misc_path is empty")
    timeout = spec.misc_timeout if spec.misc_timeout is not None else spec.delay_loop
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return Result(False, f"{argv[0]}: {e.strerror or e}")
    try:
        out = await asyncio.wait_for(_drain(proc), timeout)
    except asyncio.TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()
        return Result(False, f"timeout after {timeout:g} s")
    r = verdict(spec, proc.returncode)
    tail = out.strip().splitlines()[-1:] if out else []
    if tail:
        r = Result(r.ok, f"{r.text}: {tail[0][:80].decode(errors='replace')}", r.weight)
    return r


async def _drain(proc) -> bytes:
    """The command's output (its first OUTPUT_LIMIT bytes) until it exits."""
    kept = b""
    while True:
        data = await proc.stdout.read(65536)
        if not data:
            break
        if len(kept) < OUTPUT_LIMIT:
            kept += data[:OUTPUT_LIMIT - len(kept)]
    await proc.wait()
    return kept
