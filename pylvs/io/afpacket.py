"""The AF_PACKET backend: one TPACKET_V2 or V3 receive ring per interface.

Each port is an AF_PACKET socket bound with ETH_P_ALL to one interface, so it
sees frames before nft netdev ingress (where steering drops the kernel's copy
of stolen traffic). A BPF filter keeps everything but virtual-service traffic
out of the ring. The socket has PACKET_VNET_HDR, so frames arrive and leave
with a virtio_net_hdr (partial checksums and 64 KiB GSO frames survive the
trip), PACKET_IGNORE_OUTGOING (our own transmissions are not read back) and,
by default, PACKET_QDISC_BYPASS: sendmmsg hands frames straight to the
driver (``__dev_direct_xmit``), skipping the qdisc and the taps that
``dev_queue_xmit`` feeds, so packet sockets of the director (tcpdump) do not
see what pylvs sends. ``qdisc_bypass=False`` (``pylvs run --no-qdisc-bypass``)
sends through ``dev_queue_xmit``: tc qdiscs apply and tcpdump sees both sides.

``forward`` is the fast path (C, frames processed in the ring); ``recv`` and
``send`` copy through a Batch for engines written in Python.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading

from .. import _fast
from ..engine import tables
from . import bpf
from . import CopyLoop, Port

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
PACKET_STATISTICS = 6
PACKET_FANOUT = 18
PACKET_FANOUT_DATA = 22
PACKET_FANOUT_CBPF = 6
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_COPY_THRESH = 7
SO_RCVBUFFORCE = 33

# A block holds at least one 64 KiB GSO frame with its headers; a short
# retire timeout bounds the latency of a lone packet to about a millisecond.
# At low and middle rates every block retires after that millisecond with a
# few frames in it, so the number of blocks, not their size, says how long
# the data thread may be off the CPU before the ring overflows: 64 blocks,
# about 64 ms, 8 MiB per port.
BLOCK_SIZE = 1 << 17
BLOCK_NR = 64
FRAME_SIZE = 2048
RETIRE_MS = 1
# TPACKET_V2 (``ring="v2"``, pylvs run --ring v2): the same 8 MiB as 4096
# slots of 2 KiB, each handed to user space as soon as it is written (no
# retire timer: V3 blocks retire on jiffies, 4 ms at HZ=250, whatever
# RETIRE_MS asks). A frame too big for its slot (a GSO frame) is also queued
# on the socket (PACKET_COPY_THRESH) and read with recv(): COPY_RCVBUF bytes
# of them. V3 stays the default: with V2 the kernel wakes the poller per
# frame and the 64-byte batch rate fell by about a third (docs/io.md).
RINGS = ("v2", "v3")
DEFAULT_RING = "v3"
COPY_RCVBUF = 8 << 20


def attach_filter(sock: socket.socket, prog: list[bpf.Insn], level: int = socket.SOL_SOCKET,
                  option: int = SO_ATTACH_FILTER) -> None:
    """SO_ATTACH_FILTER (or another option taking a struct sock_fprog, such
    as PACKET_FANOUT_DATA): replaces the program in one step."""
    code = bpf.pack(prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(level, option, fprog)


def join_fanout(sock: socket.socket, group: int) -> int:
    """Join the socket (bound) to PACKET_FANOUT_CBPF group ``group`` of its
    interface, or to a new group with an id the kernel picks when ``group``
    is 0 (PACKET_FANOUT_FLAG_UNIQUEID); returns the group id. Members are
    numbered in join order (af_packet.c __fanout_link). OSError from the
    kernel (EINVAL: an existing group of another type or device)."""
    if group == 0:
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT,
                        (PACKET_FANOUT_CBPF | PACKET_FANOUT_FLAG_UNIQUEID) << 16)
        return struct.unpack("I", sock.getsockopt(SOL_PACKET, PACKET_FANOUT, 4))[0] & 0xFFFF
    sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | PACKET_FANOUT_CBPF << 16)
    return group


SIOCGIFFLAGS = 0x8913
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
ARPHRD_ETHER = 1


def _ifreq(name: str, request: int) -> bytes:
    # ioctls answer for the caller's network namespace, whatever /sys shows
    # (a namespace entered without remounting sysfs sees the root's /sys).
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, struct.pack("16s24x", name.encode()))


def interface_info(name: str) -> tuple[int, int, bytes]:
    """(flags, ARPHRD type, MAC) of an interface of this namespace."""
    flags = struct.unpack_from("H", _ifreq(name, SIOCGIFFLAGS), 16)[0]
    hw = _ifreq(name, SIOCGIFHWADDR)
    family = struct.unpack_from("H", hw, 16)[0]
    return flags, family, hw[18:24]


def up_ethernet_interfaces() -> list[str]:
    """Every Ethernet interface of this namespace that is up (not loopback)."""
    out = []
    for _, name in sorted(socket.if_nameindex()):
        try:
            flags, family, _ = interface_info(name)
        except OSError:
            continue
        if family == ARPHRD_ETHER and flags & IFF_UP and not flags & IFF_LOOPBACK:
            out.append(name)
    return out


def _mac_of(name: str) -> bytes:
    return interface_info(name)[2]


class AfPacketBackend(CopyLoop):
    def __init__(self, ifnames: list[str], *, block_size: int = BLOCK_SIZE,
                 block_nr: int = BLOCK_NR, retire_ms: int = RETIRE_MS,
                 qdisc_bypass: bool = True, pcap: str | None = None,
                 fanout: list[int] | None = None, ring: str = DEFAULT_RING,
                 local: bool = False):
        """One port per name in ``ifnames`` (index = the engine's port).

        ``fanout``: one worker's instance of several (``open_workers``): per
        port, the PACKET_FANOUT_CBPF group its socket joins (0: a new group;
        ``fanout_ids`` then holds the ids the kernel chose); ``set_filter``
        also sets the group's steering program (bpf.fanout_program). None:
        the only instance, no fanout.

        ``qdisc_bypass``: set PACKET_QDISC_BYPASS on every socket (the fast
        default); False sends through the qdisc layer, where the kernel's
        taps (tcpdump on the director) see the transmitted frames.
        ``pcap``: a file to which every frame sent is also written
        (pylvs/io/pcap.py). ``ring``: "v3" (TPACKET_V3 blocks, RETIRE_MS)
        or "v2" (TPACKET_V2 frames, no retire wait). ``local``: one more
        port, the loopback interface, for clients on the director itself
        (pylvs/io/local.py): it takes only their requests and sends on a raw
        IP socket. Raises OSError for an
        interface not in this network namespace or a pcap file that cannot
        be created; ValueError for another ``ring``.
        """
        if ring not in RINGS:
            raise ValueError(f"ring must be one of {RINGS}, not {ring!r}")
        self.ring = ring
        if not ifnames:
            raise ValueError("AfPacketBackend needs at least one interface")
        self.ports: list[Port] = []
        self.socks: list[socket.socket] = []
        self.rings: list = []
        self._lock = threading.Lock()
        self._prog = bpf.reject_all()
        self._kernel_drops = 0
        self._kernel_freezes = 0
        self.qdisc_bypass = qdisc_bypass
        self.pcap = None
        self.fanout_ids: list[int] | None = None if fanout is None else []
        self.local = local
        self._raw: list[socket.socket] = []
        if local:
            from .local import loopback_name
            ifnames = [*ifnames, loopback_name()]
        if fanout is not None and len(fanout) != len(ifnames):
            raise ValueError("fanout needs one group id per interface")
        try:
            for i, name in enumerate(ifnames):
                try:
                    ifindex = socket.if_nametoindex(name)
                except OSError:
                    raise OSError(f"no interface {name!r} in this network namespace") from None
                is_lo = local and i == len(ifnames) - 1
                self.ports.append(Port(i, name, ifindex, _mac_of(name), local=is_lo))
                # Protocol 0 until bound: nothing is queued before the filter
                # and the ring are in place.
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                self.socks.append(s)
                attach_filter(s, self._prog)
                s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)  # must precede the ring
                s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                if qdisc_bypass:
                    s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
                if ring == "v2":
                    s.setsockopt(SOL_PACKET, PACKET_COPY_THRESH, 1)
                    try:   # CAP_NET_ADMIN lifts net.core.rmem_max
                        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, COPY_RCVBUF)
                    except OSError:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, COPY_RCVBUF)
                self.rings.append(_fast.Ring(s.fileno(), block_size=block_size,
                                             block_nr=block_nr, frame_size=FRAME_SIZE,
                                             retire_ms=retire_ms,
                                             version=2 if ring == "v2" else 3))
                if is_lo:
                    from .local import raw_socket
                    self._raw.append(raw_socket())
                    self.rings[-1].set_local_fd(self._raw[-1].fileno())
                s.bind((name, ETH_P_ALL))
                if fanout is not None:   # after bind: only a bound socket may join
                    self.fanout_ids.append(join_fanout(s, fanout[i]))
            if pcap is not None:
                from .pcap import PcapWriter
                self.pcap = PcapWriter(pcap, self.rings)
        except BaseException:
            self.close()
            raise

    # --- the data path ----------------------------------------------------

    def forward(self, engine, now: float, timeout: float, batch: tables.Batch | None = None) -> int:
        """Receive, run the engine, send; returns the frames handed to the engine."""
        ms = max(0, int(timeout * 1000))
        if _fast.Engine is not None and isinstance(engine, _fast.Engine):
            return _fast.forward(engine, self.rings, now, ms)
        return self._copy_forward(engine, now, timeout, batch)

    def recv(self, batch: tables.Batch, timeout: float) -> int:
        n = _fast.ring_recv(self.rings, batch.buf, batch.length, batch.in_port,
                            max(0, int(timeout * 1000)))
        batch.count = n
        batch.emit_n[:] = 0   # nothing made yet: a send before process sends no stale frames
        batch.verdict[:n] = tables.V_PASS
        batch.out_port[:n] = 0
        return n

    def send(self, batch: tables.Batch) -> int:
        """Send the batch's V_TX frames, then the frames the engine made
        (its emit area: ICMP errors, RSTs, fragments); returns frames sent."""
        n = _fast.ring_send(self.rings, batch.buf, batch.length, batch.verdict,
                            batch.out_port, batch.count)
        if batch.emit_n[0]:
            n += _fast.emit_send(self.rings, batch.emit_buf, batch.emit_off, batch.emit_len,
                                 batch.emit_port, batch.emit_n)
        return n

    # --- control ----------------------------------------------------------

    def set_filter(self, services, dests, own_addrs=()) -> None:
        """Let only the traffic of these tables into the rings (and ICMP
        errors to ``own_addrs`` while a Tun dest exists: bpf.for_tables)."""
        prog = bpf.for_tables(services, dests, own_addrs, from_services=self.local)
        lo_prog = bpf.for_local(services) if self.local else prog
        steer = None if self.fanout_ids is None else bpf.fanout_program(services, dests)
        with self._lock:
            for s, port in zip(self.socks, self.ports):
                # The steering program first: a frame of a new service must
                # reach the worker its replies will reach.
                if steer is not None:
                    attach_filter(s, steer, SOL_PACKET, PACKET_FANOUT_DATA)
                attach_filter(s, lo_prog if port.local else prog)
            self._prog = prog

    def stats(self) -> dict[str, int]:
        """Ring counters summed over ports (``tx_*``: frames given V_TX;
        ``emit_*``: frames the engine made; ``tx_emsgsize``: sends of either
        kind refused as bigger than the egress MTU), plus ``rx_dropped``: frames the
        kernel could not put in a full ring (the data thread fell behind),
        and ``rx_freezes``: how often the kernel found its next block still
        held by user space (tp_freeze_q_cnt; always 0 with a V2 ring),
        and ``rx_copied``: V2 frames too big for a slot, read with recv().
        With a pcap file, also
        ``pcap_frames``, ``pcap_dropped``, ``pcap_write_errors``."""
        names = ("rx_frames", "rx_blocks", "rx_copied", "rx_truncated", "rx_vlan", "rx_oversize",
                 "tx_frames", "tx_errors", "tx_bad_port", "sock_errors",
                 "emit_sent", "emit_errors", "tx_emsgsize",
                 "polls", "poll_timeouts", "fwd_calls", "fwd_budget_cuts", "fwd_blocks")
        out = {n: sum(getattr(r, n) for r in self.rings) for n in names}
        with self._lock:
            for s in self.socks:
                # struct tpacket_stats_v3, or struct tpacket_stats (no
                # freeze count) for V2; reading resets the kernel's counts.
                try:
                    raw = s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
                except OSError:
                    continue
                _, drops, freezes = struct.unpack("III", raw.ljust(12, b"\0"))
                self._kernel_drops += drops
                self._kernel_freezes += freezes
            out["rx_dropped"] = self._kernel_drops
            out["rx_freezes"] = self._kernel_freezes
        out["fwd_max_blocks"] = max((r.fwd_max_blocks for r in self.rings), default=0)
        if self.pcap is not None:
            out.update(self.pcap.stats())
        return out

    def close(self) -> None:
        if self.pcap is not None:
            self.pcap.stop()
        for r in self.rings:
            r.close()
        for s in self.socks + self._raw:
            s.close()
        self.rings = []
        self.socks = []
        self._raw = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
