"""`pylvs check` without a network: the configuration checks on snapshots,
a stand-in for the namespace's routes and addresses, the output formats and
the command line's errors. The probes are tested in tests/netns/test_check.py."""

from __future__ import annotations

import io
import json
import re

import pytest

from pylvs.check import checks
from pylvs.check.probe import ETH_P_ARP, ETH_P_IP, Route, answer_filter
from pylvs.io import bpf
from pylvs.cli import check as cli


def svc(vaddr="10.0.0.100", vport=80, proto="TCP", dests=()):
    return {"proto": proto, "vaddr": vaddr, "vport": vport, "dests": list(dests)}


def dest(daddr, fwd="masq", weight=1, **kw):
    return {"daddr": daddr, "dport": 80, "fwd": fwd, "weight": weight, **kw}


class FakeNet:
    """Routes and addresses of a director: eth0 10.0.0.1 (+ VIP), eth1 10.0.1.1."""

    def __init__(self, addrs=None, routes=None, sysctls=None, default=True):
        self.addrs = addrs if addrs is not None else {"10.0.0.1": "eth0", "10.0.0.100": "eth0",
                                                      "10.0.1.1": "eth1"}
        self.routes = routes or {}
        self.sysctls = sysctls or {}
        self.default = default
        self.arp_answers: dict = {}   # address -> MACs answering its who-has
        self.neighbours: dict = {}    # MAC -> address (the kernel's neighbour table)

    def addresses(self):
        return dict(self.addrs)

    def route(self, dst):
        return self.routes.get(dst)

    def sysctl(self, path):
        return self.sysctls.get(path, 0)

    def rp_filter(self, ifname):
        return self.sysctls.get(f"conf/{ifname}/rp_filter", 1)

    def has_default_route(self):
        return self.default

    def broadcasts(self):
        return {"10.0.0.255", "10.0.1.255"}

    def macs(self):   # the director's own
        return {"02:00:00:00:00:01"}

    def arp(self, ifname, targets, wait):
        return [(t, mac) for t in targets for mac in self.arp_answers.get(t, ())]

    def neighbour_macs(self):
        return dict(self.neighbours)


def test_services_need_a_dest_with_weight():
    snap = {"services": [svc(dests=[dest("10.0.1.11", weight=0), dest("10.0.1.12")]),
                         svc(vport=81),
                         svc(vport=53, proto="UDP", dests=[dest("10.0.1.11", weight=0)])]}
    r = {x.subject: x for x in checks.check_services(snap)}
    assert r["TCP 10.0.0.100:80"].verdict == "ok"
    assert r["TCP 10.0.0.100:80"].message == "1 of 2 dest(s) with weight > 0"
    assert r["TCP 10.0.0.100:81"].verdict == "FAIL"
    assert r["TCP 10.0.0.100:81"].fix == "add one: pylvs adm -a -t 10.0.0.100:81 -r RIP -w 1"
    assert r["UDP 10.0.0.100:53"].verdict == "FAIL"
    assert "every dest has weight 0" in r["UDP 10.0.0.100:53"].message


@pytest.mark.parametrize("addrs, arp_ignore, verdict, words", [
    ({"10.0.0.100": "eth0"}, 0, "ok", "on eth0"),
    ({"10.0.0.100": "lo"}, 0, "ok", "answers ARP"),
    ({"10.0.0.100": "lo"}, 1, "warn", "all/arp_ignore=1"),
    ({}, 0, "FAIL", "not an address of the director"),
])
def test_vip_on_the_director(addrs, arp_ignore, verdict, words):
    net = FakeNet(addrs=addrs, sysctls={"conf/all/arp_ignore": arp_ignore})
    [r] = checks.check_vips({"services": [svc(), svc(vport=443)]}, net)
    assert (r.subject, r.verdict) == ("10.0.0.100", verdict)
    assert words in r.message


