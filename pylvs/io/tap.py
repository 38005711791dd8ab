"""The TAP backend: the director as a plain process behind TAP ports.

``pylvs run --tap NAME --addr DIP/PLEN [--gateway GW]``: each TAP device
(python-pytun) is one port. Every frame the kernel hands to the TAP (the
bridge it is a port of, or a hypervisor's switch) reaches pylvs only, and
what pylvs writes leaves through it; no AF_PACKET socket, no socket filter,
no steering away from the kernel (BPF or nft), and the namespace's own
addresses and routes play no part.
The director's addresses, ARP and echo live in ``TapHost``
(pylvs/io/taphost.py): the engine passes (V_PASS) what is not virtual-service
traffic and ``send`` hands those frames to it.

Each TAP is opened with:

- ``IFF_TAP | IFF_NO_PI``: Ethernet frames without the 4-byte packet info;
- ``IFF_VNET_HDR`` (header size 10, ``TUNSETVNETHDRSZ``) and ``TUNSETOFFLOAD``
  ``TUN_F_CSUM | TUN_F_TSO4``: the kernel hands over frames with partial
  checksums and 64 KiB TCPv4 GSO frames with their virtio_net_hdr, and takes
  ours the same way, as the AF_PACKET rings with PACKET_VNET_HDR do (the
  engine's frame format). Without the offload flags the kernel would
  segment and checksum every frame before the TAP (drivers/net/tun.c drops
  the features it was not told about). A frame of up to 10 + 14 + 65535
  bytes is read in one ``read`` (DESIGN.md: a TAP read needs room for the
  whole frame, more than the MTU with GSO);
- ``IFF_MULTI_QUEUE``: each open of the same name is one more queue of the
  device, numbered in open order, so worker i owns queue i of every TAP
  (``open_workers``).

Which queue a frame the kernel sends to the TAP goes to is, with more than
one worker, the choice of the steering program pylvs/bpf/tap_steer.bpf.c
(``TapSteering``, TUNSETSTEERINGEBPF): the client address of the frame,
mixed and taken modulo the queues, the rule of the AF_PACKET fanout
(docs/io.md, "Workers"), so both directions of a conn reach the worker that
holds it. Frames without a client address (ARP) go to queue 0. What pylvs
writes may go through any queue: the kernel takes a written frame as
received on the device whichever queue it came through.

The director's host (ARP, echo, neighbours: ``TapHost``) is one for all
workers: a worker hands it the frames its engine passed and answers from
its own thread (ARP reaches worker 0, an echo request the worker of its
sender); the neighbour table is under the host's lock, and its timer thread
sends through worker 0's queues.

The director's MAC on a port is not the TAP device's own: the bridge keeps a
port's own address as a local FDB entry and delivers frames to it to the
bridge's host stack instead of out of the port. pylvs takes a locally
administered MAC (``--mac``, or random at each start, announced by
gratuitous ARP) as a VM's NIC does behind its host's TAP.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import select
import struct
from pathlib import Path

import numpy as np

from .. import _fast
from ..control.steering import (CLIENT_SETS, STEER_MASK, ClientSets, _why,
                                client_set_sizes, load_object)
from ..engine import tables
from . import Port
from .taphost import Iface, TapHost, vips_of

log = logging.getLogger("pylvs.tap")

TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETSTEERINGEBPF = 0x800454E0   # _IOR('T', 224, int)
BPF_OBJECT = Path(__file__).resolve().parents[1] / "bpf" / "tap_steer.bpf.o"
BPF_PROG = "pylvs_tap_steer"
TUN_F_CSUM, TUN_F_TSO4 = 0x01, 0x02
BATCH = 64   # frames read per forward call at most (each a read syscall)
# The backend's counters, in the order _fast.tap_forward writes them (tap.c).
TAP_COUNTERS = ("rx_frames", "rx_oversize", "tx_frames", "tx_errors", "emit_sent",
                "emit_errors", "tx_bad_port", "polls", "poll_timeouts", "fwd_calls", "rx_errors")
TAP_INDEX = {name: i for i, name in enumerate(TAP_COUNTERS)}
EMIT_PER_FRAME = 96 << 10


def random_mac() -> bytes:
    """A random unicast, locally administered MAC (IEEE 802: bit 1 of the
    first octet set, bit 0 clear)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return bytes(b)


