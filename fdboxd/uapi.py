"""The Python mirror of ``kmod/include/uapi/linux/fdbox.h``, and a binding for it.

This is the only place in Python that knows the ioctl numbers, the struct layouts and
what each errno means on ``/dev/fdbox``. ``tests/unit/test_uapi_header.py`` compiles a
small C program against the header and fails if anything here disagrees with it.

:class:`FdboxDevice` has one method per ioctl. Its methods raise :class:`FdboxOSError`
(an ``OSError`` that also knows the uAPI meaning of its errno and the fdbox error name)
so callers can map failures without their own errno tables.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
from dataclasses import dataclass

from .ownedfd import OwnedFd

# --- numbers -------------------------------------------------------------------------

FDBOX_IOCTL_TYPE = 0xBB  # was 0xB8 (MSHV's) before issue 27; the ABI is pre-1.0
FDBOX_API_VERSION = 1
FDBOX_BOX_NAME_LEN = 64
FDBOX_ENTRY_NAME_LEN = 256


class EntryType(enum.IntEnum):
    MEMFD = 1
    MEMFD_HUGETLB = 2
    GUEST_MEMFD = 3


class BoxState(enum.IntEnum):
    OPEN = 0
    SEALED = 1
    RESTORED = 2


FDBOX_FEATURE_KHO = 1 << 0
FDBOX_FEATURE_KHO_ON = 1 << 1
FDBOX_FEATURE_KHO_BOOT = 1 << 2
FDBOX_FEATURE_RESTORED = 1 << 3
FDBOX_FEATURE_SHMEM_LUO = 1 << 4  # SEAL refuses shmem memfds: LUO carries them
FDBOX_FEATURE_HANDOVER_HELD = 1 << 5  # a previous kernel's handover left untouched: RELEASE_HANDOVER
FDBOX_FEATURE_RESTORE_PENDING = 1 << 6  # a box kept back at load by ENOMEM: retried on open / RESCAN

FDBOX_ENTRY_PRESERVED = 1 << 0
FDBOX_ENTRY_RESTORE_PENDING = 1 << 1

FDBOX_CMD_VERSION = 0x00
FDBOX_CMD_STATS = 0x01
FDBOX_CMD_CREATE_BOX = 0x02
FDBOX_CMD_DELETE_BOX = 0x03
FDBOX_CMD_LIST_BOXES = 0x04
FDBOX_CMD_PUT_FD = 0x05
FDBOX_CMD_GET_FD = 0x06
FDBOX_CMD_REMOVE_ENTRY = 0x07
FDBOX_CMD_LIST_ENTRIES = 0x08
FDBOX_CMD_SEAL = 0x09
FDBOX_CMD_UNSEAL = 0x0A
FDBOX_CMD_RESTORE_FD = 0x0B
FDBOX_CMD_FINISH = 0x0C
FDBOX_CMD_RELEASE_HANDOVER = 0x0D
FDBOX_CMD_RESCAN = 0x0E


def _IO(type_: int, nr: int) -> int:  # noqa: N802 - the C macro's name
    """``_IO()`` from <asm-generic/ioctl.h>: direction and size bits are zero."""
    return (type_ << 8) | nr


FDBOX_IOC_VERSION = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_VERSION)
FDBOX_IOC_STATS = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_STATS)
FDBOX_IOC_CREATE_BOX = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_CREATE_BOX)
FDBOX_IOC_DELETE_BOX = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_DELETE_BOX)
FDBOX_IOC_LIST_BOXES = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_LIST_BOXES)
FDBOX_IOC_PUT_FD = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_PUT_FD)
FDBOX_IOC_GET_FD = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_GET_FD)
FDBOX_IOC_REMOVE_ENTRY = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_REMOVE_ENTRY)
FDBOX_IOC_LIST_ENTRIES = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_LIST_ENTRIES)
FDBOX_IOC_SEAL = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_SEAL)
FDBOX_IOC_UNSEAL = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_UNSEAL)
FDBOX_IOC_RESTORE_FD = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_RESTORE_FD)
FDBOX_IOC_FINISH = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_FINISH)
FDBOX_IOC_RELEASE_HANDOVER = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_RELEASE_HANDOVER)
FDBOX_IOC_RESCAN = _IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_RESCAN)

#: name -> number, for the header test and for tools.
IOCTLS: dict[str, int] = {
    name: value for name, value in globals().items() if name.startswith("FDBOX_IOC_")
}

# --- structs -------------------------------------------------------------------------

u32 = ctypes.c_uint32
s32 = ctypes.c_int32
u64 = ctypes.c_uint64
s64 = ctypes.c_int64


class _Struct(ctypes.Structure):
    """Base: natural alignment like the C header; ``size`` filled in on creation."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        if hasattr(self, "size") and "size" not in kw:
            self.size = ctypes.sizeof(self)


