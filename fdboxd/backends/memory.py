"""The ``memory`` backend: the daemon process itself holds a dup of every fd.

This is the embedded default: no kernel module, no privileges. Entries last as long as
the process does — or longer under systemd, where each fd is also kept in the service's
fdstore and handed back on restart (:meth:`MemoryBackend.adopt`). Sealing only changes
state: nothing held here crosses a kexec, and :attr:`survives_kexec` says so.

One open file description per entry: systemd's fd store keeps an open file once
(``service_add_fd_store`` drops an fd that ``same_fd`` finds there already), so the
same open file under two names would come back under one name only after a restart.
When a Put hands over an open file description held already (a dup of an fd put
before, the same fd put under a second name), the entry holds a new open of the same
file instead (``/proc/self/fd/N``, with the access mode and O_APPEND/O_NONBLOCK of the
one given): the same inode, the same pages, both names kept through a restart; only
the file offset is its own. A file that cannot be opened again that way (a
guest_memfd, a tap, a socket) is refused under a second name with ``AlreadyExists``
naming the entry that holds it.
"""

from __future__ import annotations

import fcntl
import os

from ..errors import FdboxError
from ..fdtypes import FdInfo, FdType, detect
from ..model import BoxState
from .base import Backend, BackendBox, BackendEntry


#: fcntl(2) F_DUPFD_QUERY (Linux 6.10): whether two fds are one open file description.
F_DUPFD_QUERY = 1027
_KCMP = {"x86_64": 312, "aarch64": 272}  # kcmp(2) syscall numbers, for older kernels
KCMP_FILE = 0


def same_open_file(a: int, b: int) -> bool:
    """Whether ``a`` and ``b`` are the same open file description: what systemd's
    ``same_fd()`` asks before it stores an fd (F_DUPFD_QUERY, else kcmp(KCMP_FILE);
    the same inode where neither can answer)."""
    if a == b:
        return True
    sa, sb = os.fstat(a), os.fstat(b)
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):
        return False
    try:
        return fcntl.fcntl(a, F_DUPFD_QUERY, b) == 1
    except OSError:
        pass
    nr = _KCMP.get(os.uname().machine)
    if nr is not None:
        import ctypes  # only on kernels before 6.10

        libc = ctypes.CDLL(None, use_errno=True)
        pid = os.getpid()
        r = libc.syscall(nr, pid, pid, KCMP_FILE, a, b)
        if r >= 0:
            return r == 0
    return True


def _reopen(fd: int, box: str, name: str, other: tuple[str, str]) -> int:
    """A new open file description of the file behind ``fd``, as ``fd`` may use it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK)
    try:
        new = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    except OSError as e:
        raise FdboxError("AlreadyExists", f"{box}/{name}: this open file is held already, as {other[0]}/{other[1]}, "
                         f"and cannot be opened again ({e.strerror}): systemd's fd store keeps an open file once, "
                         "so a second name would be lost at a restart", box=box, name=name) from None
    st, nst = os.fstat(fd), os.fstat(new)
    if (st.st_dev, st.st_ino) != (nst.st_dev, nst.st_ino):  # not the same file (a tun's fresh queue...)
        os.close(new)
        raise FdboxError("AlreadyExists", f"{box}/{name}: this open file is held already, as {other[0]}/{other[1]}, "
                         "and opening it again gives another file: systemd's fd store keeps an open file once, "
                         "so a second name would be lost at a restart", box=box, name=name)
    return new


class MemoryBackend(Backend):
    name = "memory"
    survives_kexec = False
    holds_in_process = True
    holds_every_type = True

    def __init__(self) -> None:
        self._boxes: dict[str, BackendBox] = {}
        self._fds: dict[tuple[str, str], int] = {}
        #: (st_dev, st_ino) -> the entries holding that file, to find the same open file
        #: held twice without a look at every held fd.
        self._by_inode: dict[tuple[int, int], set[tuple[str, str]]] = {}
        self._inode_of: dict[tuple[str, str], tuple[int, int]] = {}

    def _set_fd(self, key: tuple[str, str], fd: int) -> None:
        """Hold ``fd`` (ours from now on) for entry ``key``, closing what it held."""
        self._drop_fd(key)
        self._fds[key] = fd
        st = os.fstat(fd)
        self._by_inode.setdefault((st.st_dev, st.st_ino), set()).add(key)
        self._inode_of[key] = (st.st_dev, st.st_ino)

    def _drop_fd(self, key: tuple[str, str]) -> None:
        fd = self._fds.pop(key, None)
        if fd is None:
            return
        inode = self._inode_of.pop(key, None)
        keys = self._by_inode.get(inode) if inode is not None else None
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_inode[inode]  # type: ignore[arg-type]
        os.close(fd)

    def holder_of(self, fd: int) -> tuple[str, str] | None:
        """The entry holding the open file description of ``fd``, if any."""
        st = os.fstat(fd)
        for key in self._by_inode.get((st.st_dev, st.st_ino), ()):
            held = self._fds.get(key)
            if held is not None and same_open_file(held, fd):
                return key
        return None

    def accepts(self, fd_type: FdType) -> bool:
        return True

    def create_box(self, box: str) -> None:
        self._boxes.setdefault(box, BackendBox(box, BoxState.OPEN))

    def delete_box(self, box: str) -> None:
        b = self._boxes.pop(box, None)
        if b is None:
            return
        for name in b.entries:
            self._drop_fd((box, name))

    def put(self, box: str, name: str, fd: int, info: FdInfo, uid: int = 0, gid: int = 0) -> None:
        b = self._box(box)
        if name in b.entries:
            raise FdboxError("AlreadyExists", f"{box}/{name} exists", box=box, name=name)
        other = self.holder_of(fd)
        if other is None:
            held = os.dup(fd)  # Python's dup is non-inheritable: children never see it
        else:
            held = _reopen(fd, box, name, other)
        self._set_fd((box, name), held)
        b.entries[name] = BackendEntry(name, info.type, info.size, uid, gid)

    def adopt(self, box: str, name: str, fd: int) -> None:
        """Take ownership of ``fd`` (from the fdstore) as entry ``box/name``."""
        self.create_box(box)
        info = detect(fd)
        self._set_fd((box, name), fd)
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
        self._drop_fd((box, name))

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
        self._by_inode.clear()
        self._inode_of.clear()
        self._boxes.clear()

    def _box(self, box: str) -> BackendBox:
        try:
            return self._boxes[box]
        except KeyError:
            raise FdboxError("NotFound", f"no box {box}", box=box) from None
