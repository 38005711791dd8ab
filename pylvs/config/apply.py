"""A configuration file → Balancer operations, and a reload as the
difference between two configurations.

``load(path)`` reads a ``pylvs run -c`` file in either format: a
keepalived.conf (``pylvs.config.keepalived``) or ``pylvs adm -S`` rules,
told apart by the first word (``keepalived.looks_like_keepalived``). Both
become a ``Loaded``: the services and dests the file says (``State``),
each attribute as ipvsadm's -A/-a take it, plus where in the file it was
said.

keepalived → ipvsadm (what keepalived's ipvswrapper.c hands the kernel):
``lvs_method`` NAT/DR/TUN → masq/route/tunnel (``-m``/``-g``/``-i``),
per real server or inherited from the virtual server; TUN's ``type gue
port N`` and ``nocsum|csum|remcsum`` → ``--tun-type``/``--tun-port``/
``--tun-*``; ``lvs_sched``/``lb_algo`` → ``-s`` (wlc when absent, IPVS's
default); ``persistence_timeout`` → ``-p``; ``persistence_granularity``
→ ``-M``; ``sh-port``... ``flag-3`` → ``-b``; ``ops`` → ``-o``;
``weight`` → ``-w``; ``uthreshold``/``lthreshold`` → ``-x``/``-y``. DR and
TUN dests take the service's port (the parser already gave it to them, as
keepalived does).
``sorry_server``, ``quorum``, ``inhibit_on_failure`` and the checkers are
the health manager's (pylvs.health), not operations here.

A reload (``diff_ops(old, new)``) touches only what changed: services and
dests present in both with the same attributes get no operation at all
(their conns, counters and scheduler state stay), a changed one gets an
``edit_service``/``edit_dest`` (-E/-e, every attribute given, as ipvsadm
sends them), a removed one ``del_service``/``del_dest`` (-D/-d: its conns
end as IPVS ends them, docs/config.md), a new one ``add_*``. The old state is what the
last load applied (``settle``): services or dests added by hand with
``pylvs adm`` are never touched by a reload, as keepalived leaves alone
what it did not configure.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from .. import forward
from ..forward import tunnel
from . import keepalived
from .keepalived import ConfigError
from .model import FWD, KeepalivedConfig, VirtualServer, dest_port

# (proto "tcp"/"udp"/"sctp", vaddr text or None, vport, fwmark)
SvcKey = tuple[str, "str | None", int, int]
DestKey = tuple[str, int]

log = logging.getLogger("pylvs")

_SVC_ATTRS = ("sched", "flags", "persistent", "netmask", "ops", "pe")
_DEST_ATTRS = ("fwd", "weight", "u_threshold", "l_threshold", "tun_type", "tun_port",
               "tun_flags")


@dataclass
class Svc:
    """One service a file says. ``attrs``/a dest's attrs None: unknown (an
    edit the Balancer refused), so the next reload sends them again."""

    attrs: dict | None
    dests: dict[DestKey, dict | None] = field(default_factory=dict)
    where: str = ""
    dest_where: dict[DestKey, str] = field(default_factory=dict)


State = dict  # SvcKey -> Svc, in the file's order


@dataclass
class Loaded:
    """A configuration file read. ``kind`` "keepalived" | "rules";
    ``rules``: (line, op) of a rules file, applied as ``pylvs adm -R`` at
    start; ``refused``: file:line messages for what the file says and pylvs
    cannot do (fwmark and SCTP services), the rest applies;
    ``virtual_servers``: the keepalived virtual servers applied (for the
    health checks); ``warnings``: the parser's; ``blank``: the file has no
    word at all (empty, or only comments), which a reload refuses while
    services run (``ConfigFile.reload``)."""

    path: str
    kind: str
    services: State
    timeouts: tuple[int, int, int] | None = None
    rules: list[tuple[int, dict]] = field(default_factory=list)
    config: KeepalivedConfig | None = None
    virtual_servers: tuple[VirtualServer, ...] = ()
    refused: list[str] = field(default_factory=list)
    warnings: tuple[str, ...] = ()
    blank: bool = False


def load(path: str, config_id: str | None = None) -> Loaded:
    """Read and parse ``path`` (either format; a keepalived.conf's ``@ID``
    lines for ``config_id``, keepalived.parse_file). Raises ConfigError
    whose text names the file and line."""
    data = keepalived.read_limited(path)
    text = keepalived.decode(data)
    if keepalived.first_word(text) is None:
        # Either format's comments (keepalived's `!` too), nothing else.
        return Loaded(path, "rules", {}, blank=True)
    if keepalived.looks_like_keepalived(text):
        return from_keepalived(keepalived.parse_file(path, config_id, data), path)
    from ..cli import adm

    try:
        rules = adm.parse_rules(text)
    except adm.AdmError as e:   # "line N: ...", as pylvs adm -R says it
        raise ConfigError(None, f"{path}: {e}") from None
    services, timeouts = from_rules(rules, path)
    return Loaded(path, "rules", services, timeouts, rules=rules)


def from_keepalived(cfg: KeepalivedConfig, path: str = "") -> Loaded:
    """The services and dests of a parsed keepalived.conf."""
    services: State = {}
    refused: list[str] = list(cfg.refused)
    applied: list[VirtualServer] = []
    for vs in cfg.virtual_servers:
        where = str(vs.where) if vs.where else path
        if vs.fwmark:
            refused.append(f"{where}: virtual_server fwmark {vs.fwmark}: fwmark services are "
                           "not supported by pylvs yet; skipped")
            continue
        if vs.protocol == "SCTP":
            refused.append(f"{where}: virtual_server {vs.vaddr} {vs.vport}: SCTP services are "
                           "not supported by pylvs; skipped")
            continue
        key = (vs.protocol.lower(), vs.vaddr, vs.vport, 0)
        svc = Svc({"sched": vs.lvs_sched or "wlc", "flags": list(vs.sched_flags),
                   "persistent": vs.persistence_timeout,
                   "netmask": vs.persistence_granularity or "255.255.255.255",
                   "ops": vs.ops, "pe": ""}, where=where)
        for rs in vs.real_servers:
            fwd = FWD[rs.lvs_method or vs.lvs_method]
            dport = dest_port(vs, rs.port, rs.lvs_method)
            rwhere = str(rs.where) if rs.where else where
            attrs = {"fwd": fwd, "weight": rs.weight, "u_threshold": rs.uthreshold,
                     "l_threshold": rs.lthreshold}
            if fwd == "tunnel":
                # In the form `pylvs adm` gives them (the flag's number, port
                # 0 for none), so the same dest in a rules file is no change.
                attrs.update(tun_type=rs.tun_type or "ipip", tun_port=rs.tun_port or 0,
                             tun_flags=tunnel.TUN_FLAG_OPTIONS.index("tun-" + rs.tun_flags)
                             if rs.tun_flags else tunnel.TUN_F_NOCSUM)
            svc.dests[rs.addr, dport] = attrs
            svc.dest_where[rs.addr, dport] = rwhere
        services[key] = svc
        applied.append(vs)
    return Loaded(path, "keepalived", services, cfg.lvs_timeouts, config=cfg,
                  virtual_servers=tuple(applied), refused=refused, warnings=cfg.warnings)


def _svc_key(op: dict) -> SvcKey:
    vaddr = op.get("vaddr")
    return (str(op.get("proto") or "tcp").lower(), None if vaddr is None else str(vaddr),
            int(op.get("vport") or 0), int(op.get("fwmark") or 0))


def _persistent(p: Any) -> int:
    if p is True:
        return 300
    return int(p or 0)


def from_rules(rules: Iterable[tuple[int, dict]], path: str = "") -> tuple[State, Any]:
    """(State, timeouts) a file of ``pylvs adm -S`` lines leaves behind,
    its lines taken in order as the Balancer takes them (-A, -E, -D, -C,
    -a, -e, -d; a line the Balancer would refuse changes nothing here, and
    is reported when applied)."""
    services: State = {}
    timeouts = None
    for no, op in rules:
        name = op.get("op")
        where = f"{path}:{no}"
        if name == "clear":
            services.clear()
            continue
        if name == "set_timeouts":
            timeouts = (op.get("tcp", 0), op.get("tcpfin", 0), op.get("udp", 0))
            continue
        if name not in ("add_service", "edit_service", "del_service",
                        "add_dest", "edit_dest", "del_dest"):
            continue   # zero: counters, not configuration
        key = _svc_key(op)
        svc = services.get(key)
        if name == "add_service" and svc is None:
            services[key] = Svc(_svc_attrs(op), where=where)
        elif name == "edit_service" and svc is not None:
            svc.attrs = _svc_attrs(op)
        elif name == "del_service":
            services.pop(key, None)
        elif svc is not None and name.endswith("_dest"):
            dk = (str(op.get("daddr")), int(op["dport"] if op.get("dport") is not None
                                            else key[2]))
            if name == "del_dest":
                svc.dests.pop(dk, None)
            elif (name == "add_dest") == (dk not in svc.dests):
                svc.dests[dk] = _dest_attrs(op)
                svc.dest_where.setdefault(dk, where)
    return services, timeouts


def _svc_attrs(op: dict) -> dict:
    return {"sched": op.get("sched") or "wlc", "flags": sorted(op.get("flags") or []),
            "persistent": _persistent(op.get("persistent")),
            "netmask": op.get("netmask") or "255.255.255.255", "ops": bool(op.get("ops")),
            "pe": op.get("pe") or ""}


def _dest_attrs(op: dict) -> dict:
    fwd = op.get("fwd")
    try:
        fwd = forward.lookup(fwd).key if fwd is not None else forward.DEFAULT.key
    except (KeyError, TypeError):
        pass   # the Balancer names it when the op is applied
    attrs = {"fwd": fwd, "weight": op.get("weight", 1), "u_threshold": op.get("u_threshold", 0),
             "l_threshold": op.get("l_threshold", 0)}
    if fwd == "tunnel":
        attrs.update({k: op.get(k) for k in ("tun_type", "tun_port", "tun_flags")})
    return attrs


# --- operations --------------------------------------------------------------

Op = tuple[dict, str]   # (Balancer operation, file:line it comes from)


def _svc_fields(key: SvcKey) -> dict:
    proto, vaddr, vport, fwmark = key
    d: dict = {"proto": proto, "vaddr": vaddr, "vport": vport}
    if fwmark:
        d["fwmark"] = fwmark
    return d


def _svc_op(name: str, key: SvcKey, svc: Svc) -> Op:
    return {"op": name, **_svc_fields(key), **(svc.attrs or {})}, svc.where


def _dest_op(name: str, key: SvcKey, svc: Svc, dk: DestKey) -> Op:
    op = {"op": name, **_svc_fields(key), "daddr": dk[0], "dport": dk[1]}
    if name != "del_dest":
        op.update(svc.dests[dk] or {})
    return op, svc.dest_where.get(dk, svc.where)


def full_ops(state: State, timeouts: Any = None) -> list[Op]:
    """Operations making ``state`` from nothing."""
    return diff_ops({}, state, None, timeouts)


def diff_ops(old: State, new: State, old_timeouts: Any = None,
             new_timeouts: Any = None) -> list[Op]:
    """Operations turning what ``old`` applied into ``new``, leaving every
    unchanged service and dest alone. Removals first (a dest moved from
    one service to another never exists twice), then edits, then
    additions; each service's dests in the file's order."""
    ops: list[Op] = []
    for key in old:
        if key not in new:
            ops.append(({"op": "del_service", **_svc_fields(key)}, old[key].where))
    for key, n in new.items():
        o = old.get(key)
        if o is None:
            continue
        ops += [_dest_op("del_dest", key, o, dk) for dk in o.dests if dk not in n.dests]
    for key, n in new.items():
        o = old.get(key)
        if o is None:
            continue
        if o.attrs != n.attrs or n.attrs is None:
            ops.append(_svc_op("edit_service", key, n))
        for dk, attrs in n.dests.items():
            if dk in o.dests and (o.dests[dk] != attrs or attrs is None):
                ops.append(_dest_op("edit_dest", key, n, dk))
    for key, n in new.items():
        o = old.get(key)
        if o is None:
            ops.append(_svc_op("add_service", key, n))
        ops += [_dest_op("add_dest", key, n, dk) for dk in n.dests
                if o is None or dk not in o.dests]
    if new_timeouts is not None and new_timeouts != old_timeouts:
        tcp, tcpfin, udp = new_timeouts
        ops.append(({"op": "set_timeouts", "tcp": tcp, "tcpfin": tcpfin, "udp": udp}, ""))
    return ops


def settle(new: State, ops: list[Op], results: list[dict]) -> State:
    """What is in force after applying ``ops`` (made for ``new``) with
    these Balancer results: a refused addition is not there (the next
    reload adds it again), a refused edit leaves its attributes unknown
    (the next reload sends them again)."""
    state = copy.deepcopy(new)
    for (op, _where), r in zip(ops, results):
        if r.get("ok", True):
            continue
        name = op["op"]
        key = _svc_key(op)
        svc = state.get(key)
        if svc is None:
            continue
        if name == "add_service":
            del state[key]
        elif name == "edit_service":
            svc.attrs = None
        elif name in ("add_dest", "edit_dest"):
            dk = (str(op["daddr"]), int(op["dport"]))
            if name == "add_dest":
                svc.dests.pop(dk, None)
            elif dk in svc.dests:
                svc.dests[dk] = None
    return state


def errors(ops: list[Op], results: list[dict]) -> list[str]:
    """One "file:line: op ...: message" per refused operation."""
    out = []
    for (op, where), r in zip(ops, results):
        if not r.get("ok", True):
            words = [op["op"]]
            if "vaddr" in op:
                words.append(f"{op.get('proto')} {op['vaddr']}:{op.get('vport')}")
            if "daddr" in op:
                words.append(f"-> {op['daddr']}:{op['dport']}")
            out.append(f"{where + ': ' if where else ''}{' '.join(words)}: {r.get('error')}")
    return out


# --- a director's -c file ------------------------------------------------------

ApplyOps = Callable[[list], Awaitable[list]]   # Balancer.apply_many, awaited


def _health_part(vs: VirtualServer) -> tuple:
    return (vs.quorum, vs.quorum_up, vs.quorum_down, vs.hysteresis, vs.alpha, vs.omega,
            vs.sorry_server,
            tuple((rs.addr, rs.port, rs.inhibit_on_failure, rs.notify_up, rs.notify_down, rs.checks)
                  for rs in vs.real_servers))


def health_changes(old: Iterable[VirtualServer], new: Iterable[VirtualServer]) -> int:
    """How many services of both ``old`` and ``new`` had their health
    checks' part changed (checkers and their timings, quorum, hysteresis,
    sorry server, alpha, omega, inhibit_on_failure, notify commands): what
    a reload changes without an operation to the director, and says."""
    before = {vs.key: _health_part(vs) for vs in old}
    return sum(1 for vs in new if vs.key in before and before[vs.key] != _health_part(vs))


def reload_summary(operations: dict[str, int], health: int) -> str:
    """'1 edit_dest, 2 add_dest', the health checks' changes, or 'nothing changed'."""
    parts = [f"{n} {k}" for k, n in operations.items()]
    if health:
        parts.append(f"the health checks of {health} service(s)")
    return ", ".join(parts) or "nothing changed"


