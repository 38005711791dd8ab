"""VIP following (pylvs/control/vipfollow.py): the table the socket filter
and the steering sets are built from leaves out the services whose VIP is
not an address of this host, and only their client side."""

from __future__ import annotations

import struct
import socket

import pytest

from pylvs.control import vipfollow
from pylvs.control.steering import sets_of
from pylvs.engine import tables
from pylvs.io import bpf
from pylvs.runtime import daemon as D

VIP1, VIP2, RIP, CIP = "10.0.0.100", "10.0.0.101", "10.0.1.11", "10.0.2.2"


def published():
    """TCP VIP1:80 and UDP VIP2:53 with a NAT dest each, a free slot for
    VIP 10.0.0.250 (not a service)."""
    s = tables.empty_services(3)
    s[0] = (bpf.ip(VIP1), 80, tables.PROTO_TCP, tables.SVC_F_USED, 0, 0)
    s[1] = (bpf.ip(VIP2), 53, tables.PROTO_UDP, tables.SVC_F_USED, 0, 0)
    s[2] = (bpf.ip("10.0.0.250"), 80, tables.PROTO_TCP, 0, 0, 0)
    d = tables.empty_dests(2)
    for i, port in enumerate((8080, 5353)):
        d[i]["daddr"], d[i]["dport"], d[i]["svc"] = bpf.ip(RIP), port, i
        d[i]["flags"], d[i]["fwd"] = tables.DEST_F_USED, tables.FWD_MASQ
    return s, d


def frame(src, dst, proto, sport, dport) -> bytes:
    l4 = (struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 512, 0, 0)
          if proto == 6 else struct.pack("!HHHH", sport, dport, 8, 0))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + l4


# (description, local addresses, frames the filter takes, "services" keys)
CASES = [
    ("both VIPs local", {VIP1, VIP2, "10.0.0.1"},
     {"to VIP1", "to VIP2", "reply 8080", "reply 5353"},
     [(6, bpf.ip(VIP1), 80), (17, bpf.ip(VIP2), 53)]),
    ("VIP2 moved away", {VIP1, "10.0.0.1"},
     {"to VIP1", "reply 8080", "reply 5353"}, [(6, bpf.ip(VIP1), 80)]),
    ("no VIP local: replies still taken (ip_vs_out at FORWARD)", {"10.0.0.1"},
     {"reply 8080", "reply 5353"}, []),
    ("host-order ints work as strings do", {bpf.ip(VIP2)},
     {"to VIP2", "reply 8080", "reply 5353"}, [(17, bpf.ip(VIP2), 53)]),
]

FRAMES = {
    "to VIP1": frame(CIP, VIP1, 6, 40000, 80),
    "to VIP2": frame(CIP, VIP2, 17, 40000, 53),
    "reply 8080": frame(RIP, CIP, 6, 8080, 40000),
    "reply 5353": frame(RIP, CIP, 17, 5353, 40000),
}


@pytest.mark.parametrize("name,local,taken,keys", CASES, ids=[c[0] for c in CASES])
def test_the_filter_and_steering_take_only_local_vips(name, local, taken, keys):
    services, dests = published()
    before = services.copy()
    view = vipfollow.standby_view(services, local)
    assert (services == before).all()   # the engines' table is never written
    prog = bpf.for_tables(view, dests)
    assert {k for k, f in FRAMES.items() if bpf.run(prog, f) > 0} == taken
    sets = sets_of(view, dests, local)
    assert sets["services"] == keys
    assert sets["vips"] == sorted({a for _, a, _ in keys})
    assert sets["realservers"] == [(6, bpf.ip(RIP), 8080), (17, bpf.ip(RIP), 5353)]
    # Worker steering keys clients by the full tables whatever the VIPs
    # (a synced conn lands where its frames will, after a takeover too).
    assert bpf.client_mask(view) == bpf.client_mask(services)


def test_a_view_is_the_table_itself_when_every_vip_is_local():
    services, _ = published()
    assert vipfollow.standby_view(services, [VIP1, VIP2]) is services


def test_changes_name_each_vip_and_its_services():
    services, _ = published()
    lines = vipfollow.changes(services, {VIP1, "10.0.0.1"}, {VIP2, "10.0.0.1"})
    assert lines == [
        f"VIP {VIP1} left this host: not forwarding TCP {VIP1}:80 "
        "(IPVS sees only packets delivered locally)",
        f"VIP {VIP2} is an address of this host: forwarding UDP {VIP2}:53"]
    assert vipfollow.changes(services, {"10.0.0.1"}, {"10.0.0.2"}) == []


class Ipr:
    def __init__(self, sets):
        self.sets = list(sets)

    def get_addr(self, family):
        class Msg:
            def __init__(self, a):
                self.a = a

            def get_attr(self, name):
                return self.a if name == "IFA_LOCAL" else None
        s = self.sets.pop(0)
        if isinstance(s, Exception):
            raise s
        return [Msg(a) for a in s]


def test_the_watcher_reports_changes_only_and_survives_netlink_errors():
    seen = []
    w = vipfollow.AddrWatcher(seen.append)
    ipr = Ipr([{"10.0.0.1"}, {"10.0.0.1"}, OSError("EBUSY"), {"10.0.0.1", VIP1}])
    for _ in range(4):
        w.poll(ipr)
    assert seen == [frozenset({"10.0.0.1"}), frozenset({"10.0.0.1", VIP1})]
    assert w.errors == 1


