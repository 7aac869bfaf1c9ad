"""Default locations, in one place for the daemon, fdboxctl and the client library.

System daemon (root): ``/run/fdbox/fdboxd.sock`` and ``/var/lib/fdbox``. Anyone else, or
``--user``: ``$XDG_RUNTIME_DIR/fdbox`` (else ``/tmp/fdbox-$UID``) and
``$XDG_STATE_HOME/fdbox`` (else ``~/.local/state/fdbox``). ``$FDBOX_SOCKET`` overrides
the socket for clients.
"""

from __future__ import annotations

import os

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
