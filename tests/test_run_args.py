"""`pylvs run` refuses option combinations that cannot work with one clear
line (argparse's usage error, exit status 2) before it opens anything."""

from __future__ import annotations

import pytest

from pylvs.runtime.daemon import main

CASES = [
    ("a TAP named twice", ["--tap", "t1", "--addr", "10.0.0.1/24", "--tap", "t1", "--addr",
                           "10.0.1.1/24"], "--tap t1 given twice"),
    ("--ring behind a TAP", ["--tap", "t1", "--addr", "10.0.0.1/24", "--ring", "v3"],
     "--tap goes with none of"),
    ("--io with --tap", ["--tap", "t1", "--addr", "10.0.0.1/24", "--io", "xdp"],
     "--tap goes with none of"),
    ("--addr without --tap", ["--addr", "10.0.0.1/24"], "--addr, --gateway and --mac go with --tap"),
    ("an unknown ring", ["--ring", "v4"], "invalid choice: 'v4'"),
]


@pytest.mark.parametrize("argv,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_one_line(argv, want, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert want in err, err
    assert "Traceback" not in err


def test_loopback_is_not_a_port_to_forward_on():
    # With clients on the director, lo was opened twice ("ports: lo ..., lo ...").
    from pylvs.runtime.daemon import Daemon, Options

    with pytest.raises(SystemExit, match="loopback interface is not a port"):
        Daemon(Options(ifaces=["lo"]))
