"""The VS-NAT namespace lab shared by the tests, ``make demo`` and ``pylvs lab``.

::

    client ns                director ns                  switch ns            rsK ns
    +-----------+  veth   +-----------------+  veth   +-------------+  veth  +-----------+
    | eth0      |---------| eth0            |         |    br0      |--------| eth0      |
    | cip       |         |  dip0 10.0.0.1  |         |  (bridge)   |        | rip       |
    | 10.0.0.2  |         |  vip 10.0.0.100 |         |             |        | 10.0.1.1K |
    +-----------+         | eth1            |---------| dir rs1..rsN|        | gw = dip  |
                          |  dip 10.0.1.1   |         +-------------+        +-----------+
                          +-----------------+

With ``router=True`` a router namespace stands between the client and the
director (the client is then one routed hop away, as on the Internet)::

    client ns (10.0.2.2) ---- router ns (eth0 10.0.2.1 | eth1 10.0.0.2) ---- director eth0

``router_mtu`` sets the MTU of the router's client-side interface (the
client's own interface stays at 1500, so the client still advertises an MSS
of 1460 and the router is the bottleneck that must send ICMP frag-needed);
``server_mtu`` sets the MTU of the whole server segment (director eth1,
bridge, real servers), the director's own egress toward the real servers.

Every namespace name starts with the caller's prefix (``pl<uid>-``) so labs of
concurrent tests never collide, and interfaces are created directly inside
lab namespaces (a veth's peer is born in its target namespace): the root
namespace is never touched.

Before creating anything the lab writes what it is about to create to
``/run/pylvs/labs/<name>.json``; ``destroy(name)`` (``pylvs lab down``) reads
that record, so a lab left by a crashed or killed run can still be removed.

Sysctls set in every lab namespace (a new namespace inherits the IPv4
``all``/``default`` values of the root namespace, so they are set explicitly
to make the lab independent of the host):

- ``net.ipv6.conf.{all,default}.disable_ipv6=1``: no link-local addresses,
  router solicitations or MLD reports, so captures and interface counters
  show only the lab's IPv4 traffic.
- ``net.ipv4.conf.{all,default}.rp_filter=1`` (strict): pylvs takes the
  virtual service's packets before the kernel routes them, so it must work
  with the strictest reverse-path filter a distribution may set; the lab
  proves that instead of relaxing it.

Director only:

- ``net.ipv4.ip_forward`` = ``ip_forward`` (0 by default): pylvs forwards in
  user space, the kernel's forwarding is irrelevant to it, and tests run
  with both values. (The kernel-nft benchmark baseline sets 1 itself.)
- ``net.ipv4.conf.all.send_redirects=0``: with ip_forward=1 the kernel could
  otherwise send ICMP redirects for stray traffic between the two segments,
  which would pollute the "no ICMP from the director" capture.

Router only (``router=True``):

- ``net.ipv4.ip_forward=1``: it is an ordinary kernel router between the
  client's segment and the director's; on its smaller-MTU link it answers a
  DF packet that does not fit with ICMP frag-needed (RFC 1191), which is
  what the path-MTU tests need from it. Its rp_filter stays strict: routes
  are symmetric, every source arrives where the reply would leave.

The director then routes the client's segment via the router
(``10.0.2.0/24 via 10.0.0.2``), so the kernel's reverse-path check (and
pylvs's, which follows the same routes) accepts the client's address on
eth0.

``accept_local`` is not needed: no packet with a local source address
arrives at the director. ``arp_ignore``/``arp_announce`` stay at their
defaults: in VS-NAT the real servers do not hold the VIP (that is VS-DR's
"ARP problem"), and the director must answer ARP for the VIP.

Veth offloads are left at their defaults (on): the data path must cope with
partial checksums and GSO frames, and the lab should show it does.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE_DIR = Path(os.environ.get("PYLVS_LAB_DIR", "/run/pylvs/labs"))
NETNS_DIR = Path("/run/netns")

CLIENT_NET = "10.0.0"
SERVER_NET = "10.0.1"
CIP = f"{CLIENT_NET}.2"
DIP0 = f"{CLIENT_NET}.1"      # the director's own address on the client side
VIP = f"{CLIENT_NET}.100"
DIP = f"{SERVER_NET}.1"
FAR_NET = "10.0.2"           # the client's segment behind the router (router=True)
ROUTER = f"{CLIENT_NET}.2"   # the router's address on the director's segment
RIP_BASE = 11                 # rs1 = 10.0.1.11, rs2 = 10.0.1.12, ...
PREFIXLEN = 24

HTTP_PORT = 80
UDP_PORT = 7

COMMON_SYSCTLS = (
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
    "net.ipv4.conf.all.rp_filter=1",
    "net.ipv4.conf.default.rp_filter=1",
)


class LabError(RuntimeError):
    pass


def _run(argv: list[str], timeout: float = 10.0, check: bool = True,
         **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run(argv, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({p.returncode}): "
                       f"{(p.stderr or '').strip()}")
    return p


def ns_exec_argv(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def netns_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def ns_pids(ns: str) -> list[int]:
    """Processes living in namespace ns (only lab namespaces are asked)."""
    try:
        p = _run(["ip", "netns", "pids", ns], timeout=5, check=False)
    except subprocess.TimeoutExpired:
        return []
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _kill_pids(pids: list[int], grace: float = 3.0) -> None:
    me = os.getpid()
    pids = [p for p in pids if p != me]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.05)
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        # A zombie child still "exists": reap it if it is ours.
        r, _ = os.waitpid(pid, os.WNOHANG)
        if r == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def remove_netns(ns: str) -> None:
    """Kill whatever runs in ns, then delete it (its veths go with it)."""
    if not netns_exists(ns):
        return
    _kill_pids(ns_pids(ns))
    try:
        _run(["ip", "netns", "del", ns], timeout=10, check=False)
    except subprocess.TimeoutExpired:
        pass
    if netns_exists(ns):
        # The mount may be gone already while the file remains.
        try:
            os.unlink(NETNS_DIR / ns)
        except OSError:
            pass


@dataclass
class Lab:
    """One VS-NAT lab. Use as a context manager, or call up() / down()."""

    name: str
    servers: int = 3
    prefix: str = ""
    ip_forward: int = 0
    start_servers: bool = True
    router: bool = False
    router_mtu: int = 0       # the router's client-side interface (0: default 1500)
    server_mtu: int = 0       # director eth1, bridge and real servers (0: default)
    python: str = sys.executable
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.prefix:
            self.prefix = f"{self.name}-"
        if not 1 <= self.servers <= 200:
            raise ValueError("servers must be 1..200")
        # Names the namespaces once, so down() can rely on them.
        self.client = f"{self.prefix}client"
        self.director = f"{self.prefix}director"
        self.switch = f"{self.prefix}switch"
        self.rs = [f"{self.prefix}rs{i + 1}" for i in range(self.servers)]
        self.cip, self.vip, self.dip0, self.dip = CIP, VIP, DIP0, DIP
        self.rips = [f"{SERVER_NET}.{RIP_BASE + i}" for i in range(self.servers)]
        self.rs_names = [f"rs{i + 1}" for i in range(self.servers)]
        self.router_ns = f"{self.prefix}router" if self.router else ""
        if self.router:
            self.cip = f"{FAR_NET}.2"

    # --- names and records ---------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return [self.client, *([self.router_ns] if self.router else []), self.director,
                self.switch, *self.rs]

    @property
    def record_path(self) -> Path:
        return STATE_DIR / f"{self.name}.json"

    def log_path(self, what: str) -> Path:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        return STATE_DIR / f"{self.name}.{what}.log"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "prefix": self.prefix,
            "namespaces": self.namespaces,
            "client": {"ns": self.client, "iface": "eth0", "cip": self.cip},
            "director": {"ns": self.director, "ifaces": ["eth0", "eth1"],
                         "dip0": self.dip0, "vip": self.vip, "dip": self.dip,
                         "ip_forward": self.ip_forward},
            "switch": {"ns": self.switch, "bridge": "br0"},
            "router": ({"ns": self.router_ns, "addrs": [f"{FAR_NET}.1", ROUTER],
                        "client_side_mtu": self.router_mtu or 1500} if self.router else None),
            "real_servers": [{"name": n, "ns": ns, "rip": rip}
                             for n, ns, rip in zip(self.rs_names, self.rs, self.rips)],
            "pids": {k: p.pid for k, p in self.procs.items()},
            "created": time.time(),
        }

    def _write_record(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2))
        os.replace(tmp, self.record_path)

    # --- running things inside the lab ---------------------------------------

    def run(self, ns: str, argv: list[str], timeout: float = 30.0, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        return _run(ns_exec_argv(ns, argv), timeout=timeout, check=check, **kw)

    def popen(self, ns: str, argv: list[str], key: str | None = None,
              **kw) -> subprocess.Popen:
        """Start a process in ns (cwd: the repo); it is killed by down() (key names it)."""
        kw.setdefault("cwd", _repo_root())
        p = subprocess.Popen(ns_exec_argv(ns, argv), **kw)
        self.procs[key or f"{ns}:{p.pid}"] = p
        self._write_record()
        return p

    def sysctl(self, ns: str, *settings: str) -> None:
        self.run(ns, ["sysctl", "-q", "-w", *settings], timeout=10)

    def set_ip_forward(self, value: int) -> None:
        self.ip_forward = int(value)
        self.sysctl(self.director, f"net.ipv4.ip_forward={self.ip_forward}")

    def nft(self, ns: str, script: str, timeout: float = 10.0) -> str:
        return self.run(ns, ["nft", "-f", "-"], input=script, timeout=timeout).stdout

    def curl_argv(self, path: str, *extra: str, host: str | None = None,
                  port: int = HTTP_PORT, max_time: float = 10.0) -> list[str]:
        return ["curl", "-sS", "--noproxy", "*", "--max-time", str(max_time),
                "--connect-timeout", str(min(5.0, max_time)), *extra,
                f"http://{host or self.vip}:{port}{path}"]

    def curl(self, path: str, *extra: str, ns: str | None = None,
             max_time: float = 10.0, check: bool = True) -> subprocess.CompletedProcess:
        """curl from the client namespace (by default) to the VIP."""
        return self.run(ns or self.client, self.curl_argv(path, *extra, max_time=max_time),
                        timeout=max_time + 5, check=check)

    # --- building ------------------------------------------------------------

    def up(self) -> "Lab":
        for ns in self.namespaces:
            if netns_exists(ns):
                raise LabError(f"namespace {ns} already exists (another lab with "
                               f"prefix {self.prefix!r}? try `pylvs lab down --name {self.name}`)")
        self._write_record()
        try:
            self._build()
            if self.start_servers:
                self.start_real_servers()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        from pyroute2 import NetNS, netns

        for ns in self.namespaces:
            netns.create(ns)
            self.sysctl(ns, *COMMON_SYSCTLS)
        self.sysctl(self.director, f"net.ipv4.ip_forward={self.ip_forward}",
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0")

        # The director's eth0 peer is the client, or the router's eth1.
        front, front_if = ((self.router_ns, "eth1") if self.router else (self.client, "eth0"))
        with NetNS(self.director) as d:
            d.link("add", ifname="eth0", kind="veth",
                   peer={"ifname": front_if, "net_ns_fd": front})
            d.link("add", ifname="eth1", kind="veth",
                   peer={"ifname": "dir", "net_ns_fd": self.switch})
            _addr(d, "eth0", self.dip0)
            _addr(d, "eth0", self.vip)
            _addr(d, "eth1", self.dip)
            _mtu(d, self.server_mtu, "eth1")
            _up(d, "lo", "eth0", "eth1")
            if self.router:
                d.route("add", dst=f"{FAR_NET}.0/{PREFIXLEN}", gateway=ROUTER)

        if self.router:
            self.sysctl(self.router_ns, "net.ipv4.ip_forward=1")
            with NetNS(self.router_ns) as r:
                r.link("add", ifname="eth0", kind="veth",
                       peer={"ifname": "eth0", "net_ns_fd": self.client})
                _addr(r, "eth0", f"{FAR_NET}.1")
                _addr(r, "eth1", ROUTER)
                _mtu(r, self.router_mtu, "eth0")
                _up(r, "lo", "eth0", "eth1")

        with NetNS(self.client) as c:
            _addr(c, "eth0", self.cip)
            _up(c, "lo", "eth0")
            if self.router:
                c.route("add", dst="0.0.0.0/0", gateway=f"{FAR_NET}.1")

        with NetNS(self.switch) as s:
            # STP stays off (the default), so ports forward at once.
            s.link("add", ifname="br0", kind="bridge")
            br = s.link_lookup(ifname="br0")[0]
            ports = ["dir"]
            for i, rs in enumerate(self.rs):
                port = f"rs{i + 1}"
                s.link("add", ifname=port, kind="veth",
                       peer={"ifname": "eth0", "net_ns_fd": rs})
                ports.append(port)
            for port in ports:
                idx = s.link_lookup(ifname=port)[0]
                s.link("set", index=idx, master=br)
            _mtu(s, self.server_mtu, *ports, "br0")
            _up(s, "lo", "br0", *ports)

        for rs, rip in zip(self.rs, self.rips):
            with NetNS(rs) as r:
                _addr(r, "eth0", rip)
                _mtu(r, self.server_mtu, "eth0")
                _up(r, "lo", "eth0")
                # Replies to clients must come back through the director (VS-NAT).
                r.route("add", dst="0.0.0.0/0", gateway=self.dip)

    def start_real_servers(self, timeout: float = 10.0) -> None:
        """Start pylvs.lab.httpd in every real server; wait for each 'ready'."""
        started = []
        for name, ns in zip(self.rs_names, self.rs):
            # stderr to a file: a pipe nobody drains could block the server,
            # and `pylvs lab up` exits while the servers keep running.
            log = self.log_path(f"httpd-{name}")
            with open(log, "wb") as err:
                p = self.popen(ns, [self.python, "-m", "pylvs.lab.httpd", "--name", name,
                                    "--port", str(HTTP_PORT), "--udp-port", str(UDP_PORT)],
                               key=f"httpd-{name}", stdout=subprocess.PIPE, stderr=err,
                               stdin=subprocess.DEVNULL, cwd=_repo_root(),
                               start_new_session=True)
            started.append((name, p, log))
        deadline = time.monotonic() + timeout
        for name, p, log in started:
            if not wait_for_line(p, "ready", deadline - time.monotonic()):
                raise LabError(f"httpd in {name} did not become ready: "
                               f"{log.read_text(errors='replace')[-2000:]}")

    # --- the director (pylvs run / pylvs adm) ---------------------------------

    def pylvs_argv(self, *args: str) -> list[str]:
        # `python -m` rather than the console script: works from a checkout
        # whether or not the package is installed in the interpreter's env.
        return [self.python, "-m", "pylvs.cli.main", *args]

    def start_director(self, *extra: str, timeout: float = 20.0,
                       taskset: str | None = None) -> subprocess.Popen:
        """Start `pylvs run` in the director namespace; wait for "ready"."""
        log = self.log_path("director")
        argv = self.pylvs_argv("run", "--iface", "eth0", "--iface", "eth1", *extra)
        if taskset:
            argv = ["taskset", "-c", taskset, *argv]
        with open(log, "wb") as err:
            p = self.popen(self.director, argv, key="director", stdout=err, stderr=err,
                           stdin=subprocess.DEVNULL, cwd=_repo_root(),
                           start_new_session=True)
        if not wait_for_file(log, "ready", timeout, proc=p):
            text = log.read_text(errors="replace")[-3000:]
            self.stop_director()
            raise LabError(f"pylvs run did not log 'ready' within {timeout}s:\n{text}")
        return p

    def director_log(self) -> str:
        try:
            return self.log_path("director").read_text(errors="replace")
        except OSError:
            return ""

    def stop_director(self, timeout: float = 10.0) -> int | None:
        """SIGTERM `pylvs run`; returns its exit status (None if not running)."""
        p = self.procs.pop("director", None)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self._write_record()
        return p.returncode

    def wait_resolved(self, rips: list[str], timeout: float = 5.0) -> bool:
        """Wait until the director logs each rip's MAC (bounded).

        The director drops a new dest's frames until its neighbour entry
        resolves (drop_unresolved); a TCP client retransmits its SYN, but a
        lone UDP datagram sent right after `-a` would be lost.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.director_log()
            if all(f"dest {rip} via" in log for rip in rips):
                return True
            time.sleep(0.05)
        return False

    def adm(self, *args: str, check: bool = True, timeout: float = 15.0,
            stdin: str | None = None) -> str:
        """`pylvs adm ARGS` in the director namespace (stdin: text for -R); its stdout."""
        p = self.adm_run(*args, timeout=timeout, stdin=stdin)
        if check and p.returncode != 0:
            raise LabError(f"pylvs adm {' '.join(args)} failed ({p.returncode}): "
                           f"{p.stderr.strip()} {p.stdout.strip()}")
        return p.stdout

    def adm_run(self, *args: str, timeout: float = 15.0,
                stdin: str | None = None) -> subprocess.CompletedProcess:
        """`pylvs adm ARGS`, whatever its exit status (stdout, stderr, returncode)."""
        return self.run(self.director, self.pylvs_argv("adm", *args), timeout=timeout,
                        check=False, cwd=_repo_root(), input=stdin)

    def stats(self) -> dict[str, int]:
        """The director's engine counters by name, from `pylvs stats --json`.

        The counters are looked up by name wherever the JSON document puts
        them (top level or one section down), so a test names a counter
        (``drop_no_dest``) without depending on the document's layout.
        """
        p = self.run(self.director, self.pylvs_argv("stats", "--json"), timeout=15,
                     check=False, cwd=_repo_root())
        if p.returncode != 0:
            raise LabError(f"pylvs stats --json failed ({p.returncode}): "
                           f"{p.stderr.strip()} {p.stdout.strip()}")
        out: dict[str, int] = {}
        level = [json.loads(p.stdout)]
        while level:  # breadth first: the shallowest occurrence of a name wins
            deeper = []
            for obj in level:
                items = obj.items() if isinstance(obj, dict) else enumerate(obj)
                for k, v in items:
                    if isinstance(v, (dict, list)):
                        deeper.append(v)
                    elif isinstance(v, int) and not isinstance(v, bool):
                        out.setdefault(str(k), v)
            level = deeper
        return out

    def nat_service(self, proto: str, port: int, weights, rport: int | None = None,
                    sched: str = "wlc", wait: bool = True) -> str:
        """``-A`` VIP:port and one masq dest per weight (rs1, rs2, ...); "VIP:port".

        wait: return once the director knows every dest's MAC (until then it
        drops their frames, and a lone UDP datagram has no retransmission).
        """
        vip = f"{self.vip}:{port}"
        flag = {"tcp": "-t", "udp": "-u"}[proto]
        self.adm("-A", flag, vip, "-s", sched)
        for rip, w in zip(self.rips, weights):
            self.adm("-a", flag, vip, "-r", f"{rip}:{port if rport is None else rport}",
                     "-m", "-w", str(w))
        if wait and not self.wait_resolved(self.rips[:len(weights)]):
            raise LabError(f"dests of {vip} not resolved: {self.director_log()[-2000:]}")
        return vip

    def mac(self, ns: str, ifname: str) -> str:
        """The MAC address of ifname in ns ("aa:bb:...")."""
        p = self.run(ns, ["ip", "-j", "link", "show", ifname], timeout=10)
        return json.loads(p.stdout)[0]["address"]

    def py(self, ns: str, code: str, timeout: float = 30.0, args=()):
        """Run Python code in ns (argv[1:] = args); its last stdout line, as JSON."""
        p = self.run(ns, [self.python, "-c", textwrap.dedent(code), *map(str, args)],
                     timeout=timeout,
                     check=False, cwd=_repo_root())
        if p.returncode != 0:
            raise LabError(f"python in {ns} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    # --- tearing down --------------------------------------------------------

    def down(self) -> list[str]:
        """Stop every process and remove every namespace; never raises."""
        errors: list[str] = []
        for key, p in list(self.procs.items()):
            try:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=3)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(timeout=3)
            except Exception as e:  # keep tearing down
                errors.append(f"{key}: {e}")
            for s in (p.stdout, p.stderr, p.stdin):
                try:
                    if s:
                        s.close()
                except Exception:
                    pass
        self.procs.clear()
        for ns in self.namespaces:
            try:
                remove_netns(ns)
            except Exception as e:
                errors.append(f"{ns}: {e}")
            if netns_exists(ns):
                errors.append(f"{ns}: still exists")
        if not errors:
            self.record_path.unlink(missing_ok=True)
            _remove_logs(self.name)
        return errors

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # --- help for humans -----------------------------------------------------

    def howto(self) -> str:
        lines = [
            f"lab {self.name}: VS-NAT, {self.servers} real servers",
            f"  client    {self.client:<24} eth0 cip {self.cip}/{PREFIXLEN}",
            f"  director  {self.director:<24} eth0 {self.dip0}/{PREFIXLEN} + vip {self.vip}, "
            f"eth1 dip {self.dip}/{PREFIXLEN}",
            f"  switch    {self.switch:<24} br0",
        ]
        if self.router:
            lines.insert(2, f"  router    {self.router_ns:<24} eth0 {FAR_NET}.1/{PREFIXLEN} "
                            f"(mtu {self.router_mtu or 1500}), eth1 {ROUTER}/{PREFIXLEN}")
        for n, ns, rip in zip(self.rs_names, self.rs, self.rips):
            lines.append(f"  {n:<9} {ns:<24} eth0 rip {rip}/{PREFIXLEN} via {self.dip}"
                         f"  (http :{HTTP_PORT}, udp echo :{UDP_PORT})")
        d = f"ip netns exec {self.director}"
        lines += [
            "",
            "commands:",
            f"  {d} pylvs run --iface eth0 --iface eth1 &",
            f"  {d} pylvs adm -A -t {self.vip}:80 -s wlc",
        ]
        for i, rip in enumerate(self.rips):
            lines.append(f"  {d} pylvs adm -a -t {self.vip}:80 -r {rip}:80 -m -w {i + 1}")
        lines += [
            f"  {d} pylvs adm -L -n --stats",
            f"  ip netns exec {self.client} curl -s http://{self.vip}/whoami",
            f"  {d} tcpdump -ni any tcp port 80   # what pylvs sends too: "
            "pylvs run --no-qdisc-bypass",
            f"  pylvs lab down --name {self.name}",
        ]
        return "\n".join(lines)


