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

Queues and workers (``--workers N``): every worker has an XSK on each rx
queue of each port (the queues the driver reports, ETHTOOL_GCHANNELS),
all of a port's sockets bound with XDP_SHARED_UMEM to one UMEM, each
queue with its own fill and completion rings shared under a lock by its
N sockets, RX and TX rings per socket. The program picks the XSK of the
frame's rx queue and of the worker the fanout key of the AF_PACKET taps
gives (client address, same mix, modulo N: bpf.steer_index), so a conn's
frames meet on one worker whichever queue, and whichever way (XSK or
tap), they come in. A worker sends a port's frames on its socket of rx
queue ``worker % queues`` (its own tx queue where there are as many
queues as workers).

Clients on the director itself (pylvs/io/local.py): the loopback port is
one more AF_PACKET tap (no XSK, no XDP on ``lo``). The real servers'
replies to them are to one of the director's addresses, which the program
passes, so their frames never touch an XSK; with the Python engine
``send`` puts the loopback port's rows on its socket.

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

import array
import errno
import fcntl
import logging
import socket
import struct
import threading
from pathlib import Path

import numpy as np

from .. import _fast
from ..engine import tables
from . import CopyLoop, Port, bpf, open_workers
from ..control.steering import SETS, STEER_MASK, _why, sets_of, sync_sets, write_mask

log = logging.getLogger("pylvs")

BPF_OBJECT = Path(__file__).resolve().parents[1] / "bpf" / "xdp_steer.bpf.o"
BPF_PROG = "pylvs_xdp"
MAX_QUEUES = 64           # as xdp_steer.bpf.c
MAX_WORKERS = 256         # as xdp_steer.bpf.c (and --workers)
MAX_XSKS = 1024           # as xdp.c: sockets in one worker's frame loop
TX_RESERVE = 512          # as xdp.c: free chunks each socket keeps back from the fill ring
COUNTERS = ("xdp_redirected", "xdp_no_xsk")   # its counters map; then one per worker
XSK_COUNTERS = ("rx_frames", "rx_no_headroom", "rx_oversize", "tx_frames", "tx_copied", "tx_no_room",
                "tx_bad_port", "emit_sent", "emit_no_room", "tx_kicks", "tx_kick_errors",
                "polls", "poll_timeouts", "fwd_calls", "fwd_budget_cuts")
KERNEL_COUNTERS = ("rx_dropped", "rx_ring_full", "rx_fill_ring_empty_descs",
                   "rx_invalid_descs", "tx_invalid_descs")


SIOCETHTOOL = 0x8946         # linux/sockios.h
ETHTOOL_GCHANNELS = 0x3c      # linux/ethtool.h


def rx_queues(name: str) -> int:
    """The rx queues of interface ``name`` that an XSK can be bound to:
    its combined plus rx-only channels (ETHTOOL_GCHANNELS, struct
    ethtool_channels: cmd, 4 maxima, rx, tx, other, combined counts), at
    least 1; 1 for a driver without channels (bridges, bonds: no
    get_channels, EOPNOTSUPP), where queue 0 is the only one XDP sees
    apart from generic mode's. OSError for other failures."""
    ch = array.array("I", [ETHTOOL_GCHANNELS] + [0] * 8)
    ifr = struct.pack("16sP", name.encode(), ch.buffer_info()[0]).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                return 1
            raise
    return max(1, ch[5] + ch[8])


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


def umem_frames(nframes: int, ring_size: int, workers: int, queues: int = 1) -> int:
    """Chunks of one port's UMEM for ``workers`` sockets on each of
    ``queues`` rx queues sharing it: at least ``nframes``, and enough for
    each queue's fill ring plus, per socket, an RX ring's worth and the TX
    reserve (512) kept back from the fill ring."""
    if workers * queues == 1:
        return nframes
    return max(nframes, queues * ring_size + workers * queues * (ring_size + TX_RESERVE))


