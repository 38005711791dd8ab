"""`pylvs adm` command-line parsing: popt bundling, long options, ipvsadm's
option rules, error messages and exit statuses (no director needed)."""

from __future__ import annotations

import io

import pytest

from pylvs.cli import adm


def parse(*argv):
    return adm.parse_args(list(argv))


def op(*argv):
    return adm.to_op(parse(*argv))


def err(*argv):
    with pytest.raises(adm.AdmError) as ei:
        parse(*argv)
    return ei.value.code, str(ei.value)


# --- bundling and long options ----------------------------------------------

def test_bundled_list_numeric():
    c = parse("-Ln")
    assert c.cmd == "L" and c.options == ["numeric"]
    assert parse("-lnc").options == ["numeric", "connection"]


def test_bundled_command_with_argument_from_next_word():
    assert op("-At", "10.0.0.1:80") == op("-A", "-t", "10.0.0.1:80") == {
        "op": "add_service", "proto": "tcp", "vaddr": "10.0.0.1", "vport": 80,
        "sched": "wlc", "flags": [], "persistent": 0, "netmask": "255.255.255.255",
        "ops": False, "pe": ""}


def test_argument_attached_to_short_option_and_long_equals():
    assert op("-A", "-t10.0.0.1:80", "-srr")["sched"] == "rr"
    assert op("--add-service", "--tcp-service=10.0.0.1:80", "--scheduler=lc")["sched"] == "lc"


def test_add_server_all_forms():
    want = {"op": "add_dest", "proto": "tcp", "vaddr": "10.0.0.1", "vport": 80,
            "daddr": "10.0.1.2", "dport": 8080, "fwd": "masq", "weight": 3,
            "u_threshold": 0, "l_threshold": 0, "tun_type": "ipip", "tun_port": 0,
            "tun_flags": 0}
    assert op("-a", "-t", "10.0.0.1:80", "-r", "10.0.1.2:8080", "-m", "-w", "3") == want
    assert op("--add-server", "--tcp-service", "10.0.0.1:80", "--real-server",
              "10.0.1.2:8080", "--masquerading", "--weight", "3") == want
    assert op("-at", "10.0.0.1:80", "-r", "10.0.1.2:8080", "-mw", "3") == want


def test_real_server_port_defaults_to_service_port():
    assert op("-a", "-u", "10.0.0.1:53", "-r", "10.0.1.2", "-m")["dport"] == 53


def test_default_forwarding_is_gatewaying_and_forces_the_service_port():
    o = op("-a", "-t", "10.0.0.1:80", "-r", "10.0.1.2:8080")
    assert o["fwd"] == "route" and o["dport"] == 80
    o = op("-a", "-t", "10.0.0.1:80", "-r", "10.0.1.2:8080", "-i")
    assert o["fwd"] == "tunnel" and o["dport"] == 80
    assert op("-a", "-t", "10.0.0.1:80", "-r", "10.0.1.2:8080", "--gatewaying")["fwd"] == "route"
    assert op("-a", "-t", "10.0.0.1:80", "-r", "10.0.1.2:8080", "--ipip")["fwd"] == "tunnel"
    # -e as well: the dest is named with the service's port.
    o = op("-e", "-t", "10.0.0.1:80", "-r", "10.0.1.2:8080", "-g", "-w", "0")
    assert (o["op"], o["fwd"], o["dport"], o["weight"]) == ("edit_dest", "route", 80, 0)
    # Only NAT keeps the port it is given.
    assert op("-e", "-t", "10.0.0.1:80", "-r", "10.0.1.2:8080", "-m")["dport"] == 8080


def _tun(*extra):
    o = op("-a", "-t", "10.0.0.1:80", "-r", "10.0.2.5", *extra)
    return o["fwd"], o["tun_type"], o["tun_port"], o["tun_flags"]


