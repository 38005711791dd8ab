"""The connection sync daemons of `pylvs run` (docs/sync.md): ``pylvs adm
--start-daemon master|backup``, as the kernel's sync threads
(net/netfilter/ipvs/ip_vs_sync.c) but on the director's asyncio loop.

Master: every SEND_DELAY s it drains each worker's engine
(``engine.sync_drain``: the conns the engine queued by the kernel's rule,
sync_threshold/sync_period, state changes, templates), packs them into v1
messages of at most sync_maxlen bytes and sends every full message at once
and a partial one when its first conn is FLUSH_TIME s old (the kernel's
IPVS_SYNC_SEND_DELAY and IPVS_SYNC_FLUSH_TIME), to the group
(224.0.0.81:8848, TTL 1) out of the --mcast-interface, from that
interface's address, multicast loop off, fragmentation allowed
(make_send_sock). It also listens on the group for pylvs's bulk resync
requests and answers one by walking every engine (``engine.sync_chunk``)
at most BULK_RATE messages a second.

Backup: joins the group on the interface (make_receive_sock), decodes each
datagram strictly (pylvs.sync.wire; drops counted by reason) and installs
each record (``engine.sync_install``) into the engine of the worker that
the record's client frames reach (the steering rule of docs/io.md,
"Workers"). At start, and again with back-off until the master answers, it
asks for the whole table (a BULK_REQUEST message, which IPVS peers ignore);
it asks again when rules it lacked arrive after records went uninstalled
(a backup started before its services and real servers).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import os
import socket
import struct
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from ..engine.sync import SYNC_DTYPE
from . import wire

log = logging.getLogger("pylvs.sync")

SEND_DELAY = 0.02      # IPVS_SYNC_SEND_DELAY: HZ / 50
FLUSH_TIME = 2.0       # IPVS_SYNC_FLUSH_TIME: HZ * 2
DRAIN_CHUNK = 4096     # records read from an engine per sync_drain call
BULK_CHUNK = 1024      # records per sync_chunk call (one engine lock hold)
BULK_RATE = 2000       # bulk answer messages per second (~80,000 conns/s at 1472)
BULK_PENDING = 64      # requests (nonces) one walk answers; more are counted and not answered
BULK_RETRY = (1.0, 2.0, 4.0, 8.0)   # a backup re-asks after these many s without an END,
BULK_RETRY_EVERY = 10.0             # then every this many s until one comes
REASK_POLL = 0.5       # s between two looks at the backup's rules
REASK_SETTLE = 1.0     # s the rules rest before a re-ask (an -R restoring many lines)
REASK_EVERY = 5.0      # s at least between two re-asks of one backup
RECV_BUDGET = 256      # datagrams a backup reads per wake-up before yielding the loop
LOG_EVERY = 10.0       # s between two warnings about dropped datagrams
IFNAME_MAX = 15        # IP_VS_IFNAME_MAXLEN - 1: ipvsadm keeps that much of --mcast-interface

ROLES = ("master", "backup")
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0   # linux/in.h (not in the socket module)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)   # asm-generic/socket.h
RCVBUF = 1 << 20       # bytes a backup asks for its receive buffer (a bulk walk's burst)
SIOCGIFADDR, SIOCGIFMTU = 0x8915, 0x8921


class SyncError(Exception):
    """A start or stop the director refuses; the message is ipvsadm's
    (libipvs's ipvs_strerror, or strerror of the kernel's errno)."""


@dataclass
class SyncConfig:
    """One daemon's settings (struct ipvs_sync_daemon_cfg); 0 / "" take the
    kernel's defaults at start."""
    role: str
    mcast_ifn: str
    syncid: int = 0
    mcast_group: str = wire.SYNC_GROUP
    mcast_port: int = wire.SYNC_PORT
    mcast_ttl: int = wire.SYNC_TTL
    sync_maxlen: int = 0

    @classmethod
    def from_request(cls, req: dict) -> "SyncConfig":
        """From a start_daemon operation; SyncError for a bad field (the
        CLI has checked them as ipvsadm does; this guards the socket)."""
        role = req.get("state")
        if role not in ROLES:
            raise SyncError("Invalid operation.  Possibly wrong module version, address not "
                            "unicast, ...")
        ifn = req.get("mcast_ifn") or "eth0"    # ipvsadm's DEF_MCAST_IFN
        if not isinstance(ifn, str) or "\0" in ifn or "/" in ifn:
            raise SyncError("No such device")
        try:
            cfg = cls(role, ifn[:IFNAME_MAX], _request_int(req, "syncid", 0, 255, 0),
                      str(ipaddress.IPv4Address(req.get("mcast_group") or wire.SYNC_GROUP)),
                      _request_int(req, "mcast_port", 1, 65535, wire.SYNC_PORT),
                      _request_int(req, "mcast_ttl", 1, 255, wire.SYNC_TTL),
                      _request_int(req, "sync_maxlen", 0, 65535, 0))
        except (ValueError, TypeError) as e:
            raise SyncError(f"Invalid argument ({e})") from None
        if not ipaddress.IPv4Address(cfg.mcast_group).is_multicast:
            raise SyncError(f"invalid IPv4 mcast-group `{cfg.mcast_group}'")
        return cfg