def _addr(ipr, ifname: str, address: str) -> None:
    idx = ipr.link_lookup(ifname=ifname)[0]
    ipr.addr("add", index=idx, address=address, prefixlen=PREFIXLEN)


def _mtu(ipr, mtu: int, *ifnames: str) -> None:
    for ifname in ifnames if mtu else ():
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=idx, mtu=mtu)


def _up(ipr, *ifnames: str) -> None:
    for ifname in ifnames:
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=idx, state="up")


def _repo_root() -> str:
    # The real servers run `python -m pylvs.lab.httpd`: make the package
    # importable from a source checkout that is not installed.
    return str(Path(__file__).resolve().parents[2])


def wait_for_line(p: subprocess.Popen, needle: str, timeout: float,
                  stream: str = "stdout") -> bool:
    """Read p's stdout (or stderr) until a line contains needle; bounded."""
    f = getattr(p, stream)
    if f is None:
        return False
    deadline = time.monotonic() + max(0.0, timeout)
    buf = b""
    fd = f.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if not r:
            if p.poll() is not None:
                return False
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        buf += chunk
        if needle.encode() in buf:
            return True
        buf = buf[-4096:]


def wait_for_file(path: Path, needle: str, timeout: float,
                  proc: subprocess.Popen | None = None) -> bool:
    """Poll a log file until it contains needle; False on timeout or exit."""
    deadline = time.monotonic() + max(0.0, timeout)
    while time.monotonic() < deadline:
        try:
            if needle in path.read_text(errors="replace"):
                return True
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            try:
                return needle in path.read_text(errors="replace")
            except OSError:
                return False
        time.sleep(0.05)
    return False