class Version(_Struct):
    _fields_ = [
        ("size", u32),
        ("api_version", u32),
        ("features", u32),
        ("max_boxes", u32),
        ("max_entries_per_box", u32),
        ("max_entries", u32),
        ("restore_status", s32),
        ("__reserved", u32),
    ]


class Stats(_Struct):
    _fields_ = [
        ("size", u32),
        ("__reserved", u32),
        ("boxes", u64),
        ("entries", u64),
        ("file_refs", u64),
        ("pinned_folios", u64),
        ("restored_pending", u64),
        ("puts", u64),
        ("gets", u64),
        ("removes", u64),
    ]


class BoxReq(_Struct):
    _fields_ = [("size", u32), ("flags", u32), ("box", ctypes.c_char * FDBOX_BOX_NAME_LEN)]


class PutFd(_Struct):
    _fields_ = [
        ("size", u32),
        ("fd", s32),
        ("flags", u32),
        ("uid", u32),
        ("gid", u32),
        ("type", u32),
        ("fsize", u64),
        ("box", ctypes.c_char * FDBOX_BOX_NAME_LEN),
        ("name", ctypes.c_char * FDBOX_ENTRY_NAME_LEN),
    ]


class GetFd(_Struct):
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("fd", s32),
        ("type", u32),
        ("box", ctypes.c_char * FDBOX_BOX_NAME_LEN),
        ("name", ctypes.c_char * FDBOX_ENTRY_NAME_LEN),
    ]


class EntryReq(_Struct):
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("box", ctypes.c_char * FDBOX_BOX_NAME_LEN),
        ("name", ctypes.c_char * FDBOX_ENTRY_NAME_LEN),
    ]


class BoxInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * FDBOX_BOX_NAME_LEN),
        ("state", u32),
        ("nr_entries", u32),
        ("total_size", u64),
    ]


class ListBoxes(_Struct):
    _fields_ = [("size", u32), ("count", u32), ("info_size", u32), ("flags", u32), ("boxes", u64)]


class EntryInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * FDBOX_ENTRY_NAME_LEN),
        ("type", u32),
        ("flags", u32),
        ("fsize", u64),
        ("seals", u32),
        ("uid", u32),
        ("gid", u32),
        ("__reserved", u32),
        ("ctime", s64),
        ("page_size", u64),
    ]


class ListEntries(_Struct):
    _fields_ = [
        ("size", u32),
        ("count", u32),
        ("info_size", u32),
        ("flags", u32),
        ("entries", u64),
        ("box", ctypes.c_char * FDBOX_BOX_NAME_LEN),
    ]


class RestoreFd(_Struct):
    _fields_ = [
        ("size", u32),
        ("fd", s32),
        ("flags", u32),
        ("__reserved", u32),
        ("box", ctypes.c_char * FDBOX_BOX_NAME_LEN),
        ("name", ctypes.c_char * FDBOX_ENTRY_NAME_LEN),
    ]


#: C struct name -> ctypes mirror, for the header test.
class ReleaseHandover(_Struct):
    _fields_ = [("size", u32), ("flags", u32), ("folios", u64), ("bytes", u64)]


class Rescan(_Struct):
    _fields_ = [("size", u32), ("flags", u32), ("restored", u32), ("pending", u32)]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "fdbox_version": Version,
    "fdbox_stats": Stats,
    "fdbox_box_req": BoxReq,
    "fdbox_put_fd": PutFd,
    "fdbox_get_fd": GetFd,
    "fdbox_entry_req": EntryReq,
    "fdbox_box_info": BoxInfo,
    "fdbox_list_boxes": ListBoxes,
    "fdbox_entry_info": EntryInfo,
    "fdbox_list_entries": ListEntries,
    "fdbox_restore_fd": RestoreFd,
    "fdbox_release_handover": ReleaseHandover,
    "fdbox_rescan": Rescan,
}

# --- errno meanings ------------------------------------------------------------------

