"""The AF_XDP backend (``pylvs run --io xdp``): frames taken at the driver.

An XDP program (pylvs/bpf/xdp_steer.bpf.c) on every port redirects the
frames that are the engine's alone (to a service; a VS-NAT dest's reply or
ICMP error not addressed to the director) to an AF_XDP socket per port
(pylvs._fast.Xsk: UMEM, fill/completion/RX/TX rings, need_wakeup, zero-copy
where the driver offers it). They never become socket buffers: when the
director falls behind, the XSK's RX ring fills and the kernel drops the
excess right there (``xsk_rx_ring_full`` in ``stats()``), having spent
almost nothing on it. That is the way out of receive livelock.

What the program passes goes up the stack as before, where an AF_PACKET
backend (pylvs/io/afpacket.py, same socket filter) still taps the frames
both the engine and the kernel need: ICMP errors to a VIP or to the
director's own addresses, a real server's reply to the director. So the
engine sees the same frames as in AF_PACKET mode and the kernel sees what
it sees with steering, whatever the engine's verdict: a V_PASS on a
redirected frame is the same as on a stolen one (steering would have
dropped the kernel's copy). Steering (tcx or nft) stays in place: it still
drops a stolen frame that XDP passed (a queue with no XSK, the program not
attached yet or gone).

Workers (``--workers N``): every worker has an XSK on each port, all N
bound to the same rx queue with XDP_SHARED_UMEM (one UMEM per port, the
fill and completion rings shared under a lock, RX and TX rings per
socket), and the program picks the worker's XSK with the fanout key of
the AF_PACKET taps (client address, same mix, modulo N: bpf.steer_index),
so a conn's frames meet on one worker whichever way they come in. Only
that one rx queue is read by XSKs: on a device with several, the other
queues' frames pass to the stack, where the taps (one fanout group per
port) and steering handle them as with AF_PACKET (docs/io.md).

Attach: native (driver) mode first, generic (skb) mode where the driver
has none, through a BPF link that only this process holds: when pylvs
dies the kernel detaches the program and closes the sockets. An XDP program
named ``pylvs_xdp`` attached by netlink (not by a link) is a leftover and
is removed; any other XDP program on a port makes XDP unavailable, and
``open_backends`` falls back to AF_PACKET with one warning.

Frames are at most ``frame_size`` - 256 bytes (the kernel's XDP headroom);
veth, with an XDP program, stops its peer's GSO. XDP frames carry no
checksum state: a peer that sends partial checksums (a veth with tx
checksum offload) must have it turned off (ethtool -K PEER tx off), as
the labs do in this mode.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from pathlib import Path

from .. import _fast
from ..engine import tables
from . import CopyLoop, Port, bpf, open_workers
from ..control.steering import SETS, _why, sets_of, sync_sets

log = logging.getLogger("pylvs")

BPF_OBJECT = Path(__file__).resolve().parents[1] / "bpf" / "xdp_steer.bpf.o"
BPF_PROG = "pylvs_xdp"
MAX_QUEUES = 64           # as xdp_steer.bpf.c
MAX_WORKERS = 256         # as xdp_steer.bpf.c (and --workers)
TX_RESERVE = 512          # as xdp.c: free chunks each socket keeps back from the fill ring
COUNTERS = ("xdp_redirected", "xdp_no_xsk")   # its counters map; then one per worker
XSK_COUNTERS = ("rx_frames", "rx_no_headroom", "rx_oversize", "tx_frames", "tx_copied", "tx_no_room",
                "tx_bad_port", "emit_sent", "emit_no_room", "tx_kicks", "tx_kick_errors",
                "polls", "poll_timeouts", "fwd_calls", "fwd_budget_cuts")
KERNEL_COUNTERS = ("rx_dropped", "rx_ring_full", "rx_fill_ring_empty_descs",
                   "rx_invalid_descs", "tx_invalid_descs")


def xsk_key(slot: int, queue: int, worker: int, workers: int) -> int:
    """The XSKMAP index of worker ``worker``'s socket on (port slot, rx
    queue), as xdp_steer.bpf.c computes it."""
    return (slot * MAX_QUEUES + queue) * workers + worker


class XdpUnavailable(RuntimeError):
    """XDP cannot be used on these interfaces (the reason is the message)."""


def remove_stale(ifindex: int, name: str) -> bool:
    """Detach a ``pylvs_xdp`` program attached by netlink (not held by a
    link: left by another tool or an older pylvs). True if one was removed.
    Raises XdpUnavailable when another XDP program is attached there."""
    from .. import _bpf

    q = _bpf.xdp_query(ifindex)
    if not q["prog_id"]:
        return False
    prog = _bpf.prog_info(q["prog_id"])["name"]
    if prog != BPF_PROG:
        raise XdpUnavailable(f"{name} already has an XDP program ({prog!r}, id {q['prog_id']})")
    if q["link"]:
        raise XdpUnavailable(f"{name}: pylvs's XDP program is held by another process's link")
    _bpf.xdp_detach(ifindex, q["prog_id"], q["mode"] == "generic")
    log.info("xdp: removed the XDP program left on %s by an earlier run", name)
    return True


PLANS = {bpf.FANOUT_FULL: 0, bpf.FANOUT_ADDRS: 1, bpf.FANOUT_SADDR: 2}   # steer.plan codes


def umem_frames(nframes: int, ring_size: int, workers: int) -> int:
    """Chunks of one port's UMEM for ``workers`` sockets sharing it: at
    least ``nframes``, and enough for the fill ring plus, per worker, an RX
    ring's worth and the TX reserve (512) kept back from the fill ring."""
    if workers == 1:
        return nframes
    return max(nframes, ring_size + workers * (ring_size + TX_RESERVE))


