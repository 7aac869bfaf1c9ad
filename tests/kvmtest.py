"""Real guest_memfd for tests: ``/dev/kvm`` ioctls from Python, no vCPU.

A guest_memfd (``anon_inode:[kvm-gmem]``) is made by ``KVM_CREATE_GUEST_MEMFD`` on a VM
fd (``KVM_CREATE_VM``, type 0). No vCPU is created, so this works on hosts where KVM
guests cannot run. The numbers below are the one definition the tests use; they mirror
Linux's ``include/uapi/linux/kvm.h`` and ``tests/unit/test_kvm_header.py`` compiles the
header's own definitions with gcc and compares.

Behaviour of the host kernel (6.18) these tests rely on, checked by
``tests/integration/test_guest_memfd.py``: ``KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD_FLAGS)``
returns the *bitmask* of supported creation flags (3 = ``GUEST_MEMFD_FLAG_MMAP |
GUEST_MEMFD_FLAG_INIT_SHARED``; the number 244 was briefly named
``KVM_CAP_GUEST_MEMFD_MMAP`` during 6.18's development and returned 1). With flags 3
the file can be ``mmap``\\ ed and written by the host; with 0 (private) ``mmap`` fails
with ``ENODEV``; with ``MMAP`` alone the mapping succeeds but every access faults
(``SIGBUS`` in user space, ``EFAULT`` in a syscall). ``read``/``write`` are not
implemented (``ESPIPE``) and the size is fixed at creation (``ftruncate``: ``EINVAL``).

Tests use :func:`require` to get a :class:`Kvm`. Hosts differ: some hosts' ``/dev/kvm``
(kvm_pvm) has no ``KVM_CAP_GUEST_MEMFD``, and a missing host capability is never a CI
failure. Where the host lacks it the test skips, and ``tests/vm/test_guest_memfd_vm.py``
runs the same tests inside the debug test kernel (``../shared/testkernel-debug``: KVM with
guest_memfd under TCG, ``-cpu max``), so they run on every CI. Inside that VM
``$FDBOX_REQUIRE_GUEST_MEMFD=1`` is set and a missing capability *fails* the test.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

# include/uapi/linux/kvm.h
KVMIO = 0xAE
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = 0xAE03  # _IO(KVMIO, 0x03)
KVM_CREATE_GUEST_MEMFD = 0xC040AED4  # _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_GUEST_MEMFD_FLAGS = 244
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
KVM_API_VERSION = 12
KVM_VM_TYPE_DEFAULT = 0  # KVM_X86_DEFAULT_VM

#: struct kvm_create_guest_memfd { __u64 size; __u64 flags; __u64 reserved[6]; }
CREATE_GUEST_MEMFD = struct.Struct("=QQ6Q")

#: Flags of a guest_memfd the host can map and fill ("shared").
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
#: A private guest_memfd: the host cannot map it at all.
PRIVATE = 0

DEVICE = "/dev/kvm"


class KvmUnavailable(Exception):
    """No usable /dev/kvm, or it lacks guest_memfd (the reason is the message)."""


@dataclass
class Kvm:
    """An open ``/dev/kvm`` and one VM: enough to create guest_memfds."""

    kvm_fd: int
    vm_fd: int
    flags: int  # KVM_CAP_GUEST_MEMFD_FLAGS of the VM: the creation flags supported

    @classmethod
    def open(cls) -> Kvm:
        try:
            kvm = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(f"{DEVICE}: {e.strerror}") from None
        try:
            if fcntl.ioctl(kvm, KVM_GET_API_VERSION) != KVM_API_VERSION:
                raise KvmUnavailable(f"{DEVICE}: KVM API version is not {KVM_API_VERSION}")
            vm = fcntl.ioctl(kvm, KVM_CREATE_VM, KVM_VM_TYPE_DEFAULT)
        except OSError as e:
            os.close(kvm)
            raise KvmUnavailable(f"KVM_CREATE_VM: {e.strerror}") from None
        except KvmUnavailable:
            os.close(kvm)
            raise
        os.set_inheritable(vm, False)
        self = cls(kvm, vm, 0)
        if fcntl.ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) <= 0:
            self.close()
            raise KvmUnavailable("KVM_CAP_GUEST_MEMFD is missing")
        self.flags = max(0, fcntl.ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS))
        return self

    @property
    def can_share(self) -> bool:
        return self.flags & SHARED == SHARED

    def guest_memfd(self, size: int, flags: int = SHARED) -> int:
        """A new guest_memfd of ``size`` bytes (the caller closes it; close-on-exec)."""
        arg = bytearray(CREATE_GUEST_MEMFD.pack(size, flags, *[0] * 6))
        fd = fcntl.ioctl(self.vm_fd, KVM_CREATE_GUEST_MEMFD, arg)
        os.set_inheritable(fd, False)
        return fd

    def close(self) -> None:
        for fd in (self.vm_fd, self.kvm_fd):
            if fd >= 0:
                os.close(fd)
        self.vm_fd = self.kvm_fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Set (to 1) where guest_memfd must work: a missing capability fails instead of skipping.
REQUIRE_ENV = "FDBOX_REQUIRE_GUEST_MEMFD"


def host_support() -> str | None:
    """None when this machine can run the guest_memfd tests, else why not (one line)."""
    try:
        kvm = Kvm.open()
    except KvmUnavailable as e:
        return str(e)
    try:
        if not kvm.can_share:
            return f"KVM_CAP_GUEST_MEMFD_FLAGS is {kvm.flags:#x}: no mmap-able (shared) guest_memfd"
        return None
    finally:
        kvm.close()


def require(shared: bool = True) -> Kvm:
    """A :class:`Kvm`, or skip (fail where ``$FDBOX_REQUIRE_GUEST_MEMFD`` is set)."""
    try:
        kvm = Kvm.open()
    except KvmUnavailable as e:
        _cannot_run(str(e))  # raises
        raise
    if shared and not kvm.can_share:
        kvm.close()
        _cannot_run(f"KVM_CAP_GUEST_MEMFD_FLAGS is {kvm.flags:#x}: no mmap-able (shared) guest_memfd")
    return kvm


def _cannot_run(reason: str) -> None:
    import pytest

    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"guest_memfd test cannot run where {REQUIRE_ENV} is set: {reason}", pytrace=False)
    pytest.skip(f"{reason} (this host; tests/vm/test_guest_memfd_vm.py runs it in the debug kernel)")


def write_gmem(fd: int, data: bytes, offset: int = 0) -> None:
    """Write ``data`` into a shared guest_memfd through a mapping (it has no write())."""
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
        m[offset : offset + len(data)] = data


def read_gmem(fd: int, length: int | None = None, offset: int = 0) -> bytes:
    """Read a shared guest_memfd through a mapping (it has no read())."""
    size = os.fstat(fd).st_size
    length = size - offset if length is None else length
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return bytes(m[offset : offset + length])


def is_guest_memfd(fd: int) -> bool:
    try:
        return "kvm-gmem" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
