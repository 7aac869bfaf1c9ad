"""The ``memory`` backend: the daemon process itself holds a dup of every fd.

This is the embedded default: no kernel module, no privileges. Entries last as long as
the process does — or longer under systemd, where each fd is also kept in the service's
fdstore and handed back on restart (:meth:`MemoryBackend.adopt`). Sealing only changes
state: nothing held here crosses a kexec, and :attr:`survives_kexec` says so.
"""

from __future__ import annotations

import os

from ..errors import FdboxError
from ..fdtypes import FdInfo, FdType, detect
from ..model import BoxState
from .base import Backend, BackendBox, BackendEntry


class MemoryBackend(Backend):
    name = "memory"
    survives_kexec = False
    holds_in_process = True
    holds_every_type = True

    def __init__(self) -> None:
        self._boxes: dict[str, BackendBox] = {}
        self._fds: dict[tuple[str, str], int] = {}

    def accepts(self, fd_type: FdType) -> bool:
        return True

    def create_box(self, box: str) -> None:
        self._boxes.setdefault(box, BackendBox(box, BoxState.OPEN))

    def delete_box(self, box: str) -> None:
        b = self._boxes.pop(box, None)
        if b is None:
            return
        for name in b.entries:
            os.close(self._fds.pop((box, name)))

    def put(self, box: str, name: str, fd: int, info: FdInfo, uid: int = 0, gid: int = 0) -> None:
        b = self._box(box)
        if name in b.entries:
            raise FdboxError("AlreadyExists", f"{box}/{name} exists", box=box, name=name)
        held = os.dup(fd)  # Python's dup is non-inheritable: children never see it
        self._fds[(box, name)] = held
        b.entries[name] = BackendEntry(name, info.type, info.size, uid, gid)

    def adopt(self, box: str, name: str, fd: int) -> None:
        """Take ownership of ``fd`` (from the fdstore) as entry ``box/name``."""
        self.create_box(box)
        old = self._fds.pop((box, name), None)
        if old is not None:
            os.close(old)
        info = detect(fd)
        self._fds[(box, name)] = fd
        self._boxes[box].entries[name] = BackendEntry(name, info.type, info.size)

    def get(self, box: str, name: str) -> int:
        held = self._fds.get((box, name))
        if held is None:
            raise FdboxError("NotFound", f"no entry {box}/{name}", box=box, name=name)
        return os.dup(held)  # os.dup returns a non-inheritable (O_CLOEXEC) fd

    def lend(self, box: str, name: str) -> int | None:
        return self._fds.get((box, name))

    def lend_many(self, box: str, names: list[str]) -> list[int] | None:
        held = self._fds
        fds = [held.get((box, n)) for n in names]
        return None if None in fds else fds  # type: ignore[return-value]

    def peek(self, box: str, name: str) -> int | None:
        return self._fds.get((box, name))

    def remove(self, box: str, name: str) -> None:
        b = self._box(box)
        if b.entries.pop(name, None) is None:
            raise FdboxError("NotFound", f"no entry {box}/{name}", box=box, name=name)
        os.close(self._fds.pop((box, name)))

    def seal(self, box: str) -> None:
        self._box(box).state = BoxState.SEALED

    def unseal(self, box: str) -> None:
        self._box(box).state = BoxState.OPEN

    def finish(self, box: str) -> None:
        self._box(box).state = BoxState.OPEN

    def inventory(self) -> dict[str, BackendBox]:
        return {
            n: BackendBox(n, b.state, {e.name: BackendEntry(e.name, e.type, e.size, e.uid, e.gid)
                                       for e in b.entries.values()})
            for n, b in self._boxes.items()
        }

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._boxes.clear()

    def _box(self, box: str) -> BackendBox:
        try:
            return self._boxes[box]
        except KeyError:
            raise FdboxError("NotFound", f"no box {box}", box=box) from None
