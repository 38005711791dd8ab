"""`pylvs check` without a network: the configuration checks on snapshots,
a stand-in for the namespace's routes and addresses, the output formats and
the command line's errors. The probes are tested in tests/netns/test_check.py."""

from __future__ import annotations

import io
import json

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
    assert r["10.0.9.11"].message == "no route to this DR real server"


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
                         svc(vaddr="10.0.0.101", dests=[dest("10.0.1.13", "tunnel")])]}
    out = checks.check_arp_problem(snap, net)
    fails = [r for r in out if r.verdict == "FAIL"]
    assert [r.subject for r in fails] == ["10.0.0.100 on eth1"] * 2 + ["10.0.0.101 on eth1"]
    assert fails[0].message.startswith("real server 10.0.1.12 (02:00:00:00:00:12) answers ARP")
    assert "--fwd dr --vip 10.0.0.100" in fails[0].fix
    assert fails[1].message.startswith("02:00:00:00:00:99, not a real server of this director")
    assert fails[2].message.startswith("real server 10.0.1.13 ")
    assert "--fwd tun --vip 10.0.0.101" in fails[2].fix
    [far] = [r for r in out if r.subject == "10.9.9.9"]
    assert far.verdict == "warn" and "behind gateway 10.0.1.254" in far.message
    net.arp_answers = {"10.0.0.100": ["02:00:00:00:00:01"]}
    assert {r.verdict for r in checks.check_arp_problem(snap, net) if "on eth1" in r.subject} == {"ok"}


def _frame(ethertype: int, body: bytes) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype.to_bytes(2, "big") + body


def _ipv4(src: str) -> bytes:
    return bytes([0x45, 0, 0, 40]) + bytes(8) + bpf.ip(src).to_bytes(4, "big") + bytes(24)


def _arp(op: int) -> bytes:
    return bytes.fromhex("000108000604") + bytes([0, op]) + bytes(20)


@pytest.mark.parametrize("desc, proto, sources, frame, accepted", [
    ("IPv4 from a probed address", ETH_P_IP, ["10.0.1.11", "10.0.0.100"],
     _frame(0x0800, _ipv4("10.0.0.100")), True),
    ("IPv4 from another address", ETH_P_IP, ["10.0.1.11", "10.0.0.100"],
     _frame(0x0800, _ipv4("10.0.1.12")), False),
    ("ARP while waiting for IPv4", ETH_P_IP, ["10.0.1.11"], _frame(0x0806, _arp(2)), False),
    ("any IPv4 when no source is named", ETH_P_IP, [],
     _frame(0x0800, _ipv4("192.0.2.1")), True),
    ("ARP reply", ETH_P_ARP, [], _frame(0x0806, _arp(2)), True),
    ("ARP request (someone else asking)", ETH_P_ARP, [], _frame(0x0806, _arp(1)), False),
    ("IPv4 while waiting for ARP", ETH_P_ARP, [], _frame(0x0800, _ipv4("10.0.1.11")), False),
])
def test_answer_filter(desc, proto, sources, frame, accepted):
    prog = answer_filter(proto, sources)
    assert (bpf.run(prog, frame, protocol=int.from_bytes(frame[12:14], "big")) > 0) == accepted, desc


class _Director:
    """rpc.Client's stand-in: answers "snapshot" with SNAP."""

    snap: dict = {}

    def __init__(self, path):
        pass

    def call(self, op):
        assert op == {"op": "snapshot"}
        return self.snap

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
