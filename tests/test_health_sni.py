"""SSL_GET's enable_sni (keepalived.conf(5)): read from the file, not
warned about, and the name sent is the url's virtualhost, else the
checker's (itself resolved from the real and virtual server's)."""

from __future__ import annotations

import asyncio

import pytest

from pylvs.config.keepalived import parse_text
from pylvs.config.model import CheckSpec, UrlSpec
from pylvs.health import check_http

CONF = """
virtual_server 10.0.0.100 443 {
    protocol TCP
    virtualhost www.vs.example
    real_server 10.0.1.11 443 {
        SSL_GET {
            enable_sni
            url {
                path /
            }
        }
    }
    real_server 10.0.1.12 443 {
        SSL_GET {
            url {
                path /
            }
        }
    }
}
"""


def test_enable_sni_is_read_and_not_warned_about():
    cfg = parse_text(CONF)
    a, b = (r.checks[0] for r in cfg.virtual_servers[0].real_servers)
    assert (a.enable_sni, a.virtualhost) == (True, "www.vs.example")
    assert b.enable_sni is False
    assert not [w for w in cfg.warnings if "enable_sni" in str(w)]


@pytest.mark.parametrize("desc, spec_kw, url_vhost, sni", [
    ("the checker's virtualhost", {"enable_sni": True, "virtualhost": "a.example"}, None, "a.example"),
    ("the url's first", {"enable_sni": True, "virtualhost": "a.example"}, "u.example", "u.example"),
    ("without enable_sni: the address (no SNI for an IP)", {"virtualhost": "a.example"}, None,
     "10.0.1.11"),
    ("enable_sni, no virtualhost: the address", {"enable_sni": True}, None, "10.0.1.11"),
])
def test_the_server_name_sent(monkeypatch, desc, spec_kw, url_vhost, sni):
    seen = {}

    async def fake_open_connection(host, port, **kw):
        seen["server_hostname"] = kw.get("server_hostname")
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(asyncio, "open_connection", fake_open_connection)
    spec = CheckSpec("SSL_GET", urls=(UrlSpec("/", virtualhost=url_vhost),), **spec_kw)
    r = asyncio.run(check_http.check(spec, "10.0.1.11", 443))
    assert not r.ok and seen["server_hostname"] == sni, desc
