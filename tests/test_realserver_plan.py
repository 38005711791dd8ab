"""`pylvs realserver setup`'s plan for a Tun real server whose kernel has the ipip module.

These machines have no ipip module, so the namespace tests only see the
decapsulator branch; here a stand-in for pyroute2's IPRoute and a sysctl
tree in a temporary directory give the plan a kernel with ``tunl0``.
"""

from __future__ import annotations

import ipaddress
import re

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from pylvs.realserver import config

IFF_UP = 1


class FakeIPRoute:
    """The few IPRoute calls config makes, over plain dicts."""

    def __init__(self, links: dict[str, int], addrs: list[tuple[str, int, str]],
                 can_load_ipip: bool = False, default: bool = True):
        self.default = default
        self.links = {name: {"index": i + 1, "flags": flags, "IFLA_IFNAME": name,
                             "IFLA_ADDRESS": f"02:00:00:00:00:{i:02x}"}
                      for i, (name, flags) in enumerate(links.items())}
        self.addrs = [{"IFA_ADDRESS": a, "prefixlen": p, "index": self.links[dev]["index"]}
                      for a, p, dev in addrs]
        self.can_load_ipip = can_load_ipip
        self.calls: list[tuple] = []

    def link_lookup(self, ifname):
        return [self.links[ifname]["index"]] if ifname in self.links else []

    def get_links(self, *index):
        return [ln for ln in self.links.values() if not index or ln["index"] in index]

    def get_addr(self, family):
        return self.addrs

    def get_routes(self, family, table):
        if table == 255:
            # The local table's broadcast routes (type 3) the kernel adds per address.
            return [{"type": 3, "dst_len": 32, "RTA_DST": str(ipaddress.IPv4Interface(
                f"{a['IFA_ADDRESS']}/{a['prefixlen']}").network.broadcast_address)}
                for a in self.addrs if a["prefixlen"] < 31]
        return [] if not self.default else [{"type": 1, "dst_len": 0, "RTA_GATEWAY": "10.1.0.1", "RTA_OIF": self.links["eth0"]["index"],
                 "proto": 3}]

    def link(self, cmd, **kw):
        self.calls.append(("link", cmd, kw))
        if cmd == "add":
            if not self.can_load_ipip:
                raise NetlinkError(95, "Operation not supported")
            # Loading the module creates tunl0 beside the probe.
            self.links["tunl0"] = {"index": 90, "flags": 0, "IFLA_IFNAME": "tunl0"}
            self.links[kw["ifname"]] = {"index": 91, "flags": 0, "IFLA_IFNAME": kw["ifname"]}
        elif cmd == "del":
            self.links = {n: ln for n, ln in self.links.items() if ln["index"] != kw["index"]}


@pytest.fixture
def conf(tmp_path, monkeypatch):
    """A /proc/sys/net/ipv4/conf tree: all strict, every device's own value 0."""
    def make(devs=("all", "default", "lo", "eth0", "tunl0"), all_rp=1):
        for dev in devs:
            d = tmp_path / dev
            d.mkdir()
            for name in ("arp_ignore", "arp_announce", "rp_filter"):
                (d / name).write_text("0\n")
        (tmp_path / "all" / "rp_filter").write_text(f"{all_rp}\n")
        monkeypatch.setattr(config, "SYSCTL", tmp_path)
        return tmp_path
    return make


def _changes(steps):
    return {(s["kind"], s.get("dev"), s.get("name")): s.get("new") for s in steps if s["changed"]}


def test_tun_with_the_kernel_module_uses_tunl0(conf):
    conf()
    ipr = FakeIPRoute({"lo": IFF_UP, "eth0": IFF_UP, "tunl0": 0}, [("10.1.0.2", 24, "eth0")])
    cfg = config.validate(config.Config("tun", ["192.0.2.10"]), ipr)
    steps, mode = config.plan(cfg, ipr)
    assert mode == "kernel-ipip"
    assert _changes(steps) == {
        ("addr", "lo", None): None,
        ("sysctl", "all", "arp_ignore"): 1, ("sysctl", "all", "arp_announce"): 2,
        ("sysctl", "eth0", "arp_ignore"): 1, ("sysctl", "eth0", "arp_announce"): 2,
        ("link_up", "tunl0", None): None,
        # all lowered, every device but tunl0 raised to the old strict value,
        # tunl0 itself 0: only tunl0's effective value changes.
        ("sysctl", "all", "rp_filter"): 0, ("sysctl", "default", "rp_filter"): 1,
        ("sysctl", "lo", "rp_filter"): 1, ("sysctl", "eth0", "rp_filter"): 1,
    }
    assert ipr.calls == []  # tunl0 existed: no probe


