"""A client -- director -- real server trio of namespaces for the I/O tests.

    c (eth0 10.9.0.2) ==== d0 10.9.0.1  [d]  d1 10.9.1.1 ==== (eth0 10.9.1.2) r

Veth offloads stay at their defaults (checksum offload and TSO on): the
partial checksums and GSO frames they produce are what the data path must
handle. Code under test runs in the namespaces through `ip netns exec`, so
the test process itself never leaves the root namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


class Trio:
    def __init__(self, uid: str):
        self.c, self.d, self.r = f"pl{uid}-c", f"pl{uid}-d", f"pl{uid}-r"
        self.uid = uid

    def up(self) -> "Trio":
        for ns in (self.c, self.d, self.r):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        u = self.uid
        sh("ip", "link", "add", f"pl{u}c", "netns", self.c, "type", "veth", "peer", "name", "d0",
           "netns", self.d)
        sh("ip", "link", "add", f"pl{u}r", "netns", self.r, "type", "veth", "peer", "name", "d1",
           "netns", self.d)
        for ns, old in ((self.c, f"pl{u}c"), (self.r, f"pl{u}r")):
            sh("ip", "-n", ns, "link", "set", old, "name", "eth0")
        for ns, dev, addr in ((self.c, "eth0", "10.9.0.2/24"), (self.d, "d0", "10.9.0.1/24"),
                              (self.d, "d1", "10.9.1.1/24"), (self.r, "eth0", "10.9.1.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.c, "route", "add", "default", "via", "10.9.0.1")
        sh("ip", "-n", self.r, "route", "add", "default", "via", "10.9.1.1")
        return self

    def down(self) -> None:
        for ns in (self.c, self.d, self.r):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def mac(self, ns: str, dev: str) -> str:
        return json.loads(sh("ip", "-n", ns, "-j", "link", "show", dev).stdout)[0]["address"]

    def popen(self, ns: str, code: str, **kw) -> subprocess.Popen:
        """Run Python code in a namespace (cwd = the repo, so pylvs imports)."""
        return subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", textwrap.dedent(code)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kw)

    def py(self, ns: str, code: str, timeout: float = 30):
        """Run Python code in a namespace; its last stdout line is JSON, returned."""
        p = self.popen(ns, code)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise AssertionError(f"timed out in {ns}:\n{out}\n{err}")
        if p.returncode:
            raise AssertionError(f"failed in {ns} ({p.returncode}):\n{out}\n{err}")
        return json.loads(out.strip().splitlines()[-1])


STEERING_STATE = """
import json, sys
from pylvs.control.steering import describe
print(json.dumps(describe(sys.argv[1])))
"""


def steering_state(ns: str, ifname: str = "eth0") -> dict | None:
    """How the director in ``ns`` steers ``ifname``: {"kind": "bpf" | "nft",
    "sets": {set name: ["10.9.0.1 . tcp . 80", ...] or ["10.9.0.1", ...]}},
    or None when nothing steers (no tcx program of pylvs, no nft table)."""
    p = subprocess.run(["ip", "netns", "exec", ns, PY, "-c", STEERING_STATE, ifname], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    if p.returncode:
        raise AssertionError(f"reading the steering of {ns}: {p.stderr}")
    return json.loads(p.stdout)


def nft_tables(ns: str) -> str:
    return sh("ip", "netns", "exec", ns, "nft", "list", "tables").stdout


os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
