"""Lab pieces that need no namespaces: the download pattern, the engine bench."""

from __future__ import annotations

import pytest

from pylvs.lab.httpd import content


def test_content_is_deterministic_and_offset_consistent():
    whole = content(0, 200_000)
    assert len(whole) == 200_000
    assert content(70_000, 5_000) == whole[70_000:75_000]
    # Not periodic at 256 or 64 KiB: a misplaced chunk would be noticed.
    assert whole[:256] != whole[256:512]
    assert whole[:1000] != whole[65536:66536]


@pytest.mark.parametrize("impl", ["python", "c"])
def test_engine_bench_smoke(impl):
    from bench import engine

    doc = engine.run(["--flows", "2000", "--impl", impl, "--seconds", "0.05"], runs=2)
    (row,) = doc["results"]
    assert "error" not in row, row
    assert row["pps"] > 0 and row["runs"] == 2


def test_flowgen_frames_equal_the_scalar_builder():
    """bench/flowgen.py's vectorized frames are tcp_frame's byte for byte,
    checksums included, for random flows and the numbering's edges."""
    import numpy as np

    from bench.flowgen import PORTS, FrameMaker, flow_tuples, tcp_frame

    rng = np.random.default_rng(3)
    index = np.concatenate([[0, PORTS - 1, PORTS, 10_000_000 - 1],
                            rng.integers(0, 1 << 31, 200)])
    caddr, cport = flow_tuples(index)
    assert len(set(zip(caddr.tolist(), cport.tolist()))) == len(set(index.tolist()))
    # Addresses whose sums carry in one's complement, beside the numbering's.
    caddr = np.concatenate([caddr, [0xFFFFFFFF, 0xFFFF0000, 0x0000FFFF, 1]]).astype(np.uint32)
    cport = np.concatenate([cport, [0xFFFF, 1, 0xFFFF, 0]]).astype(np.uint16)
    for flags, payload in ((0x02, b""), (0x10, b""), (0x18, bytes(range(64)))):
        got = FrameMaker(flags, payload).frames(caddr, cport)
        for i in range(len(caddr)):
            assert got[i].tobytes() == tcp_frame(int(caddr[i]), int(cport[i]), flags, payload)


def test_engine_bench_table_scale_smoke():
    from bench import engine

    doc = engine.run(["--scenario", "table-scale", "--sizes", "2000,50000",
                      "--seconds", "0.02"], runs=2)
    small, big = doc["results"]
    for row, n in ((small, 2000), (big, 50000)):
        assert "error" not in row, row
        assert row["flows"] == n and row["runs"] == 2 and row["pps"] > 0
        assert row["bytes_per_conn"] == round(row["memory"] / n, 1)
    assert big["ratio"] == big["pps"] / small["pps"]
    assert any("lookup rate at 50,000 flows" in line for line in doc["summary"])


def test_engine_bench_new_conn_smoke():
    """Each SYN of a run makes a conn (checked by the bench itself); the
    python impl rows have figures, and impl c either has or says why not."""
    from bench import engine

    doc = engine.run(["--scenario", "new-conn", "--sched", "rr", "--sched", "wlc",
                      "--seconds", "0.02"], runs=2)
    rows = {(r["sched"], r["impl"]): r for r in doc["results"]}
    assert set(rows) == {(s, i) for s in ("rr", "wlc") for i in ("c", "python")}
    for sched in ("rr", "wlc"):
        py = rows[(sched, "python")]
        assert "error" not in py and py["runs"] == 2 and py["pps"] > 0, py
        # Eight dests of weights 1..4: every one got conns of the last run.
        assert len(py["conns_per_dest"]) == 8 and min(py["conns_per_dest"]) > 0
        c = rows[(sched, "c")]
        assert c.get("pps") or "c_sched" in c["error"], c


# --- bench e2e: the check of the frames captured at the sinks ----------------------

MAC, CIP, VIP, RIP, DIP0 = "02:00:00:00:00:0b", "10.0.2.2", "10.0.0.100", "10.0.3.12", "10.0.0.1"


