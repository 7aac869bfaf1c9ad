"""The Python mirror of Linux's ``include/uapi/linux/liveupdate.h`` (``/dev/liveupdate``).

The Live Update Orchestrator (LUO, Linux >= 6.19) carries files across kexec. Its uAPI
is two levels of ioctls: on the device, create a session (before kexec) or retrieve one
by name (after); on a session fd, preserve a file under a token, retrieve it by token,
finish, or read the session's name.

This is the only place in Python that knows those numbers and struct layouts.
``tests/unit/test_uapi_luo.py`` compiles a C program against the real header (from the
7.2 reference tree) and fails if anything here disagrees with it.

:class:`LuoDevice` and :class:`LuoSession` have one method per ioctl and raise
:class:`LuoOSError` (an ``OSError`` with the uAPI meaning and the fdbox error name).
They hold nothing beyond their fd: which process keeps a session fd open until the
kexec is the caller's design (see ``fdboxd/backends/liveupdate.py``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from .ownedfd import OwnedFd

# --- numbers -------------------------------------------------------------------------

LIVEUPDATE_IOCTL_TYPE = 0xBA
LIVEUPDATE_SESSION_NAME_LENGTH = 64

# /dev/liveupdate commands
LIVEUPDATE_CMD_BASE = 0x00
LIVEUPDATE_CMD_CREATE_SESSION = LIVEUPDATE_CMD_BASE
LIVEUPDATE_CMD_RETRIEVE_SESSION = 0x01

# session fd commands
LIVEUPDATE_CMD_SESSION_BASE = 0x40
LIVEUPDATE_CMD_SESSION_PRESERVE_FD = LIVEUPDATE_CMD_SESSION_BASE
LIVEUPDATE_CMD_SESSION_RETRIEVE_FD = 0x41
LIVEUPDATE_CMD_SESSION_FINISH = 0x42
LIVEUPDATE_CMD_SESSION_GET_NAME = 0x43


def _IO(type_: int, nr: int) -> int:  # noqa: N802 - the C macro's name
    """``_IO()`` from <asm-generic/ioctl.h>: direction and size bits are zero."""
    return (type_ << 8) | nr


LIVEUPDATE_IOCTL_CREATE_SESSION = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION)
LIVEUPDATE_IOCTL_RETRIEVE_SESSION = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION)
LIVEUPDATE_SESSION_PRESERVE_FD = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD)
LIVEUPDATE_SESSION_RETRIEVE_FD = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)
LIVEUPDATE_SESSION_FINISH = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH)
LIVEUPDATE_SESSION_GET_NAME = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_GET_NAME)

#: name -> number, for the header test and for tools.
IOCTLS: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.startswith(("LIVEUPDATE_IOCTL_", "LIVEUPDATE_SESSION_"))
    and name not in ("LIVEUPDATE_IOCTL_TYPE", "LIVEUPDATE_SESSION_NAME_LENGTH")
}

# --- structs -------------------------------------------------------------------------

u32 = ctypes.c_uint32
s32 = ctypes.c_int32
u64 = ctypes.c_uint64
_Name = ctypes.c_char * LIVEUPDATE_SESSION_NAME_LENGTH


class _Struct(ctypes.Structure):
    """Base: natural alignment like the C header; ``size`` filled in on creation."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        if "size" not in kw:
            self.size = ctypes.sizeof(self)


class CreateSession(_Struct):
    _fields_ = [("size", u32), ("fd", s32), ("name", _Name)]


class RetrieveSession(_Struct):
    _fields_ = [("size", u32), ("fd", s32), ("name", _Name)]


class PreserveFd(_Struct):
    # token is __aligned_u64: 8-aligned on every ABI, which c_uint64 after two u32 is.
    _fields_ = [("size", u32), ("fd", s32), ("token", u64)]


class RetrieveFd(_Struct):
    _fields_ = [("size", u32), ("fd", s32), ("token", u64)]


class SessionFinish(_Struct):
    _fields_ = [("size", u32), ("reserved", u32)]


class SessionGetName(_Struct):
    _fields_ = [("size", u32), ("reserved", u32), ("name", _Name)]


#: C struct name -> ctypes mirror, for the header test.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "liveupdate_ioctl_create_session": CreateSession,
    "liveupdate_ioctl_retrieve_session": RetrieveSession,
    "liveupdate_session_preserve_fd": PreserveFd,
    "liveupdate_session_retrieve_fd": RetrieveFd,
    "liveupdate_session_finish": SessionFinish,
    "liveupdate_session_get_name": SessionGetName,
}

# --- errno meanings ------------------------------------------------------------------

