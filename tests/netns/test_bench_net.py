"""`bench conn-rate`, `bench latency`, `bench throughput`: one short round each.

The figures are not judged (a shared machine); what is: every impl ran and
measured something (connections completed by wrk and accepted by the
servers, every ping answered, bytes received by iperf3), the ratios are
computed, and the bench's lab is gone afterwards. The tools (wrk, haproxy,
iperf3) are installed by `make test` (the Makefile's APT_PACKAGES).
"""

from __future__ import annotations

import os

import pytest

from pylvs.lab.topology import NETNS_DIR

pytestmark = pytest.mark.netns


def _namespaces(prefix: str) -> set[str]:
    return {p for p in os.listdir(NETNS_DIR) if p.startswith(prefix)} \
        if NETNS_DIR.is_dir() else set()


def _rows(doc: dict) -> dict[str, dict]:
    rows = {r["impl"]: r for r in doc["results"]}
    for impl, row in rows.items():
        assert "error" not in row, (impl, row)
        assert row["runs"] == 1, (impl, row)
    assert doc["meta"]["uptime_before"] and doc["meta"]["uptime_after"]
    return rows


def test_conn_rate_quick_round():
    from bench import conn_rate

    before = _namespaces("plcr")
    doc = conn_rate.run(["--seconds", "2", "--conns", "64", "--impl", "pylvs",
                         "--impl", "haproxy"],
                        runs=1, quick=True)
    rows = _rows(doc)
    assert set(rows) == {"pylvs", "haproxy"}
    for impl, row in rows.items():
        assert row["conns_per_s"] > 0, (impl, row)
        errors = row["socket_errors"][0]
        assert errors.get("connect", 0) == 0 and row["non_2xx"] == [0], (impl, row)
        # The servers' own accept counters saw the connections, second by second.
        assert len(row["per_second"][0]) >= 1 and sum(row["per_second"][0]) > 0, (impl, row)
    assert set(rows["pylvs"]["ratios"]) == {"pylvs/haproxy"}
    assert _namespaces("plcr") <= before


def test_latency_quick_round():
    from bench import latency

    before = _namespaces("pllat")
    doc = latency.run(["--seconds", "1", "--rate", "500"], runs=1, quick=True)
    rows = _rows(doc)
    assert set(rows) == {"pylvs", "kernel-nft", "direct"}
    for impl, row in rows.items():
        got = row["rounds"][0]
        # Ping-pong at 500/s for 1 s: every datagram answered, in order of size.
        assert got["sent"] == 500 and got["lost"] == 0, (impl, got)
        assert 0 < got["min_us"] <= got["p50_us"] <= got["p99_us"] <= got["max_us"], got
        assert 0 < row["achieved_rate"] <= 510, row
    assert set(rows["pylvs"]["added_us"]) == {"p50_us", "p90_us", "p99_us", "p99_9_us"}
    assert _namespaces("pllat") <= before


def test_throughput_dr_quick_round():
    from bench import throughput

    before = _namespaces("plthr")
    doc = throughput.run(["--fwd", "dr", "--seconds", "1"], runs=1, quick=True)
    rows = _rows(doc)
    assert set(rows) == {"pylvs", "direct"}
    for impl, row in rows.items():
        assert row["fwd"] == "dr" and row["bps"] > 1e6, (impl, row)
    # The director's CPU use over the transfer is measured (it forwarded it).
    assert rows["pylvs"]["cpu_busy"][0]["director"] > 0, rows["pylvs"]
    assert rows["direct"]["cpu_busy"] == [{}], rows["direct"]
    assert set(rows["pylvs"]["ratios"]) == {"pylvs/direct"}
    assert _namespaces("plthr") <= before
