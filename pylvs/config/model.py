"""What a keepalived-style configuration says about virtual servers, real
servers and their health checks: plain frozen dataclasses, no I/O.

The parser (``pylvs.config.keepalived``) produces these; the health checks
(``pylvs.health``) and the reload logic consume them. Values are resolved:
a checker carries the timings it inherits from its real server and virtual
server (keepalived 2.x lets ``retry``, ``delay_before_retry``, ``warmup``,
``connect_timeout`` and ``delay_loop`` sit at each level), so consumers never
look up a default themselves.

Units: seconds (float) for every time, host-order ints for ports, text
dotted-quad for addresses. Defaults are keepalived's (keepalived.conf(5);
../shared/REFERENCE.md): delay_loop 60 s, connect_timeout 5 s, retry 1,
delay_before_retry 3 s for HTTP_GET/SSL_GET and 1 s otherwise, weight 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import regex as regex_mod

# The checkers pylvs runs; keepalived's others (DNS_CHECK, SMTP_CHECK,
# BFD_CHECK, FILE_CHECK) are named in a warning by the parser.
CHECK_KINDS = ("TCP_CHECK", "HTTP_GET", "SSL_GET", "UDP_CHECK", "MISC_CHECK", "PING_CHECK")

DEFAULT_DELAY_LOOP = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRY = 1
DEFAULT_DELAY_BEFORE_RETRY = 1.0
DEFAULT_DELAY_BEFORE_RETRY_HTTP = 3.0
DEFAULT_PERSISTENCE_TIMEOUT = 360   # `persistence_timeout` given without a value


@dataclass(frozen=True)
class Where:
    """A place in a configuration file, for error messages (``file:line``)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class UrlSpec:
    """One ``url { }`` block of HTTP_GET / SSL_GET.

    ``status_codes`` empty means any 2xx (keepalived's default). ``digest``
    is the lower-case hex MD5 of the body; ``regex`` the pattern's text as
    configured and ``pattern`` that text compiled by body_regex() (compiled
    here when not given), searched in the body, its sense inverted by
    ``regex_no_match``.
    """

    path: str
    status_codes: frozenset[int] = frozenset()
    digest: str | None = None
    regex: str | None = None
    regex_no_match: bool = False
    virtualhost: str | None = None
    pattern: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.regex is not None and self.pattern is None:
            object.__setattr__(self, "pattern", body_regex(self.regex))


# A backslash and the character it escapes (an escaped backslash too, so
# "\\u" is a backslash, then a "u").
_ESCAPED = re.compile(r"\\(.)", re.S)


def body_regex(text: str):
    r"""``text`` compiled as the bytes pattern an HTTP_GET/SSL_GET ``regex``
    is: a ``regex`` module pattern (Python ``re`` syntax, with PCRE's
    possessive quantifiers, atomic groups and ``\p{..}``) searched in the
    body's bytes, a character in it matching its UTF-8 bytes. Raises
    ValueError with the reason for a pattern that does not compile, and
    for the escapes naming a character (``\u``, ``\U``, ``\N``):
    keepalived's PCRE2 refuses them (its ``\N`` is any byte but a
    newline), and on bytes they would name one Latin-1 byte, not the UTF-8
    a page is written in."""
    for m in _ESCAPED.finditer(text):
        if m.group(1) in "uUN":
            raise ValueError(f"\\{m.group(1)} names a character, and the body is bytes: "
                             "write the character itself (matched as UTF-8) or its bytes "
                             "as \\xHH")
    try:
        return regex_mod.compile(text.encode("utf-8", "surrogateescape"))
    except (regex_mod.error, RecursionError, OverflowError) as e:
        raise ValueError(str(e)) from None


