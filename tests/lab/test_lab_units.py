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
