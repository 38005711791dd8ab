"""HTTP through each forwarding method, and NAT, DR and Tun in one service.

The tests share a routed lab (pylvs/lab/topology.py, ``fwd="mixed"``: rs1
NAT on the director's eth1 segment, rs2 DR on the front segment, rs3 Tun
behind the router with `pylvs realserver run`); each starts its own `pylvs
run`, real servers and decapsulators in it (tests/netns/conftest.py,
``pooled_lab``) and talks HTTP (curl) from the client behind the router. Veth offloads stay on,
so the director sees partial checksums and 64 KiB GSO frames from the
client's side (uploads) and must complete or segment them before it
rewrites or encapsulates. The lab is removed at the end of the module, and
at once after a test that failed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import time

import pytest

from pylvs.lab.httpd import content
from pylvs.lab.topology import GUE_PORT, Lab

# NAT, DR and Tun with one worker and with two (docs/io.md, "Workers").
pytestmark = [pytest.mark.netns, pytest.mark.parametrize("workers", [1, 2], ids=["1worker", "2workers"], indirect=True)]

PORT = 80
NAT, DR, TUN = 0, 1, 2  # rs1, rs2, rs3 of a mixed lab
GUE = ("--tun-type", "gue", "--tun-port", str(GUE_PORT))

# (id, real server, Tun options): each method alone in a service.
METHODS = [("nat", NAT, ()), ("dr", DR, ()), ("tun-ipip", TUN, ()),
           ("tun-gue-csum", TUN, (*GUE, "--tun-csum")),
           ("tun-gue-nocsum", TUN, (*GUE, "--tun-nocsum"))]


@pytest.fixture
def mixed(pooled_lab) -> Lab:
    return pooled_lab(fwd="mixed", servers=3)


def only(i: int, weight: int = 1) -> list:
    """Weights with real server i alone in the service."""
    return [weight if j == i else None for j in range(3)]


def whoami_many(lab: Lab, n: int) -> list[str]:
    """n sequential requests, one TCP connection each; the answering rs names."""
    url = f"http://{lab.vip}:{PORT}/whoami"
    argv = ["curl", "-s", "--noproxy", "*", "--connect-timeout", "3", "--max-time", "5",
            "-H", "Connection: close", *([url] * n)]
    p = lab.run(lab.client, argv, timeout=30 + n * 0.2, check=False)
    return [x.strip() for x in p.stdout.splitlines() if x.strip()]


def download(lab: Lab, n: int, out, query: str = "", max_time: float = 20):
    """curl /bytes/n from the client into out; (returncode, HTTP code, stderr)."""
    p = lab.curl(f"/bytes/{n}{query}", "-o", str(out), "-w", "%{http_code}",
                 max_time=max_time, check=False)
    return p.returncode, p.stdout.strip(), p.stderr


def assert_content(path, n: int) -> None:
    got = path.read_bytes()
    assert len(got) == n, f"{n} bytes: got {len(got)}"
    want = content(0, n)
    if got != want:
        first = next(i for i in range(n) if got[i] != want[i])
        pytest.fail(f"{n} bytes: first difference at offset {first}")


def decap_counters(lab: Lab, i: int, ready) -> dict:
    """rs i's decapsulator counters once ready(counters); its stats file is
    written at most once a second, so poll (bounded)."""
    deadline = time.monotonic() + 5
    while True:
        p = lab.run(lab.rs[i], lab.pylvs_argv("realserver", "status", "--json"), check=False)
        counters = (json.loads(p.stdout).get("decapsulator") or {}).get("counters") or {}
        if counters and ready(counters) or time.monotonic() > deadline:
            assert counters and ready(counters), p.stdout
            return counters
        time.sleep(0.2)


@pytest.mark.parametrize("rs,tun", [m[1:] for m in METHODS], ids=[m[0] for m in METHODS])
def test_http_byte_for_byte(mixed: Lab, tmp_path, rs, tun):
    """1 B, 100 KB and 10 MB downloads and a 2 MB upload, each method alone."""
    lab = mixed
    lab.service("tcp", PORT, only(rs), tun=tun)
    for n in (1, 100_000, 10 << 20):
        out = tmp_path / f"bytes-{n}"
        rc, code, err = download(lab, n, out)
        assert (rc, code) == (0, "200"), f"{n} bytes: curl rc {rc} HTTP {code!r}: {err}"
        assert_content(out, n)
    # An upload: the client's 64 KiB GSO frames pass the director (DR: as
    # they are; Tun: segmented, checksums completed, then encapsulated).
    body = tmp_path / "up"
    body.write_bytes(content(0, 2 << 20))
    p = lab.curl("/sink", "-T", str(body), max_time=20, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(2 << 20), hashlib.sha256(body.read_bytes()).hexdigest()]
    assert whoami_many(lab, 1) == [lab.rs_names[rs]]
    st = lab.stats()
    trouble = ("drop_no_route", "drop_unresolved", "emit_overflow")
    assert {k: st[k] for k in trouble} == dict.fromkeys(trouble, 0), st
    if rs == TUN:
        assert st["tx_tunneled"] > 0 and st["tx_frames"] == 0, st
        # The upload's GSO super-frames were cut into segments, each
        # encapsulated: more frames made than frames tunneled.
        assert st["emit_frames"] > st["tx_tunneled"], st
        kind = "decap_gue" if tun else "decap_ipip"
        c = decap_counters(lab, TUN, lambda c: c[kind] > 0)
        assert not {k: v for k, v in c.items() if k.startswith("drop_") and v}, c
        assert c["decap_ipip" if tun else "decap_gue"] == 0, c
    else:
        # NAT and DR pass the upload's GSO frames on as GSO frames.
        assert st["tx_tunneled"] == 0 and st["tx_frames"] > 0 and st["gso_frames"] > 0, st


def test_mixed_service_distributes_by_weight(mixed: Lab):
    """wrr with weights 1 (NAT), 2 (DR), 3 (Tun): 60 connections split 10/20/30.

    Which real server answered is counted from its /whoami reply, so each
    answer also proves a complete TCP exchange through that method.
    """
    lab = mixed
    lab.service("tcp", PORT, [1, 2, 3], sched="wrr")
    names = whoami_many(lab, 60)
    counts = collections.Counter(names)
    assert counts == {"rs1": 10, "rs2": 20, "rs3": 30}, counts
    listing = lab.adm("-L", "-n")
    for rip, method in zip(lab.rips, ("Masq", "Route", "Tunnel")):
        assert any(rip in line and method in line for line in listing.splitlines()), listing


@pytest.mark.parametrize("ip_forward", [0, 1], ids=["ip_forward=0", "ip_forward=1"])
def test_udp_across_methods(pooled_lab, ip_forward):
    """UDP echo through NAT, DR and Tun dests of one service (wrr 1:1:1):
    every datagram answered intact, from the VIP, by each real server in
    turn, whatever the director's own ip_forward."""
    lab = pooled_lab(fwd="mixed", servers=3, ip_forward=ip_forward)
    lab.service("udp", 7, [1, 1, 1], sched="wrr")
    p = lab.run(lab.client, [lab.python, "-m", "pylvs.lab.udpping", lab.vip, "7",
                             "--count", "30", "--timeout", "2"], timeout=60)
    answers = json.loads(p.stdout)["answers"]
    lost = [a for a in answers if not a["ok"]]
    assert not lost, f"{len(lost)} of 30 datagrams unanswered or mangled: {lost[:3]}"
    assert {a["from"] for a in answers} == {f"{lab.vip}:7"}
    # One conn per datagram (udpping uses a new source port each time).
    assert collections.Counter(a["server"] for a in answers) == {"rs1": 10, "rs2": 10,
                                                                 "rs3": 10}


