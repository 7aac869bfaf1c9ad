"""Default locations, in one place for the daemon, fdboxctl and the client library.

System daemon (root): ``/run/fdbox/fdboxd.sock`` and ``/var/lib/fdbox``. Anyone else, or
``--user``: ``$XDG_RUNTIME_DIR/fdbox`` (else ``/tmp/fdbox-$UID``) and
``$XDG_STATE_HOME/fdbox`` (else ``~/.local/state/fdbox``). ``$FDBOX_SOCKET`` overrides
the socket for clients.

``/tmp`` is shared with every local user, so the user daemon's directory there is a
target: another user who creates ``/tmp/fdbox-$UID`` first, with a listener in it,
would receive the victim's memfds. :func:`ensure_private_dir` therefore creates it
0700 and refuses one that is not ours, is a symlink, or is open to others; and the
client checks the server's credentials before it sends an fd (:mod:`fdboxd.client`).
"""

from __future__ import annotations

import os
import stat

from .errors import FdboxError

SYSTEM_SOCKET = "/run/fdbox/fdboxd.sock"
SYSTEM_STATE_DIR = "/var/lib/fdbox"


def user_runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.access(base, os.W_OK):
        return os.path.join(base, "fdbox")
    return f"/tmp/fdbox-{os.getuid()}"


def user_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "fdbox")


def default_socket(user: bool | None = None) -> str:
    """The daemon's socket: system one for root (unless ``user``), the user one otherwise."""
    if user is None:
        user = os.geteuid() != 0
    return os.path.join(user_runtime_dir(), "fdboxd.sock") if user else SYSTEM_SOCKET


def default_state_dir(user: bool | None = None) -> str:
    if user is None:
        user = os.geteuid() != 0
    return user_state_dir() if user else SYSTEM_STATE_DIR


def client_socket() -> str:
    """Where a client looks: $FDBOX_SOCKET, the system socket if present, else the user one."""
    env = os.environ.get("FDBOX_SOCKET")
    if env:
        return env
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return default_socket(user=True)


def ensure_private_dir(path: str) -> None:
    """Create ``path`` 0700, or accept it only if it is a real directory of ours, 0700.

    Raises ``PermissionDenied`` naming the problem otherwise: the user daemon will not
    put its socket where another user could have put a listener first.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700"
    if problem is not None:
        raise FdboxError("PermissionDenied",
                         f"refusing to use {path} for the fdboxd socket: it {problem}. Remove it, or set "
                         "XDG_RUNTIME_DIR or --socket to a directory only you can write")
