"""A host-side model of ``/dev/fdbox`` (fdbox.ko), at the ioctls' level, for the crash matrix.

Why: ``--backend kernel`` keeps its entries in the kernel, so they outlive the daemon; its
unhappy paths (a daemon killed between two ioctls, a start that fails after a kexec) are
about what the *kernel* still holds when the next daemon starts. On the host there is no
fdbox.ko; tests/standin_kernel.py replaces the whole backend (KernelBackend and uapi.py do
not run, open boxes die with the daemon). This model replaces only
:class:`fdboxd.uapi.FdboxDevice`: the daemon runs the real KernelBackend against one model
process that outlives every daemon, as the module outlives fdboxd.

What it keeps from kmod/fdbox_main.c (each errno as the ioctl returns it):

- CREATE_BOX: ``EEXIST`` for a name taken. DELETE_BOX: ``ENOENT``; ``EBUSY`` while sealed;
  releases every entry (and a restored box's pending ones).
- PUT_FD: the model holds its own reference (the fd passed by SCM_RIGHTS), memfds and
  hugetlb memfds only (``EOPNOTSUPP`` else); ``ENOENT`` no box; ``EBUSY`` unless open;
  ``EEXIST`` for a name taken.
- GET_FD: ``ENOENT``; ``ENODATA`` for a restored entry not yet filled (RESTORE_FD).
  REMOVE_ENTRY: ``ENOENT``; ``EBUSY`` while sealed.
- SEAL: ``EBUSY`` unless open. UNSEAL: ``EBADFD`` unless sealed. FINISH: ``EBADFD``
  unless restored; releases the entries never filled; the box is open.
- RESTORE_FD: ``ENOENT``; ``EBADFD`` unless the box is restored and the entry pending;
  copies the preserved bytes into the caller's sized memfd, applies the seals the entry
  had at the kexec, and the entry holds that file from then on.
- LIST_BOXES / LIST_ENTRIES (``ENOENT`` for no box), in creation order; sizes live
  while open, as preserved while restored and pending.
- The kexec (:meth:`ModelControl.kexec`): every sealed box crosses, restored and pending,
  its entries' bytes and seals as they are at that moment; open and restored boxes do not.

What it does not model: KHO's folio pinning and the frozen size of a sealed memfd, the
handover versions (RELEASE_HANDOVER, RESCAN), LUO beside it (no FEATURE_SHMEM_LUO: a
plain memfd is sealed here), limits (ENOSPC), the per-entry owner checks of /dev/fdbox's
mode (the daemon is root).
"""

from __future__ import annotations

import errno
import fcntl
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from luomodel import _recv, _send, end_server, spawn_server  # noqa: E402  the same wire and server process

from fdboxd import uapi  # noqa: E402
from fdboxd.fdtypes import FdType, detect  # noqa: E402

SOCKET_NAME = "fdbox"
F_GET_SEALS, F_ADD_SEALS = 1034, 1033
_TYPES = {FdType.MEMFD: uapi.EntryType.MEMFD, FdType.MEMFD_HUGETLB: uapi.EntryType.MEMFD_HUGETLB}


# --------------------------------------------------------------------------- the daemon's side


def _call(sock: socket.socket, op: str, msg: dict[str, Any],
          fds: list[int] | None = None) -> tuple[dict[str, Any], list[int]]:
    """One ioctl: a request, a reply; an errno as :class:`fdboxd.uapi.FdboxOSError`."""
    try:
        _send(sock, {"op": op, **msg}, fds or [])
        reply, got = _recv(sock)
    except OSError as e:
        raise uapi.FdboxOSError(errno.EIO, op) from e
    if reply is None:
        raise uapi.FdboxOSError(errno.EIO, op)
    err = int(reply.get("errno", 0))
    if err:
        for fd in got:
            os.close(fd)
        raise uapi.FdboxOSError(err, op)
    return reply, got