class XdpBackend(CopyLoop):
    """Worker 0's instance: ports with an XSK on each rx queue and the
    AF_PACKET taps for the frames the kernel keeps (module docstring).
    With ``workers`` > 1 it also opens the other workers' instances
    (``siblings``, worker order, this one first): each has an XSK per (port,
    rx queue), bound with XDP_SHARED_UMEM to the port's UMEM, and its own
    taps (one fanout group per port, ``pylvs.io.open_workers``); the program
    picks the XSK by the frame's rx queue and the fanout key. This instance
    owns the program (links, maps): its ``close`` closes the siblings too.

    ``queues``: at most this many rx queues a port (from queue 0); None:
    all that ``rx_queues`` reports (up to 64, and 1024 sockets a worker
    over all ports). A queue past the first whose socket cannot be bound
    is left to the taps, with a warning.

    ``generic``: None tries native XDP then generic; True/False forces one.
    ``zerocopy``: ask for XDP_ZEROCOPY first (copy mode where refused).
    ``nframes``: chunks per port's UMEM (``umem_frames`` grows it for
    workers). ``afpacket``: AfPacketBackend's keyword arguments
    (qdisc_bypass, pcap, ring). Raises XdpUnavailable when the program
    cannot be loaded or attached or a socket cannot be bound (everything
    opened so far is closed), OSError for an interface not in this
    namespace, ValueError for a queue or worker count out of range.
    ``xsks``: this worker's sockets, each port's in queue order from queue
    ``index % queues`` (the first is the one it sends on).
    """

    kind = "xdp"

    def __init__(self, ifnames: list[str], *, workers: int = 1, queues: int | None = None,
                 generic: bool | None = None, zerocopy: bool = True, nframes: int = 8192,
                 frame_size: int = 4096, ring_size: int = 2048, max_services: int = 16384,
                 max_dests: int = 131072, **afpacket):
        if queues is not None and not 1 <= queues <= MAX_QUEUES:
            raise ValueError(f"queues {queues}: expected 1..{MAX_QUEUES}")
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers {workers}: expected 1..{MAX_WORKERS}")
        self.index, self.group, self.workers = 0, self, workers
        self.max_queues = queues or MAX_QUEUES
        self.queues: list[int] = []   # per port: rx queues with XSKs
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
            self._open(generic, zerocopy, nframes, frame_size, ring_size, max_services, max_dests)
        except BaseException:
            for t in taps[len(self.siblings):]:
                t.close()
            self.close()
            raise

    def _sibling(self, index: int, taps) -> "XdpBackend":
        b = object.__new__(XdpBackend)
        b.index, b.group, b.workers, b.queues = index, self, self.workers, self.queues
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
            for p in self.xdp_ports:
                remove_stale(p.ifindex, p.name)
            obj = _bpf.Object(str(BPF_OBJECT), sizes)
            self.maps = {n: obj.map(n) for n in (*self._current, "ports", "xsks", "steer",
                                                 "counters", STEER_MASK)}
            self._set_plan(bpf.FANOUT_FULL)
            for p in self.xdp_ports:
                self.maps["ports"].update(struct.pack("I", p.ifindex),
                                          p.mac + struct.pack("H", p.index))
                self.queues.append(self._open_queues(p, zerocopy, nframes, frame_size, ring_size))
            for p in self.xdp_ports:
                self.links.append(self._attach(obj, p, generic))
        except (OSError, KeyError, ValueError) as e:
            raise XdpUnavailable(_why(e)) from e
        finally:
            if obj is not None:
                obj.close()   # the links hold the program, self.maps the maps
        for p, nq, mode in zip(self.xdp_ports, self.queues, self.modes):
            xsk = next(x for x in self.xsks if x.port == p.index)
            log.info("xdp: %s: %s XDP, %s in %s mode%s", p.name, mode,
                     "AF_XDP socket on queue 0" if nq == 1 else f"AF_XDP sockets on queues 0-{nq - 1}",
                     "zero-copy" if xsk.zerocopy else "copy",
                     f", shared by {n} workers" if n > 1 else "")

    @property
    def xdp_ports(self) -> list[Port]:
        """The ports with an XDP program and XSKs: all but the loopback one."""
        return [p for p in self.ports if not p.local]

    def _open_queues(self, p: Port, zerocopy, nframes, frame_size, ring_size) -> int:
        """Every worker's XSK on each rx queue of port ``p``, in the XSKMAP,
        appended to the workers' ``xsks`` (their sending queue first);
        returns the queues bound. One UMEM: the first socket registers it,
        the others share it (XDP_SHARED_UMEM), each on a new queue making
        that queue's fill and completion rings."""
        n = self.workers
        nq = min(rx_queues(p.name), self.max_queues, MAX_QUEUES)
        if nq > MAX_XSKS // len(self.xdp_ports):
            nq = MAX_XSKS // len(self.xdp_ports)
            log.warning("xdp: %s: AF_XDP sockets on its first %d rx queues only (at most %d "
                        "sockets a worker); the others go through the AF_PACKET taps",
                        p.name, nq, MAX_XSKS)
        nframes = umem_frames(nframes, ring_size, n, nq)
        owner, made = None, []   # made[q][w]
        for q in range(nq):
            row: list = []
            try:
                for w in range(n):
                    share = row[0] if row else owner
                    row.append(_fast.Xsk(p.ifindex, q, nframes=nframes, frame_size=frame_size,
                                         ring_size=ring_size, zerocopy=zerocopy, port=p.index)
                               if share is None else
                               _fast.Xsk(p.ifindex, q, ring_size=ring_size, share=share,
                                         port=p.index))
            except OSError as e:
                for x in row:
                    x.close()
                if q == 0:
                    raise
                log.warning("xdp: %s: no AF_XDP socket on rx queue %d (%s): queues %d-%d go "
                            "through the AF_PACKET taps", p.name, q, _why(e), q, nq - 1)
                break
            owner = owner or row[0]
            made.append(row)
        for q, row in enumerate(made):
            for w, xsk in enumerate(row):
                self.maps["xsks"].update(struct.pack("I", xsk_key(p.index, q, w, n)),
                                         struct.pack("I", xsk.fd))
        for w, b in enumerate(self.siblings):
            first = w % len(made)
            b.xsks.extend(made[(first + q) % len(made)][w] for q in range(len(made)))
        return len(made)

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
        rings of their ports (the loopback port's, which has no XSK, on its
        AF_PACKET socket); returns frames sent."""
        lo = [p.index for p in self.ports if p.local]
        c, e = batch.count, int(batch.emit_n[0])
        verdict, emit = batch.verdict, np.arange(e)
        n = 0
        if lo:
            to_lo = np.isin(batch.out_port[:c], lo) & (verdict[:c] == tables.V_TX)
            emit_lo = np.isin(batch.emit_port[:e], lo)
            if to_lo.any() or emit_lo.any():
                only = np.where(to_lo, tables.V_TX, tables.V_PASS).astype(verdict.dtype)
                n += _fast.ring_send(self.taps.rings, batch.buf, batch.length, only,
                                     batch.out_port, c)
                n += self._emit_send(_fast.emit_send, self.taps.rings, batch, emit[emit_lo])
                verdict = np.where(to_lo, tables.V_PASS, verdict[:c]).astype(verdict.dtype)
                emit = emit[~emit_lo]
        n += _fast.xsk_send(self.xsks, batch.buf, batch.length, verdict, batch.out_port, c)
        return n + self._emit_send(_fast.xsk_emit_send, self.xsks, batch, emit)

    @staticmethod
    def _emit_send(send, socks, batch: tables.Batch, rows) -> int:
        """Frames ``rows`` of the batch's emit area by ``send`` (emit_send
        or xsk_emit_send) on ``socks``."""
        if not len(rows):
            return 0
        return send(socks, batch.emit_buf, batch.emit_off[rows], batch.emit_len[rows],
                    batch.emit_port[rows], np.array([len(rows)], dtype=batch.emit_n.dtype))

    # --- control ----------------------------------------------------------

    def set_filter(self, services, dests, own_addrs=()) -> None:
        """The taps' socket filter (AfPacketBackend.set_filter). The XDP
        program's sets follow the steering's (``steer``)."""
        self.taps.set_filter(services, dests, own_addrs)

    def set_sets(self, services, dests, local_addrs) -> None:
        """The XDP program's sets for these tables and the director's
        addresses (``local_addrs``: strings or host-order ints), as
        steering.sets_of gives them, and the plan the taps' fanout program
        keys these tables by (AfPacketBackend.steer_plan). OSError when a
        set outgrows its map (max_services, max_dests). One call for all
        workers: the maps are the program's."""
        g = self.group
        with g._lock:
            sync_sets(g.maps, g._current, sets_of(services, dests, local_addrs))
            write_mask(g.maps, services)
            if g.workers > 1:
                g._set_plan(self.taps.steer_plan(services, dests))

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
        ``xdp_steered`` (frames the program picked this worker for);
        ``xsk_rx_frames_q<Q>``: its XSKs' frames from rx queue Q, where a
        port has more than one queue (none otherwise). Summed
        over workers, the program's counters are worker 0's (0 elsewhere).
        ``rx_dropped`` includes the XSKs' drops."""
        out = self.taps.stats()
        for name in XSK_COUNTERS:
            out["xsk_" + name] = sum(getattr(x, name) for x in self.xsks)
        out["xsk_free_chunks"] = sum(x.nfree for x in self.xsks)
        if any(x.queue for x in self.xsks):
            for x in sorted(self.xsks, key=lambda x: x.queue):
                key = f"xsk_rx_frames_q{x.queue}"
                out[key] = out.get(key, 0) + x.rx_frames
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
        """Per XSK of this worker (``xsks`` order): port name, XDP mode, rx
        queue, zero-copy, worker, whether the UMEM is shared
        (XDP_SHARED_UMEM: every socket of a port but the first)."""
        mode = dict(zip((p.index for p in self.xdp_ports), self.modes))
        return [{"port": self.ports[x.port].name, "mode": mode[x.port], "queue": x.queue,
                 "zerocopy": bool(x.zerocopy), "worker": self.index, "shared": bool(x.shared)}
                for x in self.xsks]

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

    def apply(self, services, dests, local_addrs, taken=None) -> None:
        """``taken``: the services whose frames the XDP program redirects
        (default ``services``); the wrapped steering keeps the kernel from
        every service's (pylvs/control/vipfollow.py)."""
        try:
            self.backend.set_sets(services if taken is None else taken, dests, local_addrs)
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
