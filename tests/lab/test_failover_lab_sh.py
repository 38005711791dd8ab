"""netns-labs/failover/lab.sh's own command line: --help and bad arguments
are answered by the script (naming it, not the Python module behind it),
before any namespace is built."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

LAB_SH = Path(__file__).resolve().parents[2] / "netns-labs" / "failover" / "lab.sh"


def lab_sh(*args: str) -> subprocess.CompletedProcess:
    # PYTHON points nowhere: an argument that got past the script's own
    # checks would fail on it (exit 1), not build a lab.
    return subprocess.run(["sh", str(LAB_SH), *args], capture_output=True, text=True,
                          timeout=10, env={"PATH": "/usr/bin:/bin", "PYTHON": "/nonexistent"})


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_the_scripts_own(flag):
    p = lab_sh(flag)
    assert p.returncode == 0, p
    assert p.stdout.startswith(f"usage: {LAB_SH} [NAME] [--sync auto|on|off] "
                               "[--advert-int SECONDS]"), p.stdout
    for word in ("--sync auto|on|off", "--advert-int SECONDS", "Exit status"):
        assert word in p.stdout
    assert "pylvs.lab.failover" not in p.stdout and p.stderr == ""


@pytest.mark.parametrize("args, says", [
    (["--bogus"], "unknown option --bogus"),
    (["--sync"], "--sync needs a value"),
    (["--sync", "maybe"], "--sync takes auto, on or off, not 'maybe'"),
    (["--sync=no"], "--sync takes auto, on or off, not 'no'"),
    (["--advert-int", "soon"], "--advert-int takes seconds (1, 0.3), not 'soon'"),
    (["--advert-int", "1.2.3"], "--advert-int takes seconds (1, 0.3), not '1.2.3'"),
    (["one", "two"], "one lab name only (got one and two)"),
    (["a/b"], "a lab name is letters, digits, - and _, not 'a/b'"),
])
def test_bad_arguments_are_refused_before_anything_is_built(args, says):
    p = lab_sh(*args)
    assert p.returncode == 2, p
    assert p.stderr == f"{LAB_SH}: {says} (--help for usage)\n"
    assert p.stdout == ""


def test_the_python_module_s_help_says_what_each_command_and_option_does():
    import sys

    p = subprocess.run([sys.executable, "-m", "pylvs.lab.failover", "--help"],
                       capture_output=True, text=True, timeout=30,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    for said in ("check: build it", "up: build and start it", "down: remove it",
                 "namespaces NAME-client", "keepalived's advert_int", "--advert-int SECONDS"):
        assert said in text, text
