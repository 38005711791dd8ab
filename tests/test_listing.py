"""ipvsadm's listings byte for byte (pylvs.control.listing), from snapshots."""

from __future__ import annotations

import pytest

from pylvs.cli import adm
from pylvs.control import listing
from pylvs.control.balancer import Balancer
from pylvs.engine.tables import Counters


def _dest(daddr, dport, weight=1, active=0, inactive=0, fwd="masq", stats=None, rates=None,
          u=0, l=0):
    return {"daddr": daddr, "dport": dport, "fwd": fwd, "weight": weight,
            "activeconns": active, "inactconns": inactive, "persistconns": 0,
            "u_threshold": u, "l_threshold": l,
            "stats": stats or dict.fromkeys(listing_keys(), 0),
            "rates": rates or dict.fromkeys(("cps", "inpps", "outpps", "inbps", "outbps"), 0)}


def listing_keys():
    return ("conns", "inpkts", "outpkts", "inbytes", "outbytes")


def _svc(proto, vaddr, vport, sched="wlc", dests=(), **kw):
    s = {"proto": proto, "vaddr": vaddr, "vport": vport, "fwmark": 0, "sched": sched,
         "flags": [], "persistent": False, "timeout": 0, "netmask": "255.255.255.255",
         "pe": "", "ops": False, "dests": list(dests),
         "stats": dict.fromkeys(listing_keys(), 0),
         "rates": dict.fromkeys(("cps", "inpps", "outpps", "inbps", "outbps"), 0)}
    s.update(kw)
    return s


HEAD = ("IP Virtual Server version 1.2.1 (size=4096)\n"
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")


def test_reference_example_byte_exact():
    snap = {"version": "1.2.1", "size": 4096, "services": [
        _svc("TCP", "10.0.0.1", 80, dests=[_dest("192.168.1.2", 80, 1, 3, 17)])]}
    assert listing.list_all(snap) == (
        HEAD +
        "TCP  10.0.0.1:80 wlc\n"
        "  -> 192.168.1.2:80               Masq    1      3          17        \n")


def test_empty_table_is_header_only():
    assert listing.list_all({"services": []}) == HEAD


def test_sort_order_protocol_address_port_and_dests():
    snap = {"services": [
        _svc("UDP", "10.0.0.1", 53, "rr"),
        _svc("TCP", "10.0.0.10", 80),
        _svc("TCP", "10.0.0.2", 443),
        _svc("TCP", "10.0.0.2", 80, dests=[
            _dest("10.0.1.10", 80), _dest("10.0.1.9", 8080), _dest("10.0.1.9", 80)]),
    ]}
    assert listing.list_all(snap) == (
        HEAD +
        "TCP  10.0.0.2:80 wlc\n"
        "  -> 10.0.1.9:80                  Masq    1      0          0         \n"
        "  -> 10.0.1.9:8080                Masq    1      0          0         \n"
        "  -> 10.0.1.10:80                 Masq    1      0          0         \n"
        "TCP  10.0.0.2:443 wlc\n"
        "TCP  10.0.0.10:80 wlc\n"
        "UDP  10.0.0.1:53 rr\n")
    # --nosort keeps the director's order.
    assert listing.list_all(snap, nosort=True).splitlines()[3] == "UDP  10.0.0.1:53 rr"


@pytest.mark.parametrize("addrs, want", [
    # Within 2^31 of each other: numeric order.
    (["10.0.1.10", "10.0.1.9", "127.0.0.1"], ["10.0.1.9", "10.0.1.10", "127.0.0.1"]),
    # 2^31 or more apart, ipvsadm's (int)(a - b) turns the order round.
    (["10.0.0.1", "192.168.0.1"], ["192.168.0.1", "10.0.0.1"]),
    (["192.168.0.1", "10.0.0.1"], ["192.168.0.1", "10.0.0.1"]),
])
def test_dest_order_is_libipvs_wrapped_difference(addrs, want):
    snap = {"services": [_svc("TCP", "10.0.0.2", 80, dests=[_dest(a, 80) for a in addrs])]}
    got = [line.split()[1].rsplit(":", 1)[0] for line in listing.list_all(snap).splitlines()[4:]]
    assert got == want


def test_services_wrapped_address_order():
    snap = {"services": [_svc("TCP", "10.0.0.1", 80), _svc("TCP", "200.0.0.1", 80)]}
    assert [ln.split()[1] for ln in listing.list_all(snap).splitlines()[3:]] == [
        "200.0.0.1:80", "10.0.0.1:80"]


def test_nosort_lists_dests_newest_first_as_the_kernel():
    """A Balancer's snapshot keeps the kernel's list order (each dest added at
    the head; -e leaves a dest in place; a deleted and re-added one is new
    again): --nosort shows it, the default sorts it."""
    b = Balancer(Counters(max_services=4, max_dests=16))
    b.add_service("tcp", "10.0.0.2", 80, sched="rr")
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        b.add_dest("tcp", "10.0.0.2", 80, a, 80)
    b.edit_dest("tcp", "10.0.0.2", 80, "10.0.1.2", 80, weight=5)
    b.del_dest("tcp", "10.0.0.2", 80, "10.0.1.1", 80)
    b.add_dest("tcp", "10.0.0.2", 80, "10.0.1.1", 80)

    def order(**kw):
        return [ln.split()[1] for ln in listing.list_all(b.snapshot(), **kw).splitlines()[4:]]
    assert order(nosort=True) == ["10.0.1.1:80", "10.0.1.3:80", "10.0.1.2:80"]
    assert order() == ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]


