"""The Varlink server: one asyncio loop, non-blocking AF_UNIX sockets, fds both ways.

asyncio's streams cannot carry SCM_RIGHTS, so each connection is a non-blocking socket
driven by ``loop.add_reader``/``add_writer``. A connection reads, frames
(:class:`~fdboxd.varlink.protocol.Framer`), dispatches each complete message to the
:class:`~fdboxd.varlink.service.StoreService`, and queues the reply with its fds.

Fairness and back-pressure: a connection handles the messages of one read and goes
back to the loop, so one busy client cannot starve the others; a client that does not
read its replies stops being read once ``MAX_PENDING_OUT`` bytes are queued for it.

Fd ownership, the invariant the tests check with ``/proc/PID/fd``: every fd received
is closed after its message is handled (or refused, or the connection dies); every
fd in a reply is closed once sent (or when the connection dies unsent).
"""

from __future__ import annotations

import array
import asyncio
import errno
import inspect
import logging
import os
import socket
import struct
from collections import deque
from typing import Any

from ..errors import FdboxError
from ..model import Caller
from .protocol import Framer, close_fds, encode, recv_into
from .service import Call, StoreService, VarlinkError

log = logging.getLogger("fdboxd.varlink")

ERROR_PREFIX = "io.fdbox.Store."
MAX_PENDING_OUT = 4 << 20
MAX_CONNECTIONS = 1024


