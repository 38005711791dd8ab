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
    ("http: second url fails", {"kind": "HTTP_GET", "urls": [{"path": "/"}, {"path": "/x", "digest": "0" * 32}]},
     RS, 8001, False, "GET /x"),
    ("http: accepts, never answers", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8003, False, "timeout"),
    ("http: garbage", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8004, False, "not an HTTP status line"),
    ("http: reset", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8005, False, "reset"),
    ("http: refused", {"kind": "HTTP_GET", "urls": [{"path": "/"}]}, RS, 8006, False, "refused"),
    ("http: answer slower than connect_timeout", {"kind": "HTTP_GET", "urls": [{"path": "/"}]},
     RS, 8007, False, "timeout"),
    ("ssl: 200", {"kind": "SSL_GET", "urls": [{"path": "/"}]}, RS, 8443, True, "ok"),
    ("ssl: plain HTTP server", {"kind": "SSL_GET", "urls": [{"path": "/"}]}, RS, 8001, False, ""),
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
    ("ping: up", {"kind": "PING_CHECK"}, RS, 0, True, "reply in"),
    ("ping: host gone", {"kind": "PING_CHECK"}, NOBODY, 0, False, "timeout"),
    ("ping: connect_ip", {"kind": "PING_CHECK", "connect_ip": RS}, NOBODY, 0, True, "reply in"),
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


def run_checks(trio, rows) -> list:
    p = subprocess.run(["ip", "netns", "exec", trio.d, PY, "-c", RUN], cwd=REPO, capture_output=True,
                       text=True, timeout=30, input=json.dumps(rows))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_checkers_against_real_servers(servers):
    results = run_checks(servers, [[f, a, p] for _d, f, a, p, _ok, _w in TABLE])
    wrong = [(desc, ok, words, got) for (desc, _f, _a, _p, ok, words), got in zip(TABLE, results)
             if got[0] != ok or words not in got[1]]
    assert not wrong, wrong
