"""ipvsadm's listings, byte for byte, from a Balancer snapshot.

Pure functions (snapshot data in, text out) so that the formats are tested
without a director. Scripts parse these outputs, so column widths, trailing
spaces, sort order and number scaling follow ipvsadm 1.31 exactly.

Addresses are always printed numerically: ipvsadm without ``-n`` would look
up host and service names, but a listing that stalls on reverse DNS is worse
than numbers, and the names the director's resolver knows are not
necessarily the operator's. ``-n`` is accepted and changes nothing.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Iterable

from .. import forward
from ..forward import tunnel

PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTO_SWITCHES = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}

# Output formats of -L (one at a time, as ipvsadm's FMT_* flags choose).
DEFAULT, STATS, RATE, THRESHOLDS, PERSISTENT_CONN, TUN_INFO = (
    "default", "stats", "rate", "thresholds", "persistent-conn", "tun-info")
# --tun-info's flag column, by tun_flags value (nocsum, csum, remcsum).
TUN_FLAG_INFO = ("-c", "+c", "r+c")


def _ip_key(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def addrport(addr: str, port: int) -> str:
    if ":" in addr:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def _wrapped(a: int, b: int) -> int:
    """``(int)(a - b)`` of two u32: libipvs compares addresses (and fwmarks)
    by this difference, so two that are 2^31 or more apart compare the
    other way round (10.0.0.1 sorts after 192.168.0.1)."""
    r = (a - b) & 0xFFFFFFFF
    return r - (1 << 32) if r & 0x80000000 else r


def _cmp_services(s1: dict, s2: dict) -> int:
    """libipvs's ipvs_cmp_services: fwmark, protocol, address, port."""
    return (_wrapped(s1.get("fwmark", 0), s2.get("fwmark", 0))
            or PROTO_NUMBERS.get(s1["proto"], 0) - PROTO_NUMBERS.get(s2["proto"], 0)
            or _wrapped(_ip_key(s1["vaddr"]), _ip_key(s2["vaddr"]))
            or s1.get("vport", 0) - s2.get("vport", 0))


def _cmp_dests(d1: dict, d2: dict) -> int:
    """libipvs's ipvs_cmp_dests: address, then port."""
    return _wrapped(_ip_key(d1["daddr"]), _ip_key(d2["daddr"])) or d1["dport"] - d2["dport"]


def sorted_services(services: Iterable[dict], nosort: bool = False) -> list[dict]:
    """ipvsadm's order (its comparison, wrapped differences included);
    with ``nosort``, the snapshot's order (services as they were added: the
    kernel's hash-table order depends on its memory layout)."""
    services = list(services)
    if nosort:
        return services
    return sorted(services, key=functools.cmp_to_key(_cmp_services))


def sorted_dests(dests: Iterable[dict], nosort: bool = False) -> list[dict]:
    """ipvsadm's order; with ``nosort`` the kernel's list order, newest
    first, as the snapshot gives it."""
    dests = list(dests)
    if nosort:
        return dests
    return sorted(dests, key=functools.cmp_to_key(_cmp_dests))


def largenum(n: int, exact: bool = False) -> str:
    """A counter in a 9-character column, scaled with K/M/G/T unless exact."""
    n = int(n)
    if exact:
        digits = len(str(n))
        return f"{n:>{9 if digits <= 8 else digits + 1}d}"
    if n < 100_000_000:
        return f"{n:9d}"
    if n < 1_000_000_000:
        return f"{n // 1000:8d}K"
    if n < 100_000_000_000:
        return f"{n // 1_000_000:8d}M"
    if n < 100_000_000_000_000:
        return f"{n // 1_000_000_000:8d}G"
    return f"{n // 1_000_000_000_000:8d}T"


def header(snap: dict) -> str:
    return f"IP Virtual Server version {snap.get('version', '1.2.1')} (size={snap.get('size', 4096)})\n"


