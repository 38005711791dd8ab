"""HTTP_GET and SSL_GET (keepalived's check_http.c / check_ssl.c).

For each ``url``, in order: connect, send ``GET path HTTP/1.x`` with
``Host:`` (the url's virtualhost, else the checker's, else the target
address and port, as keepalived) and ``Connection: close``, read the
whole response. The check
passes when every url passes: the status code is one of ``status_code``
(any 2xx when none is given), the body's MD5 is ``digest`` when given, and
``regex`` is found in the body (not found, with ``regex_no_match``). Each
connect and each read must finish within ``connect_timeout``; a status
line that is not HTTP, a reset or silence fail the check, and so does a
response longer than MAX_RESPONSE bytes when its body is judged (digest,
regex: the body is read whole, and a chunked one decoded); a url judged
on its status alone reads a body of any size to its end. SSL_GET does not verify the certificate (as
keepalived without ``ca``).

The regex (UrlSpec.pattern, compiled at load) runs in a thread with the
GIL released and fails the check when it takes over REGEX_TIMEOUT s: a
pattern that backtracks without end over a body the server chose neither
blocks the event loop nor holds the check (keepalived's PCRE2 stops such a
match at its match limit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import re
import ssl as ssl_mod

from ..config.model import CheckSpec, UrlSpec
from .check_api import Result, close_writer, open_tcp, os_error_text, target, within

MAX_RESPONSE = 4 << 20   # bytes of one response (head and body) read at most
REGEX_TIMEOUT = 1.0      # s one regex search may take
# The regex searches' own threads: a slow one does not hold up what runs
# in the loop's default executor. Each ends within REGEX_TIMEOUT.
_REGEX_THREADS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pylvs-regex")
_STATUS = re.compile(rb"HTTP/\d\.\d (\d{3})(?: |\r?$)")


def _ssl_context() -> ssl_mod.SSLContext:
    ctx = ssl_mod.SSLContext(ssl_mod.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl_mod.CERT_NONE
    return ctx


def request(spec: CheckSpec, url: UrlSpec, host: str, port: int) -> bytes:
    # keepalived's http_request_thread: a virtualhost as given, else the
    # address with its port, whatever the port (a real server's access
    # rules written for keepalived's probes keep matching them).
    vhost = url.virtualhost or spec.virtualhost or f"{host}:{port}"
    proto = "1.1" if spec.http_protocol == "1.1" else "1.0"
    # keepalived's User-Agent: real servers that tell its probes apart
    # (access_log off for them, an allow rule) keep doing so.
    return (f"GET {url.path} HTTP/{proto}\r\nHost: {vhost}\r\n"
            "User-Agent: KeepAliveClient\r\nConnection: close\r\n\r\n").encode("latin-1")


def dechunk(body: bytes) -> bytes:
    """A ``Transfer-Encoding: chunked`` body decoded (RFC 9112 7.1; chunk
    extensions and trailers ignored); ValueError when its framing lies."""
    out, i = [], 0
    while True:
        eol = body.find(b"\n", i)
        if eol < 0:
            raise ValueError("chunked body cut short")
        size_text = body[i:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ValueError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            return b"".join(out)
        start = eol + 1
        if start + size > len(body):
            raise ValueError("chunked body cut short")
        out.append(body[start:start + size])
        i = start + size
        if body[i:i + 2] == b"\r\n":
            i += 2
        elif body[i:i + 1] == b"\n":
            i += 1
        else:
            raise ValueError("chunk not followed by CRLF")


async def search(url: UrlSpec, body: bytes) -> bool:
    """Is ``url``'s regex found in ``body``? Runs off the event loop
    thread; raises TimeoutError after REGEX_TIMEOUT s."""
    find = functools.partial(url.pattern.search, body, concurrent=True, timeout=REGEX_TIMEOUT)
    found = await asyncio.get_running_loop().run_in_executor(_REGEX_THREADS, find)
    return found is not None


async def judge(url: UrlSpec, response: bytes) -> str | None:
    """None when ``response`` (head and body as received) passes ``url``'s
    tests, else the reason. A chunked body is decoded before the digest
    and the regex see it (and not looked at without them)."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = response.partition(b"\n\n")
    line, _, fields = head.partition(b"\n")
    line = line.rstrip(b"\r")
    m = _STATUS.match(line)
    if m is None:
        return f"not an HTTP status line: {line[:60]!r}"
    reads_body = url.digest is not None or url.regex is not None
    if reads_body and re.search(rb"(?im)^transfer-encoding:[^\n]*\bchunked\b", fields):
        try:
            body = dechunk(body)
        except ValueError as e:
            return str(e)
    code = int(m.group(1))
    if url.status_codes:
        if code not in url.status_codes:
            return f"status {code}, wanted {' '.join(map(str, sorted(url.status_codes)))}"
    elif not 200 <= code <= 299:
        return f"status {code}, wanted 2xx"
    if url.digest is not None:
        got = hashlib.md5(body).hexdigest()
        if got != url.digest.lower():
            return f"digest {got}, wanted {url.digest.lower()}"
    if url.regex is not None:
        try:
            found = await search(url, body)
        except TimeoutError:
            return (f"regex {url.regex!r} took longer than {REGEX_TIMEOUT:g} s "
                    f"over {len(body)} bytes")
        if found == url.regex_no_match:
            return f"regex {url.regex!r} {'found' if found else 'not found'}"
    return None