@dataclass(frozen=True)
class CheckSpec:
    """One checker of one real server, with every timing resolved.

    ``kind`` is one of CHECK_KINDS. ``connect_ip``/``connect_port`` None mean
    the real server's address/port. Kind-specific fields are left at their
    defaults by the other kinds: ``urls``/``virtualhost``/``http_protocol``
    (HTTP_GET, SSL_GET; ``enable_sni``: SSL_GET sends the virtualhost as
    the TLS server name), ``payload``/``require_reply``/reply lengths
    (UDP_CHECK; bytes, from keepalived's hex strings), ``misc_*``
    (MISC_CHECK; ``misc_timeout`` None means ``delay_loop``).
    Equality is the identity a reload keeps: an unchanged spec keeps its
    state across a reload.
    """

    kind: str
    delay_loop: float = DEFAULT_DELAY_LOOP
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    retry: int = DEFAULT_RETRY
    delay_before_retry: float = DEFAULT_DELAY_BEFORE_RETRY
    warmup: float = 0.0
    alpha: bool = False
    connect_ip: str | None = None
    connect_port: int | None = None
    bindto: str | None = None
    urls: tuple[UrlSpec, ...] = ()
    virtualhost: str | None = None
    http_protocol: str = "1.0"
    payload: bytes | None = None
    require_reply: bytes | None = None
    min_reply_length: int = 0
    max_reply_length: int = 0
    misc_path: str | None = None
    misc_timeout: float | None = None
    misc_dynamic: bool = False
    enable_sni: bool = False
    where: Where | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RealServer:
    """``real_server ADDR PORT { }``. ``lvs_method`` None: the virtual
    server's. ``uthreshold``/``lthreshold`` are ipvsadm's -x/-y (0 = none).
    ``inhibit_on_failure`` resolved from the virtual server's default.
    ``lvs_method`` "TUN": ``tun_type`` "ipip" | "gue", ``tun_port`` gue's
    UDP port (0 for ipip), ``tun_flags`` None | "nocsum" | "csum" |
    "remcsum" (``lvs_method TUN type gue port N csum``); None/0 otherwise."""

    addr: str
    port: int
    weight: int = 1
    lvs_method: str | None = None
    inhibit_on_failure: bool = False
    uthreshold: int = 0
    lthreshold: int = 0
    notify_up: str | None = None
    notify_down: str | None = None
    checks: tuple[CheckSpec, ...] = ()
    where: Where | None = field(default=None, compare=False)
    tun_type: str | None = None
    tun_port: int = 0
    tun_flags: str | None = None


@dataclass(frozen=True)
class SorryServer:
    """``sorry_server ADDR PORT``: the dest added when quorum is lost."""

    addr: str
    port: int
    lvs_method: str | None = None
    inhibit: bool = False          # sorry_server_inhibit


@dataclass(frozen=True)
class VirtualServer:
    """``virtual_server ADDR PORT { }`` (``fwmark`` 0) or ``virtual_server
    fwmark N { }`` (``vaddr`` None, ``vport`` 0).

    ``protocol`` "TCP" | "UDP" | "SCTP"; ``lvs_method`` "NAT" | "DR" | "TUN"
    (keepalived's spelling; ``lb_kind`` already mapped); ``lvs_sched`` an
    ipvsadm -s name (``lb_algo`` mapped), None for the director's default;
    ``persistence_timeout`` seconds, 0 = no persistence;
    ``persistence_granularity`` a netmask text or None; ``sched_flags``
    ipvsadm -b names (sh-port, sh-fallback, mh-port, mh-fallback,
    flag-1..3); ``ops`` one-packet scheduling.
    """

    protocol: str
    vaddr: str | None
    vport: int
    fwmark: int = 0
    lvs_sched: str | None = None
    lvs_method: str = "NAT"
    persistence_timeout: int = 0
    persistence_granularity: str | None = None
    sched_flags: tuple[str, ...] = ()
    ops: bool = False
    delay_loop: float = DEFAULT_DELAY_LOOP
    quorum: int = 1
    quorum_up: str | None = None
    quorum_down: str | None = None
    hysteresis: int = 0
    alpha: bool = False
    omega: bool = False
    sorry_server: SorryServer | None = None
    real_servers: tuple[RealServer, ...] = ()
    where: Where | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str | None, int, int]:
        """(protocol, vaddr, vport, fwmark): the service's identity."""
        return (self.protocol, self.vaddr, self.vport, self.fwmark)


# keepalived's lvs_method words to the Balancer's forwarding methods
# (ipvsadm's -m, -g, -i).
FWD = {"NAT": "masq", "DR": "route", "TUN": "tunnel"}


def dest_port(vs: VirtualServer, port: int, method: str | None) -> int:
    """The port of a real server (or sorry server) of ``vs`` as a dest:
    ``port`` for NAT, the service's for DR and TUN, whatever port the
    file (or its checkers) name (ipvsadm and keepalived's ipvswrapper.c
    give such a dest the virtual port; only NAT maps ports). ``method``
    None: the virtual server's."""
    return port if (method or vs.lvs_method) == "NAT" else vs.vport


@dataclass(frozen=True)
class KeepalivedConfig:
    """A whole parsed file (includes followed). ``warnings``: one line per
    block or keyword pylvs read but does not act on, each naming file:line.
    ``vrrp_instances``: the names of the VRRP instances (run by keepalived
    itself, not by pylvs). ``lvs_timeouts``: global_defs' (tcp, tcpfin,
    udp) seconds, 0 = unchanged (ipvsadm --set), None when not said.
    ``refused``: file:line messages for services the file says and pylvs
    cannot run (IPv6 ones), skipped while the rest applies."""

    virtual_servers: tuple[VirtualServer, ...] = ()
    vrrp_instances: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    lvs_timeouts: tuple[int, int, int] | None = None
    refused: tuple[str, ...] = ()
