"""Fixtures of the namespace tests: namespaces of their own for each test
(``trio``, ``director_lab``), or for each module (``pooled_lab``)."""

from __future__ import annotations

import uuid

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


class LabPool:
    """Labs shared by the tests of one module, one per set of Lab options.

    What a lab costs is its namespaces, links, addresses and real-server set-up
    (`pylvs realserver setup`/`teardown`): those are made once. What a test
    can leave behind lives in processes, and every test gets its own: a new
    `pylvs run`, new httpd servers (a killed client's conn still retransmitting
    from a real server dies with its server) and new decapsulators (counters
    from zero). A lab whose test failed is torn down, and the next test that
    asks for one gets a new lab.
    """

    def __init__(self, tag: str):
        self.tag = tag
        self.labs: dict[tuple, object] = {}
        self.made = 0
        self.used: set[str] = set()   # names of labs a test had

    def get(self, **opts):
        from pylvs.lab.topology import Lab

        key = tuple(sorted(opts.items()))
        lab = self.labs.get(key)
        if lab is None:
            lab = Lab(f"pl{self.tag}{self.made or ''}", **opts)
            self.made += 1
            lab.up()
            self.labs[key] = lab
        return lab

    @staticmethod
    def restart_servers(lab) -> None:
        """Stop the real servers' httpd and decapsulators; start new ones."""
        from pylvs.lab.topology import _kill_pids

        # `ip netns exec` execs the server: the Popen's pid is the server's.
        procs = [lab.procs.pop(k) for k in list(lab.procs) if k.startswith(("httpd-", "decap-"))]
        _kill_pids([p.pid for p in procs], grace=5)
        for p in procs:
            if p.stdout:
                p.stdout.close()
        lab.start_real_servers()

    def discard(self, lab) -> list[str]:
        """Tear lab down and forget it; the errors of its teardown."""
        from pylvs.lab.topology import netns_exists

        self.labs = {k: v for k, v in self.labs.items() if v is not lab}
        lab.stop_director()
        errors = lab.down()
        return errors + [f"{ns} still exists" for ns in lab.namespaces if netns_exists(ns)]


@pytest.fixture(scope="module")
def lab_pool():
    pool = LabPool(uuid.uuid4().hex[:6])
    try:
        yield pool
    finally:
        errors = [e for lab in list(pool.labs.values()) for e in pool.discard(lab)]
        assert not errors, errors


@pytest.fixture
def pooled_lab(lab_pool, request):
    """Like ``director_lab``, from the module's pool: ``make(run_args=(),
    ip_forward=0, **Lab options)`` gives the pool's lab for those options,
    with new real servers and a new director started with ``run_args`` (and
    ``--workers`` by ``workers``), ``net.ipv4.ip_forward`` of the director
    set to ``ip_forward``. The director is stopped at the end of the test
    (its log printed, which pytest shows for failures only)."""
    used = []
    failed = request.session.testsfailed

    def make(run_args=(), ip_forward: int = 0, **opts):
        opts.setdefault("servers", 2)
        lab = lab_pool.get(**opts)
        used.append(lab)
        if lab.name in lab_pool.used:
            LabPool.restart_servers(lab)
        lab_pool.used.add(lab.name)
        if lab.ip_forward != ip_forward:
            lab.set_ip_forward(ip_forward)
        lab.start_director(*run_args)
        return lab

    yield make
    for lab in used:
        print(f"--- director log ({lab.name}) ---\n{lab.director_log()[-6000:]}")
        lab.stop_director()
    if request.session.testsfailed != failed:
        errors = [e for lab in used for e in lab_pool.discard(lab)]
        assert not errors, errors
