"""`pylvs adm`: ipvsadm's command line for a running pylvs director.

It stands where ``ipvsadm`` stands in scripts: the same commands and
options, bundled as popt bundles them (``-Ln``, ``-At VIP:PORT``), the same
listings byte for byte, the same error messages and exit statuses (2 for a
command line ipvsadm refuses, 255 for an operation the director refuses or
an option popt does not know, 1 for a listing of a missing service).

The work is done by the director's Balancer over the control socket
(``--control PATH``, default: this network namespace's socket).
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from .. import forward
from ..control import listing, rpc
from ..control.text import ascii_int, excerpt
from ..forward import tunnel

PROG = "pylvs adm"
VERSION = "pylvs adm 0.1.0 (ipvsadm v1.31 command line, IPVS v1.2.1)"
DEF_SCHED = "wlc"
MAX_TIMEOUT = 86400 * 31
DEFAULT_PERSISTENT_TIMEOUT = 300

EXIT_FAIL = 2     # ipvsadm's fail(2, ...): a command line it refuses
EXIT_ERROR = 255  # ipvsadm returns -1: popt errors, operations refused


class AdmError(Exception):
    def __init__(self, msg: str, code: int = EXIT_FAIL):
        super().__init__(msg)
        self.code = code


def _fail(msg: str) -> AdmError:
    return AdmError(msg, EXIT_FAIL)


def _tryhelp() -> AdmError:
    return AdmError(f"Try `{PROG} -h' or '{PROG} --help' for more information.", EXIT_ERROR)


# --- the option table (as ipvsadm 1.31's popt table) ------------------------

NOARG, REQARG, OPTARG = 0, 1, 2

# (long name, short letter or None, argument kind, tag)
_TABLE: list[tuple[str, str | None, int, str]] = [
    ("add-service", "A", NOARG, "A"),
    ("edit-service", "E", NOARG, "E"),
    ("delete-service", "D", NOARG, "D"),
    ("clear", "C", NOARG, "C"),
    ("list", "L", NOARG, "L"),
    ("list", "l", NOARG, "L"),
    ("zero", "Z", NOARG, "Z"),
    ("add-server", "a", NOARG, "a"),
    ("edit-server", "e", NOARG, "e"),
    ("delete-server", "d", NOARG, "d"),
    ("set", None, NOARG, "set"),
    ("help", "h", NOARG, "h"),
    ("version", "v", NOARG, "v"),
    ("restore", "R", NOARG, "R"),
    ("save", "S", NOARG, "S"),
    ("start-daemon", None, REQARG, "start-daemon"),
    ("stop-daemon", None, REQARG, "stop-daemon"),
    ("tcp-service", "t", REQARG, "t"),
    ("udp-service", "u", REQARG, "u"),
    ("sctp-service", None, REQARG, "sctp"),
    ("fwmark-service", "f", REQARG, "f"),
    ("scheduler", "s", REQARG, "s"),
    ("persistent", "p", OPTARG, "p"),
    ("netmask", "M", REQARG, "M"),
    ("real-server", "r", REQARG, "r"),
    *((long, m.flag[1], NOARG, m.flag) for m in forward.METHODS.values()
      for long in m.long_options),
    ("weight", "w", REQARG, "w"),
    ("u-threshold", "x", REQARG, "x"),
    ("l-threshold", "y", REQARG, "y"),
    ("numeric", "n", NOARG, "n"),
    ("connection", "c", NOARG, "c"),
    ("mcast-interface", None, REQARG, "mcast-interface"),
    ("syncid", None, REQARG, "syncid"),
    ("timeout", None, NOARG, "timeout"),
    ("daemon", None, NOARG, "daemon"),
    ("stats", None, NOARG, "stats"),
    ("rate", None, NOARG, "rate"),
    ("thresholds", None, NOARG, "thresholds"),
    ("persistent-conn", None, NOARG, "persistent-conn"),
    ("nosort", None, NOARG, "nosort"),
    ("sort", None, NOARG, "sort"),
    ("exact", "X", NOARG, "X"),
    ("ipv6", "6", NOARG, "6"),
    ("ops", "o", NOARG, "o"),
    ("pe", None, REQARG, "pe"),
    ("sched-flags", "b", REQARG, "b"),
    ("mcast-group", None, REQARG, "mcast-group"),
    ("mcast-port", None, REQARG, "mcast-port"),
    ("mcast-ttl", None, REQARG, "mcast-ttl"),
    ("sync-maxlen", None, REQARG, "sync-maxlen"),
    ("tun-type", None, REQARG, "tun-type"),
    ("tun-port", None, REQARG, "tun-port"),
    ("tun-nocsum", None, NOARG, "tun-nocsum"),
    ("tun-csum", None, NOARG, "tun-csum"),
    ("tun-remcsum", None, NOARG, "tun-remcsum"),
    ("tun-info", None, NOARG, "tun-info"),
    # pylvs's own: which director to talk to.
    ("control", None, REQARG, "control"),
]
_LONG = {name: (kind, tag) for name, _s, kind, tag in _TABLE}
_SHORT = {s: (kind, tag) for _n, s, kind, tag in _TABLE if s}


def tokenize(argv: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """popt's view of argv: (tag, argument) pairs in order, and leftovers."""
    opts: list[tuple[str, str | None]] = []
    rest: list[str] = []
    i, n = 0, len(argv)
    while i < n:
        arg = argv[i]
        i += 1
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg.startswith("--"):
            name, eq, val = arg[2:].partition("=")
            if name not in _LONG:
                raise AdmError(f"{excerpt(arg)}: unknown option", EXIT_ERROR)
            kind, tag = _LONG[name]
            if kind == NOARG:
                if eq:
                    raise AdmError(f"{excerpt(arg)}: option does not take an argument", EXIT_ERROR)
                opts.append((tag, None))
            elif eq:
                opts.append((tag, val))
            elif kind == REQARG:
                if i >= n:
                    raise AdmError(f"{excerpt(arg)}: missing argument", EXIT_ERROR)
                opts.append((tag, argv[i]))
                i += 1
            else:
                if i < n and not argv[i].startswith("-"):
                    opts.append((tag, argv[i]))
                    i += 1
                else:
                    opts.append((tag, None))
            continue
        if arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):
                ch = arg[j]
                j += 1
                if ch not in _SHORT:
                    raise AdmError(f"{excerpt(arg)}: unknown option", EXIT_ERROR)
                kind, tag = _SHORT[ch]
                if kind == NOARG:
                    opts.append((tag, None))
                    continue
                tail = arg[j:]
                if tail:
                    opts.append((tag, tail))
                elif kind == REQARG:
                    if i >= n:
                        raise AdmError(f"{excerpt(arg)}: missing argument", EXIT_ERROR)
                    opts.append((tag, argv[i]))
                    i += 1
                elif i < n and not argv[i].startswith("-"):
                    opts.append((tag, argv[i]))
                    i += 1
                else:
                    opts.append((tag, None))
                break
            continue
        rest.append(arg)
    return opts, rest


