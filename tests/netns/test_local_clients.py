"""Clients on the director itself (docs/io.md, "Clients on the director"):
a process in the director's namespace that connects to a virtual service is
balanced like any client, for VS-NAT, VS-DR and VS-Tun, with 1 and 2
workers, over AF_PACKET and with --io xdp, and when pylvs stops (or is
killed) the kernel has the VIP again with nothing of pylvs's left (tcx
programs, the route anchor, routes).

One lab per forwarding method and backend for the module; each test starts
its own director. The DR and Tun labs carry the VIP as a /32 of its own, so the
kernel prefers the VIP itself as the source of a local connect (a real
server holding the VIP would answer itself): these exercise pylvs's source
routes. The NAT lab keeps the VIP as a secondary address (the kernel then
prefers the primary, the DIP, and pylvs adds no route).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid

import pytest

from pylvs.lab.httpd import content
from pylvs.lab.topology import Lab, netns_exists

pytestmark = pytest.mark.netns

FWDS = ["nat", "dr", "tun"]
WORKERS = [1, 2]
IOS = ["afpacket", "xdp"]

# Run in the director's namespace: what a local connect to VIP:80 meets
# (connected / refused / timeout), the tcx programs on every interface,
# pylvs's anchor devices and the local routing table.
STATE = """
import json, socket, subprocess, sys
from pylvs import _bpf
vip = sys.argv[1]
s = socket.socket()
s.settimeout(1)
try:
    s.connect((vip, 80))
    verdict = "connected"
except ConnectionRefusedError:
    verdict = "refused"
except OSError as e:
    verdict = type(e).__name__
finally:
    s.close()
tcx = {name: _bpf.tcx_query(index) + _bpf.tcx_query(index, True)
       for index, name in socket.if_nameindex()}
routes = subprocess.run(["ip", "-4", "route", "show", "table", "local"],
                        capture_output=True, text=True, check=True).stdout
