"""keepalived.conf, natively (issue 9, items 2 and 6): the REFERENCE sample
and real-world style configurations become the model with every timing
resolved, then the Balancer rules ipvsadm would hold; a reload applies
only the difference; bad input is refused naming file:line, never a
crash nor a hang."""

from __future__ import annotations

import asyncio
import os
import textwrap

import pytest

from pylvs.config import apply as config_apply
from pylvs.config import keepalived as ka
from pylvs.config.model import CheckSpec, SorryServer, UrlSpec
from pylvs.control import listing
from pylvs.control.balancer import Balancer, BalancerError
from pylvs.engine.tables import Counters


def write(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return str(p)


def parse(tmp_path, text: str, name: str = "keepalived.conf"):
    return ka.parse_file(write(tmp_path, name, text))


def balancer() -> Balancer:
    return Balancer(Counters(512, 1024))


def saved(b: Balancer) -> str:
    return listing.save(b.snapshot())


def apply_all(b: Balancer, loaded) -> list[str]:
    ops = config_apply.full_ops(loaded.services, loaded.timeouts)
    results = b.apply_many([op for op, _w in ops])
    return config_apply.errors(ops, results)


# --- the REFERENCE sample ---------------------------------------------------

REFERENCE = """\
virtual_server 10.10.10.2 80 {          # or: virtual_server fwmark 1 { ... }
    delay_loop 6
    lvs_sched wlc                        # lb_algo is an accepted synonym
    lvs_method NAT                       # NAT | DR | TUN; lb_kind is a synonym; default NAT
    protocol TCP
    persistence_timeout 50
    quorum 1
    hysteresis 0
    sorry_server 192.168.200.200 80
    real_server 192.168.200.2 80 {
        weight 1
        inhibit_on_failure               # weight 0 on failure instead of removal
        HTTP_GET { url { path /health status_code 200 } connect_timeout 3 retry 3 delay_before_retry 3 }
        TCP_CHECK { connect_port 80 connect_timeout 3 }
        MISC_CHECK { misc_path "/usr/local/bin/check" misc_timeout 5 misc_dynamic }
    }
}
"""


def test_reference_sample(tmp_path):
    path = write(tmp_path, "keepalived.conf", REFERENCE)
    cfg = ka.parse_file(path)
    assert cfg.files == (path,)
    # keepalived 2.2.7 reads one keyword a line (between braces) and drops
    # the rest silently (`keepalived -t` says nothing of a `status_code
    # 999` there): pylvs applies them, naming each.
    assert [(w.split(": ")[0], w.split(": ")[1]) for w in cfg.warnings] == [
        (f"{path}:13", "status_code"), (f"{path}:13", "retry"),
        (f"{path}:13", "delay_before_retry"), (f"{path}:14", "connect_timeout"),
        (f"{path}:15", "misc_timeout"), (f"{path}:15", "misc_dynamic")]
    assert cfg.warnings[0].endswith("after another keyword's value on its line: keepalived "
                                    "ignores it there, pylvs applies it")
    (vs,) = cfg.virtual_servers
    assert (vs.protocol, vs.vaddr, vs.vport, vs.fwmark) == ("TCP", "10.10.10.2", 80, 0)
    assert (vs.lvs_sched, vs.lvs_method, vs.persistence_timeout) == ("wlc", "NAT", 50)
    assert (vs.delay_loop, vs.quorum, vs.hysteresis) == (6.0, 1, 0)
    assert vs.sorry_server == SorryServer("192.168.200.200", 80, "NAT", False)
    assert str(vs.where) == f"{path}:1"
    (rs,) = vs.real_servers
    assert (rs.addr, rs.port, rs.weight, rs.inhibit_on_failure) == ("192.168.200.2", 80, 1, True)
    http, tcp, misc = rs.checks
    # Every timing resolved: the checker's own, else the virtual server's
    # delay_loop, else keepalived's defaults (warmup: delay_loop; MISC
    # retry 0; delay_before_retry 1 s outside HTTP).
    assert http == CheckSpec("HTTP_GET", delay_loop=6.0, connect_timeout=3.0, retry=3,
                             delay_before_retry=3.0, warmup=6.0,
                             urls=(UrlSpec("/health", frozenset({200})),))
    assert tcp == CheckSpec("TCP_CHECK", delay_loop=6.0, connect_timeout=3.0, retry=1,
                            delay_before_retry=1.0, warmup=6.0, connect_port=80)
    assert misc == CheckSpec("MISC_CHECK", delay_loop=6.0, connect_timeout=5.0, retry=0,
                             delay_before_retry=1.0, warmup=6.0,
                             misc_path="/usr/local/bin/check", misc_timeout=5.0,
                             misc_dynamic=True)
    assert str(misc.where) == f"{path}:15"
    b = balancer()
    assert apply_all(b, config_apply.from_keepalived(cfg)) == []
    assert saved(b) == ("-A -t 10.10.10.2:80 -s wlc -p 50\n"
                        "-a -t 10.10.10.2:80 -r 192.168.200.2:80 -m -w 1\n")


# --- real-world style configurations ----------------------------------------

DR_PERSIST = """\
! Configuration File for keepalived
global_defs {
   notification_email {
     admin@example.com
   }
   router_id LVS_DEVEL
}

vrrp_instance VI_1 {
    state MASTER
    interface eth0
    virtual_router_id 51
    priority 150
    advert_int 1
    authentication {
        auth_type PASS
        auth_pass 1111
    }
    virtual_ipaddress {
        192.168.1.100/24 dev eth0
    }
}

virtual_server 192.168.1.100 443
{
    delay_loop 10
    lb_algo sh                     ! keepalived 1.x spelling
    lb_kind DR
    persistence_timeout
    persistence_granularity 255.255.255.0
    sh-port
    sh-fallback
    protocol TCP
    real_server 192.168.1.11 443 {
        weight 3
        uthreshold 1000
        lthreshold 200
        SSL_GET {
            url {
              path "/status page"
              digest 9B3A0C85A887A256D6939DA88AABD8CD
              status_code 200-204 301
            }
            connect_timeout 2
            nb_get_retry 2
        }
    }
    real_server 192.168.1.12 443 {
        weight 1
        TCP_CHECK {
            connect_timeout 2
        }
    }
}
"""


def test_dr_with_persistence_and_keepalived_1_spellings(tmp_path):
    cfg = parse(tmp_path, DR_PERSIST)
    (vs,) = cfg.virtual_servers
    assert (vs.lvs_sched, vs.lvs_method) == ("sh", "DR")
    assert vs.persistence_timeout == 360          # persistence_timeout without a value
    assert vs.persistence_granularity == "255.255.255.0"
    assert vs.sched_flags == ("sh-fallback", "sh-port")
    rs1, rs2 = vs.real_servers
    assert (rs1.weight, rs1.uthreshold, rs1.lthreshold, rs1.lvs_method) == (3, 1000, 200, "DR")
    (ssl,) = rs1.checks
    assert (ssl.kind, ssl.retry, ssl.connect_timeout, ssl.delay_loop) == ("SSL_GET", 2, 2.0, 10.0)
    assert ssl.delay_before_retry == 3.0           # HTTP_GET/SSL_GET's default
    (url,) = ssl.urls
    assert url.path == "/status page" and url.digest == "9b3a0c85a887a256d6939da88aabd8cd"
    assert url.status_codes == frozenset({200, 201, 202, 203, 204, 301})
    assert cfg.vrrp_instances == ("VI_1",)
    assert [w.split(": ", 2)[1] for w in cfg.warnings] == ["global_defs", "vrrp_instance"]
    assert cfg.warnings[1].startswith(f"{tmp_path}/keepalived.conf:9: vrrp_instance:")
    b = balancer()
    assert apply_all(b, config_apply.from_keepalived(cfg)) == []
    assert saved(b) == (
        "-A -t 192.168.1.100:443 -s sh -p 360 -M 255.255.255.0 -b sh-fallback,sh-port\n"
        "-a -t 192.168.1.100:443 -r 192.168.1.11:443 -g -w 3\n"
        "-a -t 192.168.1.100:443 -r 192.168.1.12:443 -g -w 1\n")
    d = b.snapshot()["services"][0]["dests"][1]     # newest first, as the kernel lists
    assert (d["daddr"], d["u_threshold"], d["l_threshold"]) == ("192.168.1.11", 1000, 200)


TUN_MIXED = """\
virtual_server 10.0.0.50 80 {
    protocol TCP
    lvs_sched wrr
    lvs_method TUN type gue port 6080 csum
    real_server 10.1.0.1 80 { weight 2 }
    real_server 10.1.0.2 80 {
        lvs_method TUN
    }
    real_server 10.1.0.3 8080 {    # NAT may remap the port
        lvs_method NAT
        weight 5
    }
    real_server 10.1.0.4 8080 {    # DR takes the service's port (keepalived resets it)
        lvs_method DR
        PING_CHECK { delay_loop 2 }
    }
}
virtual_server 10.0.0.50 53 {
    protocol UDP
    ops
    lvs_sched rr
    real_server 10.1.0.1 53 {
        UDP_CHECK {
            payload 00 01 Ab12f
            require_reply 00
            min_reply_length 2
        }
    }
}
"""


def test_tunnel_methods_per_real_server(tmp_path):
    cfg = parse(tmp_path, TUN_MIXED)
    web, dns = cfg.virtual_servers
    gue, ipip, nat, dr = web.real_servers
    assert (gue.lvs_method, gue.tun_type, gue.tun_port, gue.tun_flags) == ("TUN", "gue", 6080,
                                                                          "csum")
    assert (ipip.lvs_method, ipip.tun_type, ipip.tun_port) == ("TUN", "ipip", 0)
    assert (nat.lvs_method, nat.port, dr.lvs_method, dr.port) == ("NAT", 8080, "DR", 80)
    assert cfg.warnings == (f"{tmp_path}/keepalived.conf:13: real_server: port 8080 is not the "
                            "service's 80: DR takes the service's, as keepalived resets it",)
    (ping,) = dr.checks
    assert (ping.kind, ping.delay_loop, ping.warmup) == ("PING_CHECK", 2.0, 2.0)
    (udp,) = dns.real_servers[0].checks
    assert udp.payload == bytes([0x00, 0x01, 0xAB, 0x12, 0x0F])
    assert (udp.require_reply, udp.min_reply_length, udp.max_reply_length) == (b"\0", 2, 255)
    assert dns.ops and dns.protocol == "UDP"
    b = balancer()
    assert apply_all(b, config_apply.from_keepalived(cfg)) == []
    assert saved(b) == (
        "-A -t 10.0.0.50:80 -s wrr\n"
        "-a -t 10.0.0.50:80 -r 10.1.0.1:80 -i -w 2 --tun-type gue --tun-port 6080 --tun-csum\n"
        "-a -t 10.0.0.50:80 -r 10.1.0.2:80 -i -w 1 --tun-type ipip\n"
        "-a -t 10.0.0.50:80 -r 10.1.0.3:8080 -m -w 5\n"
        "-a -t 10.0.0.50:80 -r 10.1.0.4:80 -g -w 1\n"
        "-A -u 10.0.0.50:53 -s rr -o\n"
        "-a -u 10.0.0.50:53 -r 10.1.0.1:53 -m -w 1\n")


SHARED = """\
virtual_server_group WEB {
    10.0.0.10-11 80
    10.0.0.20 8080
}
virtual_server group WEB {
    protocol TCP
    lvs_sched lc
    delay_loop 3
    retry 4                          # inherited by every checker below
    real_server 10.2.0.1 80 {
        HTTP_GET {
            url { path / }
            url {
                path /ready
                regex "^ok"
                regex_no_match
            }
        }
    }
    real_server 10.2.0.2 80 {
        delay_loop 1                 # the real server's own
        TCP_CHECK { }
    }
}
virtual_server 10.0.0.30 443 {
    protocol TCP
    real_server 10.2.0.1 443 { TCP_CHECK { connect_port 80 } }
    real_server 10.2.0.2 443 { TCP_CHECK { connect_port 80 } }
}
"""


def test_several_virtual_servers_share_real_servers(tmp_path):
    cfg = parse(tmp_path, SHARED)
    keys = [vs.key for vs in cfg.virtual_servers]
    assert keys == [("TCP", "10.0.0.10", 80, 0), ("TCP", "10.0.0.11", 80, 0),
                    ("TCP", "10.0.0.20", 8080, 0), ("TCP", "10.0.0.30", 443, 0)]
    g1 = cfg.virtual_servers[0]
    http = g1.real_servers[0].checks[0]
    assert (http.retry, http.delay_loop) == (4, 3.0)
    assert [u.path for u in http.urls] == ["/", "/ready"]
    assert http.urls[1].regex == "^ok" and http.urls[1].regex_no_match
    assert g1.real_servers[1].checks[0].delay_loop == 1.0
    # NAT real servers keep their port in every member of the group.
    third = cfg.virtual_servers[2]
    assert [rs.port for rs in third.real_servers] == [80, 80]
    assert cfg.warnings == ()
    # The same checker on the same real server in two services: equal specs
    # (the health manager runs one probe for them).
    s443 = cfg.virtual_servers[3]
    assert s443.real_servers[0].checks[0] == s443.real_servers[1].checks[0]
    b = balancer()
    assert apply_all(b, config_apply.from_keepalived(cfg)) == []
    assert saved(b).count("-A ") == 4 and saved(b).count("-a ") == 8


def test_includes_with_globs_braces_and_relative_paths(tmp_path):
    main = write(tmp_path, "etc/keepalived.conf", """\
        include conf.d/*.conf
        include {extra,more}/vs.conf
        include "empty/*.conf"
    """)
    write(tmp_path, "etc/conf.d/b.conf", """\
        virtual_server 10.0.0.2 80 { real_server 10.1.0.2 80 { } }
    """)
    write(tmp_path, "etc/conf.d/a.conf", """\
        virtual_server 10.0.0.1 80 {
            include ../rs/*.inc
        }
    """)
    write(tmp_path, "etc/rs/one.inc", "real_server 10.1.0.1 80 { weight 7 }\n")
    write(tmp_path, "etc/extra/vs.conf", "virtual_server 10.0.0.3 80 { real_server 10.1.0.3 80 { } }\n")
    write(tmp_path, "etc/more/vs.conf", "virtual_server 10.0.0.4 80 { bogus_keyword }\n")
    with pytest.raises(ka.ConfigError) as ei:
        ka.parse_file(main)
    assert str(ei.value) == (f"{tmp_path}/etc/more/vs.conf:1: unknown keyword 'bogus_keyword' "
                             "in virtual_server")
    write(tmp_path, "etc/more/vs.conf", "virtual_server 10.0.0.4 80 {\n"
                                        " protocol TCP\n real_server 10.1.0.4 80 { }\n}\n")
    cfg = ka.parse_file(main)
    assert [vs.vaddr for vs in cfg.virtual_servers] == ["10.0.0.1", "10.0.0.2", "10.0.0.3",
                                                        "10.0.0.4"]
    assert cfg.virtual_servers[0].real_servers[0].weight == 7
    assert len(cfg.files) == 6
    assert cfg.warnings[0] == f"{main}:3: include empty/*.conf: no file matches"
    assert [w.split(": ", 2)[1] for w in cfg.warnings[1:]] == ["virtual_server"] * 3  # no protocol


def test_an_include_glob_skips_directories_as_keepalived_does(tmp_path):
    """`include conf.d/*` where conf.d holds a subdirectory (an old/,
    a checkout): keepalived logs "is a directory - skipping" and runs the
    files; pylvs reads the same files and names the directory skipped."""
    main = write(tmp_path, "keepalived.conf", "include conf.d/*\ninclude conf.d/old\n")
    write(tmp_path, "conf.d/web.conf", "virtual_server 10.0.0.1 80 {\n"
                                       " protocol TCP\n real_server 10.1.0.1 80 { }\n}\n")
    write(tmp_path, "conf.d/old/web.conf", "virtual_server 10.0.0.1 80 { }\n")
    cfg = ka.parse_file(main)
    assert [(vs.vaddr, vs.vport) for vs in cfg.virtual_servers] == [("10.0.0.1", 80)]
    assert cfg.files == (main, f"{tmp_path}/conf.d/web.conf")
    skipped = f"{tmp_path}/conf.d/old is a directory: skipped, as keepalived skips it"
    assert cfg.warnings == (f"{main}:1: include conf.d/*: {skipped}",
                            f"{main}:2: include conf.d/old: {skipped}")


def test_an_included_file_cut_short_is_named_where_its_block_opened(tmp_path):
    """conf.d/10-web.conf cut in the middle of a url block (a write cut
    short): the parse goes on into the next file, as keepalived's does (a
    block may span files), and fails there; the error names the block left
    open in the file that was cut."""
    main = write(tmp_path, "keepalived.conf", "include conf.d/*.conf\n")
    write(tmp_path, "conf.d/10-web.conf", "virtual_server 10.0.0.1 80 {\n protocol TCP\n"
                                          " real_server 10.1.0.1 80 {\n  HTTP_GET {\n"
                                          "   url {\n    path /health\n")
    write(tmp_path, "conf.d/20-api.conf", "virtual_server 10.0.0.1 81 {\n protocol TCP\n"
                                          " real_server 10.1.0.1 81 { }\n}\n")
    with pytest.raises(ka.ConfigError) as e:
        ka.parse_file(main)
    assert str(e.value) == (
        f"{tmp_path}/conf.d/20-api.conf:1: unknown keyword 'virtual_server' in url (the block "
        f"of 'url' opened at {tmp_path}/conf.d/10-web.conf:5 is not closed in its file)")


# As an operator's lb01 has it: the protocol in lower case (keepalived 2.2
# compares it with strcasecmp), quoted values, a group with a range.
LB01 = """\
global_defs {
   notification_email {
     "noc team <noc@example.com>"
   }
   router_id LVS_DEVEL
   lvs_timeouts tcp 7200 udp 300
}
vrrp_instance VI_1 {
    state MASTER
    interface eth0
    virtual_router_id 51
    virtual_ipaddress {
        10.0.0.100/24 dev eth0 label eth0:vip
    }
}
virtual_server_group WEB {
    10.0.0.100 80
    10.0.0.101-102 80     # spare VIPs
}
virtual_server group WEB {
    lb_algo wrr
    lb_kind NAT
    protocol tcp
    real_server 10.0.1.11 80 {
        weight "3"
        HTTP_GET {
            url {
              path "/health"
              status_code 200
            }
            connect_timeout 3
        }
    }
}
virtual_server "10.0.0.100" 53 {
    protocol Udp
    real_server 10.0.1.11 53 {
    }
}
"""


def test_an_operator_s_configuration_moves_over(tmp_path):
    loaded = config_apply.from_keepalived(parse(tmp_path, LB01))
    assert loaded.warnings[0] == (f"{tmp_path}/keepalived.conf:1: global_defs: ignored but for "
                                  "lvs_timeouts (pylvs does not run it)")
    b = balancer()
    before = b.timeouts()
    assert apply_all(b, loaded) == []
    # global_defs' lvs_timeouts are LVS configuration: applied as ipvsadm
    # --set 7200 0 300 (0: unchanged).
    assert b.timeouts() == {**before, "tcp": 7200, "udp": 300}
    # A reload that changes them sends them alone; one that drops them
    # leaves the director's as they are (keepalived sets, never resets).
    new = config_apply.from_keepalived(parse(tmp_path, LB01.replace("udp 300", "udp 60")))
    sent, errs = reload_into(b, loaded, new)
    assert errs == [] and sent == [{"op": "set_timeouts", "tcp": 7200, "tcpfin": 0, "udp": 60}]
    gone = config_apply.from_keepalived(parse(tmp_path, LB01.replace("lvs_timeouts", "! ")))
    assert reload_into(b, new, gone) == ([], [])
    assert b.timeouts() == {**before, "tcp": 7200, "udp": 60}
    assert saved(b) == "".join(
        f"-A -t 10.0.0.{n}:80 -s wrr\n-a -t 10.0.0.{n}:80 -r 10.0.1.11:80 -m -w 3\n"
        for n in (100, 101, 102)) + ("-A -u 10.0.0.100:53 -s wlc\n"
                                     "-a -u 10.0.0.100:53 -r 10.0.1.11:53 -m -w 1\n")
    # What keepalived itself does not take, pylvs refuses (keepalived logs
    # it and runs the service with NAT and wlc instead).
    for good, bad, line in (("lb_kind NAT", "lb_kind dr", 22), ("lb_algo wrr", "lb_algo WRR", 21),
                            ("tcp 7200", "tcp 7200 sctp 5", 6), ("udp 300", "udp", 6)):
        with pytest.raises(ka.ConfigError, match=rf":{line}: (lb_kind: .*'dr'|lb_algo: .*'WRR'"
                                                 r"|lvs_timeouts: unknown option 'sctp'"
                                                 r"|lvs_timeouts: udp takes a number)"):
            parse(tmp_path, LB01.replace(good, bad))


KEEPALIVED = "/usr/sbin/keepalived"


@pytest.mark.skipif(not os.path.exists(KEEPALIVED), reason="keepalived not installed (make)")
@pytest.mark.parametrize("name", ["REFERENCE", "DR_PERSIST", "TUN_MIXED", "SHARED", "BASE",
                                  "LB01"])
def test_the_sample_configurations_are_keepalived_s_own(tmp_path, name):
    """keepalived 2.2.7 itself (`keepalived -t`) reads each sample without
    a config error: they are configurations an operator has, not ones
    only pylvs accepts."""
    import re
    import subprocess

    path = write(tmp_path, "keepalived.conf", globals()[name])
    p = subprocess.run([KEEPALIVED, "-t", "-l", "-f", path], capture_output=True, text=True,
                       timeout=30)
    said = p.stdout + p.stderr
    errors = [ln for ln in said.splitlines()
              if re.search(r"Line \d+\)", ln) and "deprecated" not in ln]
    assert not errors, said   # (its exit status counts its notes: no default scheduler, ...)


def _vs(body: str = "", real: str = "", check: str = "TCP_CHECK", check_body: str = "") -> str:
    return (f"virtual_server 10.0.0.1 80 {{\n protocol TCP\n lb_algo rr\n{body}"
            f" real_server 10.1.0.1 80 {{\n{real}  {check} {{\n{check_body}  }}\n }}\n}}\n")


# What keepalived 2.2.7 reads and drops, logging the line ("invalid",
# "ignoring", "Unknown keyword"): pylvs never applies it silently either,
# it refuses the file or names the line in a warning.
KEEPALIVED_DROPS = [
    ("retry 0 in a real server", _vs(real="  retry 0\n"), 5),
    ("retry 0 in a virtual server", _vs(body=" retry 0\n"), 4),
    ("nb_get_retry in TCP_CHECK", _vs(check_body="   nb_get_retry 3\n"), 6),
    ("connect_port 0", _vs(check_body="   connect_port 0\n"), 6),
    ("misc_timeout 1.5", _vs(check="MISC_CHECK",
                             check_body="   misc_path /bin/true\n   misc_timeout 1.5\n"), 7),
    ("connect_timeout in MISC_CHECK", _vs(check="MISC_CHECK", check_body=(
        "   misc_path /bin/true\n   connect_timeout 2\n")), 7),
    ("sh-port before lb_algo sh", _vs(body=" sh-port\n lb_algo sh\n"), 4),
    ("sorry options before sorry_server", _vs(
        body=" sorry_server_inhibit\n sorry_server 10.1.0.9 80\n"), 4),
    ("group range end past 255", "virtual_server_group G {\n 10.0.0.1-300 80\n}\n"
     + _vs().replace("10.0.0.1 80", "group G", 1), 2),
    ("lowercase lb_kind", _vs(body=" lb_kind dr\n"), 4),
    ("misspelt keyword", _vs(body=" persistance_timeout 5\n"), 4),
    ("persistence_timeout 0", _vs(body=" persistence_timeout 0\n"), 4),
    # No line continues on the next: a trailing backslash stays in the line,
    # a comment's too (keepalived: "Invalid lvs_scheduler 'wrr\\'").
    ("a comment ending in a backslash", _vs(body=" lb_algo wrr  # see C:\\\n"
                                              " persistence_timeout 60\n"), 4),
    ("a line ending in a backslash", _vs(real="  weight 2\\\n  inhibit_on_failure\n"), 5),
]


@pytest.mark.skipif(not os.path.exists(KEEPALIVED), reason="keepalived not installed (make)")
@pytest.mark.parametrize("text,line", [(t, n) for _d, t, n in KEEPALIVED_DROPS],
                         ids=[d for d, _t, _n in KEEPALIVED_DROPS])
def test_what_keepalived_drops_pylvs_refuses_or_names(tmp_path, text, line):
    import subprocess

    path = write(tmp_path, "keepalived.conf", text)
    p = subprocess.run([KEEPALIVED, "-t", "-l", "-f", path], capture_output=True, text=True,
                       timeout=30)
    assert f"Line {line})" in p.stdout + p.stderr, p.stdout + p.stderr
    try:
        cfg = ka.parse_file(path)
    except ka.ConfigError as e:
        assert str(e).startswith(f"{path}:{line}: "), str(e)
    else:
        assert any(w.startswith(f"{path}:{line}: ") for w in cfg.warnings), cfg.warnings


@pytest.mark.skipif(not os.path.exists(KEEPALIVED), reason="keepalived not installed (make)")
def test_keepalived_only_logs_a_misspelt_keyword_pylvs_refuses_it(tmp_path):
    import subprocess

    path = write(tmp_path, "keepalived.conf", BASE.replace("lvs_sched rr", "lvs_shed rr"))
    p = subprocess.run([KEEPALIVED, "-t", "-l", "-f", path], capture_output=True, text=True,
                       timeout=30)
    assert "Unknown keyword 'lvs_shed'" in p.stdout + p.stderr   # a note; it would run
    with pytest.raises(ka.ConfigError, match=r":3: unknown keyword 'lvs_shed' in virtual_server"):
        ka.parse_file(path)


# --- warnings: one per block or keyword pylvs does not act on ----------------

def test_one_warning_per_unimplemented_block_or_keyword(tmp_path):
    cfg = parse(tmp_path, """\
        global_defs { router_id X }
        vrrp_script chk { script "/bin/true" }
        vrrp_instance A { state BACKUP }
        vrrp_instance B { state BACKUP }
        track_group TG { group { A } }
        interface_up_down_delays { eth0 1 }
        child_wait_time 10
        virtual_server 10.0.0.1 80 {
            protocol TCP
            ha_suspend
            smtp_alert
            real_server 10.1.0.1 80 {
                DNS_CHECK { type A name example.com }
                MISC_CHECK {
                    misc_path "/bin/check arg"
                    user nobody
                }
            }
        }
    """)
    names = [(w.split(": ")[0].rsplit(":", 1)[1], w.split(": ")[1]) for w in cfg.warnings]
    assert names == [("1", "global_defs"), ("2", "vrrp_script"), ("3", "vrrp_instance"),
                     ("4", "vrrp_instance"), ("5", "track_group"),
                     ("6", "interface_up_down_delays"), ("7", "child_wait_time"),
                     ("10", "ha_suspend"), ("11", "smtp_alert"), ("13", "DNS_CHECK"),
                     ("16", "user")]
    assert cfg.vrrp_instances == ("A", "B")
    # A real server whose only checker is not run is always in: said.
    assert cfg.warnings[9].endswith(": DNS_CHECK: ignored (a checker pylvs does not run: it "
                                    "never takes the real server out)")
    # The same file given to a whole keepalived would make its checkers
    # program the kernel's IPVS next to pylvs: the warning says how not to.
    assert "run `keepalived -P` (VRRP only" in cfg.warnings[2]
    misc = cfg.virtual_servers[0].real_servers[0].checks
    assert [c.misc_path for c in misc] == ["/bin/check arg"]



def test_lvs_keywords_of_global_defs_and_vrrp_are_named_each(tmp_path):
    """keepalived starts the IPVS sync daemon from global_defs'
    lvs_sync_daemon (or a vrrp_instance's old lvs_sync_daemon_interface);
    pylvs starts its own apart: an operator moving the file must read that
    in a warning of its own, not only "global_defs: ignored"."""
    cfg = parse(tmp_path, """\
        global_defs {
            router_id LVS_1
            lvs_sync_daemon eth1 VI_1 id 5 maxlen 1400
            lvs_timeouts tcp 900
            lvs_notify_fifo /run/keepalived.fifo
        }
        vrrp_instance VI_1 {
            interface eth0
            lvs_sync_daemon_interface eth1
        }
    """)
    named = [w.split(": ")[1] for w in cfg.warnings]
    assert named == ["global_defs", "lvs_sync_daemon", "lvs_notify_fifo", "vrrp_instance",
                     "lvs_sync_daemon_interface"]
    assert cfg.warnings[1].endswith("--start-daemon master --start-daemon backup "
                                    "--mcast-interface eth1 --syncid 5 --sync-maxlen 1400)"), cfg.warnings[1]
    assert "remove it from the file keepalived reads" in cfg.warnings[1]
    assert cfg.warnings[4].endswith("--mcast-interface eth1 --syncid 0)"), cfg.warnings[4]
    assert cfg.lvs_timeouts == (900, 0, 0)



def test_sh_and_mh_flags_count_only_after_their_scheduler(tmp_path):
    """keepalived 2.2.7 (`keepalived -t`: "sh-port only applies to sh
    scheduler - ignoring") drops sh-/mh- flags read before lvs_sched sh or
    mh: the same file hashes the same way under pylvs."""
    cfg = parse(tmp_path, """\
        virtual_server 10.0.0.1 80 {
            protocol TCP
            sh-port
            lb_algo sh
            sh-fallback
            flag-3
            real_server 10.1.0.1 80 { }
        }
        virtual_server 10.0.0.2 80 {
            protocol TCP
            mh-port
            real_server 10.1.0.1 80 { }
        }
    """)
    first, second = cfg.virtual_servers
    assert first.sched_flags == ("flag-3", "sh-fallback") and second.sched_flags == ()
    assert [w.split(": ", 1)[0].rsplit(":", 1)[1] for w in cfg.warnings] == ["3", "11"]
    assert all("only after lvs_sched sh or mh" in w for w in cfg.warnings)



def test_sorry_server_options_before_the_sorry_server_are_dropped(tmp_path):
    """keepalived applies sorry_server_lvs_method and sorry_server_inhibit
    to the sorry server read so far ("sorry_server forwarding used without
    sorry_server"): before it they change nothing, in pylvs too."""
    cfg = parse(tmp_path, """\
        virtual_server 10.0.0.1 80 {
            protocol TCP
            sorry_server_lvs_method DR
            sorry_server_inhibit
            sorry_server 10.1.0.9 8080
            real_server 10.1.0.1 80 { }
        }
    """)
    sorry = cfg.virtual_servers[0].sorry_server
    assert (sorry.lvs_method, sorry.port, sorry.inhibit) == ("NAT", 8080, False)
    assert [w.split(": ", 1)[0].rsplit(":", 1)[1] for w in cfg.warnings] == ["3", "4"]



def test_a_persistence_granularity_makes_the_service_persistent(tmp_path):
    """keepalived 2.2.7 gives a service with persistence_granularity and no
    persistence_timeout its default timeout (`keepalived -t` says nothing of
    a port 0 service with only a granularity): persistent, 360 s, as -p -M."""
    cfg = parse(tmp_path, """\
        virtual_server 10.0.0.1 443 {
            protocol TCP
            persistence_granularity 255.255.255.0
            real_server 10.1.0.1 443 { }
        }
        virtual_server 10.0.0.2 443 {
            protocol TCP
            persistence_granularity 24
            persistence_timeout 50
            real_server 10.1.0.1 443 { }
        }
        virtual_server 10.0.0.3 443 {
            protocol TCP
            persistence_granularity 255.255.0.0
            persistence_timeout 0
            real_server 10.1.0.1 443 { }
        }
        virtual_server 10.0.0.4 443 {
            protocol TCP
            persistence_timeout 0
            real_server 10.1.0.1 443 { }
        }
    """)
    first, second, third, fourth = cfg.virtual_servers
    assert (first.persistence_timeout, first.persistence_granularity) == (360, "255.255.255.0")
    assert (second.persistence_timeout, second.persistence_granularity) == (50, "255.255.255.0")
    # `persistence_timeout 0` (operators write it for "none"): keepalived
    # logs it invalid and keeps what it had; named in a warning here.
    assert third.persistence_timeout == 360 and fourth.persistence_timeout == 0
    assert [w.split(": ", 1)[0].rsplit(":", 1)[1] for w in cfg.warnings] == ["15", "20"]
    b = balancer()
    assert apply_all(b, config_apply.from_keepalived(cfg)) == []
    assert saved(b).splitlines()[0] == "-A -t 10.0.0.1:443 -s wlc -p 360 -M 255.255.255.0"



def test_a_dual_stack_file_moves_over_with_its_ipv4_services(tmp_path):
    """keepalived's IPv6 virtual servers (doc/samples' IPv6 sample has a
    group of them): pylvs is IPv4 only, so each is named with its line and
    skipped, as a fwmark service is, and the IPv4 services apply."""
    path = write(tmp_path, "keepalived.conf", """\
        virtual_server_group V6 {
            ae00::2-9 80
            10.0.0.2 80
        }
        virtual_server ae00::1 80 {
            protocol TCP
            real_server ae00::10 80 { weight 1 }
        }
        virtual_server group V6 {
            protocol TCP
            real_server 10.1.0.1 80 { }
        }
        virtual_server 10.0.0.1 80 {
            protocol TCP
            real_server 10.1.0.1 80 { }
        }
    """)
    loaded = config_apply.load(path)
    assert list(loaded.services) == [("tcp", "10.0.0.2", 80, 0), ("tcp", "10.0.0.1", 80, 0)]
    assert loaded.refused == [
        f"{path}:2: virtual_server_group V6 member ae00::2-9: IPv6 services are not supported "
        "by pylvs (IPv4 only); skipped",
        f"{path}:5: virtual_server ae00::1 80: IPv6 services are not supported by pylvs "
        "(IPv4 only); skipped"]


CORRECTED = """\
virtual_server 10.0.0.1 80 {
    ops
}
virtual_server 10.0.0.2 0 {
    ops
    quorum 5
    hysteresis 2
    lvs_method DR
    real_server 10.1.0.1 80 { weight 2 }
    real_server 10.1.0.1 { weight 3 }
    real_server 10.1.0.2 8080 { lvs_method NAT }
    sorry_server 10.1.0.9 8080
}
"""


def test_what_keepalived_corrects_is_corrected_and_named(tmp_path):
    """keepalived's validate_check_config() corrections, made the same way
    with a warning each: no real servers (ignored), no protocol (UDP), ops
    without UDP... (here UDP, kept), port 0 without persistence (360 s), a
    DR real server's port (the service's), a duplicate real server (the
    second ignored), quorum above the total weight, hysteresis not below
    quorum; a DR sorry server takes the service's port."""
    cfg = parse(tmp_path, CORRECTED)
    conf = f"{tmp_path}/keepalived.conf"
    (vs,) = cfg.virtual_servers
    assert (vs.protocol, vs.ops, vs.vport, vs.persistence_timeout) == ("UDP", True, 0, 360)
    assert [(rs.addr, rs.port, rs.weight, rs.lvs_method) for rs in vs.real_servers] == [
        ("10.1.0.1", 0, 2, "DR"), ("10.1.0.2", 8080, 1, "NAT")]
    assert (vs.quorum, vs.hysteresis) == (3, 2)
    assert (vs.sorry_server.port, vs.sorry_server.lvs_method) == (0, "DR")
    assert cfg.warnings == (
        f"{conf}:1: virtual_server: no real servers: ignored, as keepalived ignores it",
        f"{conf}:4: virtual_server: no protocol: UDP, as keepalived sets it (the kernel's "
        "default); say protocol TCP for TCP",
        f"{conf}:4: virtual_server: a port 0 service must be persistent: persistence_timeout "
        "360, as keepalived sets it",
        f"{conf}:9: real_server: port 80 is not the service's 0: DR takes the service's, as "
        "keepalived resets it",
        f"{conf}:10: real_server: 10.1.0.1 0 already defined at {conf}:9: this one ignored, "
        "as keepalived ignores it",
        f"{conf}:4: virtual_server: quorum 5 above the real servers' total weight 3: 3, as "
        "keepalived sets it")
    b = balancer()
    assert apply_all(b, config_apply.from_keepalived(cfg)) == []
    assert saved(b) == ("-A -u 10.0.0.2:0 -s wlc -p 360 -o\n"
                        "-a -u 10.0.0.2:0 -r 10.1.0.1:0 -g -w 2\n"
                        "-a -u 10.0.0.2:0 -r 10.1.0.2:8080 -m -w 1\n")
    text = CORRECTED.replace("virtual_server 10.0.0.2 0 {", "virtual_server 10.0.0.2 0 {\n"
                             "    protocol TCP").replace("hysteresis 2", "hysteresis 4")
    cfg = parse(tmp_path, text, "tcp.conf")
    assert not cfg.virtual_servers[0].ops and cfg.virtual_servers[0].hysteresis == 2
    assert any("hysteresis 4 not below quorum 3: 2" in w for w in cfg.warnings)
    assert any("ops (one-packet scheduling) needs UDP: cleared" in w for w in cfg.warnings)


# --- bad input: file:line, never a crash -------------------------------------

BAD = [
    ("unknown keyword", "virtual_server 10.0.0.1 80 {\n  persistance_timeout 5\n}\n",
     ":2: unknown keyword 'persistance_timeout' in virtual_server"),
    ("unknown top-level keyword", "virtual_servers 10.0.0.1 80 { }\n",
     ":1: unknown keyword 'virtual_servers' in the top level"),
    ("unbalanced close", "virtual_server 10.0.0.1 80 { }\n}\n",
     ":2: unbalanced '}': no block is open"),
    ("never closed", "\nvirtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n}\n",
     ":2: the block of 'virtual_server' opened here is never closed"),
    ("brace without keyword", "{\n}\n", ":1: '{' without a keyword before it"),
    ("no block", "virtual_server 10.0.0.1 80\n", ":1: virtual_server: '{' expected"),
    ("block where none", "virtual_server 10.0.0.1 80 { delay_loop 5 { } }\n",
     ":1: delay_loop takes no block"),
    ("missing value", "virtual_server 10.0.0.1 80 {\n delay_loop\n}\n",
     ":2: delay_loop: a value expected"),
    ("extra value", "virtual_server 10.0.0.1 80 {\n delay_loop 5 6\n}\n",
     ":2: delay_loop: unexpected value '6'"),
    ("bad timer", "virtual_server 10.0.0.1 80 {\n delay_loop -1\n}\n",
     ":2: delay_loop: '-1' is not a time in seconds"),
    ("zero delay_loop", "virtual_server 10.0.0.1 80 {\n delay_loop 0\n}\n",
     ":2: delay_loop: '0' is not a time in seconds (above 0"),
    ("bad weight", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n  weight 70000\n }\n}\n",
     ":3: weight: '70000' is not an integer from 0 to 65535"),
    ("bad address", "virtual_server 10.0.0.300 80 { }\n",
     ":1: virtual server: '10.0.0.300' is not an IPv4 address"),
    ("IPv6 real server", "virtual_server 10.0.0.1 80 {\n real_server 2001:db8::1 80 { }\n}\n",
     ":2: real_server: 2001:db8::1: IPv6"),
    ("bad port", "virtual_server 10.0.0.1 http { }\n",
     ":1: virtual server port: 'http' is not an integer"),
    ("bad method", "virtual_server 10.0.0.1 80 {\n lvs_method MASQ\n}\n",
     ":2: lvs_method: 'MASQ' is not NAT, DR or TUN"),
    ("gre", "virtual_server 10.0.0.1 80 {\n lvs_method TUN type gre\n}\n",
     ":2: lvs_method TUN type gre: not supported by pylvs"),
    ("gue without port", "virtual_server 10.0.0.1 80 {\n lb_kind TUN type gue\n}\n",
     ":2: lb_kind TUN type gue: port N expected"),
    ("bad scheduler", "virtual_server 10.0.0.1 80 {\n lb_algo wrrr\n}\n",
     ":2: lb_algo: unknown scheduler 'wrrr'"),
    ("bad protocol", "virtual_server 10.0.0.1 80 {\n protocol ICMP\n}\n",
     ":2: protocol: 'ICMP' is not TCP, UDP or SCTP"),
    ("duplicate service", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 { }\n}\n"
     "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.2 80 { }\n}\n",
     ":4: virtual server UDP 10.0.0.1:80 already defined at"),
    ("thresholds", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n  lthreshold 5\n }\n}\n",
     ":2: lthreshold above uthreshold"),
    ("HTTP_GET without url",
     "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n  HTTP_GET { connect_timeout 1 }\n }\n}\n",
     ":3: HTTP_GET: at least one url"),
    ("bad regex",
     "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n  HTTP_GET { url { path / regex \"(\" } }\n }\n}\n",
     ":3: regex: missing )"),
    # Valid for a str pattern, not for the bytes of a body: refused at load,
    # not left to fail every probe.
    ("regex naming a character", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  HTTP_GET {\n   url {\n    path /\n    regex caf\\u00e9\n   }\n  }\n }\n}\n",
     ":6: regex: \\u names a character, and the body is bytes"),
    ("regex naming a character by name", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  SSL_GET { url { path / regex \"\\N{DIGIT ONE}\" } }\n }\n}\n",
     ":3: regex: \\N names a character"),
    # A command that could not run: named at load, not when the state changes.
    ("blank notify_up", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  notify_up \"  \"\n }\n}\n", ":3: notify_up: a command expected"),
    ("blank quorum_down", "virtual_server 10.0.0.1 80 {\n quorum_down \"\"\n}\n",
     ":2: quorum_down: a command expected"),
    ("unbalanced quote in notify_down", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  notify_down \"/bin/echo 'down\"\n }\n}\n",
     ":3: notify_down: No closing quotation in \"/bin/echo 'down\""),
    ("unbalanced quote in quorum_up", "virtual_server 10.0.0.1 80 {\n quorum_up /bin/x'y\n}\n",
     ":2: quorum_up: No closing quotation"),
    ("bad digest",
     "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n  HTTP_GET { url { path / digest abc } }\n }\n}\n",
     ":3: digest: 32 hexadecimal digits"),
    ("bad status", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  HTTP_GET {\n   url { path / status_code 299-200 }\n  }\n }\n}\n",
     ":4: status_code: empty range '299-200'"),
    ("bad hex", "virtual_server 10.0.0.1 53 {\n real_server 10.1.0.1 53 {\n"
     "  UDP_CHECK { payload 0g }\n }\n}\n", ":3: payload: '0g' is not hexadecimal"),
    ("hex wildcard", "virtual_server 10.0.0.1 53 {\n real_server 10.1.0.1 53 {\n"
     "  UDP_CHECK { require_reply 0x }\n }\n}\n", ":3: require_reply: wildcard nibbles"),
    ("misc without path", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  MISC_CHECK { misc_dynamic }\n }\n}\n", ":3: MISC_CHECK: misc_path expected"),
    ("bad bool", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n  alpha maybe\n }\n}\n",
     ":3: alpha: 'maybe' is not on/off"),
    ("unterminated quote", "virtual_server 10.0.0.1 80 {\n virtualhost \"abc\n}\n",
     ":2: unterminated quoted string"),
    ("condition without an id", "@ virtual_server 10.0.0.1 80 { }\n",
     ":1: '@' without a config id after it"),
    ("conditional include", "@main include /etc/x.conf\n", ":1: an include on a conditional line"),
    ("substitution", "$VIP=10.0.0.1\n", ":1: keepalived's parameter substitution ('$')"),
    ("missing group", "virtual_server group NOPE { }\n",
     ":1: virtual_server_group NOPE is not defined"),
    ("bad group member", "virtual_server_group G {\n 10.0.0.1-0 80\n}\n",
     ":2: virtual_server_group: empty range '10.0.0.1-0'"),
    ("huge group", "virtual_server_group G {\n 10.0.0.0/8 80\n}\n",
     ":2: virtual_server_group: 10.0.0.0/8 has more than 65536 addresses"),
    ("sip", "virtual_server 10.0.0.1 5060 {\n persistence_engine sip\n}\n",
     ":2: persistence_engine sip: not supported by pylvs"),
    ("include with checks", "includer /etc/x.conf\n", ":1: includer (an include with checks)"),
    ("include with all checks", "includea /etc/x.conf\n", ":1: includea (an include with checks)"),
    ("retry 0 in a real server", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  retry 0\n }\n}\n", ":3: retry: '0' is not an integer from 1 to"),
    ("nb_get_retry in TCP_CHECK", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  TCP_CHECK {\n   nb_get_retry 3\n  }\n }\n}\n",
     ":4: unknown keyword 'nb_get_retry' in TCP_CHECK; keepalived ignores it here too: this "
     "checker's is 'retry'"),
    ("misc_timeout in decimals", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  MISC_CHECK {\n   misc_path /bin/true\n   misc_timeout 1.5\n  }\n }\n}\n",
     ":5: misc_timeout: '1.5' is not an integer from 1 to 4294"),
    ("connect_timeout in MISC_CHECK", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  MISC_CHECK {\n   misc_path /bin/true\n   connect_timeout 2\n  }\n }\n}\n",
     ":5: unknown keyword 'connect_timeout' in MISC_CHECK"),
    ("group range past the last byte", "virtual_server_group G {\n 10.0.0.1-300 80\n}\n",
     ":2: virtual_server_group: range '10.0.0.1-300': the end is the last byte, 0..255"),
    ("a trailing backslash joins no line",
     "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n  weight 2\\\n"
     "  inhibit_on_failure\n }\n}\n", ":3: weight: '2\\\\' is not an integer"),
    ("connect_port 0", "virtual_server 10.0.0.1 80 {\n real_server 10.1.0.1 80 {\n"
     "  TCP_CHECK {\n   connect_port 0\n  }\n }\n}\n",
     ":4: connect_port: '0' is not an integer from 1 to 65535"),
    ("include missing", "include /nonexistent/pylvs/x.conf\n",
     ":1: /nonexistent/pylvs/x.conf: No such file or directory"),
    ("not UTF-8", b"virtual_server 10.0.0.1 80 {\n \xff\n}\n".decode("latin-1"),
     ":2: not UTF-8 text"),
    ("NUL byte", "virtual_server 10.0.0.1 80 {\x00}\n", ":1: a NUL byte"),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _d, t, e in BAD],
                         ids=[d for d, _t, _e in BAD])