async def _fetch(spec: CheckSpec, url: UrlSpec, host: str, port: int, ctx) -> bytes:
    """The response as received, read to its end. A url judged on its
    status alone keeps only its first MAX_RESPONSE bytes and reads the
    rest to the end (as keepalived reads a whole body whatever its size);
    one whose body is judged (digest, regex) fails beyond that."""
    keep_all = url.digest is not None or url.regex is not None
    # keepalived's enable_sni: the url's virtualhost, else the checker's
    # (resolved from the real and virtual server's) names the TLS server.
    sni = (url.virtualhost or spec.virtualhost) if spec.enable_sni else None
    reader, writer = await open_tcp(spec, host, port, ssl=ctx, sni=sni)
    try:
        try:
            writer.write(request(spec, url, host, port))
        except RuntimeError:
            # uvloop (the director's loop) refuses a write to a transport
            # the server has already reset (at once after its accept);
            # asyncio's drops it. The read below says what ended it.
            pass
        else:
            await within(writer.drain(), spec.connect_timeout)
        chunks, size = [], 0
        while True:
            data = await within(reader.read(65536), spec.connect_timeout)
            if not data:
                return b"".join(chunks)
            if size + len(data) > MAX_RESPONSE:
                if keep_all:
                    raise ValueError(f"response longer than {MAX_RESPONSE} bytes")
                data = data[:MAX_RESPONSE - size]
            size += len(data)
            chunks.append(data)
    finally:
        await close_writer(writer)


async def check(spec: CheckSpec, addr: str, port: int) -> Result:
    host, p = target(spec, addr, port)
    ctx = _ssl_context() if spec.kind == "SSL_GET" else None
    urls = spec.urls or (UrlSpec("/"),)
    for url in urls:
        if not url.path.isprintable() or any(c.isspace() for c in url.path):
            # It would split or end the request line.
            return Result(False, f"url path {url.path[:40]!r}: spaces or control characters")
        try:
            response = await _fetch(spec, url, host, p, ctx)
        except ValueError as e:
            return Result(False, f"GET {url.path}: {e}")
        except ssl_mod.SSLError as e:
            return Result(False, f"GET {url.path}: TLS: {e.reason or e}")
        except (OSError, asyncio.TimeoutError, EOFError) as e:
            return Result(False, f"GET {url.path} from {host}:{p}: {os_error_text(e)}")
        why = await judge(url, response)
        if why is not None:
            return Result(False, f"GET {url.path}: {why}")
    return Result(True, f"GET {' '.join(u.path for u in urls)}: ok")
