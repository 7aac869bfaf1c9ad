"""What kind of file a descriptor really is.

fdbox only holds files it knows how to carry. The client's word is never taken for it:
the type is read from the kernel, from several independent facts:

- ``fstatfs`` magic: tmpfs/shmem for memfd, hugetlbfs for ``MFD_HUGETLB``, the
  guest_memfd pseudo file system on kernels that give it one;
- the ``/proc/self/fd`` link: ``/memfd:NAME (deleted)`` for memfd, ``anon_inode:[kvm-gmem]``
  (or ``[kvm-gmem]``) for guest_memfd, ``/dev/net/tun`` or ``/dev/tapN`` for tap;
- ``F_GET_SEALS``, which only memfd-like (shmem/hugetlbfs) files answer;
- ``TUNGETIFF`` for tun/tap and macvtap queues.

A tmpfs file that was opened by path is *not* a memfd even though it is shmem: it has
a name in a mount that may not exist after kexec, which is exactly the kind of file the
kernel reviewers did not want in a box.
"""

from __future__ import annotations

import array
import enum
import fcntl
import os
import stat
import struct
from typing import Any
from dataclasses import dataclass

from .errors import FdboxError

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
#: hugetlb page sizes fdbox tells apart (fdbox.ko carries 2 MiB pages, not 1 GiB)
HUGE_2M, HUGE_1G = 2 << 20, 1 << 30
GUEST_MEMFD_MAGIC = 0x474D454D  # "GMEM", kvm's guest_memfd pseudo fs (7.2 has it; 6.18 still
# makes guest_memfd on the anon inode fs, 0x09041934, where only the fd link tells)

F_GET_SEALS = 1034
F_ADD_SEALS = 1033
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_MISC_MINOR = 200  # /dev/net/tun is char 10:200


class FdType(enum.StrEnum):
    """The fd types of the conventions; the value is what every front-end shows."""

    MEMFD = "memfd"
    MEMFD_HUGETLB = "memfd-hugetlb"
    GUEST_MEMFD = "guest_memfd"
    TAP = "tap"
    OTHER = "other"


#: What a box accepts unless the daemon was started with ``--allow-type``.
MEMORY_TYPES: frozenset[FdType] = frozenset(
    {FdType.MEMFD, FdType.MEMFD_HUGETLB, FdType.GUEST_MEMFD}
)


@dataclass(frozen=True)
class FdInfo:
    """Facts read from the kernel about one fd."""

    type: FdType
    size: int
    seals: int | None = None
    ifname: str | None = None  # tap: the interface name
    #: tap: IFF_* flags from TUNGETIFF, raw. Bit 0x1000 there is IFF_NOFILTER ("no socket
    #: filter attached"), not IFF_NO_PI, which shares the value: fdboxd.net reads
    #: packet-info from netlink instead.
    tun_flags: int | None = None
    net_kind: str | None = None  # tap: "tap" (tun/tap) or "macvtap"


def _fd_link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


_STATFS: Any = None  # (fstatfs, the buffer type), looked up once


def _fs_magic(fd: int) -> int | None:
    """f_type of the file system under fd (os has no fstatfs, so ask libc)."""
    global _STATFS
    if _STATFS is None:
        import ctypes

        _STATFS = (libc().fstatfs, ctypes.c_char * 120)  # a type: made in C, not create_string_buffer's Python
    fstatfs, make_buffer = _STATFS
    buf = make_buffer()  # struct statfs is 120 bytes on x86_64; one per call: thread-safe
    if fstatfs(fd, buf) != 0:
        return None
    return struct.unpack_from("l", buf, 0)[0] & 0xFFFFFFFF


_LIBC = None


def libc():  # type: ignore[no-untyped-def]
    """The C library, loaded once, with errno (for the calls the os module lacks)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def _seals(fd: int) -> int | None:
    try:
        return fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        return None


def _tun_getiff(fd: int) -> tuple[str, int] | None:
    buf = array.array("B", bytes(40))
    try:
        fcntl.ioctl(fd, TUNGETIFF, buf, True)
    except OSError:
        return None
    raw = buf.tobytes()
    name = raw[:16].split(b"\0", 1)[0].decode("ascii", "replace")
    (flags,) = struct.unpack_from("H", raw, 16)
    return name, flags


def detect_or_refuse(fd: int) -> FdInfo:
    """:func:`detect` for an fd a caller sent: an unusable one is the caller's ``InvalidRequest``."""
    try:
        return detect(fd)
    except OSError as e:
        raise FdboxError("InvalidRequest", f"not a usable file descriptor: {e.strerror}") from e


def detect(fd: int) -> FdInfo:
    """Classify ``fd``. Raises ``OSError`` only if the fd itself is invalid."""
    st = os.fstat(fd)
    link = _fd_link(fd)
    if stat.S_ISREG(st.st_mode):
        magic = _fs_magic(fd)
        seals = _seals(fd)
        if link.startswith("/memfd:") and seals is not None:
            if magic == HUGETLBFS_MAGIC:
                return FdInfo(FdType.MEMFD_HUGETLB, st.st_size, seals)
            if magic == TMPFS_MAGIC:
                return FdInfo(FdType.MEMFD, st.st_size, seals)
        if magic == GUEST_MEMFD_MAGIC or "kvm-gmem" in link:
            return FdInfo(FdType.GUEST_MEMFD, st.st_size)
        return FdInfo(FdType.OTHER, st.st_size)
    if "kvm-gmem" in link:
        return FdInfo(FdType.GUEST_MEMFD, st.st_size)
    if stat.S_ISCHR(st.st_mode):
        iff = _tun_getiff(fd)
        if iff is not None and iff[1] & IFF_TAP:
            is_tun_dev = os.major(st.st_rdev) == 10 and os.minor(st.st_rdev) == TUN_MISC_MINOR
            return FdInfo(
                FdType.TAP,
                0,
                ifname=iff[0],
                tun_flags=iff[1],
                net_kind="tap" if is_tun_dev else "macvtap",
            )
    return FdInfo(FdType.OTHER, st.st_size if stat.S_ISREG(st.st_mode) else 0)

