"""``pylvs realserver setup | status | teardown``: a real server's settings.

What each forwarding method needs on the real server (docs/realserver.md
says why at length):

- DR and Tun: the VIP on ``lo`` as a /32, ``arp_ignore=1`` and
  ``arp_announce=2`` on ``all`` and the interface facing the director (the
  kernel uses the larger of the two values: net/ipv4/devinet.c,
  ``IN_DEV_ARP_IGNORE`` / ``IN_DEV_ARP_ANNOUNCE``), ``lo`` up.
- Tun also: the tunnel device (the kernel's ``tunl0`` when the ipip module
  exists, else the TUN device of ``pylvs realserver run``) must run no
  reverse-path filtering at all, its effective ``rp_filter`` 0
  (``IN_DEV_RPFILTER`` is also the larger of ``all`` and the device's value;
  fib_validate_source in net/ipv4/fib_frontend.c drops a decapsulated
  packet whose source, the client, routes out of another interface in
  strict mode, and in loose mode too on a device without an IPv4 address,
  which the tunnel device is).
- NAT: the default route (or the route to each ``--clients`` prefix) via the
  director's DIP.

:func:`setup` first computes every change (validating everything: nothing
is changed when anything is wrong, :class:`RealServerError` says what), then
applies them in order, undoing what it applied if a step still fails, and
records each change (old and new value) in the state file
``/run/pylvs/realserver-<netns inode>.json`` with the namespace's cookie
(:func:`load_state` says how a file is matched to its namespace); :func:`teardown` replays the
record backwards. Addresses and routes go through pyroute2 (rtnetlink),
sysctls through /proc/sys.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_DIR = Path("/run/pylvs")
SYSCTL = Path("/proc/sys/net/ipv4/conf")
FWDS = ("dr", "tun", "nat")
#: A real server that is a DR dest of one service and a Tun dest of another:
#: what ``setup --fwd tun`` on a host set up for DR (or the reverse) records.
DR_TUN = "dr+tun"

WHY = {
    "lo_up": "lo must be up for the addresses on it to be used",
    "vip": "the VIP as a /32 on lo: the kernel accepts packets addressed to it (DR: the "
           "director sends the client's packet unchanged; Tun: inside IPIP) and the reply "
           "leaves with the VIP as its source; on lo it is never announced by ARP (with "
           "arp_ignore) and the /32 adds no route",
    "arp_ignore": "1: answer an ARP request only for an address configured on the interface "
                  "it arrived on; the VIP is on lo, so this host stays silent when the router "
                  "asks who-has VIP and only the director answers (the ARP problem); the "
                  "kernel uses the larger of 'all' and the interface's value",
    "arp_announce": "2: the sender address of ARP requests this host sends is the best local "
                    "address for the target's network, never the VIP; otherwise neighbours "
                    "would learn VIP -> this host's MAC from the requests themselves",
    "rp_filter": "0 on the tunnel device: a decapsulated packet arrives there with the client "
                 "as source; strict mode (1) drops it since the client routes out of the "
                 "Ethernet interface, and loose mode (2) drops it too because the tunnel "
                 "device has no IPv4 address (fib_validate_source in "
                 "net/ipv4/fib_frontend.c rejects the source on a device without an address "
                 "whenever rp_filter is on); the kernel uses the larger of 'all' and the "
                 "device's value, so 'all' must be 0 as well",
    "rp_filter_all": "'all' lowered to 0 so that the tunnel device's own 0 counts: the "
                     "device has no address, so loose mode (2) drops decapsulated packets "
                     "there as strict mode (1) does",
    "rp_filter_keep": "raised to the old 'all' value so this interface filters as before",
    "rp_filter_tunl0": "0: tunl0 receives decapsulated packets from any client (with no "
                       "address on it, 1 and 2 both drop them)",
    "rp_filter_own": "0: the TUN device of the running 'pylvs realserver run' (pylvs's own "
                     "device, gone when it stops) receives decapsulated packets from any "
                     "client; kept at 0, not recorded for teardown",
    "rp_filter_dr": "2 (loose): a client's packet to the VIP is accepted when some route "
                    "leads back to the client; strict mode (1) drops it on a real server whose "
                    "route to the client leaves by another interface (two networks, as in "
                    "the kernel's ipvs.sh selftest), silently; the kernel uses the larger of "
                    "'all' and the interface's value",
    "tunl0_up": "tunl0 (the kernel's ipip fallback device) receives IPIP packets addressed to "
                "this host's addresses once it is up",
    "nat_route": "NAT replies must return through the director, which rewrites their source "
                 "from RIP:port back to VIP:port; a reply sent straight to the client would "
                 "carry the RIP and be dropped by the client",
}


class RealServerError(Exception):
    """A setup that cannot be done (or undone) as asked; the message says why and the fix."""


@dataclass
class Config:
    """What ``setup`` was asked for; addresses as dotted quads, prefixes as ``a.b.c.d/n``."""
    fwd: str
    vips: list[str] = field(default_factory=list)
    iface: str = ""
    dip: str = ""
    clients: list[str] = field(default_factory=list)


def netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def state_path(suffix: str = "") -> Path:
    """/run/pylvs/realserver-<inode of this network namespace><suffix>.json."""
    return STATE_DIR / f"realserver-{netns_inode()}{suffix}.json"


def decap_lock_path() -> Path:
    """The lock file of this namespace's ``pylvs realserver run`` (flock, see run.py)."""
    return STATE_DIR / f"realserver-{netns_inode()}-decap.lock"


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "true/false", type(None): "null"}
STEP_KINDS = ("sysctl", "link_up", "addr", "route")


