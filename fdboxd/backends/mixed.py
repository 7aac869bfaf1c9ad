"""``auto`` on a kernel with both LUO and fdbox.ko: each entry goes where it crosses kexec best.

Plain memfds go to LUO (:class:`~fdboxd.backends.liveupdate.LiveupdateBackend`: the same
pages come back, nothing copied); hugetlb memfds and guest_memfd, which LUO cannot
preserve, go to fdbox.ko (:class:`~fdboxd.backends.kernel.KernelBackend`). One box may
hold both kinds: every box exists on both sides and seal/unseal/finish act on both,
all or nothing. A file goes to exactly one side, decided by its type, so nothing is
ever preserved twice by this daemon.
"""

from __future__ import annotations

from ..errors import FdboxError
from ..fdtypes import FdInfo, FdType
from ..model import BoxState
from .base import Backend, BackendBox
from .kernel import KernelBackend
from .liveupdate import LiveupdateBackend

_RANK = {BoxState.OPEN: 0, BoxState.SEALED: 1, BoxState.RESTORED: 2}


class MixedBackend(Backend):
    name = "liveupdate+kernel"
    survives_kexec = True

    def __init__(self, luo: LiveupdateBackend, kernel: KernelBackend) -> None:
        self.luo = luo
        self.kernel = kernel

    def problems(self) -> list[str]:
        return super().problems() + self.luo.problems() + self.kernel.problems()

    def _sides(self) -> tuple[Backend, Backend]:
        return (self.luo, self.kernel)

    def _for_type(self, fd_type: FdType) -> Backend:
        return self.luo if self.luo.accepts(fd_type) else self.kernel

    def _holding(self, box: str, name: str) -> Backend:
        for side in self._sides():
            b = side.inventory().get(box)
            if b is not None and name in b.entries:
                return side
        raise FdboxError("NotFound", f"no entry {box}/{name}", box=box, name=name)

    def _has(self, side: Backend, box: str) -> bool:
        return box in side.inventory()

    def accepts(self, fd_type: FdType) -> bool:
        return self.luo.accepts(fd_type) or self.kernel.accepts(fd_type)

    def create_box(self, box: str) -> None:
        self.luo.create_box(box)
        if not self._has(self.kernel, box):
            try:
                self.kernel.create_box(box)
            except BaseException:
                self.luo.delete_box(box)
                raise

    def delete_box(self, box: str) -> None:
        for side in self._sides():
            if self._has(side, box):
                side.delete_box(box)

    def put(self, box: str, name: str, fd: int, info: FdInfo, uid: int = 0, gid: int = 0) -> None:
        side = self._for_type(info.type)
        if not self._has(side, box):
            side.create_box(box)
        side.put(box, name, fd, info, uid, gid)

    def get(self, box: str, name: str) -> int:
        return self._holding(box, name).get(box, name)

    def remove(self, box: str, name: str) -> None:
        self._holding(box, name).remove(box, name)

    def seal(self, box: str) -> None:
        for side in self._sides():
            if not self._has(side, box):
                side.create_box(box)
        self.kernel.seal(box)
        try:
            self.luo.seal(box)
        except BaseException:
            self.kernel.unseal(box)
            raise

    def unseal(self, box: str) -> None:
        for side in self._sides():
            if self._has(side, box) and side.inventory()[box].state == BoxState.SEALED:
                side.unseal(box)

    def finish(self, box: str) -> None:
        for side in self._sides():
            held = side.inventory().get(box)
            if held is None:
                side.create_box(box)  # a box carried by one side only: reopen it on both
            elif held.state == BoxState.RESTORED:
                side.finish(box)

    def started(self) -> None:
        for side in self._sides():
            side.started()

    def inventory(self) -> dict[str, BackendBox]:
        out: dict[str, BackendBox] = {}
        for side in self._sides():
            for name, b in side.inventory().items():
                have = out.get(name)
                if have is None:
                    out[name] = BackendBox(name, b.state, dict(b.entries))
                    continue
                have.entries.update(b.entries)
                if _RANK[b.state] > _RANK[have.state]:
                    have.state = b.state
        return out

    def close(self) -> None:
        for side in self._sides():
            side.close()
