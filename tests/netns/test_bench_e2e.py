"""`bench e2e --fwd dr`, one short round of each impl: the bench's DR code path.

The figures are not judged (a shared machine); what is: every impl delivers
to all three sinks, the frames captured there pass the bench's own check
(check_frame: MAC, addresses, TTL, checksums, payload), the ratios are
computed, and the lab is gone afterwards.
"""

from __future__ import annotations

import os

import pytest

from pylvs.lab.topology import NETNS_DIR

pytestmark = pytest.mark.netns


def _bench_namespaces() -> set[str]:
    return {p for p in os.listdir(NETNS_DIR) if p.startswith("plbench")} \
        if NETNS_DIR.is_dir() else set()


def test_bench_e2e_dr_quick_round():
    from bench import e2e

    before = _bench_namespaces()
    doc = e2e.run(["--fwd", "dr", "--rps", "off", "--seconds", "0.5", "--warmup", "0.5"],
                  runs=1, quick=True)
    assert doc["fwd"] == "dr" and doc["kernel"].startswith("kernel-nft-fwd")
    rows = {r["impl"]: r for r in doc["results"]}
    assert set(rows) == {"pylvs", "kernel-nft-fwd", "cfloor"}
    for impl, row in rows.items():
        assert "error" not in row, (impl, row)
        assert row["scenario"] == "udp64-1000flows-dr" and row["runs"] == 1
        assert row["sample_check"] == {"rs1": "ok", "rs2": "ok", "rs3": "ok"}, impl
        # Every sink got its share: the MAC map / hash spreads over all three.
        assert all(p > 0 for p in row["per_sink_pps"]), (impl, row["per_sink_pps"])
    assert set(rows["pylvs"]["ratios"]) == {"pylvs/kernel-nft-fwd", "pylvs/cfloor"}
    counters = rows["cfloor"]["cfloor_counters"][0]
    assert counters["tx"] > 0 and counters["drop_bad"] == 0, counters
    assert _bench_namespaces() <= before