def test_bad_input_names_file_and_line(tmp_path, text, expected):
    p = tmp_path / "keepalived.conf"
    p.write_bytes(text.encode("latin-1") if "not UTF-8" in expected else text.encode())
    with pytest.raises(ka.ConfigError) as ei:
        ka.parse_file(str(p))
    assert str(ei.value).startswith(str(p) + expected), str(ei.value)


def test_limits_never_hang(tmp_path):
    # A file larger than the limit is refused before it is parsed.
    big = tmp_path / "big.conf"
    with open(big, "w") as f:
        f.write("! " + "x" * (ka.MAX_FILE_BYTES + 10) + "\n")
    with pytest.raises(ka.ConfigError, match=f"larger than {ka.MAX_FILE_BYTES} bytes"):
        ka.parse_file(str(big))
    # An include of itself, and a loop through two files.
    selfinc = write(tmp_path, "self.conf", "include self.conf\n")
    with pytest.raises(ka.ConfigError, match=r"self.conf:1: include loop"):
        ka.parse_file(selfinc)
    write(tmp_path, "a.conf", "include b.conf\n")
    write(tmp_path, "b.conf", "include a.conf\n")
    with pytest.raises(ka.ConfigError, match=r"b.conf:1: include loop: .*a.conf includes itself"):
        ka.parse_file(str(tmp_path / "a.conf"))
    # A chain deeper than the limit.
    for i in range(ka.MAX_INCLUDE_DEPTH + 3):
        write(tmp_path, f"d{i}.conf", f"include d{i + 1}.conf\n")
    write(tmp_path, f"d{ka.MAX_INCLUDE_DEPTH + 3}.conf", "\n")
    with pytest.raises(ka.ConfigError, match="includes nested deeper than"):
        ka.parse_file(str(tmp_path / "d0.conf"))
    # Blocks nested without end (inside a block pylvs skips).
    deep = write(tmp_path, "deep.conf", "global_defs " + "{ x " * 100 + "}" * 100 + "\n")
    with pytest.raises(ka.ConfigError, match="blocks nested deeper than"):
        ka.parse_file(deep)
    # Brace expansion that multiplies.
    bomb = write(tmp_path, "bomb.conf", "include " + "{a,b}" * 12 + "\n")
    with pytest.raises(ka.ConfigError, match="expands to more than"):
        ka.parse_file(bomb)


