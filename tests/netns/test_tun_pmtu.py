"""Issue 6 item 4: VS-Tun path MTU learnt from a router on the tunnel's path.

The routed Tun lab (pylvs/lab/topology.py, ``fwd="tun"``) has a router
between the director and the Tun real server; here the router's network
toward the real server ("far") gets an MTU of 1400 while the client's and
the director's links stay at 1500::

    client 1500 -- router -- front 1500 -- director
                      \\-- eth2 1400 -- far (1400) -- rs1 (1400, `pylvs realserver run`)

The client uploads 1 MB to the real server's HTTP sink through VS-Tun. Its
segments fit the director's own egress (1500 less the tunnel's headers),
so the director encapsulates them with DF; the router cannot forward the
1400 + 20 (IPIP) or + 32 (GUE) byte outer packets and reports frag-needed
(mtu 1400) to the outer source, the director's own address. Only the
director can tell the client: it learns the path MTU to the RIP and sends
the client frag-needed with 1400 less the tunnel's headers (the kernel's
ip_vs_in_icmp). Without that, the upload stalls (a PMTU black hole).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from pylvs.lab.httpd import content
from pylvs.lab.topology import GUE_PORT

pytestmark = pytest.mark.netns

FAR_MTU = 1400
SIZE = 1_000_000


def _far_mtu(lab, mtu: int) -> None:
    """Every link of the far network (router eth2, the far bridge and its
    ports, the real server's eth0) at `mtu`."""
    lab.run(lab.router_ns, ["ip", "link", "set", "eth2", "mtu", str(mtu)])
    for port in ("router", "rs1", "br0"):
        lab.run(lab.far, ["ip", "link", "set", port, "mtu", str(mtu)])
    lab.run(lab.rs[0], ["ip", "link", "set", "eth0", "mtu", str(mtu)])


def _client_pmtu(lab) -> int | None:
    """The path MTU the client's kernel has learnt toward the VIP, if any."""
    p = lab.run(lab.client, ["ip", "-j", "route", "get", lab.vip])
    route = json.loads(p.stdout)[0]
    metrics = route.get("metrics") or []
    for m in metrics:
        if isinstance(m, dict) and "mtu" in m:
            return int(m["mtu"])
    return None


@pytest.mark.parametrize("tun,overhead", [((), 20),
                                          (("--tun-type", "gue", "--tun-port", str(GUE_PORT)), 32)],
                         ids=["ipip", "gue"])
def test_upload_through_a_smaller_tunnel_path_completes(director_lab, tmp_path, tun, overhead):
    lab = director_lab(fwd="tun", servers=1)
    _far_mtu(lab, FAR_MTU)
    lab.service("tcp", 80, [1], tun=tun)
    assert lab.curl("/whoami", max_time=5).stdout.strip() == "rs1"

    body = tmp_path / "up"
    body.write_bytes(content(3, SIZE))
    p = lab.curl("/sink", "-T", str(body), "-H", "Expect:", max_time=20, check=False)
    assert p.returncode == 0, f"upload: curl rc {p.returncode} {p.stderr.strip()}"
    assert p.stdout.split() == [str(SIZE), hashlib.sha256(body.read_bytes()).hexdigest()]

    st = lab.stats()
    assert st["tun_pmtu_learned"] > 0, st
    assert st["icmp_frag_needed_sent"] > 0, st
    assert st["drop_tun_icmp"] == 0, st
    # The client was told the tunnel's path MTU less the tunnel's headers.
    assert _client_pmtu(lab) == FAR_MTU - overhead
