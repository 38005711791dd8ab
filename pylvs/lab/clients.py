"""Client-side helpers that lab tests run inside a namespace (``ip netns exec``).

They are imported by small scripts the tests start in the client or a real
server namespace, so a test says what the client does (connect from a given
port, send a crafted frame, capture what arrives) in a few lines:

- ``whoami(sock)``: one ``GET /whoami`` on an open connection (keep-alive),
  the answering real server's name;
- ``send_frames(iface, frames, pps)``: Ethernet frames out of ``iface``
  through an AF_PACKET socket (no routing, no checks: for spoofed sources
  and deliberately broken headers), paced at ``pps`` frames per second;
- ``syn_frames(...)``: TCP SYNs from random sources of a prefix;
- ``Sniffer(iface)``: every IPv4 packet arriving on ``iface``, captured by an
  AF_PACKET socket before the IP layer (which would drop martians silently).
"""

from __future__ import annotations

import random
import socket
import struct
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4


def whoami(sock: socket.socket) -> str:
    """``GET /whoami`` on a connected socket (kept open); the body, stripped.

    Raises ConnectionError if the peer closes before the whole answer.
    """
    sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: vip\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += _recv(sock)
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += _recv(sock)
    return body.decode().strip()


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(4096)
    if not data:
        raise ConnectionError("closed by the peer")
    return data


def csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data, as a 16-bit integer."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def syn_frames(src_mac: str, dst_mac: str, prefix: str, plen: int, daddr: str, dport: int,
               count: int, seed: int = 1) -> list[bytes]:
    """count TCP SYN frames to daddr:dport from random hosts of prefix/plen.

    Sources, ports and sequence numbers come from a seeded PRNG, so a run
    is repeatable; every checksum is right (the frames must look legitimate
    to the director, only their number is hostile).
    """
    rnd = random.Random(seed)
    base = struct.unpack("!I", socket.inet_aton(prefix))[0]
    eth = mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ETH_P_IP)
    dst = socket.inet_aton(daddr)
    frames = []
    for _ in range(count):
        src = struct.pack("!I", base | rnd.getrandbits(32 - plen) | 1)
        sport, seq = rnd.randrange(1024, 65536), rnd.getrandbits(32)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
        tcp = tcp[:16] + struct.pack("!H", csum(src + dst + struct.pack("!BBH", 0, 6, 20)
                                                + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, rnd.getrandbits(16), 0x4000, 64, 6, 0,
                         src, dst)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        frames.append(eth + ip + tcp)
    return frames


def send_frames(iface: str, frames: list[bytes], pps: float = 0.0) -> float:
    """Send frames out of iface (AF_PACKET); pps > 0 paces them. Seconds taken."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    t0 = time.monotonic()
    try:
        for i, f in enumerate(frames):
            if pps > 0 and i % 100 == 0:
                ahead = i / pps - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            try:
                s.send(f)
            except BlockingIOError:
                time.sleep(0.001)  # the device queue is full: a lost frame, as on a wire
    finally:
        s.close()
    return time.monotonic() - t0


class Sniffer:
    """IPv4 packets arriving on iface (not the ones it sends), from creation on."""

    def __init__(self, iface: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((iface, 0))

    def collect(self, seconds: float) -> list[bytes]:
        """IP packets (Ethernet header stripped) received within seconds."""
        out = []
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            self.sock.settimeout(left)
            try:
                frame, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                return out
            if addr[2] != PACKET_OUTGOING and frame[12:14] == b"\x08\x00":
                out.append(frame[14:])
