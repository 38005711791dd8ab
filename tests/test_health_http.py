"""HTTP_GET's verdict on what a server sent (check_http.judge), garbage
and lies included, and the request it sends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

from pylvs.config.model import CheckSpec, UrlSpec
from pylvs.health.check_http import judge, request

BODY = b"hello pylvs"
MD5 = hashlib.md5(BODY).hexdigest()
OK = b"HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\n" + BODY
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n pylvs\r\n0\r\nX-Trailer: 1\r\n\r\n")

# description, url, response, None (passes) or words of the reason
TABLE = [
    ("200, any 2xx", UrlSpec("/"), OK, None),
    ("204, any 2xx", UrlSpec("/"), b"HTTP/1.1 204 No Content\r\n\r\n", None),
    ("301 is not 2xx", UrlSpec("/"), b"HTTP/1.1 301 Moved\r\nLocation: /x\r\n\r\n", "status 301"),
    ("301 wanted", UrlSpec("/", frozenset({301, 302})), b"HTTP/1.1 301 Moved\r\n\r\n", None),
    ("status line only, no blank line", UrlSpec("/"), b"HTTP/1.0 200 OK\r\n", None),
    ("LF line ends", UrlSpec("/", digest=MD5), b"HTTP/1.0 200 OK\nA: b\n\n" + BODY, None),
    ("digest", UrlSpec("/", digest=MD5.upper()), OK, None),
    ("digest differs", UrlSpec("/", digest="0" * 32), OK, f"digest {MD5}"),
    ("regex", UrlSpec("/", regex=r"py\w+"), OK, None),
    ("regex_no_match, found", UrlSpec("/", regex="hello", regex_no_match=True), OK, "found"),
    # The body is bytes: a character of the pattern matches its UTF-8.
    ("regex, a UTF-8 character", UrlSpec("/", regex="café"),
     b"HTTP/1.0 200 OK\r\n\r\nun caf\xc3\xa9", None),
    ("regex, Latin-1 is not UTF-8", UrlSpec("/", regex="café"),
     b"HTTP/1.0 200 OK\r\n\r\nun caf\xe9", "not found"),
    ("chunked body decoded for the digest", UrlSpec("/", digest=MD5), CHUNKED, None),
    ("chunked size lies", UrlSpec("/", regex="short"),
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nshort\r\n0\r\n\r\n", "cut short"),
    ("chunk size not hex", UrlSpec("/", digest=MD5),
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n", "bad chunk size"),
    # The body of a url judged on its status alone is not looked at (as
    # keepalived): a chunked one cut short by the 4 MiB kept passes.
    ("chunked, cut short, status only", UrlSpec("/"),
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nshort", None),
    ("empty response", UrlSpec("/"), b"", "not an HTTP status line"),
    ("garbage", UrlSpec("/"), b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP status line"),
    ("binary", UrlSpec("/"), bytes(range(256)), "not an HTTP status line"),
    ("HTTP/1.0 2000", UrlSpec("/"), b"HTTP/1.0 2000 OK\r\n\r\n", "not an HTTP status line"),
]


@pytest.mark.parametrize("desc, url, response, words", TABLE, ids=[r[0] for r in TABLE])
def test_judge(desc, url, response, words):
    why = asyncio.run(judge(url, response))
    if words is None:
        assert why is None
    else:
        assert why is not None and words in why


def test_request_names_the_host_and_closes():
    spec = CheckSpec("HTTP_GET", virtualhost="www.example", http_protocol="1.1")
    assert request(spec, UrlSpec("/h?x=1"), "10.0.1.2", 80) == (
        b"GET /h?x=1 HTTP/1.1\r\nHost: www.example\r\nUser-Agent: KeepAliveClient\r\n"
        b"Connection: close\r\n\r\n")
    # Without a virtualhost: the address and the port, on 80 too (as
    # keepalived's http_request_thread writes it).
    for port in (8080, 80, 443):
        plain = request(CheckSpec("HTTP_GET"), UrlSpec("/"), "10.0.1.2", port)
        assert plain.startswith(f"GET / HTTP/1.0\r\nHost: 10.0.1.2:{port}\r\n".encode())


@pytest.mark.parametrize("path", ["/a b", "/x\r\nHost: evil", "/\x00"])
def test_a_path_that_would_break_the_request_line_fails_without_a_connection(path):
    from pylvs.health import check_http

    # 192.0.2.1 (TEST-NET-1): never connected to; the check fails before.
    r = asyncio.run(check_http.check(CheckSpec("HTTP_GET", urls=(UrlSpec(path),),
                                               connect_timeout=0.01), "192.0.2.1", 80))
    assert not r.ok and "control characters" in r.text


# A pattern that backtracks without end, the server's body chosen for it:
# a probe runs it (check_http.REGEX_TIMEOUT at 0.5 s, the probe's timings
# shorter than that) while a timer ticks every 10 ms on the loop. Run in a
# child: a search that cannot be stopped must not hang the test run.
RUNAWAY = textwrap.dedent(r"""
    import asyncio, json
    from pylvs.config.model import CheckSpec, UrlSpec
    from pylvs.health import check_http
    from pylvs.health.manager import Probe

    check_http.REGEX_TIMEOUT = 0.5
    BODY = b"HTTP/1.0 200 OK\r\n\r\n" + b"a" * 100 + b"!"

    async def fetch(spec, url, host, port, ctx):
        return BODY

    check_http._fetch = fetch

    async def main():
        loop = asyncio.get_running_loop()
        ticks = [loop.time()]

        async def tick():
            while True:
                await asyncio.sleep(0.01)
                ticks.append(loop.time())

        timer = asyncio.ensure_future(tick())
        spec = CheckSpec("HTTP_GET", delay_loop=0.1, connect_timeout=0.1, retry=0,
                         urls=(UrlSpec("/", regex="(a|aa)+$"),))
        p = Probe("10.0.1.2", 80, spec, lambda probe: None)
        t0 = loop.time()
        p.start()
        while p.last is None and loop.time() < t0 + 20:
            await asyncio.sleep(0.01)
        took = loop.time() - t0
        await p.stop()
        timer.cancel()
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        print(json.dumps({"up": p.up, "text": p.text, "took": took, "gap": max(gaps)}))

    asyncio.run(main())