print(json.dumps({"connect": verdict, "tcx": tcx, "routes": routes}))
"""


def state(lab: Lab) -> dict:
    return json.loads(lab.run(lab.director, [sys.executable, "-c", STATE, lab.vip]).stdout)


def kernel_state(lab: Lab) -> dict:
    """The director namespace as the kernel alone keeps it (nothing of
    pylvs): its VIP refused by the local stack (nothing listens on :80),
    no tcx program anywhere."""
    st = state(lab)
    assert st["connect"] == "refused", st
    assert not any(st["tcx"].values()), st["tcx"]
    assert not any(name.startswith("pylvsl") for name in st["tcx"]), st["tcx"]
    return st


@pytest.fixture(scope="module")
def labs():
    """{(fwd, io): Lab}, each built on first use and removed at the end of
    the module (io="xdp": the director started with --io xdp, the other
    namespaces sending complete checksums, as `pylvs lab up --io xdp`)."""
    made: dict[tuple[str, str], Lab] = {}

    def get(fwd: str, io: str = "afpacket") -> Lab:
        if (fwd, io) not in made:
            lab = Lab(f"pl{uuid.uuid4().hex[:6]}", servers=2, fwd=fwd, io=io)
            made[fwd, io] = lab
            lab.up()
            if fwd != "nat":
                # The VIP as an address of its own (module docstring).
                out = lab.run(lab.director, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
                cidr = next(w for line in out.splitlines() for w in line.split()
                            if w.startswith(lab.vip + "/"))
                lab.run(lab.director, ["ip", "addr", "del", cidr, "dev", "eth0"])
                lab.run(lab.director, ["ip", "addr", "add", f"{lab.vip}/32", "dev", "eth0"])
            lab.found = kernel_state(lab)
        return made[fwd, io]

    try:
        yield get
    finally:
        for lab in made.values():
            lab.stop_director()
            errors = lab.down()
            assert not errors, errors
            assert not any(netns_exists(ns) for ns in lab.namespaces)


@pytest.fixture
def lab(labs, request):
    """The lab of the test's `fwd` and `io` with a director of `workers`
    serving VIP:80 round robin over rs1 and rs2; stopped at the end (its
    log shown for a failure)."""
    lab = labs(request.getfixturevalue("fwd"), request.getfixturevalue("io"))
    lab.start_director()
    try:
        if lab.fwd == "nat":
            lab.nat_service("tcp", 80, (1, 1), sched="rr")
        else:
            lab.service("tcp", 80, (1, 1), sched="rr")
        yield lab
    finally:
        print(f"--- director log ({lab.name}) ---\n{lab.director_log()[-6000:]}")
        lab.stop_director()


def local_curl(lab: Lab, path: str, *extra: str, max_time: float = 10.0) -> subprocess.CompletedProcess:
    return lab.curl(path, *extra, ns=lab.director, max_time=max_time)


@pytest.mark.parametrize("workers", WORKERS, indirect=True)
@pytest.mark.parametrize("fwd", FWDS)
@pytest.mark.parametrize("io", IOS)
def test_local_client_is_balanced_and_nothing_is_left_after_stop_or_kill_9(lab, fwd, workers,
                                                                          io, tmp_path):
    if io == "xdp":   # XDP attached, and the loopback port beside the XSKs
        log = lab.director_log()
        assert "AF_XDP socket on queue 0" in log and "falling back" not in log, log
        assert "local clients: connects from this host" in log, log
    # Round robin over two real servers: the answers alternate.
    names = [local_curl(lab, "/whoami", max_time=5).stdout.strip() for _ in range(4)]
    assert sorted(set(names)) == ["rs1", "rs2"] and all(
        a != b for a, b in zip(names, names[1:])), names

    # Payload intact both ways: a download, and an upload big enough that
    # the local TCP sends GSO super-frames on lo.
    n = 1 << 20
    out = tmp_path / "got"
    local_curl(lab, f"/bytes/{n}", "-o", str(out), max_time=20)
    assert out.read_bytes() == content(0, n)
    body = tmp_path / "body"
    body.write_bytes(content(7, n))
    answer = local_curl(lab, "/sink", "-T", str(body), max_time=20).stdout.split()
    assert answer == [str(n), hashlib.sha256(body.read_bytes()).hexdigest()], answer

    # The conns are pylvs's, from a local address (the DIP: the VIP's
    # route prefers it, or pylvs's source route does) to the real servers.
    listing = lab.adm("-L", "-n", "-c")
    local_conns = [line.split() for line in listing.splitlines()
                   if f" {lab.dip0}:" in line and f"{lab.vip}:80" in line]
    assert len(local_conns) >= 6, listing
    assert {c[-1].rsplit(":", 1)[0] for c in local_conns} == set(lab.rips), listing

    running = state(lab)
    assert running["connect"] == "connected"   # pylvs answers the VIP for the kernel
    assert running["tcx"]["lo"], running["tcx"]
    if fwd != "nat":
        assert f"{lab.vip} dev pylvsl" in running["routes"], running["routes"]

    # Stopped (1 worker) or killed outright (2 workers): either way the
    # kernel answers the VIP again at once and nothing of pylvs is left.
    if workers == 1:
        lab.stop_director()
        assert kernel_state(lab)["routes"] == lab.found["routes"]
        return
    director = lab.procs.pop("director")
    killed = time.monotonic()
    director.kill()
    director.wait(5)
    while True:
        st = state(lab)
        if (st["connect"] == "refused" and not any(st["tcx"].values())
                and st["routes"] == lab.found["routes"]) or time.monotonic() > killed + 2:
            break
        time.sleep(0.05)
    took = time.monotonic() - killed
    assert kernel_state(lab)["routes"] == lab.found["routes"]
    assert took < 1.5, took


def test_no_local_clients_leaves_them_to_the_kernel(labs):
    lab = labs("nat")
    lab.start_director("--no-local-clients")
    try:
        lab.nat_service("tcp", 80, (1,), sched="rr")
        assert "local clients" not in lab.director_log()
        st = state(lab)
        assert st["connect"] == "refused" and "lo" not in {
            n for n, ids in st["tcx"].items() if ids}, st
        assert lab.curl("/whoami", max_time=5).stdout.strip() == "rs1"   # remote clients still
    finally:
        lab.stop_director()


def test_local_client_with_the_python_engine_over_xdp(labs, tmp_path):
    """The reference engine over --io xdp gets the loopback port's frames
    in the same Batch as the XSKs': its replies to the local client leave
    by the loopback port's socket, not an XSK (there is none on lo), and a
    1 MiB download arrives intact."""
    lab = labs("nat", "xdp")
    lab.start_director("--engine", "python")
    try:
        lab.nat_service("tcp", 80, (1, 1), sched="rr")
        names = [local_curl(lab, "/whoami", max_time=5).stdout.strip() for _ in range(2)]
        assert sorted(names) == ["rs1", "rs2"], names
        n = 1 << 20
        out = tmp_path / "got"
        local_curl(lab, f"/bytes/{n}", "-o", str(out), max_time=30)
        assert out.read_bytes() == content(0, n)
        st = lab.stats()
        assert st["xsk_tx_bad_port"] == 0 and st["rx_blocks"] > 0, st
    finally:
        print(f"--- director log ({lab.name}) ---\n{lab.director_log()[-6000:]}")
        lab.stop_director()