#: errno -> (what it means on /dev/fdbox, the fdbox error name it maps to).
ERRNO_MEANINGS: dict[int, tuple[str, str]] = {
    errno.EPERM: ("caller lacks CAP_SYS_ADMIN", "PermissionDenied"),
    errno.EACCES: ("SEAL must add seals through a reference not open for writing", "PermissionDenied"),
    errno.ENOTTY: ("unknown ioctl (module too old?)", "BackendUnavailable"),
    errno.E2BIG: ("struct larger than the kernel's, with a nonzero tail", "InvalidRequest"),
    errno.EINVAL: ("malformed argument: size, flags, reserved or name", "InvalidRequest"),
    errno.EFAULT: ("bad user pointer", "InvalidRequest"),
    errno.EBADF: ("fd is not open", "InvalidRequest"),
    errno.EOPNOTSUPP: ("file type not held by fdbox, or (SEAL) its seals cannot be held or LUO carries its kind", "UnsupportedType"),
    errno.ENOENT: ("no such box or entry (RELEASE_HANDOVER: no handover held)", "NotFound"),
    errno.EEXIST: ("name taken, or file already held (in a box, or preserved by LUO)", "AlreadyExists"),
    errno.EBUSY: ("box is sealed or restored; needs an open box", "Sealed"),
    errno.EBADFD: ("box or entry not in the state the operation needs", "NotSealed"),
    errno.ENODATA: ("restored entry not filled yet (RESTORE_FD first)", "InvalidRequest"),
    errno.EMEDIUMTYPE: ("restore target does not fit the entry (kind, size, empty, writable, seals)", "InvalidRequest"),
    errno.ENOSPC: ("a limit was reached", "LimitExceeded"),
    errno.EFBIG: ("file too large to preserve", "LimitExceeded"),
    errno.ESHUTDOWN: ("reboot/kexec has begun: sealed state is final", "Sealed"),
    errno.ENODEV: ("sealing needs KHO (CONFIG_KEXEC_HANDOVER and kho=on)", "BackendUnavailable"),
    errno.EOVERFLOW: ("list did not fit; count holds the number needed", "InvalidRequest"),
    errno.EIO: ("the kernel could not pin, preserve or restore the memory (see the kernel log; "
                "RELEASE_HANDOVER: no intact release list)", "BackendUnavailable"),
    errno.EINTR: ("a fatal signal arrived while waiting or working (SEAL undone)", "BackendUnavailable"),
    errno.ENOMEM: ("out of memory (SEAL: a memfd's holes need more than is available, sizes in the kernel log)",
                   "BackendUnavailable"),
}


class FdboxOSError(OSError):
    """An ``OSError`` from a /dev/fdbox ioctl, with the uAPI meaning and error name."""

    def __init__(self, err: int, op: str) -> None:
        meaning, name = ERRNO_MEANINGS.get(err, (os.strerror(err), "BackendUnavailable"))
        super().__init__(err, f"{op}: {meaning} ({errno.errorcode.get(err, err)})")
        self.op = op
        self.meaning = meaning
        self.error_name = name


# --- binding -------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxListing:
    name: str
    state: BoxState
    nr_entries: int
    total_size: int


@dataclass(frozen=True)
class EntryListing:
    name: str
    type: EntryType
    flags: int
    size: int
    seals: int
    uid: int
    gid: int
    ctime: int
    page_size: int

    @property
    def restore_pending(self) -> bool:
        return bool(self.flags & FDBOX_ENTRY_RESTORE_PENDING)


def _name(value: str, limit: int) -> bytes:
    raw = value.encode()
    if len(raw) >= limit or b"\0" in raw:
        # Let the kernel judge names that fit; too long ones cannot be sent at all.
        raise FdboxOSError(errno.EINVAL, "name")
    return raw