#: errno -> (what it means on /dev/liveupdate, the fdbox error name it maps to).
#: From the header's general rules and kernel/liveupdate/luo_{core,session,file}.c.
ERRNO_MEANINGS: dict[int, tuple[str, str]] = {
    errno.ENOTTY: ("unknown ioctl (kernel too old?)", "BackendUnavailable"),
    errno.E2BIG: ("struct has nonzero bytes the kernel does not know", "InvalidRequest"),
    errno.EOPNOTSUPP: ("file type not preservable by LUO (e.g. hugetlb memfd)", "UnsupportedType"),
    errno.EINVAL: ("a field is wrong (name, token, reserved, file state)", "InvalidRequest"),
    errno.ENOENT: ("no such session or token", "NotFound"),
    errno.EEXIST: ("session name or token taken, or file already preserved", "AlreadyExists"),
    errno.EBUSY: ("/dev/liveupdate is held by another process", "BackendUnavailable"),
    errno.EBADF: ("fd is not open", "InvalidRequest"),
    errno.ENOMEM: ("out of memory", "BackendUnavailable"),
    errno.ENOSPC: ("no room left for sessions or files", "LimitExceeded"),
    errno.EOVERFLOW: ("mathematics overflowed", "LimitExceeded"),
    errno.EPERM: ("not allowed (file sealed against it, or no privilege)", "PermissionDenied"),
    errno.EACCES: ("not allowed to open /dev/liveupdate", "PermissionDenied"),
    errno.ENODEV: ("LUO disabled (boot with kho=on liveupdate=on)", "BackendUnavailable"),
}


class LuoOSError(OSError):
    """An ``OSError`` from /dev/liveupdate or a session fd, with meaning and error name."""

    def __init__(self, err: int, op: str, meaning: str | None = None, name: str | None = None) -> None:
        known, known_name = ERRNO_MEANINGS.get(err, (os.strerror(err), "BackendUnavailable"))
        meaning, name = meaning or known, name or known_name
        super().__init__(err, f"liveupdate {op}: {meaning} ({errno.errorcode.get(err, err)})")
        self.op = op
        self.meaning = meaning
        self.error_name = name


def _ioctl(fd: int, op: str, number: int, arg: ctypes.Structure) -> None:
    try:
        fcntl.ioctl(fd, number, arg, True)  # type: ignore[call-overload]
    except OSError as e:
        raise LuoOSError(e.errno or errno.EIO, op) from None


def session_name(name: str) -> bytes:
    """The session name as the kernel wants it: at most 63 bytes, no NUL."""
    raw = name.encode()
    if not raw or len(raw) >= LIVEUPDATE_SESSION_NAME_LENGTH or b"\0" in raw:
        raise LuoOSError(errno.EINVAL, "session name")
    return raw


# --- binding -------------------------------------------------------------------------

DEVICE_PATH = "/dev/liveupdate"


class LuoSession(OwnedFd):
    """A session fd: preserve/retrieve files by token, finish. Closing an unfinished
    session before kexec drops its preservations; closing one after boot leaves its
    unretrieved files to be reset at the next live update."""

    def preserve_fd(self, fd: int, token: int) -> None:
        _ioctl(self.fd, "preserve_fd", LIVEUPDATE_SESSION_PRESERVE_FD, PreserveFd(fd=fd, token=token))

    def retrieve_fd(self, token: int) -> int:
        """A new fd for the preserved file (the caller owns it)."""
        req = RetrieveFd(token=token)
        _ioctl(self.fd, "retrieve_fd", LIVEUPDATE_SESSION_RETRIEVE_FD, req)
        return int(req.fd)

    def finish(self) -> None:
        _ioctl(self.fd, "finish", LIVEUPDATE_SESSION_FINISH, SessionFinish())

    def get_name(self) -> str:
        req = SessionGetName()
        _ioctl(self.fd, "get_name", LIVEUPDATE_SESSION_GET_NAME, req)
        return bytes(req.name).split(b"\0", 1)[0].decode(errors="replace")


class LuoDevice(OwnedFd):
    """An open ``/dev/liveupdate`` (exclusive: a second open gets EBUSY). Hold it only
    as long as needed; sessions created through it outlive closing it."""

    close_on_gc = True

    def __init__(self, path: str = DEVICE_PATH) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                raise LuoOSError(e.errno, "open", f"no {path} (kernel without LUO)", "BackendUnavailable") from None
            raise LuoOSError(e.errno or errno.EIO, "open") from None

    def create_session(self, name: str) -> LuoSession:
        req = CreateSession(name=session_name(name))
        _ioctl(self.fd, "create_session", LIVEUPDATE_IOCTL_CREATE_SESSION, req)
        return LuoSession(int(req.fd))

    def retrieve_session(self, name: str) -> LuoSession:
        req = RetrieveSession(name=session_name(name))
        _ioctl(self.fd, "retrieve_session", LIVEUPDATE_IOCTL_RETRIEVE_SESSION, req)
        return LuoSession(int(req.fd))