def parse_mac(text: str) -> bytes:
    """"aa:bb:cc:dd:ee:ff" → 6 bytes; ValueError for anything else, a
    multicast or an all-zero MAC."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None
    if mac[0] & 1 or mac == bytes(6):
        raise ValueError(f"not a unicast MAC address: {text!r}")
    return mac


def parse_addr(text: str) -> tuple[int, int]:
    """"DIP/PLEN" → (address, prefix length), host order; ValueError."""
    try:
        iface = ipaddress.IPv4Interface(text if "/" in text else text + "/32")
    except ValueError as e:
        raise ValueError(f"--addr {text!r}: {e}") from None
    if "/" not in text:
        raise ValueError(f"--addr {text!r}: give the prefix length (DIP/PLEN)")
    return int(iface.ip), iface.network.prefixlen


def open_tap(name: str):
    """One queue of TAP device ``name`` (created if missing, brought up)
    with the flags of the module docstring; the pytun device."""
    import pytun

    flags = pytun.IFF_TAP | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR | pytun.IFF_MULTI_QUEUE
    try:
        dev = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as e:
        raise OSError(f"cannot open TAP {name!r}: {e} (a device created without "
                      "multi_queue, or not a TAP?)") from None
    try:
        fcntl.ioctl(dev.fileno(), TUNSETVNETHDRSZ, struct.pack("i", tables.VNET_HDR_LEN))
        fcntl.ioctl(dev.fileno(), TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
        os.set_blocking(dev.fileno(), False)
        dev.up()
    except BaseException:
        dev.close()
        raise
    return dev


class TapBackend:
    """One queue of each TAP in ``names`` (index = the engine's port), with
    the director's MAC ``macs[i]`` there, sharing ``host`` (the director's
    addresses, ARP, echo; set before the first frame) with the other
    workers' instances. Same methods as AfPacketBackend.

    ``primary``: the instance that reports the host's counters and the
    devices' (one per director, worker 0's, so that sums over workers
    count them once) and holds ``steering`` (a TapSteering or None)."""

    def __init__(self, names: list[str], macs: list[bytes], host: TapHost | None = None):
        if not names:
            raise ValueError("TapBackend needs at least one TAP")
        self.host = host
        self.primary = True
        self.steering: TapSteering | None = None
        self.devs = []
        self.ports: list[Port] = []
        # Written by _fast.tap_forward (tap.c) or the Python loop alike.
        self._counts = np.zeros(len(TAP_COUNTERS), dtype=np.uint64)
        # Room in the emit area for every frame of a batch to be a 64 KiB
        # GSO frame cut into segments and tunneled (VS-Tun): what one frame
        # makes stays under 96 KiB in 64 frames (MTU 1280 and more;
        # docs/io.md says the same of the AF_PACKET loop), so the engine
        # never meets a full area (emit_overflow).
        self._batch = tables.Batch(BATCH, tables.MAX_FRAME, emit_bytes=BATCH * EMIT_PER_FRAME,
                                   emit_max=BATCH * 64)
        try:
            for i, name in enumerate(names):
                dev = open_tap(name)
                self.devs.append(dev)
                self.ports.append(Port(i, name, _ifindex(name), macs[i]))
        except BaseException:
            self.close()
            raise
        self.fds = [d.fileno() for d in self.devs]
        self._poll = select.poll()
        for fd in self.fds:
            self._poll.register(fd, select.POLLIN)

    # --- the data path ------------------------------------------------------

    def forward(self, engine, now: float, timeout: float) -> int:
        """Read what the TAPs hold (waiting up to ``timeout`` s), run the
        engine, write the results; returns the frames handed to the engine.
        The C engine runs in _fast.tap_forward (system calls without the
        GIL, V_PASS frames handed back for the host); other engines through
        recv/process/send."""
        ms = max(0, int(timeout * 1000))
        if _fast.Engine is not None and isinstance(engine, _fast.Engine):
            b = self._batch
            n, passed = _fast.tap_forward(engine, self.fds, now, ms, b.buf,
                                          (b.emit_buf, b.emit_off, b.emit_len, b.emit_port),
                                          self._counts)
            for port, frame in passed:
                self.host.handle(frame, port)
            return n
        self._count("fwd_calls")
        n = self.recv(self._batch, timeout)
        if n:
            engine.process(self._batch, now)
            self.send(self._batch)
        return n

    def recv(self, batch: tables.Batch, timeout: float) -> int:
        """Up to batch.size frames, each one read() (a TAP gives one frame a
        read), ports taken in turn; waits up to ``timeout`` s for the first."""
        batch.clear()
        self._count("polls")
        if not self._poll.poll(max(0, int(timeout * 1000))):
            self._count("poll_timeouts")
            return 0
        live = list(range(len(self.fds)))
        while live and batch.count < batch.size:
            for port in list(live):
                i = batch.count
                if i >= batch.size:
                    break
                try:
                    n = os.readv(self.fds[port], [batch.buf[i]])
                except BlockingIOError:
                    live.remove(port)
                    continue
                except OSError as e:   # EBADFD while the device goes away
                    log.debug("reading port %d: %s", port, e)
                    self._count("rx_errors")
                    live.remove(port)
                    continue
                if n >= batch.slot:
                    self._count("rx_oversize")
                    continue
                batch.length[i], batch.in_port[i] = n, port
                batch.verdict[i], batch.out_port[i] = tables.V_PASS, 0
                batch.count = i + 1
        self._count("rx_frames", batch.count)
        return batch.count

    def send(self, batch: tables.Batch) -> int:
        """Write the V_TX frames to their port's TAP, then the engine's emit
        area; hand the V_PASS frames to the host (ARP, echo). Returns the
        frames written (the host's answers not included)."""
        sent = 0
        for i in range(batch.count):
            v = batch.verdict[i]
            if v == tables.V_TX:
                sent += self._write(int(batch.out_port[i]), batch.buf[i, :batch.length[i]],
                                    "tx_frames", "tx_errors")
            elif v == tables.V_PASS:
                self.host.handle(batch.buf[i, :batch.length[i]], int(batch.in_port[i]))
        for port, frame in batch.emitted():
            sent += self._write(port, frame, "emit_sent", "emit_errors")
        return sent

    def _write(self, port: int, frame, ok: str, bad: str) -> int:
        if port >= len(self.fds):
            self._count("tx_bad_port")
            return 0
        try:
            os.write(self.fds[port], frame)
        except OSError as e:   # EIO without carrier, EINVAL for a bad vnet header
            self._count(bad)
            log.debug("writing port %d: %s", port, e)
            return 0
        self._count(ok)
        return 1

    def _count(self, name: str, n: int = 1) -> None:
        self._counts[TAP_INDEX[name]] += n

    def write_frame(self, port: int, frame: bytes) -> None:
        """The host's way out (ARP requests and answers): one frame, vnet
        header included, written at once from any thread."""
        os.write(self.fds[port], frame)

    # --- control ------------------------------------------------------------

    def set_filter(self, services, dests, own_addrs=()) -> None:
        """No filter: a TAP carries only the director's traffic. The
        services' VIPs become the host's addresses (ARP, echo), and the
        steering program's sets follow the tables (OSError when a set
        outgrows its map)."""
        if not self.primary:
            return
        self.host.set_vips(vips_of(services))
        if self.steering is not None:
            self.steering.apply(services, dests)

    def stats(self) -> dict[str, int]:
        """This queue's counters; the primary instance adds the host's
        (``arp_*``, ``echo_*``, ``host_*``) and ``rx_dropped``: frames the
        kernel could not queue to the TAPs (their ``tx_dropped`` in
        /proc/net/dev: this reader's namespace)."""
        out = {k: int(v) for k, v in zip(TAP_COUNTERS, self._counts)}
        if self.primary:
            out.update(self.host.counters)
            out["rx_dropped"] = sum(_tx_dropped(p.name) for p in self.ports)
        return out

    def close(self) -> None:
        if self.steering is not None:
            self.steering.close()   # through our queues: before they close
            self.steering = None
        for d in self.devs:
            try:
                d.close()
            except Exception:
                pass
        self.devs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ifindex(name: str) -> int:
    import socket

    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def _tx_dropped(name: str) -> int:
    # /proc/net/dev: "name: rx bytes packets errs drop fifo frame compressed
    # multicast | tx bytes packets errs drop ...": tx drop is field 12.
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                ifname, _, rest = line.partition(":")
                if ifname.strip() == name:
                    return int(rest.split()[11])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TapSteering:
    """The steering program (pylvs/bpf/tap_steer.bpf.c) set on every TAP
    through ``fds`` (one queue of each), with its two maps sized
    ``max_services`` and ``max_dests``; ``apply`` fills them, ``close``
    detaches the program from every TAP. OSError when it cannot be loaded
    or set (no CAP_BPF, pylvs._bpf not built, a kernel refusal), having
    detached what it had set."""

    def __init__(self, fds: list[int], *, max_services: int = 16384, max_dests: int = 131072):
        self.fds: list[int] = []
        self.maps: dict = {}
        self.prog_id = 0

        def attach(obj) -> None:
            for fd in fds:
                self.prog_id = obj.attach_tun_steering(BPF_PROG, fd)
                self.fds.append(fd)
        try:
            self.maps = load_object(BPF_OBJECT, client_set_sizes(max_services, max_dests),
                                    (*CLIENT_SETS, STEER_MASK), attach)
        except (OSError, KeyError, ValueError) as e:
            self.close()
            raise OSError(f"TAP queue steering: {_why(e)}") from None
        self._sets = ClientSets(self.maps)

    def apply(self, services, dests) -> None:
        """Make the maps hold these tables' sets (steering.ClientSets), which
        the program keys by (proto, addr, port) whatever their size, as the
        AF_PACKET fanout and the XDP programs do. The same tables again:
        nothing to do."""
        self._sets.follow(services, dests)

    def close(self) -> None:
        """Detach the program from every TAP (a persistent one is left as
        found) and drop the maps; again: no-op."""
        for fd in self.fds:
            detach_steering(fd)
        for m in self.maps.values():
            m.close()
        self.fds, self.maps = [], {}


def detach_steering(fd: int) -> bool:
    """Take the steering program off the TAP that ``fd`` is a queue of,
    if it has one (a pylvs killed outright leaves its program on a
    persistent TAP); False when the kernel refused."""
    try:
        fcntl.ioctl(fd, TUNSETSTEERINGEBPF, struct.pack("i", -1))
    except OSError as e:
        log.debug("detaching the steering program of TAP fd %d: %s", fd, e)
        return False
    return True


def queues_open(name: str) -> int | None:
    """How many queues of TAP ``name`` are attached now (the tun driver's
    IFLA_TUN_NUM_QUEUES, read by netlink in this namespace), or None when
    the kernel does not say."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            info = ipr.link("get", ifname=name)[0].get_attr("IFLA_LINKINFO")
            n = info.get_attr("IFLA_INFO_DATA").get_attr("IFLA_TUN_NUM_QUEUES")
    except Exception as e:  # noqa: BLE001 - pyroute2 missing, NetlinkError, no such attribute
        log.debug("counting the queues of %s: %s", name, e)
        return None
    return None if n is None else int(n)


def open_workers(names: list[str], n: int, *, addrs: list[str], gateway: str | None = None,
                 mac: str | None = None, max_services: int = 16384,
                 max_dests: int = 131072) -> list[TapBackend]:
    """``n`` backends (one a worker), each with its own queue of every TAP,
    sharing one TapHost; with n > 1 the first also holds the TapSteering
    (its maps sized ``max_services``, ``max_dests``) that sends each frame
    to its worker's queue, and where that program cannot be set (no
    CAP_BPF: a TAP its user owns needs no other privilege) a warning says
    so and one backend is returned. ``addrs[i]`` ("DIP/PLEN") belongs to
    ``names[i]``. Raises ValueError for bad options, OSError for a TAP that
    cannot be opened or that has queues some other process holds (worker i
    must own queue i)."""
    if len(addrs) != len(names):
        raise ValueError(f"{len(names)} --tap but {len(addrs)} --addr: give one DIP/PLEN per TAP")
    base = parse_mac(mac) if mac else random_mac()
    # One MAC per port: the same base, last octet + port (two ports on one
    # bridge must not share a MAC).
    macs = [base[:5] + bytes([(base[5] + i) & 0xFF]) for i in range(len(names))]
    gw = int(ipaddress.IPv4Address(gateway)) if gateway else None
    parsed = [parse_addr(text) for text in addrs]
    backends: list[TapBackend] = []
    try:
        for _ in range(max(1, n)):
            backends.append(TapBackend(names, macs, backends[0].host if backends else None))
        first = backends[0]
        for b in backends[1:]:
            b.primary = False
        for name in names:
            held = queues_open(name)
            if held is not None and held != len(backends):
                raise OSError(f"TAP {name!r} has {held} queues attached, pylvs opened "
                              f"{len(backends)}: another process holds the others")
        if len(backends) > 1:
            try:
                first.steering = TapSteering(first.fds, max_services=max_services,
                                             max_dests=max_dests)
            except OSError as e:
                # The tun driver's own choice would split a conn's two
                # directions between workers: one worker, as with XDP's
                # fallback to AF_PACKET, rather than no director.
                log.warning("%s: one worker instead of %d", e, len(backends))
                for b in backends[1:]:
                    b.close()
                del backends[1:]
        if len(backends) == 1:
            for fd in first.fds:   # one queue: a leftover program has nothing to choose
                detach_steering(fd)
        # The DIP's port MTU is the TAP's (frames bigger than it would be
        # dropped by the bridge's next port).
        ifaces = [Iface(a, plen, dev.mtu, m) for (a, plen), dev, m in zip(parsed, first.devs, macs)]
        host = TapHost(ifaces, gw, send=first.write_frame)
        for b in backends:
            b.host = host
    except BaseException:
        for b in backends:
            b.close()
        raise
    return backends


class NoSteering:
    """What replaces steering (pylvs/control/steering.py) behind a TAP: the
    kernel never sees the director's frames, so there is nothing to keep
    from it."""

    def apply(self, services, dests, local, taken=None) -> None:
        pass

    def remove(self) -> None:
        pass