def test_many_virtual_servers_parse_quickly(tmp_path):
    import time

    text = "".join(f"virtual_server 10.{i >> 8}.{i & 255}.1 80 {{\n"
                   f"  real_server 10.200.0.1 80 {{ weight 1 TCP_CHECK {{ }} }}\n}}\n"
                   for i in range(2000))
    t0 = time.monotonic()
    cfg = parse(tmp_path, text)
    assert len(cfg.virtual_servers) == 2000
    assert time.monotonic() - t0 < 10


def test_format_detection():
    assert ka.looks_like_keepalived("! comment\n\nvirtual_server 1.2.3.4 80 {\n}\n")
    assert ka.looks_like_keepalived("include /etc/keepalived/*.conf\n")
    assert not ka.looks_like_keepalived("# saved\n-A -t 1.2.3.4:80 -s rr\n")
    assert not ka.looks_like_keepalived("ipvsadm -A -t 1.2.3.4:80\n")
    assert not ka.looks_like_keepalived("")


# --- config → Balancer operations; the difference of two ----------------------

def keep(tmp_path, text: str):
    return config_apply.from_keepalived(parse(tmp_path, text))


BASE = """\
virtual_server 10.0.0.1 80 {
    protocol TCP
    lvs_sched rr
    real_server 10.1.0.1 80 { weight 1 }
    real_server 10.1.0.2 80 { weight 2 }
}
virtual_server 10.0.0.2 80 {
    protocol TCP
    real_server 10.1.0.1 80 { }
}
"""


