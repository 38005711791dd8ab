"""`pylvs realserver run`'s one-per-namespace lock without a namespace: the
flock itself, and finding its holder in /proc/locks."""

from __future__ import annotations

import fcntl
import os

import pytest

from pylvs.realserver import config, run


@pytest.fixture
def lockdir(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "STATE_DIR", tmp_path)
    return tmp_path


def _locks_line(path, pid, kind="FLOCK", waiter=False):
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    arrow = "-> " if waiter else ""
    return f"1: {arrow}{kind}  ADVISORY  WRITE {pid} {dev} 0 EOF"


@pytest.mark.parametrize("desc, lines, want", [
    ("the holder", lambda p: [_locks_line(p, 4242)], 4242),
    ("a waiter is not the holder", lambda p: [_locks_line(p, 7, waiter=True),
                                              _locks_line(p, 4242)], 4242),
    ("a POSIX lock is not ours", lambda p: [_locks_line(p, 99, kind="POSIX")], None),
    ("another file's lock", lambda p: ["1: FLOCK  ADVISORY  WRITE 5 00:01:1 0 EOF"], None),
    ("garbage", lambda p: ["1: FLOCK ADVISORY WRITE x y:z 0 EOF", "", "junk"], None),
])
def test_lock_holder_from_proc_locks(lockdir, tmp_path, desc, lines, want):
    path = lockdir / "x.lock"
    path.write_text("")
    locks = tmp_path / "locks"
    locks.write_text("\n".join(lines(path)) + "\n")
    assert run.lock_holder(path, str(locks)) == want, desc


def test_second_lock_refused_naming_the_holder_and_freed_at_close(lockdir):
    fd = run.take_lock()
    try:
        path = config.decap_lock_path()
        assert path.read_text() == f"{os.getpid()}\n"
        assert run.lock_holder(path) == os.getpid()   # the real /proc/locks
        with pytest.raises(config.RealServerError) as e:
            run.take_lock()
        assert str(e.value).startswith(f"another 'pylvs realserver run' (pid {os.getpid()}) is "
                                       "running in this network namespace")
    finally:
        os.close(fd)
    # Closed (as the kernel closes it when the holder dies): free again.
    os.close(run.take_lock())


def test_a_lock_file_removed_under_the_taker_is_taken_anew(lockdir, monkeypatch):
    # Teardown removes the file while holding it; a run that opened the old
    # file must not keep a lock nobody else can see.
    path = config.decap_lock_path()
    real_open, opened = os.open, []

    def racing_open(p, flags, mode=0o777):
        fd = real_open(p, flags, mode)
        if not opened:
            os.unlink(p)   # removed between open and flock
        opened.append(fd)
        return fd
    monkeypatch.setattr(os, "open", racing_open)
    fd = run.take_lock()
    monkeypatch.setattr(os, "open", real_open)
    try:
        assert len(opened) == 2 and fd == opened[1]
        assert os.fstat(fd).st_ino == os.stat(path).st_ino
        other = os.open(path, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    finally:
        os.close(fd)
