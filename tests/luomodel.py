"""A host-side model of ``/dev/liveupdate`` (Linux LUO), faithful to the uAPI.

Why: the liveupdate backend (fdboxd/backends/liveupdate.py) is ~700 lines of create,
preserve, hold, reclaim, retrieve and FINISH; on the host there is no LUO, so without a
model it runs only end to end under TCG, and never with a fault between two steps. The
model is "the kernel" of a small world: one process that outlives every daemon, so a
killed fdboxd, its holder and the next fdboxd meet the same sessions, as on a real host.

What it keeps from the kernel (kernel/liveupdate/luo_core.c, luo_session.c, luo_file.c,
mm/memfd_luo.c of the 7.2 reference tree), each errno as the kernel returns it:

- One opener: a second open while the device is open is ``EBUSY`` (luo_open's
  ``in_use``); the device is free again the moment its last fd is closed.
- Session names: 1..63 bytes before the NUL of the 64-byte field, else ``EINVAL``
  (luo_session_create); a name taken by an outgoing session is ``EEXIST``; an incoming
  one does not count.
- A session lives while any fd of it is open, in any process (it is a real fd here: one
  end of a socketpair, passed by SCM_RIGHTS like the kernel's file); when the last one
  closes, an outgoing session unpreserves its files and its name is free again
  (luo_session_release), a retrieved incoming one is finished and removed.
- PRESERVE_FD (outgoing only, else ``EINVAL``): ``EEXIST`` for a used token, ``EBADF``
  for a closed fd, ``ENOENT`` for a file no handler takes (only shmem with no links:
  a memfd, not hugetlb, not a pipe or regular file), ``EBUSY`` for a file (inode)
  already preserved or retrieved-and-not-finished anywhere, ``EOPNOTSUPP`` for unknown
  seals.
- RETRIEVE_SESSION (after a kexec): ``ENOENT`` for no such incoming session,
  ``EINVAL`` for a second retrieve. RETRIEVE_FD (incoming only, else ``EINVAL``):
  ``ENOENT`` for no such token (or after FINISH); a second retrieve hands back the
  same file. The file is a *new* memfd (empty name, ``MFD_ALLOW_SEALING``) with the
  preserved bytes, size, seals and position, as memfd_luo_retrieve makes it.
- FINISH (incoming only, else ``EINVAL``) releases every file of the session,
  retrieved or not; again is a no-op. GET_NAME works on both.
- The "kexec" (:meth:`ModelControl.kexec`): every outgoing session open at that moment
  crosses; incoming sessions of the last boot that nobody finished are dropped ("reset
  during the next live update cycle"); every process of the old world is killed.

What it does not model: the frozen size of a preserved memfd (the kernel's
shmem_freeze; a model cannot undo a seal, so the size stays changeable), holes filled at
preserve, other file handlers than memfd, KHO memory limits.

The world: the model process enters a network namespace of its own (when root), and
every process started with :func:`daemon_command` joins it. The holder's abstract reclaim
socket (``\\0fdboxd:luo-holder``) is then private to the world, so parallel tests never
reclaim each other's sessions, and the kexec kills exactly the world's processes.

How fdboxd reaches it: :func:`daemon_command` starts fdboxd through this file's
``daemon`` command, which binds :class:`ModelDevice` and :class:`ModelSession` in place of
:class:`fdboxd.uapi_luo.LuoDevice` and :class:`~fdboxd.uapi_luo.LuoSession` in that
process only, then runs :func:`fdboxd.daemon.main`. Production code has no branch for the
model and never imports this file (it is not installed); see docs/internals.md, "The
LUO model".

The wire: SOCK_SEQPACKET, one JSON datagram per request and reply (``{"errno": 0, ...}``),
fds by SCM_RIGHTS. The first datagram on a connection to the model's socket is
``{"op": "open"}`` (the device) or ``{"op": "control", ...}`` (the test's hand).
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fdboxd import uapi_luo  # noqa: E402
from fdboxd.ownedfd import OwnedFd  # noqa: E402

NAME_LENGTH = uapi_luo.LIVEUPDATE_SESSION_NAME_LENGTH
MAX_MSG = 65536
SOCKET_NAME = "liveupdate"
PID_NAME = "model.pid"
TMPFS_MAGIC = 0x01021994
F_GET_SEALS, F_ADD_SEALS = 1034, 1033
#: MEMFD_LUO_ALL_SEALS (include/linux/kho/abi/memfd.h): SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC.
ALL_SEALS = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20
CLONE_NEWNET = 0x40000000


# --------------------------------------------------------------------------- the wire


def _send(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([json.dumps(msg).encode()], anc)


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def _call(sock: socket.socket, op: str, msg: dict[str, Any],
          fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
    """One request, one reply; a model that is gone is ``EIO`` (a kernel never is)."""
    try:
        _send(sock, msg, fds)
        reply, got = _recv(sock)
    except OSError as e:
        if e.errno == errno.EBADF and fds:
            raise uapi_luo.LuoOSError(errno.EBADF, op) from None  # sendmsg refused a closed fd
        raise uapi_luo.LuoOSError(errno.EIO, op, f"the LUO model is gone ({e})", "BackendUnavailable") from None
    if reply is None:
        raise uapi_luo.LuoOSError(errno.EIO, op, "the LUO model is gone", "BackendUnavailable")
    err = int(reply.get("errno", 0))
    if err:
        for fd in got:
            os.close(fd)
        raise uapi_luo.LuoOSError(err, op)
    return reply, got


def _name_field(name: str | bytes) -> str:
    """The 64-byte name field as the ioctl struct carries it (latin-1 in JSON)."""
    raw = name.encode() if isinstance(name, str) else name
    return raw[:NAME_LENGTH].decode("latin-1")


# --------------------------------------------------------------------------- the client (the uAPI)


class ModelSession(OwnedFd):
    """A session fd of the model: :class:`fdboxd.uapi_luo.LuoSession`'s methods and errors."""

    def _do(self, op: str, msg: dict[str, Any], fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
        try:
            s = socket.socket(fileno=self.fd)  # borrowed (no dup: that would take a closed fd's number)
        except OSError:
            raise uapi_luo.LuoOSError(errno.ENOTTY, op) from None  # not a session: the ioctl is unknown
        try:
            return _call(s, op, msg, fds)
        finally:
            s.detach()

    def preserve_fd(self, fd: int, token: int) -> None:
        self._do("preserve_fd", {"op": "preserve_fd", "token": token}, [fd])

    def retrieve_fd(self, token: int) -> int:
        _reply, fds = self._do("retrieve_fd", {"op": "retrieve_fd", "token": token})
        return fds[0]

    def finish(self) -> None:
        self._do("finish", {"op": "finish", "reserved": 0})

    def get_name(self) -> str:
        reply, _ = self._do("get_name", {"op": "get_name", "reserved": 0})
        return str(reply["name"]).encode("latin-1").decode(errors="replace")

    def raw(self, op: str, **fields: Any) -> dict[str, Any]:
        """An ioctl with fields the typed methods never send (the contract tests' own)."""
        return self._do(op, {"op": op, **fields})[0]


class ModelDevice(OwnedFd):
    """An open model device: :class:`fdboxd.uapi_luo.LuoDevice`'s methods and errors.

    ``socket_path`` is the model's socket; :func:`bind` makes a subclass for one model.
    """

    close_on_gc = True
    socket_path = ""

    def __init__(self, path: str = uapi_luo.DEVICE_PATH) -> None:
        self.path = path
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.socket_path)
        except OSError:
            s.close()
            raise uapi_luo.LuoOSError(errno.ENOENT, "open", f"no {path} (kernel without LUO)",
                                      "BackendUnavailable") from None
        try:
            _call(s, "open", {"op": "open"})
        except BaseException:
            s.close()
            raise
        self.fd = s.detach()

    def _do(self, op: str, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        s = socket.socket(fileno=self.fd)
        try:
            return _call(s, op, msg)
        finally:
            s.detach()

    def create_session(self, name: str) -> ModelSession:
        return self.create_session_raw(uapi_luo.session_name(name))

    def retrieve_session(self, name: str) -> ModelSession:
        return self.retrieve_session_raw(uapi_luo.session_name(name))

    def create_session_raw(self, name: bytes) -> ModelSession:
        """CREATE_SESSION with the name field as given (no client-side check)."""
        _reply, fds = self._do("create_session", {"op": "create_session", "name": _name_field(name)})
        return ModelSession(fds[0])

    def retrieve_session_raw(self, name: bytes) -> ModelSession:
        _reply, fds = self._do("retrieve_session", {"op": "retrieve_session", "name": _name_field(name)})
        return ModelSession(fds[0])


def bind(socket_path: str | Path) -> type[ModelDevice]:
    """A :class:`ModelDevice` class that opens the model at ``socket_path``."""
    return type("BoundModelDevice", (ModelDevice,), {"socket_path": str(socket_path)})


def install(socket_path: str | Path) -> None:
    """Put the model in place of the uAPI classes, in this process only (the seam)."""
    uapi_luo.LuoDevice = bind(socket_path)  # type: ignore[misc]
    uapi_luo.LuoSession = ModelSession  # type: ignore[misc]


# --------------------------------------------------------------------------- the test's hand


def spawn_server(script: str | Path, directory: Path, what: str) -> subprocess.Popen[bytes]:
    """``python3 SCRIPT serve DIR`` (a model's server: this one, or tests/kmodmodel.py's),
    returned once it printed ``ready``; its stderr goes to ``DIR/model.log``."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "model.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "serve", str(directory)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, close_fds=True)
    assert proc.stdout is not None
    with proc.stdout:
        line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not start: {(directory / 'model.log').read_text()}")
    return proc


def end_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a model's server, SIGKILL after 10 s; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ModelControl:
    """The test's view of a running model: state, kexec, stop."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.socket_path = str(self.dir / SOCKET_NAME)

    def call(self, what: str, **kw: Any) -> dict[str, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.socket_path)
            s.settimeout(60)
            reply, fds = _call(s, f"control {what}", {"op": "control", "what": what, **kw})
            for fd in fds:
                os.close(fd)
            return reply
        finally:
            s.close()

    def state(self) -> dict[str, Any]:
        """``outgoing``/``incoming`` sessions (name, tokens, holders' pids, retrieved,
        finished), ``device_open``, ``kexecs``."""
        return self.call("state")

    def kexec(self) -> dict[str, Any]:
        """Carry every open outgoing session, drop the rest, kill the world's processes."""
        return self.call("kexec")

    def corrupt(self, session: str, token: int) -> None:
        """Flip the first byte of a carried file (after :meth:`kexec`, before it is retrieved)."""
        self.call("corrupt", session=session, token=token)

    def device_class(self) -> type[ModelDevice]:
        return bind(self.socket_path)


class ModelProcess(ModelControl):
    """A model server started by a test (``with ModelProcess(dir) as model: ...``)."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__(directory)
        self.proc = spawn_server(__file__, self.dir, "LUO model")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("kill_world")
            except OSError:
                pass
        end_server(self.proc)

    def __enter__(self) -> ModelProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def daemon_command(model_dir: str | Path, fdboxd_args: list[str]) -> list[str]:
    """argv of an fdboxd that runs in the model's world, on the model's LUO."""
    return [sys.executable, str(Path(__file__).resolve()), "daemon", str(model_dir), "--", *fdboxd_args]


# --------------------------------------------------------------------------- the model (the kernel)


@dataclass
class _File:
    token: int
    fd: int  # outgoing: our reference to the preserved file; incoming: the file retrieve hands out
    key: tuple[int, int]
    retrieved: bool = False


@dataclass
class _Session:
    name: str
    incoming: bool
    files: dict[int, _File] = field(default_factory=dict)
    sock: socket.socket | None = None  # our end; the client's end is the session fd
    client_ino: int = 0
    retrieved: bool = False
    finished: bool = False


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)


def _fs_type(fd: int) -> int:
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        raise OSError(ctypes.get_errno(), "fstatfs")
    return int(buf.f_type) & 0xFFFFFFFF


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _netns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


class Model:
    """The kernel's side: sessions, files, the one device opener, the kexec."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        path = directory / SOCKET_NAME
        path.unlink(missing_ok=True)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.device: socket.socket | None = None  # the open device (in_use)
        self.controls: list[socket.socket] = []
        self.pending: list[socket.socket] = []  # connected, first datagram not read yet
        self.outgoing: dict[str, _Session] = {}
        self.incoming: dict[str, _Session] = {}
        self.preserved: dict[tuple[int, int], str] = {}  # luo_preserved_files: inode -> session
        self.kexecs = 0
        self.own_netns = False

    # ---------------------------------------------------------------- plumbing

    def sockets(self) -> list[socket.socket]:
        s = [self.listener, *self.pending, *self.controls]
        if self.device is not None:
            s.append(self.device)
        s += [x.sock for x in (*self.outgoing.values(), *self.incoming.values()) if x.sock is not None]
        return s

    def serve(self) -> None:
        while True:
            ready, _, _ = select.select(self.sockets(), [], [])
            for s in ready:
                if s.fileno() >= 0 and s in self.sockets():
                    self.event(s)

    def reap(self, current: socket.socket | None = None) -> None:
        """Release what has no fd left anywhere: the kernel does it in close(), so a
        request sent after a close must find it done. A hung-up socket's last requests
        are answered first (into the void), as the kernel ran them before the close."""
        for s in list(self.sockets()):
            if s is self.listener or s is current:
                continue
            p = select.poll()
            p.register(s, select.POLLIN)
            hup = any(ev & select.POLLHUP for _fd, ev in p.poll(0))
            while hup and s in self.sockets():
                self.event(s)

    def event(self, s: socket.socket) -> None:
        if s is self.listener:
            conn, _ = self.listener.accept()
            conn.setblocking(False)
            self.pending.append(conn)
            return
        try:
            msg, fds = _recv(s)
        except BlockingIOError:
            return
        except OSError:
            msg, fds = None, []
        if msg is None:
            self.hangup(s)
            return
        if s in self.pending:
            self.pending.remove(s)
            if msg.get("op") == "control":
                self.controls.append(s)
                self.reply(s, self.control(msg))
                return
            self.reap(s)
            if self.device is not None:
                self.reply(s, {"errno": errno.EBUSY})
                s.close()
                return
            self.device = s
            self.reply(s, {"errno": 0})
            return
        if s in self.controls:
            self.reply(s, self.control(msg))
            return
        self.reap(s)
        if s is self.device:
            self.close_all(fds)
            reply, out = self.device_ioctl(msg)
            self.reply(s, reply, out)
            self.close_all(out)  # the new session's fd is the client's now (or nobody's)
            return
        session = self.session_of(s)
        if session is None:
            self.close_all(fds)
            return
        reply, out = self.session_ioctl(session, msg, fds)  # takes fds; out stays ours
        self.reply(s, reply, out)

    def reply(self, s: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            _send(s, msg, fds)
        except OSError:
            pass  # the asker is gone; what was done is done, as in the kernel

    def session_of(self, s: socket.socket) -> _Session | None:
        for x in (*self.outgoing.values(), *self.incoming.values()):
            if x.sock is s:
                return x
        return None

    def hangup(self, s: socket.socket) -> None:
        """The last fd of the client's end is closed (luo_release / luo_session_release)."""
        if s in self.pending:
            self.pending.remove(s)
        elif s in self.controls:
            self.controls.remove(s)
        elif s is self.device:
            self.device = None
        else:
            session = self.session_of(s)
            if session is not None:
                if session.incoming:
                    self.finish(session)
                    del self.incoming[session.name]
                else:
                    self.unpreserve(session)
                    del self.outgoing[session.name]
        s.close()

    def new_session_fd(self, session: _Session) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        ours.setblocking(False)
        session.sock = ours
        session.client_ino = os.fstat(theirs.fileno()).st_ino
        return theirs.detach()

    # ---------------------------------------------------------------- /dev/liveupdate

    def device_ioctl(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op = msg.get("op")
        if op not in ("create_session", "retrieve_session"):
            return {"errno": errno.EINVAL}, []
        raw = str(msg.get("name", "")).encode("latin-1")[:NAME_LENGTH]
        name_b = raw.split(b"\0", 1)[0]
        if op == "create_session":
            if not name_b or len(name_b) > NAME_LENGTH - 1:  # strnlen(name, 64): 1..63
                return {"errno": errno.EINVAL}, []
            name = name_b.decode("latin-1")
            if name in self.outgoing:
                return {"errno": errno.EEXIST}, []
            session = _Session(name, incoming=False)
            fd = self.new_session_fd(session)
            self.outgoing[name] = session
            return {"errno": 0}, [fd]
        name = name_b.decode("latin-1")
        session = self.incoming.get(name)
        if session is None:
            return {"errno": errno.ENOENT}, []
        if session.retrieved:
            return {"errno": errno.EINVAL}, []
        fd = self.new_session_fd(session)
        session.retrieved = True
        return {"errno": 0}, [fd]

    # ---------------------------------------------------------------- session fds

    def session_ioctl(self, session: _Session, msg: dict[str, Any],
                      fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        op = msg.get("op")
        kinds = {"preserve_fd": False, "retrieve_fd": True, "finish": True, "get_name": None}
        if op not in kinds:
            self.close_all(fds)
            return {"errno": errno.EINVAL}, []
        want_incoming = kinds[op]
        if want_incoming is not None and want_incoming != session.incoming:  # luo_ioctl_type_valid
            self.close_all(fds)
            return {"errno": errno.EINVAL}, []
        if op in ("finish", "get_name") and msg.get("reserved", 0):
            return {"errno": errno.EINVAL}, []
        if op == "get_name":
            return {"errno": 0, "name": session.name}, []
        if op == "finish":
            self.finish(session)
            return {"errno": 0}, []
        token = int(msg.get("token", 0))
        if op == "preserve_fd":
            return {"errno": self.preserve(session, token, fds)}, []
        f = session.files.get(token)
        if f is None:
            return {"errno": errno.ENOENT}, []
        if not f.retrieved:
            f.retrieved = True
            self.preserved[f.key] = session.name  # kept in LUO until finish
        return {"errno": 0}, [f.fd]  # the same file again on a second retrieve

    def preserve(self, session: _Session, token: int, fds: list[int]) -> int:
        """luo_preserve_file + memfd_luo_can_preserve/preserve: 0 or the errno."""
        if len(fds) != 1:
            self.close_all(fds)
            return errno.EBADF
        fd = fds[0]
        if token in session.files:
            os.close(fd)
            return errno.EEXIST
        try:
            if _fs_type(fd) != TMPFS_MAGIC or os.fstat(fd).st_nlink != 0:
                os.close(fd)
                return errno.ENOENT  # no handler takes it (hugetlb, pipe, a linked file)
            key = _key(fd)
            if key in self.preserved:
                os.close(fd)
                return errno.EBUSY
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError as e:
            os.close(fd)
            return e.errno or errno.EIO
        if seals & ~ALL_SEALS:
            os.close(fd)
            return errno.EOPNOTSUPP
        session.files[token] = _File(token, fd, key)
        self.preserved[key] = session.name
        return 0

    def unpreserve(self, session: _Session) -> None:
        for f in session.files.values():
            self.preserved.pop(f.key, None)
            os.close(f.fd)
        session.files.clear()

    def finish(self, session: _Session) -> None:
        """luo_file_finish: every file, retrieved or not, leaves LUO."""
        for f in session.files.values():
            if f.retrieved:
                self.preserved.pop(f.key, None)
            os.close(f.fd)
        session.files.clear()
        session.finished = True

    @staticmethod
    def close_all(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    # ---------------------------------------------------------------- the test's hand

    def control(self, msg: dict[str, Any]) -> dict[str, Any]:
        what = msg.get("what")
        self.reap()
        if what == "state":
            return {"errno": 0, **self.state()}
        if what == "kexec":
            self.kexec()
            return {"errno": 0, **self.state()}
        if what == "kill_world":
            self.kill_world()
            return {"errno": 0}
        if what == "corrupt":  # one byte changed in flight (a test's fault, not a kernel's)
            session = self.incoming.get(str(msg.get("session")))
            f = session.files.get(int(msg.get("token", 0))) if session is not None else None
            if f is None:
                return {"errno": errno.ENOENT}
            old = os.pread(f.fd, 1, 0)
            os.pwrite(f.fd, bytes([(old[0] if old else 0) ^ 0xFF]), 0)
            return {"errno": 0}
        return {"errno": errno.EINVAL}

    def holders(self, ino: int) -> list[int]:
        want = f"socket:[{ino}]"
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                        out.append(int(pid))
                        break
            except OSError:
                continue
        return out

    def state(self) -> dict[str, Any]:
        def one(s: _Session) -> dict[str, Any]:
            return {"name": s.name, "tokens": sorted(s.files), "retrieved": s.retrieved,
                    "finished": s.finished, "holders": self.holders(s.client_ino) if s.sock is not None else []}

        return {"outgoing": [one(s) for s in self.outgoing.values()],
                "incoming": [one(s) for s in self.incoming.values()],
                "device_open": self.device is not None, "kexecs": self.kexecs}

    def kexec(self) -> None:
        """luo_session_serialize in the old kernel, deserialize in the new one."""
        carried: dict[str, _Session] = {}
        for name, s in self.outgoing.items():
            nxt = _Session(name, incoming=True)
            for token, f in s.files.items():
                new = self.carry(f.fd)
                nxt.files[token] = _File(token, new, _key(new))
            carried[name] = nxt
        for s in self.outgoing.values():
            self.unpreserve(s)
        for s in self.incoming.values():
            self.finish(s)  # never finished in the last boot: reset now
        for s in [*self.outgoing.values(), *self.incoming.values()]:
            if s.sock is not None:
                s.sock.close()
        for s in [*self.pending, *([self.device] if self.device is not None else [])]:
            s.close()
        self.pending, self.device = [], None
        self.preserved.clear()
        self.outgoing, self.incoming = {}, carried
        self.kexecs += 1
        self.kill_world()

    @staticmethod
    def carry(old: int) -> int:
        """The file memfd_luo_retrieve makes: a new memfd, same bytes, size, seals, pos."""
        size = os.fstat(old).st_size
        new = os.memfd_create("", os.MFD_ALLOW_SEALING)
        off = 0
        while off < size:
            chunk = os.pread(old, min(1 << 20, size - off), off)
            if not chunk:
                break
            os.pwrite(new, chunk, off)
            off += len(chunk)
        os.ftruncate(new, size)
        os.lseek(new, os.lseek(old, 0, os.SEEK_CUR), os.SEEK_SET)
        seals = fcntl.fcntl(old, F_GET_SEALS)
        if seals:
            fcntl.fcntl(new, F_ADD_SEALS, seals)
        return new

    def kill_world(self) -> None:
        """SIGKILL every other process of our network namespace (the old kernel's
        userspace), and wait until none holds a file any more."""
        if not self.own_netns:
            return
        mine = _netns(os.getpid())
        victims = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            try:
                if _netns(pid) == mine:
                    os.kill(int(pid), signal.SIGKILL)
                    victims.append(pid)
            except OSError:
                continue
        deadline = time.monotonic() + 10
        for pid in victims:
            while time.monotonic() < deadline:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                            break
                except OSError:
                    break
                time.sleep(0.01)


def _serve(directory: str) -> int:
    d = Path(directory)
    model = Model(d)
    if os.geteuid() == 0 and _libc.unshare(CLONE_NEWNET) == 0:
        model.own_netns = True
    (d / PID_NAME).write_text(f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    sys.stdout.close()
    model.serve()
    return 0


def _daemon(directory: str, argv: list[str]) -> int:
    """fdboxd in the model's world: join its network namespace, bind the model, run."""
    d = Path(directory)
    pid = int((d / PID_NAME).read_text())
    if os.geteuid() == 0 and _netns(pid) != _netns(os.getpid()):
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
    install(d / SOCKET_NAME)
    from fdboxd import daemon

    return daemon.main(argv)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        return _serve(argv[1])
    if len(argv) >= 3 and argv[0] == "daemon" and argv[2] == "--":
        return _daemon(argv[1], argv[3:])
    print("usage: luomodel.py serve DIR | daemon DIR -- FDBOXD-ARGS...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
