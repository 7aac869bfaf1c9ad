"""memfd and hugetlb memfd: the defaults of :class:`~fdboxd.kinds.Kind`.

The file is the guest's RAM. A kexec-capable backend carries it as is (LUO's memfd
handler, or fdbox.ko with KHO); the seal checksums it, the restore checks it, Get
returns it. Nothing to recreate; at put, a hugetlb memfd fdbox.ko could not seal
(``F_SEAL_SEAL`` without the seals it needs: made without ``MFD_ALLOW_SEALING``; or
1 GiB pages) is held all the same but gets ``extra.warning`` saying why and the fix,
at once rather than at the seal before a kexec (issue 20; :mod:`fdboxd.preflight`).
"""

from __future__ import annotations

from typing import Any

from ..fdtypes import FdInfo, FdType
from ..model import Caller
from .base import Kind, register


@register
class MemfdKind(Kind):
    types = frozenset({FdType.MEMFD, FdType.MEMFD_HUGETLB})

    def record(self, fd: int, info: FdInfo, caller: Caller) -> dict[str, Any]:
        if info.type != FdType.MEMFD_HUGETLB:
            return {}
        from ..preflight import put_warning  # only for hugetlb puts

        warning = put_warning(fd, info.seals)
        return {"warning": warning} if warning else {}
