"""``pylvs realserver run``: the user-space IPIP/GUE decapsulator of a Tun real server.

For kernels without the ipip module (and containers that may not load it).
One process, one loop::

    eth0 ──► AF_PACKET tap (SOCK_DGRAM, ETH_P_ALL; cBPF: IPv4, proto 4 or UDP to --gue-port)
     │         └─► decap.decapsulate(): outer, GUE and inner checks, VIP match
     │                └─► write(TUN fd)  ──► the kernel receives the inner packet
     │                                       on the TUN device, delivers it to the
     │                                       VIP on lo; the reply leaves by the
     │                                       routing table, straight to the client
     └─► nft table netdev pylvs_realserver, ingress on eth0:
           IPIP / GUE to this host's addresses on eth0: drop
           (after the AF_PACKET tap has seen them, so the kernel's stack never
           answers them with ICMP protocol / port unreachable)

The TUN device (IFF_TUN | IFF_NO_PI: each write is exactly one IP packet)
gets ``rp_filter=0`` of its own; the kernel uses the larger of ``all`` and
the device's value, so ``all`` must be 0 too (the device has no IPv4
address, and fib_validate_source in net/ipv4/fib_frontend.c rejects the
source on such a device in loose mode (2) as in strict mode (1)):
``pylvs realserver setup --fwd tun`` sees to that, and this command refuses
to start otherwise.

One decapsulator per network namespace: a second one would install the
same nft table and remove it when it exits, under the first. Each run holds
an flock on ``/run/pylvs/realserver-<netns inode>-decap.lock`` for its life
and refuses to start while another holds it. The kernel drops an flock when
its holder dies, however it dies, so a file left by a killed run (or by a
deleted namespace whose inode this one reuses) blocks nothing; teardown
removes the file. A run killed
with SIGKILL leaves its nft table behind (it keeps IPIP/GUE from the stack);
the next run replaces it, and ``pylvs realserver teardown`` removes it
(:func:`stop_running`, which also stops a running decapsulator).

The interface going down makes recv fail (ENETDOWN): counted in
``error_link``, logged at most every LOG_INTERVAL seconds, and the loop goes
on (the kernel re-hooks the socket when the link comes up). An interface
deleted and re-created under the same name gets a new socket and nft table
(``reattach``); while it does not exist the loop looks for it every
REATTACH_INTERVAL seconds until stopped.

Counters (decap.COUNTER_NAMES) go to a stats file,
``/run/pylvs/realserver-<netns inode>-decap.json``, rewritten at most once a
second while they change and read by ``pylvs realserver status``; SIGUSR1
prints them, SIGTERM / SIGINT stop the loop, print them, and remove the nft
table, the TUN device and the stats file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

from pylvs.io import bpf
from pylvs.io.afpacket import (PACKET_IGNORE_OUTGOING, PACKET_STATISTICS, SOL_PACKET,
                               attach_filter)

from . import config
from .decap import ACCEPT, COUNTER_NAMES, decapsulate

ETH_P_IP = 0x0800
ETH_P_ALL = 0x0003
NFT_TABLE = "pylvs_realserver"
TUN_NAME = "plvsdec0"
RCVBUF = 4 << 20
# An IPv4 packet is at most 64 KiB; GRO may hand the tap nothing larger.
BUF = 65536 + 256
# recv errors the interface causes, not the decapsulator: ENETDOWN when it
# goes down or is deleted (packet_notifier sets sk_err), ENXIO/ENODEV when
# the device behind the socket is gone.
LINK_ERRNOS = frozenset({errno.ENETDOWN, errno.ENXIO, errno.ENODEV})
LOG_INTERVAL = 10.0      # seconds between two link-error log lines
REATTACH_INTERVAL = 1.0  # seconds between two looks for a deleted interface


def tunnel_filter(gue_port: int | None) -> list[bpf.Insn]:
    """cBPF for a SOCK_DGRAM packet socket (offsets from the IP header).

    Accepts IPv4 packets to this host's MAC (PACKET_HOST) that are IPIP
    (proto 4) or, with ``gue_port``, UDP first fragments to that port;
    rejects the rest so ordinary traffic is never copied to user space.
    """
    a = bpf._Asm()
    a.op(bpf.LD | bpf.W | bpf.ABS, bpf.SKF_AD_OFF + bpf.SKF_AD_PKTTYPE)
    a.if_eq(bpf.PACKET_HOST, "host")
    a.jump("reject")
    a.label("host")
    a.op(bpf.LD | bpf.H | bpf.ABS, bpf.SKF_AD_OFF + bpf.SKF_AD_PROTOCOL)
    a.if_eq(ETH_P_IP, "ipv4")
    a.jump("reject")
    a.label("ipv4")
    a.op(bpf.LD | bpf.B | bpf.ABS, 9)       # protocol
    a.if_eq(4, "accept")
    if gue_port is not None:
        a.if_eq(17, "udp")
        a.jump("reject")
        a.label("udp")
        a.op(bpf.LD | bpf.H | bpf.ABS, 6)   # flags + fragment offset
        a.if_set(0x1FFF, "reject")
        a.op(bpf.LDX | bpf.B | bpf.MSH, 0)  # X = IP header length
        a.op(bpf.LD | bpf.H | bpf.IND, 2)   # UDP destination port
        a.if_eq(gue_port, "accept")
    a.jump("reject")
    return bpf._tail(a)


def nft_script(iface: str, local: list[str], gue_port: int | None) -> str:
    """The nftables table that keeps IPIP/GUE to this host from the kernel's stack."""
    addrs = ", ".join(local)
    gue = (f"    ip daddr {{ {addrs} }} udp dport {gue_port} counter drop\n"
           if gue_port is not None else "")
    return (f"table netdev {NFT_TABLE}\ndelete table netdev {NFT_TABLE}\n"
            f"table netdev {NFT_TABLE} {{\n"
            f"  chain ingress {{\n"
            f'    type filter hook ingress device "{iface}" priority -500; policy accept;\n'
            f"    ip daddr {{ {addrs} }} ip protocol 4 counter drop\n"
            f"{gue}"
            f"  }}\n}}\n")


