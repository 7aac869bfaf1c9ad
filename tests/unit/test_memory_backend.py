"""The memory backend holds one open file description per entry (issue 25, item 9):
systemd's fd store keeps an open file once, so a second name needs a file of its own."""

from __future__ import annotations

import fcntl
import os
import socket

import pytest

from fdboxd.backends.memory import F_DUPFD_QUERY, MemoryBackend, same_open_file
from fdboxd.errors import FdboxError
from fdboxd.fdtypes import FdInfo, FdType


def test_a_second_name_for_the_same_open_file_gets_its_own_open_of_that_file() -> None:
    b = MemoryBackend()
    b.create_box("vm")
    fd = os.memfd_create("ram")
    os.write(fd, b"pages")
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        b.put("vm", "ram0", fd, FdInfo(FdType.MEMFD, 5))
        b.put("vm", "alias", fd, FdInfo(FdType.MEMFD, 5))
        b.put("vm", "ro", ro, FdInfo(FdType.MEMFD, 5))  # another open file description: a dup
        b.put("vm", "ro2", ro, FdInfo(FdType.MEMFD, 5))
        ram0, alias, ro1, ro2 = (b.peek("vm", n) for n in ("ram0", "alias", "ro", "ro2"))
        assert same_open_file(ram0, fd) and not same_open_file(alias, fd)
        assert os.fstat(alias).st_ino == os.fstat(fd).st_ino
        assert fcntl.fcntl(ro2, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY  # never more than was given
        assert fcntl.fcntl(ro1, F_DUPFD_QUERY, ro) == 1 and not same_open_file(ro2, ro)
        b.remove("vm", "alias")
        b.put("vm", "alias", fd, FdInfo(FdType.MEMFD, 5))
    finally:
        os.close(fd)
        os.close(ro)
        b.close()


def test_a_file_that_cannot_be_opened_again_is_refused_under_a_second_name() -> None:
    b = MemoryBackend()
    b.create_box("vm")
    s1, s2 = socket.socketpair()
    try:
        b.put("vm", "sock", s1.fileno(), FdInfo(FdType.OTHER, 0))
        with pytest.raises(FdboxError) as e:
            b.put("vm", "again", s1.fileno(), FdInfo(FdType.OTHER, 0))
        assert e.value.name == "AlreadyExists" and "vm/sock" in e.value.message
        assert set(b.inventory()["vm"].entries) == {"sock"}
    finally:
        s1.close()
        s2.close()
        b.close()
