"""Each checker against real servers in namespaces: up, down, and servers
that accept and never answer, answer garbage, or reset (issue 9 items 6,
7). The checks run in the director's namespace (``d``), the servers
(tests/netns/healthsrv.py) in the real server's (``r``); every probe of
the table runs at once, so the whole table takes about one timeout."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from nsio import PY, REPO, sh

RS, NOBODY = "10.9.1.2", "10.9.1.99"
BODY = b"hello pylvs"

# description, CheckSpec fields (urls as dicts), address, port, passes, words in the result
TABLE = [
    ("tcp: listening", {"kind": "TCP_CHECK"}, RS, 8001, True, "connected"),
    ("tcp: refused", {"kind": "TCP_CHECK"}, RS, 8006, False, "refused"),
    ("tcp: connect_port overrides", {"kind": "TCP_CHECK", "connect_port": 8001}, RS, 8006, True, ":8001"),
    ("tcp: host gone", {"kind": "TCP_CHECK"}, NOBODY, 80, False, ""),
    ("tcp: bindto", {"kind": "TCP_CHECK", "bindto": "10.9.1.1"}, RS, 8001, True, "connected"),
    ("tcp: bindto not ours", {"kind": "TCP_CHECK", "bindto": "10.9.9.9"}, RS, 8001, False,
     "cannot assign requested address"),
    ("http: 200", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8001, True, "ok"),
    ("http: 500 is not 2xx", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8002, False, "status 500"),
    ("http: status_code 500 wanted", {"kind": "HTTP_GET", "urls": [{"path": "/", "status_codes": [500]}]},
     RS, 8002, True, "ok"),
    ("http: digest", {"kind": "HTTP_GET", "urls": [{"path": "/", "digest": hashlib.md5(BODY).hexdigest()}]},
     RS, 8001, True, "ok"),
    ("http: wrong digest", {"kind": "HTTP_GET", "urls": [{"path": "/", "digest": "0" * 32}]},
     RS, 8001, False, "digest"),
    ("http: regex found", {"kind": "HTTP_GET", "urls": [{"path": "/", "regex": "hel+o"}]}, RS, 8001, True, "ok"),
    ("http: regex missing", {"kind": "HTTP_GET", "urls": [{"path": "/", "regex": "nope"}]},
     RS, 8001, False, "not found"),
    ("http: regex_no_match", {"kind": "HTTP_GET", "urls": [{"path": "/", "regex": "nope",
                                                            "regex_no_match": True}]}, RS, 8001, True, "ok"),
    ("http: virtualhost", {"kind": "HTTP_GET", "virtualhost": "www.example", "urls": [{"path": "/"}]},
     RS, 8008, True, "ok"),
    ("http: the url's virtualhost first", {"kind": "HTTP_GET", "virtualhost": "www.example",
                                           "urls": [{"path": "/", "virtualhost": "other"}]},
     RS, 8008, False, "status 404"),
    ("http: second url fails", {"kind": "HTTP_GET", "urls": [{"path": "/"}, {"path": "/x", "digest": "0" * 32}]},
     RS, 8001, False, "GET /x"),
    ("http: accepts, never answers", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8003, False, "timeout"),
    ("http: garbage", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8004, False, "not an HTTP status line"),
    ("http: reset", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8005, False, "reset"),
    ("http: refused", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8006, False, "refused"),
    ("http: answer slower than connect_timeout", {"kind": "HTTP_GET", "urls": [{"path": "/"}]},
     RS, 8007, False, "timeout"),
    ("http: a 12 MiB page judged on its status", {"kind": "HTTP_GET", "urls": [{"path": "/"}]},
     RS, 8010, True, "ok"),
    ("http: a 12 MiB page judged on its digest", {"kind": "HTTP_GET", "urls": [{"path": "/", "digest": "0" * 32}]},
     RS, 8010, False, "longer than"),
    ("ssl: 200", {"kind": "SSL_GET", "urls": [{"path": "/"}]}, RS, 8443, True, "ok"),
    ("ssl: enable_sni names the virtualhost", {"kind": "SSL_GET", "enable_sni": True,
                                               "virtualhost": "www.example", "urls": [{"path": "/"}]},
     RS, 8444, True, "ok"),
    ("ssl: a server wanting SNI, without enable_sni", {"kind": "SSL_GET", "virtualhost": "www.example",
                                                       "urls": [{"path": "/"}]}, RS, 8444, False, "GET /"),
    ("ssl: plain HTTP server", {"kind": "SSL_GET", "urls": [{"path": "/"}]}, RS, 8001, False, ""),
    ("ssl: accepts, never answers", {"kind": "SSL_GET", "urls": [{"path": "/"}]}, RS, 8003, False,
     "timeout"),
    # The garbage server waits for an HTTP request's end, which a TLS hello lacks.
    ("ssl: garbage", {"kind": "SSL_GET", "urls": [{"path": "/"}]}, RS, 8004, False, "timeout"),
    ("ssl: garbage at once", {"kind": "SSL_GET", "urls": [{"path": "/"}]}, RS, 8009, False, "TLS"),
    ("http: garbage at once", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8009, False,
     "not an HTTP status line"),
    ("ssl: reset", {"kind": "SSL_GET", "urls": [{"path": "/"}]}, RS, 8005, False, ""),
    ("tcp: accepts and resets", {"kind": "TCP_CHECK"}, RS, 8005, True, "connected"),
    ("udp: reply matches", {"kind": "UDP_CHECK", "payload": "ping", "require_reply": "PONG"},
     RS, 9001, True, "reply of 8 bytes"),
    ("udp: reply differs", {"kind": "UDP_CHECK", "payload": "ping", "require_reply": "NOPE"},
     RS, 9001, False, "does not match"),
    ("udp: reply too short", {"kind": "UDP_CHECK", "payload": "x", "require_reply": "PONG",
                              "min_reply_length": 8}, RS, 9001, False, "wanted 8.."),
    ("udp: port unreachable", {"kind": "UDP_CHECK", "payload": "ping"}, RS, 9002, False, "refused"),
    ("udp: silence, no reply required", {"kind": "UDP_CHECK"}, RS, 9003, True, "no error"),
    ("udp: silence, reply required", {"kind": "UDP_CHECK", "require_reply": "PONG"}, RS, 9003, False,
     "no reply"),
] + [
    (f"ping: {what}", dict(fields, kind="PING_CHECK"), addr, 0, ok, words)
    for what, fields, addr, ok, words in [
        ("up", {}, RS, True, "reply in"),
        ("host gone", {}, NOBODY, False, "timeout"),
        ("connect_ip", {"connect_ip": RS}, NOBODY, True, "reply in")]
]

RUN = """
import asyncio, json, sys
from pylvs.config.model import CheckSpec, UrlSpec
from pylvs.health import manager