# --- commands and the legal option combinations -----------------------------

CMD_NAMES = {
    "A": "add-service", "E": "edit-service", "D": "delete-service", "C": "flush",
    "L": "list", "a": "add-server", "d": "delete-server", "e": "edit-server",
    "set": "set", "start-daemon": "start-daemon", "stop-daemon": "stop-daemon",
    "R": "restore", "S": "save", "Z": "zero",
}

# Option names in ipvsadm's order: the first offending one is reported.
OPT_ORDER = (
    "numeric", "connection", "service-address", "scheduler", "persistent", "netmask",
    "real-server", "forwarding-method", "weight", "u-threshold", "l-threshold",
    "mcast-interface", "timeout", "daemon", "stats", "rate", "thresholds",
    "persistent-conn", "nosort", "syncid", "exact", "ops", "pe", "sched-flags",
    "mcast-group", "mcast-port", "mcast-ttl", "sync-maxlen", "tun-info", "tun-type",
    "tun-port", "tun-nocsum", "tun-csum", "tun-remcsum",
)
_OPT_OF_TAG = {
    "n": "numeric", "c": "connection", "t": "service-address", "u": "service-address",
    "sctp": "service-address", "f": "service-address", "s": "scheduler", "p": "persistent",
    "M": "netmask", "r": "real-server", **{m.flag: "forwarding-method" for m in
                                            forward.METHODS.values()},
    "w": "weight", "x": "u-threshold", "y": "l-threshold",
    "mcast-interface": "mcast-interface", "timeout": "timeout", "daemon": "daemon",
    "stats": "stats", "rate": "rate", "thresholds": "thresholds",
    "persistent-conn": "persistent-conn", "nosort": "nosort", "syncid": "syncid",
    "X": "exact", "o": "ops", "pe": "pe", "b": "sched-flags", "mcast-group": "mcast-group",
    "mcast-port": "mcast-port", "mcast-ttl": "mcast-ttl", "sync-maxlen": "sync-maxlen",
    "tun-info": "tun-info", "tun-type": "tun-type", "tun-port": "tun-port",
    "tun-nocsum": "tun-nocsum", "tun-csum": "tun-csum", "tun-remcsum": "tun-remcsum",
}