""")


def test_a_runaway_regex_fails_the_check_and_leaves_the_loop_running():
    out = subprocess.run([sys.executable, "-c", RUNAWAY], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    r = json.loads(out)
    # The regex's own result, not the probe's budget cutting it short.
    assert not r["up"] and "regex '(a|aa)+$' took longer than 0.5 s" in r["text"], r
    # Bounded: the check ends soon after the regex's time; the loop ran
    # its timer all along (a search holding the thread would leave a gap
    # as long as itself).
    assert r["took"] < 5 and r["gap"] < 0.25, r


# A server that sends without end (an endless header, a stream on the
# checked port): every read is done at once, which before Python 3.12 made
# asyncio.wait_for swallow the budget's cancel, so the probe never reached
# a verdict and the real server stayed up, the loop busy reading. The
# stream is fed in memory (check_http.open_tcp replaced); run in a child
# so a probe that never ends fails the test instead of hanging it.
ENDLESS = textwrap.dedent(r"""
    import asyncio, json
    from pylvs.config.model import CheckSpec, UrlSpec
    from pylvs.health import check_http
    from pylvs.health.manager import Probe

    class Writer:
        def write(self, data): pass
        async def drain(self): pass
        def close(self): pass
        async def wait_closed(self): pass

    async def main():
        loop = asyncio.get_running_loop()
        feeders = []

        async def open_tcp(spec, host, port, ssl=None, sni=None):
            reader = asyncio.StreamReader()

            async def feed():
                reader.feed_data(b"HTTP/1.0 200 OK\r\n")
                while True:
                    reader.feed_data(b"X-Endless: " + b"a" * 60000 + b"\r\n")
                    await asyncio.sleep(0)

            feeders.append(asyncio.ensure_future(feed()))
            return reader, Writer()

        check_http.open_tcp = open_tcp
        spec = CheckSpec("HTTP_GET", delay_loop=0.2, connect_timeout=0.2, retry=0,
                         urls=(UrlSpec("/"),))
        p = Probe("10.0.1.2", 80, spec, lambda probe: None)
        t0 = loop.time()
        p.start()
        while p.last is None and loop.time() < t0 + 5:
            await asyncio.sleep(0.02)
        took = loop.time() - t0
        await asyncio.wait_for(p.stop(), 2)
        for f in feeders:
            f.cancel()
        print(json.dumps({"up": p.up, "text": p.text, "took": took}))

    asyncio.run(main())
""")


def test_a_server_sending_without_end_fails_within_the_budget():
    out = subprocess.run([sys.executable, "-c", ENDLESS], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    r = json.loads(out)
    # verdict_budget: max(delay_loop, connect_timeout) + connect_timeout.
    assert not r["up"] and r["text"] == "no verdict within 0.4 s" and r["took"] < 2, r
