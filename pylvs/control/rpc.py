"""The control socket between ``pylvs adm`` and a running director.

A unix stream socket, one JSON object per line each way:
``{"op": "add_service", ...}`` answered by ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "No such service"}``. Operations are the
Balancer's (see ``Balancer.apply``); ``batch`` runs a list of them with one
publish at the end (``"more": true``: more batches follow, publish after the
last one or when the client leaves).

The socket is root-only: its directory is 0700, the socket 0600, and every
connection's peer credentials (SO_PEERCRED) must be root or the director's
own user. The default path carries the network namespace's inode, so two
directors in two namespaces of one machine do not collide.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from typing import Any, Awaitable, Callable

from .balancer import Balancer, BalancerError

log = logging.getLogger("pylvs.rpc")

RUN_DIR = "/run/pylvs"
ENV_PATH = "PYLVS_CONTROL"
# What one client can make the director hold: a request line of at most
# MAX_REQUEST bytes (the reader buffers up to twice that), MAX_CLIENTS
# connections at once, and IDLE_TIMEOUT seconds of silence. `pylvs adm -R`
# splits a long restore into batches below the line limit.
MAX_REQUEST = 1 << 20
MAX_CLIENTS = 64
IDLE_TIMEOUT = 300.0
MAX_RESPONSE = 1 << 30     # what a client accepts: a listing of every conn
ESTIMATOR_INTERVAL = 2.0   # the kernel's rate estimator period


class RpcError(Exception):
    """The director refused an operation; the message is ipvsadm's."""


def netns_id() -> int:
    """The inode of this process's network namespace."""
    return os.stat("/proc/self/ns/net").st_ino


def default_path() -> str:
    """``$PYLVS_CONTROL``, else ``/run/pylvs/ctl-<netns inode>.sock``."""
    env = os.environ.get(ENV_PATH)
    if env:
        return env
    return f"{RUN_DIR}/ctl-{netns_id()}.sock"


def _prepare_path(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
    elif os.path.abspath(d) == RUN_DIR:
        # Only our own directory is tightened; a caller's --control directory
        # (say /tmp) is left alone and the socket mode protects the socket.
        os.chmod(d, 0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)      # stale: left by a director that died
        return
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise
    finally:
        probe.close()
    raise RuntimeError(f"another pylvs director is serving {path}")


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


# Per op name, an async callable whose dict is merged into that op's result
# on the control socket: answers the Balancer cannot give and that must not
# block the event loop (the daemon's I/O and steering counters for "stats").
Extras = dict[str, Callable[[], Awaitable[dict]]]
# Per op name, an async callable answering that op instead of the Balancer
# (the daemon's "reload"): called with the request dict; raising
# BalancerError answers {"ok": false, "error": its text}.
Handlers = dict[str, Callable[[dict], Awaitable[Any]]]


def _parse(line: bytes | str) -> dict | str:
    """The request object of a line, or the error message for a bad one."""
    if isinstance(line, bytes):
        # json.loads would guess UTF-16 or UTF-32 from the first bytes and
        # answer with that codec's complaint.
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            return "malformed request: not UTF-8 JSON"
    try:
        req = json.loads(line)
    except (ValueError, RecursionError) as e:
        return f"malformed request: {e}"
    if not isinstance(req, dict) or "op" not in req:
        return "malformed request: expected a JSON object with \"op\""
    return req


def handle_line(balancer: Balancer, line: bytes | str) -> dict:
    """One request line to one response dict; never raises."""
    req = _parse(line)
    if isinstance(req, str):
        return {"ok": False, "error": req}
    return _answer(balancer, req)


async def _handle_line_extras(balancer: Balancer, line: bytes, extras: Extras,
                              handlers: Handlers | None = None) -> dict:
    """handle_line, then the op's extra (if any) merged into a dict result;
    an extra that fails is logged and the Balancer's answer still goes out.
    An op of ``handlers`` is answered by its handler alone."""
    req = _parse(line)
    if isinstance(req, str):
        return {"ok": False, "error": req}
    op = req["op"]
    handler = (handlers or {}).get(op) if isinstance(op, str) else None
    if handler is not None:
        try:
            return {"ok": True, "result": await handler(req)}
        except BalancerError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must cost one request, not the director
            log.exception("control operation %r failed", op)
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
    resp = _answer(balancer, req)
    extra = extras.get(op) if isinstance(op, str) else None
    if extra is not None and resp["ok"] and isinstance(resp["result"], dict):
        try:
            resp["result"].update(await extra())
        except Exception:
            log.exception("control operation %r: its extra part failed", op)
    return resp


def _answer(balancer: Balancer, req: dict) -> dict:
    try:
        return {"ok": True, "result": balancer.apply(req)}
    except BalancerError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a bug must cost one request, not the director
        log.exception("control operation %r failed", req.get("op"))
        return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}


# json.dumps runs in C without letting the GIL go: one call on the listing
# of a big conn table (`-L -c`) held it for half a second, and the workers'
# loops, which take the GIL between two frame batches, waited that long.
PIECE = 2000


def dumps_in_pieces(obj) -> str:
    """json.dumps(obj), the same text, made PIECE list items at a time (a
    dict's values and lists one level down are split; deeper values go
    whole), so other threads get the GIL between pieces. TypeError and
    ValueError as json.dumps."""
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps_in_pieces(v)}"
                               for k, v in obj.items()) + "}"
    if isinstance(obj, list) and len(obj) > PIECE:
        return "[" + ", ".join(json.dumps(obj[i:i + PIECE])[1:-1]
                               for i in range(0, len(obj), PIECE)) + "]"
    return json.dumps(obj)


