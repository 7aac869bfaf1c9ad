"""Test helpers shared by every test directory: a real fdboxd process, memfds, patterns.

Fixtures that use these live in ``tests/conftest.py``; test modules import the helpers
directly (``from fdboxtest import memfd_with``): ``tests/`` is on ``sys.path``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fdboxd.client import Client  # noqa: E402

READY_TIMEOUT = float(os.environ.get("FDBOX_TEST_READY_TIMEOUT", "15"))
"""How long a test daemon may take to answer (more where a slow kernel runs it: the VM
tier's debug kernel sets ``FDBOX_TEST_READY_TIMEOUT``)."""


def build_libexec(name: str = "fdbox-call") -> Path:
    """A C helper of ``libexec/`` built with its Makefile (up to date: nothing to do)."""
    subprocess.run(["make", "-s", "-C", str(REPO / "libexec"), name], check=True)
    return REPO / "libexec" / name


class DaemonError(RuntimeError):
    pass


class DaemonProcess:
    """One fdboxd subprocess. ``restart()`` keeps the socket and state dir."""

    def __init__(
        self,
        runtime_dir: Path,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        state_dir: Path | None = None,
        socket_path: Path | None = None,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.socket = str(socket_path or runtime_dir / "fdboxd.sock")
        self.state_dir = str(state_dir or runtime_dir / "state")
        self.log_path = runtime_dir / "fdboxd.log"
        self.args = list(args)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon not running"
        return self.proc.pid

    def command(self) -> list[str]:
        # FDBOX_TEST_DAEMON_PYTHON: run the daemon with another interpreter (e.g. a venv
        # holding the oldest supported dbus-fast, see test_optional_deps.py).
        python = os.environ.get("FDBOX_TEST_DAEMON_PYTHON") or sys.executable
        return [python, "-m", "fdboxd", "--socket", self.socket,
                "--state-dir", self.state_dir, "--log-level", "debug", *self.args]

    def start(self) -> DaemonProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("NOTIFY_SOCKET", None)
        env.pop("LISTEN_FDS", None)
        env.update(self.env)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=env, cwd=str(REPO), close_fds=True)
        finally:
            log.close()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise DaemonError(f"fdboxd exited with {self.proc.returncode}:\n{self.log()}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.socket)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise DaemonError(f"fdboxd did not answer on {self.socket}:\n{self.log()}") from None
                time.sleep(0.02)
            finally:
                s.close()

    def stop(self, timeout: float = READY_TIMEOUT) -> int | None:
        """SIGTERM and wait (as long as a start may take: a slow kernel stops slowly too);
        returns the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> DaemonProcess:
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float | None = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def settled_fd_count(self) -> int:
        """The daemon's fd count once it has held steady for 0.5 s (a closing
        connection, a probe, a reply being written are not counted half-way)."""
        last, since = self.fd_count(), time.monotonic()
        while time.monotonic() - since < 0.5:
            time.sleep(0.05)
            now = self.fd_count()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def make_runtime_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="fdbox-test-", dir="/tmp"))
    d.chmod(0o755)
    return d


def memfd_with(data: bytes, name: str = "test", flags: int = os.MFD_CLOEXEC) -> int:
    """A memfd holding ``data`` (the caller closes it)."""
    fd = os.memfd_create(name, flags)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, position-dependent bytes (a shifted copy would not compare equal)."""
    block = bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


def sha256_of_fd(fd: int) -> str:
    import hashlib

    from fdboxd.client import read_all

    return hashlib.sha256(read_all(fd)).hexdigest()


def run_as_user(uid: int, fn, gid: int | None = None, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """Run ``fn()`` in a forked child that dropped to ``uid`` with ``os.setresuid``.

    Returns what ``fn`` returned (JSON-able), or ``{"error": NAME}`` if it raised an
    FdboxError. The child never returns into pytest: it ``_exit``s.
    """
    import json

    from fdboxd.errors import FdboxError

    gid = uid if gid is None else gid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                out = {"ok": fn()}
            except FdboxError as e:
                out = {"error": e.name, "message": e.message}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            try:
                os.write(w, json.dumps({"crash": repr(e)}).encode())
            finally:
                os._exit(1)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        if time.monotonic() > deadline:
            break
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"crash": "no output"}')
    if "crash" in result:
        raise AssertionError(f"child as uid {uid} crashed: {result['crash']}")
    return result


class RawConnection:
    """A Varlink connection that sends whatever bytes and fds a test wants."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        from fdboxd.varlink.protocol import Framer

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.framer = Framer()

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        import array

        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send_json(self, message: object, fds: Sequence[int] = ()) -> None:
        import json

        self.send(json.dumps(message).encode() + b"\0", fds)

    def recv(self):  # type: ignore[no-untyped-def]
        """The next reply message (a dict); its fds are closed."""
        return self.recv_counting_fds()[0]

    def recv_counting_fds(self):  # type: ignore[no-untyped-def]
        """The next reply message and how many fds came with it (closed here)."""
        from fdboxd.varlink.protocol import close_fds, recv_into

        while (frame := self.framer.take()) is None:
            if not recv_into(self.sock, self.framer):
                raise ConnectionError("daemon closed the connection")
        close_fds(frame.fds)
        assert frame.error is None, frame.error
        return frame.message, len(frame.fds)

    def close(self) -> None:
        self.framer.close()
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