class Recording:
    """The operations a reload sends to a Balancer, and their results."""

    def __init__(self, b: Balancer):
        self.b = b
        self.sent: list[dict] = []

    def apply(self, ops):
        self.sent = [op for op, _w in ops]
        return self.b.apply_many(self.sent)


def reload_into(b: Balancer, old, new) -> tuple[list[dict], list[str]]:
    ops = config_apply.diff_ops(old.services, new.services, old.timeouts, new.timeouts)
    results = b.apply_many([op for op, _w in ops])
    return [op for op, _w in ops], config_apply.errors(ops, results)


CHANGES = [
    ("unchanged", BASE, []),
    ("comments and layout only", "# a comment\n" + BASE.replace("{ weight 1 }",
                                                               "{\n  weight 1 ! same\n}"), []),
    ("weight changed", BASE.replace("weight 2", "weight 5"),
     [("edit_dest", "10.0.0.1", "10.1.0.2", {"weight": 5, "fwd": "masq"})]),
    ("real server added", BASE.replace("    real_server 10.1.0.2 80 { weight 2 }\n",
                                       "    real_server 10.1.0.2 80 { weight 2 }\n"
                                       "    real_server 10.1.0.3 80 { }\n"),
     [("add_dest", "10.0.0.1", "10.1.0.3", {"weight": 1})]),
    ("real server removed", BASE.replace("    real_server 10.1.0.2 80 { weight 2 }\n", ""),
     [("del_dest", "10.0.0.1", "10.1.0.2", {})]),
    ("service removed", BASE.split("virtual_server 10.0.0.2")[0],
     [("del_service", "10.0.0.2", None, {})]),
    ("scheduler changed", BASE.replace("lvs_sched rr", "lvs_sched wlc"),
     [("edit_service", "10.0.0.1", None, {"sched": "wlc"})]),
    ("persistence added", BASE.replace("lvs_sched rr", "lvs_sched rr\n persistence_timeout 30"),
     [("edit_service", "10.0.0.1", None, {"persistent": 30})]),
    ("method changed", BASE.replace("{ weight 1 }", "{ weight 1 lvs_method DR }"),
     [("edit_dest", "10.0.0.1", "10.1.0.1", {"fwd": "route", "weight": 1})]),
    ("service moved", BASE.replace("virtual_server 10.0.0.2 80", "virtual_server 10.0.0.2 81"),
     [("del_service", "10.0.0.2", None, {}), ("add_service", "10.0.0.2", None, {"vport": 81}),
      ("add_dest", "10.0.0.2", "10.1.0.1", {"dport": 80, "vport": 81})]),
]