class XdpBackend(CopyLoop):
    """Worker 0's instance: ports with an XSK each (queue ``queue``) and
    the AF_PACKET taps for the frames the kernel keeps (module docstring).
    With ``workers`` > 1 it also opens the other workers' instances
    (``siblings``, worker order, this one first): each has an XSK per port
    bound to the same queue with XDP_SHARED_UMEM and its own taps (one
    fanout group per port, ``pylvs.io.open_workers``); the program picks the
    worker's XSK by the fanout key. This instance owns the program (links,
    maps): its ``close`` closes the siblings too.

    ``generic``: None tries native XDP then generic; True/False forces one.
    ``zerocopy``: ask for XDP_ZEROCOPY first (copy mode where refused).
    ``nframes``: chunks per port's UMEM (``umem_frames`` grows it for
    workers). ``afpacket``: AfPacketBackend's keyword arguments
    (qdisc_bypass, pcap, ring). Raises XdpUnavailable when the program
    cannot be loaded or attached or a socket cannot be bound (everything
    opened so far is closed), OSError for an interface not in this
    namespace, ValueError for a queue or worker count out of range.
    """

    kind = "xdp"

    def __init__(self, ifnames: list[str], *, workers: int = 1, queue: int = 0,
                 generic: bool | None = None, zerocopy: bool = True, nframes: int = 8192,
                 frame_size: int = 4096, ring_size: int = 2048, max_services: int = 16384,
                 max_dests: int = 131072, **afpacket):
        if not 0 <= queue < MAX_QUEUES:
            raise ValueError(f"queue {queue}: expected 0..{MAX_QUEUES - 1}")
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers {workers}: expected 1..{MAX_WORKERS}")
        self.index, self.group, self.workers = 0, self, workers
        self.queue = queue
        self.links: list = []
        self.xsks: list = []
        self.maps: dict = {}
        self.modes: list[str] = []
        self._lock = threading.Lock()
        self._current: dict[str, set] = {n: set() for n in SETS}
        self.siblings: list[XdpBackend] = [self]
        taps = open_workers("afpacket", ifnames, workers, **afpacket)
        self.taps = taps[0]
        self.ports: list[Port] = self.taps.ports
        try:
            for i, t in enumerate(taps[1:], 1):
                self.siblings.append(self._sibling(i, t))
            self._open(generic, zerocopy, umem_frames(nframes, ring_size, workers), frame_size,
                       ring_size, max_services, max_dests)
        except BaseException:
            for t in taps[len(self.siblings):]:
                t.close()
            self.close()
            raise

    def _sibling(self, index: int, taps) -> "XdpBackend":
        b = object.__new__(XdpBackend)
        b.index, b.group, b.workers, b.queue = index, self, self.workers, self.queue
        b.taps, b.ports, b.xsks, b.modes, b.siblings = taps, taps.ports, [], self.modes, []
        return b

    def _open(self, generic, zerocopy, nframes, frame_size, ring_size, max_services, max_dests):
        try:
            from .. import _bpf
        except ImportError as e:
            raise XdpUnavailable(f"pylvs._bpf is not built ({e})") from e
        n = self.workers
        sizes = {"services": max_services, "realservers": max_dests, "rsaddrs": max_dests,
                 "vips": max_services, "xsks": len(self.ports) * MAX_QUEUES * n}
        obj = None
        try:
            for p in self.ports:
                remove_stale(p.ifindex, p.name)
            obj = _bpf.Object(str(BPF_OBJECT), sizes)
            self.maps = {n: obj.map(n) for n in (*self._current, "ports", "xsks", "steer",
                                                 "counters")}
            self._set_plan(bpf.FANOUT_FULL)
            for p in self.ports:
                self.maps["ports"].update(struct.pack("I", p.ifindex),
                                          p.mac + struct.pack("H", p.index))
                owner = None
                for w, b in enumerate(self.siblings):
                    xsk = (_fast.Xsk(p.ifindex, self.queue, nframes=nframes, frame_size=frame_size,
                                     ring_size=ring_size, zerocopy=zerocopy) if owner is None else
                           _fast.Xsk(p.ifindex, self.queue, ring_size=ring_size, share=owner))
                    owner = owner or xsk
                    b.xsks.append(xsk)
                    self.maps["xsks"].update(struct.pack("I", xsk_key(p.index, self.queue, w, n)),
                                             struct.pack("I", xsk.fd))
            for p in self.ports:
                self.links.append(self._attach(obj, p, generic))
        except (OSError, KeyError, ValueError) as e:
            raise XdpUnavailable(_why(e)) from e
        finally:
            if obj is not None:
                obj.close()   # the links hold the program, self.maps the maps
        for p, xsk, mode in zip(self.ports, self.xsks, self.modes):
            log.info("xdp: %s: %s XDP, AF_XDP socket on queue %d in %s mode%s", p.name, mode,
                     self.queue, "zero-copy" if xsk.zerocopy else "copy",
                     f", shared by {n} workers" if n > 1 else "")

    def _set_plan(self, plan: str) -> None:
        self.maps["steer"].update(struct.pack("I", 0), struct.pack("II", self.workers, PLANS[plan]))

    def _attach(self, obj, port: Port, generic: bool | None):
        if not generic:
            try:
                link = obj.attach_xdp(BPF_PROG, port.ifindex, False)
                self.modes.append("native")
                return link
            except OSError as e:
                if generic is False:
                    raise
                log.info("xdp: %s: no native XDP (%s); using generic XDP", port.name, _why(e))
        link = obj.attach_xdp(BPF_PROG, port.ifindex, True)
        self.modes.append("generic")
        return link

    # --- the data path ----------------------------------------------------

    def forward(self, engine, now: float, timeout: float, batch: tables.Batch | None = None) -> int:
        """The tapped frames (no wait), then the XSKs (waiting up to
        ``timeout`` seconds); returns the frames handed to the engine. The C
        engine runs on frames in place; other engines get copies in a Batch
        (``recv``, ``process``, ``send``)."""
        ms = max(0, int(timeout * 1000))
        if _fast.Engine is not None and isinstance(engine, _fast.Engine):
            n = _fast.forward(engine, self.taps.rings, now, 0)
            return n + _fast.xsk_forward(engine, self.xsks, now, 0 if n else ms)
        return self._copy_forward(engine, now, timeout, batch)

    def recv(self, batch: tables.Batch, timeout: float) -> int:
        """Copy frames into ``batch`` (engine format: vnet header first):
        the taps' first (no wait), then the XSKs' (waiting up to ``timeout``
        seconds when the taps had none); returns the count."""
        n = self.taps.recv(batch, 0)
        rows = slice(n, None)
        n += _fast.xsk_recv(self.xsks, batch.buf[rows], batch.length[rows], batch.in_port[rows],
                            0 if n else max(0, int(timeout * 1000)))
        batch.count = n
        batch.verdict[:n] = tables.V_PASS
        batch.out_port[:n] = 0
        return n

    def send(self, batch: tables.Batch) -> int:
        """Send the V_TX frames, then the engine's emit area, on the XSK TX
        rings of their ports; returns frames sent."""
        n = _fast.xsk_send(self.xsks, batch.buf, batch.length, batch.verdict, batch.out_port,
                           batch.count)
        if batch.emit_n[0]:
            n += _fast.xsk_emit_send(self.xsks, batch.emit_buf, batch.emit_off, batch.emit_len,
                                     batch.emit_port, batch.emit_n)
        return n

    # --- control ----------------------------------------------------------

    def set_filter(self, services, dests, own_addrs=()) -> None:
        """The taps' socket filter (AfPacketBackend.set_filter). The XDP
        program's sets follow the steering's (``steer``)."""
        self.taps.set_filter(services, dests, own_addrs)

    def set_sets(self, services, dests, local_addrs) -> None:
        """The XDP program's sets for these tables and the director's
        addresses (``local_addrs``: strings or host-order ints), as
        steering.sets_of gives them, and the fanout plan of these tables
        (bpf.fanout_plan, as the taps' fanout program uses). OSError when a
        set outgrows its map (max_services, max_dests). One call for all
        workers: the maps are the program's."""
        g = self.group
        with g._lock:
            sync_sets(g.maps, g._current, sets_of(services, dests, local_addrs))
            if g.workers > 1:
                g._set_plan(bpf.fanout_plan(services, dests))

    def steer(self, steering) -> "XdpSteering":
        """``steering`` (BpfSteering or NftSteering) that also sets the XDP
        program's sets whenever its own are applied: both follow the same
        tables and local addresses, always together."""
        return XdpSteering(steering, self)

    def stats(self) -> dict[str, int]:
        """This worker's counters: its taps' (AfPacketBackend.stats),
        ``xsk_*``: its XSKs' (frames received, sent, copied to another
        port's UMEM, lost for want of a free chunk or a TX slot ...;
        ``xsk_free_chunks``: free chunks its sockets hold, a gauge: at
        most 1024 a port after it last reaped or refilled, the rest free
        for any worker), the kernel's
        XDP_STATISTICS summed over its sockets (``xsk_rx_ring_full``: frames
        dropped at XDP because its RX ring was full, the worker behind;
        ``xsk_rx_dropped``: dropped otherwise, e.g. bigger than a chunk;
        ``xsk_rx_fill_ring_empty_descs``: the shared fill ring's, on worker
        0 only), and the program's ``xdp_redirected``, ``xdp_no_xsk``
        (frames on a queue without an XSK: passed to the stack instead) and
        ``xdp_steered`` (frames the program picked this worker for). Summed
        over workers, the program's counters are worker 0's (0 elsewhere).
        ``rx_dropped`` includes the XSKs' drops."""
        out = self.taps.stats()
        for name in XSK_COUNTERS:
            out["xsk_" + name] = sum(getattr(x, name) for x in self.xsks)
        out["xsk_free_chunks"] = sum(x.nfree for x in self.xsks)
        kernel = dict.fromkeys(KERNEL_COUNTERS, 0)
        for x in self.xsks:
            st = x.statistics()
            for k in KERNEL_COUNTERS:
                kernel[k] += st[k]
        out.update({"xsk_" + k: v for k, v in kernel.items()})
        out["rx_dropped"] = out.get("rx_dropped", 0) + kernel["rx_dropped"] + kernel["rx_ring_full"]
        counters = self.group.maps.get("counters")
        for i, name in enumerate(COUNTERS):
            out[name] = int(counters.sum_u64(i)) if counters is not None and self.index == 0 else 0
        out["xdp_steered"] = (int(counters.sum_u64(2 + self.index)) if counters is not None
                              else 0)
        return out

    def describe(self) -> list[dict]:
        """Per port: name, XDP mode, queue, zero-copy, worker, whether the
        UMEM is shared (XDP_SHARED_UMEM with worker 0's socket)."""
        return [{"port": p.name, "mode": m, "queue": self.queue, "zerocopy": bool(x.zerocopy),
                 "worker": self.index, "shared": bool(x.shared)}
                for p, m, x in zip(self.ports, self.modes, self.xsks)]

    def close(self) -> None:
        """Worker 0: the program first (from then on the kernel keeps every
        frame), then every worker's sockets and taps; another worker: its
        own. Closing twice does nothing."""
        if self.group is self:
            for link in self.links:
                link.close()
            self.links = []
            for b in self.siblings[1:]:
                b.close()
        for x in self.xsks:
            x.close()
        self.xsks = []
        if self.group is self:
            for m in self.maps.values():
                m.close()
            self.maps = {}
        self.taps.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class XdpSteering:
    """A steering whose ``apply`` also updates an XdpBackend's program (the
    XDP sets first: a frame redirected no longer needs the steering's drop,
    one passed is dropped by it as before). Everything else is the wrapped
    steering's."""

    def __init__(self, steering, backend: XdpBackend):
        self.inner, self.backend = steering, backend

    def apply(self, services, dests, local_addrs) -> None:
        try:
            self.backend.set_sets(services, dests, local_addrs)
        except OSError as e:
            from ..control.steering import SteeringError

            raise SteeringError(f"XDP sets: {_why(e)}") from e
        self.inner.apply(services, dests, local_addrs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def open_backends(ifnames: list[str], io: str = "afpacket", workers: int = 1, **opts) -> list:
    """The backends of ``pylvs run --io``, one per worker (worker order):
    "afpacket" (``pylvs.io.open_workers``), or "xdp" (XdpBackend and its
    siblings), which falls back to AF_PACKET with one warning when XDP is
    unavailable. ``opts``: AfPacketBackend's keyword arguments."""
    if io == "xdp":
        try:
            return XdpBackend(ifnames, workers=workers, **opts).siblings
        except XdpUnavailable as e:
            log.warning("xdp: cannot attach (%s); falling back to AF_PACKET", e)
    elif io != "afpacket":
        raise ValueError(f"--io {io!r}: expected afpacket or xdp")
    return open_workers("afpacket", ifnames, workers, **opts)