def _request_int(req: dict, key: str, lo: int, hi: int, default: int) -> int:
    """The int field ``key`` of a start_daemon request, ``default`` when
    absent; ValueError when it is not an int in lo..hi."""
    v = req.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{key} {v!r} is not in {lo}..{hi}")
    return v


def worker_of(caddrs: np.ndarray, services, workers: int) -> np.ndarray:
    """The worker index (0..workers-1) whose engine the frames of each
    client address (host-order u32) reach: docs/io.md's rule,
    ``fanout_mix(caddr & client_mask) % workers`` (pylvs.io.bpf)."""
    if workers <= 1:
        return np.zeros(len(caddrs), dtype=np.intp)
    from ..io import bpf

    masked = caddrs.astype(np.uint64) & np.uint64(bpf.client_mask(services))
    mix = ((masked * np.uint64(bpf.FANOUT_MIX)) & np.uint64(0xFFFFFFFF)) >> np.uint64(16)
    return (mix % np.uint64(workers)).astype(np.intp)


def iface_info(name: str) -> tuple[int, str | None, int]:
    """(ifindex, first IPv4 address or None, MTU) of an interface of this
    namespace; SyncError("No such device") when there is none."""
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        raise SyncError("No such device") from None
    import fcntl

    addr, mtu = None, 1500
    req = struct.pack("16s16x", name.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:   # bind_mcastif_addr: the interface's (first) address
            addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
        except OSError:
            pass
        try:
            mtu = struct.unpack_from("i", fcntl.ioctl(s.fileno(), SIOCGIFMTU, req), 16)[0]
        except OSError:
            pass
    return index, addr, mtu


def _mreqn(group: str, index: int) -> bytes:
    return socket.inet_aton(group) + socket.inet_aton("0.0.0.0") + struct.pack("i", index)


def send_socket(cfg: SyncConfig, index: int, addr: str | None) -> socket.socket:
    """A master's socket, as make_send_sock: multicast out of the
    interface, no loop back, the TTL, fragmentation allowed, bound to the
    interface's address, connected to the group."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, _mreqn("0.0.0.0", index))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, cfg.mcast_ttl)
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        if addr:
            s.bind((addr, 0))
        else:
            log.warning("sync: %s has no IPv4 address; you probably need to specify an IP "
                        "address on the multicast interface", cfg.mcast_ifn)
        s.connect((cfg.mcast_group, cfg.mcast_port))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def set_rcvbuf(sock: socket.socket, size: int) -> int:
    """Ask for a receive buffer of ``size`` bytes: SO_RCVBUFFORCE, past
    net.core.rmem_max, when the process has CAP_NET_ADMIN (as a director
    does), else SO_RCVBUF, which the kernel caps at rmem_max (212992 bytes
    on a stock system, a fifth of ``RCVBUF``). Returns what getsockopt
    reports (the kernel doubles the value for its bookkeeping); an error
    leaves the default size."""
    for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            break
        except OSError:
            continue
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def receive_socket(cfg: SyncConfig, index: int) -> socket.socket:
    """A socket on the group's port of this interface, joined to the group
    (make_receive_sock: SO_REUSEADDR, bound to the device)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, cfg.mcast_ifn.encode())
        s.bind((cfg.mcast_group, cfg.mcast_port))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, _mreqn(cfg.mcast_group, index))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class _Engines:
    """What the daemons need of the director: its workers (each with
    ``engine`` and ``lock``), the published service table (for the
    steering rule's client mask) and dest table (for the rules a backup
    installs against)."""

    def __init__(self, workers: Callable[[], Sequence], services: Callable[[], np.ndarray],
                 dests: Callable[[], np.ndarray | None] = lambda: None):
        self.workers, self.services, self.dests = workers, services, dests
        self._rules: tuple = (None, None, frozenset())

    def rules(self) -> frozenset:
        """What a sync record is installed against (the engines'
        sync_install, as the kernel's ip_vs_proc_conn): each service's
        (proto, vaddr, vport) and each dest's (proto, vaddr, vport, daddr,
        dport), host order. Recomputed only when a table was republished."""
        svcs, dests = self.services(), self.dests()
        if svcs is self._rules[0] and dests is self._rules[1]:
            return self._rules[2]
        from ..engine import tables

        keys: set = set()
        by_slot: dict[int, tuple] = {}
        if svcs is not None:
            for slot in np.flatnonzero(svcs["flags"] & tables.SVC_F_USED).tolist():
                row = svcs[slot]
                by_slot[slot] = (int(row["proto"]), int(row["vaddr"]), int(row["vport"]))
            keys.update(by_slot.values())
        if dests is not None:
            for row in dests[(dests["flags"] & tables.DEST_F_USED) != 0].tolist():
                daddr, dport, svc = row[0], row[1], row[2]
                if svc in by_slot:
                    keys.add((*by_slot[svc], daddr, dport))
        self._rules = (svcs, dests, frozenset(keys))
        return self._rules[2]

    def call(self, w, name: str, *args):
        # The C engine locks itself; a Python engine is safe only under the
        # worker's lock (runtime/worker.py), which the C path takes too, briefly.
        with w.lock:
            return getattr(w.engine, name)(*args)

    def check(self, names: Sequence[str]) -> None:
        for w in self.workers():
            missing = [n for n in names if not hasattr(w.engine, n)]
            if missing:
                raise SyncError("Operation not supported: this engine has no connection "
                                f"sync ({', '.join(missing)})")