class ConfigFile:
    """The ``pylvs run -c`` file of a director: read (and refused, raising
    ConfigError) at construction, applied at start by ``apply``, re-read by
    ``reload``, which applies only the difference with what the last load
    left in force. ``apply_ops(ops) -> results`` runs operations as
    ``Balancer.apply_many`` (one publish). Logs to the "pylvs" logger."""

    def __init__(self, path: str, config_id: str | None = None):
        self.path = path
        self.config_id = config_id
        self.loaded = load(path, config_id)
        self._state: State = {}
        self._timeouts: Any = None
        self._lock: asyncio.Lock | None = None
        for w in self.loaded.warnings:
            log.warning("%s", w)

    async def apply(self, apply_ops: ApplyOps) -> None:
        loaded = self.loaded
        for msg in loaded.refused:
            log.error("%s", msg)
        if loaded.kind == "rules":
            # As ipvsadm -R: a bad line is reported (as -R reports it) and
            # the others still apply, published once at the end.
            rules = loaded.rules
            results = await apply_ops([op for _no, op in rules])
            bad = {no: r for (no, _op), r in zip(rules, results) if not r.get("ok", True)}
            for no, r in bad.items():
                log.error("%s line %d: %s", loaded.path, no, r.get("error"))
            log.info("applied %d of %d rules from %s", len(rules) - len(bad), len(rules),
                     loaded.path)
            self._state, self._timeouts = from_rules(
                [(no, op) for no, op in rules if no not in bad], loaded.path)
            return
        ops = full_ops(loaded.services, loaded.timeouts)
        results = await apply_ops([op for op, _w in ops])
        errs = errors(ops, results)
        for e in errs:
            log.error("%s", e)
        self._state, self._timeouts = settle(loaded.services, ops, results), loaded.timeouts
        log.info("applied %s: %d virtual server(s), %d operation(s) refused", loaded.path,
                 len(loaded.services), len(errs))

    async def reload(self, apply_ops: ApplyOps) -> dict:
        """Re-read the file (in the loop's executor) and apply the
        difference. A file that does not parse changes nothing: raises
        ConfigError ("...; the running configuration is kept"), logged.
        Result: {"file", "format", "services", "operations": {op name:
        count}, "errors", "refused", "warnings"}."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                loop = asyncio.get_running_loop()
                loaded = await loop.run_in_executor(None, load, self.path, self.config_id)
                if loaded.blank and self._state:
                    # Most likely a write cut short (a full disk, `>` for
                    # `>>`, an editor's crash): never a reason to delete
                    # every service. A file that means "none" says so.
                    raise ConfigError(None, f"{self.path}: no configuration in it (empty, or "
                                            "only comments): it would remove every service; "
                                            "to remove them all, leave a keyword in the file "
                                            "(a keepalived.conf of `global_defs { }` alone)")
            except ConfigError as e:
                log.error("reload: %s; the running configuration is kept", e)
                raise ConfigError(e.where, f"{e.msg}; the running configuration is kept") \
                    from None
            for w in loaded.warnings:
                log.warning("%s", w)
            for msg in loaded.refused:
                log.error("%s", msg)
            ops = diff_ops(self._state, loaded.services, self._timeouts, loaded.timeouts)
            results = await apply_ops([op for op, _w in ops])
            errs = errors(ops, results)
            for e in errs:
                log.error("reload: %s", e)
            health = health_changes(self.loaded.virtual_servers, loaded.virtual_servers)
            self.loaded = loaded
            self._state, self._timeouts = settle(loaded.services, ops, results), loaded.timeouts
            counts: dict[str, int] = {}
            for op, _w in ops:
                counts[op["op"]] = counts.get(op["op"], 0) + 1
            log.info("reloaded %s (%s): %d service(s), %s", self.path, loaded.kind,
                     len(loaded.services), reload_summary(counts, health))
            return {"file": self.path, "format": loaded.kind, "services": len(loaded.services),
                    "operations": counts, "health": health, "errors": errs,
                    "refused": list(loaded.refused), "warnings": list(loaded.warnings)}


# --- pylvs run -c FILE -t ------------------------------------------------------

def config_test(path: str, out, err, max_services: int, max_dests: int,
                config_id: str | None = None) -> int:
    """``pylvs run -c FILE -t``, as ``keepalived -t``: read the file (its
    includes too), apply it to a scratch Balancer of the director's size
    (no network, nothing started), write the warnings and every error with
    its file:line to ``err`` and a summary to ``out``. Returns the exit
    status: 0 when every service and dest would apply, 1 when the file is
    refused or a part of it would be (what depends on the host, a real
    server on one of the director's own addresses, is only found at run)."""
    from ..control.balancer import Balancer
    from ..engine.tables import Counters

    try:
        loaded = load(path, config_id)
    except ConfigError as e:
        err.write(f"pylvs run: -c {e}\n")
        return 1
    for w in loaded.warnings:
        err.write(f"warning: {w}\n")
    problems = list(loaded.refused)
    b = Balancer(Counters(max_services, max_dests))
    if loaded.kind == "rules":
        results = b.apply_many([op for _no, op in loaded.rules])
        problems += [f"{path}: line {no}: {r.get('error')}"
                     for (no, _op), r in zip(loaded.rules, results) if not r.get("ok", True)]
    else:
        ops = full_ops(loaded.services, loaded.timeouts)
        problems += errors(ops, b.apply_many([op for op, _w in ops]))
    for p in problems:
        err.write(f"{p}\n")
    dests = sum(len(s.dests) for s in loaded.services.values())
    out.write(f"{path} ({loaded.kind}): {len(loaded.services)} service(s), {dests} dest(s), "
              f"{len(loaded.warnings)} warning(s), {len(problems)} error(s)\n")
    return 1 if problems else 0