# The running conn's method, the method -e gives the dest, and why a new
# conn cannot work with it in this lab: then only a conn still bound to its
# first method completes the download.
EDITS = [
    # rs1 holds no VIP (a NAT real server): DR frames to it are not for it,
    # and the running NAT conn's replies still need their OUT key and their
    # steering (DEST_F_REPLIES keeps rs1 in the reply keys while it has conns).
    pytest.param(NAT, "-m", "-g", id="nat-to-dr"),
    # rs3 is behind the router: not on a connected network, DR frames are
    # counted as drop_no_route, while the running conn keeps its tunnel.
    pytest.param(TUN, "-i", "-g", id="tun-to-dr"),
    # rs2 runs no decapsulator: the new conn's IPIP packets are not
    # understood, while the running conn keeps going to rs2's MAC.
    pytest.param(DR, "-g", "-i", id="dr-to-tun"),
]


@pytest.mark.parametrize("rs,old,new", EDITS)
def test_edit_method_keeps_running_conns(mixed: Lab, tmp_path, rs, old, new):
    """`-e` changes a dest's method for new conns only (IPVS binds the
    transmitter when the conn is made): a paced 3 MB download running at the
    time of the edit completes byte for byte, a new connection fails."""
    lab = mixed
    vip = lab.service("tcp", PORT, only(rs))
    rip = f"{lab.rips[rs]}:{PORT}"
    n, rate = 3 << 20, 1 << 20  # about 3 s, paced by the real server
    out = tmp_path / "slow"
    slow = subprocess.Popen(["ip", "netns", "exec", lab.client, *lab.curl_argv(
        f"/bytes/{n}?rate={rate}", "-o", str(out), max_time=10)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while not (out.exists() and out.stat().st_size > 0):
            assert time.monotonic() < deadline and slow.poll() is None, "download never started"
            time.sleep(0.05)
        before = lab.stats()
        lab.adm("-e", "-t", vip, "-r", rip, new, "-w", "1")
        listed = {"-g": "Route", "-i": "Tunnel"}[new]
        assert any(rip in line and listed in line for line in lab.adm("-L", "-n").splitlines())
        # A new connection is bound to the new method and fails with it.
        p = lab.curl("/whoami", max_time=2, check=False)
        assert p.returncode != 0, p.stdout
        _, err = slow.communicate(timeout=15)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.communicate()
    assert slow.returncode == 0, err
    assert_content(out, n)
    after = lab.stats()
    if old == "-i":
        # The running conn's packets after the edit still went into the
        # tunnel; the new conn's were refused as DR frames.
        assert after["tx_tunneled"] > before["tx_tunneled"], (before, after)
        assert after["drop_no_route"] > before["drop_no_route"], (before, after)
    elif old == "-g":
        # The running conn's frames still left as DR frames; the new conn's
        # were encapsulated.
        assert after["tx_frames"] > before["tx_frames"], (before, after)
        assert after["tx_tunneled"] > before["tx_tunneled"], (before, after)
    else:
        # Its replies were still translated back through the director: the
        # whole download is counted in the dest's OutBytes.
        listing = lab.adm("-L", "-n", "--stats")
        line = next(x for x in listing.splitlines() if x.split()[:2] == ["->", rip]).split()
        assert _num(line[6]) >= n, listing


def _num(s: str) -> int:
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)
