"""memfd and hugetlb memfd: the defaults of :class:`~fdboxd.kinds.Kind`.

The file is the guest's RAM. A kexec-capable backend carries it as is (LUO's memfd
handler, or fdbox.ko with KHO); the seal checksums it, the restore checks it, Get
returns it. Nothing to record, nothing to recreate.
"""

from __future__ import annotations

from ..fdtypes import FdType
from .base import Kind, register


@register
class MemfdKind(Kind):
    types = frozenset({FdType.MEMFD, FdType.MEMFD_HUGETLB})
