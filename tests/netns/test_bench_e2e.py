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


def _left_behind(doc: dict) -> set[str]:
    """The namespaces of this run's labs still present (by name: another
    bench test may run its own labs at the same time under xdist)."""
    labs = doc["meta"]["labs"]
    assert labs, doc["meta"]
    return {p for p in os.listdir(NETNS_DIR) if p.startswith(tuple(labs))} \
        if NETNS_DIR.is_dir() else set()


def test_bench_e2e_dr_quick_round():
    from bench import e2e

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
    assert not _left_behind(doc)


def test_bench_e2e_nat_overload_flood_workers_tap_quick_round():
    """One short +rps round of the NAT bench with pylvs (1 and 2 workers,
    AF_PACKET and TAP) and the kernel: the headline rows carry who set their
    figure (limit check), the overload row its capacity ramp, the flood row
    the established flows alone and under the UDP flood and the SYN flood,
    the 2-worker row its
    scaling verdict; the TAP impl's second lab is built, checked and gone."""
    from bench import e2e

    doc = e2e.run(["--rps", "on", "--seconds", "0.5", "--warmup", "0.3", "--ramp", "50000",
                   "--clients", "4",
                   "--ramp-seconds", "0.5", "--impl", "pylvs", "--impl", "pylvs-w2",
                   "--impl", "pylvs-tap", "--impl", "kernel-nft"], runs=1, quick=True)
    rows = {(r["scenario"], r["impl"]): r for r in doc["results"]}
    impls = ("pylvs", "pylvs-w2", "pylvs-tap", "kernel-nft")
    for impl in impls:
        head = rows[("udp64-1000flows+rps", impl)]
        assert "error" not in head, (impl, head)
        assert head["sample_check"] == {"rs1": "ok", "rs2": "ok", "rs3": "ok"}, impl
        assert head["limit"] in ("generator", "director"), head
        assert (head["limit"] == "director") == (head["lost_fraction"] > e2e.LOST_DIRECTOR)
        # pylvs's own ring/queue drops are read from `pylvs stats`; the
        # kernel's only from its interface.
        assert ("pylvs_rx_dropped" in head["director_drops_pps"]) == impl.startswith("pylvs")

        over = rows[("udp64-1000flows-overload+rps", impl)]
        assert "error" not in over and over["runs"] == 1, (impl, over)
        (rnd,) = over["rounds"]
        assert [s["asked_pps"] for s in rnd["ramp"]] == [50000.0]
        # The capacity is the most delivered in the round, the overload window included.
        assert rnd["capacity_pps"] >= max(over["pps"], head["pps"], rnd["ramp"][0]["pps"]) > 0
        assert over["offered_over_capacity"] == rnd["attempted_pps"] / rnd["capacity_pps"]
        assert over["overload_reached"] == (over["offered_over_capacity"] >= 2.0)

        flood = rows[("udp64-1000flows-flood+rps", impl)]
        assert "error" not in flood, (impl, flood)
        assert flood["est_alone_pps"] > 0 and flood["flood_offered_pps"] > 0, flood
        assert flood["est_kept"] == flood["pps"] / flood["est_alone_pps"]
        # The SYN flood: TCP SYNs from random sources to the TCP service on
        # the same VIP:port, beside the same established UDP flows.
        syn = rows[("udp64-1000flows-synflood+rps", impl)]
        assert "error" not in syn, (impl, syn)
        assert syn["est_alone_pps"] > 0 and syn["flood_offered_pps"] > 0, syn
        assert syn["est_alone_pps"] == flood["est_alone_pps"]   # one alone window for both
        # Every director forwards SYNs: the TCP service takes them.
        assert syn["flood_delivered_pps"] > 0, (impl, syn)
    assert rows[("udp64-1000flows-flood+rps", "kernel-nft")]["flood_delivered_pps"] > 0
    scaling = rows[("udp64-1000flows+rps", "pylvs-w2")]["scaling"]
    assert set(scaling) >= {"pylvs-w2/pylvs", "limit_w1", "limit_w2", "verdict"}
    assert scaling["pylvs-w2/pylvs"] == rows[("udp64-1000flows+rps", "pylvs-w2")]["pps"] / \
        rows[("udp64-1000flows+rps", "pylvs")]["pps"]
    assert "pylvs-w2/kernel-nft" in rows[("udp64-1000flows-overload+rps", "pylvs-w2")]["ratios"]
    assert not _left_behind(doc)