_TUN = ("tun-type", "tun-port", "tun-nocsum", "tun-csum", "tun-remcsum")
_FWD_TAGS = frozenset(m.flag for m in forward.METHODS.values())
_SYNC = ("mcast-interface", "syncid", "mcast-group", "mcast-port", "mcast-ttl", "sync-maxlen")
# Per command: '+' required, '1' at most one of these, ' ' allowed; others illegal.
_LEGAL: dict[str, dict[str, str]] = {
    "A": {"service-address": "+", "scheduler": " ", "persistent": " ", "netmask": " ",
          "ops": " ", "pe": " ", "sched-flags": " "},
    "D": {"service-address": "+"},
    "C": {},
    "L": {"numeric": " ", "connection": "1", "service-address": "1", "timeout": "1",
          "daemon": "1", "stats": " ", "rate": " ", "thresholds": " ",
          "persistent-conn": " ", "nosort": " ", "exact": " ", "tun-info": " "},
    "a": {"service-address": "+", "real-server": "+", "forwarding-method": " ",
          "weight": " ", "u-threshold": " ", "l-threshold": " ", **{t: " " for t in _TUN}},
    "d": {"service-address": "+", "real-server": "+"},
    "set": {},
    "start-daemon": {t: " " for t in _SYNC},
    "stop-daemon": {"syncid": " "},
    "R": {},
    "S": {"numeric": " "},
    "Z": {"service-address": " "},
}
_LEGAL["E"] = _LEGAL["A"]
_LEGAL["e"] = _LEGAL["a"]


@dataclass
class Command:
    """One parsed ipvsadm command line."""

    cmd: str = ""                   # tag of the command (A, E, D, C, L, a, e, d, ...)
    options: list[str] = field(default_factory=list)
    proto: str = "tcp"
    vaddr: str = "0.0.0.0"
    vport: int = 0
    fwmark: int = 0
    sched: str | None = None
    persistent: int = 0
    netmask: str | None = None
    ops: bool = False
    pe: str | None = None
    sched_flags: list[str] = field(default_factory=list)
    daddr: str | None = None
    dport: int | None = None
    fwd: str = forward.DEFAULT.key  # ipvsadm's default forwarding method: -g
    tun_type: int = tunnel.TUN_IPIP
    tun_port: int = 0
    tun_flags: int = tunnel.TUN_F_NOCSUM
    weight: int = 1
    u_threshold: int = 0
    l_threshold: int = 0
    fmt: set[str] = field(default_factory=set)
    timeouts: tuple[int, int, int] = (0, 0, 0)
    control: str | None = None
    sync_state: str | None = None
    # --mcast-interface, --syncid, --mcast-group/port/ttl, --sync-maxlen as
    # start_daemon fields (struct ipvs_daemon_t)
    daemon: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.cmd, self.cmd)

    def has(self, opt: str) -> bool:
        return opt in self.options


def _number(s: str | None, lo: int, hi: int) -> int | None:
    # strtol's acceptance, as ipvsadm's string_to_number: nothing after the digits.
    v = None if s is None or s[-1:].isspace() else ascii_int(s)
    return v if v is not None and lo <= v <= hi else None


def parse_timeout(s: str | None, lo: int, hi: int) -> int:
    if s is None:
        return DEFAULT_PERSISTENT_TIMEOUT
    v = _number(s, lo, hi)
    if v is None:
        raise _fail(f"invalid timeout value `{excerpt(s)}' specified")
    return v


def _host(name: str) -> str | None:
    """Dotted IPv4 address of a name as ipvsadm reads it (inet_aton, then a
    host lookup); None for a name that is neither. A NUL cannot be in a C
    string, so no name holding one is valid, nor one the socket module
    cannot encode (bytes that are not UTF-8 read from -R's stdin): it raises
    ValueError for those rather than answer."""
    if "\0" in name:
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(name))
    except (OSError, ValueError):
        pass
    try:
        return socket.gethostbyname(name)
    except (OSError, UnicodeError, ValueError):
        return None


def _is_ipv6(s: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, s)
    except (OSError, ValueError):
        return False
    return True


def parse_service(buf: str, proto: str) -> tuple[str, int | None] | None:
    """'host[:port]' -> (dotted address, port or None); None if unparseable.

    Raises AdmError for an IPv6 address ('[addr]:port' or a bare address
    inet_pton takes as IPv6), as ipvsadm's parse_service tells them from
    IPv4 ones; anything else with more colons is malformed (None)."""
    if not buf or re.fullmatch("[0-9]+", buf):
        return None
    if buf.startswith("["):
        inner, close, after = buf[1:].partition("]")
        if close and after.startswith(":") and _is_ipv6(inner):
            raise _fail("IPv6 is not supported yet")
        return None
    if _is_ipv6(buf):
        raise _fail("IPv6 is not supported yet")
    host, colon, port = buf.rpartition(":")
    if not colon:
        host, port = buf, None
    addr = _host(host)
    if addr is None:
        return None
    if port is None:
        return addr, None
    p = _number(port, 0, 65535)
    if p is None:
        try:
            p = socket.getservbyname(port, proto)
        except (OSError, TypeError, ValueError, UnicodeError):
            return None
    return addr, p


def _parse_netmask(s: str) -> str:
    addr = _host(s)
    if addr is None:
        raise _fail("illegal virtual server persistent mask specified")
    return addr