@pytest.mark.parametrize("new_text,expected", [(t, e) for _d, t, e in CHANGES],
                         ids=[d for d, _t, _e in CHANGES])
def test_reload_applies_only_the_difference(tmp_path, new_text, expected):
    b = balancer()
    old = keep(tmp_path, BASE)
    assert apply_all(b, old) == []
    slots = {(s["vaddr"], s["vport"], d["daddr"]): d["slot"]
             for s in b.snapshot()["services"] for d in s["dests"]}
    new = config_apply.from_keepalived(parse(tmp_path, new_text, "new.conf"))
    sent, errs = reload_into(b, old, new)
    assert errs == []
    got = [(op["op"], op["vaddr"], op.get("daddr")) for op in sent]
    assert got == [(n, v, d) for n, v, d, _attrs in expected]
    for op, (_n, _v, _d, attrs) in zip(sent, expected):
        assert {k: op[k] for k in attrs} == attrs
    # The Balancer now holds what the new file says, as a fresh start would.
    fresh = balancer()
    apply_all(fresh, new)
    assert saved(b) == saved(fresh)
    # Dests no operation named keep their slot (their conns and counters).
    touched = {(op["vaddr"], op.get("daddr")) for op in sent}
    for s in b.snapshot()["services"]:
        for d in s["dests"]:
            k = (s["vaddr"], s["vport"], d["daddr"])
            if (s["vaddr"], d["daddr"]) not in touched and (s["vaddr"], None) not in touched:
                assert d["slot"] == slots[k]


