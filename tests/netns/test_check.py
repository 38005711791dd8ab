"""`pylvs check` against a running `pylvs run` in the namespace lab, each
check both ways: the correct set-up passes, the broken one FAILs with the
message and fix a user needs.

The lab (pylvs/lab/topology.py): client -- director (eth0: DIP0 10.0.0.1,
VIP 10.0.0.100 | eth1: DIP 10.0.1.1) -- bridge -- rs1 10.0.1.11, rs2
10.0.1.12, the real servers' default route via the DIP. The same segment
serves as the DR and Tun real servers' segment.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from pylvs.lab.topology import wait_for_line

pytestmark = pytest.mark.netns


def check(lab, *args: str) -> tuple[int, list[dict], str]:
    """`pylvs check --json ARGS` in the director: (exit status, results, stderr)."""
    p = lab.run(lab.director, lab.pylvs_argv("check", "--json", "--wait", "0.6", *args),
                check=False, timeout=60)
    assert p.returncode in (0, 1) and p.stdout, (p.returncode, p.stdout, p.stderr)
    doc = json.loads(p.stdout)
    assert doc["ok"] == (p.returncode == 0)
    return p.returncode, doc["checks"], p.stderr


def results(checks: list[dict], name: str, subject: str = "") -> list[dict]:
    return [c for c in checks if c["check"] == name and subject in c["subject"]]


def verdicts(checks: list[dict], name: str, subject: str = "") -> set[str]:
    return {c["verdict"] for c in results(checks, name, subject)}


def rs_cmd(lab, ns: str, *argv: str) -> None:
    lab.run(ns, list(argv), timeout=15)


def realserver(lab, ns: str, *args: str) -> subprocess.CompletedProcess:
    p = lab.run(ns, lab.pylvs_argv("realserver", *args), check=False, timeout=30)
    assert p.returncode == 0, (p.stdout, p.stderr)
    return p


def test_nat_services_vip_and_settings(director_lab):
    lab = director_lab()
    lab.nat_service("tcp", 80, (1, 1))
    rc, checks, _ = check(lab)
    assert rc == 0, checks
    assert {c["subject"] for c in results(checks, "nat-route")} == {"10.0.1.11:80", "10.0.1.12:80"}
    assert verdicts(checks, "nat-route") == {"ok"}, checks
    assert verdicts(checks, "services") == {"ok"} and verdicts(checks, "vip") == {"ok"}
    assert {"ip_forward", "offloads"} <= {c["subject"] for c in results(checks, "settings")}

    # rs2's default route now bypasses the director: its replies to clients
    # (probed from the VIP) never come back, though it answers the DIP.
    rs_cmd(lab, lab.rs[1], "ip", "route", "replace", "default", "via", "10.0.1.254")
    # A service with no dest, one whose only dest has weight 0, and a VIP
    # the director does not hold.
    lab.adm("-A", "-t", "10.0.0.100:81", "-s", "rr")
    lab.adm("-A", "-t", "10.0.0.100:82", "-s", "rr")
    lab.adm("-a", "-t", "10.0.0.100:82", "-r", "10.0.1.11", "-m", "-w", "0")
    lab.adm("-A", "-u", "10.0.0.200:53", "-s", "rr")
    lab.adm("-a", "-u", "10.0.0.200:53", "-r", "10.0.1.11", "-m")
    rc, checks, _ = check(lab)
    assert rc == 1
    [bad] = [c for c in results(checks, "nat-route") if c["verdict"] == "FAIL"]
    assert bad["subject"] == "10.0.1.12:80"
    assert "bypasses" in bad["message"]
    assert "pylvs realserver setup --fwd nat --dip 10.0.1.1" in bad["fix"]
    assert verdicts(checks, "nat-route", "10.0.1.11:80") == {"ok"}
    # The UDP service's real server is probed with TCP: its RST travels the same route.
    assert verdicts(checks, "nat-route", "10.0.1.11:53") == {"ok"}
    assert verdicts(checks, "services", "TCP 10.0.0.100:80") == {"ok"}
    [no_dest] = results(checks, "services", "TCP 10.0.0.100:81")
    assert no_dest["verdict"] == "FAIL" and "no dest" in no_dest["message"]
    [zero] = results(checks, "services", "TCP 10.0.0.100:82")
    assert zero["verdict"] == "FAIL" and "weight 0" in zero["message"]
    [vip] = results(checks, "vip", "10.0.0.200")
    assert vip["verdict"] == "FAIL" and "ip addr add 10.0.0.200/32" in vip["fix"]

    # Fixed: every check passes again.
    realserver(lab, lab.rs[1], "setup", "--fwd", "nat", "--dip", "10.0.1.1")
    lab.adm("-e", "-t", "10.0.0.100:82", "-r", "10.0.1.11", "-m", "-w", "1")
    lab.adm("-a", "-t", "10.0.0.100:81", "-r", "10.0.1.12", "-m")
    rs_cmd(lab, lab.director, "ip", "addr", "add", "10.0.0.200/32", "dev", "eth0")
    rc, checks, _ = check(lab)
    assert rc == 0, [c for c in checks if c["verdict"] != "ok"]

    # Text output: one line per check, FAIL lines carry the fix.
    rs_cmd(lab, lab.rs[1], "ip", "route", "replace", "default", "via", "10.0.1.254")
    p = lab.run(lab.director, lab.pylvs_argv("check", "--wait", "0.6"), check=False, timeout=60)
    assert p.returncode == 1
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("FAIL"))
    assert "nat-route" in line and "10.0.1.12:80" in line and "; fix: " in line


def test_rp_filter_for_clients(director_lab):
    lab = director_lab()
    lab.nat_service("tcp", 80, (1,))
    # The lab is strict (rp_filter 1); 10.0.0.2 is routed back via eth0 (the VIP's side).
    rc, checks, _ = check(lab, "--client", "10.0.0.2")
    assert rc == 0, [c for c in checks if c["verdict"] != "ok"]
    assert verdicts(checks, "settings", "for 10.0.0.2") == {"ok"}
    # A client network routed back through the server side: refused in strict mode.
    rs_cmd(lab, lab.director, "ip", "route", "add", "198.51.100.0/24", "via", "10.0.1.12")
    rc, checks, _ = check(lab, "--client", "198.51.100.7")
    assert rc == 1
    [bad] = results(checks, "settings", "for 198.51.100.7")
    assert bad["verdict"] == "FAIL" and "leaves by eth1" in bad["message"]
    lab.sysctl(lab.director, "net.ipv4.conf.all.rp_filter=2", "net.ipv4.conf.eth0.rp_filter=2")
    rc, checks, _ = check(lab, "--client", "198.51.100.7")
    assert verdicts(checks, "settings", "for 198.51.100.7") == {"ok"}


def test_dr_arp_problem_and_connected(director_lab):
    lab = director_lab()
    vip = lab.vip
    lab.adm("-A", "-t", f"{vip}:80", "-s", "rr")
    lab.adm("-a", "-t", f"{vip}:80", "-r", "10.0.1.11", "-g")
    # rs1 does not hold the VIP: a frame for the VIP sent to its MAC goes unanswered.
    rc, checks, _ = check(lab)
    assert rc == 1
    [dr] = results(checks, "dr")
    assert dr["subject"] == f"10.0.1.11 for {vip}:80"
    assert dr["verdict"] == "FAIL" and "does not hold the VIP" in dr["message"]
    assert f"pylvs realserver setup --fwd dr --vip {vip}" in dr["fix"]
    assert verdicts(checks, "arp-problem") == {"ok"}
    # rs1 holds the VIP on lo like a DR real server, but without arp_ignore:
    # it answers "who has VIP" on the segment.
    rs_cmd(lab, lab.rs[0], "ip", "addr", "add", f"{vip}/32", "dev", "lo")
    rc, checks, _ = check(lab)
    assert rc == 1
    [bad] = results(checks, "arp-problem")
    assert bad["verdict"] == "FAIL" and bad["subject"] == f"{vip} on eth1"
    rs1_mac = lab.mac(lab.rs[0], "eth0")
    assert f"real server 10.0.1.11 ({rs1_mac}) answers ARP for the VIP" in bad["message"]
    assert f"pylvs realserver setup --fwd dr --vip {vip}" in bad["fix"]
    assert verdicts(checks, "dr-connected") == {"ok"} and verdicts(checks, "dr") == {"ok"}

    realserver(lab, lab.rs[0], "setup", "--fwd", "dr", "--vip", vip)
    rc, checks, _ = check(lab)
    assert rc == 0, [c for c in checks if c["verdict"] != "ok"]
    assert verdicts(checks, "arp-problem") == {"ok"}

    # A DR dest behind a router: accepted by the director, flagged by check.
    rs_cmd(lab, lab.director, "ip", "route", "add", "10.0.5.0/24", "via", "10.0.1.12")
    lab.adm("-a", "-t", f"{vip}:80", "-r", "10.0.5.11", "-g")
    rc, checks, _ = check(lab)
    assert rc == 1
    [off] = results(checks, "dr-connected", "10.0.5.11")
    assert off["verdict"] == "FAIL" and "via gateway 10.0.1.12" in off["message"]
    assert verdicts(checks, "dr-connected", "10.0.1.11") == {"ok"}
    assert {c["subject"] for c in results(checks, "dr")} == {f"10.0.1.11 for {vip}:80"}


def test_tun_decapsulation_and_mtu(director_lab):
    lab = director_lab()
    vip = lab.vip
    lab.adm("-A", "-t", f"{vip}:80", "-s", "rr")
    lab.adm("-a", "-t", f"{vip}:80", "-r", "10.0.1.11", "-i")
    lab.adm("-a", "-t", f"{vip}:80", "-r", "10.0.1.12", "-i", "--tun-type", "gue",
            "--tun-port", "6080", "--tun-csum")
    # Nothing decapsulates on either real server: the kernel without the
    # ipip module answers protocol unreachable, and port unreachable for GUE.
    rc, checks, _ = check(lab)
    assert rc == 1
    [ipip] = results(checks, "tun", "10.0.1.11 (ipip)")
    assert ipip["verdict"] == "FAIL" and "protocol unreachable" in ipip["message"]
    assert f"pylvs realserver setup --fwd tun --vip {vip}" in ipip["fix"]
    [gue] = results(checks, "tun", "10.0.1.12 (gue)")
    assert gue["verdict"] == "FAIL" and "port unreachable" in gue["message"]
    assert "--gue-port 6080" in gue["fix"]
    assert "`pylvs realserver run --vip" in gue["fix"] and "--tun-port PORT" in gue["fix"]
    # No tunnel, no DF probe: the MTU is not claimed to be fine.
    assert verdicts(checks, "tun-mtu") == {"warn"}
    assert all(c["message"].startswith("not checked: the tunnel does not answer")
               for c in results(checks, "tun-mtu"))

    decaps = []
    for ns, extra in ((lab.rs[0], ()), (lab.rs[1], ("--gue-port", "6080"))):
        realserver(lab, ns, "setup", "--fwd", "tun", "--vip", vip, "--iface", "eth0")
        decaps.append(lab.popen(ns, lab.pylvs_argv("realserver", "run", "--iface", "eth0",
                                                   "--vip", vip, *extra),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in decaps:
        assert wait_for_line(p, "decapsulating", 10)
    try:
        rc, checks, _ = _until_ok(lab)
        assert rc == 0, [c for c in checks if c["verdict"] != "ok"]
        assert verdicts(checks, "tun") == {"ok"} and verdicts(checks, "arp-problem") == {"ok"}

        # A route MTU that leaves less than 576 bytes inside the tunnel.
        rs_cmd(lab, lab.director, "ip", "route", "add", "10.0.1.12/32", "dev", "eth1",
               "mtu", "lock", "600")
        rc, checks, _ = check(lab)
        assert rc == 1
        [mtu] = results(checks, "tun-mtu", "10.0.1.12")
        assert mtu["verdict"] == "FAIL" and "leaves 568 bytes" in mtu["message"]
        assert verdicts(checks, "tun-mtu", "10.0.1.11") == {"ok"}
    finally:
        for p in decaps:
            p.terminate()
            p.wait(timeout=10)


def _until_ok(lab, tries: int = 5):
    """check until it passes (the decapsulators need a moment to attach), bounded."""
    for _ in range(tries):
        rc, checks, err = check(lab)
        if rc == 0:
            break
    return rc, checks, err



def test_tun_mtu_df_probe_through_a_router(director_lab):
    """A Tun real server behind a router whose link toward it is smaller than
    the director's: the route MTU says 1500, a DF probe through the tunnel
    finds the real path MTU (the router's frag-needed), or brackets it when
    the smaller link drops silently (a black hole)."""
    from pylvs.lab.topology import GUE_PORT, HTTP_PORT
    lab = director_lab(fwd="tun", servers=2)
    vip = lab.vip
    # rs1 by IPIP, rs2 by GUE: the probe's outer header differs.
    lab.adm("-A", "-t", f"{vip}:{HTTP_PORT}", "-s", "rr")
    lab.adm("-a", "-t", f"{vip}:{HTTP_PORT}", "-r", lab.rips[0], "-i")
    lab.adm("-a", "-t", f"{vip}:{HTTP_PORT}", "-r", lab.rips[1], "-i", "--tun-type", "gue",
            "--tun-port", str(GUE_PORT))
    rc, checks, _ = _until_ok(lab)
    assert rc == 0, [c for c in checks if c["verdict"] != "ok"]
    assert verdicts(checks, "tun") == {"ok"}
    for c in results(checks, "tun-mtu"):
        assert "a DF probe of 1500 bytes through the tunnel was answered" in c["message"], c

    # The router's link to the Tun real servers' network shrinks: it answers
    # a DF packet that does not fit with frag-needed. 1300: the director
    # learns the path MTU from such answers (warn); 590: too small (FAIL).
    for link, verdict in ((1300, "warn"), (590, "FAIL")):
        rs_cmd(lab, lab.router_ns, "ip", "link", "set", "eth2", "mtu", str(link))
        rc, checks, _ = check(lab)
        assert rc == (verdict == "FAIL")
        assert verdicts(checks, "tun") == {"ok"}    # small packets still pass
        for rip, over in ((lab.rips[0], 20), (lab.rips[1], 32)):
            [mtu] = results(checks, "tun-mtu", rip)
            assert mtu["verdict"] == verdict, mtu
            assert mtu["message"].startswith(
                f"the path MTU toward {rip} is {link}, not the MTU 1500 on eth0: router "
                f"10.0.0.2 answered a DF probe of 1500 bytes with frag-needed (MTU {link}), "
                f"leaving {link - over} bytes inside the tunnel"), mtu
            assert mtu["fix"].startswith(f"raise the MTU of the smaller link toward {rip} to "
                                         "at least 1500")

    # The fix, applied: the check passes again.
    rs_cmd(lab, lab.router_ns, "ip", "link", "set", "eth2", "mtu", "1500")
    rc, checks, _ = check(lab)
    assert rc == 0, [c for c in checks if c["verdict"] != "ok"]

    # A black hole: the bridge port behind the router takes only 1300-byte
    # frames and drops larger ones silently (a veth drops what exceeds its
    # peer's MTU); the router, whose own link is 1500, reports nothing.
    rs_cmd(lab, lab.far, "ip", "link", "set", "router", "mtu", "1300")
    # Sixteen probes answered by user-space decapsulators: time to spare on a
    # loaded machine.
    rc, checks, _ = check(lab, "--wait", "2")
    assert rc == 1
    for rip in lab.rips:
        [mtu] = results(checks, "tun-mtu", rip)
        assert mtu["verdict"] == "FAIL", mtu
        assert ("a DF probe of 1280 bytes was answered, one of 1380 was not: the path MTU is "
                "1280 to 1379, and no router reported frag-needed") in mtu["message"], mtu


def test_nat_real_server_behind_a_router(director_lab, uid):
    """A NAT real server one router away (rs2 routes for it): the fix must
    not tell it to use the director as its gateway (setup would refuse a
    DIP off its network); the fix as written, applied, makes check pass."""
    from pylvs.lab.topology import remove_netns
    lab = director_lab(servers=2)
    far = f"pl{uid}far"
    rip = "10.0.5.11"
    subprocess.run(["ip", "netns", "add", far], check=True, timeout=15)
    try:
        rs_cmd(lab, lab.rs[1], "ip", "link", "add", "eth5", "type", "veth", "peer", "name",
               "eth0", "netns", far)
        rs_cmd(lab, lab.rs[1], "ip", "addr", "add", "10.0.5.1/24", "dev", "eth5")
        rs_cmd(lab, lab.rs[1], "ip", "link", "set", "eth5", "up")
        lab.sysctl(lab.rs[1], "net.ipv4.ip_forward=1")
        for argv in (["ip", "addr", "add", f"{rip}/24", "dev", "eth0"],
                     ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"],
                     ["ip", "route", "add", "default", "via", "10.0.5.1"]):
            rs_cmd(lab, far, *argv)
        rs_cmd(lab, lab.director, "ip", "route", "add", "10.0.5.0/24", "via", "10.0.1.12")
        lab.adm("-A", "-t", f"{lab.vip}:80", "-s", "rr")
        lab.adm("-a", "-t", f"{lab.vip}:80", "-r", f"{rip}:80", "-m")
        rc, checks, _ = check(lab)
        assert verdicts(checks, "nat-route", rip) == {"ok"}, checks   # rs2 routes via the DIP

        # The router's route to the clients bypasses the director.
        rs_cmd(lab, lab.rs[1], "ip", "route", "replace", "default", "via", "10.0.1.254")
        rc, checks, _ = check(lab)
        assert rc == 1
        [bad] = results(checks, "nat-route", rip)
        assert bad["verdict"] == "FAIL" and "bypasses" in bad["message"]
        assert "--dip 10.0.1.1" not in bad["fix"]
        # Probed from the VIP: the fix first says how to probe from a client.
        assert bad["fix"].startswith("the probe used the VIP as the client's address")
        assert f"otherwise {rip} is behind the router 10.0.1.12" in bad["fix"]
        assert "via the director (10.0.1.1 on eth1, next to 10.0.1.12)" in bad["fix"]

        # The fix as it reads: the real server's default route via its router
        # (setup --fwd nat --dip ROUTER), the router's route to the clients
        # via the director.
        realserver(lab, far, "setup", "--fwd", "nat", "--dip", "10.0.5.1")
        rs_cmd(lab, lab.rs[1], "ip", "route", "replace", "default", "via", "10.0.1.1")
        rc, checks, _ = check(lab)
        assert verdicts(checks, "nat-route", rip) == {"ok"}, checks
        realserver(lab, far, "teardown")
    finally:
        remove_netns(far)


def test_tun_loose_rp_filter_drift_fails_and_the_fix_as_written_repairs_it(director_lab):
    """all.rp_filter put to 2 (loose) on a Tun real server behind the user-space
    decapsulator: its TUN device has no address, so loose filtering drops every
    decapsulated packet there too. check FAILs, status warns, and check's fix
    (`pylvs realserver setup --fwd tun --vip VIP`, as written) makes both pass
    and a client's request work again."""
    from pylvs.lab.topology import HTTP_PORT
    lab = director_lab(fwd="tun", servers=1)
    vip, rs = lab.vip, lab.rs[0]
    lab.adm("-A", "-t", f"{vip}:{HTTP_PORT}", "-s", "rr")
    lab.adm("-a", "-t", f"{vip}:{HTTP_PORT}", "-r", lab.rips[0], "-i")
    rc, checks, _ = _until_ok(lab)
    assert rc == 0, [c for c in checks if c["verdict"] != "ok"]

    lab.sysctl(rs, "net.ipv4.conf.all.rp_filter=2")
    rc, checks, _ = check(lab)
    [tun] = results(checks, "tun")
    assert rc == 1 and tun["verdict"] == "FAIL", tun
    assert lab.curl("/whoami", max_time=2, check=False).returncode != 0
    p = lab.run(rs, lab.pylvs_argv("realserver", "status", "--json"), check=False)
    st = json.loads(p.stdout)
    assert p.returncode == 1
    [rp] = [c for c in st["checks"] if c["name"].startswith("rp_filter on plvsdec")]
    assert rp["verdict"] == "warn" and "all=2" in rp["value"], rp

    fix = f"pylvs realserver setup --fwd tun --vip {vip}"
    assert fix in tun["fix"]
    p = realserver(lab, rs, *fix.split()[2:])
    assert "net.ipv4.conf.all.rp_filter = 0 (was 2)" in p.stdout, p.stdout
    assert "has no address" in " ".join(p.stdout.split()), p.stdout
    rc, checks, _ = _until_ok(lab)
    assert rc == 0, [c for c in checks if c["verdict"] != "ok"]
    assert lab.curl("/whoami").returncode == 0
    st = json.loads(realserver(lab, rs, "status", "--json").stdout)
    assert all(c["verdict"] == "ok" for c in st["checks"]), st["checks"]