def peer_caller(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(uid=uid, gid=gid, pid=pid)


class Connection:
    def __init__(self, server: VarlinkServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.caller = peer_caller(sock)
        self.framer = Framer(server.max_message_size, server.max_fds)
        self.out: deque[tuple[memoryview, list[int]]] = deque()
        self.out_bytes = 0
        self.reading = False
        self.writing = False  # a writer is registered: replies wait for room
        self.closed = False
        self.eof = False
        self.task: asyncio.Future[Any] | None = None
        self.task_fds: list[int] = []  # fds of the message the running task serves
        self._resume_reading()

    # -------------------------------------------------------------- input

    def _resume_reading(self) -> None:
        if not self.reading and not self.closed:
            self.server.loop.add_reader(self.sock.fileno(), self._on_readable)
            self.reading = True

    def _pause_reading(self) -> None:
        if self.reading:
            self.server.loop.remove_reader(self.sock.fileno())
            self.reading = False

    def _on_readable(self) -> None:
        try:
            alive = recv_into(self.sock, self.framer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("read from pid %d failed: %s", self.caller.pid, e)
            alive = False
        if not alive:
            self.eof = True
            self._pause_reading()
        self._process()

    def _process(self) -> None:
        """Handle queued messages in order; stop while an async call is running."""
        while self.task is None and not self.closed and (frame := self.framer.take()) is not None:
            try:
                if frame.error is not None:
                    self._send_error(ERROR_PREFIX + "InvalidRequest", {"message": frame.error})
                else:
                    self._handle(frame.message, frame.fds)
            finally:
                if self.task is None:
                    close_fds(frame.fds)
                else:
                    self.task_fds = frame.fds
        if self.closed or self.task is not None:
            return
        if self.eof:
            if not self.out:
                self.close()
        elif self.out_bytes > MAX_PENDING_OUT:
            self._pause_reading()
        else:
            self._resume_reading()

    def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        method = message.get("method")
        oneway = message.get("oneway") is True
        params = message.get("parameters", {})
        if not isinstance(params, dict):
            self._reply_error(ERROR_PREFIX + "InvalidRequest", {"message": "'parameters' must be an object"}, oneway)
            return
        call = Call(self.caller, params, fds)
        if message.get("more") is True and not oneway:
            call.more = lambda p: self._queue(encode({"parameters": p, "continues": True}), [])
        try:
            result = self.server.service.dispatch(method, call)
        except Exception as e:
            self._finish_call(method, params, oneway, None, e)
            return
        if inspect.isawaitable(result):
            # Long calls (Seal) run as a task; this connection reads nothing more until
            # it is done, so replies stay in order, while other connections go on.
            self._pause_reading()
            self.task = asyncio.ensure_future(result)
            self.task.add_done_callback(lambda t: self._task_done(t, method, params, oneway))
            return
        self._finish_call(method, params, oneway, result, None)

    def _task_done(self, task: asyncio.Future[Any], method: Any, params: dict[str, Any], oneway: bool) -> None:
        self.task = None
        close_fds(self.task_fds)
        self.task_fds = []
        if task.cancelled():
            return
        if self.closed:
            if task.exception() is None:
                close_fds(task.result().fds)
            return
        exc = task.exception()
        self._finish_call(method, params, oneway, None if exc else task.result(), exc)
        self._process()

    def _finish_call(self, method: Any, params: dict[str, Any], oneway: bool, reply: Any, exc: BaseException | None) -> None:
        if isinstance(exc, FdboxError):
            self._reply_error(ERROR_PREFIX + exc.name, exc.to_params(), oneway)
            self.server.log_op(self.caller, method, params, exc)
            return
        if isinstance(exc, VarlinkError):
            self._reply_error(exc.error, exc.params, oneway)
            return
        if exc is not None:
            log.error("internal error in %s", method, exc_info=exc)
            self._reply_error(ERROR_PREFIX + "BackendUnavailable", {"message": "internal error; see the daemon log"}, oneway)
            return
        self.server.log_op(self.caller, method, params, None)
        if oneway:
            close_fds(reply.fds)
            return
        self._queue(reply.raw if reply.raw is not None else encode({"parameters": reply.params}), reply.fds)

    def _reply_error(self, error: str, params: dict[str, Any], oneway: bool) -> None:
        if not oneway:
            self._send_error(error, params)

    def _send_error(self, error: str, params: dict[str, Any]) -> None:
        self._queue(encode({"error": error, "parameters": params}), [])

    # -------------------------------------------------------------- output

    def _queue(self, data: bytes, fds: list[int]) -> None:
        if self.closed:
            close_fds(fds)
            return
        self.out.append((memoryview(data), fds))
        self.out_bytes += len(data)
        self._flush()

    def _flush(self) -> None:
        while self.out:
            data, fds = self.out[0]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            try:
                sent = self.sock.sendmsg([data], anc)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("write to pid %d failed: %s", self.caller.pid, e)
                self.close()
                return
            close_fds(fds)  # sent (with the first byte) or never to be sent
            self.out_bytes -= sent
            if sent < len(data):
                self.out[0] = (data[sent:], [])
                break
            self.out.popleft()
        loop = self.server.loop
        if self.out:
            if not self.writing:
                loop.add_writer(self.sock.fileno(), self._flush)
                self.writing = True
        else:
            if self.writing:  # the usual reply went out whole: no selector call at all
                loop.remove_writer(self.sock.fileno())
                self.writing = False
            if self.eof and self.task is None and not self.framer.has_frames:
                self.close()
                return
        if self.out_bytes <= MAX_PENDING_OUT and self.task is None and not self.eof:
            self._resume_reading()

    def close(self) -> None:
        if self.closed:
            return
        # A running task (a seal) is left to finish: stopping it half-way would only
        # leave work to undo. Its reply is dropped, its fds closed by its callback.
        self._pause_reading()
        if self.writing:
            self.server.loop.remove_writer(self.sock.fileno())
            self.writing = False
        self.closed = True
        self.framer.close()
        while self.out:
            close_fds(self.out.popleft()[1])
        self.sock.close()
        self.server.connections.discard(self)


class VarlinkServer:
    """Accepts connections on a listening AF_UNIX socket and serves them from one loop."""

    def __init__(
        self,
        service: StoreService,
        listener: socket.socket,
        *,
        max_message_size: int,
        max_fds: int,
        log_op: Any = None,
    ) -> None:
        self.service = service
        self.listener = listener
        self.max_message_size = max_message_size
        self.max_fds = max_fds
        self.connections: set[Connection] = set()
        self.loop = asyncio.get_running_loop()
        self._log_op = log_op
        listener.setblocking(False)
        self.loop.add_reader(listener.fileno(), self._on_accept)

    def log_op(self, caller: Caller, method: Any, params: dict[str, Any], error: FdboxError | None) -> None:
        if self._log_op is not None:
            self._log_op(caller, method, params, error)

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            if len(self.connections) >= MAX_CONNECTIONS:
                sock.close()
                log.warning("refused a connection: %d open", MAX_CONNECTIONS)
                continue
            sock.setblocking(False)
            self.connections.add(Connection(self, sock))

    def close(self) -> None:
        self.loop.remove_reader(self.listener.fileno())
        for conn in list(self.connections):
            conn.close()
        self.listener.close()


def bind_socket(path: str) -> socket.socket:
    """A listening socket at ``path``, replacing a stale socket file but nothing else."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        import stat

        if not stat.S_ISSOCK(st.st_mode):
            raise FdboxError("InvalidRequest", f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            probe.close()
            raise FdboxError("AlreadyExists", f"another daemon listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    # Anyone may connect: callers are identified by SO_PEERCRED and the store enforces
    # ownership. An operator narrows this with the socket unit's SocketMode=.
    os.chmod(path, 0o666)
    sock.listen(128)
    return sock
