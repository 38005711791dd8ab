"""The namespace lab itself: built, reachable, recorded, and gone afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylvs.lab import topology
from pylvs.lab.httpd import content
from pylvs.lab.topology import Lab, netns_exists

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.netns


def test_lab_builds_serves_and_leaves_nothing(uid, tmp_path):
    lab = Lab(f"pl{uid}", servers=2, ip_forward=1)
    state = ""
    try:
        lab.up()
        rec = json.loads(lab.record_path.read_text())
        assert rec["namespaces"] == lab.namespaces
        assert all(ns.startswith(f"pl{uid}-") for ns in lab.namespaces)
        # The director reaches every real server directly (health-check path).
        for name, rip in zip(lab.rs_names, lab.rips):
            p = lab.run(lab.director, lab.curl_argv("/whoami", host=rip))
            assert p.stdout.strip() == name
        out = tmp_path / "b"
        lab.run(lab.director, lab.curl_argv("/bytes/300000", "-o", str(out), host=lab.rips[0]))
        assert out.read_bytes() == content(0, 300000)
        # Without a director process the VIP is just a local address: the
        # client reaches the director's kernel (RST: nothing listens on :80).
        p = lab.curl("/whoami", max_time=3, check=False)
        assert p.returncode == 7, p  # curl: connection refused
        # The client cannot reach a rip directly (VS-NAT: no route).
        p = lab.run(lab.client, lab.curl_argv("/whoami", host=lab.rips[0], max_time=2),
                    check=False)
        assert p.returncode != 0
        sysctl = lab.run(lab.director, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
        assert sysctl == "1"
        # A real server a test prepared is torn down with the lab: no state
        # file outlives its namespace.
        lab.run(lab.rs[0], lab.pylvs_argv("realserver", "setup", "--fwd", "nat", "--dip",
                                          lab.dip, "--iface", "eth0"), cwd=str(REPO))
        state = f"/run/pylvs/realserver-{os.stat(f'/run/netns/{lab.rs[0]}').st_ino}.json"
        assert os.path.exists(state)
    finally:
        assert lab.down() == []
    assert not any(netns_exists(ns) for ns in lab.namespaces)
    assert not lab.record_path.exists()
    assert state and not os.path.exists(state)


def test_destroy_after_a_crash(uid):
    lab = Lab(f"pl{uid}", servers=1)
    lab.up()
    # Forget the Lab object, as a killed process would; only the record is left.
    lab.procs.clear()
    assert topology.destroy(lab.name) == []
    assert not any(netns_exists(ns) for ns in lab.namespaces)


def test_cli_up_status_down(uid):
    name = f"pl{uid}"
    py = [sys.executable, "-m", "pylvs.cli.main", "lab"]
    try:
        up = subprocess.run([*py, "up", "--name", name, "--servers", "2"], capture_output=True,
                            text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        assert f"ip netns exec {name}-director" in up.stdout
        st = subprocess.run([*py, "status"], capture_output=True, text=True, timeout=30)
        assert f"{name}: nat, 5/5 namespaces present" in st.stdout
    finally:
        down = subprocess.run([*py, "down", "--name", name], capture_output=True, text=True,
                              timeout=60)
    assert down.returncode == 0, down.stderr
    assert not netns_exists(f"{name}-director")


def test_cli_routed_lab_prepares_and_restores_real_servers(uid):
    """`lab up --fwd mixed`: NAT, DR and Tun real servers prepared by
    `pylvs realserver setup` (the Tun one decapsulating), and `lab down`
    tears them down, leaving no realserver state file."""
    name = f"pl{uid}"
    py = [sys.executable, "-m", "pylvs.cli.main"]

    def rs_status(i: int) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", f"{name}-rs{i}", *py, "realserver",
                               "status", "--json"], capture_output=True, text=True, timeout=30)

    states = []
    try:
        up = subprocess.run([*py, "lab", "up", "--name", name, "--fwd", "mixed", "--servers", "3"],
                            capture_output=True, text=True, timeout=90)
        assert up.returncode == 0, up.stderr
        assert "-r 10.0.1.11:80 -m" in up.stdout and "-r 10.0.0.12:80 -g" in up.stdout
        assert "-r 10.0.3.13:80 -i" in up.stdout
        st = subprocess.run([*py, "lab", "status"], capture_output=True, text=True, timeout=30)
        assert f"{name}: mixed, 9/9 namespaces present" in st.stdout, st.stdout
        for i, fwd in ((1, "nat"), (2, "dr"), (3, "tun")):
            p = rs_status(i)
            assert p.returncode == 0, p.stdout  # every setting ok
            doc = json.loads(p.stdout)
            assert doc["setup"]["fwd"] == fwd, doc
            states.append(doc["state_file"])
        assert json.loads(rs_status(3).stdout)["decapsulator"]["pid"] > 0
    finally:
        down = subprocess.run([*py, "lab", "down", "--name", name], capture_output=True,
                              text=True, timeout=90)
    assert down.returncode == 0, down.stderr
    assert not netns_exists(f"{name}-rs3")
    assert states and not any(os.path.exists(s) for s in states)


def test_failed_build_removes_what_it_made(uid, monkeypatch):
    lab = Lab(f"pl{uid}", servers=2)

    def boom(self):
        raise topology.LabError("simulated failure after the namespaces")

    monkeypatch.setattr(Lab, "start_real_servers", boom)
    with pytest.raises(topology.LabError):
        lab.up()
    assert not any(netns_exists(ns) for ns in lab.namespaces)


@pytest.mark.parametrize("argv", [["up", "--name", "a/b"], ["up", "--name", ""],
                                  ["up", "--name", "../x"], ["down", "--name", ""],
                                  ["up", "--servers", "0"], ["up", "--servers", "201"]])
def test_lab_cli_refuses_bad_names_and_counts(argv, capsys):
    from pylvs.cli import lab as lab_cli

    with pytest.raises(SystemExit) as exc:
        lab_cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pylvs lab" in err and "error:" in err
