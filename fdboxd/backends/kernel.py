"""The ``kernel`` backend: ``/dev/fdbox`` (fdbox.ko) holds the file references.

Entries live in the kernel, so they outlive the daemon: a daemon killed with SIGKILL
and started again finds every box and entry through :meth:`KernelBackend.inventory`.
With KHO on (``kho=on``) a sealed box also crosses a kexec; the module then brings it
back in state ``restored`` with each entry's memory waiting in preserved pages.

Restored entries are filled lazily: the first :meth:`get` of such an entry creates a
memfd of the right kind and size, has the module copy the preserved memory into it
(``RESTORE_FD``, which also re-applies the seals the entry had when it was sealed, so
a daemon that dies half-way never leaves a write-sealed memfd writable), and from then
on the kernel holds that memfd like any other entry. The caller never sees the
difference. Only memfd and hugetlb memfd are held here; the store keeps other types
(taps) in its side backend.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from .. import uapi
from ..errors import FdboxError
from ..fdtypes import F_ADD_SEALS, F_GET_SEALS, FdInfo, FdType
from ..model import BoxState
from .base import Backend, BackendBox, BackendEntry

_TYPES: dict[uapi.EntryType, FdType] = {
    uapi.EntryType.MEMFD: FdType.MEMFD,
    uapi.EntryType.MEMFD_HUGETLB: FdType.MEMFD_HUGETLB,
    uapi.EntryType.GUEST_MEMFD: FdType.GUEST_MEMFD,
}
_STATES: dict[uapi.BoxState, BoxState] = {
    uapi.BoxState.OPEN: BoxState.OPEN,
    uapi.BoxState.SEALED: BoxState.SEALED,
    uapi.BoxState.RESTORED: BoxState.RESTORED,
}
#: Why ``--backend kernel`` does not seal a plain memfd on a kernel with LUO, and the fix.
SHMEM_BESIDE_LUO = ("a plain (shmem) memfd: on this kernel LUO carries those across kexec and fdbox.ko only "
                    "hugetlb ones, so --backend kernel cannot seal it; fix: restart fdboxd with --backend auto "
                    "(plain memfds to LUO, hugetlb to fdbox.ko)")
MFD_HUGE_SHIFT = 26
MFD_NOEXEC_SEAL = 0x0008  # <linux/memfd.h>; not in os before Python 3.13
F_SEAL_EXEC = 0x0020  # <linux/fcntl.h>


def _error(e: uapi.FdboxOSError, box: str, name: str | None = None) -> FdboxError:
    """The fdbox error for a failed ioctl, named by the uAPI's errno table."""
    return FdboxError(e.error_name, f"/dev/fdbox {e.op}: {e.meaning}", box=box, name=name, errno=e.errno)