class _Daemon:
    # The counters `pylvs stats` lists from the start, at 0 until their
    # first event (docs/sync.md, "Counters"; a grep or a scraper finds them).
    COUNTERS: tuple[str, ...] = ("messages", "bytes", "conns", "send_errors")

    def __init__(self, cfg: SyncConfig, engines: _Engines, index: int, addr: str | None,
                 mtu: int):
        self.cfg, self.engines = cfg, engines
        self.maxlen = wire.sync_maxlen(cfg.role, mtu, cfg.sync_maxlen)
        self.index, self.addr = index, addr
        self.stats: Counter = Counter(dict.fromkeys(self.COUNTERS, 0))
        self.tasks: list[asyncio.Task] = []
        self.socks: list[socket.socket] = []

    def describe(self) -> dict:
        """What `-L --daemon` prints: the kernel's cfg after start_sync_thread."""
        d = asdict(self.cfg)
        d.update(state=d.pop("role"), sync_maxlen=self.maxlen)
        return d

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        loop = asyncio.get_running_loop()
        for s in self.socks:
            try:
                loop.remove_reader(s.fileno())
            except (ValueError, OSError):
                pass
            s.close()
        self.socks = []

    async def _send(self, sock: socket.socket, msgs: list[bytes], key: str = "") -> None:
        loop = asyncio.get_running_loop()
        for m in msgs:
            try:
                await loop.sock_sendall(sock, m)
            except OSError as e:
                self.stats["send_errors"] += 1
                log.debug("sync: send: %s", e)
                continue
            self.stats[key + "messages"] += 1
            self.stats[key + "bytes"] += len(m)
            if key in ("", "bulk_"):   # sync messages; a control message carries no conn
                self.stats[key + "conns"] += m[4]