def test_refused_services_are_named_and_the_rest_applies(tmp_path):
    cfg = parse(tmp_path, """\
        virtual_server fwmark 7 {
            real_server 10.1.0.1 80 { }
        }
        virtual_server 10.0.0.1 80 {
            protocol SCTP
            real_server 10.1.0.1 80 { }
        }
        virtual_server 10.0.0.1 81 {
            protocol TCP
            lvs_method DR
            real_server 10.1.0.1 81 { }
        }
    """)
    loaded = config_apply.from_keepalived(cfg)
    conf = f"{tmp_path}/keepalived.conf"
    assert loaded.refused == [
        f"{conf}:1: virtual_server fwmark 7: fwmark services are not supported by pylvs yet; "
        "skipped",
        f"{conf}:4: virtual_server 10.0.0.1 80: SCTP services are not supported by pylvs; "
        "skipped"]
    assert [vs.vport for vs in loaded.virtual_servers] == [81]
    b = balancer()
    assert apply_all(b, loaded) == []
    assert saved(b) == "-A -t 10.0.0.1:81 -s wlc\n-a -t 10.0.0.1:81 -r 10.1.0.1:81 -g -w 1\n"


def test_refused_operations_are_retried_by_the_next_reload(tmp_path):
    b = balancer()
    b.apply({"op": "add_service", "proto": "tcp", "vaddr": "10.0.0.2", "vport": 80})
    loaded = keep(tmp_path, BASE)
    ops = config_apply.full_ops(loaded.services)
    results = b.apply_many([op for op, _w in ops])
    errs = config_apply.errors(ops, results)
    assert errs == [f"{tmp_path}/keepalived.conf:7: add_service tcp 10.0.0.2:80: "
                    "Service already exists"]
    state = config_apply.settle(loaded.services, ops, results)
    assert ("tcp", "10.0.0.2", 80, 0) not in state
    # The operator removes the service by hand; the next reload (same file) adds it.
    b.apply({"op": "del_service", "proto": "tcp", "vaddr": "10.0.0.2", "vport": 80})
    ops = config_apply.diff_ops(state, loaded.services)
    assert [op["op"] for op, _w in ops] == ["add_service", "add_dest"]
    assert config_apply.errors(ops, b.apply_many([op for op, _w in ops])) == []


def test_rules_file_reload_is_a_difference_too(tmp_path):
    old_rules = ("-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 1\n"
                 "-a -t 10.0.0.1:80 -r 10.1.0.2:80 -m -w 1\n-A -u 10.0.0.1:53 -s rr\n")
    new_rules = ("-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 1\n"
                 "-a -t 10.0.0.1:80 -r 10.1.0.2:80 -m -w 4\n--set 0 0 60\n")
    old = config_apply.load(write(tmp_path, "old.rules", old_rules))
    new = config_apply.load(write(tmp_path, "new.rules", new_rules))
    assert (old.kind, new.kind) == ("rules", "rules")
    b = balancer()
    b.apply_many([op for _no, op in old.rules])
    sent, errs = reload_into(b, old, new)
    assert errs == []
    assert [op["op"] for op in sent] == ["del_service", "edit_dest", "set_timeouts"]
    assert saved(b) == ("-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 1\n"
                        "-a -t 10.0.0.1:80 -r 10.1.0.2:80 -m -w 4\n")
    assert b.timeouts()["udp"] == 60


def test_the_same_rules_in_either_format_give_the_same_director(tmp_path):
    rules = config_apply.load(write(tmp_path, "r", (
        "-A -t 192.168.1.100:443 -s sh -p 360 -M 255.255.255.0 -b sh-fallback,sh-port\n"
        "-a -t 192.168.1.100:443 -r 192.168.1.11:443 -g -w 3 -x 1000 -y 200\n"
        "-a -t 192.168.1.100:443 -r 192.168.1.12:443 -g -w 1\n")))
    conf = config_apply.load(write(tmp_path, "k", DR_PERSIST))
    b1, b2 = balancer(), balancer()
    b1.apply_many([op for _no, op in rules.rules])
    apply_all(b2, conf)
    assert saved(b1) == saved(b2)


def test_a_file_moved_to_the_other_format_is_no_change(tmp_path):
    """The -c file becomes the director's own `pylvs adm -S -n` (or back):
    the same services and dests, tunnel ones included, give no operation
    at all on reload (docs/config.md: the file may change format)."""
    conf = config_apply.load(write(tmp_path, "keepalived.conf", TUN_MIXED))
    b = balancer()
    assert apply_all(b, conf) == []
    rules = config_apply.load(write(tmp_path, "rules", saved(b)))
    assert rules.kind == "rules"
    assert config_apply.diff_ops(conf.services, rules.services) == []
    assert config_apply.diff_ops(rules.services, conf.services) == []


def test_a_byte_order_mark_is_no_word_in_either_format(tmp_path):
    """A file saved by an editor that starts it with a UTF-8 BOM: the mark
    means nothing; the rules stay rules and the keepalived.conf's first
    keyword its first keyword (an included file's too)."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "rules").write_bytes(bom + b"-A -t 10.0.0.1:80 -s rr\n")
    rules = config_apply.load(str(tmp_path / "rules"))
    assert rules.kind == "rules" and list(rules.services) == [("tcp", "10.0.0.1", 80, 0)]
    (tmp_path / "rs.inc").write_bytes(bom + b"real_server 10.1.0.1 80 { weight 3 }\n")
    (tmp_path / "keepalived.conf").write_bytes(
        bom + b"! saved on a desktop\nvirtual_server 10.0.0.1 80 {\n protocol TCP\n"
        b" include rs.inc\n}\n")
    conf = config_apply.load(str(tmp_path / "keepalived.conf"))
    assert conf.kind == "keepalived" and conf.warnings == ()
    assert conf.services[("tcp", "10.0.0.1", 80, 0)].dests[("10.1.0.1", 80)]["weight"] == 3


def test_pylvs_run_t_checks_the_file_as_keepalived_t_does(tmp_path, capsys):
    """`pylvs run -c FILE -t`: no network, nothing started; the warnings
    and errors with file:line on stderr, a summary on stdout, exit status 0
    only when all of the file would apply (a CI job's check before a
    deploy, as keepalived -t)."""
    from pylvs.runtime import daemon

    good = write(tmp_path, "good.conf", REFERENCE)
    assert daemon.main(["-c", good, "-t"]) == 0
    out, err = capsys.readouterr()
    # The warnings: the keywords after another's value on the one-line checkers.
    assert out == f"{good} (keepalived): 1 service(s), 1 dest(s), 6 warning(s), 0 error(s)\n"
    assert err.splitlines() == [f"warning: {w}" for w in ka.parse_file(good).warnings]
    broken = write(tmp_path, "broken.conf", REFERENCE.replace("weight 1", "wieght 1"))
    assert daemon.main(["-c", broken, "-t"]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"pylvs run: -c {broken}:11: unknown keyword 'wieght' in "
                              "real_server\n")
    part = write(tmp_path, "part.conf", "global_defs { router_id A }\n" + REFERENCE
                 + "virtual_server fwmark 7 {\n real_server 10.1.0.1 80 { }\n}\n")
    assert daemon.main(["-c", part, "-t"]) == 1
    out, err = capsys.readouterr()
    assert out.endswith(": 1 service(s), 1 dest(s), 7 warning(s), 1 error(s)\n")
    assert f"warning: {part}:1: global_defs: ignored (pylvs does not run it)" in err.splitlines()
    assert err.splitlines()[7:] == [
        f"{part}:19: virtual_server fwmark 7: fwmark services are not supported by "
        "pylvs yet; skipped"]
    rules = write(tmp_path, "rules", "-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.2:80 -r 10.1.0.1\n")
    assert daemon.main(["-c", rules, "-t", "--max-services", "1"]) == 1
    out, err = capsys.readouterr()
    assert err == f"{rules}: line 2: Service not defined\n"
    assert out == f"{rules} (rules): 1 service(s), 0 dest(s), 0 warning(s), 1 error(s)\n"
    with pytest.raises(SystemExit):
        daemon.main(["-t"])
    assert "-t checks the -c FILE" in capsys.readouterr().err


def test_a_backslash_in_a_value_is_kept_as_keepalived_keeps_it(tmp_path):
    """keepalived 2.2.7 gives a quoted value's backslashes through as they
    are (`lb_kind "D\\x52"`: "unknown [D\\x52] routing method"): a regex's
    `\\d` and `\\s` reach the check, a misc_path's backslash the command."""
    cfg = parse(tmp_path, r"""
        virtual_server 10.0.0.1 80 {
            protocol TCP
            real_server 10.1.0.1 80 {
                HTTP_GET {
                    url {
                        path /health
                        regex "^status:\s*\d+ ok"
                    }
                }
                MISC_CHECK {
                    misc_path "/usr/local/bin/check \.internal"
                }
            }
        }
    """)
    http, misc = cfg.virtual_servers[0].real_servers[0].checks
    assert http.urls[0].regex == r"^status:\s*\d+ ok"
    assert misc.misc_path == r"/usr/local/bin/check \.internal"
    # A quote always ends a quoted string: `"a\"b"` leaves a quote open.
    with pytest.raises(ka.ConfigError, match=r":3: unterminated quoted string"):
        parse(tmp_path, 'virtual_server 10.0.0.1 80 {\n protocol TCP\n virtualhost "a\\"b"\n}\n')