_SCHED_FLAG_OWNERS = {"sh-fallback": "sh", "sh-port": "sh", "mh-fallback": "mh", "mh-port": "mh"}


def parse_args(argv: list[str], reading_stdin: bool = False) -> Command:
    """ipvsadm's parse_options + generic_opt_check + its sanity checks."""
    opts, rest = tokenize(argv)
    c = Command()

    def set_command(tag: str) -> None:
        if c.cmd:
            raise _fail("multiple commands specified")
        c.cmd = tag

    def set_option(name: str) -> None:
        if name in c.options:
            raise _fail(f"multiple '{name}' options specified")
        c.options.append(name)

    raw_dest: str | None = None
    for tag, val in opts:
        if tag in ("A", "E", "D", "C", "L", "a", "e", "d", "set", "R", "S", "Z"):
            set_command(tag)
        elif tag in ("start-daemon", "stop-daemon"):
            set_command(tag)
            if val not in ("master", "backup"):
                raise _fail("illegal start-daemon parameter specified" if tag == "start-daemon"
                            else "illegal start_daemon specified")
            c.sync_state = val
        elif tag == "h":
            c.cmd = c.cmd or "h"
            return _with(c, "h")
        elif tag == "v":
            return _with(c, "v")
        elif tag == "control":
            c.control = val
        elif tag in ("t", "u", "sctp"):
            set_option("service-address")
            if tag == "sctp":
                raise _fail("SCTP services are not supported yet")
            c.proto = "tcp" if tag == "t" else "udp"
            parsed = parse_service(val or "", c.proto)
            if parsed is None:
                raise _fail("illegal virtual server address[:port] specified")
            c.vaddr, port = parsed
            c.vport = port or 0
        elif tag == "f":
            set_option("service-address")
            mark = _number(val, 1, 2**32 - 1)
            if mark is None:
                raise _fail(f"invalid fwmark value `{excerpt(val)}' specified")
            # Refused here, as SCTP is: the director has no fwmark services,
            # and a rule sent on would be refused later with an internal name.
            raise _fail("firewall-mark services (-f) are not supported yet: use -t or -u "
                        "with the virtual address:port")
        elif tag == "s":
            set_option("scheduler")
            c.sched = val
        elif tag == "p":
            set_option("persistent")
            c.persistent = parse_timeout(val, 1, MAX_TIMEOUT)
        elif tag == "M":
            set_option("netmask")
            c.netmask = _parse_netmask(val or "")
        elif tag == "r":
            set_option("real-server")
            raw_dest = val or ""
        elif tag in _FWD_TAGS:
            set_option("forwarding-method")
            c.fwd = forward.by_flag(tag).key
        elif tag == "tun-type":
            set_option("tun-type")
            if val not in tunnel.TUN_TYPES:
                raise _fail("illegal tunnel type specified")
            c.tun_type = tunnel.TUN_TYPES[val]
        elif tag == "tun-port":
            set_option("tun-port")
            p = _number(val, 1, 65535)
            if p is None:
                raise _fail("illegal tunnel port specified")
            c.tun_port = p
        elif tag in tunnel.TUN_FLAG_OPTIONS:
            set_option(tag)
            c.tun_flags |= tunnel.TUN_FLAG_OPTIONS.index(tag)
        elif tag == "w":
            set_option("weight")
            w = _number(val, 0, 65535)
            if w is None:
                raise _fail("illegal weight specified")
            c.weight = w
        elif tag in ("x", "y"):
            name = "u-threshold" if tag == "x" else "l-threshold"
            set_option(name)
            v = _number(val, 0, 2**31 - 1)
            if v is None:
                raise _fail(f"illegal {'u' if tag == 'x' else 'l'}_threshold specified")
            if tag == "x":
                c.u_threshold = v
            else:
                c.l_threshold = v
        elif tag == "6":
            if not c.fwmark:
                raise _fail("-6 used before -f")
            raise _fail("IPv6 is not supported yet")
        elif tag == "o":
            set_option("ops")
            c.ops = True
        elif tag == "pe":
            set_option("pe")
            c.pe = val
        elif tag == "b":
            set_option("sched-flags")
            c.sched_flags = [f for f in (val or "").split(",") if f]
        elif tag == "syncid":
            set_option("syncid")
            if _number(val, 0, 255) is None:
                raise _fail("illegal syncid specified")
            c.daemon["syncid"] = _number(val, 0, 255)
        elif tag in _DAEMON_NUMBERS:
            set_option(tag)
            key, lo, hi = _DAEMON_NUMBERS[tag]
            v = _number(val, lo, hi)
            if v is None:
                raise _fail(f"illegal {tag} specified")
            c.daemon[key] = v
        elif tag == "mcast-interface":
            set_option(tag)
            c.daemon["mcast_ifn"] = (val or "")[:15]   # ipvsadm: IP_VS_IFNAME_MAXLEN - 1
        elif tag == "mcast-group":
            set_option(tag)
            c.daemon["mcast_group"] = _mcast_group(val or "")
        elif tag == "sort":
            pass  # sorting is the default; accepted for old scripts
        else:
            name = _OPT_OF_TAG[tag]
            set_option(name)
            if name in ("numeric", "stats", "rate", "thresholds", "persistent-conn",
                        "nosort", "exact", "tun-info"):
                c.fmt.add(name)

    if c.cmd == "set":
        if len(rest) < 3:
            raise _fail("--set option requires 3 timeout values")
        c.timeouts = tuple(parse_timeout(v, 0, MAX_TIMEOUT) for v in rest[:3])  # type: ignore[assignment]
        rest = rest[3:]
    if rest:
        raise _fail(f"unexpected argument {excerpt(rest[0])}")
    if not c.cmd:
        if not opts or all(t == "control" for t, _ in opts):
            c.cmd = "L"        # plain `ipvsadm` lists the table
            return c
        raise _tryhelp()
    if c.cmd == "R" and reading_stdin:
        raise _tryhelp()

    _opt_check(c)

    if raw_dest is not None:
        parsed = parse_service(raw_dest, c.proto)
        if parsed is None:
            raise _fail("illegal real server address[:port] specified")
        c.daddr, c.dport = parsed
        if c.dport is None:
            c.dport = c.vport
        if c.daddr == c.vaddr:
            # IPVS would deliver to the director itself (a local real
            # server); the director refuses that, in words that do not say
            # the usual cause: the VIP given where the RIP belongs.
            raise AdmError(f"real server {c.daddr} is the virtual address itself: a real "
                           f"server needs an address of its own (its RIP) to be sent to; "
                           f"the director as its own real server (Local forwarding) is not "
                           f"supported yet", EXIT_ERROR)

    if c.cmd in ("A", "E"):
        if not c.fwmark and not c.vport and not c.persistent:
            raise _fail("Zero port specified for non-persistent service")
        if c.ops and not c.fwmark and c.proto != "udp":
            raise _fail("One-Packet Scheduling is only for UDP virtual services")
        if not c.sched:
            c.sched = DEF_SCHED
        for f in c.sched_flags:
            if f not in ("flag-1", "flag-2", "flag-3") and f not in _SCHED_FLAG_OWNERS:
                raise _fail(f"invalid scheduler flag `{excerpt(f)}'")
            owner = _SCHED_FLAG_OWNERS.get(f)
            if owner and owner != c.sched:
                raise _fail(f"incompatible scheduler flag `{excerpt(f)}'")
    if c.cmd in ("a", "e"):
        method = forward.by_name(c.fwd)
        if not c.fwmark and not method.port_remap_allowed:
            # DR and Tun cannot change the port: ipvsadm quietly uses the service's.
            c.dport = c.vport
        tun_given = [o for o in _TUN if c.has(o)]
        if tun_given and method.fwd != tunnel.DESCRIPTOR.fwd:
            raise _fail("Tunnel options conflict with forward method")
        msg = tunnel.option_error(c.tun_type, tun_given)
        if msg is not None:
            raise _fail(msg)
    # ipvsadm.c's CMD_LIST rule: -c takes --persistent-conn (its header then
    # has the persistence engine's columns), --timeout and --daemon do not.
    if c.cmd == "L" and (
            ((c.has("connection") or c.has("timeout") or c.has("daemon"))
             and c.fmt & {"stats", "rate", "thresholds"})
            or ((c.has("timeout") or c.has("daemon")) and "persistent-conn" in c.fmt)):
        raise _fail("options conflicts in the list command")
    return c


