"""A minimal, blocking QMP client: enough to stop, save and resume a QEMU.

Why not a library: QMP is one JSON object per line over a unix socket, and the one
thing fdbox-qemu needs beyond that is handing QEMU a file descriptor (``getfd``), which
is an SCM_RIGHTS message on the same socket. Asynchronous events are read and dropped.

Errors are :class:`fdboxd.errors.FdboxError`: a socket nobody listens on is
``NotFound`` (the VM is not running), a command QEMU refuses is ``InvalidRequest``
with QEMU's own words, a QEMU that goes away mid-command is ``BackendUnavailable``.
"""

from __future__ import annotations

import array
import json
import socket
import time
from collections.abc import Sequence
from typing import Any

from ..errors import FdboxError


class QMPClient:
    """One QMP session, negotiated (``qmp_capabilities``) on connect."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:
                # EAGAIN: QEMU listens with a backlog of one and accepts one QMP client at
                # a time, so a second client (status beside a suspend) waits its turn.
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise FdboxError("BackendUnavailable", f"QEMU on {path} accepts no connection (busy)") from None
                time.sleep(0.005)
            except OSError as e:
                self.sock.close()
                raise FdboxError("NotFound", f"no QEMU listens on {path}: {e.strerror}") from None
        self.buf = b""
        try:
            greeting = self._read()
            if "QMP" not in greeting:
                raise FdboxError("InvalidRequest", f"{path} does not speak QMP")
            self.version = _version(greeting["QMP"].get("version", {}))
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None, fds: Sequence[int] = ()) -> Any:
        """Run one command; its ``return`` value, or ``InvalidRequest`` with QEMU's error."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"QEMU went away ({command}): {e.strerror}") from None
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                err = reply["error"]
                raise FdboxError("InvalidRequest", f"QEMU refused {command}: {err.get('desc', err)}",
                                 qmp_class=err.get("class"))
            return reply.get("return")

    def wait_closed(self, timeout: float = 30.0) -> bool:
        """Wait for QEMU to close the connection (it does when it exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True
        return False

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise FdboxError("BackendUnavailable", f"QEMU on {self.path} did not answer") from None
            except OSError as e:
                raise FdboxError("BackendUnavailable", f"QEMU on {self.path}: {e.strerror}") from None
            if not chunk:
                raise FdboxError("BackendUnavailable", f"QEMU on {self.path} closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise FdboxError("InvalidRequest", f"QEMU sent a line that is not JSON: {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise FdboxError("InvalidRequest", "QEMU sent a QMP message that is not an object")
        return msg


def _version(v: dict[str, Any]) -> tuple[int, int, int]:
    q = v.get("qemu", {})
    return (int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)))