def _nft(script: str) -> None:
    p = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True,
                       timeout=30)
    if p.returncode:
        raise config.RealServerError(f"nftables: {p.stderr.strip()}")


def table_installed() -> bool:
    """Whether this namespace has the decapsulator's nft table (False without nft)."""
    try:
        p = subprocess.run(["nft", "list", "table", "netdev", NFT_TABLE], capture_output=True,
                           timeout=30)
    except FileNotFoundError:
        return False
    return p.returncode == 0


# -- one decapsulator per namespace ------------------------------------------------

LOCKS = "/proc/locks"


def lock_holder(path, locks: str = LOCKS) -> int | None:
    """The pid holding an flock on PATH, from /proc/locks; None when none does.

    A /proc/locks line reads ``1: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF``
    (major and minor in hex, fs/locks.c lock_get_status); ``->`` lines are
    waiters, not holders.
    """
    try:
        st = os.stat(path)
        with open(locks) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK":
            continue
        try:
            maj, mi, ino = f[5].split(":")
            if (int(maj, 16), int(mi, 16), int(ino)) == want and int(f[4]) > 0:
                return int(f[4])
        except ValueError:
            continue
    return None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def take_lock() -> int:
    """Take this namespace's decapsulator lock for the life of the process; its fd.

    Raises RealServerError naming the running decapsulator when another
    holds it. Teardown removes the file while holding the lock, so a lock
    taken on a file no longer at PATH is let go and taken again (else two
    runs could each hold a lock on a different file).
    """
    config.STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = config.decap_lock_path()
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            pid = lock_holder(path)
            raise config.RealServerError(
                f"another 'pylvs realserver run'{f' (pid {pid})' if pid else ''} is running in "
                f"this network namespace; one decapsulator per namespace: stop it first "
                f"('pylvs realserver teardown' stops it)")
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise config.RealServerError(f"cannot take the lock {path}: it keeps being removed")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def stop_running(wait: float = 10.0) -> list[str]:
    """Stop this namespace's running decapsulator (SIGTERM, then up to WAIT
    seconds for it to exit) and remove the nft table a killed one left.

    Returns one line per thing done. Raises RealServerError when the
    decapsulator does not exit in time (nothing else is done then).
    """
    done = []
    path = config.decap_lock_path()
    if path.exists():
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if not _try_lock(fd):
                pid = lock_holder(path)
                if pid is None:
                    raise config.RealServerError(
                        f"a 'pylvs realserver run' holds {path} but /proc/locks does not show "
                        f"its pid: stop it, then run 'pylvs realserver teardown' again")
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + wait
                while not _try_lock(fd):
                    if time.monotonic() > deadline:
                        raise config.RealServerError(
                            f"the decapsulator (pid {pid}) did not exit within {wait:g} s of "
                            f"SIGTERM: kill it (kill -9 {pid}), then run 'pylvs realserver "
                            f"teardown' again")
                    time.sleep(0.05)
                done.append(f"decapsulator pid {pid} stopped (SIGTERM); it removed its nft "
                            f"table and TUN device")
            # Ours now: nothing is left to lock, so the file goes (take_lock
            # copes with a file removed under it).
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    if table_installed():
        _nft(f"delete table netdev {NFT_TABLE}\n")
        done.append(f"nft table netdev {NFT_TABLE} removed (left by a decapsulator that was "
                    f"killed; it kept IPIP/GUE from this host's stack)")
    config.state_path("-decap").unlink(missing_ok=True)
    return done