def test_conditional_lines_follow_the_config_id_as_keepalived_s_i(tmp_path, capsys):
    """One file for both directors (keepalived.conf(5), "Conditional
    configuration"): `@ID` lines count only for that config id (keepalived's
    -i, pylvs run -i; by default the node name up to its first dot),
    `@^ID` lines for every other one."""
    from pylvs.runtime import daemon

    path = write(tmp_path, "keepalived.conf", """\
        vrrp_instance VI_1 {
            @main   priority 200
            @backup priority 100
        }
        virtual_server 10.0.0.1 80 {
            protocol TCP
            @main  lb_algo wrr
            @^main lb_algo rr
            real_server 10.1.0.1 80 {
                @backup weight 3
            }
        }
    """)

    def sched_weight(cfg):
        vs = cfg.virtual_servers[0]
        return vs.lvs_sched, vs.real_servers[0].weight

    assert sched_weight(ka.parse_file(path, "main")) == ("wrr", 1)
    assert sched_weight(ka.parse_file(path, "backup")) == ("rr", 3)
    import os
    node = os.uname().nodename.split(".")[0]
    assert sched_weight(ka.parse_file(path)) == sched_weight(ka.parse_file(path, node))
    assert config_apply.load(path, "backup").services[("tcp", "10.0.0.1", 80, 0)].attrs[
        "sched"] == "rr"
    assert daemon.main(["-c", path, "-i", "main", "-t"]) == 0
    assert capsys.readouterr().out.endswith("1 service(s), 1 dest(s), 1 warning(s), 0 error(s)\n")


def test_load_errors_name_file_and_line(tmp_path):
    p = write(tmp_path, "r", "-A -t 10.0.0.1:80\n-a -t 10.0.0.1:80 -r\n")
    with pytest.raises(ka.ConfigError, match=rf"^{p}: line 2: "):
        config_apply.load(p)
    with pytest.raises(ka.ConfigError, match=rf"^{tmp_path}/nope: No such file"):
        config_apply.load(str(tmp_path / "nope"))
    with pytest.raises(ka.ConfigError, match=rf"^{tmp_path}: a directory, not a configuration "
                                             "file$"):
        config_apply.load(str(tmp_path))
    bin_ = tmp_path / "bin"
    bin_.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ka.ConfigError, match="not a text file"):
        config_apply.load(str(bin_))


def test_latin_1_comments_of_an_older_file_are_read(tmp_path):
    """keepalived reads bytes: a comment in Latin-1 (an older file's `é`)
    is no error there, nor here, in either format; such a byte in a word
    is refused naming its line."""
    conf = tmp_path / "keepalived.conf"
    conf.write_bytes(b"# r\xe9partiteur (\xe9quipe r\xe9seau)\nvirtual_server 10.0.0.1 80 {\n"
                     b"    protocol TCP\n    real_server 10.1.0.1 80 { weight 2 }  ! n\xb01\n}\n")
    rules = tmp_path / "rules"
    rules.write_bytes(b"# sauvegard\xe9\n-A -t 10.0.0.1:80 -s wlc\n"
                      b"-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 2  # n\xb01\n")
    b1, b2 = balancer(), balancer()
    assert apply_all(b1, config_apply.load(str(conf))) == []
    b2.apply_many([op for _no, op in config_apply.load(str(rules)).rules])
    assert saved(b1) == saved(b2) == ("-A -t 10.0.0.1:80 -s wlc\n"
                                      "-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 2\n")
    conf.write_bytes(conf.read_bytes().replace(b"weight 2 }", b'weight 2 virtualhost "\xe9" }'))
    with pytest.raises(ka.ConfigError, match=rf"^{conf}:4: not UTF-8 text \(outside a comment\)$"):
        config_apply.load(str(conf))


# --- the daemon's reload (SIGHUP and `pylvs reload`) ---------------------------

class FakeHealth:
    def __init__(self):
        self.calls: list[tuple] = []

    def configure(self, vss):
        self.calls.append(tuple(vs.key for vs in vss))


def daemon_for(path: str, b: Balancer):
    from pylvs.runtime.daemon import Daemon, Options

    d = Daemon.__new__(Daemon)   # the config block alone: no interfaces, no workers
    d.opts = Options(config=path)
    d.balancer = b
    d.health = FakeHealth()
    d._read_config()
    return d


def test_daemon_reload_keeps_the_old_config_when_the_new_file_is_broken(tmp_path):
    path = write(tmp_path, "keepalived.conf", BASE)
    b = balancer()
    d = daemon_for(path, b)

    async def run():
        await d._apply_config()
        before = saved(b)
        assert d.health.calls == [(("TCP", "10.0.0.1", 80, 0), ("TCP", "10.0.0.2", 80, 0))]
        write(tmp_path, "keepalived.conf", BASE.replace("weight 2", "weight 2 {"))
        with pytest.raises(BalancerError, match=rf"^{path}:\d+: .*the running configuration "
                                                "is kept"):
            await d.reload()
        assert saved(b) == before and len(d.health.calls) == 1
        write(tmp_path, "keepalived.conf", BASE.replace("weight 2", "weight 3"))
        r = await d.reload()
        assert r["operations"] == {"edit_dest": 1} and r["errors"] == [] and r["format"] == \
            "keepalived"
        assert "-r 10.1.0.2:80 -m -w 3" in saved(b) and len(d.health.calls) == 2
        # The file turns into -S rules: the difference again, health told
        # there are no keepalived virtual servers any more.
        write(tmp_path, "keepalived.conf", "-A -t 10.0.0.1:80 -s rr\n"
                                           "-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 1\n")
        r = await d.reload()
        assert r["format"] == "rules" and r["errors"] == []
        assert saved(b) == "-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.0.1:80 -m -w 1\n"
        assert d.health.calls[-1] == ()
    asyncio.run(run())


CHECKED = BASE.replace("real_server 10.1.0.1 80 { weight 1 }",
                       "real_server 10.1.0.1 80 { weight 1 TCP_CHECK { connect_timeout 3 } }")

# description, the file after CHECKED, operations sent, services whose checks changed
HEALTH_RELOADS = [
    ("unchanged", CHECKED, {}, 0),
    ("a checker's timing", CHECKED.replace("connect_timeout 3", "connect_timeout 1"), {}, 1),
    ("a checker's timing and a weight", CHECKED.replace("connect_timeout 3", "retry 2")
     .replace("weight 2", "weight 4"), {"edit_dest": 1}, 1),
    ("quorum and a sorry server", CHECKED.replace("lvs_sched rr", "lvs_sched rr\n quorum 2\n"
                                                  " sorry_server 10.1.0.9 80"), {}, 1),
    ("a checker removed", BASE, {}, 1),
    ("a service with its checks removed", CHECKED.split("virtual_server 10.0.0.2")[0]
     .replace("virtual_server 10.0.0.1", "virtual_server 10.0.0.3"),
     {"del_service": 2, "add_service": 1, "add_dest": 2}, 0),
]


@pytest.mark.parametrize("new_text,operations,health", [r[1:] for r in HEALTH_RELOADS],
                         ids=[r[0] for r in HEALTH_RELOADS])
def test_a_reload_names_what_it_changed_in_the_health_checks(tmp_path, new_text, operations,
                                                             health):
    """A reload that changes only checkers, quorum or the sorry server sends
    no operation: it must not say "nothing changed" (the operator would
    think the edit was not read)."""
    from pylvs.cli import tools

    path = write(tmp_path, "keepalived.conf", CHECKED)
    b = balancer()
    cf = config_apply.ConfigFile(path)

    async def apply_ops(ops):
        return b.apply_many(ops)

    async def run():
        await cf.apply(apply_ops)
        write(tmp_path, "keepalived.conf", new_text)
        return await cf.reload(apply_ops)

    r = asyncio.run(run())
    assert (r["operations"], r["health"]) == (operations, health)

    class Client:
        def __init__(self, _path):
            pass

        def call(self, _op):
            return r

        def close(self):
            pass

    import io
    out = io.StringIO()
    assert tools.reload_main([], stdout=out, stderr=io.StringIO(), client_factory=Client) == 0
    said = out.getvalue().split("; ", 1)[1]
    assert ("nothing changed" in said) == (not operations and not health)
    assert (f"the health checks of {health} service(s)" in said) == bool(health), said