def test_a_watcher_without_pyroute2_s_socket_fails_start(monkeypatch):
    """pyroute2's IPRoute, opened in the watcher's thread, is refused:
    start() raises OSError (the daemon then keeps the resolver's 2 s
    refresh) and leaves no thread behind, instead of a thread dying
    with a traceback on stderr while the daemon believes it watches."""
    import pyroute2

    def refused(*a, **kw):
        raise pyroute2.NetlinkError(1, "Operation not permitted")
    monkeypatch.setattr(pyroute2, "IPRoute", refused)
    w = vipfollow.AddrWatcher(lambda addrs: None)
    with pytest.raises(OSError, match="Operation not permitted"):
        w.start()
    assert not w._thread.is_alive() and w._sock is None


def test_a_watcher_that_fails_later_says_so_and_hands_over(monkeypatch, caplog):
    """The thread fails after start (here: select on its socket): the
    failure is logged and on_fail called, so the daemon follows the
    addresses another way."""
    import threading

    failed = threading.Event()
    seen = []
    w = vipfollow.AddrWatcher(seen.append, on_fail=failed.set)

    def broken(*a):
        raise OSError(9, "Bad file descriptor")
    monkeypatch.setattr(vipfollow.select, "select", broken)
    with caplog.at_level("ERROR", logger="pylvs"):
        w.start()
        assert failed.wait(5)
        w._thread.join(5)
    assert len(seen) == 1   # the first reading came before
    assert "following local addresses failed" in caplog.text
    w.close()


def test_drain_ends_on_an_error_other_than_enobufs():
    """A closed socket (close() after its 5 s join gave up) fails every
    recv with EBADF: _drain returns instead of spinning on it; ENOBUFS
    (notifications lost) means something changed."""
    import errno

    class Sock:
        def __init__(self, errs):
            self.errs, self.calls = list(errs), 0

        def recv(self, n):
            self.calls += 1
            if self.calls > 1000:   # the bound of a test that would spin
                raise BlockingIOError
            raise OSError(self.errs[min(self.calls, len(self.errs)) - 1], "")
    w = vipfollow.AddrWatcher()
    w._sock = Sock([errno.EBADF])
    assert w._drain() is False and w._sock.calls == 1
    w._sock = Sock([errno.ENOBUFS, errno.EBADF])
    assert w._drain() is True and w._sock.calls == 2


def test_the_daemon_falls_back_to_the_resolver_when_the_watcher_fails(monkeypatch):
    """pylvs run --vips local: a watcher that cannot start leaves the
    resolver's callback in place and hands it the addresses it read."""
    from types import SimpleNamespace

    def refused(self):
        raise OSError("reading addresses with pyroute2: refused")
    monkeypatch.setattr(vipfollow.AddrWatcher, "start", refused)
    seen = []
    d = SimpleNamespace(resolver=SimpleNamespace(on_local_change="unset",
                                                 local=frozenset({VIP1})),
                        _local_changed=seen.append)
    d._addrs_unwatched = lambda: D.Daemon._addrs_unwatched(d)
    D.Daemon._watch_addrs(d)
    assert d.resolver.on_local_change == seen.append and d._addrwatch is None
    assert seen == [frozenset({VIP1})]


def test_run_option():
    with pytest.raises(SystemExit):
        D.main(["--tap", "t0", "--addr", "10.0.0.1/24", "--vips", "local"])
    with pytest.raises(SystemExit):
        D.main(["--vips", "some"])


class RecordingSteering:
    def __init__(self):
        self.applied = []

    def apply(self, services, dests, local, taken=None):
        # What the kernel is kept from must not follow the VIPs.
        assert sets_of(services, dests, local)["services"] == [(6, bpf.ip(VIP1), 80)]
        self.applied.append(sets_of(services if taken is None else taken, dests,
                                    local)["services"])

    def remove(self):
        pass


def test_the_daemon_steers_by_the_local_vips_and_logs_the_moves(monkeypatch, caplog):
    import numpy as np

    import pylvs.engine
    from pylvs.control import ports as P
    from pylvs.io.memory import MemoryBackend

    class Engine:
        conn_count, capacity, memory = 0, 10, 0

        def __getattr__(self, name):
            return lambda *a: None

    class Resolver:
        on_change = on_local_change = None

        def resolve(self, daddr):
            return None

        def start(self):
            pass

        def close(self):
            pass

    class Watch:
        state = P.NetState(np.zeros(2, P.PORT_DTYPE), np.zeros(0, P.ROUTE_DTYPE),
                           np.zeros(0, np.uint32))
        on_change = None

        def start(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(pylvs.engine, "new_engine", lambda *a, **kw: Engine())
    steering = RecordingSteering()
    for vips, want in (("local", [[], [(6, bpf.ip(VIP1), 80)], []]),
                       ("all", [[(6, bpf.ip(VIP1), 80)]] * 3)):
        steering.applied.clear()
        d = D.Daemon(D.Options(ifaces=["a", "b"], engine="python", vips=vips),
                     backend=MemoryBackend(["a", "b"]), steering=steering, resolver=Resolver())
        d._netwatch = Watch()
        d._build()
        d._local = frozenset({"10.0.0.1"})
        services, dests = published()
        services["flags"][1] = 0
        caplog.clear()
        with caplog.at_level("INFO", logger="pylvs"):
            d.publish(services, dests)
            d._apply_local(frozenset({"10.0.0.1", VIP1}))
            d._apply_local(frozenset({"10.0.0.1"}))
        assert steering.applied == want
        taken = d.backend.filter[0]
        assert bool(taken["flags"][0] & tables.SVC_F_STANDBY) == (vips == "local")
        text = caplog.text
        assert (f"VIP {VIP1} is not an address of this host" in text) == (vips == "local")
        assert (f"VIP {VIP1} left this host" in text) == (vips == "local")
        d._shutdown()