def spec(fields):
    fields = dict(fields, connect_timeout=1.0)
    fields["urls"] = tuple(UrlSpec(**dict(u, status_codes=frozenset(u.get("status_codes", ()))))
                           for u in fields.get("urls", ()))
    for k in ("payload", "require_reply"):
        if k in fields:
            fields[k] = fields[k].encode()
    return CheckSpec(**fields)

async def main(rows):
    results = await asyncio.gather(*(manager.CHECKERS[f["kind"]](spec(f), a, p) for f, a, p in rows))
    print(json.dumps([[r.ok, r.text] for r in results]))

loop, pause = sys.argv[1], float(sys.argv[2])
if pause:
    # The server's answer to the connect arrives before the request goes.
    from pylvs.health import check_api, check_http
    async def open_tcp(*args, **kw):
        streams = await check_api.open_tcp(*args, **kw)
        await asyncio.sleep(pause)
        return streams
    check_http.open_tcp = open_tcp
if loop == "uvloop":
    import uvloop
    uvloop.run(main(json.loads(sys.stdin.read())))
else:
    asyncio.run(main(json.loads(sys.stdin.read())))
"""


@pytest.fixture
def servers(trio, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=rs",
       "-keyout", str(key), "-out", str(cert))
    p = subprocess.Popen(["ip", "netns", "exec", trio.r, PY, str(REPO / "tests/netns/healthsrv.py"),
                          RS, str(cert), str(key)], stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(p.stdout.readline()) == {"ready": True}
        yield trio
    finally:
        p.kill()
        p.wait()


def run_checks(trio, rows, loop: str = "asyncio", pause: float = 0.0) -> list:
    """The checkers' results for ``rows`` on ``loop`` (asyncio, or uvloop as
    `pylvs run` runs them), HTTP_GET/SSL_GET waiting ``pause`` s after the
    connect before they send."""
    p = subprocess.run(["ip", "netns", "exec", trio.d, PY, "-c", RUN, loop, str(pause)], cwd=REPO,
                       capture_output=True, text=True, timeout=30, input=json.dumps(rows))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def check_table(trio, table, **run) -> None:
    results = run_checks(trio, [[f, a, p] for _d, f, a, p, _ok, _w in table], **run)
    wrong = [(desc, ok, words, got) for (desc, _f, _a, _p, ok, words), got in zip(table, results)
             if got[0] != ok or words not in got[1]]
    assert not wrong, wrong


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_checkers_against_real_servers(servers, loop):
    check_table(servers, TABLE, loop=loop)


# A server that resets the connection at once, its reset in before the
# request goes out: uvloop (the director's loop) refuses the write where
# asyncio's drops it; either way the check fails with the reset, never an
# internal error.
RESET_BEFORE_THE_REQUEST = [
    ("http: reset before the request", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8011,
     False, "connection reset by peer"),
    ("ssl: reset before the handshake", {"kind": "SSL_GET", "urls": [{"path": "/"}]}, RS, 8011,
     False, "GET /"),
]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_reset_before_the_request_fails_the_check_on_either_loop(servers, loop):
    check_table(servers, RESET_BEFORE_THE_REQUEST, loop=loop, pause=0.3)


def test_ping_over_a_raw_and_an_icmp_datagram_socket(servers):
    """A fresh namespace's ping_group_range ("1 0") admits nobody: a raw
    socket; once it admits our group, the unprivileged datagram socket."""
    ping = [row for row in TABLE if row[0].startswith("ping")]
    raw = [(d, f, a, p, ok, "(raw socket)" if ok else w) for d, f, a, p, ok, w in ping]
    check_table(servers, raw)
    sh("ip", "netns", "exec", servers.d, "sysctl", "-qw", "net.ipv4.ping_group_range=0 0")
    dgram = [(d, f, a, p, ok, "(datagram socket)" if ok else w) for d, f, a, p, ok, w in ping]
    check_table(servers, dgram)


# --- down, up and flapping, on the manager's timers ---------------------------

D, T, RETRY, DBR = 0.5, 0.4, 1, 0.25
DOWN_BOUND = D + RETRY * (DBR + T) + T     # keepalived's worst case for a death
UP_BOUND = D + T                           # and for a return
SLACK = 1.0                                # a loaded machine's scheduling

WATCH = """
import asyncio, json, sys, time
from pylvs.config.model import CheckSpec, RealServer, UrlSpec, VirtualServer
from pylvs.health.manager import HealthManager