def test_tun_probe_loads_the_module_and_removes_the_probe(conf):
    conf(all_rp=2)
    ipr = FakeIPRoute({"lo": IFF_UP, "eth0": IFF_UP}, [("10.1.0.2", 24, "eth0")],
                      can_load_ipip=True)
    steps, mode = config.plan(config.validate(config.Config("tun", ["192.0.2.10"]), ipr), ipr)
    assert mode == "kernel-ipip"
    assert [c[1] for c in ipr.calls] == ["add", "del"] and "tunl0" in ipr.links
    assert not any(n.startswith("plvsprobe") for n in ipr.links)
    # Loose 'all' (2) still drops on tunl0, which has no address: lowered to 0.
    assert _changes(steps)[("sysctl", "all", "rp_filter")] == 0


@pytest.mark.parametrize("all_rp", [1, 2])
@pytest.mark.parametrize("tundev", ["tunl0", "plvsdec0"])
@pytest.mark.parametrize("tun_rp", [0, 1, 2])
def test_tun_device_ends_at_effective_0_from_strict_or_loose(conf, monkeypatch, all_rp,
                                                              tundev, tun_rp):
    """A tunnel device has no IPv4 address, so fib_validate_source drops
    decapsulated packets on it in loose mode (2) as in strict mode (1): 'all'
    and the device both go to 0, whatever they were, and every other device
    is raised to the old 'all' so that its effective value stays."""
    root = conf(devs=("all", "default", "lo", "eth0", tundev), all_rp=all_rp)
    (root / tundev / "rp_filter").write_text(f"{tun_rp}\n")
    links = {"lo": IFF_UP, "eth0": IFF_UP, tundev: IFF_UP}
    if tundev == "plvsdec0":
        monkeypatch.setattr(config, "running_decap", lambda: {"pid": 4242, "tun": tundev})
    ipr = FakeIPRoute(links, [("10.1.0.2", 24, "eth0")])
    steps, mode = config.plan(config.validate(config.Config("tun", ["192.0.2.10"]), ipr), ipr)
    assert mode == ("kernel-ipip" if tundev == "tunl0" else "decap")
    after = {(s["dev"]): s["new"] for s in steps if s["kind"] == "sysctl"
             and s["name"] == "rp_filter"}
    assert after["all"] == 0 and after[tundev] == 0
    assert {d: after[d] for d in ("default", "lo", "eth0")} == dict.fromkeys(
        ("default", "lo", "eth0"), all_rp)
    all_step = next(s for s in steps if s.get("dev") == "all" and s["name"] == "rp_filter")
    assert all_step["changed"] and all_step["old"] == all_rp
    assert "no address" in all_step["why"] and "loose" in all_step["why"]


def test_tun_without_the_module_leaves_it_to_the_decapsulator(conf):
    conf(devs=("all", "default", "lo", "eth0"))
    ipr = FakeIPRoute({"lo": IFF_UP, "eth0": IFF_UP}, [("10.1.0.2", 24, "eth0")])
    steps, mode = config.plan(config.validate(config.Config("tun", ["192.0.2.10"]), ipr), ipr)
    assert mode == "decap"
    assert not any(s.get("dev") == "tunl0" for s in steps)
    assert _changes(steps)[("sysctl", "all", "rp_filter")] == 0


@pytest.mark.parametrize("all_rp, eth0_rp, want", [
    (1, 0, 2),      # strict 'all': the interface goes loose, 'all' stays
    (0, 1, 2),      # strict interface: loose
    (2, 0, None),   # loose already: nothing to change
    (0, 0, None),   # no filtering: nothing to change
])
def test_dr_relaxes_a_strict_reverse_path_filter_on_its_interface(conf, all_rp, eth0_rp, want):
    """A DR real server with two networks drops every client SYN under strict
    rp_filter when the route to the client leaves by the other interface
    (TcpExtIPReversePathFilter): setup makes the receiving interface loose."""
    root = conf(devs=("all", "default", "lo", "eth0"), all_rp=all_rp)
    (root / "eth0" / "rp_filter").write_text(f"{eth0_rp}\n")
    ipr = FakeIPRoute({"lo": IFF_UP, "eth0": IFF_UP}, [("10.1.0.2", 24, "eth0")])
    steps, mode = config.plan(config.validate(config.Config("dr", ["192.0.2.10"]), ipr), ipr)
    changes = _changes(steps)
    assert changes.get(("sysctl", "eth0", "rp_filter")) == want
    assert ("sysctl", "all", "rp_filter") not in changes


