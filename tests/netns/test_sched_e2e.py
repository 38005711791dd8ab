"""End to end: schedulers pick the real server a kernel IPVS director would.

One client, three real servers behind VS-NAT, a real `pylvs run` (one worker
and two). The dests are added rs1, rs2, rs3, so the kernel's list is rs3,
rs2, rs1 (newest first): rr answers in that order, and sh's and mh's tables
(dealt over that list, keyed by the kernel's hashes of the client address)
send the client to the server computed here from the kernel's definitions.
"""

from __future__ import annotations

import collections
import ipaddress

import pytest

from pylvs.lab.topology import Lab
from pylvs.sched import mh
from pylvs.sched.hashes import hash_32

pytestmark = [pytest.mark.netns,
              pytest.mark.parametrize("workers", [1, 2], ids=["1worker", "2workers"], indirect=True)]

VPORT = 80


@pytest.fixture
def lab(pooled_lab):
    return pooled_lab(servers=3)


def add_service(lab: Lab, sched: str, *flags: str) -> None:
    vip = f"{lab.vip}:{VPORT}"
    lab.adm("-A", "-t", vip, "-s", sched, *(("-b", ",".join(flags)) if flags else ()))
    for rip in lab.rips:
        lab.adm("-a", "-t", vip, "-r", f"{rip}:{VPORT}", "-m", "-w", "1")
    assert lab.wait_resolved(lab.rips), lab.director_log()[-2000:]


def whoami_many(lab: Lab, n: int) -> list[str]:
    """n sequential requests, one TCP connection each; the answering rs names."""
    url = f"http://{lab.vip}:{VPORT}/whoami"
    argv = ["curl", "-s", "--noproxy", "*", "--connect-timeout", "3", "--max-time", "5",
            "-H", "Connection: close", *([url] * n)]
    p = lab.run(lab.client, argv, timeout=30 + n * 0.2, check=False)
    got = [x.strip() for x in p.stdout.splitlines() if x.strip()]
    assert len(got) == n, (got, lab.director_log()[-2000:])
    return got


def kernel_list(lab: Lab) -> list[str]:
    """The rs names in the kernel's dest order: newest first."""
    return list(reversed(lab.rs_names[:3]))


def test_rr_goes_newest_first(lab: Lab):
    add_service(lab, "rr")
    order = kernel_list(lab)
    assert whoami_many(lab, 6) == order * 2


def test_sh_sends_the_client_to_its_kernel_bucket(lab: Lab):
    add_service(lab, "sh")
    bucket = hash_32(int(ipaddress.IPv4Address(lab.cip)), 8)
    want = kernel_list(lab)[bucket % 3]          # weights 1: buckets dealt one each
    assert set(whoami_many(lab, 12)) == {want}


def test_sh_port_spreads_one_client(lab: Lab):
    add_service(lab, "sh", "sh-port")
    counts = collections.Counter(whoami_many(lab, 60))
    assert set(counts) == set(lab.rs_names[:3]), counts


def test_mh_sends_the_client_to_its_maglev_entry(lab: Lab):
    add_service(lab, "mh")

    class D:
        def __init__(self, slot, rip):
            self.slot, self.weight, self.last_weight = slot, 1, 1
            self.daddr, self.dest_port = int(ipaddress.IPv4Address(rip)), VPORT

    names = kernel_list(lab)
    rips = list(reversed(lab.rips[:3]))
    table = mh.build_table([D(i, rip) for i, rip in enumerate(rips)])
    entry = mh.MaglevHashing().bucket(int(ipaddress.IPv4Address(lab.cip)), 0)
    want = names[int(table[entry])]
    assert set(whoami_many(lab, 12)) == {want}