def _shape_error(st, decap: bool) -> str | None:
    """What is wrong with a parsed state (or, ``decap``, decapsulator stats)
    file, None when it has the shape this module (run.py) writes."""
    if not isinstance(st, dict):
        return f"it holds {_JSON_TYPES.get(type(st), 'something else')}, not an object"
    if decap:
        if not isinstance(st.get("pid"), int) or not isinstance(st.get("counters"), dict):
            return "no pid or counters"
        if not all(isinstance(st.get(k), str) for k in ("iface", "tun")):
            return "no iface or tun"
        return None
    cfg = st.get("config")
    if not isinstance(cfg, dict) or set(cfg) != set(Config.__dataclass_fields__):
        return "no config with the fields fwd, vips, iface, dip, clients"
    if cfg["fwd"] not in (*FWDS, DR_TUN) or not isinstance(cfg["iface"], str) or not isinstance(
            cfg["dip"], str) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                        for v in (cfg["vips"], cfg["clients"])):
        return "a config field of the wrong type or value"
    changes = st.get("changes")
    if not isinstance(changes, list) or not all(
            isinstance(c, dict) and c.get("kind") in STEP_KINDS for c in changes):
        return "no list of changes"
    return None


def read_state(path: Path | None = None, decap: bool = False) -> dict | None:
    """The parsed state file (``decap``: the decapsulator's stats file), None
    when there is none; RealServerError naming the file when it cannot be
    read or does not have the shape pylvs writes (never a traceback)."""
    path = path or state_path()
    try:
        st = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RealServerError(f"cannot read the state file {path}: {e}; remove it if it is "
                              f"stale") from e
    why = _shape_error(st, decap)
    if why:
        raise RealServerError(f"the state file {path} is not one pylvs wrote ({why}); "
                              f"remove it (rm {path}) and check this host's settings by hand")
    return st


SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h; Linux >= 5.14


