"""guest_memfd through a live update: held as is, carried as a copy, restored into a new one.

A guest_memfd (``KVM_CREATE_GUEST_MEMFD``, ``anon_inode:[kvm-gmem]``) is bound to the
KVM VM that created it. fdbox holds it like any fd, so a VMM that restarts gets the
*same* file back with ``Get`` (while the daemon runs, or under systemd's fdstore across
a daemon restart). No kernel carries one across kexec yet (LUO's guest_memfd
preservation is an RFC), and a restarted VMM needs a guest_memfd of its *own new* VM
anyway. So:

- **Seal** copies a *shared* guest_memfd (created with ``GUEST_MEMFD_FLAG_MMAP |
  GUEST_MEMFD_FLAG_INIT_SHARED``: the host can map and read it) into a memfd, and puts
  that memfd into the same box under a reserved name (:func:`carry_name`), so it is
  sealed with the box by whatever backend carries memfds (the kernel module with KHO;
  the memory backend too, where nothing crosses a kexec but the path is the same). The
  seal's checksum (fdboxd.checksum, ``--verify``) is taken of the copy. The original
  stays held until the box is unsealed or the old kernel goes away; ``Unseal`` drops
  the copy — unless the guest_memfd itself is gone (a daemon restart while sealed, with
  nothing to keep the daemon's reference): then the copy is the only one
  (:data:`COPY_ONLY`, shown by List and Status) and stays, ``Get`` refuses, and
  ``RestoreInto`` fills a new guest_memfd from it (on the sealed box a rehearsal; after
  ``Unseal`` the entry then holds the new guest_memfd).
- A **private** guest_memfd (flags 0: ``mmap`` fails with ``ENODEV``; or ``MMAP``
  without ``INIT_SHARED``: every access faults) cannot be read by the host, so it cannot
  be carried: ``Seal`` refuses the whole seal with ``UnsupportedType`` saying so, before
  anything changed.
- After kexec (the box is ``restored``), the VMM creates its new guest_memfd of the same
  size with ``MMAP | INIT_SHARED`` and calls ``RestoreInto(box, name, fd)``: fdboxd
  checks the carried copy against the seal's checksum (a copy that fails is refused and
  reported lost; the target is not written), copies it into the new guest_memfd, and
  from then on holds that new guest_memfd as the entry (claimed, like a ``Get``). On a
  ``sealed`` box (no kexec happened) ``RestoreInto`` fills the target the same way and
  changes nothing in the box: a rehearsal of the restore.

How bytes move. guest_memfd has no ``read``/``write`` (``ESPIPE``), so both directions
go through a mapping of it — but never by touching the mapping from Python: a page the
host may not access (private memory) raises ``SIGBUS``, which would kill the daemon. The
*kernel* copies instead: ``pwrite(copy, <guest_memfd mapping>)`` at seal and
``preadv(copy, [<guest_memfd mapping>])`` at restore, where such a page is a plain
``EFAULT``, reported as ``UnsupportedType``. Chunks are large (:data:`CHUNK`), only
populated pages are copied (:func:`populated`; guest RAM is mostly holes) and the
callers run this in a worker thread: it is on the live update's blackout path.
Checksums are only ever taken of the memfd side, a file fdboxd made, read with ``pread``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
from typing import Any

from .checksum import data_extents  # one hole walker for checksum and copy
from .errors import FdboxError
from .fdtypes import FdInfo, FdType
from .model import Entry

log = logging.getLogger("fdboxd.gmem")

#: Bytes per copy/checksum step.
CHUNK = 64 << 20

#: Entry names starting with this are reserved: the box's carried copies live there.
CARRY_PREFIX = "fdboxd.gmem."

#: The key in ``Entry.extra`` (shown by List): ``{"shared": bool, "carried": bool}``.
EXTRA = "guest_memfd"


def carry_name(name: str) -> str:
    """The reserved entry name of ``name``'s carried copy (fits the 255-character limit)."""
    full = CARRY_PREFIX + name
    if len(full) <= 255:
        return full
    return CARRY_PREFIX + "h" + hashlib.sha256(name.encode()).hexdigest()


def is_carry_name(name: str) -> bool:
    return name.startswith(CARRY_PREFIX)


def record(fd: int, info: FdInfo) -> dict[str, Any]:
    """``Entry.extra`` at put: whether the host can read this guest_memfd (see module doc)."""
    return {EXTRA: {"shared": is_shared(fd, info.size)}}


def is_shared(fd: int, size: int) -> bool:
    """True if the host can map the file and read its first page (without touching it)."""
    if size <= 0:
        return False
    length = min(size, mmap.PAGESIZE)
    try:
        m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError:
        return False  # ENODEV: created without GUEST_MEMFD_FLAG_MMAP
    r, w = os.pipe()
    try:
        with memoryview(m) as view:
            os.write(w, view[:1])  # the kernel reads the page: EFAULT, not SIGBUS, if private
        return True
    except OSError:
        return False
    finally:
        os.close(r)
        os.close(w)
        m.close()


def extra_of(extra: dict[str, Any]) -> dict[str, Any]:
    v = extra.get(EXTRA)
    return v if isinstance(v, dict) else {}


def is_carried(entry: Entry) -> bool:
    """The entry's bytes are (also) in a carried copy in its box (since seal)."""
    return entry.type == FdType.GUEST_MEMFD and bool(extra_of(entry.extra).get("carried"))


