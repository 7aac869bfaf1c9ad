"""memfd and hugetlb memfd: the defaults of :class:`~fdboxd.kinds.Kind`.

The file is the guest's RAM. A kexec-capable backend carries it as is (LUO's memfd
handler, or fdbox.ko with KHO); the seal checksums it, the restore checks it, Get
returns it. Nothing to recreate; at put, a hugetlb memfd fdbox.ko could not seal
(``F_SEAL_SEAL`` without the seals it needs: made without ``MFD_ALLOW_SEALING``; or
1 GiB pages) is held all the same but gets ``extra.warning`` saying why and the fix,
at once rather than at the seal before a kexec (issue 20; :mod:`fdboxd.preflight`); so
does a read-only file description (issue 25 §22: Get would hand a VMM RAM it cannot write).
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

from ..fdtypes import HUGE_1G, HUGE_2M, FdInfo, FdType
from ..model import BoxState, Caller, Entry
from .base import Kind, Preflight, register

F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
F_SEAL_FUTURE_WRITE = 0x10

_HUGETLB_FIX = ("create the memfd with MFD_ALLOW_SEALING and pass it to QEMU as memory-backend-file "
                "(mem-path=/proc/self/fd/N, share=on), as fdbox-qemu does (memory-backend-memfd,hugetlb=on "
                "cannot work: without seal=on it has F_SEAL_SEAL from the start, with seal=on QEMU adds it)")


def hugetlb_problem(seals: int | None, page_size: int | None) -> tuple[str, str] | None:
    """Why fdbox.ko cannot carry this hugetlb memfd, and the fix; None if it can.

    fdbox.ko's SEAL adds F_SEAL_SEAL, F_SEAL_GROW, F_SEAL_SHRINK and a write seal to a
    hugetlb memfd and never adds a seal to one that has F_SEAL_SEAL already (the seal
    rules forbid it: kmod/fdbox_kho.c:fdbox_kho_seals_to_add()), so such a file must
    have them all. A memfd created without MFD_ALLOW_SEALING starts with F_SEAL_SEAL
    alone: the usual case (QEMU's memory-backend-memfd without seal=on). 1 GiB pages
    are refused at put by fdbox.ko.
    """
    if page_size is not None and page_size >= HUGE_1G:
        return ("uses 1 GiB hugetlb pages, which fdbox.ko does not carry (the restore copies into a "
                "second set of 1 GiB pages, rarely allocatable at run time)",
                "use 2 MiB pages (fdbox-qemu --hugetlb 2M, MFD_HUGE_2MB)")
    if seals is not None and seals & F_SEAL_SEAL:
        need = F_SEAL_GROW | F_SEAL_SHRINK
        if (seals & need) != need or not seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
            return ("is a hugetlb memfd with F_SEAL_SEAL but without F_SEAL_GROW, F_SEAL_SHRINK and a write "
                    "seal (created without MFD_ALLOW_SEALING?): fdbox.ko cannot seal it for the kexec",
                    _HUGETLB_FIX)
    return None


def put_warning(fd: int, seals: int | None) -> str | None:
    """The warning a put of a hugetlb memfd gets when fdbox.ko could not carry it (issue 20)."""
    try:
        page: int | None = os.fstatvfs(fd).f_bsize
    except OSError:
        page = None
    found = hugetlb_problem(seals, page)
    if found is None:
        return None
    return f"{found[0]}; fix: {found[1]}"


def read_only_warning(fd: int, hugetlb: bool = False) -> str | None:
    """The warning a put of a read-only file description gets (issue 25 §22).

    What is held is the caller's open file itself, access mode included, and Get hands
    that back: a VMM given an ``O_RDONLY`` one cannot write the guest's RAM or map it
    shared and writable; and fdbox.ko's SEAL adds seals to a hugetlb memfd only through
    a writable reference (EPERM otherwise). Held all the same (it is the caller's file
    to pass), but said.
    """
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        return None
    if mode != os.O_RDONLY:
        return None
    return ("is a read-only file description (opened O_RDONLY, as a shell's `3<` does): whoever gets it back "
            "cannot write it or map it writable" + (", nor can fdbox.ko seal it for a kexec" if hugetlb else "")
            + "; fix: pass it opened read-write (`3<>`, O_RDWR)")


@register
class MemfdKind(Kind):
    types = frozenset({FdType.MEMFD, FdType.MEMFD_HUGETLB})

    def record(self, fd: int, info: FdInfo, caller: Caller) -> dict[str, Any]:
        hugetlb = info.type == FdType.MEMFD_HUGETLB
        warnings = [read_only_warning(fd, hugetlb), put_warning(fd, info.seals) if hugetlb else None]
        warning = "; and it ".join(w for w in warnings if w)
        return {"warning": warning} if warning else {}

    def preflight(self, box: str, entry: Entry, state: BoxState, seals: int | None,
                  page_size: int | None) -> Preflight:
        if entry.type != FdType.MEMFD_HUGETLB:
            return super().preflight(box, entry, state, seals, page_size)
        # the seals count only while the box is open: a sealed box's are fdbox.ko's own
        found = hugetlb_problem(seals if state == BoxState.OPEN else None, page_size)
        if found is not None:
            return Preflight(problems=[("UnsupportedType", *found)])
        return Preflight(carrier=entry.type, hugetlb_pages=-(-entry.size // HUGE_2M), unaccepted=(
            "is a hugetlb memfd: LUO cannot preserve hugetlb and fdbox.ko, which can, was not loaded when "
            "fdboxd started", "load fdbox.ko (modprobe fdbox), then restart fdboxd"))