def _error_line(msg: str) -> bytes:
    return json.dumps({"ok": False, "error": msg}).encode() + b"\n"


class _Clients:
    """How many control connections are open; beyond the limit a new one
    gets one error line and is closed."""

    def __init__(self, limit: int):
        self.limit = limit
        self.n = 0


async def _serve_client(balancer: Balancer, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, clients: _Clients | None = None,
                        extras: Extras | None = None, handlers: Handlers | None = None) -> None:
    if clients is not None:
        if clients.n >= clients.limit:
            log.warning("control socket: %d clients already, one more refused", clients.n)
            try:
                writer.write(_error_line(f"too many control connections ({clients.limit}); "
                                         "try again later"))
                await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()
            return
        clients.n += 1
    try:
        await _serve_lines(balancer, reader, writer, extras or {}, handlers or {})
    finally:
        if clients is not None:
            clients.n -= 1
        # A client that left in the middle of a held -R: publish its rules.
        try:
            balancer.flush()
        except Exception:
            log.exception("publishing after a client left failed")


async def _serve_lines(balancer: Balancer, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, extras: Extras,
                       handlers: Handlers | None = None) -> None:
    try:
        uid = _peer_uid(writer)
        if uid is not None and uid != 0 and uid != os.geteuid():
            # Answer the first request (so the client reads the reason rather
            # than a broken pipe), then hang up.
            try:
                await asyncio.wait_for(reader.readline(), 5)
            except (asyncio.TimeoutError, ValueError, asyncio.LimitOverrunError):
                pass
            writer.write(b'{"ok": false, "error": "Permission denied (you must be root)"}\n')
            await writer.drain()
            return
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
            except asyncio.TimeoutError:
                return
            except (asyncio.LimitOverrunError, ValueError):
                writer.write(_error_line(
                    f"malformed request: line too long (limit {MAX_REQUEST} bytes)"))
                await writer.drain()
                return
            if not line:
                return
            if not line.strip():
                continue
            resp = (await _handle_line_extras(balancer, line, extras, handlers)
                    if extras or handlers else handle_line(balancer, line))
            try:
                data = dumps_in_pieces(resp)
            except (TypeError, ValueError) as e:
                data = json.dumps({"ok": False, "error": f"internal error: {e}"})
            writer.write(data.encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def _estimator(balancer: Balancer) -> None:
    while True:
        try:
            balancer.estimate(time.monotonic())
            balancer.release_replies()
        except Exception:
            log.exception("rate estimator failed")
        await asyncio.sleep(ESTIMATOR_INTERVAL)


class ControlServer(asyncio.AbstractServer):
    """The unix server plus the Balancer's rate estimator task, which lives
    exactly as long as the server does."""

    def __init__(self, server: asyncio.AbstractServer, estimator: asyncio.Task, path: str):
        self._server = server
        self._estimator = estimator
        self.path = path
        self._ino = os.stat(path).st_ino

    def close(self) -> None:
        self._estimator.cancel()
        self._server.close()
        # Remove our socket file (not one a newer director put there since).
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    async def wait_closed(self) -> None:
        await self._server.wait_closed()
        try:
            await self._estimator
        except asyncio.CancelledError:
            pass

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server.is_serving()

    async def start_serving(self) -> None:
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    @property
    def sockets(self):
        return self._server.sockets


async def start_server(path: str, balancer: Balancer, *,
                       max_clients: int | None = None,
                       extras: Extras | None = None,
                       handlers: Handlers | None = None) -> ControlServer:
    """Serve ``balancer`` on the unix socket ``path``; while serving, run its
    rate estimator every 2 s (as the kernel's estimator timer).

    ``extras``: {op name: async callable returning a dict} merged into that
    op's result (`pylvs run` adds the I/O and steering counters to
    ``stats``); ``handlers``: {op name: async callable(request) -> result}
    answering ops the Balancer does not have (`pylvs run`'s ``reload``)."""
    _prepare_path(path)
    max_clients = max_clients or MAX_CLIENTS
    clients = _Clients(max_clients)
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: _serve_client(balancer, r, w, clients, extras, handlers), path=path,
            limit=MAX_REQUEST)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    task = asyncio.get_running_loop().create_task(_estimator(balancer),
                                                  name="pylvs-rate-estimator")
    return ControlServer(server, task, path)


class Client:
    """Synchronous client: ``Client(path).call({"op": ...}) -> result``."""

    def __init__(self, path: str | None = None, timeout: float = 30.0):
        self.path = path or default_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._rfile = None

    def connect(self) -> "Client":
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError:
                s.close()
                raise
            self._sock = s
            self._rfile = s.makefile("rb")
        return self

    def call(self, request: dict | None = None, /, **kw: Any) -> Any:
        """Send one operation (a dict, or keywords); returns its result or
        raises RpcError."""
        req = {**(request or {}), **kw}
        self.connect()
        assert self._sock is not None and self._rfile is not None
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass   # refused (too many clients): the reason is waiting to be read
        line = self._rfile.readline(MAX_RESPONSE + 1)
        if not line:
            raise ConnectionError(f"{self.path}: the director closed the connection")
        resp = json.loads(line)
        if not resp.get("ok"):
            raise RpcError(resp.get("error", "unknown error"))
        return resp.get("result")

    def close(self) -> None:
        if self._rfile is not None:
            self._rfile.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._rfile = None

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()
