"""The control socket: server and client over a unix socket in a temp dir,
bad requests, and `pylvs adm` end to end (-S | -R round trip) through it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import stat
import threading
import time

import pytest

from pylvs.cli import adm
from pylvs.control import rpc
from pylvs.control.balancer import Balancer
from pylvs.engine import states
from pylvs.engine.tables import Counters


class Director:
    """A Balancer served on its own event loop thread, as `pylvs run` does."""

    def __init__(self, path: str, extras=None):
        self.path = path
        self.extras = extras
        self.counters = Counters(max_services=16, max_dests=64)
        self.published = []
        self.balancer = Balancer(self.counters,
                                 publish=lambda s, d: self.published.append((s, d)))
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(5)
        if self._error:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            try:
                self.server = await rpc.start_server(self.path, self.balancer,
                                                     extras=self.extras)
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            self.server.close()
            await self.server.wait_closed()

        self.loop.run_until_complete(main())

    def stop(self) -> None:
        if self._error is None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(5)


@pytest.fixture
def director(tmp_path):
    d = Director(str(tmp_path / "run" / "ctl.sock"))
    yield d
    d.stop()


def adm_run(director, *argv, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    rc = adm.main(["--control", director.path, *argv], stdin=io.StringIO(stdin),
                  stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def test_socket_and_directory_modes(director):
    st = os.stat(director.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(director.path)).st_mode) == 0o700


def test_client_calls_and_errors(director):
    with rpc.Client(director.path) as c:
        assert c.call({"op": "ping"}) == "pong"
        assert c.call(op="add_service", proto="tcp", vaddr="10.0.0.1", vport=80) == 0
        with pytest.raises(rpc.RpcError, match="^Service already exists$"):
            c.call(op="add_service", proto="tcp", vaddr="10.0.0.1", vport=80)
        assert c.call(op="add_dest", proto="tcp", vaddr="10.0.0.1", vport=80,
                      daddr="10.0.1.2", dport=8080, fwd="masq", weight=2) == 0
        snap = c.call(op="snapshot")
        assert snap["services"][0]["dests"][0]["weight"] == 2
    assert len(director.published) == 2


def test_malformed_requests_never_kill_the_server(director):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(director.path)
    f = s.makefile("rwb")
    for line in (b"not json\n", b"[1, 2]\n", b'{"no_op": 1}\n', b'{"op": 42}\n',
                 b'{"op": "add_service", "proto": "tcp"}\n', b'{"op": "nosuch"}\n',
                 b"\xff\xfe\n"):
        f.write(line)
        f.flush()
        resp = json.loads(f.readline())
        assert resp["ok"] is False and resp["error"]
    f.write(b"\n")   # blank lines are skipped
    f.write(b'{"op": "ping"}\n')
    f.flush()
    assert json.loads(f.readline()) == {"ok": True, "result": "pong"}
    s.close()
    # A client that vanishes mid-request does not hurt either.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(director.path)
    s.sendall(b'{"op": "snap')
    s.close()
    with rpc.Client(director.path) as c:
        assert c.call(op="ping") == "pong"


def test_errors_quote_a_short_escaped_excerpt_of_the_input(director):
    """A huge or binary value comes back cut to a short prefix with its
    non-printable characters escaped; undecodable bytes on the control
    socket are named as such, not by a guessed codec."""
    with rpc.Client(director.path) as c:
        for op, want in [
            ({"op": "x" * 1_000_000}, "unknown operation '" + "x" * 60 + "...'"),
            ({"op": "sysctl", "name": "\x00\x1b[31m"}, "unknown sysctl '\\x00\\x1b[31m'"),
            ({"op": "add_service", "proto": "tcp", "vaddr": "y" * 10_000, "vport": 80},
             "illegal virtual server address '" + "y" * 60 + "...'"),
        ]:
            with pytest.raises(rpc.RpcError) as ei:
                c.call(op)
            assert str(ei.value).startswith(want) and len(str(ei.value)) < 200
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(director.path)
    f = s.makefile("rwb")
    for line in (b"\xff\xfe\n", b'{"op": "\xff"}\n'):
        f.write(line)
        f.flush()
        assert json.loads(f.readline()) == {"ok": False,
                                            "error": "malformed request: not UTF-8 JSON"}
    s.close()
    rc, out, err = adm_run(director, "-R", stdin=(
        "-L " + "z" * 100_000 + "\n-A -t 10.0.0.1:80 --bogus\udcff\x07\n-A -t 10.0.0.1:80\n"))
    assert err == ("line 1: unexpected argument " + "z" * 60 + "...\n"
                   "line 2: --bogus\\xff\\x07: unknown option\n")
    assert len(director.balancer.services()) == 1


def test_deeply_nested_request_gets_an_error_answer(director):
    # json.loads raises RecursionError (not ValueError) on deep nesting: the
    # client must still get an answer, on the same connection.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(director.path)
    f = s.makefile("rwb")
    for line in (b"[" * 100000 + b"\n", b'{"op": "batch", "ops": ' + b"[" * 100000 + b"\n"):
        f.write(line)
        f.flush()
        resp = json.loads(f.readline())
        assert resp["ok"] is False and resp["error"].startswith("malformed request")
    f.write(b'{"op": "ping"}\n')
    f.flush()
    assert json.loads(f.readline()) == {"ok": True, "result": "pong"}
    s.close()


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path):
    path = str(tmp_path / "ctl.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()                      # the file stays, nobody listens
    d = Director(path)
    try:
        with rpc.Client(path) as c:
            assert c.call(op="ping") == "pong"
        with pytest.raises(RuntimeError, match="another pylvs director"):
            Director(path)
    finally:
        d.stop()


def test_close_removes_the_socket(tmp_path):
    path = str(tmp_path / "ctl.sock")
    d = Director(path)
    assert os.path.exists(path)
    d.stop()
    assert not os.path.exists(path)


def test_default_path_is_per_network_namespace(monkeypatch):
    monkeypatch.delenv(rpc.ENV_PATH, raising=False)
    ino = os.stat("/proc/self/ns/net").st_ino
    assert rpc.default_path() == f"/run/pylvs/ctl-{ino}.sock"
    monkeypatch.setenv(rpc.ENV_PATH, "/tmp/elsewhere.sock")
    assert rpc.default_path() == "/tmp/elsewhere.sock"


def test_adm_end_to_end_listing(director):
    assert adm_run(director, "-A", "-t", "10.0.0.1:80", "-s", "rr") == (0, "", "")
    assert adm_run(director, "-a", "-t", "10.0.0.1:80", "-r", "10.0.1.3:80", "-m",
                   "-w", "2")[0] == 0
    assert adm_run(director, "-a", "-t", "10.0.0.1:80", "-r", "10.0.1.2:80", "-m")[0] == 0
    director.counters.dest_conns[0] = [5, 1]
    rc, out, err = adm_run(director, "-L", "-n")
    assert rc == 0 and err == ""
    assert out == (
        "IP Virtual Server version 1.2.1 (size=4096)\n"
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"
        "TCP  10.0.0.1:80 rr\n"
        "  -> 10.0.1.2:80                  Masq    1      0          0         \n"
        "  -> 10.0.1.3:80                  Masq    2      5          1         \n")
    rc, out, err = adm_run(director, "-L", "-n", "-t", "10.0.0.9:80")
    assert (rc, out, err) == (1, "", "No such service\n")
    assert adm_run(director, "-L", "--timeout") == (
        0, "Timeout (tcp tcpfin udp): 900 120 300\n", "")
    assert adm_run(director, "--set", "600", "0", "20")[0] == 0
    assert adm_run(director, "-L", "--timeout")[1] == "Timeout (tcp tcpfin udp): 600 120 20\n"


def test_adm_operation_errors_exit_255(director):
    adm_run(director, "-A", "-t", "10.0.0.1:80")
    assert adm_run(director, "-A", "-t", "10.0.0.1:80") == (255, "", "Service already exists\n")
    assert adm_run(director, "-D", "-t", "10.0.0.2:80") == (255, "", "No such service\n")
    assert adm_run(director, "-a", "-t", "10.0.0.2:80", "-r", "1.2.3.4", "-m") == (
        255, "", "Service not defined\n")
    assert adm_run(director, "-A", "-t", "10.0.0.3:80", "-s", "nosuch") == (
        255, "", "Scheduler or persistence engine not found\n")
    # ipvsadm's default (-g) is accepted; GRE, which ipvsadm offers, is
    # refused by the director itself, and nothing changes.
    assert adm_run(director, "-a", "-t", "10.0.0.1:80", "-r", "1.2.3.4") == (0, "", "")
    assert adm_run(director, "-a", "-t", "10.0.0.1:80", "-r", "1.2.3.5", "-i",
                   "--tun-type", "gre") == (
        255, "", "tunnel type gre is not supported by this director yet (ipip or gue)\n")
    for th in (["-x", "10", "-y", "20"], ["-y", "5"]):
        assert adm_run(director, "-a", "-t", "10.0.0.1:80", "-r", "1.2.3.9", "-m", *th) == (
            255, "", "Numerical result out of range\n")
    assert adm_run(director, "-S", "-n") == (
        0, "-A -t 10.0.0.1:80 -s wlc\n-a -t 10.0.0.1:80 -r 1.2.3.4:80 -g -w 1\n", "")


def test_save_restore_round_trip(director):
    rules = ("-A -t 10.0.0.1:80 -s wlc\n"
             "-a -t 10.0.0.1:80 -r 10.0.1.2:8080 -m -w 3\n"
             "-a -t 10.0.0.1:80 -r 10.0.1.3:8080 -m -w 1\n"
             "-A -t 10.0.0.2:0 -s rr -p 60 -M 255.255.255.0\n"
             "-A -u 10.0.0.1:53 -s wrr -o\n"
             "-a -u 10.0.0.1:53 -r 10.0.1.2:53 -m -w 1\n")
    rc, out, err = adm_run(director, "-R", stdin="ipvsadm " + rules.replace("\n", "\nipvsadm ", 1))
    assert (rc, err) == (0, "")
    rc, saved, err = adm_run(director, "-S", "-n")
    assert rc == 0 and saved == rules
    listing_before = adm_run(director, "-L", "-n")[1]
    assert adm_run(director, "-C")[0] == 0
    assert adm_run(director, "-S")[1] == ""
    assert adm_run(director, "-R", stdin=saved)[0] == 0
    assert adm_run(director, "-S", "-n")[1] == saved
    assert adm_run(director, "-L", "-n")[1] == listing_before


def test_restore_reports_refused_rules_and_goes_on(director):
    rc, out, err = adm_run(director, "-R", stdin=(
        "-A -t 10.0.0.1:80\n-A -t 10.0.0.1:80\n-A -t 10.0.0.2:80\n"))
    assert rc == 255 and err == "line 2: Service already exists\n"
    assert adm_run(director, "-S", "-n")[1] == (
        "-A -t 10.0.0.1:80 -s wlc\n-A -t 10.0.0.2:80 -s wlc\n")
    rc, out, err = adm_run(director, "-R", stdin="-A -t 10.0.0.3:80\n-A -t 10.0.0.4\n")
    assert rc == 2 and err == "line 2: Zero port specified for non-persistent service\n"


def test_restore_goes_on_after_lines_that_do_not_parse(director):
    """As ipvsadm's restore_table: every line on its own. A missing option
    argument, an unterminated quote, an unknown option: each reported with
    its number, the good lines before and after applied, exit non-zero."""
    rules = ("-A -t 10.0.0.1:80 -s rr\n"                       # 1
             "-a -t 10.0.0.1:80 -r 10.0.1.2:80 -m\n"           # 2
             "-a -t 10.0.0.1:80 -r '10.0.1.3:80 -m\n"          # 3 unterminated quote
             "-a -t 10.0.0.1:80 -r 10.0.1.4:80 -m -w\n"        # 4 missing argument
             "-A -t 10.0.0.2:80 --bogus\n"                     # 5 unknown option
             "-a -t 10.0.0.1:80 -r 255.255.255.255:80 -m\n"    # 6 refused by the director
             "-A -t 10.0.0.2:80\n"                             # 7
             "-a -t 10.0.0.2:80 -r 10.0.1.5:0 -m\n")           # 8
    rc, out, err = adm_run(director, "-R", stdin=rules)
    lines = err.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["line 3", "line 4", "line 5", "line 6"]
    assert "No closing quotation" in lines[0]
    assert lines[1] == "line 4: -w: missing argument"
    assert lines[3] == ("line 6: Invalid operation.  Possibly wrong module version, "
                        "address not unicast, ...")
    assert rc == 255
    assert adm_run(director, "-S", "-n")[1] == (
        "-A -t 10.0.0.1:80 -s rr\n"
        "-a -t 10.0.0.1:80 -r 10.0.1.2:80 -m -w 1\n"
        "-A -t 10.0.0.2:80 -s wlc\n"
        "-a -t 10.0.0.2:80 -r 10.0.1.5:0 -m -w 1\n")
    assert "  -> 10.0.1.5:0 " in adm_run(director, "-L", "-n")[1]


def test_long_restore_travels_in_batches_below_the_line_limit(director, monkeypatch):
    monkeypatch.setattr(adm, "BATCH_BYTES", 700)
    sizes = []
    real = rpc.Client.call

    def spy(self, request=None, **kw):
        sizes.append(len(json.dumps({**(request or {}), **kw})))
        return real(self, request, **kw)
    monkeypatch.setattr(rpc.Client, "call", spy)
    rules = "".join(f"-A -u 10.0.0.1:{p}\n" for p in range(1, 11))
    rules += "-A -u 10.0.0.1:1\n"
    rc, out, err = adm_run(director, "-R", stdin=rules)
    assert (rc, err) == (255, "line 11: Service already exists\n")
    assert len(sizes) > 2 and max(sizes) <= 700 + 100
    assert len(director.balancer.services()) == 10
    # Several requests, one publish: the batches before the last say "more".
    assert len(director.published) == 1


def test_restore_skips_a_line_beyond_the_request_limit_and_goes_on(director):
    """A line longer than the control socket takes (or whose operation,
    JSON-escaped, would be) is reported and skipped; the director never
    sees it, so the lines after it still apply."""
    limit = rpc.MAX_REQUEST
    rules = ("-A -t 10.0.0.1:80\n"
             "-A -t 10.0.0.2:80 --pe " + "x" * limit + "\n"
             "-A -t 10.0.0.3:80\n"
             "-A -t 10.0.0.4:80 --pe " + "\x01" * (limit // 4) + "\n"
             "-A -t 10.0.0.5:80\n")
    rc, out, err = adm_run(director, "-R", stdin=rules)
    assert err == (f"line 2: line too long (limit {limit} bytes)\n"
                   f"line 4: line too long (limit {limit} bytes)\n")
    assert rc != 0
    assert adm_run(director, "-S", "-n")[1] == "".join(
        f"-A -t 10.0.0.{i}:80 -s wlc\n" for i in (1, 3, 5))


def test_held_batch_is_published_when_its_client_leaves(director):
    c = rpc.Client(director.path).connect()
    c.call({"op": "batch", "more": True,
            "ops": [{"op": "add_service", "proto": "udp", "vaddr": "10.0.0.1", "vport": 53}]})
    assert director.published == []
    c.close()
    deadline = time.monotonic() + 5
    while not director.published and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(director.published) == 1 and director.published[0][0]["flags"].sum() == 1
    with rpc.Client(director.path) as c:
        with pytest.raises(rpc.RpcError, match="more must be true or false"):
            c.call({"op": "batch", "more": 1, "ops": []})


def test_adm_connection_listing(director):
    director.balancer.clock = lambda: 10.0
    director.balancer.conns_source = lambda: [
        (6, 0x0A000205, 40000, 0x0A000001, 80, 0x0A000102, 80, states.SYN_RECV, 70.0,
         0, 0, 0)]
    rc, out, err = adm_run(director, "-L", "-n", "-c")
    assert rc == 0
    assert out == (
        "IPVS connection entries\n"
        "pro expire state       source             virtual            destination\n"
        "TCP 01:00  SYN_RECV    10.0.2.5:40000     10.0.0.1:80        10.0.1.2:80\n")


def test_peer_credentials_checked(director, monkeypatch):
    # A caller that is neither root nor the director's user is turned away.
    monkeypatch.setattr(rpc, "_peer_uid", lambda writer: os.geteuid() + 4242)
    with rpc.Client(director.path) as c:
        with pytest.raises(rpc.RpcError, match="Permission denied"):
            c.call(op="ping")
    monkeypatch.setattr(rpc, "_peer_uid", lambda writer: 0)
    with rpc.Client(director.path) as c:
        assert c.call(op="ping") == "pong"


def test_peer_uid_is_read_from_the_socket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    class W:
        def get_extra_info(self, name):
            return a if name == "socket" else None

    try:
        assert rpc._peer_uid(W()) == os.geteuid()
    finally:
        a.close()
        b.close()


def test_a_line_beyond_the_limit_is_refused_and_closed(tmp_path, monkeypatch):
    """One client cannot make the director hold more than about two request
    lines of rpc.MAX_REQUEST bytes: beyond it, an error and the connection
    closes; other clients are served."""
    monkeypatch.setattr(rpc, "MAX_REQUEST", 4096)
    d = Director(str(tmp_path / "ctl.sock"))
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(d.path)
        f = s.makefile("rwb")
        # A whole line within the limit is fine...
        f.write(b'{"op": "ping"' + b" " * 3000 + b'}\n')
        f.flush()
        assert json.loads(f.readline()) == {"ok": True, "result": "pong"}
        # ...a half-sent one beyond it is not.
        try:
            f.write(b'{"op": "snapshot", "x": "' + b"y" * 20000)
            f.flush()
        except BrokenPipeError:
            pass
        resp = json.loads(f.readline())
        assert resp == {"ok": False, "error": "malformed request: line too long "
                                              "(limit 4096 bytes)"}
        assert f.readline() == b""        # closed
        s.close()
        with rpc.Client(d.path) as c:
            assert c.call(op="ping") == "pong"
    finally:
        d.stop()


def test_clients_beyond_the_limit_are_refused_politely(tmp_path, monkeypatch):
    monkeypatch.setattr(rpc, "MAX_CLIENTS", 3)
    d = Director(str(tmp_path / "ctl.sock"))
    held = []
    try:
        for _ in range(3):
            c = rpc.Client(d.path).connect()
            assert c.call(op="ping") == "pong"
            held.append(c)
        extra = rpc.Client(d.path, timeout=5)
        with pytest.raises(rpc.RpcError, match=r"too many control connections \(3\)"):
            extra.call(op="ping")
        extra.close()
        held.pop().close()
        # A slot freed is a slot for the next client.
        for _ in range(50):
            try:
                with rpc.Client(d.path) as c:
                    assert c.call(op="ping") == "pong"
                break
            except rpc.RpcError:
                time.sleep(0.02)
        else:
            raise AssertionError("the freed slot never came back")
    finally:
        for c in held:
            c.close()
        d.stop()


def tool(name, director, *argv):
    from pylvs.cli import tools
    out, err = io.StringIO(), io.StringIO()
    rc = getattr(tools, name)(["--control", director.path, *argv], stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def test_pylvs_stats_prints_every_counter_by_name(director):
    from pylvs.engine import tables
    director.counters.stats[tables.STAT_INDEX["drop_table_full"]] = 12
    director.balancer.engine_info = lambda: {"conn_count": 5, "capacity": 4194304,
                                             "memory": 3 << 20}
    adm_run(director, "-A", "-t", "10.0.0.1:80")
    rc, out, err = tool("stats_main", director)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[:3] == ["conns     5 of 4194304 (3.0 MiB)", "services  1 of 16",
                         "dests     0 of 64"]
    named = dict(ln.split() for ln in lines[4:])
    assert list(named) == list(tables.STAT_NAMES) and named["drop_table_full"] == "12"
    rc, out, err = tool("stats_main", director, "--json")
    st = json.loads(out)
    assert st["counters"]["drop_table_full"] == 12 and st["conns"]["limit"] == 4194304


def test_pylvs_stats_adds_the_io_and_steering_sections(tmp_path):
    # As `pylvs run` serves it: the daemon's extra for "stats" (tested in
    # tests/test_daemon_io.py) merged into the Balancer's answer.
    from pylvs.engine import tables
    calls = []

    async def extra():
        calls.append("stats")
        return {"io": {"rx_frames": 10, "tx_emsgsize": 2}, "steering": {"not_host": None}}
    d = Director(str(tmp_path / "ctl.sock"), extras={"stats": extra})
    try:
        d.counters.stats[tables.STAT_INDEX["rx_frames"]] = 9
        rc, out, err = tool("stats_main", d)
        assert (rc, err) == (0, "")
        engine, io_part, steering = out.split("\n\n")[1:]
        assert engine.splitlines()[0].split() == ["rx_frames", "9"]
        assert io_part.splitlines() == ["io.rx_frames    10", "io.tx_emsgsize  2"]
        assert steering == "steering.not_host  -\n"   # nft did not answer
        st = json.loads(tool("stats_main", d, "--json")[1])
        assert list(st) == ["engine", "counters", "conns", "services", "dests", "io", "steering"]
        assert st["engine"] == st["counters"] and st["engine"]["rx_frames"] == 9
        assert st["io"]["rx_frames"] == 10 and st["steering"] == {"not_host": None}
        # Other ops are left alone.
        with rpc.Client(d.path) as c:
            assert c.call(op="ping") == "pong" and "io" not in c.call(op="timeouts")
        assert len(calls) == 2
    finally:
        d.stop()


def test_a_failing_stats_extra_still_answers_the_engine_counters(tmp_path, caplog):
    async def extra():
        raise RuntimeError("backend gone")
    d = Director(str(tmp_path / "ctl.sock"), extras={"stats": extra})
    try:
        with rpc.Client(d.path) as c:
            st = c.call(op="stats")
        assert "engine" in st and "io" not in st
    finally:
        d.stop()
    assert any("backend gone" in r.exc_text for r in caplog.records if r.exc_text)


def test_pylvs_sysctl_lists_reads_and_sets(director):
    from pylvs.control.balancer import SYSCTL_NAMES
    sent = []
    director.balancer.publish_sysctls = sent.append
    rc, out, err = tool("sysctl_main", director)
    from pylvs.sched import SYSCTLS
    assert rc == 0 and [ln.split(" = ")[0] for ln in out.splitlines()] == [*SYSCTL_NAMES, *SYSCTLS]
    assert tool("sysctl_main", director, "icmp_msgs_burst") == (
        0, "icmp_msgs_burst = 50\n", "")
    assert tool("sysctl_main", director, "icmp_msgs_burst=7", "expire_nodest_conn=1") == (
        0, "icmp_msgs_burst = 7\nexpire_nodest_conn = 1\n", "")
    assert len(sent) == 1   # one request, one publish
    assert json.loads(tool("sysctl_main", director, "--json", "icmp_msgs_burst")[1]) == {
        "icmp_msgs_burst": 7}
    rc, out, err = tool("sysctl_main", director, "icmp_msgs_burst=lots")
    assert rc == 1 and err == "pylvs sysctl: sysctl icmp_msgs_burst: 'lots' is not an integer\n"
    rc, out, err = tool("sysctl_main", director, "nosuch")
    assert rc == 1 and "unknown sysctl 'nosuch'" in err


def test_pylvs_sysctl_takes_sysctl8_command_lines(director):
    """An operator's `sysctl -w net.ipv4.vs.NAME=V` lines and the kernel's
    pair form of sync_threshold (proc_do_sync_threshold) work unchanged."""
    assert tool("sysctl_main", director, "-w", "net.ipv4.vs.expire_nodest_conn=1") == (
        0, "expire_nodest_conn = 1\n", "")
    assert tool("sysctl_main", director, "net/ipv4/vs/expire_nodest_conn") == (
        0, "expire_nodest_conn = 1\n", "")
    assert tool("sysctl_main", director, "-w", "net.ipv4.icmp_msgs_burst=8") == (
        0, "icmp_msgs_burst = 8\n", "")
    assert tool("sysctl_main", director, "-w", 'net.ipv4.vs.sync_threshold="2 40"') == (
        0, "sync_threshold = 2\nsync_period = 40\n", "")
    assert director.balancer.sysctls()["sync_period"] == 40
    rc, out, err = tool("sysctl_main", director, "sync_threshold=5 4")
    assert rc == 1 and "is not below sync_period 4" in err
    rc, out, err = tool("sysctl_main", director, "sync_threshold=1 2 3")
    assert rc == 1 and "is not THRESHOLD or" in err
    assert director.balancer.sysctls()["sync_threshold"] == 2


def test_pylvs_sysctl_takes_sysctl8_switches_n_q_e(director):
    """sysctl(8)'s -n (values only: `x=$(sysctl -n NAME)` in scripts), -q
    (set without echo) and -e (an unknown name is skipped, not an error)."""
    assert tool("sysctl_main", director, "-n", "net.ipv4.vs.expire_nodest_conn",
                "icmp_msgs_burst") == (0, "0\n50\n", "")
    assert tool("sysctl_main", director, "-q", "-w", "net.ipv4.vs.expire_nodest_conn=1") == (
        0, "", "")
    assert director.balancer.sysctls()["expire_nodest_conn"] == 1
    assert tool("sysctl_main", director, "-e", "net.ipv4.vs.sync_ports",
                "net.ipv4.vs.expire_nodest_conn") == (0, "expire_nodest_conn = 1\n", "")
    sent = []
    director.balancer.publish_sysctls = sent.append
    assert tool("sysctl_main", director, "-e", "-w", "net.ipv4.vs.sync_sock_size=0",
                "icmp_msgs_burst=9") == (0, "icmp_msgs_burst = 9\n", "")
    assert len(sent) == 1 and director.balancer.sysctls()["icmp_msgs_burst"] == 9
    rc, out, err = tool("sysctl_main", director, "net.ipv4.vs.sync_ports")
    assert rc == 1 and "unknown sysctl 'sync_ports'" in err     # without -e


def test_pylvs_sysctl_reads_the_kernels_sync_threshold_as_its_pair(director):
    """The kernel's net.ipv4.vs.sync_threshold is the pair (threshold,
    period), so read by that name it shows both knobs, as setting it does;
    `sysctl -n` users get both values. pylvs's own name reads one knob."""
    assert tool("sysctl_main", director, "net.ipv4.vs.sync_threshold") == (
        0, "sync_threshold = 3\nsync_period = 50\n", "")
    assert tool("sysctl_main", director, "-n", "net/ipv4/vs/sync_threshold") == (
        0, "3\n50\n", "")
    assert tool("sysctl_main", director, "sync_threshold") == (0, "sync_threshold = 3\n", "")


