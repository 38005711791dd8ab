"""The engine is sans-IO (DESIGN.md): frames and `now` in, frames out. Its
modules never import what would let them touch sockets, the clock, threads,
processes or the file system; I/O belongs to pylvs/io and pylvs/runtime."""

from __future__ import annotations

import ast
import pathlib

ENGINE = pathlib.Path(__file__).parent.parent / "pylvs" / "engine"
FORBIDDEN = {"socket", "asyncio", "time", "os", "select", "selectors", "threading",
             "subprocess", "signal", "pathlib", "io", "shutil", "uvloop", "pyroute2"}


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_engine_core_imports_no_io():
    files = sorted(ENGINE.glob("*.py"))
    assert {f.name for f in files} >= {"reference.py", "conn.py", "icmp.py", "tunnel.py",
                                        "tables.py", "states.py"}
    bad = {f.name: sorted(_imports(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_check_can_fail(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import os\nfrom time import monotonic\nfrom . import tables\n")
    assert _imports(p) & FORBIDDEN == {"os", "time"}