class Master(_Daemon):
    COUNTERS = ("drained", *_Daemon.COUNTERS, "bulk_requests", "bulk_requests_other_syncid",
                "bulk_requests_dropped", "bulk_requests_in_walk", "bulk_walks",
                "bulk_messages", "bulk_bytes", "bulk_conns", "bulk_end_messages",
                "bulk_end_bytes")

    def __init__(self, *args):
        super().__init__(*args)
        self.buffer = wire.Buffer(self.cfg.syncid, self.maxlen, FLUSH_TIME)
        self.rows = np.zeros(DRAIN_CHUNK, dtype=SYNC_DTYPE)
        self.requests: dict[int, float] = {}
        self.walking: frozenset[int] = frozenset()   # the nonces the walk in progress answers
        self.bulk_wake = asyncio.Event()
        self.listen: socket.socket | None = None
        self.out: socket.socket | None = None
        self.queueing = False

    def start(self) -> None:
        self.engines.check(("set_sync_master", "sync_drain", "sync_chunk"))
        self.out = send_socket(self.cfg, self.index, self.addr)
        self.socks.append(self.out)
        try:
            self.listen = receive_socket(self.cfg, self.index)
            self.socks.append(self.listen)
        except OSError as e:   # sync still works; only bulk requests go unheard
            log.warning("sync master: cannot listen for bulk resync requests: %s", e)
        self.queueing = True   # from here on close() turns the engines' queueing off
        for w in self.engines.workers():
            self.engines.call(w, "set_sync_master", True)
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._run(), name="pylvs-sync-master"))
        self.tasks.append(loop.create_task(self._bulk(), name="pylvs-sync-bulk"))
        if self.listen is not None:
            loop.add_reader(self.listen.fileno(), self._on_request)

    async def close(self) -> None:
        """Stop: the engines stop queueing conns, and the conns still in the
        partial message are dropped unsent, as sync_thread_master releases
        its current buffer when the thread stops."""
        for w in self.engines.workers() if self.queueing else ():
            try:
                self.engines.call(w, "set_sync_master", False)
            except Exception as e:
                log.error("sync master: set_sync_master(False): %s", e)
        await super().close()

    def drain(self, now: float) -> list[bytes]:
        """Every engine's queued conns into the buffer; the messages due at
        ``now`` (time.monotonic() seconds: the buffer's flush clock)."""
        for w in self.engines.workers():
            while True:
                n = int(self.engines.call(w, "sync_drain", self.rows))
                if n <= 0:
                    break
                self.stats["drained"] += n
                self.buffer.add(self.rows[:n], now)
                if n < len(self.rows):
                    break
        return self.buffer.take(now)

    async def _run(self) -> None:
        while True:
            try:
                await self._send(self.out, self.drain(time.monotonic()))
            except Exception:
                log.exception("sync master: drain failed")
            await asyncio.sleep(SEND_DELAY)

    def _on_request(self) -> None:
        for _ in range(RECV_BUDGET):
            try:
                buf = self.listen.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("sync master: recv: %s", e)
                return
            self.request(buf)

    def request(self, buf: bytes) -> bool:
        """A datagram heard on the group: is it a bulk request to answer?"""
        ctl = wire.parse_control(buf)
        if ctl is None or ctl[0] != wire.BULK_REQUEST:
            return False   # sync messages of other masters, END answers
        _kind, syncid, nonce = ctl
        if self.cfg.syncid and syncid and syncid != self.cfg.syncid:
            self.stats["bulk_requests_other_syncid"] += 1
            return False
        self.stats["bulk_requests"] += 1
        if nonce in self.walking:
            # A backup's retry while the walk it asked for still runs (a
            # table longer than the backup's first 1 s wait: ~80,000 conns
            # at BULK_RATE): that walk's END answers it; queued again it
            # would cost a second walk of the whole table.
            self.stats["bulk_requests_in_walk"] += 1
            return False
        if nonce not in self.requests and len(self.requests) >= BULK_PENDING:
            # A flood of requests (or a host lying on the sync link) must
            # not make the master send an END per request: one walk runs
            # anyway, and a real backup asks again when no END comes.
            self.stats["bulk_requests_dropped"] += 1
            return False
        self.requests.setdefault(nonce, time.monotonic())
        self.bulk_wake.set()
        return True

    async def _bulk(self) -> None:
        """One walk of every engine at a time; the requests that arrive
        during a walk are answered by the next one (a walk that began
        before a request may have passed conns made since)."""
        while True:
            await self.bulk_wake.wait()
            self.bulk_wake.clear()
            nonces, self.requests = list(self.requests), {}
            self.walking = frozenset(nonces)
            try:
                await self.walk()
                for n in nonces:
                    await self._send(self.out, [wire.control_message(
                        wire.BULK_END, self.cfg.syncid, n)], "bulk_end_")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sync master: bulk resync failed")
                continue
            finally:
                self.walking = frozenset()
            self.stats["bulk_walks"] += 1

    async def walk(self) -> None:
        """Send every engine's whole table (templates included), paced at
        BULK_RATE messages a second."""
        out = np.zeros(BULK_CHUNK, dtype=SYNC_DTYPE)
        t0, sent = time.monotonic(), 0
        for w in self.engines.workers():
            start = 0
            while start >= 0:
                n, start = self.engines.call(w, "sync_chunk", start, out, time.monotonic())
                msgs = wire.encode(out[:int(n)], self.cfg.syncid, self.maxlen)
                await self._send(self.out, msgs, "bulk_")
                sent += len(msgs)
                ahead = sent / BULK_RATE - (time.monotonic() - t0)
                await asyncio.sleep(max(0.0, ahead))   # also lets the loop breathe