def test_tunnel_options():
    assert _tun("-i") == ("tunnel", "ipip", 0, 0)
    assert _tun("-i", "--tun-type", "ipip") == ("tunnel", "ipip", 0, 0)
    assert _tun("-i", "--tun-type", "gue", "--tun-port", "6080") == ("tunnel", "gue", 6080, 0)
    assert _tun("--ipip", "--tun-type=gue", "--tun-port=1", "--tun-csum") == (
        "tunnel", "gue", 1, 1)
    assert _tun("-i", "--tun-remcsum", "--tun-port", "65535", "--tun-type", "gue") == (
        "tunnel", "gue", 65535, 2)
    assert _tun("-i", "--tun-type", "gue", "--tun-port", "7", "--tun-nocsum") == (
        "tunnel", "gue", 7, 0)
    # GRE parses as ipvsadm parses it; the director is the one to refuse it.
    assert _tun("-i", "--tun-type", "gre", "--tun-csum") == ("tunnel", "gre", 0, 1)
    assert _tun("-i", "--tun-type", "gre") == ("tunnel", "gre", 0, 0)
    o = op("-e", "-t", "10.0.0.1:80", "-r", "10.0.2.5", "-i", "--tun-type", "gue",
           "--tun-port", "6080", "--tun-csum")
    assert (o["op"], o["tun_type"], o["tun_port"], o["tun_flags"]) == ("edit_dest", "gue", 6080, 1)


A_TUN = ["-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8"]


@pytest.mark.parametrize("argv, msg", [
    (A_TUN + ["-i", "--tun-type", "vxlan"], "illegal tunnel type specified"),
    (A_TUN + ["-i", "--tun-type", "GUE"], "illegal tunnel type specified"),
    (A_TUN + ["-i", "--tun-type", "gue", "--tun-port", "0"], "illegal tunnel port specified"),
    (A_TUN + ["-i", "--tun-type", "gue", "--tun-port", "65536"], "illegal tunnel port specified"),
    (A_TUN + ["-i", "--tun-type", "gue", "--tun-port", "x"], "illegal tunnel port specified"),
    (A_TUN + ["-m", "--tun-type", "ipip"], "Tunnel options conflict with forward method"),
    (A_TUN + ["--tun-type", "gue", "--tun-port", "9"], "Tunnel options conflict with forward method"),
    (A_TUN + ["-g", "--tun-csum"], "Tunnel options conflict with forward method"),
    (A_TUN + ["-m", "--tun-port", "9"], "Tunnel options conflict with forward method"),
    (A_TUN + ["-i", "--tun-type", "gue"],
     "You need to supply the 'tun-port' option for the 'gue' tunnel type"),
    (A_TUN + ["-i", "--tun-type", "gue", "--tun-csum"],
     "You need to supply the 'tun-port' option for the 'gue' tunnel type"),
    (A_TUN + ["-i", "--tun-port", "6080"], "Illegal 'tun-port' option with the 'ipip' tunnel type"),
    (A_TUN + ["-i", "--tun-nocsum"], "Illegal 'tun-nocsum' option with the 'ipip' tunnel type"),
    (A_TUN + ["-i", "--tun-type", "ipip", "--tun-remcsum"],
     "Illegal 'tun-remcsum' option with the 'ipip' tunnel type"),
    (A_TUN + ["-i", "--tun-type", "gue", "--tun-port", "1", "--tun-csum", "--tun-nocsum"],
     "The option 'tun-csum' conflicts with the 'tun-nocsum' option in the 'gue' tunnel type"),
    (A_TUN + ["-i", "--tun-type", "gue", "--tun-port", "1", "--tun-remcsum", "--tun-csum"],
     "The option 'tun-remcsum' conflicts with the 'tun-csum' option in the 'gue' tunnel type"),
    (A_TUN + ["-i", "--tun-type", "gre", "--tun-port", "1"],
     "Illegal 'tun-port' option with the 'gre' tunnel type"),
    (A_TUN + ["-i", "--tun-type", "gre", "--tun-remcsum"],
     "Illegal 'tun-remcsum' option with the 'gre' tunnel type"),
    (A_TUN + ["-i", "--tun-type", "gue", "--tun-type", "gue"],
     "multiple 'tun-type' options specified"),
    (A_TUN + ["-i", "--tun-csum", "--tun-csum"], "multiple 'tun-csum' options specified"),
    (A_TUN + ["-i", "-m"], "multiple 'forwarding-method' options specified"),
    (["-A", "-t", "1.2.3.4:80", "--tun-type", "gue"],
     "Illegal 'tun-type' option with the 'add-service' command"),
    (["-d", "-t", "1.2.3.4:80", "-r", "5.6.7.8", "--tun-csum"],
     "Illegal 'tun-csum' option with the 'delete-server' command"),
    (["-L", "--tun-port", "1"], "Illegal 'tun-port' option with the 'list' command"),
])
def test_tunnel_option_errors(argv, msg):
    assert err(*argv) == (2, msg)


