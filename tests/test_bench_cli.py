"""`python -m bench`: each benchmark's --help lists that benchmark's own
options (the top-level parser used to answer every --help itself)."""

from __future__ import annotations

import pytest

from bench import __main__ as bench_main


@pytest.mark.parametrize("name,option", [("sync", "--lab"), ("engine", "--flows"),
                                         ("e2e", "--fwd"), ("conn-rate", "--seconds"),
                                         ("latency", "--seconds"), ("throughput", "--seconds")])
def test_a_benchmark_s_help_is_its_own(name, option, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main.main([name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith(f"usage: python -m bench {name}") and option in out


def test_the_top_level_help_names_the_benchmarks(capsys):
    assert bench_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in bench_main.BENCHES) and "NAME --help" in out
    with pytest.raises(SystemExit) as e:
        bench_main.main([])
    assert e.value.code == 2
