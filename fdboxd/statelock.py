"""One daemon per state directory: a lock held for the daemon's whole life.

Two fdboxd on one state directory would each reconcile the manifest against their own
backend and rewrite it: the second one, finding nothing held, would record every entry
of the first as lost, empty its journal (the running daemon's journal fd then on a
deleted file) and only then find the socket taken. So before anything is read — the
manifest, LUO sessions from the fd store or the holder — the daemon takes an exclusive
``flock`` on ``<state-dir>/fdboxd.lock`` and keeps it until it exits (the kernel drops
it with the process, however it ends). A second daemon refuses at once, naming the
first, and changes nothing.

The lock is a file of its own: the manifest's ``_DirLock`` already flocks the directory
itself around each snapshot write, so the directory cannot also be the lifetime lock.
"""

from __future__ import annotations

import errno
import fcntl
import os

from .errors import FdboxError

LOCK_FILE = "fdboxd.lock"


class StateLock:
    """The exclusive lifetime lock on a state directory (see the module docstring)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: str) -> StateLock:
        """Take the lock, or raise ``AlreadyExists`` naming the daemon that holds it.

        Creates the state directory (0700) and the lock file if missing; the file holds
        the holder's pid, for the message of the next one that tries.
        """
        path = os.path.join(state_dir, LOCK_FILE)
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise FdboxError("PermissionDenied" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                             else "BackendUnavailable",
                             f"cannot open the state directory's lock {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {holder}" if holder else "another process"
                raise FdboxError("AlreadyExists",
                                 f"another fdboxd ({who}) is running on the state directory {state_dir} "
                                 f"(it holds {path}): not starting, nothing changed") from None
            raise FdboxError("BackendUnavailable", f"cannot lock {path}: {e.strerror}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # only the next one's message needs it
        return cls(fd, path)

    def release(self) -> None:
        """Drop the lock (at exit; the kernel drops it with the process anyway)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