def test_service_line_flags_persistence_mask_ops():
    snap = {"services": [
        _svc("TCP", "10.0.0.1", 0, "sh", flags=["sh-fallback", "sh-port"], persistent=True,
             timeout=300, netmask="255.255.255.0"),
        _svc("UDP", "10.0.0.1", 53, "wrr", ops=True),
    ]}
    assert listing.list_all(snap) == (
        HEAD +
        "TCP  10.0.0.1:0 sh (sh-fallback,sh-port) persistent 300 mask 255.255.255.0\n"
        "UDP  10.0.0.1:53 wrr ops\n")


def test_forward_names_and_wide_numbers():
    snap = {"services": [_svc("TCP", "1.2.3.4", 80, dests=[
        _dest("255.255.255.255", 65535, 65535, 1234567890, 4294967295, fwd="route"),
        _dest("1.1.1.1", 80, 0, fwd="tunnel")])]}
    # libipvs compares addresses by their u32 difference as an int: 1.1.1.1 -
    # 255.255.255.255 wraps to a positive number, so 255.255.255.255 comes first.
    assert listing.list_all(snap).splitlines()[4:] == [
        "  -> 255.255.255.255:65535        Route   65535  1234567890 4294967295",
        "  -> 1.1.1.1:80                   Tunnel  0      0          0         ",
    ]


def test_largenum_scaling():
    assert listing.largenum(0) == "        0"
    assert listing.largenum(99_999_999) == " 99999999"
    assert listing.largenum(100_000_000) == "  100000K"
    assert listing.largenum(999_999_999) == "  999999K"
    assert listing.largenum(1_000_000_000) == "    1000M"
    assert listing.largenum(99_999_999_999) == "   99999M"
    assert listing.largenum(100_000_000_000) == "     100G"
    assert listing.largenum(99_999_999_999_999) == "   99999G"
    assert listing.largenum(100_000_000_000_000) == "     100T"
    assert listing.largenum(5, exact=True) == "        5"
    assert listing.largenum(12345678, exact=True) == " 12345678"
    assert listing.largenum(123456789, exact=True) == " 123456789"
    assert listing.largenum(12345678901234, exact=True) == " 12345678901234"


def test_stats_listing():
    st = {"conns": 5, "inpkts": 123456789, "outpkts": 10, "inbytes": 1234567890123,
          "outbytes": 99}
    snap = {"services": [_svc("TCP", "10.0.0.1", 80, stats=st,
                              dests=[_dest("10.0.1.2", 80, stats=st)])]}
    assert listing.list_all(snap, "stats") == (
        "IP Virtual Server version 1.2.1 (size=4096)\n"
        "Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes\n"
        "  -> RemoteAddress:Port\n"
        "TCP  10.0.0.1:80                         5  123456K       10    1234G       99\n"
        "  -> 10.0.1.2:80                         5  123456K       10    1234G       99\n")
    assert listing.list_all(snap, "stats", exact=True).splitlines()[3] == (
        "TCP  10.0.0.1:80                         5 123456789       10 1234567890123       99")