class Decapsulator:
    """The running decapsulator; :meth:`start` creates everything, :meth:`stop` removes it."""

    def __init__(self, iface: str, vips: list[str], gue_port: int | None, tun_name: str):
        self.iface, self.vips, self.gue_port, self.tun_name = iface, vips, gue_port, tun_name
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.local: list[str] = []
        self.sock = self.tun = None
        self.nft_installed = False
        self.stats_path = config.state_path("-decap")
        self._written = None
        self._logged = None
        self._gone = False
        self.ifindex: int | None = None

    def check(self) -> None:
        """Refuse (RealServerError) before creating anything, and before taking
        the lock, when the arguments could not work here."""
        n = self.tun_name
        if not 0 < len(n) <= 15 or n in (".", "..") or any(c in "/:" or c.isspace() for c in n):
            # The kernel's dev_valid_name; pytun would raise a bare error.
            raise config.RealServerError(
                f"--tun-name {n!r}: not a valid interface name (1 to 15 characters, "
                f"no '/', ':' or spaces)")
        config._check_root()
        with config._ipr() as ipr:
            if config._ifindex(ipr, self.iface) is None:
                raise config.RealServerError(f"--iface {self.iface}: no such interface")
            config.check_vips_here(self.vips, ipr)
            addrs = config._addrs(ipr)
        self.local = [a for a, _, dev in addrs if dev == self.iface]
        self._local_b = frozenset(socket.inet_aton(a) for a in self.local)
        self._vips_b = frozenset(socket.inet_aton(v) for v in self.vips)
        if not self.local:
            raise config.RealServerError(f"{self.iface} has no IPv4 address: IPIP/GUE from the "
                                         f"director is sent to one of them (the RIP)")
        mine = {a for a, _, _ in addrs}
        missing = [v for v in self.vips if v not in mine]
        if missing:
            raise config.RealServerError(
                f"VIP {', '.join(missing)} not configured on this host: the kernel would "
                f"not accept the inner packets; run 'pylvs realserver setup --fwd tun' first")
        rp = config.read_sysctl("all", "rp_filter")
        if rp:
            mode = "strict" if rp == 1 else "loose"
            raise config.RealServerError(
                f"net.ipv4.conf.all.rp_filter is {rp} ({mode}): the TUN device has no "
                f"address, so the kernel would drop every decapsulated packet; run "
                f"'pylvs realserver setup --fwd tun' first")

    def _check_device(self) -> None:
        with config._ipr() as ipr:
            if config._ifindex(ipr, self.tun_name) is not None:
                raise config.RealServerError(
                    f"{self.tun_name} already exists: is another 'pylvs realserver run' "
                    f"running here?")

    def _open_socket(self) -> None:
        """The AF_PACKET tap on ``iface`` (remembering its ifindex)."""
        # ETH_P_ALL: a tap (ptype_all) runs before the netdev ingress hook
        # that drops these packets; a socket bound to ETH_P_IP would be
        # served after it (__netif_receive_skb_core) and see nothing.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            attach_filter(sock, tunnel_filter(self.gue_port))
            sock.bind((self.iface, ETH_P_ALL))
            sock.settimeout(0.5)
        except Exception:
            sock.close()
            raise
        self.sock, self.ifindex = sock, socket.if_nametoindex(self.iface)

    def start(self) -> None:
        import pytun
        self._check_device()
        try:
            self.tun = pytun.TunTapDevice(name=self.tun_name,
                                          flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
            config.write_sysctl(self.tun_name, "rp_filter", 0)
            v6 = f"/proc/sys/net/ipv6/conf/{self.tun_name}/disable_ipv6"
            if os.path.exists(v6):
                # Nothing is routed out of this device: no IPv6 chatter queued on it.
                with open(v6, "w") as f:
                    f.write("1\n")
            self.tun.up()
            self._open_socket()
            # Only once the tap is open: from here on it sees what ingress drops.
            if table_installed():
                # The lock is ours, so no live decapsulator owns this table.
                print(f"pylvs realserver run: replacing the nft table netdev {NFT_TABLE} "
                      f"left by a killed run", flush=True)
            _nft(nft_script(self.iface, self.local, self.gue_port))
            self.nft_installed = True
        except Exception:
            self.stop()
            raise
        self.write_stats(force=True)

    def handle(self, pkt: memoryview) -> None:
        c = self.counters
        c["rx"] += 1
        name, inner = decapsulate(pkt, self._local_b, self._vips_b, self.gue_port)
        c[name] += 1
        if name in ACCEPT:
            try:
                os.write(self.tun.fileno(), inner)
                c["tx"] += 1
            except OSError:
                c["drop_tun_write"] += 1

    def loop(self, should_stop, on_usr1) -> None:
        buf = bytearray(BUF)
        view = memoryview(buf)
        while not should_stop():
            if on_usr1():
                self.print_counters()
            if self.sock is None:
                # The interface is gone: look for it again at a bounded interval.
                time.sleep(REATTACH_INTERVAL)
                self.reattach()
                continue
            try:
                n = self.sock.recv_into(buf)
            except (TimeoutError, InterruptedError):
                self.reattach()
                self.write_stats()
                continue
            except OSError as e:
                if e.errno not in LINK_ERRNOS:
                    raise
                self.link_error(e)
                continue
            self.handle(view[:n])
            self.write_stats()

    def link_error(self, e: OSError) -> None:
        """A recv error the interface caused (down, deleted): counted in
        ``error_link``, logged at most once per LOG_INTERVAL seconds; the
        socket is re-bound when the interface was re-created."""
        self.counters["error_link"] += 1
        self.log(f"{self.iface}: {os.strerror(e.errno)} (errno {e.errno}); carrying on "
                 f"({self.counters['error_link']} link error(s) so far)")
        self.reattach()
        self.write_stats(force=True)

    def log(self, msg: str) -> None:
        now = time.monotonic()
        if self._logged is not None and now - self._logged < LOG_INTERVAL:
            return
        self._logged = now
        sys.stderr.write(f"pylvs realserver run: {msg}\n")
        sys.stderr.flush()

    def reattach(self) -> None:
        """Re-bind the tap (and re-install the nft table) when ``iface`` was
        deleted and re-created (a new ifindex: the old socket is unbound, the
        old ingress hook gone); close it while the interface does not exist.
        A link going down and up keeps its ifindex: the kernel re-hooks the
        socket itself (packet_notifier in net/packet/af_packet.c)."""
        try:
            idx = socket.if_nametoindex(self.iface)
        except OSError:
            idx = None
        if idx == self.ifindex and self.sock is not None:
            return
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if idx is None:
            if not self._gone:
                self._gone = True
                sys.stderr.write(f"pylvs realserver run: {self.iface} is gone; looking for it "
                                 f"again every {REATTACH_INTERVAL:g} s\n")
                sys.stderr.flush()
            return
        with config._ipr() as ipr:
            local = [a for a, _, dev in config._addrs(ipr) if dev == self.iface]
        if not local:
            return  # re-created but not addressed yet: try again later
        try:
            self._open_socket()
            self.local = local
            self._local_b = frozenset(socket.inet_aton(a) for a in local)
            _nft(nft_script(self.iface, self.local, self.gue_port))
        except (OSError, config.RealServerError) as e:
            self.log(f"{self.iface}: cannot re-attach yet ({e}); trying again")
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            return
        self._gone = False
        self.counters["reattach"] += 1
        sys.stderr.write(f"pylvs realserver run: {self.iface} is back (ifindex {idx}); "
                         f"decapsulating to {', '.join(local)} again\n")
        sys.stderr.flush()

    def stats(self) -> dict:
        return {"pid": os.getpid(), "iface": self.iface, "tun": self.tun_name,
                "vips": self.vips, "gue_port": self.gue_port, "local": self.local,
                "counters": dict(self.counters)}

    def _read_overruns(self) -> None:
        if self.sock is None:
            return
        # struct tpacket_stats {tp_packets, tp_drops}; reading resets both.
        _, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.counters["drop_overrun"] += drops

    def write_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self._written is not None and now - self._written[0] < 1.0:
            return
        self._read_overruns()
        if not force and self._written and self._written[1] == self.counters:
            return
        config.STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stats()) + "\n")
        tmp.replace(self.stats_path)
        self._written = (now, dict(self.counters))

    def print_counters(self, out=None) -> None:
        self._read_overruns()
        out = out or sys.stdout
        out.write("".join(f"  {k:<24} {v}\n" for k, v in self.counters.items()))
        out.flush()

    def stop(self) -> None:
        """Remove the nft table, the TUN device and the stats file (each step best effort)."""
        if self.nft_installed:
            try:
                _nft(f"delete table netdev {NFT_TABLE}\n")
            except Exception as e:
                sys.stderr.write(f"pylvs realserver run: {e}\n")
            self.nft_installed = False
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.tun is not None:
            # Not persistent: closing the last fd deletes the device.
            self.tun.close()
            self.tun = None
        self.stats_path.unlink(missing_ok=True)