def test_dr_real_server_must_be_directly_connected():
    net = FakeNet(routes={"10.0.1.11": Route("10.0.1.11", 3, "eth1", None, "10.0.1.1", 1500),
                          "10.0.5.11": Route("10.0.5.11", 3, "eth1", "10.0.1.12", "10.0.1.1", 1500)})
    snap = {"services": [svc(dests=[dest("10.0.1.11", "route"), dest("10.0.5.11", "route"),
                                    dest("10.0.9.11", "route"), dest("10.0.7.7", "masq")])]}
    r = {x.subject: x for x in checks.check_dr_connected(snap, net)}
    assert set(r) == {"10.0.1.11", "10.0.5.11", "10.0.9.11"}   # NAT dests are not DR's business
    assert r["10.0.1.11"].verdict == "ok"
    assert r["10.0.5.11"].verdict == "FAIL"
    assert "via gateway 10.0.1.12 on eth1" in r["10.0.5.11"].message
    assert r["10.0.9.11"].verdict == "FAIL"
    assert r["10.0.9.11"].message.startswith("no route to this DR real server")
    # Frames to either are dropped: the fix says how DR can work, or which method can.
    for rip in ("10.0.5.11", "10.0.9.11"):
        assert "drop_no_route" in r[rip].message
        assert r[rip].fix == ("give the director an address on the real server's network (DR "
                              "needs both on one segment), or add the dest with -i (Tun) or -m "
                              "(NAT) instead of -g")


def test_rp_filter_per_client():
    net = FakeNet(routes={"10.0.0.2": Route("10.0.0.2", 2, "eth0", None, "10.0.0.1", 1500),
                          "198.51.100.7": Route("198.51.100.7", 3, "eth1", "10.0.1.12", None, 1500)})
    out = checks.check_settings({"services": [svc()]}, net, ["10.0.0.2", "198.51.100.7", "203.0.113.1"])
    r = {x.subject: x for x in out}
    assert r["ip_forward"].verdict == "ok" and r["offloads"].verdict == "ok"
    assert r["rp_filter on eth0 for 10.0.0.2"].verdict == "ok"
    assert r["rp_filter on eth0 for 198.51.100.7"].verdict == "FAIL"
    assert "leaves by eth1" in r["rp_filter on eth0 for 198.51.100.7"].message
    assert r["rp_filter on eth0 for 203.0.113.1"].verdict == "FAIL"
    net.sysctls["conf/eth0/rp_filter"] = 2    # loose: any route back will do
    r = {x.subject: x for x in checks.check_settings({"services": [svc()]}, net, ["198.51.100.7"])}
    assert r["rp_filter on eth0 for 198.51.100.7"].verdict == "ok"
    net.default = False
    [rp] = [x for x in checks.check_settings({"services": [svc()]}, net) if "rp_filter" in x.subject]
    assert rp.verdict == "warn" and "no default route" in rp.message


def test_result_line_and_json():
    r = checks.Result("vip", "10.0.0.100", "FAIL", "not here", "add it")
    assert r.line() == "FAIL vip          10.0.0.100: not here; fix: add it"
    assert checks.Result("vip", "x", "ok", "fine").line() == "ok   vip          x: fine"
    assert json.loads(json.dumps(r.as_dict()))["fix"] == "add it"


