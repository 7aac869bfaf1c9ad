"""In-guest helpers for the fdbox.ko tests: load/unload without kmod, raw ioctls.

The guest runs the host's userspace, which may have no ``insmod`` (Debian's kmod is not
a dependency here), so modules are loaded with ``finit_module(2)`` and removed with
``delete_module(2)`` directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fdboxd import uapi

_libc = ctypes.CDLL(None, use_errno=True)
SYS_finit_module = 313  # x86_64
SYS_delete_module = 176  # x86_64
O_NONBLOCK = os.O_NONBLOCK

DEVICE = Path("/dev/fdbox")


def module_path() -> str:
    path = os.environ.get("FDBOX_VM_MODULE")
    if not path:
        raise RuntimeError("FDBOX_VM_MODULE is not set: run through tests/vm/test_module.py")
    return path


def is_loaded(name: str = "fdbox") -> bool:
    return Path(f"/sys/module/{name}").is_dir()


def load(path: str | None = None, params: str = "") -> None:
    """finit_module(2); raises OSError."""
    fd = os.open(path or module_path(), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syscall(SYS_finit_module, fd, params.encode(), 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"finit_module: {os.strerror(e)}")
    finally:
        os.close(fd)


def unload(name: str = "fdbox") -> None:
    """delete_module(2) with O_NONBLOCK (never waits for users); raises OSError."""
    if _libc.syscall(SYS_delete_module, name.encode(), O_NONBLOCK) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"delete_module: {os.strerror(e)}")


def refcount(name: str = "fdbox") -> int:
    return int(Path(f"/sys/module/{name}/refcnt").read_text())


def raw_ioctl(dev: uapi.FdboxDevice, number: int, buf: bytes | bytearray) -> tuple[int, bytearray]:
    """ioctl with an arbitrary byte buffer; returns (errno or 0, the buffer afterwards)."""
    b = bytearray(buf)
    try:
        fcntl.ioctl(dev.fd, number, b, True)
    except OSError as e:
        return e.errno or errno.EIO, b
    return 0, b


def struct_bytes(s: ctypes.Structure, size: int | None = None, tail: bytes = b"") -> bytearray:
    """The struct's bytes with ``size`` set (default: its real size) and ``tail`` appended."""
    raw = bytearray(bytes(s)) + bytearray(tail)
    n = len(raw) if size is None else size
    raw[0:4] = n.to_bytes(4, "little")
    return raw


def stats(dev: uapi.FdboxDevice) -> dict[str, int]:
    s = dev.stats()
    return {f: int(getattr(s, f)) for f, *_ in s._fields_ if f not in ("size", "__reserved")}


def empty(dev: uapi.FdboxDevice) -> None:
    """Delete every box, whatever its state (unseal or finish first), so counters go back to zero."""
    for b in dev.list_boxes():
        if b.state == uapi.BoxState.SEALED:
            dev.unseal(b.name)
        elif b.state == uapi.BoxState.RESTORED:
            dev.finish(b.name)
        dev.delete_box(b.name)


@contextlib.contextmanager
def shmem_beside_luo() -> Iterator[None]:
    """The test build loaded with ``test_shmem_beside_luo=1`` instead of the production one.

    Where LUO's memfd handler is built in (the test kernel), the module refuses to SEAL
    shmem memfds (issue 20, scope). Its shmem path is still the production path on KHO
    kernels without LUO's handler, which the VM tier has no kernel for; this hook keeps
    that code tested. Enter it with /dev/fdbox closed and no box left; it empties the
    module before putting the production build back.
    """
    path = os.environ.get("FDBOX_VM_TEST_MODULE")
    if not path:
        raise RuntimeError("FDBOX_VM_TEST_MODULE is not set: run through tests/vm/test_module.py")
    unload()
    load(path, "test_shmem_beside_luo=1")
    try:
        yield
    finally:
        with uapi.FdboxDevice() as d:
            empty(d)
        unload()
        load()


def cmdline() -> str:
    return Path("/proc/cmdline").read_text()