# ipvsadm's checks of the sync daemon's numbers: option → (field, lo, hi).
_DAEMON_NUMBERS = {"mcast-port": ("mcast_port", 1, 65535), "mcast-ttl": ("mcast_ttl", 1, 255),
                   "sync-maxlen": ("sync_maxlen", 1, 65535 - 20 - 8)}


def _mcast_group(text: str) -> str:
    """--mcast-group as ipvsadm checks it (inet_pton, IN_MULTICAST)."""
    import ipaddress

    if ":" in text:
        try:
            ok = ipaddress.IPv6Address(text).is_multicast
        except ValueError:
            ok = False
        raise _fail("IPv6 is not supported yet" if ok else f"invalid IPv6 mcast-group `{excerpt(text)}'")
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        addr = None
    if addr is None or not addr.is_multicast:
        raise _fail(f"invalid IPv4 mcast-group `{excerpt(text)}'")
    return str(addr)


def _with(c: Command, cmd: str) -> Command:
    c.cmd = cmd
    return c


def _opt_check(c: Command) -> None:
    legal = _LEGAL[c.cmd]
    first_exclusive: str | None = None
    for opt in OPT_ORDER:
        rule = legal.get(opt, "x")
        if opt not in c.options:
            if rule == "+":
                raise _fail(f"You need to supply the '{opt}' option for the '{c.name}' command")
            continue
        if rule == "x":
            raise _fail(f"Illegal '{opt}' option with the '{c.name}' command")
        if rule == "1":
            if first_exclusive is None:
                first_exclusive = opt
            else:
                raise _fail(f"The option '{opt}' conflicts with the '{first_exclusive}' "
                            f"option in the '{c.name}' command")


