"""The real servers' service in a lab: a small HTTP/1.1 server and a UDP echo.

Run inside a real server's namespace (``ip netns exec NS python -m
pylvs.lab.httpd --name rs1``). It answers:

- ``GET /whoami``  -> the real server's name and a newline, so a client can
  tell which real server the director picked;
- ``GET /bytes/N`` -> N bytes of ``content(0, N)``, a deterministic pattern
  the tests regenerate to compare a download byte for byte;
  ``/bytes/N?rate=R`` paces the body at about R bytes per second (a long
  download that must span a change; curl 7.88's --limit-rate lets the
  first megabytes through at full speed, so the client cannot pace it);
- ``GET /health``  -> ``ok``;
- ``PUT /sink`` (any body of Content-Length bytes) -> ``N SHA256HEX`` of
  what arrived, so a client can check an upload through the director.

UDP datagrams to ``--udp-port`` come back prefixed with ``NAME `` (the same
reason as /whoami). The process prints ``ready`` on stdout once both sockets
are bound, so whoever started it can wait for that instead of sleeping.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

CHUNK = 64 * 1024
MAX_BYTES = 1 << 31  # refuse absurd sizes rather than stream forever


def content(offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the deterministic download pattern.

    Higher bits of the position are mixed in so a chunk delivered at the
    wrong offset, duplicated or dropped shows up as a mismatch (a short
    periodic pattern would hide such errors).
    """
    i = np.arange(offset, offset + length, dtype=np.uint64)
    b = i + (i >> np.uint64(8)) * np.uint64(7) + (i >> np.uint64(16)) * np.uint64(13)
    return (b & np.uint64(0xFF)).astype(np.uint8).tobytes()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pylvs-lab-httpd"
    name = "rs"

    def log_message(self, fmt, *args):  # the lab wants quiet real servers
        pass

    def send_response(self, code, message=None):
        super().send_response(code, message)
        # Say so when the client asked to close: curl 7.88 otherwise sends its
        # next request on this connection as the server closes it (and the
        # server's stack answers that request with a RST).
        if self.headers.get("Connection", "").lower() == "close":
            self.send_header("Connection", "close")

    def _small(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Real-Server", self.name)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        path, _, query = self.path.partition("?")
        params = dict(p.partition("=")[::2] for p in query.split("&") if p)
        if path == "/whoami":
            return self._small(self.name.encode() + b"\n")
        if path == "/health":
            return self._small(b"ok\n")
        if path.startswith("/bytes/"):
            try:
                n = int(path[len("/bytes/"):])
            except ValueError:
                return self._small(b"bad size\n", 400)
            if not 0 <= n <= MAX_BYTES:
                return self._small(b"bad size\n", 400)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.send_header("X-Real-Server", self.name)
            self.end_headers()
            if self.command == "HEAD":
                return
            try:
                rate = float(params.get("rate", 0))
            except ValueError:
                rate = 0.0
            chunk = CHUNK if rate <= 0 else max(1024, min(CHUNK, int(rate / 20)))
            t0 = time.monotonic()
            off = 0
            while off < n:
                k = min(chunk, n - off)
                self.wfile.write(content(off, k))
                off += k
                if rate > 0:
                    ahead = off / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            return
        return self._small(b"not found\n", 404)

    do_HEAD = do_GET

    def do_PUT(self):
        if self.path.partition("?")[0] != "/sink":
            return self._small(b"not found\n", 404)
        try:
            left = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._small(b"length required\n", 411)
        if not 0 <= left <= MAX_BYTES:
            return self._small(b"bad size\n", 400)
        h, n = hashlib.sha256(), 0
        while left > 0:
            data = self.rfile.read(min(CHUNK, left))
            if not data:
                break  # the client went away: answer what arrived
            h.update(data)
            n += len(data)
            left -= len(data)
        return self._small(f"{n} {h.hexdigest()}\n".encode())


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # bursts of short curls must not meet a full backlog


IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # linux/in.h
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr


def udp_echo(sock: socket.socket, name: bytes) -> None:
    """Echo each datagram from the address it was sent to.

    A socket bound to 0.0.0.0 would answer from the address routing picks
    (a DR or Tun real server's RIP), not from the VIP the client asked: a
    client with a connected socket drops such a reply. IP_PKTINFO gives
    the datagram's destination address, and the reply sets it as its
    source (ip(7)), as a UDP service behind VS-DR or VS-Tun must.
    """
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    while True:
        try:
            data, anc, _, peer = sock.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO.size))
        except OSError:
            return
        reply = []
        for level, kind, value in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= _PKTINFO.size:
                _, _, daddr = _PKTINFO.unpack_from(value)
                reply = [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, daddr, bytes(4)))]
        try:
            sock.sendmsg([name + b" " + data], reply, 0, peer)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="real server name answered by /whoami")
    ap.add_argument("--addr", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--udp-port", type=int, default=7, help="UDP echo port (0: none)")
    args = ap.parse_args(argv)

    handler = type("NamedHandler", (Handler,), {"name": args.name})
    httpd = Server((args.addr, args.port), handler)
    if args.udp_port:
        us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        us.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        us.bind((args.addr, args.udp_port))
        threading.Thread(target=udp_echo, args=(us, args.name.encode()), daemon=True).start()

    def stop(signum, frame):
        # shutdown() blocks until serve_forever returns: call it off the main thread
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
