"""keepalived.conf, read natively: ``parse_file(path) -> model.KeepalivedConfig``.

What is read (keepalived.conf(5) of keepalived 2.2): the ``virtual_server``
blocks (``ADDR PORT``, ``fwmark N``, ``group NAME`` with
``virtual_server_group``), their ``real_server`` blocks and the checkers
TCP_CHECK, HTTP_GET, SSL_GET, UDP_CHECK, MISC_CHECK and PING_CHECK, with
every timing resolved as keepalived inherits it (checker, else real
server, else virtual server, else keepalived's default). The grammar is
keepalived's: blocks in ``{ }`` (the brace may open on the next line, and
a block may sit on one line: ``url { path /health status_code 200 }``;
keepalived reads one keyword per line and silently drops what follows its
value, pylvs reads every keyword and warns where keepalived would not),
comments from ``#`` or ``!`` to the end of the line, ``"quoted strings"``
(backslashes kept, as keepalived keeps them), ``include PATTERN`` anywhere (glob
and csh braces, relative to the including file's directory),
``lb_algo``/``lb_kind`` as synonyms of ``lvs_sched``/``lvs_method``,
``nb_get_retry`` of ``retry``, ``persistence_timeout`` alone meaning 360 s.

Errors (``ConfigError``, its text starting with ``file:line``): syntax
(unbalanced braces, an unterminated quote, a brace without a keyword),
bad values, and unknown keywords. keepalived logs an unknown keyword and
goes on; pylvs refuses the file instead, since a misspelt keyword
(``persistance_timeout``) would otherwise change forwarding without a
word, and a refused reload keeps the running configuration. Keywords and
blocks keepalived has and pylvs does not act on (VRRP, which keepalived
itself runs next to pylvs; global_defs; SMTP alerts; the DNS, SMTP, BFD
and FILE checkers; ...) are accepted and named in one warning each
(``KeepalivedConfig.warnings``), never silently dropped.

Limits (never hang, never exhaust memory): MAX_FILE_BYTES per file,
MAX_TOTAL_BYTES in all, MAX_FILES files, MAX_TOKENS words and braces,
include depth MAX_INCLUDE_DEPTH, block nesting MAX_NESTING; an include
loop is an error, and so is a FIFO or device (only regular files are read).

IPv4 only, as pylvs: an IPv6 address is an error naming its line.
"""

from __future__ import annotations

import glob as globmod
import ipaddress
import math
import os
import re
import shlex
import stat
from dataclasses import dataclass

from .. import sched as schedmod
from . import model
from .model import CheckSpec, KeepalivedConfig, RealServer, SorryServer, UrlSpec, \
    VirtualServer, Where, body_regex

MAX_FILE_BYTES = 8 << 20
MAX_TOTAL_BYTES = 32 << 20
MAX_FILES = 1000
MAX_INCLUDE_DEPTH = 8
MAX_NESTING = 16
MAX_TOKENS = 1_000_000         # words and braces in all files (memory bound)
MAX_PATTERN_BRACES = 32        # csh braces in one include pattern
MAX_GROUP_MEMBERS = 65536      # addresses a virtual_server_group range may expand to
MAX_TIMER = 86400.0 * 365      # seconds: far beyond any sane delay
MAX_PERSISTENCE = 86400 * 31   # ipvsadm's MAX_TIMEOUT
MAX_WEIGHT = 65535
MAX_THRESHOLD = 2**31 - 1


class ConfigError(Exception):
    """A configuration the director refuses; ``str()`` starts with file:line."""

    def __init__(self, where: Where | None, msg: str):
        self.where = where
        self.msg = msg
        super().__init__(f"{where}: {msg}" if where is not None else msg)


# --- tokens -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Token:
    text: str
    where: Where
    quoted: bool = False
    bol: bool = False          # first token of its (logical) line

    @property
    def brace(self) -> str | None:
        return None if self.quoted or self.text not in ("{", "}") else self.text


# A quoted string, a brace, a comment (to the end of the line), a word, or
# a lone quote (unterminated). As keepalived 2.2.7 reads a value, a
# backslash is an ordinary character, inside quotes too (`regex "\d+"`
# keeps it; `"a\"b"` is `a\` and an unmatched quote, as keepalived says).
_TOKEN = re.compile(r'"([^"]*)"|([{}])|([#!].*)|([^\s{}"#!]+)|(")')


def _lines(text: str):
    """(line number, line). No line continues on the next: keepalived 2.2.7
    joins lines only in a multiline ``$NAME=`` definition, which pylvs
    refuses; a trailing backslash elsewhere is part of the line."""
    for no, line in enumerate(text.split("\n"), 1):
        yield no, line.rstrip("\r")


_NOT_UTF8 = re.compile("[\udc80-\udcff]")   # bytes not UTF-8, kept by surrogateescape


def _line_tokens(line: str, where: Where, budget: int) -> list[Token]:
    out: list[Token] = []
    for m in _TOKEN.finditer(line):
        if len(out) >= budget:
            raise ConfigError(where, f"more than {MAX_TOKENS} words and braces in all")
        q, brace, comment, word, lone = m.groups()
        if comment is not None:
            if line.endswith("\\") and not line.endswith("\\\\"):
                # keepalived keeps a comment's last backslash (for its
                # multiline definitions): a keyword '\' on a line of its own,
                # else the end of the line's last value ('rr\'), each logged
                # as invalid and dropped. Applying the value would differ.
                raise ConfigError(where, "a comment ending in '\\': keepalived 2.2.7 keeps "
                                         "that backslash as a word of the line (keepalived -t "
                                         "names it); remove it")
            break
        if lone is not None:
            raise ConfigError(where, "unterminated quoted string")
        if q is not None:
            out.append(Token(q, where, quoted=True, bol=not out))
        else:
            out.append(Token(brace or word, where, bol=not out))
    if _NOT_UTF8.search(line) is not None and any(_NOT_UTF8.search(t.text) for t in out):
        raise ConfigError(where, "not UTF-8 text (outside a comment)")
    return out


def _brace_expand(pattern: str, limit: int = MAX_FILES) -> list[str]:
    """csh-style ``{a,b}`` expansion (nested), at most ``limit`` results."""
    depth, start = 0, -1
    for i, c in enumerate(pattern):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}" and depth:
            depth -= 1
            if depth == 0:
                inner, parts, d, last = pattern[start + 1:i], [], 0, 0
                for j, ch in enumerate(inner):
                    d += ch == "{"
                    d -= ch == "}"
                    if ch == "," and d == 0:
                        parts.append(inner[last:j])
                        last = j + 1
                parts.append(inner[last:])
                out: list[str] = []
                for p in parts:
                    for tail in _brace_expand(pattern[:start] + p + pattern[i + 1:], limit):
                        out.append(tail)
                        if len(out) > limit:
                            raise ValueError(f"expands to more than {limit} names")
                return out
    return [pattern]