class ModelFdboxDevice:
    """:class:`fdboxd.uapi.FdboxDevice`'s methods, answered by the model (``socket_path``):
    one connection is one open of the device."""

    socket_path = ""

    def __init__(self, path: str = "/dev/fdbox") -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(self.socket_path)
        except OSError:
            self._sock.close()
            raise

    @property
    def fd(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ModelFdboxDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _do(self, op: str, fds: list[int] | None = None, **msg: Any) -> tuple[dict[str, Any], list[int]]:
        return _call(self._sock, op, msg, fds)

    def version(self) -> uapi.Version:
        r, _ = self._do("version")
        v = uapi.Version()
        v.api_version = r["api_version"]
        v.features = r["features"]
        return v

    def stats(self) -> uapi.Stats:
        return uapi.Stats()

    def create_box(self, box: str) -> None:
        self._do("create_box", box=box)

    def delete_box(self, box: str) -> None:
        self._do("delete_box", box=box)

    def seal(self, box: str) -> None:
        self._do("seal", box=box)

    def unseal(self, box: str) -> None:
        self._do("unseal", box=box)

    def finish(self, box: str) -> None:
        self._do("finish", box=box)

    def put_fd(self, box: str, name: str, fd: int, uid: int = 0, gid: int = 0) -> None:
        self._do("put_fd", [fd], box=box, name=name, uid=uid, gid=gid)

    def get_fd(self, box: str, name: str) -> int:
        _, fds = self._do("get_fd", box=box, name=name)
        return fds[0]

    def remove_entry(self, box: str, name: str) -> None:
        self._do("remove_entry", box=box, name=name)

    def restore_fd(self, box: str, name: str, fd: int) -> None:
        self._do("restore_fd", [fd], box=box, name=name)

    def list_boxes(self) -> list[uapi.BoxListing]:
        r, _ = self._do("list_boxes")
        return [uapi.BoxListing(b["name"], uapi.BoxState(b["state"]), b["nr_entries"], b["total_size"])
                for b in r["boxes"]]

    def list_entries(self, box: str) -> list[uapi.EntryListing]:
        r, _ = self._do("list_entries", box=box)
        return [uapi.EntryListing(e["name"], uapi.EntryType(e["type"]), e["flags"], e["size"], e["seals"],
                                  e["uid"], e["gid"], e["ctime"], e["page_size"]) for e in r["entries"]]


def install(socket_path: str | Path) -> None:
    """In this process, every :class:`fdboxd.uapi.FdboxDevice` is the model at ``socket_path``."""
    ModelFdboxDevice.socket_path = str(socket_path)
    uapi.FdboxDevice = ModelFdboxDevice  # type: ignore[misc]


def daemon_command(model_dir: str | Path, fdboxd_args: list[str]) -> list[str]:
    """argv of an fdboxd on the model's /dev/fdbox (``--backend kernel`` is the caller's)."""
    return [sys.executable, str(Path(__file__).resolve()), "daemon", str(model_dir), "--", *fdboxd_args]


# --------------------------------------------------------------------------- the test's side


class ModelProcess:
    """The model server, started by a test; it outlives every daemon it serves."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.socket_path = str(self.dir / SOCKET_NAME)
        self.proc = spawn_server(__file__, self.dir, "fdbox.ko model")

    def call(self, what: str, **kw: Any) -> dict[str, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.socket_path)
            s.settimeout(60)
            reply, fds = _call(s, "control", {"what": what, **kw})
            for fd in fds:
                os.close(fd)
            return reply
        finally:
            s.close()

    def state(self) -> dict[str, Any]:
        """``boxes``: name → ``{"state": "open"|"sealed"|"restored", "entries": [names]}``."""
        return self.call("state")

    def kexec(self) -> None:
        self.call("kexec")

    def corrupt(self, box: str, index: int) -> None:
        """Flip the first byte of a restored box's ``index``-th entry by name (1-based), pending."""
        self.call("corrupt", box=box, index=index)

    def stop(self) -> None:
        end_server(self.proc)


# --------------------------------------------------------------------------- the model (the kernel)


@dataclass
class _Entry:
    name: str
    type: uapi.EntryType
    uid: int
    gid: int
    page_size: int
    ctime: int
    file: int | None = None  # the module's reference
    kho: bytes | None = None  # preserved bytes of a restored, pending entry
    size: int = 0  # as sealed / preserved
    seals: int = 0


@dataclass
class _Box:
    name: str
    state: uapi.BoxState = uapi.BoxState.OPEN
    entries: dict[str, _Entry] = field(default_factory=dict)


def _size(e: _Entry) -> int:
    return os.fstat(e.file).st_size if e.file is not None and e.kho is None else e.size


class Model:
    def __init__(self, directory: Path) -> None:
        self.boxes: dict[str, _Box] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        path = directory / SOCKET_NAME
        path.unlink(missing_ok=True)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)

    def serve(self) -> None:
        while True:
            for key, _ in self.sel.select():
                s = key.fileobj
                if s is self.listener:
                    conn, _ = self.listener.accept()
                    self.sel.register(conn, selectors.EVENT_READ)
                    continue
                assert isinstance(s, socket.socket)
                try:
                    msg, fds = _recv(s)
                except OSError:
                    msg, fds = None, []
                if msg is None:
                    self.sel.unregister(s)
                    s.close()
                    continue
                try:
                    reply, out = self.handle(msg, fds)
                except OSError as e:
                    reply, out = {"errno": e.errno or errno.EIO}, []
                finally:
                    for fd in fds:  # what the ioctl took is dup'ed by handle()
                        os.close(fd)
                try:
                    _send(s, {"errno": 0, **reply}, out)
                except OSError:
                    pass
                for fd in out:
                    os.close(fd)

    def box(self, name: str) -> _Box:
        b = self.boxes.get(name)
        if b is None:
            raise OSError(errno.ENOENT, name)
        return b

    def entry(self, b: _Box, name: str) -> _Entry:
        e = b.entries.get(name)
        if e is None:
            raise OSError(errno.ENOENT, name)
        return e

    @staticmethod
    def drop(e: _Entry) -> None:
        if e.file is not None:
            os.close(e.file)
            e.file = None

    def handle(self, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        op = msg["op"]
        if op == "control":
            return getattr(self, f"control_{msg['what']}")(msg), []
        if op == "version":
            return {"api_version": uapi.FDBOX_API_VERSION, "features": uapi.FDBOX_FEATURE_KHO_ON}, []
        if op == "create_box":
            if msg["box"] in self.boxes:
                raise OSError(errno.EEXIST, "create_box")
            self.boxes[msg["box"]] = _Box(msg["box"])
            return {}, []
        if op == "list_boxes":
            return {"boxes": [{"name": b.name, "state": int(b.state), "nr_entries": len(b.entries),
                               "total_size": sum(_size(e) for e in b.entries.values())}
                              for b in self.boxes.values()]}, []
        b = self.box(msg["box"])
        if op == "delete_box":
            if b.state == uapi.BoxState.SEALED:
                raise OSError(errno.EBUSY, op)
            for e in b.entries.values():
                self.drop(e)
            del self.boxes[b.name]
            return {}, []
        if op == "put_fd":
            t = _TYPES.get(detect(fds[0]).type)
            if t is None:
                raise OSError(errno.EOPNOTSUPP, op)
            if b.state != uapi.BoxState.OPEN:
                raise OSError(errno.EBUSY, op)
            if msg["name"] in b.entries:
                raise OSError(errno.EEXIST, op)
            page = os.fstatvfs(fds[0]).f_bsize if t == uapi.EntryType.MEMFD_HUGETLB else os.sysconf("SC_PAGE_SIZE")
            b.entries[msg["name"]] = _Entry(msg["name"], t, msg["uid"], msg["gid"], page, int(time.time()),
                                            file=os.dup(fds[0]))
            return {}, []
        if op == "get_fd":
            e = self.entry(b, msg["name"])
            if e.file is None:
                raise OSError(errno.ENODATA, op)
            return {}, [os.dup(e.file)]
        if op == "remove_entry":
            e = self.entry(b, msg["name"])
            if b.state == uapi.BoxState.SEALED:
                raise OSError(errno.EBUSY, op)
            self.drop(e)
            del b.entries[e.name]
            return {}, []
        if op == "seal":
            if b.state != uapi.BoxState.OPEN:
                raise OSError(errno.EBUSY, op)
            b.state = uapi.BoxState.SEALED
            return {}, []
        if op == "unseal":
            if b.state != uapi.BoxState.SEALED:
                raise OSError(errno.EBADFD, op)
            b.state = uapi.BoxState.OPEN
            return {}, []
        if op == "finish":
            if b.state != uapi.BoxState.RESTORED:
                raise OSError(errno.EBADFD, op)
            for name in [n for n, e in b.entries.items() if e.file is None]:
                del b.entries[name]
            b.state = uapi.BoxState.OPEN
            return {}, []
        if op == "restore_fd":
            e = self.entry(b, msg["name"])
            if b.state != uapi.BoxState.RESTORED or e.file is not None or e.kho is None:
                raise OSError(errno.EBADFD, op)
            target = os.dup(fds[0])
            try:
                os.pwrite(target, e.kho, 0)
                if e.seals:
                    fcntl.fcntl(target, F_ADD_SEALS, e.seals)
            except OSError:
                os.close(target)
                raise
            e.file, e.kho = target, None
            return {}, []
        if op == "list_entries":
            return {"entries": [{"name": e.name, "type": int(e.type), "size": _size(e), "seals": e.seals,
                                 "flags": uapi.FDBOX_ENTRY_RESTORE_PENDING if e.kho is not None else 0,
                                 "uid": e.uid, "gid": e.gid, "ctime": e.ctime, "page_size": e.page_size}
                                for e in b.entries.values()]}, []
        raise OSError(errno.ENOTTY, op)

    # ---------------------------------------------------------------- the test's hand

    def control_state(self, msg: dict[str, Any]) -> dict[str, Any]:
        names = {uapi.BoxState.OPEN: "open", uapi.BoxState.SEALED: "sealed", uapi.BoxState.RESTORED: "restored"}
        return {"boxes": {b.name: {"state": names[b.state], "entries": sorted(b.entries)}
                          for b in self.boxes.values()}}

    def control_kexec(self, msg: dict[str, Any]) -> dict[str, Any]:
        crossed: dict[str, _Box] = {}
        for b in self.boxes.values():
            if b.state == uapi.BoxState.SEALED:
                nb = crossed[b.name] = _Box(b.name, uapi.BoxState.RESTORED)
                for e in b.entries.values():
                    assert e.file is not None
                    size = os.fstat(e.file).st_size
                    nb.entries[e.name] = _Entry(e.name, e.type, e.uid, e.gid, e.page_size, e.ctime, None,
                                                os.pread(e.file, size, 0) if size else b"", size,
                                                fcntl.fcntl(e.file, F_GET_SEALS))
            for e in b.entries.values():
                self.drop(e)
        self.boxes = crossed
        return {}

    def control_corrupt(self, msg: dict[str, Any]) -> dict[str, Any]:
        b = self.box(msg["box"])
        e = b.entries[sorted(b.entries)[int(msg["index"]) - 1]]
        assert e.kho
        e.kho = bytes([e.kho[0] ^ 0xFF]) + e.kho[1:]
        return {}


def _serve(directory: str) -> int:
    model = Model(Path(directory))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    sys.stdout.close()
    model.serve()
    return 0


def _daemon(directory: str, argv: list[str]) -> int:
    install(Path(directory) / SOCKET_NAME)
    from fdboxd import daemon

    return daemon.main(argv)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        return _serve(argv[1])
    if len(argv) >= 3 and argv[0] == "daemon" and argv[2] == "--":
        return _daemon(argv[1], argv[3:])
    print("usage: kmodmodel.py serve DIR | daemon DIR -- FDBOXD-ARGS...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