def test_rate_listing():
    r = {"cps": 3, "inpps": 120, "outpps": 110, "inbps": 150_000_000, "outbps": 900}
    snap = {"services": [_svc("UDP", "10.0.0.1", 53, rates=r,
                              dests=[_dest("10.0.1.2", 53, rates=r)])]}
    assert listing.list_all(snap, "rate") == (
        "IP Virtual Server version 1.2.1 (size=4096)\n"
        "Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS\n"
        "  -> RemoteAddress:Port\n"
        "UDP  10.0.0.1:53                         3      120      110  150000K      900\n"
        "  -> 10.0.1.2:53                         3      120      110  150000K      900\n")


def test_thresholds_and_persistent_conn_listings():
    snap = {"services": [_svc("TCP", "10.0.0.1", 80,
                              dests=[_dest("10.0.1.2", 80, 2, 1, 4, u=100, l=50)])]}
    assert listing.list_all(snap, "thresholds").splitlines()[1:] == [
        "Prot LocalAddress:Port            Uthreshold Lthreshold ActiveConn InActConn ",
        "  -> RemoteAddress:Port",
        "TCP  10.0.0.1:80 wlc",
        "  -> 10.0.1.2:80                  100        50         1          4         ",
    ]
    assert listing.list_all(snap, "persistent-conn").splitlines()[1:] == [
        "Prot LocalAddress:Port            Weight    PersistConn ActiveConn InActConn ",
        "  -> RemoteAddress:Port",
        "TCP  10.0.0.1:80 wlc",
        "  -> 10.0.1.2:80                  2         0           1          4         ",
    ]


def test_one_service_has_no_version_header():
    svc = _svc("TCP", "10.0.0.1", 80, dests=[_dest("10.0.1.2", 80)])
    assert listing.list_service(svc) == (
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"
        "TCP  10.0.0.1:80 wlc\n"
        "  -> 10.0.1.2:80                  Masq    1      0          0         \n")


def test_save_format_and_order():
    snap = {"services": [
        _svc("UDP", "10.0.0.1", 53, "rr", ops=True, dests=[_dest("10.0.1.3", 53, 2)]),
        _svc("TCP", "10.0.0.1", 0, "sh", flags=["sh-port"], persistent=True, timeout=60,
             netmask="255.255.0.0", dests=[_dest("10.0.1.2", 0, fwd="route"),
                                           _dest("10.0.1.1", 0, 5, fwd="tunnel")]),
    ]}
    assert listing.save(snap) == (
        "-A -t 10.0.0.1:0 -s sh -p 60 -M 255.255.0.0 -b sh-port\n"
        "-a -t 10.0.0.1:0 -r 10.0.1.1:0 -i -w 5 --tun-type ipip\n"
        "-a -t 10.0.0.1:0 -r 10.0.1.2:0 -g -w 1\n"
        "-A -u 10.0.0.1:53 -s rr -o\n"
        "-a -u 10.0.0.1:53 -r 10.0.1.3:53 -m -w 2\n")


def test_timeout_line():
    assert listing.timeouts({"tcp": 900, "tcpfin": 120, "udp": 300}) == (
        "Timeout (tcp tcpfin udp): 900 120 300\n")


def test_conn_listing():
    rows = [
        {"proto": "TCP", "caddr": "10.0.2.5", "cport": 51234, "vaddr": "10.0.0.1",
         "vport": 80, "daddr": "10.0.1.2", "dport": 8080, "state": "ESTABLISHED",
         "expires": 899},
        {"proto": "UDP", "caddr": "10.0.2.5", "cport": 5353, "vaddr": "10.0.0.1",
         "vport": 53, "daddr": "10.0.1.3", "dport": 53, "state": "UDP", "expires": 7},
    ]
    assert listing.conns(rows) == (
        "IPVS connection entries\n"
        "pro expire state       source             virtual            destination\n"
        "TCP 14:59  ESTABLISHED 10.0.2.5:51234     10.0.0.1:80        10.0.1.2:8080\n"
        "UDP 00:07  UDP         10.0.2.5:5353      10.0.0.1:53        10.0.1.3:53\n")