def netns_cookie() -> int | None:
    """This network namespace's cookie (SO_NETNS_COOKIE), None when the kernel has none.

    Unlike the namespace's inode, a cookie is unique for the boot and never
    reused (net_cookie in net/core/net_namespace.c), so it tells this
    namespace from a deleted one whose inode this one reuses; and it does
    not change with a MAC, an ifindex or a NIC swap.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    except OSError:
        return None


def netns_id() -> dict:
    """What a state file records to say which namespace it belongs to."""
    return {"inode": netns_inode(), "cookie": netns_cookie()}


def load_state(forget_stale: bool = True) -> tuple[dict | None, str]:
    """(this namespace's state or None, a note about the state file or "").

    A state file is this namespace's when its recorded netns cookie is this
    namespace's. A different cookie means the file was left by a deleted
    namespace whose inode this one reuses (its settings went with it): with
    ``forget_stale`` (setup, teardown) the file is removed, else (status)
    it is left for them and the note says so. Without a cookie on either
    side (kernel < 5.14, or a file from an older pylvs) the file is taken
    as this namespace's, since nothing tells otherwise, and the note says
    it could not be confirmed: a file is never removed on a guess.
    """
    state = read_state()
    if state is None:
        return None, ""
    have, cookie = state.get("netns") or {}, netns_cookie()
    if not isinstance(have, dict) or have.get("cookie") is None or cookie is None:
        return state, (f"{state_path()} could not be confirmed to belong to this namespace "
                       f"(no network namespace cookie recorded or supported); it is used as "
                       f"this namespace's")
    if have["cookie"] == cookie:
        return state, ""
    if not forget_stale:
        return None, (f"{state_path()} belongs to a deleted network namespace (netns cookie "
                      f"{have['cookie']}, this one's is {cookie}); it is ignored, and "
                      f"'pylvs realserver setup' or 'teardown' removes it")
    state_path().unlink(missing_ok=True)
    return None, (f"removed a stale {state_path()} (netns cookie {have['cookie']}, this "
                  f"namespace's is {cookie}: left by a deleted namespace)")


def _write_state(state: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    p = state_path()
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(p)


# -- sysctls -----------------------------------------------------------------

def sysctl_path(dev: str, name: str) -> Path:
    return SYSCTL / dev / name


def sysctl_name(dev: str, name: str) -> str:
    return f"net.ipv4.conf.{dev}.{name}"


def read_sysctl(dev: str, name: str) -> int | None:
    try:
        return int(sysctl_path(dev, name).read_text())
    except (OSError, ValueError):
        return None


def write_sysctl(dev: str, name: str, value: int) -> None:
    sysctl_path(dev, name).write_text(f"{value}\n")


def conf_devices() -> list[str]:
    """Every entry of /proc/sys/net/ipv4/conf (``all``, ``default``, interfaces)."""
    return sorted(p.name for p in SYSCTL.iterdir())


# -- rtnetlink -----------------------------------------------------------------

def _ipr():
    from pyroute2 import IPRoute
    return IPRoute()


def _ifindex(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _is_up(ipr, index: int) -> bool:
    return bool(ipr.get_links(index)[0]["flags"] & 1)


def _addrs(ipr) -> list[tuple[str, int, str]]:
    """(address, prefixlen, interface name) of every IPv4 address."""
    names = {ln["index"]: ln.get("IFLA_IFNAME") for ln in ipr.get_links()}
    return [(a.get("IFA_ADDRESS"), a["prefixlen"], names.get(a["index"], "?"))
            for a in ipr.get_addr(family=socket.AF_INET)]


def _primary_addrs(ipr) -> set[str]:
    """IPv4 addresses that are their subnet's primary address on an interface
    (no IFA_F_SECONDARY): the interface's own address, usually how others reach it."""
    return {a.get("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
            if not a.get("flags", 0) & 0x01}


def _route(ipr, dst: str) -> dict | None:
    """The main-table route to ``dst`` (a prefix) with metric 0, as a small dict."""
    net = ipaddress.IPv4Network(dst)
    for r in ipr.get_routes(family=socket.AF_INET, table=254):
        if (r["dst_len"] == net.prefixlen and (r.get("RTA_DST") or "0.0.0.0") == str(
                net.network_address) and not r.get("RTA_PRIORITY")):
            return {"gateway": r.get("RTA_GATEWAY"), "oif": r.get("RTA_OIF"),
                    "proto": r["proto"]}
    return None


def default_iface(ipr) -> str | None:
    for r in ipr.get_routes(family=socket.AF_INET, table=254):
        if r["dst_len"] == 0 and r.get("RTA_OIF"):
            return ipr.get_links(r.get("RTA_OIF"))[0].get("IFLA_IFNAME")
    return None


def kernel_ipip(ipr) -> bool:
    """True when the kernel can decapsulate IPIP itself (tunl0 exists or can be made).

    ``tunl0`` appears in every namespace once the ipip module is loaded;
    otherwise creating an ipip device asks the kernel to load the module,
    which fails with EOPNOTSUPP where it does not exist (these machines,
    most containers). The probe device is deleted at once.
    """
    if _ifindex(ipr, "tunl0") is not None:
        return True
    from pyroute2.netlink.exceptions import NetlinkError
    probe = f"plvsprobe{os.getpid() % 100000}"
    try:
        ipr.link("add", ifname=probe, kind="ipip")
    except NetlinkError:
        return False
    idx = _ifindex(ipr, probe)
    if idx is not None:
        ipr.link("del", index=idx)
    return _ifindex(ipr, "tunl0") is not None


# -- the plan --------------------------------------------------------------------

def _check_root() -> None:
    if os.geteuid() != 0:
        raise RealServerError("must run as root (it changes addresses, routes and sysctls)")


def _parse_vip(v: str) -> str:
    try:
        a = ipaddress.IPv4Address(v)
    except ValueError:
        raise RealServerError(f"--vip {v!r} is not an IPv4 address") from None
    if a.is_unspecified or a.is_loopback or a.is_multicast or a == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise RealServerError(f"--vip {v}: not a unicast address a service can use")
    return str(a)


def _broadcasts(ipr) -> set[str]:
    """Every address the kernel treats as a broadcast here: the ``broadcast``
    routes of the local table (a subnet's broadcast address, added by
    fib_add_ifaddr in net/ipv4/fib_frontend.c for each address)."""
    return {r.get("RTA_DST") for r in ipr.get_routes(family=socket.AF_INET, table=255)
            if r["type"] == 3}  # RTN_BROADCAST


def check_vips_here(vips: list[str], ipr) -> None:
    """RealServerError when a VIP cannot be a VIP on this host: a subnet's
    broadcast address, this host's own (primary) address on an interface,
    or an address configured on an interface other than lo. Shared by
    ``setup`` and ``run``."""
    addrs = _addrs(ipr)
    primary = _primary_addrs(ipr)
    bcast = _broadcasts(ipr)
    for vip in vips:
        if vip in bcast:
            raise RealServerError(f"--vip {vip} is a broadcast address here (a subnet's "
                                  f"broadcast): not a unicast address a service can use")
        for a, plen, dev in addrs:
            if a == vip and dev != "lo" and a in primary:
                raise RealServerError(
                    f"--vip {vip} is {dev}'s own (primary) address: that is this host's "
                    f"address, the RIP the director sends to, not the VIP; --vip takes the "
                    f"service's address (the one in 'pylvs adm -A -t VIP:PORT' on the "
                    f"director), which a DR/Tun real server holds on lo besides its own")
            if a == vip and dev != "lo":
                raise RealServerError(
                    f"VIP {vip} is configured on {dev}: this host would answer ARP for it "
                    f"there (the ARP problem); remove it (ip addr del {vip}/{plen} dev {dev}) "
                    f"and let setup put it on lo")


def _parse_dip(cfg: Config, addrs: list[tuple[str, int, str]]) -> tuple[str, str]:
    """(the DIP, the interface on whose network it is directly connected)."""
    if not cfg.dip:
        raise RealServerError("--fwd nat needs --dip (the director's address on this network)")
    try:
        dip = ipaddress.IPv4Address(cfg.dip)
    except ValueError:
        raise RealServerError(f"--dip {cfg.dip!r} is not an IPv4 address") from None
    if any(a == str(dip) for a, _, _ in addrs):
        raise RealServerError(f"--dip {dip} is an address of this host")
    on = [dev for a, p, dev in addrs
          if dev != "lo" and dip in ipaddress.IPv4Interface(f"{a}/{p}").network]
    if not on:
        raise RealServerError(f"--dip {dip} is not on a network this host is directly "
                              f"connected to: the director must be this host's next hop")
    return str(dip), on[0]


def validate(cfg: Config, ipr) -> Config:
    """The config with defaults filled in, or RealServerError (nothing changed).

    The interface defaults to the one the DIP is directly connected on
    (NAT), else the default route's.
    """
    if cfg.fwd not in FWDS:
        raise RealServerError(f"--fwd must be one of {', '.join(FWDS)}, not {cfg.fwd!r}")
    vips = [_parse_vip(v) for v in cfg.vips]
    if cfg.fwd in ("dr", "tun") and not vips:
        raise RealServerError(f"--fwd {cfg.fwd} needs at least one --vip")
    if cfg.fwd == "nat" and vips:
        raise RealServerError("--fwd nat: a NAT real server does not hold the VIP (the "
                              "director rewrites it to the RIP); drop --vip")
    if cfg.fwd != "nat" and (cfg.dip or cfg.clients):
        raise RealServerError(f"--dip/--clients are for --fwd nat, not {cfg.fwd}")
    addrs = _addrs(ipr)
    dip, dip_iface = _parse_dip(cfg, addrs) if cfg.fwd == "nat" else ("", "")
    iface = cfg.iface or dip_iface or default_iface(ipr)
    if not iface:
        raise RealServerError("no default route to take the interface from: give --iface")
    if _ifindex(ipr, iface) is None:
        raise RealServerError(f"--iface {iface}: no such interface")
    if iface == "lo":
        raise RealServerError("--iface: the interface facing the director, not lo")
    check_vips_here(vips, ipr)
    if cfg.fwd != "nat":
        return Config(cfg.fwd, sorted(set(vips), key=vips.index), iface)
    clients = []
    for c in cfg.clients or ["0.0.0.0/0"]:
        try:
            clients.append(str(ipaddress.IPv4Network(c)))
        except ValueError as e:
            raise RealServerError(f"--clients {c!r}: {e}") from None
    return Config("nat", [], iface, dip, clients)


def _sysctl_change(dev: str, name: str, want: int, why: str, ok=None) -> dict:
    cur = read_sysctl(dev, name)
    if cur is None:
        raise RealServerError(f"cannot read {sysctl_path(dev, name)}")
    good = cur in ok if ok else cur == want
    return {"kind": "sysctl", "dev": dev, "name": name, "old": cur,
            "new": cur if good else want, "changed": not good, "why": why}


def _rp_filter_plan(tundev: str | None, own: str | None = None) -> list[dict]:
    """Relax rp_filter for the tunnel device, leaving every other interface's effective value.

    ``own``: the TUN device of a running ``pylvs realserver run``: pylvs's
    own device, kept at 0 (never raised with the others) and not recorded,
    since it goes away with the decapsulator.
    """
    plan = []
    old_all = read_sysctl("all", "rp_filter") or 0
    # Strict and loose alike: the tunnel device has no address (WHY["rp_filter"]).
    if old_all:
        plan.append(_sysctl_change("all", "rp_filter", 0, WHY["rp_filter_all"]))
        for dev in conf_devices():
            if dev in ("all", tundev, own):
                continue
            if (read_sysctl(dev, "rp_filter") or 0) < old_all:
                plan.append(_sysctl_change(dev, "rp_filter", old_all, WHY["rp_filter_keep"]))
    else:
        plan.append(_sysctl_change("all", "rp_filter", old_all, WHY["rp_filter"]))
    if tundev:
        plan.append(_sysctl_change(tundev, "rp_filter", 0, WHY["rp_filter_tunl0"]))
    if own and read_sysctl(own, "rp_filter") is not None:
        plan.append({**_sysctl_change(own, "rp_filter", 0, WHY["rp_filter_own"]), "own": True})
    return plan


def running_decap() -> dict | None:
    """The stats of this namespace's running ``pylvs realserver run`` (pid,
    iface, tun, vips, counters), None when none runs. Running means holding
    the decapsulator lock (run.py); the stats file names its TUN device."""
    from .run import lock_holder
    pid = lock_holder(decap_lock_path())
    if pid is None:
        return None
    try:
        stats = read_state(state_path("-decap"), decap=True)
    except RealServerError:
        stats = None
    return stats if stats and stats.get("pid") == pid else {
        "pid": pid, "iface": "", "tun": "", "vips": [], "counters": {}}


def plan(cfg: Config, ipr) -> tuple[list[dict], str]:
    """(every step with old/new values and ``changed``, tun mode) for a validated config.

    Tun mode is ``kernel-ipip``, ``decap`` (no module: `pylvs realserver run`)
    or ``""`` for DR/NAT.
    """
    steps: list[dict] = []
    mode = ""
    if cfg.fwd == "nat":
        for dst in cfg.clients:
            old = _route(ipr, dst)
            good = old is not None and old["gateway"] == cfg.dip
            steps.append({"kind": "route", "dst": dst, "gateway": cfg.dip, "old": old,
                          "changed": not good, "why": WHY["nat_route"]})
        return steps, mode
    lo = _ifindex(ipr, "lo")
    steps.append({"kind": "link_up", "dev": "lo", "changed": not _is_up(ipr, lo),
                  "why": WHY["lo_up"]})
    on_lo = {a for a, _, dev in _addrs(ipr) if dev == "lo"}
    for vip in cfg.vips:
        steps.append({"kind": "addr", "dev": "lo", "address": vip, "prefixlen": 32,
                      "changed": vip not in on_lo, "why": WHY["vip"]})
    for dev in ("all", cfg.iface):
        steps.append(_sysctl_change(dev, "arp_ignore", 1, WHY["arp_ignore"], ok=(1, 2, 8)))
        steps.append(_sysctl_change(dev, "arp_announce", 2, WHY["arp_announce"]))
    if is_tun(cfg.fwd):
        if kernel_ipip(ipr):
            mode = "kernel-ipip"
            steps.append({"kind": "link_up", "dev": "tunl0",
                          "changed": not _is_up(ipr, _ifindex(ipr, "tunl0")),
                          "why": WHY["tunl0_up"]})
            steps += _rp_filter_plan("tunl0")
        else:
            mode = "decap"
            steps += _rp_filter_plan(None, (running_decap() or {}).get("tun") or None)
    if is_dr(cfg.fwd):
        _dr_rp_filter(steps, cfg.iface)
    return steps, mode


def is_dr(fwd: str) -> bool:
    return fwd in ("dr", DR_TUN)


def is_tun(fwd: str) -> bool:
    return fwd in ("tun", DR_TUN)


def _dr_rp_filter(steps: list[dict], iface: str) -> None:
    """Make ``iface``'s effective rp_filter loose when it would be strict once
    STEPS are applied (a Tun plan may have raised it to keep its filtering)."""
    def after(dev: str) -> tuple[int, dict | None]:
        step = next((s for s in steps if s["kind"] == "sysctl" and s["dev"] == dev
                     and s["name"] == "rp_filter"), None)
        return (step["new"] if step else read_sysctl(dev, "rp_filter") or 0), step
    (all_rp, _), (own, step) = after("all"), after(iface)
    if max(all_rp, own) != 1:
        return
    if step:
        step.update(new=2, changed=step["old"] != 2, why=WHY["rp_filter_dr"])
    else:
        steps.append(_sysctl_change(iface, "rp_filter", 2, WHY["rp_filter_dr"]))


def _extend(old: Config, new: Config) -> Config | None:
    """The set-up covering both an earlier DR and a Tun set-up (either order)
    of the same interface, None when NEW conflicts with OLD. Both need the
    VIPs on lo and the ARP sysctls; Tun adds decapsulation, DR a loose
    rp_filter on the interface."""
    kinds = {old.fwd, new.fwd}
    if old.fwd == new.fwd or not kinds <= {"dr", "tun", DR_TUN} or old.iface != new.iface:
        return None
    return Config(DR_TUN, old.vips + [v for v in new.vips if v not in old.vips], old.iface)


# -- applying and undoing one step ---------------------------------------------

def _apply(ipr, s: dict, undo: bool = False) -> None:
    k = s["kind"]
    if k == "sysctl":
        write_sysctl(s["dev"], s["name"], s["old"] if undo else s["new"])
    elif k == "link_up":
        idx = _ifindex(ipr, s["dev"])
        if idx is None:
            return
        def on_dev():
            return {(a, p) for a, p, dev in _addrs(ipr) if dev == s["dev"]}
        before = on_dev()
        ipr.link("set", index=idx, state="down" if undo else "up")
        if not undo:
            # Bringing lo up makes the kernel add 127.0.0.1/8 (inetdev_event,
            # NETDEV_UP); teardown removes what appeared that way.
            s["side_addrs"] = sorted(on_dev() - before)
        for a, p in s.get("side_addrs", []) if undo else ():
            ipr.addr("del", index=idx, address=a, prefixlen=p)
    elif k == "addr":
        idx = _ifindex(ipr, s["dev"])
        on = s["address"] in {a for a, _, dev in _addrs(ipr) if dev == s["dev"]}
        if undo and on:
            ipr.addr("del", index=idx, address=s["address"], prefixlen=s["prefixlen"])
        elif not undo and not on:
            ipr.addr("add", index=idx, address=s["address"], prefixlen=s["prefixlen"])
    elif k == "route":
        if not undo:
            ipr.route("replace", dst=s["dst"], gateway=s["gateway"], table=254)
        elif s["old"]:
            old = s["old"]
            ipr.route("replace", dst=s["dst"], gateway=old["gateway"], oif=old["oif"],
                      proto=old.get("proto", 3), table=254)
        elif _route(ipr, s["dst"]):
            ipr.route("del", dst=s["dst"], table=254)


def describe(s: dict) -> str:
    k = s["kind"]
    if k == "sysctl":
        name = sysctl_name(s["dev"], s["name"])
        return f"{name} = {s['new']}" + (f" (was {s['old']})" if s["changed"] else "")
    if k == "link_up":
        return f"{s['dev']} up"
    if k == "addr":
        return f"{s['address']}/{s['prefixlen']} on {s['dev']}"
    if k == "route":
        old = s["old"]
        was = f" (was via {old['gateway']})" if s["changed"] and old and old["gateway"] else ""
        return f"route {s['dst']} via {s['gateway']}{was}"
    return str(s)


def describe_undo(s: dict) -> str:
    k = s["kind"]
    if k == "sysctl":
        return f"{sysctl_name(s['dev'], s['name'])} = {s['old']} (setup had set {s['new']})"
    if k == "link_up":
        return f"{s['dev']} down again"
    if k == "addr":
        return f"{s['address']}/{s['prefixlen']} removed from {s['dev']}"
    if s["old"]:
        return f"route {s['dst']} via {s['old']['gateway']} again"
    return f"route {s['dst']} via {s['gateway']} removed"


def setup(cfg: Config) -> tuple[list[dict], str]:
    """Apply a real server's settings; return (steps, tun mode). See the module docstring.

    Raises RealServerError before changing anything when the config is
    wrong, an earlier setup in this namespace conflicts with it, or this is
    not root; a step failing after others were applied undoes those.
    """
    _check_root()
    with _ipr() as ipr:
        cfg = validate(cfg, ipr)
        state, stale = load_state()
        if stale:
            sys.stderr.write(f"pylvs realserver: {stale}\n")
        if state and state["config"] != asdict(cfg):
            old, asked = Config(**state["config"]), cfg
            cfg = _extend(old, asked)
        if cfg is None:
            raise RealServerError(
                f"conflicting earlier setup in this namespace (fwd {old.fwd}"
                + (f", vip {' '.join(old.vips)}" if old.vips else "")
                + (f", dip {old.dip}" if old.dip else "")
                + f", iface {old.iface}) that --fwd {asked.fwd} cannot extend (DR and Tun "
                f"on one interface combine; nothing else does): run 'pylvs realserver "
                f"teardown' first")
        steps, mode = plan(cfg, ipr)
        applied = []
        try:
            for s in steps:
                if s["changed"]:
                    _apply(ipr, s)
                    applied.append(s)
        except Exception as e:
            for s in reversed(applied):
                try:
                    _apply(ipr, s, undo=True)
                except Exception:
                    pass
            raise RealServerError(f"{describe(s)} failed ({e}); what was applied before it "
                                  f"was undone") from e
        # The record keeps the oldest value of every setting: a second setup
        # that repairs something changed behind its back must not forget it.
        recorded = state["changes"] if state else []
        keys = {_key(s) for s in recorded}
        recorded += [s for s in applied if _key(s) not in keys and not s.get("own")]
        _write_state({"version": 1, "config": asdict(cfg), "netns": netns_id(),
                      "mode": mode, "changes": recorded})
    return steps, mode


def _key(s: dict) -> tuple:
    return (s["kind"], s.get("dev"), s.get("name"), s.get("address"), s.get("dst"))


def teardown() -> list[tuple[dict, str]]:
    """Undo every recorded change, newest first; return (step, note) pairs.

    A note says when a value was changed by someone else since setup (it is
    restored anyway) or when a step could not be undone. Removes the state
    file. Raises RealServerError when not root.
    """
    _check_root()
    done = []
    with _ipr() as ipr:
        state, stale = load_state()
        if stale:
            sys.stderr.write(f"pylvs realserver: {stale}\n")
        if state is None:
            return []
        for s in reversed(state["changes"]):
            note = ""
            if s["kind"] == "sysctl":
                cur = read_sysctl(s["dev"], s["name"])
                if cur is None:
                    done.append((s, "gone (the interface no longer exists)"))
                    continue
                if cur != s["new"]:
                    note = f"was {cur}, changed since setup; restored anyway"
            try:
                _apply(ipr, s, undo=True)
            except Exception as e:
                note = f"could not be undone: {e}"
            done.append((s, note))
    state_path().unlink(missing_ok=True)
    return done


# -- status ----------------------------------------------------------------------

def _check(name: str, value, ok: bool, why: str) -> dict:
    return {"name": name, "value": value, "verdict": "ok" if ok else "warn", "why": why}


def _effective(dev: str, name: str) -> tuple[int | None, str]:
    a, d = read_sysctl("all", name), read_sysctl(dev, name)
    if d is None:
        return None, f"{sysctl_name(dev, name)} missing"
    return max(a or 0, d), f"max(all={a}, {dev}={d})"


def status() -> dict:
    """What is set up here and whether each setting is in effect.

    Returns {"state_file", "setup" (config dict or None), "mode", "checks":
    [{"name", "value", "verdict": "ok"|"warn", "why"}], "decapsulator":
    counters dict of a running `pylvs realserver run` or None}.
    """
    state, stale = load_state(forget_stale=False)
    out = {"state_file": str(state_path()), "setup": state and state["config"], "note": stale,
           "mode": state and state.get("mode"), "checks": [], "decapsulator": None}
    decap = read_state(state_path("-decap"), decap=True)
    if decap and _alive(decap.get("pid")):
        out["decapsulator"] = decap
    if not state:
        return out
    cfg = Config(**state["config"])
    checks = out["checks"]
    with _ipr() as ipr:
        if cfg.fwd == "nat":
            for dst in cfg.clients:
                r = _route(ipr, dst)
                checks.append(_check(f"route {dst}", r and r["gateway"],
                                     bool(r) and r["gateway"] == cfg.dip,
                                     f"via the DIP {cfg.dip}: {WHY['nat_route']}"))
            return out
        on_lo = {a for a, _, dev in _addrs(ipr) if dev == "lo"}
        for vip in cfg.vips:
            checks.append(_check(f"{vip}/32 on lo", vip in on_lo, vip in on_lo, WHY["vip"]))
    v, how = _effective(cfg.iface, "arp_ignore")
    checks.append(_check(f"arp_ignore on {cfg.iface}", how, v in (1, 2, 8), WHY["arp_ignore"]))
    v, how = _effective(cfg.iface, "arp_announce")
    checks.append(_check(f"arp_announce on {cfg.iface}", how, v == 2, WHY["arp_announce"]))
    if is_dr(cfg.fwd):
        v, how = _effective(cfg.iface, "rp_filter")
        checks.append(_check(f"rp_filter on {cfg.iface}", how, v != 1, WHY["rp_filter_dr"]))
    if is_tun(cfg.fwd):
        tundev = "tunl0" if state.get("mode") == "kernel-ipip" else (
            out["decapsulator"] or {}).get("tun")
        if tundev:
            v, how = _effective(tundev, "rp_filter")
            checks.append(_check(f"rp_filter on {tundev}", how, v == 0, WHY["rp_filter"]))
        else:
            checks.append(_check("decapsulator", "not running", False,
                                 "no ipip module: start 'pylvs realserver run' to decapsulate"))
            a = read_sysctl("all", "rp_filter")
            checks.append(_check("rp_filter on all", a, a == 0, WHY["rp_filter"]))
    return out


def _alive(pid) -> bool:
    """Whether ``pid`` runs in this network namespace (a killed decapsulator leaves its file)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == netns_inode()
    except OSError:
        return False
