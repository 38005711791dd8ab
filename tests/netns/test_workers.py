"""`pylvs run --workers 2` in a VS-NAT lab: steering by client address
(docs/io.md, "Workers") and counters that are sums over the workers.

60 client addresses on the client's interface each send UDP datagrams from
two source ports to the VIP; the director's conn listing says which worker
holds each conn, and bpf.steer_index (the fanout program's Python twin)
says which worker it must be.
"""

from __future__ import annotations

import collections
import json
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pylvs.io import bpf
from pylvs.lab.topology import Lab

pytestmark = pytest.mark.netns

PORT = 7
CLIENTS = [f"10.0.0.{i}" for i in range(150, 210)]   # the lab's client segment, /24
FLOWS = 2   # source ports per client address

# In the client namespace: from every address, FLOWS datagrams from distinct
# ports, each waiting for its answer (retried: a frame lost to a full ring
# must not fail the test). Prints [(caddr, cport, reply source, payload)].
CLIENT = """
import json, socket, sys
vip, port, flows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for addr in sys.argv[4:]:
    for k in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, 0))
        s.settimeout(1.0)
        got = None
        for _ in range(3):
            s.sendto(f"{addr} {k}".encode(), (vip, port))
            try:
                data, src = s.recvfrom(2048)
            except socket.timeout:
                continue
            got = (f"{src[0]}:{src[1]}", data.decode(errors="replace"))
            break
        out.append((addr, s.getsockname()[1], *(got or (None, None))))
        s.close()
print(json.dumps(out))
"""

CONNS = """
import json
from pylvs.control import rpc
with rpc.Client() as c:
    print(json.dumps({"conns": c.call(op="conns"), "snapshot": c.call(op="snapshot"),
                      "stats": c.call(op="stats")}))
"""


@pytest.fixture
def lab2(director_lab) -> Lab:
    lab = director_lab(run_args=("--workers", "2"), servers=3)
    for a in CLIENTS:
        lab.run(lab.client, ["ip", "addr", "add", f"{a}/24", "dev", "eth0"])
    lab.nat_service("udp", PORT, (1, 1, 1))
    return lab


def send_round(lab: Lab) -> list:
    p = lab.run(lab.client, [lab.python, "-c", CLIENT, lab.vip, str(PORT), str(FLOWS),
                             *CLIENTS], timeout=120)
    return json.loads(p.stdout)


def director_view(lab: Lab) -> dict:
    return lab.py(lab.director, CONNS)


def predicted(lab: Lab, caddr: str, cport: int) -> tuple[int, int]:
    """The worker of a client's datagram to the VIP and of a real server's
    reply to it, as the fanout program computes them."""
    svc = [(17, bpf.ip(lab.vip), PORT)]
    dst = [(17, bpf.ip(r), PORT) for r in lab.rips]
    to_vip = bytes(Ether() / IP(src=caddr, dst=lab.vip) / UDP(sport=cport, dport=PORT))
    reply = bytes(Ether() / IP(src=lab.rips[0], dst=caddr) / UDP(sport=PORT, dport=cport))
    return bpf.steer_index(to_vip, 2, svc, dst), bpf.steer_index(reply, 2, svc, dst)


def check_round(lab: Lab, sent: list, view: dict) -> collections.Counter:
    unanswered = [s for s in sent if s[2] != f"{lab.vip}:{PORT}"]
    assert not unanswered, f"{len(unanswered)} datagrams without a reply from the VIP: {unanswered[:5]}"
    by_flow = {(c["caddr"], c["cport"]): c for c in view["conns"]}
    per_worker: collections.Counter = collections.Counter()
    for caddr, cport, _src, _payload in sent:
        conn = by_flow.get((caddr, cport))
        assert conn is not None, f"no conn for {caddr}:{cport}"
        want_in, want_reply = predicted(lab, caddr, cport)
        assert want_in == want_reply   # the key is the client address both ways
        assert conn["worker"] == want_in, (caddr, cport, conn)
        per_worker[conn["worker"]] += 1
    return per_worker


def test_both_directions_of_every_client_stay_on_its_worker(lab2: Lab):
    sent = send_round(lab2)
    assert len(sent) == len(CLIENTS) * FLOWS
    per_worker = check_round(lab2, sent, director_view(lab2))
    # 60 addresses through the mix: both workers have clients.
    assert set(per_worker) == {0, 1}, per_worker

    # The client-side interface goes down and up: its fanout group's sockets
    # rejoin in creation order, so a client keeps its worker.
    lab2.run(lab2.director, ["ip", "link", "set", "eth0", "down"])
    lab2.run(lab2.director, ["ip", "link", "set", "eth0", "up"])
    time.sleep(3)   # the director re-reads ports and routes every second
    sent = send_round(lab2)
    check_round(lab2, sent, director_view(lab2))


def test_counters_and_listings_are_sums_over_workers(lab2: Lab):
    sent = send_round(lab2)
    view = director_view(lab2)
    n = len(sent)
    workers = view["stats"]["workers"]
    assert len(workers) == 2
    created = [w["engine"]["conns_created"] for w in workers]
    assert all(c > 0 for c in created) and sum(created) == n
    assert view["stats"]["engine"]["conns_created"] == n
    for name in ("rx_frames", "tx_frames"):
        assert view["stats"]["engine"][name] == sum(w["engine"][name] for w in workers)
    assert view["stats"]["conns"]["count"] == n == sum(w["conns"]["conn_count"] for w in workers)
    assert view["stats"]["io"]["rx_frames"] == sum(w["io"]["rx_frames"] for w in workers)
    svc, = view["snapshot"]["services"]
    # One request and one reply per flow (a retried datagram adds to both).
    assert svc["stats"]["conns"] == n and svc["stats"]["inpkts"] >= n
    assert svc["stats"]["outpkts"] == svc["stats"]["inpkts"]
    dests = svc["dests"]
    assert sum(d["inactconns"] for d in dests) == n and sum(d["activeconns"] for d in dests) == 0
    assert sum(d["stats"]["conns"] for d in dests) == n
    # -L -c lists the conns of both workers; -L -n shows the summed counts.
    listing = lab2.adm("-L", "-n", "-c")
    assert sum(1 for line in listing.splitlines() if line.startswith("UDP")) == n
    rows = [line.split() for line in lab2.adm("-L", "-n").splitlines() if "->" in line
            and "Masq" in line]
    assert sum(int(r[-1]) for r in rows) == n   # InActConn


def test_tables_too_big_for_the_classic_program_keep_nat_on_its_worker(lab2: Lab):
    """1,500 more NAT services on their own VIP addresses: the classic
    fanout program would key by source address alone (bpf.fanout_plan
    "saddr") and send the real servers' replies to a worker without their
    conn; the eBPF program the workers run keys by the full rule at any
    size, so every client still gets its answers from its worker."""
    extra = [f"10.50.{i // 250}.{i % 250 + 1}" for i in range(1500)]
    assert bpf.fanout_plan([(6, bpf.ip(a), 80) for a in extra],
                           [(6, bpf.ip(lab2.rips[0]), 80)]) == bpf.FANOUT_SADDR
    rules = "".join(f"-A -t {a}:80 -s rr\n-a -t {a}:80 -r {lab2.rips[0]}:80 -m\n" for a in extra)
    p = lab2.adm_run("-R", stdin=rules, timeout=60)
    assert p.returncode == 0, p.stderr
    sent = send_round(lab2)
    per_worker = check_round(lab2, sent, director_view(lab2))
    assert set(per_worker) == {0, 1}, per_worker