class KernelBackend(Backend):
    #: /dev/fdbox holds every reference (the daemon none): nothing to mirror or adopt,
    #: and no type outside :meth:`accepts` is held here.
    holds_in_process = False
    holds_every_type = False
    next_kernel_module = "fdbox"
    name = "kernel"

    def __init__(self, device: str = "/dev/fdbox") -> None:
        try:
            self.dev = uapi.FdboxDevice(device)
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"cannot open {device}: {e.strerror}") from None
        try:
            version = self.dev.version()
        except uapi.FdboxOSError as e:
            self.dev.close()
            raise FdboxError("BackendUnavailable", f"{device}: {e}") from None
        if version.api_version != uapi.FDBOX_API_VERSION:
            self.dev.close()
            raise FdboxError(
                "BackendUnavailable",
                f"{device} speaks fdbox API {version.api_version}, this daemon {uapi.FDBOX_API_VERSION}",
            )
        self.version = version
        #: Sealed boxes cross kexec only when the module can use KHO in this boot.
        self.survives_kexec = bool(version.features & uapi.FDBOX_FEATURE_KHO_ON)
        #: This kernel has LUO's memfd handler: the module seals hugetlb memfds only and
        #: leaves shmem memfds to LUO (``--backend auto`` sends them there).
        self.shmem_is_luos = bool(version.features & uapi.FDBOX_FEATURE_SHMEM_LUO)
        if self.shmem_is_luos:
            # So the manifest carried in the sealed set is one the module seals.
            self.manifest_carrier = FdType.MEMFD_HUGETLB
            self.manifest_huge_pages = 1

    # ------------------------------------------------------------------ Backend

    def accepts(self, fd_type: FdType) -> bool:
        return fd_type in (FdType.MEMFD, FdType.MEMFD_HUGETLB)

    def create_box(self, box: str) -> None:
        try:
            self.dev.create_box(box)
        except uapi.FdboxOSError as e:
            raise _error(e, box) from None

    def delete_box(self, box: str) -> None:
        try:
            self.dev.delete_box(box)
        except uapi.FdboxOSError as e:
            if e.errno == errno.ENOENT:
                return  # like the memory backend: deleting what is not there is done
            raise _error(e, box) from None

    def put(self, box: str, name: str, fd: int, info: FdInfo, uid: int = 0, gid: int = 0) -> None:
        try:
            self.dev.put_fd(box, name, fd, uid=uid, gid=gid)
        except uapi.FdboxOSError as e:
            raise _error(e, box, name) from None

    def get(self, box: str, name: str) -> int:
        try:
            return self.dev.get_fd(box, name)
        except uapi.FdboxOSError as e:
            if e.errno != errno.ENODATA:
                raise _error(e, box, name) from None
        return self._restore(box, name)

    def remove(self, box: str, name: str) -> None:
        try:
            self.dev.remove_entry(box, name)
        except uapi.FdboxOSError as e:
            raise _error(e, box, name) from None

    def manifest_memfd(self, raw: bytes) -> int:
        """Beside LUO a hugetlb memfd (the module seals no plain one): whole huge pages,
        written through a mapping (hugetlbfs has no write(2)) and padded with NULs, which
        :func:`fdboxd.lifecycle.take_carried_manifest` strips (JSON has none). Without a
        free huge page the seal fails here, naming the fix, before anything was sealed."""
        if not self.shmem_is_luos:
            return super().manifest_memfd(raw)
        try:
            fd = os.memfd_create("fdboxd-manifest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"cannot create a hugetlb memfd for the carried manifest: "
                             f"{e.strerror}") from None
        page = size = 0
        try:
            page = os.fstatvfs(fd).f_bsize
            size = -(-max(len(raw), 1) // page) * page
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as m:  # reserves the pages: ENOMEM here when none is free
                m[:len(raw)] = raw
        except OSError as e:
            os.close(fd)
            raise FdboxError("LimitExceeded", f"no {size // page if page else 1} free huge page(s) for the manifest "
                             f"fdboxd carries in the sealed set ({e.strerror}): with --backend kernel beside LUO it "
                             "crosses in a hugetlb memfd; fix: reserve more (sysctl vm.nr_hugepages), or restart "
                             "fdboxd with --backend auto") from None
        return fd

    def seal_refusal(self, fd_type: FdType) -> str | None:
        if fd_type == FdType.MEMFD and self.shmem_is_luos:
            return SHMEM_BESIDE_LUO
        return None

    def seal(self, box: str) -> None:
        try:
            self.dev.seal(box)
        except uapi.FdboxOSError as e:
            if e.errno == errno.EOPNOTSUPP and self._holds_shmem(box):  # the store asks seal_refusal first
                raise FdboxError("UnsupportedType", f"box {box}: {SHMEM_BESIDE_LUO}", box=box) from None
            raise _error(e, box) from None

    def _holds_shmem(self, box: str) -> bool:
        """Was SEAL refused because LUO carries this box's plain memfds (not for its seals)?"""
        if not self.shmem_is_luos:
            return False
        try:
            return any(e.type == uapi.EntryType.MEMFD for e in self.dev.list_entries(box))
        except uapi.FdboxOSError:
            return False

    def unseal(self, box: str) -> None:
        try:
            self.dev.unseal(box)
        except uapi.FdboxOSError as e:
            raise _error(e, box) from None

    def finish(self, box: str) -> None:
        """End a restored box's restore phase; entries never filled are freed. ``EBADFD``
        (not restored: a FINISH that went through before a crash) is done; any other
        error leaves the box restored with every entry, and a Finish again completes it."""
        try:
            self.dev.finish(box)
        except uapi.FdboxOSError as e:
            if e.errno == errno.EBADFD:
                return  # not restored (any more): nothing to release
            raise _error(e, box) from None

    def inventory(self) -> dict[str, BackendBox]:
        out: dict[str, BackendBox] = {}
        try:
            for b in self.dev.list_boxes():
                try:
                    entries = self.dev.list_entries(b.name)
                except uapi.FdboxOSError as e:
                    if e.errno == errno.ENOENT:
                        continue  # deleted meanwhile
                    raise
                out[b.name] = BackendBox(
                    b.name,
                    _STATES[b.state],
                    {e.name: BackendEntry(e.name, _TYPES[e.type], e.size, e.uid, e.gid) for e in entries},
                )
        except uapi.FdboxOSError as e:
            raise FdboxError("BackendUnavailable", f"/dev/fdbox: {e}") from None
        return out

    def close(self) -> None:
        self.dev.close()

    # ------------------------------------------------------------------ extras

    def stats(self) -> dict[str, int]:
        """The module's counters (boxes, entries, file_refs, ...), for Status and tests."""
        s = self.dev.stats()
        return {f: int(getattr(s, f)) for f, *_ in s._fields_ if f not in ("size", "__reserved")}

    def _restore(self, box: str, name: str) -> int:
        """Fill a restored entry from preserved memory into a new memfd; return that fd."""
        try:
            info = next((e for e in self.dev.list_entries(box) if e.name == name), None)
        except uapi.FdboxOSError as e:
            raise _error(e, box, name) from None
        if info is None:
            raise FdboxError("NotFound", f"no entry {box}/{name}", box=box, name=name)
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        if info.seals & F_SEAL_EXEC:
            # F_SEAL_EXEC came from a non-executable memfd (on an executable one it
            # brings the write seals): the module wants the target non-executable too.
            flags |= MFD_NOEXEC_SEAL
        if info.type == uapi.EntryType.MEMFD_HUGETLB:
            flags |= os.MFD_HUGETLB | (info.page_size.bit_length() - 1) << MFD_HUGE_SHIFT
        try:
            fd = os.memfd_create(name[:200], flags)
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"cannot create a memfd to restore {box}/{name}: {e}") from None
        try:
            os.ftruncate(fd, info.size)
            self.dev.restore_fd(box, name, fd)
            # The module applies the seals itself; this only covers an older module
            # that did not (adding seals already there would fail under F_SEAL_SEAL).
            missing = info.seals & ~fcntl.fcntl(fd, F_GET_SEALS)
            if missing:
                fcntl.fcntl(fd, F_ADD_SEALS, missing)
        except uapi.FdboxOSError as e:
            os.close(fd)
            raise _error(e, box, name) from None
        except OSError as e:
            os.close(fd)
            raise FdboxError("BackendUnavailable", f"restoring {box}/{name}: {e}") from None
        return fd