# --- commands to Balancer operations ----------------------------------------

def _svc_fields(c: Command) -> dict[str, Any]:
    d: dict[str, Any] = {"proto": c.proto, "vaddr": c.vaddr, "vport": c.vport}
    if c.fwmark:
        d["fwmark"] = c.fwmark
    return d


def to_op(c: Command) -> dict | None:
    """The Balancer operation of a rule command, or None for other commands.

    -E and -e send every attribute, as ipvsadm does: what the command line
    leaves out goes back to its default (-s wlc, no persistence, weight 1,
    gatewaying)."""
    if c.cmd in ("A", "E"):
        op = {"op": "add_service" if c.cmd == "A" else "edit_service", **_svc_fields(c),
              "sched": c.sched or DEF_SCHED, "flags": list(c.sched_flags),
              "persistent": c.persistent, "netmask": c.netmask or "255.255.255.255",
              "ops": c.ops, "pe": c.pe or ""}
        if c.fwmark:
            op["fwmark"] = c.fwmark
        return op
    if c.cmd == "D":
        return {"op": "del_service", **_svc_fields(c)}
    if c.cmd == "C":
        return {"op": "clear"}
    if c.cmd in ("a", "e"):
        return {"op": "add_dest" if c.cmd == "a" else "edit_dest", **_svc_fields(c),
                "daddr": c.daddr, "dport": c.dport, "fwd": c.fwd, "weight": c.weight,
                "u_threshold": c.u_threshold, "l_threshold": c.l_threshold,
                "tun_type": tunnel.TUN_TYPE_NAMES[c.tun_type], "tun_port": c.tun_port,
                "tun_flags": c.tun_flags}
    if c.cmd == "d":
        return {"op": "del_dest", **_svc_fields(c), "daddr": c.daddr, "dport": c.dport}
    if c.cmd == "Z":
        return {"op": "zero", **(_svc_fields(c) if c.has("service-address") else {})}
    if c.cmd == "set":
        tcp, tcpfin, udp = c.timeouts
        return {"op": "set_timeouts", "tcp": tcp, "tcpfin": tcpfin, "udp": udp}
    return None


# A rule travels in one control request line of at most rpc.MAX_REQUEST
# bytes: a longer line, or one whose operation would not fit, is refused
# here (the director would close the connection, losing the lines after it).
MAX_LINE = rpc.MAX_REQUEST
def _line_too_long() -> AdmError:
    return _fail(f"line too long (limit {MAX_LINE} bytes)")


_BATCH_OVERHEAD = len(json.dumps({"op": "batch", "ops": [], "more": True})) + 1

# Nothing shlex would treat specially: no quotes, escapes or comments.
_PLAIN_LINE = re.compile(r"[^'\"\\#]*")


def restore_lines(text: str):
    """(line number, argv, None) of each rule line, or (line number, None,
    AdmError) for a line that cannot be split into words (an unterminated
    quote); a leading word ``ipvsadm`` is dropped, blank lines and ``#``
    comments are skipped. Lines are independent, as ipvsadm reads them."""
    for no, line in enumerate(text.splitlines(), 1):
        if len(line) > MAX_LINE or len(line.encode("utf-8", "surrogatepass")) > MAX_LINE:
            yield no, None, _line_too_long()
            continue
        if _PLAIN_LINE.fullmatch(line):
            words = line.split()   # what shlex makes of it, ten times faster
        else:
            try:
                words = shlex.split(line, comments=True)
            except ValueError as e:
                yield no, None, _fail(str(e))
                continue
        if words and words[0] in ("ipvsadm", "pylvs-adm"):
            words = words[1:]
        if words:
            yield no, words, None


def parse_restore(text: str) -> list[dict]:
    """Operation dicts for a file of ``pylvs adm -S`` lines; raises as
    parse_rules."""
    return [op for _no, op in parse_rules(text)]


def parse_rules(text: str) -> list[tuple[int, dict]]:
    """(line number, operation dict) of each rule of a file of ``pylvs adm
    -S`` lines (``pylvs run -c``: a rule the director refuses is reported
    by its line).

    Raises AdmError naming the line for a line ipvsadm would refuse or one
    that is not a rule (a listing, say)."""
    ops = []
    for no, words, error in restore_lines(text):
        try:
            if error is not None:
                raise error
            c = parse_args(words, reading_stdin=True)
        except AdmError as e:
            raise AdmError(f"line {no}: {e}", e.code) from None
        op = to_op(c)
        if op is None:
            raise _fail(f"line {no}: not a rule command: {excerpt(' '.join(words))}")
        ops.append((no, op))
    return ops