def run(iface: str | None, vips: list[str], gue_port: int | None,
        tun_name: str = TUN_NAME) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop. Raises RealServerError when refused:
    the arguments first (Decapsulator.check), then another decapsulator running in this
    namespace (the lock)."""
    config._check_root()
    d = _decapsulator(iface, vips, gue_port, tun_name)
    lock = take_lock()
    try:
        return _run(d)
    finally:
        os.close(lock)


def _decapsulator(iface: str | None, vips: list[str], gue_port: int | None,
                  tun_name: str) -> "Decapsulator":
    """The Decapsulator the arguments (and an earlier ``setup --fwd tun``) ask for, checked."""
    state, _ = config.load_state(forget_stale=False)
    cfg = config.Config(**state["config"]) if state else None
    if not vips and cfg and config.is_tun(cfg.fwd):
        vips = cfg.vips
    if not vips:
        raise config.RealServerError("give --vip (or run 'pylvs realserver setup --fwd tun' "
                                     "first, whose VIPs are then used)")
    vips = [config._parse_vip(v) for v in vips]
    if gue_port is not None and not 0 < gue_port < 65536:
        raise config.RealServerError(f"--gue-port {gue_port}: not a UDP port")
    if not iface:
        iface = cfg.iface if cfg and config.is_tun(cfg.fwd) else None
    if not iface:
        with config._ipr() as ipr:
            iface = config.default_iface(ipr)
    if not iface:
        raise config.RealServerError("no default route to take the interface from: give --iface")
    d = Decapsulator(iface, vips, gue_port, tun_name)
    d.check()
    return d


def _run(d: "Decapsulator") -> int:
    flags = {"stop": False, "usr1": False}

    def on_signal(signum, frame):
        flags["usr1" if signum == signal.SIGUSR1 else "stop"] = True

    def take_usr1() -> bool:
        hit, flags["usr1"] = flags["usr1"], False
        return hit

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, on_signal)
    d.start()
    gue = f", GUE on UDP port {d.gue_port}" if d.gue_port is not None else ""
    print(f"pylvs realserver run: decapsulating IPIP{gue} to {', '.join(d.local)} on {d.iface} "
          f"for VIP {', '.join(d.vips)} into {d.tun_name} (pid {os.getpid()}; SIGUSR1 prints "
          f"counters; stats in {d.stats_path})", flush=True)
    try:
        d.loop(lambda: flags["stop"], take_usr1)
    finally:
        print("pylvs realserver run: stopping; counters:", flush=True)
        d.print_counters()
        d.stop()
    return 0
