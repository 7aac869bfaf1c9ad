"""``auto`` on a kernel with both LUO and fdbox.ko: each entry goes where it crosses kexec best.

Plain memfds go to LUO (:class:`~fdboxd.backends.liveupdate.LiveupdateBackend`: the same
pages come back, nothing copied); hugetlb memfds and guest_memfd, which LUO cannot
preserve, go to fdbox.ko (:class:`~fdboxd.backends.kernel.KernelBackend`). One box may
hold both kinds: every box exists on both sides and seal/unseal/finish act on both,
all or nothing. A file goes to exactly one side, decided by its type, so nothing is
ever preserved twice by this daemon.

Which side holds an entry, and which boxes exist on which side, is kept in maps read
once from both inventories at start (the restored boxes) and updated by every call that
changes them (put, adopt, remove, create/delete_box, finish): a Get or a Remove asks no
side for its inventory (on fdbox.ko, an ioctl per box).
"""

from __future__ import annotations

from .. import failpoints
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
    #: The LUO side holds its entries (open, restored, and the files of sealed ones) in
    #: this process: they are mirrored into the fd store and adopted back by that side.
    holds_in_process = True
    #: Taps are not LUO's to hold here: the store keeps its own side backend for them.
    holds_every_type = False
    #: Hugetlb RAM crosses in fdbox.ko's handover.
    next_kernel_module = "fdbox"

    def __init__(self, luo: LiveupdateBackend, kernel: KernelBackend) -> None:
        self.luo = luo
        self.kernel = kernel
        self.holds_in_process = luo.holds_in_process or kernel.holds_in_process
        #: box -> entry -> the side holding it.
        self._route: dict[str, dict[str, Backend]] = {}
        #: id(side) -> the boxes that side has.
        self._boxes_on: dict[int, set[str]] = {id(luo): set(), id(kernel): set()}
        for side in self._sides():
            for box, held in side.inventory().items():
                self._boxes_on[id(side)].add(box)
                for name in held.entries:
                    self._route.setdefault(box, {})[name] = side

    def _reroute(self, box: str) -> None:
        """Read ``box``'s routes again from both sides (after a finish released entries)."""
        routes: dict[str, Backend] = {}
        for side in self._sides():
            held = side.inventory().get(box)
            if held is None:
                self._boxes_on[id(side)].discard(box)
                continue
            self._boxes_on[id(side)].add(box)
            for name in held.entries:
                routes[name] = side
        self._route[box] = routes

    def problems(self) -> list[str]:
        return super().problems() + self.luo.problems() + self.kernel.problems()

    def _sides(self) -> tuple[Backend, Backend]:
        return (self.luo, self.kernel)

    def _for_type(self, fd_type: FdType) -> Backend:
        return self.luo if self.luo.accepts(fd_type) else self.kernel

    def _holding(self, box: str, name: str) -> Backend:
        side = self._route.get(box, {}).get(name)
        if side is None:
            raise FdboxError("NotFound", f"no entry {box}/{name}", box=box, name=name)
        return side

    def _has(self, side: Backend, box: str) -> bool:
        return box in self._boxes_on[id(side)]

    def _create_on(self, side: Backend, box: str) -> None:
        side.create_box(box)
        self._boxes_on[id(side)].add(box)

    def accepts(self, fd_type: FdType) -> bool:
        return self.luo.accepts(fd_type) or self.kernel.accepts(fd_type)

    def create_box(self, box: str) -> None:
        self._create_on(self.luo, box)
        if not self._has(self.kernel, box):
            try:
                self._create_on(self.kernel, box)
            except BaseException:
                self.luo.delete_box(box)
                self._boxes_on[id(self.luo)].discard(box)
                raise

    def delete_box(self, box: str) -> None:
        for side in self._sides():
            if self._has(side, box):
                side.delete_box(box)
                self._boxes_on[id(side)].discard(box)
        self._route.pop(box, None)

    def put(self, box: str, name: str, fd: int, info: FdInfo, uid: int = 0, gid: int = 0) -> None:
        side = self._for_type(info.type)
        if not self._has(side, box):
            self._create_on(side, box)
        side.put(box, name, fd, info, uid, gid)
        self._route.setdefault(box, {})[name] = side

    def get(self, box: str, name: str) -> int:
        return self._holding(box, name).get(box, name)

    def peek(self, box: str, name: str) -> int | None:
        try:
            return self._holding(box, name).peek(box, name)
        except FdboxError:
            return None

    def adopt(self, box: str, name: str, fd: int) -> None:
        """The fd store holds only what an in-process side mirrored: the LUO side's."""
        side = next((s for s in self._sides() if s.holds_in_process), None)
        if side is None:
            super().adopt(box, name, fd)
            return
        side.adopt(box, name, fd)
        self._boxes_on[id(side)].add(box)
        self._route.setdefault(box, {})[name] = side

    def remove(self, box: str, name: str) -> None:
        self._holding(box, name).remove(box, name)
        del self._route[box][name]

    def seal(self, box: str) -> None:
        """Seal both sides, all or nothing. A side already sealed is left as it is (after
        a daemon restart fdbox.ko's half stayed sealed while the LUO half is sealed again
        from what the fd store gave back), and is never unsealed by a failure here."""
        now: list[Backend] = []
        for side in self._sides():
            held = side.inventory().get(box)
            if held is None:
                self._create_on(side, box)
            elif held.state == BoxState.SEALED:
                continue
            now.append(side)
        done: list[Backend] = []
        try:
            for side in sorted(now, key=lambda s: s is self.luo):  # fdbox.ko first, as before
                side.seal(box)
                done.append(side)
                if side is self.kernel:
                    failpoints.hit("seal.after_kernel_side")
        except BaseException:
            for side in reversed(done):
                side.unseal(box)
            raise

    def unseal(self, box: str) -> None:
        for side in self._sides():
            held = side.inventory().get(box) if self._has(side, box) else None
            if held is not None and held.state == BoxState.SEALED:
                side.unseal(box)

    def finish(self, box: str) -> None:
        try:
            for side in self._sides():
                held = side.inventory().get(box)
                if held is None:
                    side.create_box(box)  # a box carried by one side only: reopen it on both
                elif held.state == BoxState.RESTORED:
                    side.finish(box)  # releases what was not claimed
        finally:
            self._reroute(box)

    def started(self) -> None:
        for side in self._sides():
            side.started()

    def reconciled(self, keep: set[str]) -> None:
        for side in self._sides():
            side.reconciled(keep)

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