# --- running ----------------------------------------------------------------

class _Conn:
    """The control connection, opened on first use so parse errors come first."""

    def __init__(self, path: str | None, factory: Callable[[str], Any] | None = None):
        self.path = path or rpc.default_path()
        self.factory = factory or rpc.Client
        self.client: Any = None

    def call(self, op: dict) -> Any:
        if self.client is None:
            try:
                self.client = self.factory(self.path)
                connect = getattr(self.client, "connect", None)
                if connect is not None:
                    connect()
            except OSError as e:
                self.client = None
                raise AdmError(
                    f"Can't initialize ipvs: cannot reach the pylvs control socket "
                    f"{self.path}: {e.strerror or e}\n"
                    "Is `pylvs run` running in this network namespace (or use --control)?",
                    EXIT_FAIL) from None
        try:
            return self.client.call(op)
        except rpc.RpcError as e:
            raise AdmError(str(e), EXIT_ERROR) from None
        except (OSError, ValueError) as e:
            raise AdmError(f"control socket {self.path}: {e}", EXIT_FAIL) from None

    def close(self) -> None:
        if self.client is not None and hasattr(self.client, "close"):
            self.client.close()


def _list_format(c: Command) -> str:
    for f in ("stats", "rate", "thresholds", "persistent-conn", "tun-info"):
        if f in c.fmt:
            return f
    return listing.DEFAULT


def execute(c: Command, conn: _Conn, stdin: TextIO, out: TextIO, err: TextIO,
            reading_stdin: bool = False) -> int:
    if c.cmd == "h":
        out.write(usage())
        return 0
    if c.cmd == "v":
        out.write(VERSION + "\n")
        return 0
    if c.cmd == "start-daemon":
        conn.call({"op": "start_daemon", "state": c.sync_state, **c.daemon})
        return 0
    if c.cmd == "stop-daemon":
        conn.call({"op": "stop_daemon", "state": c.sync_state})
        return 0
    if c.cmd == "L":
        exact, nosort = "exact" in c.fmt, "nosort" in c.fmt
        if c.has("connection"):
            out.write(listing.conns(conn.call({"op": "conns"}),
                                    pe_columns="persistent-conn" in c.fmt))
        elif c.has("service-address"):
            snap = conn.call({"op": "snapshot"})
            svc = listing.find_service(snap, c.proto.upper(), c.vaddr, c.vport, c.fwmark)
            if svc is None:
                err.write("No such service\n")
                return 1
            out.write(listing.list_service(svc, _list_format(c), exact, nosort))
        elif c.has("timeout"):
            out.write(listing.timeouts(conn.call({"op": "timeouts"})))
        elif c.has("daemon"):
            out.write(listing.daemons(conn.call({"op": "daemons"})))
        else:
            out.write(listing.list_all(conn.call({"op": "snapshot"}), _list_format(c),
                                       exact, nosort))
        return 0
    if c.cmd == "S":
        out.write(listing.save(conn.call({"op": "snapshot"})))
        return 0
    if c.cmd == "R":
        return restore(conn, stdin, out, err)
    op = to_op(c)
    assert op is not None, c.cmd
    conn.call(op)
    return 0


# Rules per batch request: the director takes request lines of at most
# rpc.MAX_REQUEST bytes.
BATCH_BYTES = rpc.MAX_REQUEST // 2