@pytest.mark.parametrize("own_rp", [0, 1])
def test_tun_setup_with_the_decapsulator_running_keeps_its_tun_device_at_0(
        conf, monkeypatch, own_rp):
    """Drift put 'all' back to strict while `pylvs realserver run` runs: setup
    lowers 'all' and raises the other devices to keep their filtering, but the
    decapsulator's own TUN device stays at (or goes back to) 0, unrecorded."""
    root = conf(devs=("all", "default", "lo", "eth0", "plvsdec0"))
    (root / "plvsdec0" / "rp_filter").write_text(f"{own_rp}\n")
    monkeypatch.setattr(config, "running_decap", lambda: {"pid": 4242, "tun": "plvsdec0"},
                        raising=False)
    ipr = FakeIPRoute({"lo": IFF_UP, "eth0": IFF_UP, "plvsdec0": IFF_UP},
                      [("10.1.0.2", 24, "eth0")])
    steps, mode = config.plan(config.validate(config.Config("tun", ["192.0.2.10"]), ipr), ipr)
    assert mode == "decap"
    changes = _changes(steps)
    assert changes[("sysctl", "all", "rp_filter")] == 0
    assert changes[("sysctl", "eth0", "rp_filter")] == 1
    own = [s for s in steps if s.get("dev") == "plvsdec0"]
    assert [(s["new"], s["changed"], s.get("own")) for s in own] == [(0, own_rp != 0, True)]
    assert "pylvs realserver run" in own[0]["why"]


@pytest.mark.parametrize("vip, message", [
    ("10.1.0.255", "--vip 10.1.0.255 is a broadcast address here"),
    ("10.1.0.2", "--vip 10.1.0.2 is eth0's own (primary) address"),
])
def test_vip_refused_when_not_a_unicast_address_of_its_own(conf, vip, message):
    conf()
    ipr = FakeIPRoute({"lo": IFF_UP, "eth0": IFF_UP}, [("10.1.0.2", 24, "eth0")])
    ipr.addrs[0]["flags"] = 0
    with pytest.raises(config.RealServerError, match=re.escape(message)):
        config.validate(config.Config("dr", [vip]), ipr)


@pytest.mark.parametrize("default", [True, False])
def test_nat_takes_the_interface_the_dip_is_connected_on(conf, default):
    """`pylvs check`'s fix `setup --fwd nat --dip DIP` must work on a real
    server with no default route, or one whose default route leaves by
    another interface."""
    conf(devs=("all", "default", "lo", "eth0", "eth1"))
    ipr = FakeIPRoute({"lo": IFF_UP, "eth0": IFF_UP, "eth1": IFF_UP},
                      [("10.1.0.2", 24, "eth0"), ("10.2.0.2", 24, "eth1")], default=default)
    cfg = config.validate(config.Config("nat", dip="10.2.0.1"), ipr)
    assert (cfg.iface, cfg.dip, cfg.clients) == ("eth1", "10.2.0.1", ["0.0.0.0/0"])


def test_dr_and_tun_on_one_host_leave_its_interface_loose(conf):
    """A DR+Tun real server from strict 'all': Tun lowers 'all' and raises
    every other device to keep its filtering, DR makes the interface loose;
    one step for eth0, ending loose (2), never strict."""
    conf(devs=("all", "default", "lo", "eth0"))
    ipr = FakeIPRoute({"lo": IFF_UP, "eth0": IFF_UP}, [("10.1.0.2", 24, "eth0")])
    steps, mode = config.plan(config.Config(config.DR_TUN, ["192.0.2.10"], "eth0"), ipr)
    assert mode == "decap"
    eth0 = [s for s in steps if (s.get("dev"), s.get("name")) == ("eth0", "rp_filter")]
    assert [(s["old"], s["new"], s["changed"]) for s in eth0] == [(0, 2, True)]
    changes = _changes(steps)
    assert changes[("sysctl", "all", "rp_filter")] == 0
    assert changes[("sysctl", "lo", "rp_filter")] == 1


@pytest.mark.parametrize("old, new, want", [
    ("dr", "tun", config.DR_TUN), ("tun", "dr", config.DR_TUN),
    (config.DR_TUN, "dr", config.DR_TUN), ("dr", "nat", None), ("dr", "dr", None)])
def test_dr_and_tun_setups_extend_each_other(old, new, want):
    merged = config._extend(config.Config(old, ["192.0.2.10"], "eth0"),
                            config.Config(new, ["192.0.2.11"], "eth0"))
    assert (merged and merged.fwd) == want
    if want:
        assert merged.vips == ["192.0.2.10", "192.0.2.11"]
