"""HTTP_GET's verdict on what a server sent (check_http.judge), garbage
and lies included, and the request it sends."""

from __future__ import annotations

import hashlib

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
    why = judge(url, response)
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
    import asyncio

    from pylvs.health import check_http

    # 192.0.2.1 (TEST-NET-1): never connected to; the check fails before.
    r = asyncio.run(check_http.check(CheckSpec("HTTP_GET", urls=(UrlSpec(path),),
                                               connect_timeout=0.01), "192.0.2.1", 80))
    assert not r.ok and "control characters" in r.text