class FdboxDevice(OwnedFd):
    """An open ``/dev/fdbox``: one method per ioctl. Use as a context manager."""

    close_on_gc = True  # a forgotten device fd would keep fdbox.ko from unloading

    def __init__(self, path: str = "/dev/fdbox") -> None:
        self.path = path
        super().__init__(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def ioctl(self, op: str, number: int, arg: ctypes.Structure | ctypes.Array) -> None:  # type: ignore[type-arg]
        """Issue one ioctl with a struct (or raw buffer), raising :class:`FdboxOSError`."""
        try:
            fcntl.ioctl(self.fd, number, arg, True)
        except OSError as e:
            raise FdboxOSError(e.errno or errno.EIO, op) from None

    def version(self) -> Version:
        v = Version()
        self.ioctl("version", FDBOX_IOC_VERSION, v)
        return v

    def stats(self) -> Stats:
        s = Stats()
        self.ioctl("stats", FDBOX_IOC_STATS, s)
        return s

    def _box_op(self, op: str, number: int, box: str) -> None:
        self.ioctl(op, number, BoxReq(box=_name(box, FDBOX_BOX_NAME_LEN)))

    def create_box(self, box: str) -> None:
        self._box_op("create_box", FDBOX_IOC_CREATE_BOX, box)

    def delete_box(self, box: str) -> None:
        self._box_op("delete_box", FDBOX_IOC_DELETE_BOX, box)

    def seal(self, box: str) -> None:
        self._box_op("seal", FDBOX_IOC_SEAL, box)

    def unseal(self, box: str) -> None:
        self._box_op("unseal", FDBOX_IOC_UNSEAL, box)

    def finish(self, box: str) -> None:
        self._box_op("finish", FDBOX_IOC_FINISH, box)

    def put_fd(self, box: str, name: str, fd: int, uid: int = 0, gid: int = 0) -> PutFd:
        """Hold the file behind ``fd`` as ``box/name``; ``fd`` stays the caller's."""
        req = PutFd(
            fd=fd,
            uid=uid,
            gid=gid,
            box=_name(box, FDBOX_BOX_NAME_LEN),
            name=_name(name, FDBOX_ENTRY_NAME_LEN),
        )
        self.ioctl("put_fd", FDBOX_IOC_PUT_FD, req)
        return req

    def get_fd(self, box: str, name: str) -> int:
        """A new ``O_CLOEXEC`` fd for the entry; the caller owns it."""
        req = GetFd(box=_name(box, FDBOX_BOX_NAME_LEN), name=_name(name, FDBOX_ENTRY_NAME_LEN))
        self.ioctl("get_fd", FDBOX_IOC_GET_FD, req)
        return int(req.fd)

    def remove_entry(self, box: str, name: str) -> None:
        req = EntryReq(box=_name(box, FDBOX_BOX_NAME_LEN), name=_name(name, FDBOX_ENTRY_NAME_LEN))
        self.ioctl("remove_entry", FDBOX_IOC_REMOVE_ENTRY, req)

    def restore_fd(self, box: str, name: str, fd: int) -> None:
        """Fill the caller's empty, sized memfd ``fd`` from a restored entry."""
        req = RestoreFd(
            fd=fd, box=_name(box, FDBOX_BOX_NAME_LEN), name=_name(name, FDBOX_ENTRY_NAME_LEN)
        )
        self.ioctl("restore_fd", FDBOX_IOC_RESTORE_FD, req)

    def release_handover(self) -> ReleaseHandover:
        """Give back the memory of a previous kernel's handover the module left untouched
        (``FDBOX_FEATURE_HANDOVER_HELD``); its boxes are gone for good. Returns what was freed."""
        req = ReleaseHandover()
        self.ioctl("release_handover", FDBOX_IOC_RELEASE_HANDOVER, req)
        return req

    def rescan(self) -> Rescan:
        """Retry the previous kernel's boxes a transient failure kept back at load."""
        req = Rescan()
        self.ioctl("rescan", FDBOX_IOC_RESCAN, req)
        return req

    def list_boxes(self) -> list[BoxListing]:
        count = 16
        while True:
            arr = (BoxInfo * count)()
            req = ListBoxes(count=count, info_size=ctypes.sizeof(BoxInfo), boxes=ctypes.addressof(arr))
            try:
                self.ioctl("list_boxes", FDBOX_IOC_LIST_BOXES, req)
            except FdboxOSError as e:
                if e.errno == errno.EOVERFLOW:
                    count = int(req.count) + 8  # boxes may appear meanwhile
                    continue
                raise
            return [
                BoxListing(i.name.decode(), BoxState(i.state), int(i.nr_entries), int(i.total_size))
                for i in arr[: req.count]
            ]

    def list_entries(self, box: str) -> list[EntryListing]:
        count = 16
        while True:
            arr = (EntryInfo * count)()
            req = ListEntries(
                count=count,
                info_size=ctypes.sizeof(EntryInfo),
                entries=ctypes.addressof(arr),
                box=_name(box, FDBOX_BOX_NAME_LEN),
            )
            try:
                self.ioctl("list_entries", FDBOX_IOC_LIST_ENTRIES, req)
            except FdboxOSError as e:
                if e.errno == errno.EOVERFLOW:
                    count = int(req.count) + 8
                    continue
                raise
            return [
                EntryListing(
                    i.name.decode(),
                    EntryType(i.type),
                    int(i.flags),
                    int(i.fsize),
                    int(i.seals),
                    int(i.uid),
                    int(i.gid),
                    int(i.ctime),
                    int(i.page_size),
                )
                for i in arr[: req.count]
            ]
