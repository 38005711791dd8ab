"""`pylvs adm -R` and `pylvs run -c` on hostile input: each line applies on
its own (ipvsadm's restore_table), a bad one is reported with its number,
never a traceback; and ipvsadm's wording for malformed addresses."""

from __future__ import annotations

import io
import random

import pytest

from pylvs.cli import adm
from pylvs.control import rpc
from pylvs.control.balancer import Balancer
from pylvs.engine.tables import Counters


class InProcess:
    """The control socket's client, answered by a Balancer in this process."""

    def __init__(self, balancer: Balancer):
        self.balancer = balancer

    def call(self, req: dict):
        import json

        resp = rpc.handle_line(self.balancer, json.dumps(req))
        if not resp["ok"]:
            raise rpc.RpcError(resp["error"])
        return resp["result"]


def restore(text: str) -> tuple[int, str, Balancer]:
    b = Balancer(Counters(512, 1024))
    err, out = io.StringIO(), io.StringIO()
    rc = adm.main(["-R"], stdin=io.StringIO(text), stdout=out, stderr=err,
                  client_factory=lambda _path: InProcess(b))
    return rc, err.getvalue(), b


def vips(b: Balancer) -> list[str]:
    return sorted(f"{s['vaddr']}:{s['vport']}" for s in b.snapshot()["services"])


def test_nul_byte_in_an_address_is_that_line_s_error():
    rc, err, b = restore("-A -t 10.0.0.160:80 -s rr\n-A -t 10.0.0.16\0:80\n"
                         "-A -t 10.0.0.161:80 -s rr\n")
    assert err == "line 2: illegal virtual server address[:port] specified\n"
    assert rc == adm.EXIT_FAIL
    assert vips(b) == ["10.0.0.160:80", "10.0.0.161:80"]


def test_run_config_names_the_line():
    """`pylvs run -c FILE` reports the AdmError of parse_rules as it is."""
    with pytest.raises(adm.AdmError) as ei:
        adm.parse_rules("-A -t 10.0.0.160:80 -s rr\n-A -t 10.0.0.16\0:80\n")
    assert str(ei.value) == "line 2: illegal virtual server address[:port] specified"
    with pytest.raises(adm.AdmError) as ei:
        adm.parse_rules("-A -t 10.0.0.160:80 -s rr\n\n-a -t 10.0.0.160:80 -r 10.0.\udcff.1:80\n")
    assert str(ei.value) == "line 3: illegal real server address[:port] specified"


@pytest.mark.parametrize("seed", range(4))
def test_restore_fuzz_random_bytes_per_line(seed):
    """Lines of random bytes (read as `pylvs adm -R` reads stdin: UTF-8
    with surrogateescape), some made from a good rule with random bytes
    spliced in, between good rules: no traceback, every good rule applied,
    every other line reported at most once by its number."""
    rnd = random.Random(seed)
    good_rules = {}
    lines = []
    alphabet = b"\x00\x01\t :[]-.,/\\'\"#\xff\xfe\xc3\x80-Atusgimrw0123456789"
    for no in range(1, 301):
        kind = rnd.random()
        if kind < 0.3:
            vip = f"10.1.{no >> 8}.{no & 255}:80"
            good_rules[no] = vip
            lines.append(f"-A -t {vip} -s rr".encode())
        elif kind < 0.6:
            base = bytearray(rnd.choice([b"-A -t 10.2.0.1:80 -s rr", b"-a -t 10.2.0.1:80 -r 10.3.0.1:80 -m",
                                         b"-E -u 10.2.0.2:53 -s wlc -p 10", b"-d -t 10.2.0.1:80 -r 10.3.0.1"]))
            for _ in range(rnd.randint(1, 4)):
                base.insert(rnd.randrange(len(base) + 1), rnd.choice(alphabet))
            lines.append(bytes(base).replace(b"\n", b"").replace(b"\r", b""))
        else:
            raw = bytes(rnd.choice(alphabet) if rnd.random() < 0.7 else rnd.randrange(256)
                        for _ in range(rnd.randint(0, 60)))
            lines.append(raw.replace(b"\n", b"").replace(b"\r", b"")
                         .replace(b"\x0b", b"").replace(b"\x0c", b"").replace(b"\x1c", b"")
                         .replace(b"\x1d", b"").replace(b"\x1e", b"").replace(b"\x85", b""))
    text = b"\n".join(lines).decode("utf-8", "surrogateescape")
    rc, err, b = restore(text)
    assert set(good_rules.values()) <= set(vips(b))
    reported = [int(line.split(":", 1)[0].removeprefix("line ")) for line in err.splitlines()
                if line.startswith("line ")]
    assert len(reported) == len(set(reported))
    assert not set(reported) & set(good_rules)
    assert "Traceback" not in err


@pytest.mark.parametrize("addr, msg", [
    ("10.0.1.17:80:", "illegal real server address[:port] specified"),
    ("10.0.1.17::80", "illegal real server address[:port] specified"),
    ("[10.0.1.17]:80", "illegal real server address[:port] specified"),
    ("[::1]", "illegal real server address[:port] specified"),
    ("[2001:db8::1]:80", "IPv6 is not supported yet"),
    ("2001:db8::1", "IPv6 is not supported yet"),
])
def test_malformed_addresses_use_ipvsadm_s_words(addr, msg):
    """ipvsadm's parse_service: '[addr]:port' or a bare address inet_pton
    reads as IPv6 is IPv6; other colons make an address that neither
    inet_aton nor a host lookup takes, so SERVICE_NONE."""
    with pytest.raises(adm.AdmError) as ei:
        adm.parse_args(["-a", "-t", "10.0.0.1:80", "-r", addr])
    assert str(ei.value) == msg
    with pytest.raises(adm.AdmError) as ei:
        adm.parse_args(["-A", "-t", addr.replace("[10.0.1.17]", "[10.0.0.1]"), "-s", "rr"])
    assert str(ei.value) == msg.replace("real server", "virtual server")
