r"""The namespace labs shared by the tests, ``make demo`` and ``pylvs lab``.

VS-NAT first; the routed labs for VS-DR, VS-Tun and mixed services below.

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

The routed labs: VS-DR, VS-Tun and mixed (``fwd="dr"|"tun"|"mixed"``)
-----------------------------------------------------------------------

DR and Tun real servers answer the client themselves, from the VIP, so the
client must be reached by a path that does not lead back through the
director: the client sits behind a router, and every real server's default
route points at that router, never at the director::

    client ns          router ns                 front ns (br0)        director ns
    eth0 10.0.2.2 ---- eth0 10.0.2.1                                    eth0 dip0 10.0.0.1
                       eth1 10.0.0.2 ----------- br0 ------------------      vip  10.0.0.100
                                                  |  \                  eth1 dip  10.0.1.1 (NAT rs only)
                                                  |   DR rsK eth0 10.0.0.1K, VIP on lo /32, gw 10.0.0.2
                       eth2 10.0.3.1 ---- far ns (br0) --- Tun rsK eth0 10.0.3.1K, VIP on lo /32, gw 10.0.3.1
                                                             (pylvs realserver run: IPIP + GUE :6080)
    director eth1 ---- switch ns (br0) --- NAT rsK eth0 10.0.1.1K, gw = dip 10.0.1.1

- DR (``fwd="dr"``): the director and the real servers share one L2 segment
  (front) with the router, as in the classic LVS-DR set-up; the director
  sends the client's frame to the real server's MAC on the same wire it came
  in on. The real servers are prepared with ``pylvs realserver setup --fwd
  dr`` (VIP on lo, ``arp_ignore=1``, ``arp_announce=2``), so only the director
  answers the router's "who has VIP?" on that segment.
- Tun (``fwd="tun"``): the real servers live on another network (far),
  reached through the router; the director wraps the client's packet in IPIP
  (or GUE) to the RIP and the router forwards it like any other packet. The
  real servers are prepared with ``pylvs realserver setup --fwd tun`` and run
  ``pylvs realserver run`` (these machines have no ipip module), which takes
  IPIP and GUE to port 6080.
- Mixed (``fwd="mixed"``): rs1 NAT, rs2 DR, rs3 Tun (and round again for
  more servers), the three kinds of real server in one service.
- NAT real servers of a routed lab sit on the director's eth1 segment as in
  the VS-NAT lab and are prepared with ``pylvs realserver setup --fwd nat
  --dip 10.0.1.1`` (default route via the director).

Sysctls of the routed labs, beyond those of every lab namespace:

- router ``net.ipv4.ip_forward=1``: it is an ordinary kernel router.
- router ``net.ipv4.conf.eth2.rp_filter=2`` (loose, RFC 3704): a Tun real
  server's reply leaves from the VIP, which the router reaches through eth1
  (the front segment), but it arrives on eth2. Strict mode would drop every
  reply; loose mode only asks for some route back to the source. The kernel
  uses the larger of ``all`` (1) and the interface's value, so 2 on eth2
  alone is enough and the other interfaces stay strict. This asymmetry is
  VS-Tun's by design (the director is on the request path only); a real
  network's routers must allow it too. DR replies need no such change: the
  VIP is on the front segment, where they arrive.
- director ``net.ipv4.ip_forward`` and ``send_redirects=0`` as in the NAT lab.
  The director routes the client's network and the Tun network via the
  router (10.0.0.2): pylvs's Tun transmitter sends the outer packet to the
  router's MAC, as the kernel's route to the RIP says.
- real servers: what ``pylvs realserver setup`` sets, each explained in its
  output and in docs/realserver.md (``arp_ignore``/``arp_announce`` on
  ``all`` and eth0 for DR and Tun; for Tun the strict ``all.rp_filter``
  lowered to 0 with every interface raised to 1, so only the decapsulator's
  TUN device runs without it). ``pylvs lab down`` runs ``pylvs realserver
  teardown`` in each before removing it, so no state file is left behind.
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

# The routed labs (fwd "dr", "tun", "mixed"; see ROUTED_DOC).
TUN_NET = "10.0.3"           # the Tun real servers' network, behind the router
TUN_GW = f"{TUN_NET}.1"      # the router's address there
GUE_PORT = 6080              # the Tun real servers' decapsulators also take GUE here
FWDS = ("nat", "dr", "tun", "mixed")
IOS = ("afpacket", "xdp", "tap")
MIXED_KINDS = ("nat", "dr", "tun")  # rs1, rs2, rs3, rs4 ... in a mixed lab
ADM_FLAG = {"nat": "-m", "dr": "-g", "tun": "-i"}

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


def remove_namespaces(namespaces) -> list[str]:
    """remove_netns for each; what went wrong, one text per namespace
    (a lab's teardown goes on past a failure and reports them all)."""
    errors = []
    for ns in namespaces:
        try:
            remove_netns(ns)
        except Exception as e:
            errors.append(f"{ns}: {e}")
        if netns_exists(ns):
            errors.append(f"{ns}: still exists")
    return errors


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
    fwd: str = "nat"          # "nat" (this lab), or a routed lab: "dr", "tun", "mixed"
    io: str = "afpacket"      # "tap": the director is pylvs behind TAPs (TAP_DOC);
    #                           "xdp": pylvs run --io xdp, the peers' tx checksum offload off
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
        if self.fwd not in FWDS:
            raise ValueError(f"fwd must be one of {', '.join(FWDS)}")
        if self.io not in IOS:
            raise ValueError(f"io must be one of {', '.join(IOS)}")
        # What each real server is: the lab's method, or NAT, DR, Tun in turn.
        self.kinds = [MIXED_KINDS[i % 3] if self.fwd == "mixed" else self.fwd
                      for i in range(self.servers)]
        self.routed = self.fwd != "nat"
        if self.routed:
            self.router = True  # DR/Tun replies go to the client past the director
            net = {"nat": SERVER_NET, "dr": CLIENT_NET, "tun": TUN_NET}
            self.rips = [f"{net[k]}.{RIP_BASE + i}" for i, k in enumerate(self.kinds)]
        self.front = f"{self.prefix}front" if self.routed else ""
        self.far = f"{self.prefix}far" if "tun" in self.kinds else ""
        if self.routed and "nat" not in self.kinds:
            self.switch = ""  # no NAT segment: the director has eth0 only
        self.router_ns = f"{self.prefix}router" if self.router else ""
        if self.router:
            self.cip = f"{FAR_NET}.2"

    # --- names and records ---------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return [ns for ns in (self.client, self.router_ns, self.front, self.far,
                              self.director, self.switch, *self.rs) if ns]

    @property
    def director_ifaces(self) -> list[str]:
        """The director's interfaces: eth0, and eth1 where a NAT segment exists."""
        return ["eth0", "eth1"] if self.switch else ["eth0"]

    @property
    def director_taps(self) -> list[str]:
        """io="tap": tapK, bridged with ethK in the director namespace."""
        return [f"tap{k}" for k in range(len(self.director_ifaces))] if self.io == "tap" else []

    def run_args(self) -> list[str]:
        """`pylvs run` options for this lab's director: its interfaces, or
        its TAPs with the addresses pylvs owns there (and the router as
        gateway in a lab that has one)."""
        if self.io != "tap":
            return [a for i in self.director_ifaces for a in ("--iface", i)] \
                + (["--io", "xdp"] if self.io == "xdp" else [])
        args = []
        for tap, addr in zip(self.director_taps, (self.dip0, self.dip)):
            args += ["--tap", tap, "--addr", f"{addr}/{PREFIXLEN}"]
        return args + (["--gateway", ROUTER] if self.router else [])

    def _tap_ports(self) -> None:
        """io="tap": in the director namespace, ethK and a persistent
        multi-queue TAP tapK meet in bridge brK (TAP_DOC). The kernel there
        only switches frames: no address, no route."""
        if self.io != "tap":
            return
        from pyroute2 import NetNS

        if (NETNS_DIR / self.director).exists() and self.run(
                self.director, ["sh", "-c", "test -d /proc/sys/net/bridge"],
                check=False).returncode == 0:
            # br_netfilter is loaded on this host: bridged IPv4 would pass
            # the director namespace's iptables/arptables (none: the
            # namespace is new), keep the kernel out of the frames entirely.
            self.sysctl(self.director, "net.bridge.bridge-nf-call-iptables=0",
                        "net.bridge.bridge-nf-call-arptables=0")
        for k, (eth, tap) in enumerate(zip(self.director_ifaces, self.director_taps)):
            self.run(self.director, ["ip", "tuntap", "add", "dev", tap, "mode", "tap",
                                     "multi_queue", "vnet_hdr"], timeout=10)
            with NetNS(self.director) as d:
                d.link("add", ifname=f"br{k}", kind="bridge")
                br = d.link_lookup(ifname=f"br{k}")[0]
                for port in (eth, tap):
                    d.link("set", index=d.link_lookup(ifname=port)[0], master=br)
                if k == 1:
                    _mtu(d, self.server_mtu, tap, f"br{k}")
                _up(d, f"br{k}", tap)

    def servers_of(self, kind: str) -> list[int]:
        """Indexes of the real servers of one kind ("nat", "dr", "tun")."""
        return [i for i, k in enumerate(self.kinds) if k == kind]

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
            "fwd": self.fwd,
            "io": self.io,
            "director": {"ns": self.director, "ifaces": self.director_ifaces,
                         "taps": self.director_taps,
                         "dip0": self.dip0, "vip": self.vip, "dip": self.dip,
                         "ip_forward": self.ip_forward},
            "switch": {"ns": self.switch, "bridge": "br0"} if self.switch else None,
            "front": {"ns": self.front, "bridge": "br0"} if self.front else None,
            "far": {"ns": self.far, "bridge": "br0"} if self.far else None,
            "router": ({"ns": self.router_ns, "addrs": [f"{FAR_NET}.1", ROUTER],
                        "client_side_mtu": self.router_mtu or 1500} if self.router else None),
            "real_servers": [{"name": n, "ns": ns, "rip": rip, "fwd": k}
                             for n, ns, rip, k in zip(self.rs_names, self.rs, self.rips,
                                                      self.kinds)],
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
            if self.io == "xdp":
                self._full_checksums()
            if self.start_servers:
                self.start_real_servers()
        except BaseException:
            self.down()
            raise
        return self

    def _full_checksums(self) -> None:
        """io="xdp": every namespace but the director's sends complete
        checksums (`ethtool -K IF tx off`). Between namespaces of one host a
        veth hands over CHECKSUM_PARTIAL skbs, whose TCP/UDP checksum field
        holds only the pseudo-header sum; XDP frames carry no note of that
        (no vnet header, unlike AF_PACKET's), so pylvs would forward them
        unfinished and the real servers drop them. Frames from a real NIC
        arrive complete."""
        for ns in self.namespaces:
            if ns == self.director:
                continue
            # `ip netns exec` mounts the namespace's own /sys.
            for ifname in self.run(ns, ["ls", "/sys/class/net"]).stdout.split():
                if ifname != "lo":
                    self.run(ns, ["ethtool", "-K", ifname, "tx", "off"], check=False)

    def _build(self) -> None:
        if self.routed:
            self._build_routed()
            return
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
            _mtu(d, self.server_mtu, "eth1")
            _up(d, "lo", "eth0", "eth1")
            if self.io == "tap":
                pass   # the addresses and routes are pylvs's: _tap_ports below
            else:
                _addr(d, "eth0", self.dip0)
                _addr(d, "eth0", self.vip)
                _addr(d, "eth1", self.dip)
                if self.router:
                    d.route("add", dst=f"{FAR_NET}.0/{PREFIXLEN}", gateway=ROUTER)
        self._tap_ports()

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

    def _build_routed(self) -> None:
        """The DR / Tun / mixed topology (module docstring, "The routed labs")."""
        from pyroute2 import NetNS, netns

        for ns in self.namespaces:
            netns.create(ns)
            self.sysctl(ns, *COMMON_SYSCTLS)
        self.sysctl(self.director, f"net.ipv4.ip_forward={self.ip_forward}",
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0")
        self.sysctl(self.router_ns, "net.ipv4.ip_forward=1")

        bridges: dict[str, list[str]] = {self.front: ["dir", "router"]}
        if self.far:
            bridges[self.far] = ["router"]
        if self.switch:
            bridges[self.switch] = ["dir"]
        with NetNS(self.router_ns) as r:
            r.link("add", ifname="eth0", kind="veth",
                   peer={"ifname": "eth0", "net_ns_fd": self.client})
            r.link("add", ifname="eth1", kind="veth",
                   peer={"ifname": "router", "net_ns_fd": self.front})
            _addr(r, "eth0", f"{FAR_NET}.1")
            _addr(r, "eth1", ROUTER)
            _mtu(r, self.router_mtu, "eth0")
            ifs = ["lo", "eth0", "eth1"]
            if self.far:
                r.link("add", ifname="eth2", kind="veth",
                       peer={"ifname": "router", "net_ns_fd": self.far})
                _addr(r, "eth2", TUN_GW)
                ifs.append("eth2")
            _up(r, *ifs)
        if self.far:
            # Loose: Tun replies come from the VIP, routed via eth1 (docstring).
            self.sysctl(self.router_ns, "net.ipv4.conf.eth2.rp_filter=2")

        with NetNS(self.director) as d:
            d.link("add", ifname="eth0", kind="veth",
                   peer={"ifname": "dir", "net_ns_fd": self.front})
            if self.switch:
                d.link("add", ifname="eth1", kind="veth",
                       peer={"ifname": "dir", "net_ns_fd": self.switch})
                _mtu(d, self.server_mtu, "eth1")
            _up(d, "lo", *self.director_ifaces)
            if self.io != "tap":
                _addr(d, "eth0", self.dip0)
                _addr(d, "eth0", self.vip)
                if self.switch:
                    _addr(d, "eth1", self.dip)
                d.route("add", dst=f"{FAR_NET}.0/{PREFIXLEN}", gateway=ROUTER)
                if self.far:
                    d.route("add", dst=f"{TUN_NET}.0/{PREFIXLEN}", gateway=ROUTER)
        self._tap_ports()

        with NetNS(self.client) as c:
            _addr(c, "eth0", self.cip)
            _up(c, "lo", "eth0")
            c.route("add", dst="0.0.0.0/0", gateway=f"{FAR_NET}.1")

        segment = {"dr": self.front, "tun": self.far, "nat": self.switch}
        for i, (rs, kind) in enumerate(zip(self.rs, self.kinds)):
            bridges[segment[kind]].append(f"rs{i + 1}")
            with NetNS(segment[kind]) as s:
                s.link("add", ifname=f"rs{i + 1}", kind="veth",
                       peer={"ifname": "eth0", "net_ns_fd": rs})
        for ns, ports in bridges.items():
            with NetNS(ns) as s:
                # STP stays off (the default), so ports forward at once.
                s.link("add", ifname="br0", kind="bridge")
                br = s.link_lookup(ifname="br0")[0]
                for port in ports:
                    s.link("set", index=s.link_lookup(ifname=port)[0], master=br)
                if ns == self.switch:
                    _mtu(s, self.server_mtu, *ports, "br0")
                _up(s, "lo", "br0", *ports)

        gateway = {"dr": ROUTER, "tun": TUN_GW}
        for rs, rip, kind in zip(self.rs, self.rips, self.kinds):
            with NetNS(rs) as r:
                _addr(r, "eth0", rip)
                if kind == "nat":
                    _mtu(r, self.server_mtu, "eth0")
                _up(r, "lo", "eth0")
                if kind in gateway:
                    r.route("add", dst="0.0.0.0/0", gateway=gateway[kind])
            if kind == "nat":
                args = ["--fwd", "nat", "--dip", self.dip, "--iface", "eth0"]
            else:
                args = ["--fwd", kind, "--vip", self.vip, "--iface", "eth0"]
            self.run(rs, self.pylvs_argv("realserver", "setup", *args), cwd=_repo_root())

    def start_decapsulators(self, timeout: float = 10.0) -> None:
        """`pylvs realserver run` (IPIP, and GUE to GUE_PORT) in every Tun real server."""
        started = []
        for i in self.servers_of("tun"):
            log = self.log_path(f"decap-{self.rs_names[i]}")
            with open(log, "wb") as out:
                p = self.popen(self.rs[i], self.pylvs_argv(
                    "realserver", "run", "--iface", "eth0", "--vip", self.vip,
                    "--gue-port", str(GUE_PORT)), key=f"decap-{self.rs_names[i]}",
                    stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
            started.append((p, log))
        deadline = time.monotonic() + timeout
        for p, log in started:
            if not wait_for_file(log, "decapsulating", deadline - time.monotonic(), proc=p):
                raise LabError(f"pylvs realserver run did not start: "
                               f"{log.read_text(errors='replace')[-2000:]}")

    def start_real_servers(self, timeout: float = 10.0) -> None:
        """Start pylvs.lab.httpd in every real server; wait for each 'ready'.

        In a routed lab, the Tun real servers' decapsulators first.
        """
        if self.far:
            self.start_decapsulators(timeout)
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
        argv = self.pylvs_argv("run", *self.run_args(), *extra)
        if taskset:
            argv = ["taskset", "-c", taskset, *argv]
        with open(log, "wb") as err:
            p = self.popen(self.director, argv, key="director", stdout=err, stderr=err,
                           stdin=subprocess.DEVNULL, cwd=_repo_root(),
                           start_new_session=True)
        if not wait_for_file(log, " ready: ", timeout, proc=p):
            text = log.read_text(errors="replace")[-3000:]
            self.stop_director()
            raise LabError(f"pylvs run did not log 'ready' within {timeout}s:\n{text}")
        return p

    def director_log(self) -> str:
        try:
            return self.log_path("director").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, key: str, timeout: float = 5.0) -> int | None:
        """SIGTERM the process started under ``key``, SIGKILL it after
        ``timeout`` seconds; its exit status (None if there is none)."""
        p = self.procs.pop(key, None)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        return p.returncode

    def stop_director(self, timeout: float = 10.0) -> int | None:
        """SIGTERM `pylvs run`; returns its exit status (None if not running)."""
        rc = self.stop("director", timeout)
        if rc is not None:
            self._write_record()
        return rc

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
                # The resolver logs the MAC from its own thread, then queues
                # the table refresh on the control loop; a control request
                # made now is served after that refresh, so once it returns
                # the engine has the resolved dest (otherwise the first SYN
                # could still meet the old table: drop_unresolved).
                self.adm("-L", "-n")
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

    def service(self, proto: str, port: int, weights, sched: str = "wlc",
                tun: tuple[str, ...] = (), wait: bool = True) -> str:
        """``-A`` VIP:port and one dest per weight (rs1, rs2, ...) with the
        method of its kind (``-m``, ``-g``, ``-i`` + tun options); "VIP:port".

        A weight of None leaves that real server out. tun: extra options for
        the Tun dests (``("--tun-type", "gue", "--tun-port", "6080")``).
        """
        vip = f"{self.vip}:{port}"
        flag = {"tcp": "-t", "udp": "-u"}[proto]
        self.adm("-A", flag, vip, "-s", sched)
        used = []
        for rip, kind, w in zip(self.rips, self.kinds, weights):
            if w is None:
                continue
            extra = tun if kind == "tun" else ()
            self.adm("-a", flag, vip, "-r", f"{rip}:{port}", ADM_FLAG[kind], *extra,
                     "-w", str(w))
            used.append(rip)
        if wait and not self.wait_resolved(used):
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
        errors += _realserver_teardown(self.python, self.rs)
        errors += remove_namespaces(self.namespaces)
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
        title = {"nat": "VS-NAT", "dr": "VS-DR", "tun": "VS-Tun",
                 "mixed": "VS-NAT, VS-DR and VS-Tun in one service"}[self.fwd]
        eth1 = f", eth1 dip {self.dip}/{PREFIXLEN}" if self.switch else ""
        lines = [
            f"lab {self.name}: {title}, {self.servers} real servers",
            f"  client    {self.client:<24} eth0 cip {self.cip}/{PREFIXLEN}",
            f"  director  {self.director:<24} eth0 {self.dip0}/{PREFIXLEN} + vip {self.vip}"
            f"{eth1}",
        ]
        if self.router:
            far = f", eth2 {TUN_GW}/{PREFIXLEN}" if self.far else ""
            lines.insert(2, f"  router    {self.router_ns:<24} eth0 {FAR_NET}.1/{PREFIXLEN} "
                            f"(mtu {self.router_mtu or 1500}), eth1 {ROUTER}/{PREFIXLEN}{far}")
        for what, ns in (("front", self.front), ("far", self.far), ("switch", self.switch)):
            if ns:
                lines.append(f"  {what:<9} {ns:<24} br0")
        gw = {"nat": self.dip, "dr": ROUTER, "tun": TUN_GW}
        for n, ns, rip, kind in zip(self.rs_names, self.rs, self.rips, self.kinds):
            vip = f", vip {self.vip} on lo" if kind != "nat" else ""
            decap = f", pylvs realserver run (gue :{GUE_PORT})" if kind == "tun" else ""
            lines.append(f"  {n:<9} {ns:<24} eth0 rip {rip}/{PREFIXLEN} via {gw[kind]}{vip}"
                         f"  (http :{HTTP_PORT}, udp echo :{UDP_PORT}{decap})")
        if self.io == "tap":
            pairs = zip(self.director_ifaces, self.director_taps)
            lines.append("  director  " + ", ".join(f"br{k}: {e} + {t}" for k, (e, t) in
                                                    enumerate(pairs))
                         + " (the addresses above are pylvs's, not the kernel's)")
        d = f"ip netns exec {self.director}"
        lines += [
            "",
            "commands:",
            f"  {d} pylvs run {' '.join(self.run_args())} &",
            f"  {d} pylvs adm -A -t {self.vip}:80 -s wlc",
        ]
        for i, (rip, kind) in enumerate(zip(self.rips, self.kinds)):
            lines.append(f"  {d} pylvs adm -a -t {self.vip}:80 -r {rip}:80 {ADM_FLAG[kind]} "
                         f"-w {i + 1}")
        lines += [
            f"  {d} pylvs adm -L -n --stats",
            f"  ip netns exec {self.client} curl -s http://{self.vip}/whoami",
            (f"  {d} tcpdump -ni tap0 tcp port 80   # both ways: a TAP sees all pylvs does"
             if self.io == "tap" else
             f"  {d} tcpdump -ni any tcp port 80   # what pylvs sends too: "
             "pylvs run --no-qdisc-bypass"),
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
    errors += _realserver_teardown(sys.executable,
                                   [r["ns"] for r in rec.get("real_servers", [])])
    for ns in nss:
        remove_netns(ns)
        if netns_exists(ns):
            errors.append(f"{ns}: still exists")
    if not errors:
        path.unlink(missing_ok=True)
        _remove_logs(name)
    return errors


def _realserver_teardown(python: str, namespaces: list[str]) -> list[str]:
    """`pylvs realserver teardown` in each namespace that was set up.

    Deleting the namespace would undo its settings anyway; teardown also
    removes the state file /run/pylvs/realserver-<netns inode>.json, which
    would otherwise outlive the namespace. A routed lab sets up every real
    server; a test may set up one of a NAT lab's. /run/netns/NAME is a bind
    mount of the namespace's nsfs file, so its inode names the state file
    and namespaces never set up cost no process.
    """
    from pylvs.realserver.config import STATE_DIR as RS_STATE_DIR

    errors = []
    for ns in filter(netns_exists, namespaces):
        try:
            ino = os.stat(NETNS_DIR / ns).st_ino
        except OSError:
            continue
        if not (RS_STATE_DIR / f"realserver-{ino}.json").exists():
            continue
        try:
            _run(ns_exec_argv(ns, [python, "-m", "pylvs.cli.main", "realserver", "teardown"]),
                 timeout=15, check=False, cwd=_repo_root())
        except Exception as e:  # keep tearing down
            errors.append(f"{ns}: realserver teardown: {e}")
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