def set_carried(entry: Entry, carried: bool) -> None:
    """Mark or unmark the entry as carried (assigned, never changed in place: Entry caches its
    wire form). Unmarked, it is no longer copy-only either: the copy is gone."""
    rec = dict(extra_of(entry.extra))
    if carried:
        rec["carried"] = True
    else:
        rec.pop("carried", None)
        rec.pop(COPY_ONLY, None)
    entry.extra = {**entry.extra, EXTRA: rec}


#: The key in ``extra["guest_memfd"]`` of a carried entry whose guest_memfd itself is gone
#: though its box is not restored (the daemon restarted while the box was sealed, and
#: nothing kept the daemon's reference): the carried copy is the only one. Its value says so.
COPY_ONLY = "copy_only"


def is_copy_only(entry: Entry) -> bool:
    return is_carried(entry) and bool(extra_of(entry.extra).get(COPY_ONLY))


def set_copy_only(entry: Entry, on: bool) -> None:
    rec = dict(extra_of(entry.extra))
    if on:
        rec[COPY_ONLY] = ("the guest_memfd itself was gone when fdboxd started (it restarted while the "
                          "box was sealed); the copy carried since the seal is the only one: RestoreInto "
                          "a new guest_memfd takes it back")
    else:
        rec.pop(COPY_ONLY, None)
    entry.extra = {**entry.extra, EXTRA: rec}


def seal_refusal(box: str, entry: Any) -> FdboxError | None:
    """Why this guest_memfd cannot be sealed, or None (checked before anything changes)."""
    if extra_of(entry.extra).get("shared"):
        return None
    return FdboxError(
        "UnsupportedType",
        f"{box}/{entry.name} is a private guest_memfd: the host cannot read its memory (it was "
        "created without GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED), so it cannot be "
        "copied, checksummed or carried across a live update",
        box=box, name=entry.name, type=str(FdType.GUEST_MEMFD),
    )


def _private(what: str, e: OSError) -> FdboxError:
    return FdboxError("UnsupportedType", f"{what}: the host cannot access its memory ({e.strerror}); "
                      "only a guest_memfd created with GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED "
                      "can be carried", type=str(FdType.GUEST_MEMFD))


def _map(fd: int, size: int, prot: int, what: str) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.EACCES, errno.EINVAL, errno.EPERM):
            raise _private(what, e) from None
        raise


def copy_out(fd: int, what: str = "guest_memfd") -> int:
    """Copy a shared guest_memfd into a new memfd, which the caller owns.

    Only the pages the guest_memfd has (:func:`populated`) are copied: the copy keeps
    the rest as holes, which read as the zeros they are, cost no memory and are skipped
    by the checksum; reading them through the mapping would allocate every one of them
    in the guest_memfd. Runs in a worker thread (seal). ``UnsupportedType`` if a page
    is not readable.
    """
    size = os.fstat(fd).st_size
    out = os.memfd_create("fdbox-gmem-copy", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(out, size)
        if size:
            with _map(fd, size, mmap.PROT_READ, what) as src, memoryview(src) as view:
                for start, stop in populated(fd, size):
                    pos = start
                    while pos < stop:
                        end = min(pos + CHUNK, stop)
                        try:
                            pos += os.pwrite(out, view[pos:end], pos)  # the kernel reads the mapping
                        except OSError as e:
                            if e.errno == errno.EFAULT:
                                raise _private(f"{what} at offset {pos}", e) from None
                            raise
        return out
    except BaseException:
        os.close(out)
        raise


def fill(target: int, source: int, size: int, what: str = "guest_memfd") -> None:
    """Copy ``size`` bytes of the memfd ``source`` into the guest_memfd ``target``.

    Holes of the source are skipped (the new guest_memfd reads zeros there without
    allocating). Runs in a worker thread (restore). ``UnsupportedType`` if the target
    cannot be mapped or written (a private one).
    """
    if not size:
        return
    with _map(target, size, mmap.PROT_READ | mmap.PROT_WRITE, f"the target of {what}") as dst, \
            memoryview(dst) as view:
        for start, stop in data_extents(source, 0, size):
            pos = start
            while pos < stop:
                end = min(pos + CHUNK, stop)
                try:
                    n = os.preadv(source, [view[pos:end]], pos)  # the kernel writes the mapping
                except OSError as e:
                    if e.errno == errno.EFAULT:
                        raise _private(f"the target of {what} at offset {pos}", e) from None
                    raise
                if n == 0:
                    raise FdboxError("BackendUnavailable", f"the carried copy of {what} ended at {pos} of {size} bytes")
                pos += n


def populated(fd: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges of the guest_memfd that hold pages (``mincore`` on a mapping of it).

    guest_memfd has no ``SEEK_DATA``, but its pages are in its page cache, which
    ``mincore`` reports for a shared file mapping without touching a page. If that
    fails, the whole file.
    """
    import ctypes

    from .fdtypes import libc as load_libc

    libc = load_libc()
    page = mmap.PAGESIZE
    npages = (size + page - 1) // page
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return [(0, size)]
    try:
        vec = bytearray(npages)
        if libc.mincore(ctypes.c_void_p(addr), size, (ctypes.c_char * npages).from_buffer(vec)) != 0:
            return [(0, size)]
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)
    flags = vec.translate(_RESIDENT)  # 1 for a resident page, 0 otherwise; found at C speed
    runs: list[tuple[int, int]] = []
    i = flags.find(1)
    while i != -1:
        j = flags.find(0, i)
        j = npages if j == -1 else j
        runs.append((i * page, min(j * page, size)))
        i = flags.find(1, j)
    return runs


_RESIDENT = bytes(b & 1 for b in range(256))  # mincore's bit 0; the other bits are reserved