def test_conn_listing_with_persistent_conn_has_the_pe_columns():
    """ipvsadm's list_conn: -c --persistent-conn heads the persistence
    engine's columns; rows without pe data print as without the option."""
    rows = [{"proto": "TCP", "caddr": "10.0.2.0", "cport": 0, "vaddr": "10.0.0.1",
             "vport": 80, "daddr": "10.0.1.2", "dport": 80, "state": "NONE", "expires": 290}]
    assert listing.conns(rows, pe_columns=True) == (
        "IPVS connection entries\n"
        "pro expire state       source             virtual            destination        "
        "pe name          pe_data\n"
        "TCP 04:50  NONE        10.0.2.0:0         10.0.0.1:80        10.0.1.2:80\n")


def test_pe_is_saved_without_persistence_as_ipvsadm_does():
    b = Balancer(Counters(max_services=8, max_dests=16))
    b.add_service("udp", "10.0.0.1", 5060, pe="sip")
    assert "-A -u 10.0.0.1:5060 -s wlc --pe sip\n" in listing.save(b.snapshot())


def test_listing_of_a_live_balancer_snapshot():
    c = Counters(max_services=8, max_dests=16)
    b = Balancer(c)
    b.add_service("tcp", "10.0.0.1", 80)
    s1 = b.add_dest("tcp", "10.0.0.1", 80, "10.0.1.3", 80, weight=2)
    s2 = b.add_dest("tcp", "10.0.0.1", 80, "10.0.1.2", 8080, weight=1)
    c.dest_conns[s1] = [4, 2]
    c.dest_conns[s2] = [0, 1]
    assert listing.list_all(b.snapshot()) == (
        HEAD +
        "TCP  10.0.0.1:80 wlc\n"
        "  -> 10.0.1.2:8080                Masq    1      0          1         \n"
        "  -> 10.0.1.3:80                  Masq    2      4          2         \n")


@pytest.mark.parametrize("fmt", ["default", "stats", "rate", "thresholds", "persistent-conn",
                                 "tun-info"])
def test_every_line_ends_with_newline(fmt):
    snap = {"services": [_svc("TCP", "10.0.0.1", 80, dests=[_dest("10.0.1.2", 80)])]}
    text = listing.list_all(snap, fmt)
    assert text.endswith("\n") and "\n\n" not in text


def _mixed_balancer() -> Balancer:
    """One service with every method and every GUE flag, and a UDP one."""
    b = Balancer(Counters(max_services=8, max_dests=16))
    b.add_service("tcp", "10.0.0.1", 80)
    b.add_service("udp", "10.0.0.1", 53, sched="rr")
    b.add_dest("tcp", "10.0.0.1", 80, "10.0.1.2", 8080, fwd="masq")
    b.add_dest("tcp", "10.0.0.1", 80, "10.0.1.3", None, fwd="route", weight=3)
    b.add_dest("tcp", "10.0.0.1", 80, "10.0.2.4", None, fwd="tunnel", weight=0)
    b.add_dest("tcp", "10.0.0.1", 80, "10.0.2.5", None, fwd="tunnel", tun_type="gue",
               tun_port=6080)
    b.add_dest("tcp", "10.0.0.1", 80, "10.0.2.6", None, fwd="tunnel", tun_type="gue",
               tun_port=65535, tun_flags="csum")
    b.add_dest("udp", "10.0.0.1", 53, "10.0.2.7", None, fwd="tunnel", tun_type="gue",
               tun_port=1, tun_flags="remcsum")
    return b


