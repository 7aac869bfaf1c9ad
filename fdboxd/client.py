"""The fdbox client library: talk to fdboxd over its Varlink socket, fds included.

Blocking and dependency-free, so a VMM can use it from any thread::

    from fdboxd.client import Client

    with Client() as c:                      # $FDBOX_SOCKET, /run/fdbox/fdboxd.sock, or the user socket
        c.put("vm1", "ram0", memfd)          # fdbox keeps its own reference; close yours when you like
        entry, fd = c.get("vm1", "ram0")     # a new fd, yours to close

Errors are :class:`fdboxd.errors.FdboxError` with the name the daemon sent
(``NotFound``, ``PermissionDenied``, …). Protocol-level failures the daemon reports
with another Varlink error name raise :class:`VarlinkCallError`.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

from . import paths
from .errors import ERROR_NAMES, FdboxError
from .varlink.protocol import MAX_REPLY_SIZE, Framer, close_fds, recv_into, send_message
from .varlink import INTERFACE

Entry = dict[str, Any]


class VarlinkCallError(Exception):
    def __init__(self, error: str, params: dict[str, Any]) -> None:
        super().__init__(f"{error}: {params}")
        self.error = error
        self.params = params


class ConnectionClosed(OSError):
    pass


class Client:
    def __init__(self, socket_path: str | None = None, timeout: float | None = 60.0) -> None:
        self.path = socket_path or paths.client_socket()
        self.timeout = timeout
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise FdboxError("BackendUnavailable", f"cannot connect to fdboxd at {self.path}: {e.strerror}") from e
        try:
            check_server(self.sock, self.path)
        except BaseException:
            self.sock.close()
            raise
        self.framer = Framer(MAX_REPLY_SIZE)

    def _reconnect(self) -> None:
        self.close()
        self._connect()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.framer.close()
        self.sock.close()

    # ------------------------------------------------------------------ raw calls

    def call(self, method: str, params: dict[str, Any] | None = None, fds: Iterable[int] = ()) -> tuple[dict[str, Any], list[int]]:
        """One call; returns the reply parameters and the reply's fds (now the caller's).

        ``method`` without a dot is taken from ``io.fdbox.Store``. ``fds`` are sent, not
        closed: they stay the caller's.
        """
        if "." not in method:
            method = f"{INTERFACE}.{method}"
        message = {"method": method, "parameters": params or {}}
        try:
            send_message(self.sock, message, list(fds))
        except (BrokenPipeError, ConnectionResetError):
            # The daemon closed the connection before this call. If it said why (too many
            # connections), that is raised here. If it just closed it (an idle
            # connection), it never saw this call: connect again and send it once more.
            try:
                self._reply()
            except ConnectionClosed:
                pass
            self._reconnect()
            send_message(self.sock, message, list(fds))
        reply, rfds = self._reply()
        return reply.get("parameters") or {}, rfds

    def _reply(self) -> tuple[dict[str, Any], list[int]]:
        """The next reply message and its fds; error replies raise."""
        frame = self._receive()
        reply = frame.message or {}
        if frame.error is not None:
            raise FdboxError("InvalidRequest", f"malformed reply from fdboxd: {frame.error}")
        error = reply.get("error")
        if error is not None:
            close_fds(frame.fds)
            rparams = reply.get("parameters") or {}
            short = str(error).removeprefix(f"{INTERFACE}.")
            if short in ERROR_NAMES and str(error).startswith(INTERFACE):
                details = {k: v for k, v in rparams.items() if k != "message"}
                raise FdboxError(short, str(rparams.get("message", short)), **details)
            raise VarlinkCallError(str(error), rparams)
        return reply, frame.fds

    def _receive(self):  # type: ignore[no-untyped-def]
        while (frame := self.framer.take()) is None:
            if not recv_into(self.sock, self.framer):
                raise ConnectionClosed("fdboxd closed the connection")
        return frame

    # ------------------------------------------------------------------ io.fdbox.Store

    def put(self, box: str, name: str, fd: int, metadata: dict[str, str] | None = None) -> Entry:
        params: dict[str, Any] = {"box": box, "name": name, "fd": 0}
        if metadata:
            params["metadata"] = metadata
        reply, _ = self.call("Put", params, [fd])
        return reply["entry"]

    def put_many(self, box: str, items: Iterable[tuple[str, int] | tuple[str, int, dict[str, str]]]) -> list[Entry]:
        """Put several ``(name, fd[, metadata])`` of one box in one message: all or none."""
        entries, fds = [], []
        for i, item in enumerate(items):
            e: dict[str, Any] = {"name": item[0], "fd": i}
            if len(item) > 2 and item[2]:
                e["metadata"] = item[2]
            entries.append(e)
            fds.append(item[1])
        reply, _ = self.call("PutMany", {"box": box, "entries": entries}, fds)
        return reply["entries"]

    def get(self, box: str, name: str) -> tuple[Entry, int]:
        reply, fds = self.call("Get", {"box": box, "name": name})
        return reply["entry"], _take(fds, reply.get("fd"))

    def get_box(self, box: str) -> list[tuple[Entry, int]]:
        reply, fds = self.call("GetBox", {"box": box})
        try:
            return [(g["entry"], fds[g["fd"]]) for g in reply["entries"]]
        except (KeyError, IndexError, TypeError):
            close_fds(fds)
            raise FdboxError("InvalidRequest", "GetBox reply does not match its fds") from None

    def list(self, box: str | None = None) -> dict[str, Any]:
        reply, _ = self.call("List", {"box": box} if box else {})
        return reply

    def remove(self, box: str, name: str) -> None:
        self.call("Remove", {"box": box, "name": name})

    def delete_box(self, box: str) -> None:
        self.call("DeleteBox", {"box": box})

    def seal(self, box: str | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
             preflight: bool = False) -> list[str]:
        """Seal one box or all. ``progress`` gets ``{box, name, done, total}`` per entry checksummed;
        ``preflight``: refuse (sealing nothing) if :meth:`preflight` finds a problem."""
        params: dict[str, Any] = {"box": box} if box else {}
        if preflight:
            params["preflight"] = True
        if progress is None:
            reply, _ = self.call("Seal", params)
            return reply["sealed"]
        send_message(self.sock, {"method": f"{INTERFACE}.Seal", "parameters": params, "more": True})
        while True:
            reply, fds = self._reply()
            close_fds(fds)
            if not reply.get("continues"):
                return (reply.get("parameters") or {})["sealed"]
            progress((reply.get("parameters") or {}).get("progress", {}))

    def restore_into(self, box: str, name: str, fd: int) -> Entry:
        """Have fdboxd fill your new guest_memfd ``fd`` with the carried bytes of box/name."""
        reply, _ = self.call("RestoreInto", {"box": box, "name": name, "fd": 0}, [fd])
        return reply["entry"]

    def unseal(self, box: str) -> None:
        self.call("Unseal", {"box": box})

    def finish(self, box: str | None = None) -> list[str]:
        reply, _ = self.call("Finish", {"box": box} if box else {})
        return reply["finished"]

    def net_restore(self, box: str) -> list[dict[str, Any]]:
        """Recreate the box's recorded network interfaces that are gone (see fdboxd.net)."""
        reply, _ = self.call("NetRestore", {"box": box})
        return reply["entries"]

    def acknowledge_lost(self, box: str | None = None) -> int:
        """Forget your lost-entry reports (of one box, or all); returns how many."""
        reply, _ = self.call("AcknowledgeLost", {"box": box} if box else {})
        return int(reply["acknowledged"])

    def preflight(self) -> dict[str, Any]:
        """Would every entry survive a kexec now? ``{ok, backend, entries, problems, warnings}``."""
        reply, _ = self.call("Preflight")
        return reply

    def status(self) -> dict[str, Any]:
        reply, _ = self.call("Status")
        return reply

    def last_live_update(self) -> list[dict[str, Any]]:
        """Each visible box's last live update: phases with times and durations (fdboxd.timeline)."""
        reply, _ = self.call("LastLiveUpdate")
        return list(reply["boxes"])


def check_server(sock: socket.socket, path: str) -> None:
    """Refuse a server that is neither root nor ourselves, before a single fd is sent.

    A socket path can be squatted (another user's listener in ``/tmp/fdbox-$UID``, or a
    stale ``$FDBOX_SOCKET``); the kernel's SO_PEERCRED says who really listens.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    if uid not in (0, os.geteuid()):
        raise FdboxError("PermissionDenied", f"the server at {path} runs as uid {uid} (pid {pid}), "
                         f"neither root nor you (uid {os.geteuid()}): not talking to it")


def _take(fds: list[int], index: object) -> int:
    if not isinstance(index, int) or not 0 <= index < len(fds):
        close_fds(fds)
        raise FdboxError("InvalidRequest", "reply names an fd it did not carry")
    keep = fds.pop(index)
    close_fds(fds)
    return keep


def read_all(fd: int) -> bytes:
    """The whole content of a memfd-like fd, from offset 0 (cursor untouched)."""
    size = os.fstat(fd).st_size
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, min(1 << 20, size - len(out)), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)
