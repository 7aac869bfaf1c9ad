"""fd type detection: read from the kernel, never from the client."""

from __future__ import annotations

import errno
import os
import socket
import tempfile

import pytest

from fdboxd.fdtypes import FdType, detect

HUGEPAGE = 2 << 20


def test_memfd():
    fd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 12345)
        info = detect(fd)
        assert (info.type, info.size) == (FdType.MEMFD, 12345)
        assert info.seals == 0
    finally:
        os.close(fd)


def test_memfd_without_sealing_reports_seal_seal():
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    try:
        assert detect(fd).seals == 1  # F_SEAL_SEAL: created without MFD_ALLOW_SEALING
    finally:
        os.close(fd)


def test_memfd_reopened_by_proc_path_is_still_memfd():
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert detect(fd2).type == FdType.MEMFD
    finally:
        os.close(fd)
        os.close(fd2)


def test_tmpfs_file_by_path_is_not_a_memfd():
    d = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    with tempfile.TemporaryFile(dir=d) as f:
        f.write(b"x")
        f.flush()
        assert detect(f.fileno()).type == FdType.OTHER


@pytest.mark.parametrize("make", ["pipe", "socket", "devnull", "regular", "dir"])
def test_other_types(make, tmp_path):
    fds: list[int] = []
    if make == "pipe":
        fds = list(os.pipe())
    elif make == "socket":
        a, b = socket.socketpair()
        fds = [a.detach(), b.detach()]
    elif make == "devnull":
        fds = [os.open("/dev/null", os.O_RDONLY)]
    elif make == "regular":
        (tmp_path / "f").write_bytes(b"abc")
        fds = [os.open(tmp_path / "f", os.O_RDONLY)]
    else:
        fds = [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        assert detect(fds[0]).type == FdType.OTHER
    finally:
        for fd in fds:
            os.close(fd)


def test_closed_fd_raises_oserror():
    fd = os.memfd_create("x")
    os.close(fd)
    with pytest.raises(OSError):
        detect(fd)


def _set_hugepages(n: int) -> None:
    with open("/proc/sys/vm/nr_hugepages", "w") as f:
        f.write(str(n))


@pytest.fixture
def hugepages():
    """Reserve two huge pages for the test if we may (root), restoring the old count."""
    path = "/proc/sys/vm/nr_hugepages"
    try:
        old = int(open(path).read())
    except OSError:
        yield
        return
    changed = False
    if old < 2 and os.geteuid() == 0:
        try:
            _set_hugepages(old + 2)
            changed = True
        except OSError:
            pass
    yield
    if changed:
        _set_hugepages(old)


def test_hugetlb_memfd(hugepages):
    try:
        fd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOMEM, errno.ENOENT):
            pytest.skip(f"no hugetlb memfd on this host: {e.strerror}")
        raise
    try:
        try:
            os.ftruncate(fd, HUGEPAGE)
        except OSError as e:
            if e.errno in (errno.ENOMEM, errno.EINVAL):
                pytest.skip(f"no huge pages available: {e.strerror}")
            raise
        info = detect(fd)
        assert (info.type, info.size) == (FdType.MEMFD_HUGETLB, HUGEPAGE)
        assert info.seals is not None
    finally:
        os.close(fd)