def test_list_tun_info():
    c = parse("-L", "-n", "--tun-info")
    assert adm._list_format(c) == "tun-info"
    # The other formats win, as in ipvsadm's print_title.
    assert adm._list_format(parse("-L", "--tun-info", "--stats")) == "stats"


def test_persistent_optional_argument():
    assert op("-A", "-t", "10.0.0.1:0", "-p")["persistent"] == 300
    assert op("-A", "-t", "10.0.0.1:0", "-p", "60")["persistent"] == 60
    assert op("-A", "-t", "10.0.0.1:0", "-p60")["persistent"] == 60
    assert op("-A", "-t", "10.0.0.1:0", "--persistent=90")["persistent"] == 90
    o = op("-A", "-t", "10.0.0.1:0", "-p", "-M", "255.255.255.0")
    assert o["persistent"] == 300 and o["netmask"] == "255.255.255.0"


def test_service_port_by_name_and_udp():
    o = op("-A", "-u", "10.0.0.1:domain", "-s", "rr")
    assert o["proto"] == "udp" and o["vport"] == 53


def test_edit_sends_every_attribute_as_ipvsadm_does():
    assert op("-E", "-t", "10.0.0.1:80") == {
        "op": "edit_service", "proto": "tcp", "vaddr": "10.0.0.1", "vport": 80,
        "sched": "wlc", "flags": [], "persistent": 0, "netmask": "255.255.255.255",
        "ops": False, "pe": ""}
    assert op("-e", "-t", "10.0.0.1:80", "-r", "10.0.1.2:80", "-m") == {
        "op": "edit_dest", "proto": "tcp", "vaddr": "10.0.0.1", "vport": 80,
        "daddr": "10.0.1.2", "dport": 80, "fwd": "masq", "weight": 1,
        "u_threshold": 0, "l_threshold": 0, "tun_type": "ipip", "tun_port": 0, "tun_flags": 0}


def test_other_commands():
    assert op("-D", "-t", "10.0.0.1:80") == {"op": "del_service", "proto": "tcp",
                                             "vaddr": "10.0.0.1", "vport": 80}
    assert op("-C") == {"op": "clear"}
    assert op("--clear") == {"op": "clear"}
    assert op("-d", "-t", "10.0.0.1:80", "-r", "10.0.1.2:81") == {
        "op": "del_dest", "proto": "tcp", "vaddr": "10.0.0.1", "vport": 80,
        "daddr": "10.0.1.2", "dport": 81}
    assert op("-Z") == {"op": "zero"}
    assert op("-Z", "-t", "10.0.0.1:80") == {"op": "zero", "proto": "tcp",
                                             "vaddr": "10.0.0.1", "vport": 80}
    assert op("--set", "900", "0", "60") == {"op": "set_timeouts", "tcp": 900,
                                             "tcpfin": 0, "udp": 60}
    assert op("-x", "5", "-y", "2", "-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8", "-m")[
        "u_threshold"] == 5


def test_list_variants():
    c = parse("-L", "-n", "--stats", "--exact", "--nosort")
    assert c.cmd == "L" and c.fmt == {"numeric", "stats", "exact", "nosort"}
    assert parse("--list", "--numeric", "--connection").has("connection")
    assert parse("-L", "--timeout").has("timeout")
    c = parse("-L", "-n", "-t", "10.0.0.1:80")
    assert c.has("service-address") and c.vport == 80
    assert parse("-S", "-n").cmd == "S"
    assert parse("--save").cmd == "S"
    assert parse("-L", "--sort").cmd == "L"
    assert parse().cmd == "L"  # plain `ipvsadm` lists


def test_sched_flags():
    o = op("-A", "-t", "10.0.0.1:80", "-s", "sh", "-b", "sh-fallback,sh-port")
    assert o["flags"] == ["sh-fallback", "sh-port"]
    assert err("-A", "-t", "10.0.0.1:80", "-b", "sh-port") == (
        2, "incompatible scheduler flag `sh-port'")
    assert err("-A", "-t", "10.0.0.1:80", "-b", "bogus") == (2, "invalid scheduler flag `bogus'")