flag, deadline = sys.argv[1], float(sys.argv[2])
common = dict(delay_loop=%(D)r, connect_timeout=%(T)r, retry=%(RETRY)r, delay_before_retry=%(DBR)r)
url = (UrlSpec("/", frozenset({200})),)
kinds = [("TCP_CHECK", 8001, {}), ("HTTP_GET", 8001, {"urls": url}),
         ("SSL_GET", 8443, {"urls": url}),
         ("UDP_CHECK", 9001, {"payload": b"x", "require_reply": b"PONG"}),
         ("PING_CHECK", 1, {}), ("MISC_CHECK", 2, {"misc_path": "test -e " + flag})]
services = [VirtualServer("TCP", "10.9.0.100", 80 + i, real_servers=(
    RealServer("%(RS)s", port, checks=(CheckSpec(kind, **common, **extra),)),))
    for i, (kind, port, extra) in enumerate(kinds)]
names = {80 + i: k for i, (k, _p, _e) in enumerate(kinds)}
events = []

class Recorder:
    def set_dest_health(self, proto, vaddr, vport, daddr, dport, up, inhibit=False, weight=None):
        events.append((time.time(), names[vport], up))

async def main():
    m = HealthManager(Recorder())
    m.configure(services)
    await m.start()
    print("started", flush=True)
    # Watch until the test is done ("stop" or stdin closed), however long
    # its phases take on a loaded machine; the deadline only bounds a
    # test that died.
    told = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), told.set)
    try:
        await asyncio.wait_for(told.wait(), deadline)
    except asyncio.TimeoutError:
        pass
    await m.stop()
    print(json.dumps(events))