class Backup(_Daemon):
    COUNTERS = (*_Daemon.COUNTERS[:3], "installed", "install_errors", "send_errors",
                "bulk_request_messages", "bulk_request_bytes", "bulk_reasks", "bulk_done")

    def __init__(self, *args):
        super().__init__(*args)
        self.drops = wire.new_counts()
        self._logged: dict[str, int] = {}
        self._logged_at = -LOG_EVERY
        self.nonce = int.from_bytes(os.urandom(4), "big")
        self.bulk_done = asyncio.Event()
        self.asking: asyncio.Task | None = None
        # Re-asking (rules_tick): a record went uninstalled since the last
        # request; the rules common to that request and every miss since
        # (a dest taken out after the request and back again is new to
        # them), the last ones seen and when they changed.
        self.missed = False
        self._asked_rules = self._seen_rules = self._missed_with = self.engines.rules()
        self._changed_at = time.monotonic()
        self._asked_at = float("-inf")   # REASK_EVERY spaces the re-asks, not the first

    def start(self) -> None:
        self.engines.check(("sync_install",))
        self.inp = receive_socket(self.cfg, self.index)
        self.socks.append(self.inp)
        self.ask = send_socket(self.cfg, self.index, self.addr)
        self.socks.append(self.ask)
        got = set_rcvbuf(self.inp, RCVBUF)
        if got < 2 * RCVBUF:
            log.info("sync backup: receive buffer %d bytes, not %d (without CAP_NET_ADMIN "
                     "net.core.rmem_max caps it): a bulk resync may overflow it (Udp "
                     "RcvbufErrors in /proc/net/snmp)", got, 2 * RCVBUF)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.inp.fileno(), self._on_readable)
        self.asking = loop.create_task(self._ask(), name="pylvs-sync-bulk-request")
        self.tasks.append(self.asking)
        self.tasks.append(loop.create_task(self._watch_rules(), name="pylvs-sync-rules"))

    def rules_tick(self, now: float) -> bool:
        """Is a new bulk request due? Yes when a record went uninstalled
        since the last request (no such service or dest here, typically:
        the backup started before its rules) and the rules gained a service
        or dest the request or a miss since lacked, have rested
        REASK_SETTLE s, and the last re-ask is REASK_EVERY s old. Rules that only shrink (a real server taken
        out) never ask. (The rules are only read while something is
        missing: a large dest table costs nothing in the usual case.)"""
        if not self.missed:
            return False
        rules = self.engines.rules()
        if rules != self._seen_rules:
            self._seen_rules, self._changed_at = rules, now
        return (not rules <= self._asked_rules
                and now - self._changed_at >= REASK_SETTLE
                and now - self._asked_at >= REASK_EVERY)

    def reask(self, now: float) -> None:
        """Ask for the whole table again, with a new nonce (an END for the
        old request does not answer this one) and the same back-off."""
        self.missed = False
        self._asked_rules, self._asked_at = self._seen_rules, now
        self.nonce = int.from_bytes(os.urandom(4), "big")
        self.bulk_done = asyncio.Event()
        self.stats["bulk_reasks"] += 1
        if self.asking is not None:
            self.asking.cancel()
            self.tasks.remove(self.asking)
        self.asking = asyncio.get_running_loop().create_task(
            self._ask(), name="pylvs-sync-bulk-request")
        self.tasks.append(self.asking)
        log.info("sync backup: rules added since records went uninstalled: asking the "
                 "master for its whole table again")

    async def _watch_rules(self) -> None:
        while True:
            await asyncio.sleep(REASK_POLL)
            try:
                if self.rules_tick(time.monotonic()):
                    self.reask(time.monotonic())
            except Exception:
                log.exception("sync backup: watching the rules failed")

    async def _ask(self) -> None:
        """BULK_REQUEST now, after each of BULK_RETRY s without an END, then
        every BULK_RETRY_EVERY s until one comes: a master daemon started
        long after this backup (an operator enabling sync on a running
        director) is heard from within seconds, not never. (An IPVS master
        never answers: 20 bytes every 10 s.)"""
        msg = wire.control_message(wire.BULK_REQUEST, self.cfg.syncid, self.nonce)
        waits = iter(BULK_RETRY)
        for n in itertools.count():
            await self._send(self.ask, [msg], "bulk_request_")
            if n == len(BULK_RETRY):
                log.info("sync backup: no master answered the bulk request for syncid %d "
                         "in %g s; asking every %g s (a pylvs master daemon of that syncid "
                         "answers; an IPVS master never does)", self.cfg.syncid,
                         sum(BULK_RETRY), BULK_RETRY_EVERY)
            try:
                await asyncio.wait_for(self.bulk_done.wait(), next(waits, BULK_RETRY_EVERY))
                return
            except asyncio.TimeoutError:
                pass

    def _on_readable(self) -> None:
        for _ in range(RECV_BUDGET):
            try:
                buf, _anc, flags, src = self.inp.recvmsg(self.maxlen)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("sync backup: recv: %s", e)
                return
            src = src[0] if isinstance(src, tuple) else str(src)
            dropped = sum(self.drops.values())
            try:
                if flags & socket.MSG_TRUNC:
                    self.too_long(len(buf), src)
                else:
                    self.receive(buf, time.monotonic())
            except Exception:
                log.exception("sync backup: a message failed to install")
                self.stats["install_errors"] += 1
            if sum(self.drops.values()) != dropped:
                self._log_drops(src, buf)

    def too_long(self, nbytes: int, src: str) -> None:
        """A datagram longer than sync_maxlen, cut to it by the read: dropped
        (the kernel's backup drops it too, as a bogus message size), and
        said once: the usual cause is a master's --sync-maxlen above this
        backup's."""
        self.stats["messages"] += 1
        self.stats["bytes"] += nbytes
        self.drops["too_long"] += 1
        if self.drops["too_long"] == 1:
            log.warning("sync backup: a message from %s is longer than this backup's "
                        "sync_maxlen %d: dropped (start the backup with --sync-maxlen at "
                        "least the master's)", src, self.maxlen)

    def _log_drops(self, src: str, buf: bytes = b"") -> None:
        """A warning for dropped datagrams, at most every LOG_EVERY s, with
        what was dropped since the last one (the last sender named, and
        the syncids when the last datagram was another syncid's: a master
        and a backup set up with different ones)."""
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY:
            return
        delta = {k: v - self._logged.get(k, 0) for k, v in self.drops.items()
                 if v != self._logged.get(k, 0)}
        self._logged, self._logged_at = dict(self.drops), now
        last = src
        if "wrong_syncid" in delta and len(buf) >= 2 and buf[1] != self.cfg.syncid:
            last += (f", syncid {buf[1]}; this backup takes syncid {self.cfg.syncid} "
                     "(0: any)")
        log.warning("sync backup: dropped %s (last from %s; pylvs stats: sync.backup.dropped)",
                    ", ".join(f"{k} +{v}" for k, v in sorted(delta.items())), last)

    def receive(self, buf: bytes, now: float) -> int:
        """One datagram: installs its records; returns how many."""
        self.stats["messages"] += 1
        self.stats["bytes"] += len(buf)
        ctl = wire.parse_control(buf)
        if ctl is not None:
            kind, _syncid, nonce = ctl
            if kind == wire.BULK_END and nonce == self.nonce and not self.bulk_done.is_set():
                self.stats["bulk_done"] += 1
                self.bulk_done.set()
            return 0
        recs = wire.decode(buf, self.cfg.syncid, self.drops)
        if not len(recs):
            return 0
        workers = list(self.engines.workers())
        which = worker_of(recs["caddr"], self.engines.services(), len(workers))
        installed = 0
        for i, w in enumerate(workers):
            part = recs[which == i]
            if len(part):
                installed += int(self.engines.call(w, "sync_install", part, now))
        self.stats["conns"] += len(recs)
        self.stats["installed"] += installed
        if installed < len(recs):
            self.missed = True
            rules = self.engines.rules()
            if rules is not self._missed_with:   # cached: republished tables only
                self._missed_with, self._asked_rules = rules, self._asked_rules & rules
        return installed