def test_control_option():
    assert parse("--control", "/tmp/x.sock", "-Ln").control == "/tmp/x.sock"


# --- errors, as ipvsadm words them -------------------------------------------

@pytest.mark.parametrize("argv, code, msg", [
    (["--bogus"], 255, "--bogus: unknown option"),
    (["-Lk"], 255, "-Lk: unknown option"),
    (["-A", "-t"], 255, "-t: missing argument"),
    (["--clear=1"], 255, "--clear=1: option does not take an argument"),
    (["-n"], 255, "Try `pylvs adm -h' or 'pylvs adm --help' for more information."),
    (["-A", "-D", "-t", "1.2.3.4:80"], 2, "multiple commands specified"),
    (["-A", "-t", "1.2.3.4:80", "-t", "1.2.3.4:81"], 2, "multiple 'service-address' options specified"),
    (["-A"], 2, "You need to supply the 'service-address' option for the 'add-service' command"),
    (["-a", "-t", "1.2.3.4:80"], 2, "You need to supply the 'real-server' option for the 'add-server' command"),
    (["-A", "-t", "1.2.3.4:80", "-w", "2"], 2, "Illegal 'weight' option with the 'add-service' command"),
    (["-C", "-n"], 2, "Illegal 'numeric' option with the 'flush' command"),
    (["-L", "-c", "-t", "1.2.3.4:80"], 2,
     "The option 'service-address' conflicts with the 'connection' option in the 'list' command"),
    (["-L", "-c", "--stats"], 2, "options conflicts in the list command"),
    (["-L", "--timeout", "--persistent-conn"], 2, "options conflicts in the list command"),
    (["-L", "--daemon", "--persistent-conn"], 2, "options conflicts in the list command"),
    (["-A", "-t", "nosuch.invalid:80"], 2, "illegal virtual server address[:port] specified"),
    (["-A", "-t", "10.0.0.1:99999"], 2, "illegal virtual server address[:port] specified"),
    (["-A", "-t", "8080"], 2, "illegal virtual server address[:port] specified"),
    (["-a", "-t", "1.2.3.4:80", "-r", "1.2.3.4:x-no-such-port"], 2,
     "illegal real server address[:port] specified"),
    (["-A", "-t", "10.0.0.1"], 2, "Zero port specified for non-persistent service"),
    (["-A", "-t", "10.0.0.1:53", "-o"], 2, "One-Packet Scheduling is only for UDP virtual services"),
    (["-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8", "-w", "65536"], 2, "illegal weight specified"),
    (["-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8", "-w", "-1"], 2, "illegal weight specified"),
    (["-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8", "-x", "z"], 2, "illegal u_threshold specified"),
    (["-A", "-t", "1.2.3.4:0", "-p", "0"], 2, "invalid timeout value `0' specified"),
    (["-A", "-t", "1.2.3.4:0", "-p", "-M", "bogus.invalid"], 2,
     "illegal virtual server persistent mask specified"),
    (["--set", "1", "2"], 2, "--set option requires 3 timeout values"),
    (["--set", "1", "2", "x"], 2, "invalid timeout value `x' specified"),
    (["-L", "extra"], 2, "unexpected argument extra"),
    (["-A", "-f", "0"], 2, "invalid fwmark value `0' specified"),
    (["-a", "-f", "5", "-r", "10.0.1.11"], 2,
     "firewall-mark services (-f) are not supported yet: use -t or -u with the virtual "
     "address:port"),
    (["-a", "-t", "10.0.0.100:80", "-r", "10.0.0.100", "-g"], 255,
     "real server 10.0.0.100 is the virtual address itself: a real server needs an address "
     "of its own (its RIP) to be sent to; the director as its own real server (Local "
     "forwarding) is not supported yet"),
    (["-A", "-f", "5", "-s", "rr"], 2,
     "firewall-mark services (-f) are not supported yet: use -t or -u with the virtual "
     "address:port"),
    (["-A", "-t", "[::1]:80"], 2, "IPv6 is not supported yet"),
])
def test_errors(argv, code, msg):
    assert err(*argv) == (code, msg)