def restore(conn: _Conn, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    """-R: each line its own command, as ipvsadm's restore_table: a line
    that does not parse or that the director refuses is reported with its
    number on stderr and the lines after it still apply. The exit status is
    that of the last line that failed (0 if none did).

    Consecutive rules travel as batches, so the director publishes its
    tables once per batch rather than once per line."""
    rc = 0
    pending: list[tuple[int, dict]] = []
    size = 0

    def report(no: int, msg: str, code: int) -> None:
        nonlocal rc
        err.write(f"line {no}: {msg}\n")
        rc = code

    def flush(more: bool = False) -> None:
        nonlocal size
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        size = 0
        req = {"op": "batch", "ops": [op for _no, op in batch]}
        if more:
            req["more"] = True   # the director publishes once, after the last
        results = conn.call(req)
        for (no, _op), r in zip(batch, results):
            if not r.get("ok"):
                report(no, str(r.get("error")), EXIT_ERROR)

    for no, words, error in restore_lines(stdin.read()):
        try:
            if error is not None:
                raise error
            c = parse_args(words, reading_stdin=True)
        except AdmError as e:
            flush()   # messages in line order
            report(no, str(e), e.code)
            continue
        op = to_op(c)
        if op is not None:
            n = len(json.dumps(op)) + 2
            if n + _BATCH_OVERHEAD > MAX_LINE:
                flush()
                e = _line_too_long()
                report(no, str(e), e.code)
                continue
            if size + n > BATCH_BYTES:
                flush(more=True)
            pending.append((no, op))
            size += n
            continue
        flush()
        try:
            code = execute(c, conn, stdin, out, err, reading_stdin=True)
        except AdmError as e:
            if e.code != EXIT_ERROR:
                raise
            report(no, str(e), e.code)
        else:
            if code:
                rc = code
    flush()
    return rc


def main(argv: list[str] | None = None, *, stdin: TextIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None,
         client_factory: Callable[[str], Any] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    conn = None
    try:
        c = parse_args(argv)
        conn = _Conn(c.control, client_factory)
        return execute(c, conn, stdin, out, err)
    except AdmError as e:
        err.write(f"{e}\n")
        return e.code
    except KeyboardInterrupt:
        return 130
    finally:
        if conn is not None:
            conn.close()


def usage() -> str:
    p = PROG
    return f"""{VERSION}
Usage:
  {p} -A|E -t|u service-address [-s scheduler] [-p [timeout]] [-M netmask] [-b sched-flags]
  {p} -D -t|u service-address
  {p} -C
  {p} -R
  {p} -S [-n]
  {p} -a|e -t|u service-address -r server-address [-m|-g|-i] [-w weight] [-x upper] [-y lower]
        [--tun-type ipip|gue --tun-port port --tun-nocsum|--tun-csum|--tun-remcsum]
  {p} -d -t|u service-address -r server-address
  {p} -L|l [-n] [-c] [--stats|--rate|--thresholds|--persistent-conn|--tun-info] [--exact]
        [--nosort]
  {p} -L --timeout
  {p} -Z [-t|u service-address]
  {p} --set tcp tcpfin udp
  {p} --start-daemon {{master|backup}} [daemon-options]
  {p} --stop-daemon {{master|backup}}
  {p} -h

Commands (long or short):
  --add-service     -A   add a virtual service
  --edit-service    -E   change a virtual service (unset options go back to defaults)
  --delete-service  -D   delete a virtual service and its real servers
  --clear           -C   delete every virtual service
  --restore         -R   apply rules (as -S prints them) read from stdin
  --save            -S   print the rules to stdout
  --add-server      -a   add a real server to a service
  --edit-server     -e   change a real server
  --delete-server   -d   delete a real server
  --list            -L|-l  list services, real servers and counters
  --zero            -Z   zero the counters of one service or all
  --set tcp tcpfin udp   set conn timeouts in seconds (0 keeps a value)
  --start-daemon         start a connection sync daemon (docs/sync.md)
  --stop-daemon          stop a connection sync daemon
  --help            -h   this text

Options:
  --tcp-service  -t host[:port]   a TCP virtual service
  --udp-service  -u host[:port]   a UDP virtual service
  --scheduler    -s name          scheduler, default {DEF_SCHED}
  --sched-flags  -b flags         scheduler flags (sh-port, sh-fallback, flag-1, ...)
  --persistent   -p [timeout]     persistent service: a client's conns go to one real
                                  server until [timeout] s (default 300) after its last
  --netmask      -M netmask       persistence granularity (clients grouped by it)
  --ops          -o               one-packet scheduling (UDP services only)
  --pe           name             persistence engine (stored and listed, not applied)
  --real-server  -r host[:port]   a real server (port defaults to the service's)
  --gatewaying   -g               direct routing (the default)
  --ipip         -i               tunnelling (IPIP, or GUE with --tun-type gue)
  --masquerading -m               masquerading (NAT)
  --tun-type     ipip|gue|gre     tunnel type of an -i real server, default ipip
                                  (gre is not supported by pylvs yet)
  --tun-port     port             the GUE tunnel's UDP destination port (required)
  --tun-nocsum                    GUE without UDP checksum (the default)
  --tun-csum                      GUE with UDP checksum
  --tun-remcsum                   GUE with remote checksum offload
  --weight       -w weight        0..65535, default 1 (0: no new conns)
  --u-threshold  -x n             upper conn threshold (overloaded at n conns)
  --l-threshold  -y n             lower conn threshold (available again below n)
  --numeric      -n               numeric output (addresses are always numeric)
  --connection   -c               list the conns
  --timeout                       list the timeouts
  --stats / --rate / --thresholds / --persistent-conn / --tun-info   other listings
  --exact        -X               exact numbers in --stats and --rate
  --nosort                        list in the director's order
  --daemon                        list the running sync daemons (with -L)
  --mcast-interface interface     the sync daemon's interface (default eth0)
  --syncid sid                    syncid sent (master) / accepted (backup, 0: any)
  --mcast-group address           multicast group, default 224.0.0.81
  --mcast-port port               UDP port, default 8848
  --mcast-ttl ttl                 multicast TTL, default 1
  --sync-maxlen length            largest sync message (UDP payload bytes)
  --control PATH                  the director's control socket
                                  (default: this network namespace's)
"""


if __name__ == "__main__":
    sys.exit(main())