class SyncDaemons:
    """The director's master and backup daemons (at most one of each, as
    the kernel's); all methods run on the event loop."""

    def __init__(self, workers: Callable[[], Sequence], services: Callable[[], np.ndarray],
                 dests: Callable[[], np.ndarray | None] = lambda: None):
        self.engines = _Engines(workers, services, dests)
        self.running: dict[str, _Daemon] = {}

    async def start(self, req: dict) -> None:
        """start_daemon: SyncError "Daemon has already run" (EEXIST), "No
        such device" (ENODEV), or the socket's error."""
        cfg = SyncConfig.from_request(req)
        if cfg.role in self.running:
            raise SyncError("Daemon has already run")
        index, addr, mtu = iface_info(cfg.mcast_ifn)
        d = (Master if cfg.role == "master" else Backup)(cfg, self.engines, index, addr, mtu)
        try:
            d.start()
        except OSError as e:
            await d.close()
            raise SyncError(e.strerror or str(e)) from None
        except BaseException:
            await d.close()
            raise
        self.running[cfg.role] = d
        log.info("sync thread started: state = %s, mcast_ifn = %s, syncid = %d, maxlen = %d, "
                 "group = %s:%d", cfg.role.upper(), cfg.mcast_ifn, cfg.syncid, d.maxlen,
                 cfg.mcast_group, cfg.mcast_port)

    async def stop(self, req: dict) -> None:
        """stop_daemon: SyncError "No daemon is running" (ESRCH)."""
        role = req.get("state")
        d = self.running.pop(role, None) if isinstance(role, str) else None
        if d is None:
            raise SyncError("No daemon is running")
        await d.close()
        log.info("stopped %s sync daemon", role)

    async def close(self) -> None:
        for role in list(self.running):
            await self.running.pop(role).close()

    def list(self) -> list[dict]:
        """The running daemons, master first (ip_vs_genl_dump_daemons)."""
        return [self.running[r].describe() for r in ROLES if r in self.running]

    def stats(self) -> dict:
        """Counters per running daemon (docs/sync.md, "Counters")."""
        out = {}
        for role, d in self.running.items():
            s = {k: int(v) for k, v in d.stats.items()}
            if isinstance(d, Backup):
                s["dropped"] = {k: int(v) for k, v in d.drops.items()}
                s["bulk_complete"] = d.bulk_done.is_set()
            out[role] = s
        return out

    def handlers(self) -> dict:
        """The control socket operations (pylvs.control.rpc handlers; a
        refusal answers {"ok": false, "error": ipvsadm's words})."""
        from ..control.balancer import BalancerError

        def refusing(fn):
            async def op(req: dict):
                try:
                    return await fn(req)
                except SyncError as e:
                    raise BalancerError(str(e)) from None
            return op

        async def daemons(_req: dict) -> list[dict]:
            return self.list()

        return {"start_daemon": refusing(self.start), "stop_daemon": refusing(self.stop),
                "daemons": daemons}