MIXED_SAVE = (
    "-A -t 10.0.0.1:80 -s wlc\n"
    "-a -t 10.0.0.1:80 -r 10.0.1.2:8080 -m -w 1\n"
    "-a -t 10.0.0.1:80 -r 10.0.1.3:80 -g -w 3\n"
    "-a -t 10.0.0.1:80 -r 10.0.2.4:80 -i -w 0 --tun-type ipip\n"
    "-a -t 10.0.0.1:80 -r 10.0.2.5:80 -i -w 1 --tun-type gue --tun-port 6080 --tun-nocsum\n"
    "-a -t 10.0.0.1:80 -r 10.0.2.6:80 -i -w 1 --tun-type gue --tun-port 65535 --tun-csum\n"
    "-A -u 10.0.0.1:53 -s rr\n"
    "-a -u 10.0.0.1:53 -r 10.0.2.7:53 -i -w 1 --tun-type gue --tun-port 1 --tun-remcsum\n")


def test_mixed_methods_listed_as_ipvsadm():
    assert listing.list_all(_mixed_balancer().snapshot()) == (
        HEAD +
        "TCP  10.0.0.1:80 wlc\n"
        "  -> 10.0.1.2:8080                Masq    1      0          0         \n"
        "  -> 10.0.1.3:80                  Route   3      0          0         \n"
        "  -> 10.0.2.4:80                  Tunnel  0      0          0         \n"
        "  -> 10.0.2.5:80                  Tunnel  1      0          0         \n"
        "  -> 10.0.2.6:80                  Tunnel  1      0          0         \n"
        "UDP  10.0.0.1:53 rr\n"
        "  -> 10.0.2.7:53                  Tunnel  1      0          0         \n")


def test_tun_info_listing_byte_exact():
    assert listing.list_all(_mixed_balancer().snapshot(), listing.TUN_INFO) == (
        "IP Virtual Server version 1.2.1 (size=4096)\n"
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn\n"
        "TCP  10.0.0.1:80 wlc\n"
        "  -> 10.0.1.2:8080                Masq    n/a           1      0          0         \n"
        "  -> 10.0.1.3:80                  Route   n/a           3      0          0         \n"
        "  -> 10.0.2.4:80                  Tunnel  ipip          0      0          0         \n"
        "  -> 10.0.2.5:80                  Tunnel  gue:6080:-c   1      0          0         \n"
        "  -> 10.0.2.6:80                  Tunnel  gue:65535:+c  1      0          0         \n"
        "UDP  10.0.0.1:53 rr\n"
        "  -> 10.0.2.7:53                  Tunnel  gue:1:r+c     1      0          0         \n")


def test_gre_dests_listed_and_saved_as_ipvsadm():
    # The director refuses GRE for now; a snapshot that has one (a later
    # engine) is printed the way ipvsadm prints it.
    snap = {"services": [_svc("TCP", "10.0.0.1", 80, dests=[
        {**_dest("10.0.2.8", 80, fwd="tunnel"), "tun_type": "gre", "tun_flags": 1},
        {**_dest("10.0.2.9", 80, fwd="tunnel"), "tun_type": "gre", "tun_flags": 0}])]}
    assert listing.list_all(snap, listing.TUN_INFO).splitlines()[4:] == [
        "  -> 10.0.2.8:80                  Tunnel  gre:+c        1      0          0         ",
        "  -> 10.0.2.9:80                  Tunnel  gre:-c        1      0          0         "]
    assert listing.save(snap).splitlines()[1:] == [
        "-a -t 10.0.0.1:80 -r 10.0.2.8:80 -i -w 1 --tun-type gre --tun-csum",
        "-a -t 10.0.0.1:80 -r 10.0.2.9:80 -i -w 1 --tun-type gre --tun-nocsum"]


def test_save_restore_round_trip_with_every_tunnel_option():
    text = listing.save(_mixed_balancer().snapshot())
    assert text == MIXED_SAVE
    fresh = Balancer(Counters(max_services=8, max_dests=16))
    results = fresh.apply_many(adm.parse_restore(text))
    assert all(r["ok"] for r in results), results
    assert listing.save(fresh.snapshot()) == text
    assert listing.list_all(fresh.snapshot(), listing.TUN_INFO) == listing.list_all(
        _mixed_balancer().snapshot(), listing.TUN_INFO)