@pytest.mark.parametrize("blank", ["", "\n  \n", "! keepalived.conf\n# all gone\n"],
                         ids=["empty", "blank lines", "only comments"])
def test_reload_of_a_file_emptied_keeps_every_service(tmp_path, blank):
    """A file cut to nothing (a full disk, `>` for `>>`) would read as -S
    rules naming no service and delete them all, established conns
    included: refused; a file that says "no services" still removes them."""
    path = write(tmp_path, "keepalived.conf", BASE)
    b = balancer()
    d = daemon_for(path, b)

    async def run():
        await d._apply_config()
        before = saved(b)
        write(tmp_path, "keepalived.conf", blank)
        with pytest.raises(BalancerError, match=rf"^{path}: no configuration in it \(empty, or "
                                                r"only comments\): it would remove every "
                                                r"service; .*the running configuration is kept$"):
            await d.reload()
        assert saved(b) == before and d._config.loaded.kind == "keepalived"
        write(tmp_path, "keepalived.conf", "global_defs { }\n")
        r = await d.reload()
        assert r["operations"] == {"del_service": 2} and saved(b) == ""
        # Nothing left to lose: an empty file reloads, and a new one applies.
        write(tmp_path, "keepalived.conf", blank)
        assert (await d.reload())["operations"] == {}
        write(tmp_path, "keepalived.conf", BASE)
        assert (await d.reload())["operations"] == {"add_service": 2, "add_dest": 3}
        assert saved(b) == before
    asyncio.run(run())


def test_start_refuses_a_broken_file(tmp_path):
    path = write(tmp_path, "keepalived.conf", "virtual_server 10.0.0.1 80 {\n bad\n}\n")
    with pytest.raises(SystemExit, match=rf"^pylvs run: -c {path}:2: unknown keyword 'bad'"):
        daemon_for(path, balancer())
    assert os.path.exists(path)


def test_pylvs_reload_prints_the_outcome():
    import io

    from pylvs.cli import tools
    from pylvs.control import rpc

    class Client:
        answer: object = None

        def __init__(self, _path):
            pass

        def call(self, op):
            assert op == {"op": "reload"}
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

        def close(self):
            pass

    def run(answer):
        Client.answer = answer
        out, err = io.StringIO(), io.StringIO()
        rc = tools.reload_main([], stdout=out, stderr=err, client_factory=Client)
        return rc, out.getvalue(), err.getvalue()

    ok = {"file": "/k.conf", "format": "keepalived", "services": 2,
          "operations": {"edit_dest": 1, "add_dest": 2}, "errors": [], "refused": [],
          "warnings": ["/k.conf:1: global_defs: ignored (pylvs does not run it)"]}
    assert run(ok) == (0, "reloaded /k.conf (keepalived): 2 service(s); 1 edit_dest, "
                          "2 add_dest\n",
                       "warning: /k.conf:1: global_defs: ignored (pylvs does not run it)\n")
    assert run({**ok, "operations": {}, "warnings": [],
                "errors": ["/k.conf:4: add_dest tcp 10.0.0.1:80 -> 10.0.0.1:80: refused"]}) == (
        1, "reloaded /k.conf (keepalived): 2 service(s); nothing changed\n",
        "/k.conf:4: add_dest tcp 10.0.0.1:80 -> 10.0.0.1:80: refused\n")
    broken = rpc.RpcError("/k.conf:3: unknown keyword 'wieght' in real_server; the running "
                          "configuration is kept")
    assert run(broken) == (1, "", f"pylvs reload: {broken}\n")


def test_mangled_configurations_give_an_error_or_a_config_never_a_crash(tmp_path):
    """Hundreds of random edits of the samples (braces, quotes, comment
    characters, continuations, numbers, words cut): each parses or raises
    ConfigError naming a file, and what parses applies to a Balancer
    without an exception (refusals are results)."""
    import random

    rng = random.Random(9)
    pieces = ["{", "}", '"', "#", "!", "\\\n", "\n", " 0", " -1", " 99999999999", " 1.5",
              " real_server", " include", " x", "\0", " 10.0.0.1", "\t", " TUN type gue"]
    samples = [REFERENCE, DR_PERSIST, TUN_MIXED, SHARED, CORRECTED, BASE]
    outcomes = {"parsed": 0, "refused": 0}
    for i in range(400):
        text = rng.choice(samples)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(text))
            if rng.random() < 0.5:
                text = text[:at] + rng.choice(pieces) + text[at:]
            else:
                text = text[:at] + text[at + rng.randint(1, 8):]
        path = tmp_path / f"m{i}.conf"
        path.write_text(text)
        try:
            cfg = ka.parse_file(str(path))
        except ka.ConfigError as e:
            assert str(e).startswith(str(tmp_path)), (str(e), text)
            outcomes["refused"] += 1
            continue
        outcomes["parsed"] += 1
        loaded = config_apply.from_keepalived(cfg)
        ops = config_apply.full_ops(loaded.services)
        config_apply.errors(ops, balancer().apply_many([op for op, _w in ops]))
    assert outcomes["parsed"] > 20 and outcomes["refused"] > 100, outcomes


def test_control_socket_answers_reload_with_the_daemon_handler(tmp_path):
    """`{"op": "reload"}` on the control socket reaches the handler `pylvs
    run` gives (not the Balancer): its result, or its BalancerError as the
    error; the Balancer's ops still answer on the same socket."""
    from pylvs.control import rpc

    path = str(tmp_path / "run" / "ctl.sock")
    calls = []

    async def reload(req):
        calls.append(req)
        if req.get("broken"):
            raise BalancerError("k.conf:3: unknown keyword 'x'; the running configuration "
                                "is kept")
        return {"file": "k.conf", "operations": {}}

    async def main():
        server = await rpc.start_server(path, balancer(), handlers={"reload": reload})
        loop = asyncio.get_running_loop()

        def client():
            with rpc.Client(path) as c:
                ok = c.call({"op": "reload"})
                with pytest.raises(rpc.RpcError, match="the running configuration is kept"):
                    c.call({"op": "reload", "broken": True})
                return ok, c.call({"op": "ping"})
        try:
            return await loop.run_in_executor(None, client)
        finally:
            server.close()
            await server.wait_closed()

    ok, pong = asyncio.run(main())
    assert ok == {"file": "k.conf", "operations": {}} and pong == "pong"
    assert calls == [{"op": "reload"}, {"op": "reload", "broken": True}]


def test_fifos_devices_and_token_floods_are_refused_without_hanging(tmp_path, monkeypatch):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)   # nobody writes: opening it for reading would block
    for path, why in ((str(fifo), "not a regular file"), ("/dev/zero", "not a regular file"),
                      (str(tmp_path), "a directory, not a configuration file")):
        with pytest.raises(ka.ConfigError, match=f"^{path}: {why}"):
            ka.parse_file(path)
        with pytest.raises(ka.ConfigError, match=f"^{path}: {why}"):
            config_apply.load(path)
    inc = write(tmp_path, "inc.conf", f"include {fifo}\n")
    with pytest.raises(ka.ConfigError, match=f"^{inc}:1: {fifo}: not a regular file"):
        ka.parse_file(inc)
    # The token budget counts across lines and files (a smaller one here,
    # to keep the test short; the real one bounds memory to ~100 MB).
    monkeypatch.setattr(ka, "MAX_TOKENS", 1000)
    write(tmp_path, "many.inc", "{ } " * 300 + "\n")
    braces = write(tmp_path, "braces.conf", "global_defs " + "{ } " * 200 + "\n"
                   "include many.inc\ninclude many.inc\n")
    with pytest.raises(ka.ConfigError, match=rf"^{tmp_path}/many.inc:1: more than 1000 words"):
        ka.parse_file(braces)
    monkeypatch.undo()
    deep = write(tmp_path, "deep_pattern.conf", "include " + "{" * 500 + "a" + "}" * 500 + "\n")
    with pytest.raises(ka.ConfigError, match="more than 32 braces"):
        ka.parse_file(deep)


def test_daemon_publishes_the_dests_together_with_their_health(tmp_path):
    """The file's dests reach the engines in the same publish as the
    health checks' first say (an `alpha` dest never forwards before its
    checks pass): nothing is published between the operations and
    health.configure, once after it."""
    path = write(tmp_path, "keepalived.conf", BASE)
    published = []
    b = Balancer(Counters(512, 1024), publish=lambda s, d: published.append(len(published)))
    d = daemon_for(path, b)
    seen = []
    d.health.configure = lambda vss: seen.append(len(published))

    async def run():
        await d._apply_config()
        assert seen == [0] and len(published) == 1
        write(tmp_path, "keepalived.conf", BASE.replace("weight 2", "weight 3"))
        await d.reload()
        assert seen == [0, 1] and len(published) == 2
    asyncio.run(run())


def test_refusals_are_named_with_the_director_s_own_words(tmp_path):
    loaded = keep(tmp_path, BASE.replace("10.1.0.2 80", "10.0.0.1 80"))  # the VIP as a RIP
    b = balancer()
    errs = apply_all(b, loaded)
    assert len(errs) == 1 and errs[0].startswith(
        f"{tmp_path}/keepalived.conf:5: add_dest tcp 10.0.0.1:80 -> 10.0.0.1:80: ")
    assert "  " not in errs[0].split(": ", 1)[0]
    msg = b.apply_many([{"op": "add_dest", "proto": "tcp", "vaddr": "10.0.0.1", "vport": 80,
                         "daddr": "10.0.0.1", "dport": 80, "fwd": "masq"}])[0]["error"]
    assert errs[0].endswith(": " + msg)


def test_the_file_is_read_once_so_format_and_parse_see_the_same_bytes(tmp_path, monkeypatch):
    """An editor replacing the file between the format check and the parse
    must not have the parse read other contents (apply.load)."""
    path = write(tmp_path, "k.conf", "virtual_server 10.0.0.1 80 {\n  protocol TCP\n"
                 "  real_server 10.0.1.2 80 {\n  }\n}\n")
    reads = []
    real_read = ka.read_limited

    def read_limited(p, where=None):
        reads.append(p)
        return real_read(p, where) if len(reads) == 1 else b"-A -t 10.0.0.9:80 -s rr\n"
    monkeypatch.setattr(ka, "read_limited", read_limited)
    loaded = config_apply.load(path)
    assert reads == [path] and loaded.kind == "keepalived"
    assert [vs.vaddr for vs in loaded.virtual_servers] == ["10.0.0.1"]
