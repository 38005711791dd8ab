"""The AF_PACKET backend: TPACKET_V3 and TPACKET_V2 receive rings per interface.

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
from pathlib import Path

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
PACKET_FANOUT_EBPF = 7
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
# of them. With V2 alone the kernel wakes the poller per frame and the
# 64-byte batch rate fell by about a third (docs/io.md); with V3 alone a lone
# frame waits for the retire timer. ``ring="auto"`` (the default) has both:
# each port's socket has a V3 ring and a second socket on the same interface
# a V2 ring (its "lane"), both members of one fanout group, and the group's
# program sends every frame to the lane while the rate is low and to the V3
# ring while it is high (LaneSwitch).
RINGS = ("auto", "v2", "v3")
DEFAULT_RING = "auto"
COPY_RCVBUF = 8 << 20
# LaneSwitch: frames per second per worker above which frames go to the V3
# rings, and below which they come back to the V2 lanes, measured over
# LANE_WINDOW seconds. The gap is hysteresis, so a rate near one edge does
# not flip the program every window. Up: well under the ~220k 64-byte frames
# per second a V2 ring carried per worker; down: where a V3 block takes
# longer than its retire timer to fill anyway.
LANE_UP_PPS = 60_000
LANE_DOWN_PPS = 20_000
LANE_WINDOW = 0.1


def attach_filter(sock: socket.socket, prog: list[bpf.Insn], level: int = socket.SOL_SOCKET,
                  option: int = SO_ATTACH_FILTER) -> None:
    """SO_ATTACH_FILTER (or another option taking a struct sock_fprog, such
    as PACKET_FANOUT_DATA): replaces the program in one step."""
    code = bpf.pack(prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(level, option, fprog)


def join_fanout(sock: socket.socket, group: int, kind: int = PACKET_FANOUT_CBPF) -> int:
    """Join the socket (bound) to fanout group ``group`` of its interface,
    of ``kind`` (PACKET_FANOUT_CBPF or PACKET_FANOUT_EBPF), or to a new
    group with an id the kernel picks when ``group`` is 0
    (PACKET_FANOUT_FLAG_UNIQUEID); returns the group id. Members are
    numbered in join order (af_packet.c __fanout_link). OSError from the
    kernel (EINVAL: an existing group of another type or device)."""
    if group == 0:
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT, (kind | PACKET_FANOUT_FLAG_UNIQUEID) << 16)
        return struct.unpack("I", sock.getsockopt(SOL_PACKET, PACKET_FANOUT, 4))[0] & 0xFFFF
    sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | kind << 16)
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


class LaneSwitch:
    """Where the adaptive ring (``ring="auto"``) puts each worker's frames:
    its V3 ring (lane 0: blocks, the batch rate) or its V2 lane (lane 1: a
    frame handed over as soon as it is written, the latency). One switch
    serves every instance of a backend (``open_workers``): the fanout
    groups' program is shared, so the choice is global. It starts on the V2
    lanes (an idle director answers its first frames at once).

    ``observe(frames, now)`` (seconds, monotonic) is called after each
    forward call; every LANE_WINDOW seconds it compares the frames per
    second per worker with LANE_UP_PPS / LANE_DOWN_PPS and, when the lane
    changes, replaces the groups' classic program (PACKET_FANOUT_DATA,
    atomic in af_packet.c), or with ``steer`` (the groups run the eBPF
    FanoutSteering program) writes the lane into its map. Frames of a flow already queued on the other ring are
    read in the same forward call, ring first, then its lane: a switch may
    reorder a few frames of a flow once."""

    def __init__(self, workers: int, *, up_pps: float = LANE_UP_PPS,
                 down_pps: float = LANE_DOWN_PPS, window: float = LANE_WINDOW,
                 steer: "FanoutSteering | None" = None):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if not 0 <= down_pps < up_pps or window <= 0:
            raise ValueError("need 0 <= down_pps < up_pps and window > 0")
        self.workers = workers
        self.up_pps, self.down_pps, self.window = up_pps, down_pps, window
        self.lane = 1
        self.switches = 0
        self._lock = threading.Lock()
        self._tables = None
        self._progs: tuple | None = None
        self._socks: list[socket.socket] = []   # one member per group
        # The eBPF fanout program, when the groups run it: the lane is then
        # one map update, not a program per group.
        self.steer = steer
        self._frames = 0
        self._t0: float | None = None

    def program(self, services, dests) -> list[bpf.Insn]:
        """The current lane's fanout program for these tables (both lanes'
        programs are built here, once per table publication)."""
        with self._lock:
            if self._tables is None or self._tables[0] is not services or self._tables[1] is not dests:
                self._progs = tuple(bpf.fanout_program(services, dests, lanes=(self.workers, lane))
                                    for lane in (0, 1))
                self._tables = (services, dests)
            return self._progs[self.lane]

    def add_group(self, sock: socket.socket) -> None:
        """A member of a fanout group whose program follows the switch."""
        with self._lock:
            self._socks.append(sock)

    def observe(self, frames: int, now: float) -> None:
        self._frames += frames
        if self._t0 is None:
            self._t0 = now
            return
        dt = now - self._t0
        if dt < self.window:
            return
        rate = self._frames / dt / self.workers
        self._frames, self._t0 = 0, now
        want = self.lane
        if self.lane == 1 and rate > self.up_pps:
            want = 0
        elif self.lane == 0 and rate < self.down_pps:
            want = 1
        if want != self.lane:
            self.set_lane(want)

    def set_lane(self, lane: int) -> None:
        """Send every worker's frames to lane 0 (V3) or 1 (V2) from now on."""
        with self._lock:
            self.lane = lane
            self.switches += 1
            if self.steer is not None:
                self.steer.set_lane(lane)
                return
            if self._progs is None:
                return
            for s in self._socks:
                try:
                    attach_filter(s, self._progs[lane], SOL_PACKET, PACKET_FANOUT_DATA)
                except OSError:   # the socket closed under us: the next publish sets it
                    pass


