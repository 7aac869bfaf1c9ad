"""The LUO session holder process (fdboxd/backends/luo_holder.py) with ordinary fds.

The holder never looks at what it holds, so memfds stand in for session fds: what is
checked is the lifetime rule — held fds stay open in the '@' process after fdboxd's end
of the socket is gone, ``drop`` closes them, and a new fdboxd can ``take`` them back.
"""

from __future__ import annotations

import os
import time

from fdboxd.backends import luo_holder
from fdboxd.backends.liveupdate import Holder


def _holder_fds(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_hold_drop_survive_and_reclaim() -> None:
    h = Holder.spawn()
    assert h.proc is not None
    pid = h.proc.pid
    try:
        a = os.memfd_create("sess-a")
        b = os.memfd_create("sess-b")
        h.hold("a", a)
        h.hold("b", b)
        with open(f"/proc/{pid}/cmdline", "rb") as f:  # what systemd-shutdown reads
            assert f.read().split(b"\0")[0] == luo_holder.ARGV0.encode()
        os.close(a)
        os.close(b)
        fds = _holder_fds(pid)
        assert "/memfd:sess-a (deleted)" in fds and "/memfd:sess-b (deleted)" in fds
        h.drop("b")
        assert "/memfd:sess-b (deleted)" not in _holder_fds(pid)
        h.close()  # fdboxd goes away: the holder keeps "a"
        time.sleep(0.3)
        assert h.proc.poll() is None
        assert "/memfd:sess-a (deleted)" in _holder_fds(pid)
        got = []
        for _ in range(50):
            got = Holder.reclaim()
            if got:
                break
            time.sleep(0.1)
        assert [n for n, _ in got] == ["a"]
        assert os.readlink(f"/proc/self/fd/{got[0][1]}") == "/memfd:sess-a (deleted)"
        os.close(got[0][1])
        assert h.proc.wait(timeout=10) == 0  # holds nothing any more: exits
    finally:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()


def test_holder_with_nothing_exits_when_fdboxd_leaves() -> None:
    h = Holder.spawn()
    h.close()
    assert h.proc is not None and h.proc.wait(timeout=10) == 0


def test_reclaim_lets_the_old_holder_go_only_once_every_session_is_kept() -> None:
    """Create before drop: a restarted fdboxd that fails while taking the sessions over
    (its keeper refuses one) leaves every one with the old holder, for the next try."""
    h = Holder.spawn()
    assert h.proc is not None
    pid = h.proc.pid
    try:
        for name in ("a", "b"):
            fd = os.memfd_create(f"sess-{name}")
            h.hold(name, fd)
            os.close(fd)
        h.close()

        def refuse(name: str, fd: int) -> None:
            if name == "b":
                raise OSError(5, "keeper gone")

        got: list = []
        for _ in range(50):
            try:
                got = Holder.reclaim(refuse)
            except OSError:
                break
            time.sleep(0.1)  # not listening yet
        assert got == []
        assert {"/memfd:sess-a (deleted)", "/memfd:sess-b (deleted)"} <= _holder_fds(pid)
        kept: list[str] = []
        got = Holder.reclaim(lambda name, fd: kept.append(name))
        assert kept == ["a", "b"] and [n for n, _ in got] == ["a", "b"]
        for _n, fd in got:
            os.close(fd)
        assert h.proc.wait(timeout=10) == 0  # told to forget them: holds nothing, exits
    finally:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()
