"""Real servers that misbehave, for the health-check tests: run in a
namespace (``python healthsrv.py ADDR [CERT KEY]``), it prints one JSON
line ``{"ready": true}`` once every listener is up, then serves until
killed. Ports (TCP unless said):

    8001 HTTP 200, body "hello pylvs"      8002 HTTP 500
    8003 accepts and never answers         8004 answers garbage and closes
    8005 accepts and resets (RST)          8006 nothing listens (refused)
    8007 HTTP 200 after a 3 s pause        8443 HTTPS 200 (with CERT KEY)
    8008 HTTP 200 for "Host: www.example", 404 for any other Host
    8009 garbage at once, before any request
    8011 resets at once, before any request
    UDP 9001 echoes "PONG" + the datagram  UDP 9002 nothing listens
    UDP 9003 bound, never answers
"""

import asyncio
import json
import socket
import ssl
import struct
import sys

BODY = b"hello pylvs"
HUGE = 12 << 20   # bytes of the huge page (over check_http.MAX_RESPONSE)


def http(status: bytes, body: bytes = BODY) -> bytes:
    return (b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


async def read_request(reader) -> None:
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except Exception:
        pass


def answer(payload: bytes, pause: float = 0.0):
    async def serve(reader, writer):
        await read_request(reader)
        if pause:
            await asyncio.sleep(pause)
        writer.write(payload)
        try:
            await writer.drain()
        finally:
            writer.close()
    return serve


async def by_host(reader, writer):
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except Exception:
        head = b""
    ok = b"\r\nhost: www.example\r\n" in head.lower()
    writer.write(http(b"200 OK") if ok else http(b"404 Not Found"))
    await writer.drain()
    writer.close()


async def blurt(reader, writer):
    writer.write(b"\x15\x03\x01\x00\x02\x02\x50 not TLS, not HTTP\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(1)
    writer.close()


async def silent(reader, writer):
    await asyncio.sleep(3600)


async def reset(reader, writer):
    # A moment after the accept: a reset that beats the client's own view
    # of its completed connect fails TCP_CHECK (SO_ERROR, as in keepalived).
    await asyncio.sleep(0.2)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def reset_at_once(reader, writer):
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(b"PONG" + data, addr)


async def main(addr: str, cert: str | None, key: str | None) -> None:
    handlers = {8001: answer(http(b"200 OK")), 8002: answer(http(b"500 Internal Server Error")),
                8003: silent, 8004: answer(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff garbage"),
                8005: reset, 8007: answer(http(b"200 OK"), pause=3.0), 8008: by_host,
                8009: blurt, 8010: answer(http(b"200 OK", b"x" * HUGE)),
                8011: reset_at_once}
    servers = [await asyncio.start_server(h, addr, port) for port, h in handlers.items()]
    if cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        servers.append(await asyncio.start_server(answer(http(b"200 OK")), addr, 8443, ssl=ctx))
        # A TLS server that refuses a handshake not naming www.example
        # (nginx's ssl_reject_handshake on a name-based host).
        sni_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sni_ctx.load_cert_chain(cert, key)
        sni_ctx.sni_callback = lambda sock, name, c: (
            None if name == "www.example" else ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME)
        servers.append(await asyncio.start_server(answer(http(b"200 OK")), addr, 8444, ssl=sni_ctx))
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Echo, local_addr=(addr, 9001))
    quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    quiet.bind((addr, 9003))
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], *(sys.argv[2:4] + [None, None])[:2]))