asyncio.run(main())
""" % {"D": D, "T": T, "RETRY": RETRY, "DBR": DBR, "RS": RS}

BLOCK = """table inet hc {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp dport { 8001, 8443 } reject with tcp reset
    udp dport 9001 reject
    icmp type echo-request drop
  }
}
"""


def test_every_checker_down_up_and_a_flap_shorter_than_the_retries(servers, tmp_path):
    """Blocked (RST, ICMP unreachable, ping dropped, the MISC_CHECK's file
    gone): every checker goes down within delay_loop + retry *
    (delay_before_retry + connect_timeout) + connect_timeout; unblocked,
    up within delay_loop + connect_timeout; a 0.1 s outage, shorter than
    delay_before_retry, takes none down."""
    import time

    trio = servers
    flag = tmp_path / "up"
    flag.touch()

    def block(on: bool) -> None:
        if on:
            subprocess.run(["ip", "netns", "exec", trio.r, "nft", "-f", "-"], input=BLOCK,
                           text=True, check=True, timeout=10)
            flag.unlink()
        else:
            sh("ip", "netns", "exec", trio.r, "nft", "delete", "table", "inet", "hc")
            flag.touch()

    kinds = ["TCP_CHECK", "HTTP_GET", "SSL_GET", "UDP_CHECK", "PING_CHECK", "MISC_CHECK"]
    p = subprocess.Popen(["ip", "netns", "exec", trio.d, PY, "-c", WATCH, str(flag), "120"],
                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "started\n"
        start = time.time()
        time.sleep(1.0)
        t_down = time.time()
        block(True)
        time.sleep(DOWN_BOUND + SLACK)
        t_up = time.time()
        block(False)
        time.sleep(UP_BOUND + SLACK)
        t_flap = time.time()
        for _ in range(3):
            block(True)
            time.sleep(0.1)
            block(False)
            time.sleep(0.5)
        try:
            out, err = p.communicate("stop\n", timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise AssertionError(f"the manager did not stop:\n{err}")
    finally:
        p.kill()
    assert p.returncode == 0, err
    events = json.loads(out.strip().splitlines()[-1])
    for kind in kinds:
        mine = [(t, up) for t, k, up in events if k == kind]
        # Up from the start (set once by configure), down once, up once.
        assert [up for _t, up in mine] == [True, False, True], (kind, mine)
        assert mine[0][0] < start
        assert 0 < mine[1][0] - t_down <= DOWN_BOUND + SLACK, (kind, mine[1][0] - t_down)
        assert 0 < mine[2][0] - t_up <= UP_BOUND + SLACK, (kind, mine[2][0] - t_up)
        assert mine[2][0] < t_flap