@pytest.mark.parametrize("argv", [
    ("icmp_msgs_burst=9", "conn_reuse_mode=bad"),
    ("icmp_msgs_burst=9", "conn_reuse_mode=4"),
    ("icmp_msgs_burst=9", "nosuch=1"),
    ("icmp_msgs_burst=9", "nosuch"),
    ("icmp_msgs_burst=9", "conn_reuse_mode=\u0661"),
])
def test_pylvs_sysctl_settings_apply_all_or_none(director, argv):
    sent = []
    director.balancer.publish_sysctls = sent.append
    rc, out, err = tool("sysctl_main", director, *argv)
    assert rc == 1 and err.startswith("pylvs sysctl: ") and out == ""
    assert sent == [] and director.balancer.sysctls()["icmp_msgs_burst"] == 50
    assert tool("sysctl_main", director, "conn_reuse_mode=0", "icmp_msgs_burst=9",
                "icmp_msgs_burst") == (
        0, "conn_reuse_mode = 0\nicmp_msgs_burst = 9\n", "")
    assert len(sent) == 1


def test_verbose_turns_debug_on_for_pylvs_only():
    import logging

    from pylvs.runtime import daemon
    saved = {n: logging.getLogger(n).level for n in ("pylvs", *daemon.THIRD_PARTY_LOGGERS)}
    root = logging.getLogger().level
    try:
        logging.getLogger().setLevel(logging.DEBUG)   # whatever the root says
        daemon.setup_logging(verbose=True)
        assert logging.getLogger("pylvs.rpc").isEnabledFor(logging.DEBUG)
        for name in ("pyroute2", "pyroute2.netlink.nlsocket", "asyncio"):
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        daemon.setup_logging(verbose=False)
        assert not logging.getLogger("pylvs.rpc").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("pylvs.rpc").isEnabledFor(logging.INFO)
    finally:
        for n, lvl in saved.items():
            logging.getLogger(n).setLevel(lvl)
        logging.getLogger().setLevel(root)


def test_replies_are_encoded_in_pieces_as_json_would():
    # A big listing (-L -c) is encoded PIECE items at a time, so the GIL is
    # let go between pieces; the text is json.dumps's, byte for byte.
    import json

    from pylvs.control.rpc import PIECE, dumps_in_pieces

    conns = [{"caddr": f"10.0.0.{i % 250}", "cport": i, "state": "UDP"} for i in range(3 * PIECE + 5)]
    for obj in ({"ok": True, "result": conns}, {"ok": True, "result": {"conns": conns, "n": 1}},
                {"ok": False, "error": "x"}, {"ok": True, "result": []}, {1: [2], True: None},
                [conns[:3]], "text", 5):
        assert dumps_in_pieces(obj) == json.dumps(obj)
    with pytest.raises(TypeError):
        dumps_in_pieces({"ok": True, "result": [object()] * (PIECE + 1)})
