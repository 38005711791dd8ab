"""Fixtures of the namespace tests (each test gets namespaces of its own)."""

from __future__ import annotations

import pytest

from nsio import Trio


@pytest.fixture
def workers(request) -> int:
    """`pylvs run --workers N` for the labs of a test: 1 unless a module or
    test parametrises it (``pytest.mark.parametrize("workers", [1, 2],
    indirect=True)``), so the other suites run the single worker of old."""
    return getattr(request, "param", 1)


@pytest.fixture(autouse=True)
def _lab_workers(workers, monkeypatch):
    """Every lab director started by the test runs with ``workers``
    (unless the test passes its own --workers)."""
    from pylvs.lab.topology import Lab

    start = Lab.start_director

    def start_director(self, *extra, **kw):
        if "--workers" not in extra:
            extra = (*extra, "--workers", str(workers))
        return start(self, *extra, **kw)

    monkeypatch.setattr(Lab, "start_director", start_director)


@pytest.fixture
def trio(uid):
    """client -- director -- real server namespaces, removed even when the test fails."""
    t = Trio(uid)
    try:
        yield t.up()
    finally:
        t.down()


@pytest.fixture
def director_lab(uid):
    """``make(run_args=(), start=True, **Lab options)``: a VS-NAT lab with `pylvs run`.

    Every lab made is torn down at the end even when the test fails (its
    director log is printed then, which pytest shows for failures only).
    """
    from pylvs.lab.topology import Lab, netns_exists

    labs: list[Lab] = []

    def make(run_args=(), start: bool = True, **opts) -> Lab:
        opts.setdefault("servers", 2)
        lab = Lab(f"pl{uid}{len(labs) or ''}", **opts)
        labs.append(lab)
        lab.up()
        if start:
            lab.start_director(*run_args)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            print(f"--- director log ({lab.name}) ---\n{lab.director_log()[-6000:]}")
            lab.stop_director()
            errors = lab.down()
            assert not errors, errors
            assert not any(netns_exists(ns) for ns in lab.namespaces)