def title(fmt: str = DEFAULT) -> str:
    if fmt == STATS:
        return "%-33s %8s %8s %8s %8s %8s\n  -> RemoteAddress:Port\n" % (
            "Prot LocalAddress:Port", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes")
    if fmt == RATE:
        return "%-33s %8s %8s %8s %8s %8s\n  -> RemoteAddress:Port\n" % (
            "Prot LocalAddress:Port", "CPS", "InPPS", "OutPPS", "InBPS", "OutBPS")
    if fmt == THRESHOLDS:
        return "%-33s %-10s %-10s %-10s %-10s\n  -> RemoteAddress:Port\n" % (
            "Prot LocalAddress:Port", "Uthreshold", "Lthreshold", "ActiveConn", "InActConn")
    if fmt == PERSISTENT_CONN:
        return "%-33s %-9s %-11s %-10s %-10s\n  -> RemoteAddress:Port\n" % (
            "Prot LocalAddress:Port", "Weight", "PersistConn", "ActiveConn", "InActConn")
    if fmt == TUN_INFO:
        return ("Prot LocalAddress:Port Scheduler Flags\n"
                "  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn "
                "InActConn\n")
    return ("Prot LocalAddress:Port Scheduler Flags\n"
            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")


def service_name(svc: dict) -> str:
    """'TCP  10.0.0.1:80' or 'FWM  7', cut to 33 characters as ipvsadm does."""
    if svc.get("fwmark"):
        return "FWM  %d" % svc["fwmark"]
    return ("%-4s %s" % (svc["proto"], addrport(svc["vaddr"], svc["vport"])))[:33]


def service_rule(svc: dict) -> str:
    if svc.get("fwmark"):
        return "-f %d" % svc["fwmark"]
    return "%s %s" % (PROTO_SWITCHES[svc["proto"]], addrport(svc["vaddr"], svc["vport"]))


def _service_line(svc: dict, fmt: str, exact: bool) -> str:
    name = service_name(svc)
    if fmt == STATS:
        st = svc["stats"]
        return "%-33s" % name + "".join(largenum(st[k], exact) for k in
                                       ("conns", "inpkts", "outpkts", "inbytes", "outbytes"))
    if fmt == RATE:
        r = svc["rates"]
        return "%-33s" % name + "".join(largenum(r[k], exact) for k in
                                       ("cps", "inpps", "outpps", "inbps", "outbps"))
    line = f"{name} {svc['sched']}"
    if svc.get("flags"):
        line += " (%s)" % ",".join(svc["flags"])
    if svc.get("persistent"):
        line += " persistent %d" % svc["timeout"]
        if svc.get("netmask", "255.255.255.255") != "255.255.255.255":
            line += " mask %s" % svc["netmask"]
        if svc.get("pe"):
            line += " pe %s" % svc["pe"]
    if svc.get("ops"):
        line += " ops"
    return line


def _dest_line(d: dict, fmt: str, exact: bool) -> str:
    name = addrport(d["daddr"], d["dport"])[:28]
    if fmt == STATS:
        st = d["stats"]
        return "  -> %-28s" % name + "".join(largenum(st[k], exact) for k in
                                             ("conns", "inpkts", "outpkts", "inbytes", "outbytes"))
    if fmt == RATE:
        r = d["rates"]
        return ("  -> %-28s %8d %8d %8d" % (name, r["cps"], r["inpps"], r["outpps"])
                + largenum(r["inbps"], exact) + largenum(r["outbps"], exact))
    if fmt == THRESHOLDS:
        return "  -> %-28s %-10d %-10d %-10d %-10d" % (
            name, d["u_threshold"], d["l_threshold"], d["activeconns"], d["inactconns"])
    if fmt == PERSISTENT_CONN:
        return "  -> %-28s %-9d %-11d %-10d %-10d" % (
            name, d["weight"], d.get("persistconns", 0), d["activeconns"], d["inactconns"])
    method = forward.by_name(d["fwd"])
    if fmt == TUN_INFO:
        return "  -> %-28s %-7s %-13s %-6d %-10d %-10d" % (
            name, method.name, tun_info(d), d["weight"], d["activeconns"], d["inactconns"])
    return "  -> %-28s %-7s %-6d %-10d %-10d" % (
        name, method.name, d["weight"], d["activeconns"], d["inactconns"])


def _tun_type(d: dict) -> int:
    return tunnel.TUN_TYPES[d.get("tun_type", "ipip")]


def tun_info(d: dict) -> str:
    """--tun-info's TunnelInfo column: ``ipip``, ``gue:PORT:FLAGS``,
    ``gre:FLAGS`` (FLAGS -c, +c or r+c), ``n/a`` for other methods."""
    if forward.by_name(d["fwd"]).fwd != tunnel.DESCRIPTOR.fwd:
        return "n/a"
    tt = _tun_type(d)
    flags = TUN_FLAG_INFO[d.get("tun_flags", 0)]
    if tt == tunnel.TUN_GUE:
        return "gue:%d:%s" % (d.get("tun_port", 0), flags)
    if tt == tunnel.TUN_GRE:
        return "gre:" + flags
    return "ipip"


def _tun_rule(d: dict) -> str:
    """The tunnel options -S prints after a tunnel dest's weight (ipvsadm
    1.31 names the type even for the default ipip)."""
    tt = _tun_type(d)
    flag = " --" + tunnel.TUN_FLAG_OPTIONS[d.get("tun_flags", 0)]
    if tt == tunnel.TUN_GUE:
        return " --tun-type gue --tun-port %d%s" % (d.get("tun_port", 0), flag)
    if tt == tunnel.TUN_GRE:
        return " --tun-type gre" + flag
    return " --tun-type ipip"


def service_entry(svc: dict, fmt: str = DEFAULT, exact: bool = False,
                  nosort: bool = False) -> str:
    lines = [_service_line(svc, fmt, exact)]
    lines += [_dest_line(d, fmt, exact) for d in sorted_dests(svc["dests"], nosort)]
    return "\n".join(lines) + "\n"


def list_all(snap: dict, fmt: str = DEFAULT, exact: bool = False, nosort: bool = False) -> str:
    """``ipvsadm -L -n`` (with --stats, --rate, --thresholds, --persistent-conn)."""
    out = [header(snap), title(fmt)]
    out += [service_entry(s, fmt, exact, nosort) for s in sorted_services(snap["services"], nosort)]
    return "".join(out)


def list_service(svc: dict, fmt: str = DEFAULT, exact: bool = False, nosort: bool = False) -> str:
    """``ipvsadm -L -n -t VIP:PORT``: no version header, as ipvsadm."""
    return title(fmt) + service_entry(svc, fmt, exact, nosort)


def find_service(snap: dict, proto: str, vaddr: str, vport: int, fwmark: int = 0) -> dict | None:
    for s in snap["services"]:
        if fwmark:
            if s.get("fwmark") == fwmark:
                return s
        elif (not s.get("fwmark") and s["proto"] == proto and s["vaddr"] == vaddr
              and s["vport"] == vport):
            return s
    return None


def save(snap: dict, nosort: bool = False) -> str:
    """``ipvsadm -S -n``: rules that ``-R`` restores."""
    out = []
    for svc in sorted_services(snap["services"], nosort):
        rule = service_rule(svc)
        line = f"-A {rule} -s {svc['sched']}"
        if svc.get("persistent"):
            line += " -p %d" % svc["timeout"]
            if svc.get("netmask", "255.255.255.255") != "255.255.255.255":
                line += " -M %s" % svc["netmask"]
        if svc.get("pe"):   # saved with or without -p, as ipvsadm's -S does
            line += " --pe %s" % svc["pe"]
        if svc.get("ops"):
            line += " -o"
        if svc.get("flags"):
            line += " -b %s" % ",".join(svc["flags"])
        out.append(line + "\n")
        for d in sorted_dests(svc["dests"], nosort):
            method = forward.by_name(d["fwd"])
            tun = _tun_rule(d) if method.fwd == tunnel.DESCRIPTOR.fwd else ""
            out.append("-a %s -r %s %s -w %d%s\n" % (
                rule, addrport(d["daddr"], d["dport"]), method.flag, d["weight"], tun))
    return "".join(out)


def timeouts(t: dict) -> str:
    """``ipvsadm -L --timeout``."""
    return "Timeout (tcp tcpfin udp): %d %d %d\n" % (t["tcp"], t["tcpfin"], t["udp"])


def daemons(rows: Iterable[dict]) -> str:
    """``ipvsadm -L --daemon`` (ipvsadm.c list_daemon): one line per running
    sync daemon, master first, with the settings the kernel reports after
    filling in its defaults."""
    return "".join(
        "%s sync daemon (mcast=%s, syncid=%d, maxlen=%u, group=%s, port=%u, ttl=%u)\n"
        % (d["state"], d["mcast_ifn"], d["syncid"], d["sync_maxlen"], d["mcast_group"],
           d["mcast_port"], d["mcast_ttl"]) for d in rows)


def conns(rows: Iterable[dict], pe_columns: bool = False) -> str:
    """``ipvsadm -L -c -n``; expiry as MM:SS (minutes are not capped at 59).
    ``pe_columns`` (``--persistent-conn``): ipvsadm's header with the
    persistence engine's name and data; no conn has them (no --pe is
    applied), so the rows are the same, as ipvsadm prints such rows."""
    head = ("pro expire %-11s %-18s %-18s %-18s %-16s %s\n"
            % ("state", "source", "virtual", "destination", "pe name", "pe_data")
            if pe_columns else
            "pro expire %-11s %-18s %-18s %s\n" % ("state", "source", "virtual", "destination"))
    out = ["IPVS connection entries\n", head]
    for c in rows:
        exp = max(0, int(c["expires"]))
        out.append("%-3s %-6s %-11s %-18s %-18s %s\n" % (
            c["proto"], "%02d:%02d" % (exp // 60, exp % 60), c["state"],
            addrport(c["caddr"], c["cport"]), addrport(c["vaddr"], c["vport"]),
            addrport(c["daddr"], c["dport"])))
    return "".join(out)