def test_cli_without_director_or_with_bad_arguments(tmp_path):
    err = io.StringIO()
    assert cli.main(["--control", str(tmp_path / "none.sock")], stdout=io.StringIO(), stderr=err) == 2
    assert "cannot reach the pylvs control socket" in err.getvalue()
    for bad in (["--client", "10.0.0"], ["--wait", "0"], ["--wait", "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(bad, stdout=io.StringIO(), stderr=io.StringIO())
        assert e.value.code == 2


def test_arp_problem_names_the_real_server_or_the_stranger():
    on = lambda rip, gw=None: Route(rip, 3, "eth1", gw, "10.0.1.1", 1500)  # noqa: E731
    net = FakeNet(routes={"10.0.1.11": on("10.0.1.11"), "10.0.1.12": on("10.0.1.12"),
                          "10.0.1.13": on("10.0.1.13"), "10.9.9.9": on("10.9.9.9", "10.0.1.254")})
    net.arp_answers = {"10.0.0.100": ["02:00:00:00:00:01", "02:00:00:00:00:12",
                                      "02:00:00:00:00:99"],
                       "10.0.0.101": ["02:00:00:00:00:13"],
                       "10.0.1.11": ["02:00:00:00:00:11"], "10.0.1.12": ["02:00:00:00:00:12"]}
    # rs3 did not answer its own who-has: its MAC comes from the neighbour table.
    net.neighbours = {"02:00:00:00:00:13": "10.0.1.13"}
    snap = {"services": [svc(dests=[dest("10.0.1.11", "route"), dest("10.0.1.12", "route"),
                                    dest("10.9.9.9", "tunnel")]),
                         svc(vaddr="10.0.0.101", dests=[dest("10.0.1.13", "tunnel"),
                                                        dest("10.9.9.9", "tunnel")])]}
    out = checks.check_arp_problem(snap, net)
    fails = [r for r in out if r.verdict == "FAIL"]
    assert [r.subject for r in fails] == ["10.0.0.100 on eth1"] * 2 + ["10.0.0.101 on eth1"]
    assert fails[0].message.startswith("real server 10.0.1.12 (02:00:00:00:00:12) answers ARP")
    assert "--fwd dr --vip 10.0.0.100" in fails[0].fix
    assert fails[1].message.startswith("02:00:00:00:00:99, not a real server of this director")
    assert fails[2].message.startswith("real server 10.0.1.13 ")
    assert "--fwd tun --vip 10.0.0.101" in fails[2].fix
    # A routed Tun real server cannot answer ARP on the director's segments:
    # one ok line for it, however many services it serves.
    [far] = [r for r in out if r.subject == "10.9.9.9"]
    assert far.verdict == "ok" and "behind the router 10.0.1.254" in far.message
    net.arp_answers = {"10.0.0.100": ["02:00:00:00:00:01"]}
    assert {r.verdict for r in checks.check_arp_problem(snap, net) if "on eth1" in r.subject} == {"ok"}


def test_arp_problem_fix_follows_the_real_servers_own_method():
    # One VIP served by a Tun real server and a DR one on the same segment:
    # the DR one answering ARP must be told DR's set-up, never Tun's.
    on = lambda rip: Route(rip, 3, "eth1", None, "10.0.1.1", 1500)  # noqa: E731
    net = FakeNet(routes={"10.0.1.12": on("10.0.1.12"), "10.0.1.13": on("10.0.1.13")})
    net.arp_answers = {"10.0.0.100": ["02:00:00:00:00:12", "02:00:00:00:00:13"],
                       "10.0.1.12": ["02:00:00:00:00:12"], "10.0.1.13": ["02:00:00:00:00:13"]}
    snap = {"services": [svc(dests=[dest("10.0.1.13", "tunnel"), dest("10.0.1.12", "route")])]}
    fixes = {r.message.split()[2]: r.fix for r in checks.check_arp_problem(snap, net)
             if r.verdict == "FAIL"}
    assert fixes == {
        "10.0.1.12": "on 10.0.1.12 run `pylvs realserver setup --fwd dr --vip 10.0.0.100` (VIP "
                     "on lo /32, arp_ignore=1, arp_announce=2)",
        "10.0.1.13": "on 10.0.1.13 run `pylvs realserver setup --fwd tun --vip 10.0.0.100` (VIP "
                     "on lo /32, arp_ignore=1, arp_announce=2)"}


class ProbeNet(FakeNet):
    """FakeNet that answers probes: ``respond(scapy frame) -> [scapy frames]``
    stands for the network behind eth1; ``exchange`` feeds the answers to
    the check's matcher as the real one does."""

    def __init__(self, respond, **kw):
        super().__init__(**kw)
        self.respond = respond
        self.sent: list = []

    def mac(self, ifname):
        return "02:00:00:00:00:01"

    def resolve(self, ifname, addr, wait=1.0):
        return "02:00:00:00:00:fe"

    def exchange(self, ifname, frames, match, proto=ETH_P_IP, wait=1.0, first=False,
                 sources=(), icmp=False):
        from scapy.layers.l2 import Ether
        from pylvs.check.probe import Answer, PACKET_HOST
        found = []
        for f in frames:
            self.sent.append(Ether(f))
            for reply in self.respond(Ether(f)):
                m = match(Answer(ifname, PACKET_HOST, Ether(bytes(reply))))
                if m is not None:
                    found.append(m)
                    if first:
                        return found
        return found


def _inner(pkt):
    """The packet inside a tunnel probe (IPIP, or UDP 8 + GUE 4 bytes)."""
    from scapy.layers.inet import IP
    return IP(bytes(pkt[IP].payload)[12 if pkt[IP].proto == 17 else 0:])


def _reply_to(pkt, inner=False):
    """A SYN-ACK answering the (inner, for a tunnel probe) SYN of PKT."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    syn = _inner(pkt) if inner else pkt[IP]
    return Ether() / IP(src=syn.dst, dst=syn.src) / TCP(sport=syn[TCP].dport,
                                                        dport=syn[TCP].sport, flags="SA")


def _icmp(src, pkt, type_, code, mtu=0):
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    quote = bytes(pkt[IP])[:28]
    return Ether() / IP(src=src, dst=pkt[IP].src) / ICMP(type=type_, code=code,
                                                        nexthopmtu=mtu) / quote


@pytest.mark.parametrize("gateway", [None, "10.0.1.254"])
def test_nat_route_fix_on_one_segment_or_behind_a_router(gateway):
    from scapy.layers.inet import IP
    rip = "10.0.1.11" if gateway is None else "10.0.5.11"
    # The real server answers the director's own address only: its route to
    # the clients (the VIP's side) bypasses the director.
    net = ProbeNet(lambda f: [_reply_to(f)] if f[IP].src == "10.0.1.1" else [],
                   routes={rip: Route(rip, 3, "eth1", gateway, "10.0.1.1", 1500)})
    snap = {"services": [svc(dests=[dest(rip)])]}
    [r] = checks.check_nat_route(snap, net)
    assert r.verdict == "FAIL" and "bypasses" in r.message
    # Probed from the VIP: a real server that routes only some clients back
    # (setup --clients) is told to probe with one of them.
    some = ("the probe used the VIP as the client's address: when only some clients are "
            "routed back through the director (`pylvs realserver setup --fwd nat --clients "
            "PREFIX`), run `pylvs check --client ADDR` with an address of one of them "
            "instead; otherwise ")
    assert r.fix.startswith(some)
    [with_client] = checks.check_nat_route(snap, net, ["192.0.2.7"])
    assert with_client.verdict == "FAIL" and "pylvs check --client" not in with_client.fix
    assert with_client.fix == r.fix[len(some):]
    if gateway is None:
        # setup refuses a second, different nat setup: never advise it alone.
        assert with_client.fix == (
            "on 10.0.1.11 run `pylvs realserver setup --fwd nat --dip 10.0.1.1` (its default "
            "route, or with --clients PREFIX its route to the clients, via the director); if "
            "10.0.1.11 already has a nat setup (`pylvs realserver status` there), run `pylvs "
            "realserver teardown` there first and set up again with every client prefix in "
            "one --clients list")
    else:
        # The DIP is not on the real server's network: setup --dip DIP would be refused.
        assert "--dip 10.0.1.1" not in r.fix
        assert with_client.fix.startswith(
            "10.0.5.11 is behind the router 10.0.1.254, so its replies reach the director "
            "only if every hop routes the clients via it")
        assert "via the director (10.0.1.1 on eth1, next to 10.0.1.254)" in r.fix


TUN_ROUTE = Route("10.0.3.11", 3, "eth1", "10.0.1.254", "10.0.1.1", 1500)


def _tun_path(mtu=1500, router="10.0.1.254", unreachable=False, black_hole=False):
    """The network toward a Tun real server whose smallest link has MTU."""
    from scapy.layers.inet import IP

    def respond(f):
        if f[IP].len > mtu:
            return [] if black_hole else [_icmp(router, f, 3, 4, mtu)]
        if unreachable:
            return [_icmp(f[IP].dst, f, 3, 2 if f[IP].proto == 4 else 3)]
        return [_reply_to(f, inner=True)]
    return ProbeNet(respond, routes={"10.0.3.11": TUN_ROUTE})


GUE = dest("10.0.3.11", "tunnel", tun_type="gue", tun_port=6080, tun_flags=0)


def test_tun_fix_texts_quote_whole_commands():
    out = checks.check_tun({"services": [svc(dests=[GUE])]}, _tun_path(unreachable=True))
    [tun] = [r for r in out if r.check == "tun"]
    assert tun.verdict == "FAIL" and "port unreachable" in tun.message
    # One decapsulator per namespace: a real server decapsulating on another
    # port cannot start a second one, so the fix names both sides.
    assert tun.fix == (
        "either the dest's tunnel port is wrong: `pylvs adm -e -t 10.0.0.100:80 -r 10.0.3.11 "
        "-i --tun-type gue --tun-port PORT` with the --gue-port 10.0.3.11's `pylvs realserver "
        "run` was started with; or 10.0.3.11 needs a decapsulator on 6080: on 10.0.3.11 run "
        "`pylvs realserver setup --fwd tun --vip 10.0.0.100`, then `pylvs realserver run "
        "--vip 10.0.0.100 --gue-port 6080` there, after stopping one that runs on another "
        "port (one decapsulator per namespace)")
    assert tun.fix.count("`") % 2 == 0
    # Silence (the decapsulator not running, say): the fix names it too.
    net = ProbeNet(lambda f: [], routes={"10.0.3.11": TUN_ROUTE})
    [tun, mtu] = checks.check_tun({"services": [svc(dests=[GUE])]}, net)
    assert tun.verdict == "FAIL" and "no answer" in tun.message
    assert "`pylvs realserver run --vip 10.0.0.100 --gue-port 6080` must be running" in tun.fix
    assert mtu.verdict == "warn" and "not checked: the tunnel does not answer" in mtu.message


@pytest.mark.parametrize("d, over", [(dest("10.0.3.11", "tunnel"), 20), (GUE, 32)])
def test_tun_mtu_df_probe(d, over):
    from scapy.layers.inet import IP
    snap = {"services": [svc(dests=[d])]}

    def mtu_line(net):
        return next(r for r in checks.check_tun(snap, net) if r.check == "tun-mtu")

    net = _tun_path()
    r = mtu_line(net)
    assert r.verdict == "ok" and f"a DF probe of 1500 bytes through the tunnel was answered"         in r.message and f"{1500 - over} bytes inside" in r.message
    # One probe of the route's MTU, DF set on the outer and inner headers.
    [probe] = [f for f in net.sent if f[IP].flags.DF]
    assert probe[IP].len == 1500 and _inner(probe).flags.DF and len(_inner(probe)) == 1500 - over

    # A router on the path with a 1400-byte link answers frag-needed: the
    # director learns that and tells clients (works: warn); a link leaving
    # less than 576 inside the tunnel cannot work.
    r = mtu_line(_tun_path(1400))
    assert r.verdict == "warn"
    assert r.message.startswith("the path MTU toward 10.0.3.11 is 1400, not the MTU 1500 on "
                                "eth1: router 10.0.1.254 answered a DF probe of 1500 bytes with "
                                f"frag-needed (MTU 1400), leaving {1400 - over} bytes inside")
    assert "the director learns it" in r.message
    assert r.fix.startswith("raise the MTU of the smaller link toward 10.0.3.11 to at least 1500")
    r = mtu_line(_tun_path(590))
    assert r.verdict == "FAIL" and r.message.endswith(
        f"leaving {590 - over} bytes inside the tunnel, below 576")

    # The same link behind a router that sends no ICMP: a black hole, bracketed.
    net = _tun_path(1390, black_hole=True)
    r = mtu_line(net)
    # Lost: then the smaller sizes, at once, to bracket the path MTU.
    probes = [f for f in net.sent if f[IP].flags.DF]
    assert all(_inner(f).flags.DF and len(_inner(f)) == f[IP].len - over for f in probes)
    assert [f[IP].len for f in probes] == [1500, 1492, 1480, 1476, 1460, 1450, 1400, 1380,
                                           1280, 1200, 1100, 1000, 900, 800, 700, 576]
    assert r.verdict == "FAIL"
    assert r.message.startswith("a DF probe of 1380 bytes was answered, one of 1400 was not: "
                                "the path MTU is 1380 to 1399, and no router reported "
                                "frag-needed (a path-MTU black hole)")
    assert "send ICMP frag-needed" in r.fix

    # The tunnel itself does not answer: no DF probe, and not ok.
    r = mtu_line(_tun_path(unreachable=True))
    assert r.verdict == "warn" and r.message.startswith("not checked: the tunnel does not answer")


def _frame(ethertype: int, body: bytes) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype.to_bytes(2, "big") + body


def _ipv4(src: str, proto: int = 6) -> bytes:
    return (bytes([0x45, 0, 0, 40]) + bytes(5) + bytes([proto]) + bytes(2)
            + bpf.ip(src).to_bytes(4, "big") + bytes(24))


def _arp(op: int) -> bytes:
    return bytes.fromhex("000108000604") + bytes([0, op]) + bytes(20)


@pytest.mark.parametrize("desc, proto, sources, frame, accepted, icmp", [
    ("ICMP from a router (frag-needed about a probe)", ETH_P_IP, ["10.0.1.11"],
     _frame(0x0800, _ipv4("10.0.0.2", proto=1)), True, True),
    ("TCP from a router while ICMP is read", ETH_P_IP, ["10.0.1.11"],
     _frame(0x0800, _ipv4("10.0.0.2")), False, True),
    ("a probed address while ICMP is read", ETH_P_IP, ["10.0.1.11", "10.0.0.100"],
     _frame(0x0800, _ipv4("10.0.0.100")), True, True),
    ("ICMP from a router without icmp", ETH_P_IP, ["10.0.1.11"],
     _frame(0x0800, _ipv4("10.0.0.2", proto=1)), False, False),
    ("ICMP only: ARP refused", ETH_P_IP, [], _frame(0x0806, _arp(2)), False, True),
    ("ICMP only: TCP refused", ETH_P_IP, [], _frame(0x0800, _ipv4("10.0.0.2")), False, True),
    ("IPv4 from a probed address", ETH_P_IP, ["10.0.1.11", "10.0.0.100"],
     _frame(0x0800, _ipv4("10.0.0.100")), True, False),
    ("IPv4 from another address", ETH_P_IP, ["10.0.1.11", "10.0.0.100"],
     _frame(0x0800, _ipv4("10.0.1.12")), False, False),
    ("ARP while waiting for IPv4", ETH_P_IP, ["10.0.1.11"], _frame(0x0806, _arp(2)), False, False),
    ("any IPv4 when no source is named", ETH_P_IP, [],
     _frame(0x0800, _ipv4("192.0.2.1")), True, False),
    ("ARP reply", ETH_P_ARP, [], _frame(0x0806, _arp(2)), True, False),
    ("ARP request (someone else asking)", ETH_P_ARP, [], _frame(0x0806, _arp(1)), False, False),
    ("IPv4 while waiting for ARP", ETH_P_ARP, [], _frame(0x0800, _ipv4("10.0.1.11")), False, False),
])
def test_answer_filter(desc, proto, sources, frame, accepted, icmp):
    prog = answer_filter(proto, sources, icmp)
    assert (bpf.run(prog, frame, protocol=int.from_bytes(frame[12:14], "big")) > 0) == accepted, desc


class _Director:
    """rpc.Client's stand-in: answers "snapshot" with SNAP, "stats" with TAP
    as its "tap" ports (what `pylvs run --tap NAME` answers)."""

    snap: dict = {}
    tap: list = []

    def __init__(self, path):
        pass

    def call(self, op):
        assert op in ({"op": "snapshot"}, {"op": "stats"})
        return self.snap if op["op"] == "snapshot" else {"io": {}, "tap": self.tap}

    def close(self):
        pass


class _NetCM(FakeNet):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.mark.parametrize("services, rc, first", [
    ([], 0, "the director has no services: only its settings are checked"),
    ([svc()], 1, "FAIL services     TCP 10.0.0.100:80: no dest: every new flow is refused"),
])
def test_cli_output_and_exit_status(monkeypatch, services, rc, first):
    monkeypatch.setattr(cli.rpc, "Client", type("D", (_Director,), {"snap": {"services": services}}))
    monkeypatch.setattr(cli, "Net", _NetCM)
    out = io.StringIO()
    assert cli.main([], stdout=out, stderr=io.StringIO()) == rc
    assert out.getvalue().splitlines()[0].startswith(first)
    out = io.StringIO()
    assert cli.main(["--json"], stdout=out, stderr=io.StringIO()) == rc
    doc = json.loads(out.getvalue())
    assert doc["ok"] == (rc == 0)
    assert {"ip_forward", "offloads"} <= {c["subject"] for c in doc["checks"]}


def test_tap_director_is_refused_in_one_line_not_with_false_fails(monkeypatch):
    """A --tap director's VIP and routes are not the kernel's: instead of FAILs
    (VIP not an address, no route) whose fixes go against the TAP design,
    one line saying it is not supported yet, exit 2, no probe."""
    snap = {"services": [svc(dests=[dest("10.0.1.11", fwd="tunnel")])]}
    monkeypatch.setattr(cli.rpc, "Client", type("D", (_Director,), {"snap": snap,
                                                                       "tap": ["pltap0"]}))
    monkeypatch.setattr(cli, "Net", lambda: pytest.fail("probed a TAP director"))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main([], stdout=out, stderr=err) == 2
    assert out.getvalue() == ""
    [line] = err.getvalue().splitlines()
    assert "TAP ports (pltap0)" in line and "kernel stack" in line
    assert "not supported for --tap yet" in line


@pytest.mark.parametrize("client, words", [
    ("127.0.0.1", "not a unicast address a client can have"),
    ("224.0.0.1", "not a unicast address a client can have"),
    ("0.0.0.0", "not a unicast address a client can have"),
    ("255.255.255.255", "not a unicast address a client can have"),
    ("10.0.1.1", "is an address of the director (eth1)"),
    ("10.0.0.255", "is a broadcast address of one of the director's networks"),
])
def test_client_that_cannot_be_a_client_is_refused(monkeypatch, client, words):
    with pytest.raises(checks.CheckInputError, match=re.escape(words)):
        checks.run_checks({"services": [svc()]}, FakeNet(), [client])
    monkeypatch.setattr(cli.rpc, "Client", type("D", (_Director,), {"snap": {"services": []}}))
    monkeypatch.setattr(cli, "Net", _NetCM)
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["--client", client], stdout=out, stderr=err) == 2
    assert out.getvalue() == "" and f"pylvs check: --client {client}" in err.getvalue()


def test_service_on_0_0_0_0_is_explained_not_probed():
    from scapy.layers.inet import IP
    snap = {"services": [svc(vaddr="0.0.0.0", vport=81, dests=[dest("10.0.1.11")])]}
    [vip] = checks.check_vips(snap, FakeNet())
    assert vip.verdict == "warn" and "not a wildcard" in vip.message
    assert "ip addr add" not in vip.fix
    # Without --client there is no client-side address to probe NAT replies with.
    net = ProbeNet(lambda f: [_reply_to(f)] if f[IP].src == "10.0.1.1" else [],
                   routes={"10.0.1.11": Route("10.0.1.11", 3, "eth1", None, "10.0.1.1", 1500)})
    assert checks.check_nat_route(snap, net) == [] and net.sent == []
    [r] = checks.check_nat_route(snap, net, ["192.0.2.7"])
    assert r.subject == "10.0.1.11:80" and all(f[IP].src != "0.0.0.0" for f in net.sent)
