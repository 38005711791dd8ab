"""MISC_CHECK (keepalived's check_misc.c): run ``misc_path`` (split as a
shell would split words, run without a shell) with a timeout of
``misc_timeout`` (``delay_loop`` when not given).

Exit status 0 passes, anything else fails; with ``misc_dynamic``, 1 fails,
0 passes with the configured weight and 2..255 pass with weight
``status - 2`` (keepalived.conf(5)). A command still running at the timeout
fails the check and is stopped as keepalived's misc_check_child_thread
stops it: SIGTERM to its process group (a script may clean up), SIGKILL
to the group TERM_GRACE s later or as soon as the command is gone (what
it started goes too); one killed by a signal or that cannot be started
fails the check too. A check cancelled while its
command runs (a reload that drops the checker, the director stopping)
kills the command's process group too, so no command outlives its check.

The verdict is the command's exit, as keepalived waits for its child to
exit: a background process the command leaves behind (holding its output
open) neither delays nor fails the check, and is left running. The output
read (the last line goes into the result's text) is what the command
wrote up to its exit, its last OUTPUT_LIMIT bytes; our end of the pipe
closes then, so a process left behind that writes later gets EPIPE.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal

from ..config.model import CheckSpec
from .check_api import Result

OUTPUT_LIMIT = 64 << 10   # bytes of the command's output kept (its end)
# After the exit, how long output still in the pipe may take to arrive
# (the command's own, written just before it exited).
OUTPUT_GRACE = 0.05
# After the timeout's SIGTERM, how long the command has before SIGKILL
# (keepalived's misc_check_child_thread waits 2 s).
TERM_GRACE = 2.0


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


class _Output:
    """The read end of the command's stdout and stderr, drained on the
    loop as data comes (a command printing megabytes never blocks on a
    full pipe); keeps the last OUTPUT_LIMIT bytes, where the last line is."""

    def __init__(self, fd: int):
        self.fd, self.kept, self.eof = fd, bytearray(), asyncio.Event()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.eof.set()
        else:
            self.kept += data
            del self.kept[:-OUTPUT_LIMIT]

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


def kill_group(proc, sig: int = signal.SIGKILL) -> None:
    """Signal a process started with start_new_session=True and its group."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _stop(proc) -> None:
    """The timeout's end of a command: SIGTERM to its group, then SIGKILL
    once it is gone or TERM_GRACE s on."""
    kill_group(proc, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), TERM_GRACE)
    except asyncio.TimeoutError:
        pass
    finally:
        kill_group(proc)
    await proc.wait()


async def check(spec: CheckSpec, addr: str, port: int) -> Result:
    try:
        argv = shlex.split(spec.misc_path or "")
    except ValueError as e:
        return Result(False, f"misc_path: {e}")
    if not argv:
        return Result(False, "misc_path is empty")
    timeout = spec.misc_timeout if spec.misc_timeout is not None else spec.delay_loop
    rfd, wfd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=wfd, stderr=wfd,
            start_new_session=True)
    except (OSError, ValueError) as e:
        os.close(rfd)
        return Result(False, f"{argv[0]}: {getattr(e, 'strerror', None) or e}")
    finally:
        os.close(wfd)
    out = _Output(rfd)
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            await _stop(proc)
            return Result(False, f"timeout after {timeout:g} s")
        except BaseException:
            # Cancelled: the command must not outlive its check.
            kill_group(proc)
            raise
        try:
            await asyncio.wait_for(out.eof.wait(), OUTPUT_GRACE)
        except asyncio.TimeoutError:
            pass    # a process left behind holds the pipe: not waited for
    finally:
        out.close()
    r = verdict(spec, proc.returncode)
    tail = bytes(out.kept).strip().splitlines()[-1:]
    if tail:
        r = Result(r.ok, f"{r.text}: {printable(tail[0][:80])}", r.weight)
    return r


def printable(line: bytes) -> str:
    """A line of the command's output fit for `pylvs status` and the log:
    control characters (a terminal's escape sequences, colours) become
    '?', so the command cannot drive the operator's terminal."""
    return "".join(c if c.isprintable() else "?" for c in line.decode(errors="replace"))