FANOUT_OBJECT = Path(__file__).resolve().parents[1] / "bpf" / "fanout.bpf.o"
FANOUT_PROG = "pylvs_fanout"


class FanoutSteering:
    """The eBPF fanout program (pylvs/bpf/fanout.bpf.c) every fanout group
    of a backend's workers runs (PACKET_FANOUT_EBPF): the steering rule of
    docs/io.md keyed by (proto, addr, port) whatever the tables' size,
    where the classic program falls back to addresses, then to the source
    address alone (bpf.fanout_plan), which sends NAT replies to a worker
    without their conn. One object serves every instance (``open_workers``);
    its sets follow the tables (``apply``), the ring choice is one map
    update (``set_lane``), and the groups hold the program once ``attach``
    gave it to them.

    ``workers``: members are numbered per worker; ``lanes``: two members a
    worker (the adaptive ring: V3 ring, V2 lane), ``lane`` the one frames
    go to. ``max_services`` / ``max_dests`` size the sets (allocated as
    they fill). OSError when the program cannot be loaded (no CAP_BPF,
    pylvs._bpf not built)."""

    def __init__(self, workers: int, *, lanes: bool = False, lane: int = 1,
                 max_services: int = 16384, max_dests: int = 131072):
        from ..control.steering import (CLIENT_SETS, STEER_MASK, ClientSets, _why,
                                        client_set_sizes, load_object)

        self.workers, self.lanes, self.lane = workers, lanes, lane
        self.fd, self.prog_id = -1, 0
        self._lock = threading.Lock()

        def attach(obj) -> None:
            self.fd, self.prog_id = obj.prog_fd(FANOUT_PROG)
        try:
            self.maps = load_object(FANOUT_OBJECT, client_set_sizes(max_services, max_dests),
                                    (*CLIENT_SETS, STEER_MASK, "conf"), attach)
        except (OSError, KeyError, ValueError) as e:
            raise OSError(f"the eBPF fanout program: {_why(e)}") from None
        self._sets = ClientSets(self.maps)
        self._write_conf()

    def _write_conf(self) -> None:
        self.maps["conf"].update(struct.pack("I", 0), struct.pack(
            "III", self.workers, int(self.lanes), self.lane))

    def attach(self, sock: socket.socket) -> None:
        """Make the program the steering of the PACKET_FANOUT_EBPF group
        ``sock`` is a member of (PACKET_FANOUT_DATA: the group holds it)."""
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT_DATA, struct.pack("i", self.fd))

    def apply(self, services, dests) -> None:
        """The sets of these tables (steering.ClientSets); the same tables
        again: nothing to do. OSError (E2BIG) when a set outgrows its map."""
        self._sets.follow(services, dests)

    def set_lane(self, lane: int) -> None:
        """With lanes: every worker's frames to its V3 ring (0) or V2 lane (1)."""
        with self._lock:
            self.lane = lane
            self._write_conf()

    def close(self) -> None:
        """Drop this process's hold on the program and its maps (groups that
        still exist keep them); again: no-op."""
        import os

        for m in getattr(self, "maps", {}).values():
            m.close()
        self.maps = {}
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class AfPacketBackend(CopyLoop):
    def __init__(self, ifnames: list[str], *, block_size: int = BLOCK_SIZE,
                 block_nr: int = BLOCK_NR, retire_ms: int = RETIRE_MS,
                 qdisc_bypass: bool = True, pcap: str | None = None,
                 fanout: list[int] | None = None, ring: str = DEFAULT_RING,
                 lanes: LaneSwitch | None = None, local: bool = False,
                 fanout_steer: FanoutSteering | None = None):
        """One port per name in ``ifnames`` (index = the engine's port).

        ``fanout``: one worker's instance of several (``open_workers``): per
        port, the PACKET_FANOUT_CBPF group its socket joins (0: a new group;
        ``fanout_ids`` then holds the ids the kernel chose); ``set_filter``
        also sets the group's steering program (bpf.fanout_program). None:
        the only instance, no fanout (but see ``ring="auto"``). ``fanout_steer``:
        the groups run this eBPF program (PACKET_FANOUT_EBPF; the instance
        that makes a group gives it the program and closes it at the end)
        instead of the classic one.

        ``qdisc_bypass``: set PACKET_QDISC_BYPASS on every socket (the fast
        default); False sends through the qdisc layer, where the kernel's
        taps (tcpdump on the director) see the transmitted frames.
        ``pcap``: a file to which every frame sent is also written
        (pylvs/io/pcap.py). ``ring``: "v3" (TPACKET_V3 blocks, RETIRE_MS),
        "v2" (TPACKET_V2 frames, no retire wait) or "auto" (both per port,
        the V2 ring as the V3 ring's lane, both in one fanout group, the
        group's program choosing by rate: ``lanes``, the LaneSwitch shared
        by every instance, or a new one for a lone instance). ``local``: one
        more port, the loopback interface, for clients on the director
        itself (pylvs/io/local.py): it takes only their requests and sends
        on a raw IP socket. Raises OSError
        for an interface not in this network namespace or a pcap file that
        cannot be created; ValueError for another ``ring``.
        """
        if ring not in RINGS:
            raise ValueError(f"ring must be one of {RINGS}, not {ring!r}")
        self.ring = ring
        self.lanes = None if ring != "auto" else lanes if lanes is not None else LaneSwitch(1)
        if self.lanes is not None and fanout is None:
            fanout = [0] * (len(ifnames) + local)   # local: the loopback port's group too
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
        self.fanout_steer = fanout_steer
        self._steer_owner = False
        kind = PACKET_FANOUT_CBPF if fanout_steer is None else PACKET_FANOUT_EBPF
        self.lane_rings: list = []
        self._lane_owner = False   # the instance that made the groups reports the switch
        self.local = local
        self._raw: list[socket.socket] = []
        self._lo_socks: list[socket.socket] = []   # the loopback port's (ring, lane)
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
                first = len(self.socks)
                s, r = self._open_ring(name, 2 if ring == "v2" else 3, block_size, block_nr,
                                       retire_ms, qdisc_bypass)
                self.rings.append(r)
                if is_lo:
                    from .local import raw_socket
                    self._raw.append(raw_socket())
                    r.set_local_fd(self._raw[-1].fileno())
                if fanout is not None:   # after bind: only a bound socket may join
                    self.fanout_ids.append(join_fanout(s, fanout[i], kind))
                    if fanout_steer is not None and fanout[i] == 0:
                        fanout_steer.attach(s)
                        self._steer_owner = True
                if self.lanes is not None:
                    # The lane joins right after its ring: worker k's members
                    # are 2k (V3) and 2k+1 (V2), as the program numbers them.
                    ls, lr = self._open_ring(name, 2, block_size, block_nr, retire_ms, qdisc_bypass)
                    join_fanout(ls, self.fanout_ids[i], kind)
                    r.set_lane(lr)
                    if fanout[i] == 0:
                        self.lanes.add_group(s)
                        self._lane_owner = True
                if is_lo:
                    self._lo_socks = self.socks[first:]
            if pcap is not None:
                from .pcap import PcapWriter
                self.pcap = PcapWriter(pcap, self.rings)
        except BaseException:
            self.close()
            raise

    def _open_ring(self, name: str, version: int, block_size: int, block_nr: int,
                   retire_ms: int, qdisc_bypass: bool):
        """A configured socket bound to ``name`` and its ring (version 2 or 3)."""
        # Protocol 0 until bound: nothing is queued before the filter
        # and the ring are in place.
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.socks.append(s)
        attach_filter(s, self._prog)
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)  # must precede the ring
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        if qdisc_bypass:
            s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        if version == 2:
            s.setsockopt(SOL_PACKET, PACKET_COPY_THRESH, 1)
            try:   # CAP_NET_ADMIN lifts net.core.rmem_max
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, COPY_RCVBUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, COPY_RCVBUF)
        r = _fast.Ring(s.fileno(), block_size=block_size, block_nr=block_nr,
                       frame_size=FRAME_SIZE, retire_ms=retire_ms, version=version)
        if version == 2 and self.lanes is not None:
            self.lane_rings.append(r)
        s.bind((name, ETH_P_ALL))
        return s, r

    # --- the data path ----------------------------------------------------

    def forward(self, engine, now: float, timeout: float, batch: tables.Batch | None = None) -> int:
        """Receive, run the engine, send; returns the frames handed to the engine."""
        ms = max(0, int(timeout * 1000))
        if _fast.Engine is not None and isinstance(engine, _fast.Engine):
            n = _fast.forward(engine, self.rings, now, ms)
        else:
            n = self._copy_forward(engine, now, timeout, batch)
        if self.lanes is not None:
            self.lanes.observe(n, now)
        return n

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
        if self.fanout_steer is not None:
            # Its sets first: a frame of a new service must reach the
            # worker its replies will reach.
            self.fanout_steer.apply(services, dests)
            steer = None
        elif self.lanes is not None:
            steer = self.lanes.program(services, dests)
        elif self.fanout_ids is not None:
            steer = bpf.fanout_program(services, dests)
        else:
            steer = None
        with self._lock:
            for s in self.socks:
                # The steering program first: a frame of a new service must
                # reach the worker its replies will reach.
                if steer is not None:
                    attach_filter(s, steer, SOL_PACKET, PACKET_FANOUT_DATA)
                attach_filter(s, lo_prog if s in self._lo_socks else prog)
            self._prog = prog

    def steer_plan(self, services, dests) -> str:
        """How this backend's fanout keys these tables: bpf.FANOUT_FULL with
        the eBPF program (or no fanout), else the classic program's
        bpf.fanout_plan."""
        if self.fanout_steer is not None or self.fanout_ids is None:
            return bpf.FANOUT_FULL
        return bpf.fanout_plan(services, dests, self.lanes is not None)

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
        out = {n: sum(getattr(r, n) for r in self.rings + self.lane_rings) for n in names}
        if self.lanes is not None:
            out["rx_lane_slots"] = sum(r.rx_blocks for r in self.lane_rings)
        if self._lane_owner:
            # Where frames go now (0: the V3 rings, 1: the V2 lanes): one
            # switch for all workers, reported once so that sums stay true.
            out["ring_lane"] = self.lanes.lane
            out["ring_lane_switches"] = self.lanes.switches
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
        if self._steer_owner:
            self.fanout_steer.close()
        for r in self.rings:
            r.set_lane(None)
        for r in self.rings + self.lane_rings:
            r.close()
        for s in self.socks + self._raw:
            s.close()
        self.rings = []
        self.lane_rings = []
        self.socks = []
        self._raw = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