# --- records: listing and destroying labs by name -------------------------------


def records() -> list[dict]:
    out = []
    if not STATE_DIR.is_dir():
        return out
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            out.append({"name": path.stem, "namespaces": [], "broken": True})
    return out


def destroy(name: str) -> list[str]:
    """Remove the lab recorded under name (processes, namespaces, record)."""
    path = STATE_DIR / f"{name}.json"
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"no lab named {name}"]
    except ValueError:
        rec = {"namespaces": []}
    errors = []
    pids = [int(p) for p in rec.get("pids", {}).values()]
    # Recorded pids are `ip netns exec` children we started; only kill them
    # if they still run inside one of the lab's namespaces (pids get reused).
    nss = rec.get("namespaces", [])
    inside = set()
    for ns in nss:
        if netns_exists(ns):
            inside.update(ns_pids(ns))
    _kill_pids([p for p in pids if p in inside])
    for ns in nss:
        remove_netns(ns)
        if netns_exists(ns):
            errors.append(f"{ns}: still exists")
    if not errors:
        path.unlink(missing_ok=True)
        _remove_logs(name)
    return errors


def _remove_logs(name: str) -> None:
    # Logs and scratch files of the lab: NAME.WHAT.log, NAME.WHAT.cfg, ...
    for f in STATE_DIR.glob(f"{name}.*.*"):
        f.unlink(missing_ok=True)


def destroy_all() -> list[str]:
    errors = []
    for rec in records():
        errors += destroy(rec["name"])
    return errors


def have_tools(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]