def read_limited(path: str, where: Where | None = None) -> bytes:
    """A regular file's bytes, at most MAX_FILE_BYTES (ConfigError beyond,
    and for a FIFO, device or directory: reading one could block forever
    or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(where, f"{path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(where, f"{path}: a directory, not a configuration file")
        if not stat.S_ISREG(mode):
            raise ConfigError(where, f"{path}: not a regular file")
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError(where, f"{path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise ConfigError(where, f"{path}: larger than {MAX_FILE_BYTES} bytes "
                                 f"({MAX_FILE_BYTES >> 20} MiB, the limit per file)")
    return b"".join(chunks)


def decode(data: bytes) -> str:
    """A configuration file's text: UTF-8, a leading byte order mark (an
    editor's, meaning nothing) dropped, bytes that are not UTF-8 kept as
    surrogates (the parsers refuse them only in a word, naming the line)."""
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")


class _Reader:
    """Files to one token list, includes followed, within the limits."""

    def __init__(self, config_id: str | None = None) -> None:
        self.tokens: list[Token] = []
        self.files: list[str] = []
        self.total = 0
        self.warnings: list[str] = []
        self.config_id = config_id if config_id is not None else default_config_id()

    def read(self, path: str, where: Where | None, stack: tuple[str, ...],
             data: bytes | None = None) -> None:
        real = os.path.realpath(path)
        if real in stack:
            raise ConfigError(where, f"include loop: {path} includes itself "
                                     f"(through {' -> '.join(stack[stack.index(real):])})")
        if len(stack) > MAX_INCLUDE_DEPTH:
            raise ConfigError(where, f"includes nested deeper than {MAX_INCLUDE_DEPTH} files")
        if len(self.files) >= MAX_FILES:
            raise ConfigError(where, f"more than {MAX_FILES} files read")
        if data is None:
            data = read_limited(path, where)
        self.total += len(data)
        if self.total > MAX_TOTAL_BYTES:
            raise ConfigError(where, f"the files together are larger than {MAX_TOTAL_BYTES} bytes")
        self.files.append(path)
        if b"\0" in data:
            no = data.count(b"\n", 0, data.index(b"\0")) + 1
            raise ConfigError(Where(path, no), "a NUL byte: not a text file")
        # Bytes that are not UTF-8 (a Latin-1 comment of an older file) are
        # kept as surrogates: keepalived reads bytes, and only a word that
        # holds them is refused (_line_tokens), naming its line.
        self.lines(decode(data), path, stack + (real,))

    def lines(self, text: str, path: str, stack: tuple[str, ...]) -> None:
        for no, line in _lines(text):
            here = Where(path, no)
            first = line.lstrip()[:1]
            if first == "@":
                line = self._condition(line, here)
                if line is None:
                    continue
                first = line.lstrip()[:1]
            if first in _ADVANCED:
                raise ConfigError(here, f"keepalived's {_ADVANCED[first]} is not supported "
                                        "by pylvs")
            toks = _line_tokens(line, here, MAX_TOKENS - len(self.tokens))
            if toks and toks[0].text in _INCLUDES and not toks[0].quoted:
                self._include(toks[0].text, line, here, stack)
                continue
            self.tokens.extend(toks)

    def _condition(self, line: str, where: Where) -> str | None:
        """keepalived's conditional line: ``@ID rest`` is ``rest`` when ID
        is the config id, ``@^ID rest`` when it is not; None: skipped."""
        m = re.fullmatch(r"\s*@(\^?)(\S+)(.*)", line)
        if m is None:
            raise ConfigError(where, "'@' without a config id after it")
        rest = m.group(3)
        if rest.split()[:1] and rest.split()[0] in _INCLUDES:
            # keepalived finds includes before it looks at conditions.
            raise ConfigError(where, "an include on a conditional line: keepalived does not "
                                     "follow it; write it on a line of its own")
        if (m.group(2) == self.config_id) == bool(m.group(1)):
            return None
        return rest

    def _include(self, word: str, line: str, where: Where, stack: tuple[str, ...]) -> None:
        if word != "include":
            raise ConfigError(where, f"{word} (an include with checks) is not "
                                     "supported by pylvs; use include")
        # The pattern from the line itself: its csh braces are not blocks.
        m = _INCLUDE_ARG.fullmatch(line)
        if m is None:
            raise ConfigError(where, "include takes one file name (a glob pattern)")
        pattern = m.group(1) if m.group(1) is not None else m.group(2)
        shown = pattern
        base = os.path.dirname(where.file) or "."
        if not os.path.isabs(pattern):
            pattern = os.path.join(base, pattern)
        try:
            if pattern.count("{") > MAX_PATTERN_BRACES:
                raise ValueError(f"more than {MAX_PATTERN_BRACES} braces")
            patterns = _brace_expand(pattern)
        except ValueError as e:
            raise ConfigError(where, f"include {shown}: {e}") from None
        names: list[str] = []
        for p in patterns:
            if globmod.has_magic(p):
                names.extend(sorted(globmod.glob(p)))
            else:
                names.append(p)
        if not names:
            self.warnings.append(f"{where}: include {shown}: no file matches")
        for name in names:
            if os.path.isdir(name):
                # keepalived's read_conf_file globs with GLOB_MARK and skips
                # what ends in '/' (logged): `include conf.d/*` next to a
                # subdirectory is a configuration keepalived runs.
                self.warnings.append(f"{where}: include {shown}: {name} is a directory: "
                                     "skipped, as keepalived skips it")
                continue
            self.read(name, where, stack)


_INCLUDE_ARG = re.compile(r'\s*include\s+(?:"([^"]*)"|([^\s"#!]+))\s*(?:[#!].*)?')
_INCLUDES = ("include", "includer", "includem", "includew", "includeb", "includea",
             "include_check")
_ADVANCED = {"$": "parameter substitution ('$')",
             "~": "sequence expansion ('~SEQ')"}


# --- blocks ------------------------------------------------------------------

@dataclass
class Stmt:
    """A keyword, its values, and its block (None: it has none)."""

    kw: Token
    args: list[Token]
    children: list["Stmt"] | None = None

    @property
    def where(self) -> Where:
        return self.kw.where

    @property
    def name(self) -> str:
        return self.kw.text


@dataclass(frozen=True)
class Spec:
    """A keyword's shape: values min..max (max None: up to the next
    keyword or the end of the line), its block (a Schema, LINES, or None),
    whether the block is required, and ``warn``: keepalived's keyword that
    pylvs reads but does not act on (named in a warning)."""

    min: int = 1
    max: int | None = 1
    block: object = None
    need_block: bool = False
    warn: str | None = None


LINES = "lines"   # a block read line by line, words unchecked (VRRP, groups)


class Schema:
    def __init__(self, name: str, specs: dict[str, Spec]):
        self.name = name
        self.specs = specs


def _flag(warn: str | None = None) -> Spec:
    return Spec(0, 0, warn=warn)


def _opt(n: int = 1, warn: str | None = None) -> Spec:
    return Spec(0, n, warn=warn)


_VAR = Spec(1, None)
_TIMERS = {"connect_timeout": Spec(), "retry": Spec(), "delay_before_retry": Spec(),
           "warmup": Spec(), "delay_loop": Spec(), "alpha": _opt()}
_NOT_RUN = "pylvs does not run it"
_CHECK_NOT_RUN = "a checker pylvs does not run: it never takes the real server out"

_URL = Schema("url", {
    "path": Spec(), "digest": Spec(), "status_code": _VAR, "virtualhost": Spec(),
    "regex": Spec(), "regex_no_match": _flag(),
    "regex_options": Spec(1, None, warn="PCRE2 options; the regex module's defaults are used"),
    "regex_stack": Spec(2, 2, warn="a PCRE2 JIT setting"),
    "regex_min_offset": Spec(warn="not applied"), "regex_max_offset": Spec(warn="not applied"),
})

_CHECK_COMMON = {
    **_TIMERS, "connect_ip": Spec(), "connect_port": Spec(),
    "bindto": Spec(), "bind_if": Spec(warn="not applied"),
    "bind_port": Spec(warn="not applied"), "fwmark": Spec(warn="not applied"),
    "log_all_failures": _opt(warn="not applied"),
}
_CHECKS = {
    "TCP_CHECK": Schema("TCP_CHECK", dict(_CHECK_COMMON)),
    "PING_CHECK": Schema("PING_CHECK", dict(_CHECK_COMMON)),
    "HTTP_GET": Schema("HTTP_GET", {
        # nb_get_retry: keepalived 1.x's retry, HTTP_GET's and SSL_GET's only
        # (keepalived 2.2 knows it nowhere else).
        **_CHECK_COMMON, "nb_get_retry": Spec(), "url": Spec(0, 0, block=_URL, need_block=True),
        "virtualhost": Spec(), "http_protocol": Spec(),
        "fast_recovery": _opt(warn="not applied"), "enable_sni": _flag(),
    }),
    "UDP_CHECK": Schema("UDP_CHECK", {
        **_CHECK_COMMON, "payload": _VAR, "require_reply": Spec(0, None),
        "min_reply_length": Spec(), "max_reply_length": Spec(),
    }),
    "MISC_CHECK": Schema("MISC_CHECK", {   # no connect_timeout: keepalived has none here
        **{k: s for k, s in _TIMERS.items() if k != "connect_timeout"},
        "log_all_failures": _opt(warn="not applied"),
        "misc_path": Spec(1, 3), "misc_timeout": Spec(), "misc_dynamic": _flag(),
        "user": Spec(1, 2, warn="the command runs as pylvs's user"),
    }),
}
_CHECKS["SSL_GET"] = Schema("SSL_GET", dict(_CHECKS["HTTP_GET"].specs))
_OTHER_CHECKS = ("DNS_CHECK", "SMTP_CHECK", "BFD_CHECK", "FILE_CHECK")

_METHOD = Spec(1, 6)    # NAT | DR | TUN [type ipip|gue port N|gre] [nocsum|csum|remcsum]
_REAL = Schema("real_server", {
    **_TIMERS, "weight": Spec(), "lvs_method": _METHOD, "inhibit_on_failure": _opt(),
    "uthreshold": Spec(), "lthreshold": Spec(), "notify_up": Spec(1, 3),
    "notify_down": Spec(1, 3), "virtualhost": Spec(),
    "smtp_alert": _opt(warn="pylvs sends no mail"), "snmp_name": Spec(warn="pylvs has no SNMP"),
    **{k: Spec(0, 0, block=s, need_block=True) for k, s in _CHECKS.items()},
    **{k: Spec(0, 0, block=LINES, need_block=True, warn=_CHECK_NOT_RUN) for k in _OTHER_CHECKS},
})
_SCHED_FLAGS = ("flag-1", "flag-2", "flag-3", "sh-port", "sh-fallback", "mh-port", "mh-fallback")
_VIRTUAL = Schema("virtual_server", {
    **_TIMERS, "lvs_sched": Spec(), "lb_algo": Spec(), "lvs_method": _METHOD, "lb_kind": _METHOD,
    "protocol": Spec(), "persistence_timeout": _opt(), "persistence_granularity": Spec(),
    "persistence_engine": Spec(), "ops": _flag(), "hashed": _flag(warn="not applied"),
    **{f: _flag() for f in _SCHED_FLAGS},
    "quorum": Spec(), "quorum_up": Spec(1, 3), "quorum_down": Spec(1, 3), "hysteresis": Spec(),
    "omega": _flag(), "inhibit_on_failure": _opt(), "virtualhost": Spec(),
    "sorry_server": Spec(1, 2), "sorry_server_inhibit": _flag(),
    "sorry_server_lvs_method": _METHOD,
    "real_server": Spec(1, 2, block=_REAL),
    "ha_suspend": _flag(warn="not applied: pylvs forwards for a VIP only while it is local"),
    "smtp_alert": _opt(warn="pylvs sends no mail"), "snmp_name": Spec(warn="pylvs has no SNMP"),
    "ip_family": Spec(warn="pylvs is IPv4 only"),
})

# keepalived's top-level blocks and keywords that are not the LVS part.
_TOP_OTHER_BLOCKS = ("global_defs", "vrrp_instance", "vrrp_sync_group", "vrrp_script",
                     "vrrp_track_process", "track_process", "vrrp_track_file", "track_file",
                     "static_ipaddress", "static_routes", "static_rules", "linkbeat_interfaces",
                     "garp_group", "bfd_instance", "SSL", "vrrp_group", "track_group",
                     "interface_up_down_delays")
_TOP_OTHER_WORDS = ("net_namespace", "net_namespace_ipvs", "namespace_with_ipsets", "instance",
                    "use_pid_dir", "linkbeat_use_polling", "child_wait_time")
_SYNC_HINT = ("remove it from the file keepalived reads: keepalived would start the "
              "kernel's IPVS sync daemon (2.2.7 crashes without ip_vs and never adds the "
              "VIP); pylvs's is started apart, docs/failover.md")
def _sync_command(st: Stmt) -> str:
    """The pylvs commands an ``lvs_sync_daemon IF INSTANCE [id N]`` (or a
    vrrp_instance's ``lvs_sync_daemon_interface IF``) line stands for; ''
    for other keywords. keepalived runs the sync daemon as master where the
    instance is MASTER: pylvs runs both roles on every director."""
    if st.name not in ("lvs_sync_daemon", "lvs_sync_daemon_interface") or not st.args:
        return ""
    words = [a.text for a in st.args]
    opts = dict(zip(words[2::2], words[3::2]))   # after IF and INSTANCE: NAME VALUE pairs
    extra = "".join(f" --{flag} {opts[name]}" for name, flag in _SYNC_OPTIONS if name in opts)
    return (f": pylvs run ... --start-daemon master --start-daemon backup "
            f"--mcast-interface {words[0]} --syncid {opts.get('id', '0')}{extra}")


# lvs_sync_daemon's options (keepalived.conf(5)) and pylvs run's names.
_SYNC_OPTIONS = (("maxlen", "sync-maxlen"), ("port", "mcast-port"), ("ttl", "mcast-ttl"),
                 ("group", "mcast-group"))


_LVS_ELSEWHERE = {
    "lvs_sync_daemon": _SYNC_HINT, "lvs_sync_daemon_interface": _SYNC_HINT,
    "lvs_notify_fifo": "pylvs writes no notify FIFO; pylvs status shows each check",
    "lvs_notify_fifo_script": "pylvs writes no notify FIFO; pylvs status shows each check",
}
_TOP = Schema("the top level", {
    "virtual_server": Spec(1, 2, block=_VIRTUAL, need_block=True),
    "virtual_server_group": Spec(1, 1, block=LINES, need_block=True),
    **{k: Spec(0, None, block=LINES, need_block=True, warn=_NOT_RUN) for k in _TOP_OTHER_BLOCKS},
    **{k: Spec(0, None, warn="not applied") for k in _TOP_OTHER_WORDS},
})
_TOP.specs["vrrp_instance"] = Spec(1, 1, block=LINES, need_block=True,
                                   warn="VRRP is keepalived's: run `keepalived -P` (VRRP "
                                        "only, or keepalived's checkers program the kernel's "
                                        "IPVS too) for it; pylvs follows the VIP, "
                                        "docs/failover.md")


class _Parser:
    def __init__(self, tokens: list[Token], warnings: list[str]):
        self.t = tokens
        self.i = 0
        self.warnings = warnings

    def parse(self) -> list[Stmt]:
        return self._block(_TOP, None, 0)

    def _block(self, schema, owner: Stmt | None, depth: int) -> list[Stmt]:
        if depth > MAX_NESTING:
            raise ConfigError(owner.where, f"blocks nested deeper than {MAX_NESTING}")
        out: list[Stmt] = []
        t = self.t
        while self.i < len(t):
            tok = t[self.i]
            if tok.brace == "}":
                if owner is None:
                    raise ConfigError(tok.where, "unbalanced '}': no block is open")
                self.i += 1
                return out
            if tok.brace == "{":
                raise ConfigError(tok.where, "'{' without a keyword before it")
            out.append(self._line(depth) if schema is LINES else self._stmt(schema, owner, depth))
        if owner is not None:
            raise ConfigError(owner.where, f"the block of '{owner.name}' opened here is never "
                                           "closed (missing '}')")
        return out

    def _line(self, depth: int) -> Stmt:
        t = self.t
        kw = t[self.i]
        self.i += 1
        args = []
        while self.i < len(t) and not t[self.i].bol and not t[self.i].brace:
            args.append(t[self.i])
            self.i += 1
        st = Stmt(kw, args)
        if self.i < len(t) and t[self.i].brace == "{":
            self.i += 1
            st.children = self._block(LINES, st, depth + 1)
        return st

    def _stmt(self, schema: Schema, owner: Stmt | None, depth: int) -> Stmt:
        t = self.t
        kw = t[self.i]
        spec = None if kw.quoted else schema.specs.get(kw.text)
        if spec is None:
            # A block may go on in the next included file (as keepalived
            # reads it), so one cut short at its file's end (a write cut
            # short) is found in the next file: name where it opened.
            opened = (f" (the block of '{owner.name}' opened at {owner.where} is not closed "
                      "in its file)" if owner is not None and owner.where.file != kw.where.file
                      else "")
            if kw.text == "nb_get_retry" and "retry" in schema.specs:
                # Common in configurations written for keepalived 1.x,
                # whose TCP_CHECK never had it either.
                opened += "; keepalived ignores it here too: this checker's is 'retry'"
            raise ConfigError(kw.where, f"unknown keyword {kw.text!r} in {schema.name}{opened}")
        if not kw.bol and not t[self.i - 1].brace:
            # keepalived 2.2 takes one keyword per line (between braces) and
            # drops what follows its values without a word: pylvs reads it,
            # and says so, for a configuration that moves either way.
            self.warnings.append(f"{kw.where}: {kw.text}: after another keyword's value on "
                                 "its line: keepalived ignores it there, pylvs applies it")
        self.i += 1
        args: list[Token] = []
        while (self.i < len(t) and not t[self.i].bol and not t[self.i].brace
               and (spec.max is None or len(args) < spec.max)):
            nxt = t[self.i]
            if len(args) >= spec.min and not nxt.quoted and nxt.text in schema.specs:
                break
            args.append(nxt)
            self.i += 1
        if len(args) < spec.min:
            raise ConfigError(kw.where, f"{kw.text}: {_values(spec.min)} expected")
        if self.i < len(t) and not t[self.i].bol and not t[self.i].brace and (
                t[self.i].quoted or t[self.i].text not in schema.specs):
            raise ConfigError(t[self.i].where, f"{kw.text}: unexpected value "
                                               f"{t[self.i].text!r}")
        st = Stmt(kw, args)
        if self.i < len(t) and t[self.i].brace == "{":
            if spec.block is None:
                raise ConfigError(t[self.i].where, f"{kw.text} takes no block")
            self.i += 1
            st.children = self._block(spec.block, st, depth + 1)
        elif spec.need_block:
            raise ConfigError(kw.where, f"{kw.text}: '{{' expected")
        return st


def _values(n: int) -> str:
    return "a value" if n == 1 else f"{n} values"


# --- values ------------------------------------------------------------------

def _int(tok: Token, lo: int, hi: int, what: str) -> int:
    s = tok.text
    if not re.fullmatch(r"[0-9]+", s) or len(s) > 12 or not lo <= int(s) <= hi:
        raise ConfigError(tok.where, f"{what}: {s!r} is not an integer from {lo} to {hi}")
    return int(s)


def _lvs_timeouts(st: Stmt) -> tuple[int, int, int]:
    """global_defs' ``lvs_timeouts [tcp N] [tcpfin N] [udp N]``: (tcp,
    tcpfin, udp) seconds, 0 for one not given (unchanged, as ipvsadm
    --set takes 0); keepalived's range, 0..MAX_PERSISTENCE (its
    LVS_MAX_TIMEOUT); another word is an error, as keepalived -t says."""
    if st.children is not None:
        raise ConfigError(st.where, "lvs_timeouts takes no block")
    got = {"tcp": 0, "tcpfin": 0, "udp": 0}
    args = st.args
    if not args:
        raise ConfigError(st.where, "lvs_timeouts: tcp N, tcpfin N or udp N expected")
    for i in range(0, len(args), 2):
        name = args[i].text
        if name not in got:
            raise ConfigError(args[i].where, f"lvs_timeouts: unknown option {name!r} "
                                             "(tcp, tcpfin or udp)")
        if i + 1 >= len(args):
            raise ConfigError(args[i].where, f"lvs_timeouts: {name} takes a number of seconds")
        got[name] = _int(args[i + 1], 0, MAX_PERSISTENCE, f"lvs_timeouts {name}")
    return got["tcp"], got["tcpfin"], got["udp"]


def _timer(tok: Token, what: str, positive: bool = False) -> float:
    s = tok.text
    v = float(s) if re.fullmatch(r"[0-9]{1,12}(\.[0-9]{0,9})?|\.[0-9]{1,9}", s) else math.nan
    if not (0 < v <= MAX_TIMER if positive else 0 <= v <= MAX_TIMER):
        raise ConfigError(tok.where, f"{what}: {s!r} is not a time in seconds "
                                     f"({'above 0' if positive else '0 or more'}, "
                                     f"at most {MAX_TIMER:.0f})")
    return v


def _ipv4(tok: Token, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(tok.text))
    except ValueError:
        pass
    try:
        ipaddress.IPv6Address(tok.text.split("%")[0])
    except ValueError:
        raise ConfigError(tok.where, f"{what}: {tok.text!r} is not an IPv4 address") from None
    raise ConfigError(tok.where, f"{what}: {tok.text}: IPv6 is not supported by pylvs")


def _port(tok: Token, what: str) -> int:
    return _int(tok, 0, 65535, f"{what} port")


_BOOLS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


def _bool(st: Stmt) -> bool:
    if not st.args:
        return True
    v = _BOOLS.get(st.args[0].text.lower())
    if v is None:
        raise ConfigError(st.where, f"{st.name}: {st.args[0].text!r} is not on/off, "
                                    "true/false or yes/no")
    return v


_METHODS = {"NAT": "NAT", "DR": "DR", "TUN": "TUN"}
_TUN_TYPES = ("ipip", "gue", "gre")
_TUN_FLAGS = ("nocsum", "csum", "remcsum")


def _method(st: Stmt) -> tuple[str, str, int, str | None]:
    """(method, tun_type, tun_port, tun_flags) of ``lvs_method NAT|DR|TUN
    [type ipip|gue port N|gre] [nocsum|csum|remcsum]``."""
    a = st.args
    m = _METHODS.get(a[0].text)
    if m is None:
        raise ConfigError(a[0].where, f"{st.name}: {a[0].text!r} is not NAT, DR or TUN")
    ttype, tport, tflags = "ipip", 0, None
    rest = a[1:]
    if rest and m != "TUN":
        raise ConfigError(rest[0].where, f"{st.name} {m}: unexpected value {rest[0].text!r}")
    i = 0
    if i < len(rest) and rest[i].text == "type":
        if i + 1 >= len(rest) or rest[i + 1].text not in _TUN_TYPES:
            raise ConfigError(st.where, f"{st.name} TUN type: ipip, gue or gre expected")
        ttype = rest[i + 1].text
        i += 2
        if ttype == "gue":
            if i + 1 >= len(rest) or rest[i].text != "port":
                raise ConfigError(st.where, f"{st.name} TUN type gue: port N expected")
            tport = _int(rest[i + 1], 1, 65535, "gue port")
            i += 2
    if i < len(rest) and rest[i].text in _TUN_FLAGS:
        tflags = rest[i].text
        i += 1
    if i < len(rest):
        raise ConfigError(rest[i].where, f"{st.name}: unexpected value {rest[i].text!r}")
    if ttype == "gre":
        raise ConfigError(st.where, f"{st.name} TUN type gre: not supported by pylvs "
                                    "(ipip or gue)")
    return m, ttype, tport, tflags


def _hex(args: list[Token], what: str) -> bytes:
    """keepalived's free-form HEX_STR: each word's digits in pairs, a last
    odd digit being a byte of its own ("Ab12f 3" = AB 12 0F 03)."""
    out = bytearray()
    for tok in args:
        s = tok.text
        if re.search(r"[xX]", s):
            raise ConfigError(tok.where, f"{what}: wildcard nibbles (x) are not supported "
                                         "by pylvs")
        if not re.fullmatch(r"[0-9a-fA-F]+", s):
            raise ConfigError(tok.where, f"{what}: {s!r} is not hexadecimal")
        for i in range(0, len(s), 2):
            out.append(int(s[i:i + 2], 16))
    return bytes(out)


def _status_codes(st: Stmt) -> frozenset[int]:
    codes: set[int] = set()
    for tok in st.args:
        lo, _, hi = tok.text.partition("-")
        a = _int(Token(lo, tok.where), 100, 999, "status_code")
        b = _int(Token(hi, tok.where), 100, 999, "status_code") if hi else a
        if b < a:
            raise ConfigError(tok.where, f"status_code: empty range {tok.text!r}")
        codes.update(range(a, b + 1))
    return frozenset(codes)


def _netmask(tok: Token) -> str:
    try:
        net = ipaddress.IPv4Network(f"0.0.0.0/{tok.text}")
    except ValueError:
        raise ConfigError(tok.where, f"persistence_granularity: {tok.text!r} is not an "
                                     "IPv4 netmask") from None
    return str(net.netmask)


# --- building the model ------------------------------------------------------

def _is_ipv6(text: str) -> bool:
    """An IPv6 address (a zone and an ``A-B`` range end allowed), as a
    virtual_server or group member gives it."""
    try:
        ipaddress.IPv6Address(text.split("%")[0].split("-")[0])
    except ValueError:
        return False
    return True


class _Builder:
    def __init__(self, warnings: list[str]):
        self.warnings = warnings
        self._warned: set[str] = set()
        # What the file says and pylvs cannot run, skipped while the rest
        # applies (KeepalivedConfig.refused).
        self.refused: list[str] = []

    def refuse_ipv6(self, where: Where, what: str) -> None:
        self.refused.append(f"{where}: {what}: IPv6 services are not supported by pylvs "
                            "(IPv4 only); skipped")

    def warn(self, st: Stmt, what: str) -> None:
        line = f"{st.where}: {st.name}: {what}"
        if line not in self._warned:    # once, even for every member of a group
            self._warned.add(line)
            self.warnings.append(line)

    def unused(self, st: Stmt, spec: Spec) -> bool:
        """Warn for a keyword pylvs does not act on; True if it is one."""
        if spec.warn is None:
            return False
        self.warn(st, f"ignored ({spec.warn})")
        return True

    def top(self, stmts: list[Stmt]) -> KeepalivedConfig:
        groups: dict[str, list[tuple[str | None, int, int, Where]]] = {}
        vrrp: list[str] = []
        timeouts = None
        for st in stmts:
            if st.name == "virtual_server_group":
                name = st.args[0].text
                if name in groups:
                    raise ConfigError(st.where, f"virtual_server_group {name} defined twice")
                groups[name] = self.group(st)
            elif st.name == "global_defs" and any(c.name == "lvs_timeouts"
                                                  for c in st.children or ()):
                for c in st.children or ():
                    if c.name == "lvs_timeouts":
                        timeouts = _lvs_timeouts(c)
                self.warn(st, f"ignored but for lvs_timeouts ({_NOT_RUN})")
            elif st.name != "virtual_server":
                if st.name == "vrrp_instance":
                    vrrp.append(st.args[0].text)
                self.unused(st, _TOP.specs[st.name])
            if st.name in ("global_defs", "vrrp_instance"):
                # The LVS keywords of these blocks: each named on its own,
                # with what pylvs has instead, not lost in the block's warning.
                for c in st.children or ():
                    if c.name in _LVS_ELSEWHERE:
                        self.warn(c, f"ignored ({_LVS_ELSEWHERE[c.name]}{_sync_command(c)})")
        vss: list[VirtualServer] = []
        seen: dict[tuple, Where] = {}
        for st in stmts:
            if st.name != "virtual_server":
                continue
            for vs in self.virtual_server(st, groups):
                if vs.key in seen:
                    raise ConfigError(st.where, f"virtual server {_vs_name(vs)} already defined "
                                                f"at {seen[vs.key]}")
                seen[vs.key] = st.where
                vss.append(vs)
        return KeepalivedConfig(virtual_servers=tuple(vss), vrrp_instances=tuple(vrrp),
                                lvs_timeouts=timeouts, refused=tuple(self.refused))

    def group(self, st: Stmt) -> list[tuple[str | None, int, int, Where]]:
        """(vaddr, vport, fwmark, where) of each member."""
        members: list[tuple[str | None, int, int, Where]] = []
        for m in st.children or ():
            if m.children is not None:
                raise ConfigError(m.where, "virtual_server_group: a member takes no block")
            if m.name == "fwmark":
                if len(m.args) not in (1, 2) or (len(m.args) == 2 and m.args[1].text != "inet"):
                    raise ConfigError(m.where, "fwmark N [inet] expected (IPv4 only)")
                members.append((None, 0, _int(m.args[0], 1, 2**32 - 1, "fwmark"), m.where))
                continue
            if len(m.args) > 1:
                raise ConfigError(m.args[1].where, f"unexpected value {m.args[1].text!r}")
            port = _port(m.args[0], "virtual server") if m.args else 0
            if _is_ipv6(m.kw.text):
                self.refuse_ipv6(m.where, f"virtual_server_group {st.args[0].text} member "
                                          f"{m.kw.text}")
                continue
            for addr in _addr_range(m.kw):
                members.append((addr, port, 0, m.where))
                if len(members) > MAX_GROUP_MEMBERS:
                    raise ConfigError(m.where, f"virtual_server_group {st.args[0].text}: more "
                                               f"than {MAX_GROUP_MEMBERS} members")
        return members

    def virtual_server(self, st: Stmt, groups) -> list[VirtualServer]:
        a = st.args
        if a[0].text == "group":
            if len(a) != 2:
                raise ConfigError(st.where, "virtual_server group NAME expected")
            members = groups.get(a[1].text)
            if members is None:
                raise ConfigError(a[1].where, f"virtual_server_group {a[1].text} is not defined")
        elif a[0].text == "fwmark":
            if len(a) != 2:
                raise ConfigError(st.where, "virtual_server fwmark N expected")
            members = [(None, 0, _int(a[1], 1, 2**32 - 1, "fwmark"), st.where)]
        else:
            port = _port(a[1], "virtual server") if len(a) > 1 else 0
            if _is_ipv6(a[0].text):
                # As pylvs skips a fwmark service: a dual-stack file moves
                # over with its IPv4 services, each IPv6 one named.
                self.refuse_ipv6(st.where, f"virtual_server {a[0].text} {port}")
                return []
            members = [(_ipv4(a[0], "virtual server"), port, 0, st.where)]
        v: dict = {"real": [], "flags": []}
        for c in st.children or ():
            spec = _VIRTUAL.specs[c.name]
            if self.unused(c, spec):
                continue
            self.vs_keyword(c, v)
        # What keepalived's validate_check_config() corrects, corrected the
        # same way and named in a warning (keepalived logs it too).
        if not v["real"]:
            self.warn(st, "no real servers: ignored, as keepalived ignores it")
            return []
        protocol = v.get("protocol")
        if protocol is None and not all(m[2] for m in members):
            self.warn(st, "no protocol: UDP, as keepalived sets it (the kernel's default); "
                          "say protocol TCP for TCP")
            protocol = "UDP"
        if v.get("ops") and protocol != "UDP":
            self.warn(st, "ops (one-packet scheduling) needs UDP: cleared, as keepalived does")
            v["ops"] = False
        persist = v.get("persistence_timeout", 0)
        if not persist and any(not m[1] and not m[2] for m in members):
            self.warn(st, "a port 0 service must be persistent: persistence_timeout "
                          f"{model.DEFAULT_PERSISTENCE_TIMEOUT}, as keepalived sets it")
            persist = model.DEFAULT_PERSISTENCE_TIMEOUT
        method = v.get("method", ("NAT",))
        out = []
        for vaddr, vport, fwmark, where in members:
            reals = []
            seen: dict[tuple[str, int], Where] = {}
            for rst in v["real"]:
                rs = self.real_server(rst, v, vport, fwmark)
                if (rs.addr, rs.port) in seen:
                    self.warn(rst, f"{rs.addr} {rs.port} already defined at "
                                   f"{seen[rs.addr, rs.port]}: this one ignored, as "
                                   "keepalived ignores it")
                    continue
                seen[rs.addr, rs.port] = rst.where
                reals.append(rs)
            quorum, hysteresis = v.get("quorum", 1), v.get("hysteresis", 0)
            total = sum(rs.weight for rs in reals)
            if quorum > total:
                self.warn(st, f"quorum {quorum} above the real servers' total weight {total}: "
                              f"{total}, as keepalived sets it")
                quorum = total
            if hysteresis and hysteresis >= quorum:
                self.warn(st, f"hysteresis {hysteresis} not below quorum {quorum}: "
                              f"{max(quorum - 1, 0)}, as keepalived sets it")
                hysteresis = max(quorum - 1, 0)
            sorry = v.get("sorry_server")
            if sorry is not None:
                # Its method: its own, else the virtual server's; DR/TUN: the
                # service's port (keepalived.conf(5), validate_check_config).
                smethod = v.get("sorry_method") or method
                sport = sorry[1] if sorry[1] is not None and smethod[0] == "NAT" else vport
                sorry = SorryServer(sorry[0], sport, smethod[0],
                                    v.get("sorry_server_inhibit", False))
            out.append(VirtualServer(
                protocol=protocol or "TCP", vaddr=vaddr, vport=vport, fwmark=fwmark,
                lvs_sched=v.get("lvs_sched"), lvs_method=method[0],
                persistence_timeout=persist,
                persistence_granularity=v.get("persistence_granularity"),
                sched_flags=tuple(sorted(set(v["flags"]))), ops=v.get("ops", False),
                delay_loop=v.get("delay_loop", model.DEFAULT_DELAY_LOOP),
                quorum=quorum, quorum_up=v.get("quorum_up"),
                quorum_down=v.get("quorum_down"), hysteresis=hysteresis,
                alpha=v.get("alpha", False), omega=v.get("omega", False),
                sorry_server=sorry, real_servers=tuple(reals), where=st.where))
        return out

    def common(self, c: Stmt, d: dict, checker: bool = False) -> bool:
        """Timings and alpha, at any level; True if ``c`` was one."""
        n = c.name
        if n in ("delay_loop", "connect_timeout"):
            d[n] = _timer(c.args[0], n, positive=True)
        elif n in ("delay_before_retry", "warmup"):
            d[n] = _timer(c.args[0], n)
        elif n in ("retry", "nb_get_retry"):
            # keepalived takes retry 0 in a checker only; in a virtual or
            # real server it refuses it and keeps the default (1).
            d["retry"] = _int(c.args[0], 0 if checker else 1, 2**31 - 1, n)
        elif n == "alpha":
            d["alpha"] = _bool(c)
        else:
            return False
        return True

    def vs_keyword(self, c: Stmt, v: dict) -> None:
        n = c.name
        if self.common(c, v):
            return
        if n in ("lvs_sched", "lb_algo"):
            name = c.args[0].text
            try:
                schedmod.get(name)
            except KeyError:
                raise ConfigError(c.args[0].where, f"{n}: unknown scheduler {name!r} "
                                                   f"({', '.join(schedmod.names())})") from None
            v["lvs_sched"] = name
        elif n in ("lvs_method", "lb_kind"):
            v["method"] = _method(c)
        elif n in ("sorry_server_lvs_method", "sorry_server_inhibit") and "sorry_server" not in v:
            # keepalived applies both to the sorry server read so far, and
            # drops them (logged) when there is none yet.
            self.warn(c, "ignored: before (or without) sorry_server, as keepalived ignores it")
        elif n == "sorry_server_lvs_method":
            v["sorry_method"] = _method(c)
        elif n == "protocol":
            # Any case, as keepalived 2.2 compares it (strcasecmp, check_parser.c).
            p = c.args[0].text.upper()
            if p not in ("TCP", "UDP", "SCTP"):
                raise ConfigError(c.args[0].where, f"protocol: {p!r} is not TCP, UDP or SCTP")
            v["protocol"] = p
        elif n == "persistence_timeout":
            t = (_int(c.args[0], 0, MAX_PERSISTENCE, n) if c.args
                 else model.DEFAULT_PERSISTENCE_TIMEOUT)
            if t:
                v[n] = t
            else:
                # Common for "no persistence"; keepalived logs it invalid
                # and leaves the timeout as it is (a granularity's 360 s).
                self.warn(c, "0 ignored, as keepalived ignores it (not persistent unless "
                             "persistence_granularity says so)")
        elif n == "persistence_granularity":
            v[n] = _netmask(c.args[0])
            # A granularity makes the service persistent: keepalived's
            # handler sets the default timeout when none is given yet.
            v.setdefault("persistence_timeout", model.DEFAULT_PERSISTENCE_TIMEOUT)
        elif n == "persistence_engine":
            if c.args[0].text != "sip":
                raise ConfigError(c.args[0].where, "persistence_engine: only sip exists")
            raise ConfigError(c.where, "persistence_engine sip: not supported by pylvs")
        elif n in _SCHED_FLAGS:
            if not n.startswith("flag-") and v.get("lvs_sched") not in ("sh", "mh"):
                # keepalived 2.2 sets these only when the scheduler read so
                # far is sh or mh (logging "only applies to sh scheduler"):
                # dropped here too, so both directors hash the same way.
                self.warn(c, "ignored: only after lvs_sched sh or mh, as keepalived reads it")
                return
            v["flags"].append(n)
        elif n in ("ops", "omega", "sorry_server_inhibit"):
            v[n] = True
        elif n == "inhibit_on_failure":
            v[n] = _bool(c)
        elif n in ("quorum", "hysteresis"):
            v[n] = _int(c.args[0], 1 if n == "quorum" else 0, 2**31 - 1, n)
        elif n in ("quorum_up", "quorum_down"):
            self._script(c, v)
        elif n == "virtualhost":
            v[n] = c.args[0].text
        elif n == "sorry_server":
            port = _port(c.args[1], "sorry server") if len(c.args) > 1 else None
            v[n] = (_ipv4(c.args[0], "sorry_server"), port)
        elif n == "real_server":
            v["real"].append(c)
        else:  # every keyword of the schema is handled above
            raise AssertionError(n)

    def _script(self, c: Stmt, d: dict) -> None:
        """A notify_* or quorum_* command: words as a shell splits them,
        run without a shell (pylvs.health.manager), checked here so that
        a blank one or an unbalanced quote is named at load, not when the
        state changes."""
        if len(c.args) > 1:
            self.warn(c, "user/group ignored: the script runs as pylvs's user")
        text = c.args[0].text
        try:
            words = shlex.split(text)
        except ValueError as e:
            raise ConfigError(c.args[0].where, f"{c.name}: {e} in {text!r}") from None
        if not words:
            raise ConfigError(c.args[0].where, f"{c.name}: a command expected")
        d[c.name] = text

    def real_server(self, st: Stmt, v: dict, vport: int, fwmark: int) -> RealServer:
        addr = _ipv4(st.args[0], "real_server")
        port = _port(st.args[1], "real server") if len(st.args) > 1 else 0
        r: dict = {}
        checks: list[tuple[str, Stmt]] = []
        for c in st.children or ():
            spec = _REAL.specs[c.name]
            if self.unused(c, spec):
                continue
            n = c.name
            if self.common(c, r):
                continue
            if n == "weight":
                r[n] = _int(c.args[0], 0, MAX_WEIGHT, n)
            elif n == "lvs_method":
                r["method"] = _method(c)
            elif n == "inhibit_on_failure":
                r[n] = _bool(c)
            elif n in ("uthreshold", "lthreshold"):
                r[n] = _int(c.args[0], 0, MAX_THRESHOLD, n)
            elif n in ("notify_up", "notify_down"):
                self._script(c, r)
            elif n == "virtualhost":
                r[n] = c.args[0].text
            else:
                checks.append((n, c))
        if r.get("lthreshold", 0) > r.get("uthreshold", 0):
            # ip_vs_add_dest refuses it (-ERANGE), even with no upper threshold.
            raise ConfigError(st.where, "lthreshold above uthreshold")
        method = r.get("method") or v.get("method") or ("NAT", "ipip", 0, None)
        # The port, as keepalived settles it: none given, the service's; DR
        # and TUN always the service's (0 for fwmark), a different one reset.
        if method[0] != "NAT" and fwmark:
            port = 0
        elif not port or (method[0] != "NAT" and port != vport):
            if port:
                self.warn(st, f"port {port} is not the service's {vport}: {method[0]} takes "
                              f"the service's, as keepalived resets it")
            port = vport
        specs = tuple(self.check(kind, c, r, v) for kind, c in checks)
        return RealServer(
            addr=addr, port=port, weight=r.get("weight", 1), lvs_method=method[0],
            inhibit_on_failure=r.get("inhibit_on_failure", v.get("inhibit_on_failure", False)),
            uthreshold=r.get("uthreshold", 0), lthreshold=r.get("lthreshold", 0),
            notify_up=r.get("notify_up"), notify_down=r.get("notify_down"), checks=specs,
            tun_type=method[1] if method[0] == "TUN" else None,
            tun_port=method[2], tun_flags=method[3], where=st.where)

    def check(self, kind: str, st: Stmt, r: dict, v: dict) -> CheckSpec:
        k: dict = {"urls": []}
        schema = _CHECKS[kind]
        for c in st.children or ():
            if self.unused(c, schema.specs[c.name]) or self.common(c, k, checker=True):
                continue
            n = c.name
            if n == "connect_ip" or n == "bindto":
                k[n] = _ipv4(c.args[0], n)
            elif n == "connect_port":
                # 1..65535 as keepalived reads it: port 0 is no port to probe
                # (keepalived drops it and probes the real server's port).
                k[n] = _int(c.args[0], 1, 65535, "connect_port")
            elif n == "url":
                k["urls"].append(self.url(c))
            elif n == "virtualhost":
                k[n] = c.args[0].text
            elif n == "http_protocol":
                if c.args[0].text not in ("1.0", "1.0C", "1.1"):
                    raise ConfigError(c.args[0].where, "http_protocol: 1.0, 1.0C or 1.1 expected")
                k[n] = c.args[0].text
            elif n == "payload":
                k[n] = _hex(c.args, n)
            elif n == "require_reply":
                k[n] = _hex(c.args, n)
            elif n in ("min_reply_length", "max_reply_length"):
                k[n] = _int(c.args[0], 0, 65535, n)
            elif n == "misc_path":
                if len(c.args) > 1:
                    self.warn(c, "user/group ignored: the command runs as pylvs's user")
                k[n] = c.args[0].text
            elif n == "misc_timeout":
                # Whole seconds, as keepalived reads it (it refuses "1.5").
                k[n] = float(_int(c.args[0], 1, 4294, n))
            elif n in ("misc_dynamic", "enable_sni"):
                k[n] = True
            else:
                raise AssertionError(n)
        if kind in ("HTTP_GET", "SSL_GET") and not k["urls"]:
            raise ConfigError(st.where, f"{kind}: at least one url {{ path ... }} block expected")
        if kind == "MISC_CHECK" and "misc_path" not in k:
            raise ConfigError(st.where, "MISC_CHECK: misc_path expected")
        if k.get("min_reply_length", 0) > k.get("max_reply_length", 255):
            raise ConfigError(st.where, f"{kind}: min_reply_length above max_reply_length")

        def pick(name, default):
            for d in (k, r, v):
                if name in d:
                    return d[name]
            return default

        delay_loop = pick("delay_loop", model.DEFAULT_DELAY_LOOP)
        http = kind in ("HTTP_GET", "SSL_GET")
        return CheckSpec(
            kind=kind, delay_loop=delay_loop,
            connect_timeout=pick("connect_timeout", model.DEFAULT_CONNECT_TIMEOUT),
            retry=pick("retry", 0 if kind == "MISC_CHECK" else model.DEFAULT_RETRY),
            delay_before_retry=pick("delay_before_retry", model.DEFAULT_DELAY_BEFORE_RETRY_HTTP
                                    if http else model.DEFAULT_DELAY_BEFORE_RETRY),
            warmup=pick("warmup", delay_loop), alpha=pick("alpha", False),
            connect_ip=k.get("connect_ip"), connect_port=k.get("connect_port"),
            bindto=k.get("bindto"), urls=tuple(k["urls"]),
            virtualhost=pick("virtualhost", None) if http else None,
            http_protocol=k.get("http_protocol", "1.0"),
            payload=k.get("payload"), require_reply=k.get("require_reply"),
            min_reply_length=k.get("min_reply_length", 0),
            max_reply_length=k.get("max_reply_length", 255 if kind == "UDP_CHECK" else 0),
            misc_path=k.get("misc_path"),
            misc_timeout=k.get("misc_timeout", delay_loop) if kind == "MISC_CHECK" else None,
            misc_dynamic=k.get("misc_dynamic", False),
            enable_sni=k.get("enable_sni", False) and kind == "SSL_GET", where=st.where)

    def url(self, st: Stmt) -> UrlSpec:
        u: dict = {}
        for c in st.children or ():
            if self.unused(c, _URL.specs[c.name]):
                continue
            n = c.name
            if n == "path":
                u[n] = c.args[0].text
            elif n == "digest":
                if not re.fullmatch(r"[0-9a-fA-F]{32}", c.args[0].text):
                    raise ConfigError(c.args[0].where, "digest: 32 hexadecimal digits (MD5) "
                                                       "expected")
                u[n] = c.args[0].text.lower()
            elif n == "status_code":
                u[n] = _status_codes(c)
            elif n == "regex":
                try:
                    u["pattern"] = body_regex(c.args[0].text)
                except ValueError as e:
                    raise ConfigError(c.args[0].where, f"regex: {e}") from None
                u[n] = c.args[0].text
            elif n == "regex_no_match":
                u[n] = True
            elif n == "virtualhost":
                u[n] = c.args[0].text
            else:
                raise AssertionError(n)
        if "path" not in u:
            raise ConfigError(st.where, "url: path expected")
        return UrlSpec(path=u["path"], status_codes=u.get("status_code", frozenset()),
                       digest=u.get("digest"), regex=u.get("regex"),
                       regex_no_match=u.get("regex_no_match", False), pattern=u.get("pattern"),
                       virtualhost=u.get("virtualhost"))


def _addr_range(tok: Token) -> list[str]:
    """A virtual_server_group member's addresses: ADDR, A.B.C.D-E,
    A.B.C.D-E.F.G.H or ADDR/NN (both ends included)."""
    s = tok.text
    try:
        if "/" in s:
            net = ipaddress.IPv4Network(s, strict=False)
            lo, hi = int(net.network_address), int(net.broadcast_address)
        elif "-" in s:
            a, b = s.split("-", 1)
            first = ipaddress.IPv4Address(a)
            if "." not in b and not (re.fullmatch(r"[0-9]{1,3}", b) and int(b) <= 255):
                # The last byte's end (keepalived: "end too large"), never
                # a carry into the byte before it.
                raise ConfigError(tok.where, f"virtual_server_group: range {s!r}: the end "
                                             "is the last byte, 0..255")
            last = (ipaddress.IPv4Address(b) if "." in b
                    else ipaddress.IPv4Address((int(first) & ~0xFF) | int(b)))
            lo, hi = int(first), int(last)
        else:
            lo = hi = int(ipaddress.IPv4Address(s))
    except ValueError:
        raise ConfigError(tok.where, f"virtual_server_group: {s!r} is not an IPv4 address "
                                     "or range") from None
    if hi < lo:
        raise ConfigError(tok.where, f"virtual_server_group: empty range {s!r}")
    if hi - lo >= MAX_GROUP_MEMBERS:
        raise ConfigError(tok.where, f"virtual_server_group: {s} has more than "
                                     f"{MAX_GROUP_MEMBERS} addresses")
    return [str(ipaddress.IPv4Address(a)) for a in range(lo, hi + 1)]


def _vs_name(vs: VirtualServer) -> str:
    if vs.fwmark:
        return f"fwmark {vs.fwmark}"
    return f"{vs.protocol} {vs.vaddr}:{vs.vport}"


# --- entry points ------------------------------------------------------------

def default_config_id() -> str:
    """keepalived's default config id (``-i``): the node name up to its
    first dot."""
    return os.uname().nodename.split(".")[0]


def parse_file(path: str, config_id: str | None = None,
               data: bytes | None = None) -> KeepalivedConfig:
    """The configuration in ``path`` and every file it includes, its
    ``@ID`` lines taken for ``config_id`` (keepalived's ``-i``; None: the
    node name up to its first dot, as keepalived). ``data``: ``path``'s
    bytes when the caller has read them already (read_limited), so what
    decided the format is what is parsed even if an editor replaces the
    file meanwhile. Raises ConfigError (file:line first) for what the
    director refuses."""
    reader = _Reader(config_id)
    reader.read(path, None, (), data)
    return _finish(reader)


def parse_text(text: str, name: str = "<text>",
               config_id: str | None = None) -> KeepalivedConfig:
    """As parse_file for text already read (includes relative to the
    current directory)."""
    reader = _Reader(config_id)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ConfigError(None, f"{name}: larger than {MAX_FILE_BYTES} bytes")
    reader.files.append(name)
    reader.lines(text, name, ())
    return _finish(reader)


def _finish(reader: _Reader) -> KeepalivedConfig:
    warnings = list(reader.warnings)
    stmts = _Parser(reader.tokens, warnings).parse()
    cfg = _Builder(warnings).top(stmts)
    return KeepalivedConfig(virtual_servers=cfg.virtual_servers,
                            vrrp_instances=cfg.vrrp_instances,
                            warnings=tuple(warnings), files=tuple(reader.files),
                            lvs_timeouts=cfg.lvs_timeouts, refused=cfg.refused)


def first_word(text: str) -> str | None:
    """The first word of a ``pylvs run -c`` file, blank lines and ``#``/``!``
    comments skipped; None when it has none (empty, or only comments)."""
    for line in text.splitlines():
        toks = line.split()
        if toks and toks[0][0] not in "#!":
            return toks[0]
    return None


def looks_like_keepalived(text: str) -> bool:
    """True when a ``pylvs run -c`` file is a keepalived.conf rather than
    ``pylvs adm -S`` rules: its first word (comments and blank lines
    skipped) is neither an ipvsadm option (``-A``...) nor ``ipvsadm``."""
    word = first_word(text)
    return word is not None and not (word.startswith("-") or word in ("ipvsadm", "pylvs-adm"))