@pytest.mark.parametrize("argv, msg", [
    (["-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8", "-w", "\uff13"], "illegal weight specified"),
    (["-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8", "-x", "\u0661"], "illegal u_threshold specified"),
    (["-A", "-t", "10.0.0.100:\uff18\uff10"], "illegal virtual server address[:port] specified"),
    (["-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8:\u0668\u0660", "-m"],
     "illegal real server address[:port] specified"),
    (["-A", "-t", "1.2.3.4:80", "-p", "\u0663\u0660\u0660"],
     "invalid timeout value `\u0663\u0660\u0660' specified"),
    (["--set", "1", "2", "\uff13"], "invalid timeout value `\uff13' specified"),
    (["-A", "-f", "\u0661"], "invalid fwmark value `\u0661' specified"),
    (["-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8", "-w", "3 "], "illegal weight specified"),
])
def test_numbers_are_ascii_digits_only(argv, msg):
    """Python's int() takes any Unicode digit; ipvsadm's strtol does not."""
    assert err(*argv) == (2, msg)
    assert op("-a", "-t", "1.2.3.4:80", "-r", "5.6.7.8", "-w", " +3")["weight"] == 3


def test_ascii_int():
    from pylvs.control.text import ascii_int
    assert [ascii_int(s) for s in ("7", " -7 ", "+0", "007")] == [7, -7, 0, 7]
    assert [ascii_int(s) for s in ("", "+", "+-5", "--5", "7.0", "\u0667", "\uff17", "1_000",
                                   "7\u00a0", "0x7")] == [None] * 10


def test_main_prints_errors_without_traceback():
    out, e = io.StringIO(), io.StringIO()
    rc = adm.main(["-A", "-t", "10.0.0.1"], stdout=out, stderr=e)
    assert rc == 2
    assert e.getvalue() == "Zero port specified for non-persistent service\n"
    assert out.getvalue() == ""


def test_main_unreachable_director(tmp_path):
    e = io.StringIO()
    rc = adm.main(["--control", str(tmp_path / "none.sock"), "-L", "-n"],
                  stdout=io.StringIO(), stderr=e)
    assert rc == 2
    assert "Can't initialize ipvs" in e.getvalue() and "Traceback" not in e.getvalue()


def test_help_and_version_go_to_stdout():
    out = io.StringIO()
    assert adm.main(["-h"], stdout=out, stderr=io.StringIO()) == 0
    assert "--add-service" in out.getvalue()
    out = io.StringIO()
    assert adm.main(["--version"], stdout=out, stderr=io.StringIO()) == 0
    assert out.getvalue().startswith("pylvs adm")


# --- parse_restore (pylvs run -c FILE) ----------------------------------------

def test_parse_restore():
    text = ("# saved rules\n"
            "ipvsadm -A -t 10.0.0.1:80 -s wlc\n"
            "\n"
            "-a -t 10.0.0.1:80 -r 10.0.1.2:8080 -m -w 2\n"
            "-A -u 10.0.0.1:53 -s rr   # comment\n")
    assert adm.parse_rules(text) == [
        (2, op("-A", "-t", "10.0.0.1:80", "-s", "wlc")),
        (4, op("-a", "-t", "10.0.0.1:80", "-r", "10.0.1.2:8080", "-m", "-w", "2")),
        (5, op("-A", "-u", "10.0.0.1:53", "-s", "rr")),
    ]
    assert adm.parse_restore(text) == [op for _no, op in adm.parse_rules(text)]


def test_parse_restore_errors_name_the_line():
    with pytest.raises(adm.AdmError, match=r"^line 2: Zero port specified"):
        adm.parse_restore("-A -t 10.0.0.1:80\n-A -t 10.0.0.2\n")
    with pytest.raises(adm.AdmError, match=r"^line 1: not a rule command"):
        adm.parse_restore("-L -n\n")
    with pytest.raises(adm.AdmError):
        adm.parse_restore("-R\n")


def test_excerpt_cuts_and_escapes():
    from pylvs.control.text import excerpt, quoted
    assert excerpt("a" * 60) == "a" * 60 and excerpt("a" * 61) == "a" * 60 + "..."
    assert excerpt("x\udcff\x00\n\u2028é") == "x\\xff\\x00\\n\\u2028é"
    assert excerpt(b"\xff\xfeok") == "\\xff\\xfeok"
    assert quoted("nosuch") == "'nosuch'" and quoted(1.5) == "1.5" and quoted(None) == "None"
    assert err("-L", "x" * 1000)[1] == "unexpected argument " + "x" * 60 + "..."