def _frame(fwd, *, mac=MAC, src=CIP, dst=None, ttl=63, ip_opts=None, udp_opts=None,
           payload=b"\x42" * 18, outer=None):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    dst = dst or (RIP if fwd == "nat" else VIP)
    inner = (IP(src=src, dst=dst, ttl=ttl, **(ip_opts or {}))
             / UDP(sport=10007, dport=9, **(udp_opts or {})) / payload)
    if fwd == "tun":
        o = {"src": DIP0, "dst": RIP, "ttl": 62, "proto": 4, **(outer or {})}
        return bytes(Ether(dst=mac, src="02:00:00:00:00:01") / IP(**o) / inner)
    return bytes(Ether(dst=mac, src="02:00:00:00:00:01") / inner)


E2E_FRAMES = [
    # (description, fwd, frame kwargs, expected problem: "" = none, else a substring)
    ("NAT: daddr rewritten, TTL - 1, checksums valid", "nat", {}, ""),
    ("DR: the client's packet to the VIP at the real server's MAC", "dr", {}, ""),
    ("Tun: IPIP from the director to the RIP around the DR packet", "tun", {}, ""),
    ("a frame for another MAC", "dr", {"mac": "02:00:00:00:00:0c"}, "ether daddr"),
    ("NAT that left the VIP in place", "nat", {"dst": VIP}, "expected 10.0.2.2 -> 10.0.3.12"),
    ("a rewrite that broke the IP checksum", "nat", {"ip_opts": {"chksum": 0x1234}},
     "IP header checksum"),
    ("a rewrite that broke the UDP checksum", "nat", {"udp_opts": {"chksum": 0x1234}},
     "UDP checksum"),
    ("no checksum (0) is fine for UDP", "dr", {"udp_opts": {"chksum": 0}}, ""),
    ("a TTL the director did not decrement", "dr", {"ttl": 64}, "TTL 64"),
    ("a payload that is not the generator's", "dr", {"payload": b"\x00" * 18}, "payload"),
    ("Tun to the wrong RIP", "tun", {"outer": {"dst": "10.0.3.13"}}, "outer 10.0.0.1 -> 10.0.3.13"),
    ("Tun with an outer protocol other than IPIP", "tun", {"outer": {"proto": 41}},
     "outer protocol 41"),
    ("Tun with a broken outer checksum", "tun", {"outer": {"chksum": 0x1234}},
     "outer header checksum"),
    ("Tun whose outer TTL is not the inner one less the router's hop", "tun", {"outer": {"ttl": 64}},
     "outer TTL 64"),
]


@pytest.mark.parametrize("desc,fwd,kw,problem", E2E_FRAMES, ids=[r[0] for r in E2E_FRAMES])
def test_e2e_check_frame(desc, fwd, kw, problem):
    from bench.e2e import check_frame

    bad = check_frame(fwd, _frame(fwd, **kw), mac=MAC, cip=CIP, vip=VIP, rip=RIP,
                      outer_saddr=DIP0)
    if problem:
        assert any(problem in b for b in bad), bad
    else:
        assert bad == []


@pytest.mark.parametrize("frame", [b"", b"\x00" * 10, b"\xff" * 14 + b"\x08\x00",
                                   bytes(14) + b"\x45" + bytes(40)])
def test_e2e_check_frame_garbage_is_a_problem_not_a_crash(frame):
    from bench.e2e import check_frame

    for fwd in ("nat", "dr", "tun"):
        assert check_frame(fwd, frame, mac=MAC, cip=CIP, vip=VIP, rip=RIP, outer_saddr=DIP0)


@pytest.mark.parametrize("argv", [["--fwd", "tun", "--impl", "kernel-nft-fwd"],
                                  ["--fwd", "dr", "--impl", "kernel-nft"],
                                  ["--impl", "kernel-nft-fwd"]])
def test_e2e_refuses_a_kernel_impl_of_another_method(argv, capsys):
    from bench import e2e

    # Refused while parsing the options: before any namespace is built.
    with pytest.raises(SystemExit) as exc:
        e2e.run(argv, runs=1, quick=True)
    assert exc.value.code == 2
    assert "is not a" in capsys.readouterr().err
