"""The LUO contract, run against the host-side model (tests/luomodel.py) and, in the VM
tier, against the real /dev/liveupdate (tests/vm/test_luo_model_real.py): the same file, the
same assertions, so the model cannot drift from the kernel unnoticed.

On the host every test runs on a fresh model, and the "kexec" is the model's. In the
guest, ``FDBOX_LUO_REAL=1`` selects the real device and ``FDBOX_LUO_PHASE`` splits
:func:`test_carry_across_kexec` around the real kexec: ``before`` (stage 1) leaves the
sessions with a keeper process and writes what it expects to ``FDBOX_LUO_STATE``;
``after`` (stage 2) checks it. Errnos are the kernel's (luo_core.c, luo_session.c,
luo_file.c, memfd_luo.c of the reference tree); each assertion names the rule.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import luomodel  # noqa: E402

from fdboxd import uapi_luo  # noqa: E402

REAL = os.environ.get("FDBOX_LUO_REAL") == "1"
PHASE = os.environ.get("FDBOX_LUO_PHASE", "both")
F_SEAL_SHRINK, F_SEAL_GROW = 0x2, 0x4
MFD_HUGETLB = 0x4


@dataclass
class Luo:
    """What a test needs: open the device, and (the model only) kexec."""

    open: Callable[[], Any]
    kexec: Callable[[], object] | None
    real: bool


@pytest.fixture
def luo() -> Iterator[Luo]:
    if REAL:
        if not os.path.exists(uapi_luo.DEVICE_PATH):
            pytest.fail("FDBOX_LUO_REAL=1 but no /dev/liveupdate")
        yield Luo(uapi_luo.LuoDevice, None, True)
        return
    with tempfile.TemporaryDirectory(prefix="fdbox-luomodel-") as d, luomodel.ModelProcess(d) as model:
        yield Luo(model.device_class(), model.kexec, False)


def errno_of(fn: Callable[[], object]) -> int:
    try:
        got = fn()
    except OSError as e:
        return e.errno or -1
    if isinstance(got, uapi_luo.LuoSession | luomodel.ModelSession):
        got.close()
    elif isinstance(got, int):
        os.close(got)
    return 0


def create_raw(dev: Any, name: bytes) -> Any:
    """CREATE_SESSION with the 64-byte name field exactly as given (no client check)."""
    if isinstance(dev, luomodel.ModelDevice):
        return dev.create_session_raw(name)
    req = uapi_luo.CreateSession(name=name)
    fcntl.ioctl(dev.fd, uapi_luo.LIVEUPDATE_IOCTL_CREATE_SESSION, req, True)  # type: ignore[call-overload]
    return uapi_luo.LuoSession(int(req.fd))


def memfd(data: bytes = b"", name: str = "t", size: int | None = None) -> int:
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    if data:
        os.pwrite(fd, data, 0)
    if size is not None:
        os.ftruncate(fd, size)
    return fd


def keeper(fds: list[int]) -> subprocess.Popen[bytes]:
    """A process that keeps ``fds`` open until it is killed (or the kexec)."""
    return subprocess.Popen(["sleep", "100000"], pass_fds=fds, stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------- one kernel


@pytest.mark.skipif(PHASE == "after", reason="stage 2 runs only the carry check")
class TestOneKernel:
    def test_one_opener(self, luo: Luo) -> None:
        dev = luo.open()
        assert errno_of(luo.open) == errno.EBUSY  # luo_open: in_use
        dev.close()
        luo.open().close()  # free again the moment it is closed

    def test_session_names(self, luo: Luo) -> None:
        with luo.open() as dev:
            s = create_raw(dev, b"n" * 63)  # 63 bytes + NUL: the longest
            assert s.get_name() == "n" * 63
            assert errno_of(lambda: create_raw(dev, b"n" * 64)) == errno.EINVAL  # no room for the NUL
            assert errno_of(lambda: create_raw(dev, b"")) == errno.EINVAL
            assert errno_of(lambda: create_raw(dev, b"n" * 63)) == errno.EEXIST
            s.close()  # closing the session frees its name at once
            create_raw(dev, b"n" * 63).close()
            assert errno_of(lambda: dev.retrieve_session("n" * 63)) == errno.ENOENT  # only after a kexec

    def test_preserve_errors(self, luo: Luo, tmp_path: Path) -> None:
        with luo.open() as dev:
            a, b = dev.create_session("contract-a"), dev.create_session("contract-b")
            m = memfd(b"x")
            a.preserve_fd(m, 1)
            assert errno_of(lambda: a.preserve_fd(memfd(b"y"), 1)) == errno.EEXIST  # token taken
            assert errno_of(lambda: a.preserve_fd(m, 2)) == errno.EBUSY  # the same file, again
            dup = os.dup(m)
            assert errno_of(lambda: b.preserve_fd(dup, 1)) == errno.EBUSY  # in another session
            closed = os.dup(m)
            os.close(closed)
            assert errno_of(lambda: a.preserve_fd(closed, 3)) == errno.EBADF
            r, w = os.pipe()
            assert errno_of(lambda: a.preserve_fd(r, 4)) == errno.ENOENT  # no handler
            with open(tmp_path / "linked", "w+b") as f:
                assert errno_of(lambda: a.preserve_fd(f.fileno(), 5)) == errno.ENOENT  # not a memfd
            try:
                huge = os.memfd_create("h", MFD_HUGETLB)
            except OSError:
                huge = -1
            if huge >= 0:
                assert errno_of(lambda: a.preserve_fd(huge, 6)) == errno.ENOENT  # hugetlb: not shmem
                os.close(huge)
            # an outgoing session neither retrieves nor finishes
            assert errno_of(lambda: a.retrieve_fd(1)) == errno.EINVAL
            assert errno_of(a.finish) == errno.EINVAL
            assert a.get_name() == "contract-a"
            a.close()  # unpreserves m: b may take it now
            b.preserve_fd(dup, 1)
            for fd in (m, dup, r, w):
                os.close(fd)
            b.close()

    def test_a_session_lives_while_any_fd_is_open(self, luo: Luo) -> None:
        with luo.open() as dev:
            s = dev.create_session("contract-held")
            m = memfd(b"held")
            s.preserve_fd(m, 1)
            p = keeper([s.fd])
            try:
                s.close()
                # the keeper's fd keeps it: the name is taken, the file preserved
                assert errno_of(lambda: dev.create_session("contract-held")) == errno.EEXIST
                other = dev.create_session("contract-other")
                assert errno_of(lambda: other.preserve_fd(m, 1)) == errno.EBUSY
            finally:
                p.kill()
                p.wait()
            # its last fd is gone: unpreserved, the name free
            other.preserve_fd(m, 1)
            dev.create_session("contract-held").close()
            other.close()
            os.close(m)


# --------------------------------------------------------------------------- across a kexec

SEALED = b"A" * 5000
SPARSE_AT = 3 << 20


def carry_before(dev: Any) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    """Sessions for the next kernel; returns what should arrive and their keeper."""
    a = dev.create_session("carry-a")
    sealed = memfd(SEALED)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
    os.lseek(sealed, 123, os.SEEK_SET)
    a.preserve_fd(sealed, 1)
    a.preserve_fd(memfd(), 2)
    sparse = memfd(size=4 << 20)
    os.pwrite(sparse, b"far", SPARSE_AT)
    a.preserve_fd(sparse, 3)
    b = dev.create_session("carry-b")
    b.preserve_fd(memfd(b"bee"), 7)
    empty = dev.create_session("carry-empty")
    dropped = dev.create_session("carry-dropped")
    dropped.preserve_fd(memfd(b"gone"), 1)
    dropped.close()  # closed before the kexec: not carried
    kept = keeper([a.fd, b.fd, empty.fd])
    for s in (a, b, empty):
        s.close()
    return {"a_sealed": SEALED.hex(), "seals": F_SEAL_SHRINK | F_SEAL_GROW, "pos": 123}, kept


def carry_after(dev: Any, expected: dict[str, Any]) -> None:
    assert errno_of(lambda: dev.retrieve_session("carry-dropped")) == errno.ENOENT  # closed: unpreserved
    assert errno_of(lambda: dev.retrieve_session("carry-never")) == errno.ENOENT
    a = dev.retrieve_session("carry-a")
    assert errno_of(lambda: dev.retrieve_session("carry-a")) == errno.EINVAL  # retrieved once
    assert a.get_name() == "carry-a"
    assert errno_of(lambda: a.preserve_fd(memfd(), 9)) == errno.EINVAL  # incoming: no preserve
    f1 = a.retrieve_fd(1)
    st = os.fstat(f1)
    assert st.st_size == len(SEALED) and os.pread(f1, st.st_size, 0).hex() == expected["a_sealed"]
    assert fcntl.fcntl(f1, fcntl.F_GET_SEALS) & expected["seals"] == expected["seals"]
    assert os.lseek(f1, 0, os.SEEK_CUR) == expected["pos"]  # the file position crosses
    again = a.retrieve_fd(1)
    assert os.fstat(again).st_ino == st.st_ino  # the same file, not another copy
    assert os.fstat(a.retrieve_fd(2)).st_size == 0
    f3 = a.retrieve_fd(3)
    assert os.fstat(f3).st_size == 4 << 20 and os.pread(f3, 3, SPARSE_AT) == b"far"
    assert os.pread(f3, 4, 0) == b"\0" * 4
    assert errno_of(lambda: a.retrieve_fd(99)) == errno.ENOENT
    # an incoming name does not block an outgoing one
    fresh = dev.create_session("carry-a")
    # a retrieved file stays LUO's until FINISH: not preservable again before
    assert errno_of(lambda: fresh.preserve_fd(f1, 1)) == errno.EBUSY
    a.finish()
    a.finish()  # again: nothing left, no error
    assert errno_of(lambda: a.retrieve_fd(1)) == errno.ENOENT  # finished: gone from LUO
    fresh.preserve_fd(f1, 1)
    fresh.close()
    assert os.pread(f1, 5, 0) == SEALED[:5]  # our fd outlives FINISH
    a.close()
    b = dev.retrieve_session("carry-b")
    fb = b.retrieve_fd(7)
    assert os.pread(fb, 3, 0) == b"bee"
    b.close()  # closing a retrieved session finishes it and removes it
    assert errno_of(lambda: dev.retrieve_session("carry-b")) == errno.ENOENT
    assert os.pread(fb, 3, 0) == b"bee"
    e = dev.retrieve_session("carry-empty")  # an empty session crosses too
    assert errno_of(lambda: e.retrieve_fd(0)) == errno.ENOENT
    e.finish()
    e.close()
    # A new file with an empty name (memfd_luo_retrieve: memfd_alloc_file("", ...)). The
    # one rule a model cannot keep: userspace makes shmem files only through memfd_create,
    # whose names start "memfd:", so the model's shows "/memfd: (deleted)" where the
    # kernel's shows "/ (deleted)" (fdboxd.fdtypes.detect types the kernel's "other").
    assert os.readlink(f"/proc/self/fd/{f1}") == ("/ (deleted)" if REAL else "/memfd: (deleted)")
    for fd in (f1, again, f3, fb):
        os.close(fd)


def test_carry_across_kexec(luo: Luo) -> None:
    state = os.environ.get("FDBOX_LUO_STATE", "")
    if PHASE in ("both", "before"):
        with luo.open() as dev:
            expected, kept = carry_before(dev)
        if PHASE == "before":
            Path(state).write_text(json.dumps(expected))
            return  # the keeper holds them into the real kexec
        assert luo.kexec is not None
        luo.kexec()
        kept.kill()  # the old kernel's processes are gone
        kept.wait()
    else:
        expected = json.loads(Path(state).read_text())
    with luo.open() as dev:
        carry_after(dev, expected)


@pytest.mark.skipif(REAL, reason="a third boot: the model's own check (tests/vm/test_luo.py's vm9 is the real one)")
def test_unfinished_incoming_is_dropped_at_the_next_kexec(luo: Luo) -> None:
    with luo.open() as dev:
        s = dev.create_session("twice")
        s.preserve_fd(memfd(b"x"), 1)
        kept = keeper([s.fd])
        s.close()
    assert luo.kexec is not None
    luo.kexec()
    kept.kill()
    kept.wait()
    luo.kexec()  # nobody retrieved or finished it
    with luo.open() as dev:
        assert errno_of(lambda: dev.retrieve_session("twice")) == errno.ENOENT
