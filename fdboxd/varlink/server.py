"""The Varlink server: one asyncio loop, non-blocking AF_UNIX sockets, fds both ways.

asyncio's streams cannot carry SCM_RIGHTS, so each connection is a non-blocking socket
driven by ``loop.add_reader``/``add_writer``. A connection reads, frames
(:class:`~fdboxd.varlink.protocol.Framer`), dispatches each complete message to the
:class:`~fdboxd.varlink.service.StoreService`, and queues the reply with its fds.

The invariant: every request gets exactly one reply, in order (none if it asked for
``oneway``), or the connection is closed. :meth:`Connection._serve` is the one place a
request is answered: it catches whatever the request raised, turns it into an error
reply (:func:`fdboxd.errors.describe`), and closes the request's fds, so no exception
can skip a reply or leak an fd. Replies are ASCII JSON, which cannot fail to encode.

Fairness and back-pressure: a connection handles the messages of one read and goes
back to the loop, so one busy client cannot starve the others. A connection stops
being read while it is over its budget (:class:`Budget`): bytes queued for it, fds in
flight on it (received and not yet handled, or in replies not yet written), or fds in
flight for its uid across all its connections. Non-root uids also have a connection
quota, and a reserve of connections is kept for root, so root is always served.

Fd ownership, the invariant the tests check with ``/proc/PID/fd``: every fd received
is closed after its message is handled (or refused, or the connection dies); every
fd in a reply is closed once sent (or when the connection dies unsent).
"""

from __future__ import annotations

import array
import asyncio
import enum
import errno
import inspect
import logging
import select
import os
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import FdboxError, describe
from ..limits import Budget
from ..model import Caller
from .protocol import Frame, Framer, close_fds, encode, recv_into
from .service import Call, Reply, StoreService, VarlinkError

log = logging.getLogger("fdboxd.varlink")

ERROR_PREFIX = "io.fdbox.Store."
MAX_PENDING_OUT = 4 << 20
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)
#: Accept errors that mean "out of a resource": pause the listener instead of spinning.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ConnState(enum.StrEnum):
    """A connection's life. A running async call (``task``) is work, not a state."""

    OPEN = "open"  # requests are read and answered in order
    DRAINING = "draining"  # the peer hung up: answer what was read, then close
    CLOSED = "closed"


def peer_caller(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(uid=uid, gid=gid, pid=pid)


@dataclass
class _Request:
    """What the server needs to answer a message, whatever is wrong with the rest of it."""

    method: Any = None
    params: Any = None
    oneway: bool = False
    more: bool = False


class Connection:
    def __init__(self, server: VarlinkServer, sock: socket.socket, caller: Caller) -> None:
        self.server = server
        self.sock = sock
        self.fileno = sock.fileno()
        self.caller = caller
        self.framer = Framer(server.max_message_size, server.max_fds,
                             None if caller.is_root else self._fd_room)
        self.out: deque[tuple[memoryview, list[int]]] = deque()
        self.out_bytes = 0
        self.out_fds = 0
        self.state = ConnState.OPEN
        self.task: asyncio.Future[Any] | None = None  # the async call being served
        self.task_fds: list[int] = []  # fds of the message the running task serves
        self.last_active = time.monotonic()
        self._reading = False  # add_reader is registered (mechanism, follows the state)
        self._writing = False  # add_writer is registered: replies wait for room
        self._update()

    def _set_state(self, state: ConnState) -> None:
        log.debug("connection of pid %d: %s -> %s", self.caller.pid, self.state, state)
        self.state = state

    @property
    def fds_in_flight(self) -> int:
        """Fds this connection holds: received and unhandled, or in unsent replies."""
        return self.framer.fd_count + len(self.task_fds) + self.out_fds

    @property
    def fds_waiting(self) -> int:
        """The fds that go away by our work or the peer reading: whole messages not yet
        handled, the running call's, unsent replies'. (A half-read message's fds only go
        away by reading more, so they never pause reading; see Framer.fd_room.)"""
        return self.framer.fd_count - self.framer.partial_fds + len(self.task_fds) + self.out_fds

    def _fd_room(self) -> int:
        return self.server.budget.fds_per_uid - self.server.uid_fds(self.caller.uid)

    # -------------------------------------------------------------- input

    def _over_budget(self) -> bool:
        b = self.server.budget
        if self.out_bytes > MAX_PENDING_OUT or self.fds_waiting >= b.fds_per_connection:
            return True
        return not self.caller.is_root and self.server.uid_fds(self.caller.uid, waiting=True) >= b.fds_per_uid

    def _update(self) -> None:
        """Read when open, idle and within budget; otherwise let the socket wait."""
        want = (self.state == ConnState.OPEN and self.task is None and not self.framer.has_frames
                and not self._over_budget())
        if want and not self._reading:
            self.server.loop.add_reader(self.fileno, self._on_readable)
            self._reading = True
        elif not want and self._reading:
            self.server.loop.remove_reader(self.fileno)
            self._reading = False
            if self.state == ConnState.OPEN and self.task is None and self._over_budget():
                self.server.throttled.add(self.caller.uid)

    def _on_readable(self) -> None:
        try:
            alive = recv_into(self.sock, self.framer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("read from pid %d failed: %s", self.caller.pid, e)
            alive = False
        self.last_active = time.monotonic()
        if not alive:
            self._set_state(ConnState.DRAINING)
        self._process()

    def _process(self) -> None:
        """Answer queued messages in order; stop while an async call runs or replies pile up."""
        while (self.task is None and self.state != ConnState.CLOSED
               and self.out_fds < self.server.budget.fds_per_connection and self.out_bytes <= MAX_PENDING_OUT
               and (frame := self.framer.take()) is not None):
            self._serve(frame)
        if self.state == ConnState.CLOSED or self.task is not None:
            return
        if self.state == ConnState.DRAINING and not self.out and not self.framer.has_frames:
            self.close()
            return
        self._update()

    def _serve(self, frame: Frame) -> None:
        """The one place a request is answered: exactly one reply (or none for oneway),
        whatever it raises, and its fds closed unless a running task now owns them."""
        req = _Request(oneway=frame.oneway)
        try:
            try:
                if frame.error is not None:
                    raise FdboxError(frame.error_name, frame.error)
                self._dispatch(frame.message, frame.fds, req)
            except Exception as e:  # noqa: BLE001 - every request gets its answer
                self._reply_exception(req, e)
        finally:
            if self.task is None:
                close_fds(frame.fds)
            else:
                self.task_fds = frame.fds

    def _dispatch(self, message: dict[str, Any], fds: list[int], req: _Request) -> None:
        req.method = message.get("method")
        req.oneway = message.get("oneway") is True
        req.more = message.get("more") is True and not req.oneway
        params = message.get("parameters", {})
        req.params = params if isinstance(params, dict) else {}
        if not isinstance(params, dict):
            raise FdboxError("InvalidRequest", "'parameters' must be an object")
        call = Call(self.caller, params, fds)
        if req.more:
            call.more = lambda p: self._queue({"parameters": p, "continues": True}, [])
        result = self.server.service.dispatch(req.method, call)
        if type(result) is not Reply and inspect.isawaitable(result):
            # Long calls (Seal) run as a task; this connection reads nothing more until
            # it is done, so replies stay in order, while other connections go on.
            self.task = asyncio.ensure_future(result)
            self._update()
            self.task.add_done_callback(lambda t: self._task_done(t, req))
            return
        self._reply(req, result)

    def _task_done(self, task: asyncio.Future[Any], req: _Request) -> None:
        self.task = None
        fds, self.task_fds = self.task_fds, []
        close_fds(fds)
        if task.cancelled():
            return
        exc = task.exception()
        if self.state == ConnState.CLOSED or self._peer_hung_up():
            # The caller left (a client timeout, say) while its call ran: say how it
            # ended, since nobody else will hear it (a seal that finished still counts).
            log.warning("%s %s finished after its caller (pid %d) left: %s", str(req.method).rsplit(".", 1)[-1],
                        (req.params or {}).get("box") or "(all)" if isinstance(req.params, dict) else "?",
                        self.caller.pid, "done" if exc is None else getattr(exc, "message", None) or repr(exc))
        if self.state == ConnState.CLOSED:
            if exc is None:
                close_fds(task.result().fds)
            return
        try:
            if exc is not None:
                raise exc
            self._reply(req, task.result())
        except Exception as e:  # noqa: BLE001 - every request gets its answer
            self._reply_exception(req, e)
        self._process()

    def _reply_exception(self, req: _Request, e: Exception) -> None:
        """Answer a request that raised: a Varlink error as itself, anything else as the
        FdboxError name :func:`describe` gives it (logged when it is the caller's)."""
        if isinstance(e, VarlinkError):
            self._reply_error(req, e.error, e.params)
            return
        name, params = describe(e, req.method)
        self._reply_error(req, ERROR_PREFIX + name, params)
        if isinstance(e, FdboxError):
            self.server.log_op(self.caller, req.method, req.params, e)

    def _peer_hung_up(self) -> bool:
        """The peer closed its end (POLLHUP; a half-close alone is not leaving)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLHUP)
        return any(ev & select.POLLHUP for _, ev in poller.poll(0))

    def _reply(self, req: _Request, reply: Any) -> None:
        """Send the reply, then log the call: the caller never waits for a log line."""
        if req.oneway:
            if not reply.borrowed:
                close_fds(reply.fds)
        else:
            self._queue(reply.raw if reply.raw is not None else {"parameters": reply.params}, reply.fds,
                        reply.borrowed)
        self.server.log_op(self.caller, req.method, req.params, None)

    def _reply_error(self, req: _Request, error: str, params: dict[str, Any]) -> None:
        if not req.oneway:
            self._queue({"error": error, "parameters": params}, [])

    # -------------------------------------------------------------- output

    def _queue(self, message: dict[str, Any] | bytes, fds: list[int], borrowed: bool = False) -> None:
        """Queue one reply (a message, or its wire form); its fds are the queue's from now on.

        ``borrowed`` fds (a backend's own, see Reply) are sent at once if the socket
        takes the reply's first byte now, else dup'ed for the queue: the queue only
        ever holds fds of its own, so nothing it sends later can have been closed."""
        if self.state == ConnState.CLOSED:
            if not borrowed:
                close_fds(fds)
            return
        try:
            data = message if isinstance(message, bytes) else encode(message)
        except Exception:
            if not borrowed:
                close_fds(fds)
            raise  # _serve answers with an error instead
        if not self.out:
            # Nothing queued before it (the usual case): straight to the socket. What
            # the socket does not take is queued as below; its fds went with byte one.
            try:
                sent = self.sock.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]
                                       if fds else ())
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                if not borrowed:
                    close_fds(fds)
                self._write_failed(e)
                return
            else:
                if not borrowed:
                    close_fds(fds)
                self.last_active = time.monotonic()
                if sent == len(data):
                    return
                data, fds, borrowed = data[sent:], [], False
        if borrowed:
            fds = _own_copies(fds)
        self.out.append((memoryview(data), fds))
        self.out_bytes += len(data)
        self.out_fds += len(fds)
        self._write()

    def _flush(self) -> None:
        """The writer callback: write, and once drained, answer what the budget held back."""
        self._write()
        if self.out or self.state == ConnState.CLOSED:
            return
        if self.task is None:
            self._process()
        self.server.unthrottle(self.caller.uid)

    def _write(self) -> bool:
        """Write what the socket takes; True when all is out. Never answers anything:
        it runs inside :meth:`_process`, which must not recurse into itself."""
        while self.out:
            data, fds = self.out[0]
            anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            try:
                sent = self.sock.sendmsg([data], anc)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._write_failed(e)
                return False
            close_fds(fds)  # sent (with the first byte) or never to be sent
            self.out_fds -= len(fds)
            self.out_bytes -= sent
            self.last_active = time.monotonic()
            if sent < len(data):
                self.out[0] = (data[sent:], [])
                break
            self.out.popleft()
        loop = self.server.loop
        if self.out:
            if not self._writing:
                loop.add_writer(self.fileno, self._flush)
                self._writing = True
            return False
        if self._writing:  # the usual reply went out whole: no selector call at all
            loop.remove_writer(self.fileno)
            self._writing = False
        return True

    def _write_failed(self, e: OSError) -> None:
        """The peer is gone (or the socket broke): nothing more can be sent on it."""
        if e.errno not in (errno.EPIPE, errno.ECONNRESET):
            log.warning("write to pid %d failed: %s", self.caller.pid, e)
        self.close()

    def close(self) -> None:
        if self.state == ConnState.CLOSED:
            return
        # A running task (a seal) is left to finish: stopping it half-way would only
        # leave work to undo. Its reply is dropped, its fds closed by its callback.
        if self._reading:
            self.server.loop.remove_reader(self.fileno)
            self._reading = False
        if self._writing:
            self.server.loop.remove_writer(self.fileno)
            self._writing = False
        self._set_state(ConnState.CLOSED)
        self.framer.close()
        while self.out:
            close_fds(self.out.popleft()[1])
        self.out_fds = 0
        self.sock.close()
        self.server.forget(self)


def _own_copies(fds: list[int]) -> list[int]:
    """A dup of each borrowed fd, for a reply that must wait in the queue: all or none."""
    out: list[int] = []
    try:
        for fd in fds:
            out.append(os.dup(fd))
    except OSError as e:
        close_fds(out)
        raise FdboxError("BackendUnavailable", f"cannot queue the reply's file descriptors: {e.strerror}") from e
    return out


class _RateLimitedLog:
    """At most one line per ``interval`` seconds, saying how many were held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last = -interval
        self.held = 0

    def warning(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.held += 1
            return
        more = f" (and {self.held} more like it)" if self.held else ""
        log.warning(fmt + more, *args)
        self.last, self.held = now, 0


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
        budget: Budget = Budget(),
        allowed_uids: frozenset[int] | None = None,
    ) -> None:
        self.service = service
        self.listener = listener
        self.max_message_size = max_message_size
        self.max_fds = max_fds
        self.budget = budget
        #: None: anyone may connect (the system daemon); else only these uids (--user).
        self.allowed_uids = allowed_uids
        self.connections: set[Connection] = set()
        self.by_uid: dict[int, set[Connection]] = {}
        self.throttled: set[int] = set()  # uids with a connection paused on the uid budget
        self.loop = asyncio.get_running_loop()
        self._log_op = log_op
        self._accept_delay = 0.0
        self._accept_paused = False
        self._refusals = _RateLimitedLog()
        self._accept_errors = _RateLimitedLog()
        listener.setblocking(False)
        self.loop.add_reader(listener.fileno(), self._on_accept)
        self._sweeper: asyncio.TimerHandle | None = None
        if budget.idle_timeout > 0:
            self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep_idle)

    def log_op(self, caller: Caller, method: Any, params: Any, error: FdboxError | None) -> None:
        if self._log_op is not None:
            try:
                self._log_op(caller, method, params if isinstance(params, dict) else {}, error)
            except Exception:  # a log line must never cost a reply
                log.exception("could not log a call")

    # -------------------------------------------------------------- per-uid accounting

    def uid_fds(self, uid: int, waiting: bool = False) -> int:
        conns = self.by_uid.get(uid, ())
        return sum(c.fds_waiting for c in conns) if waiting else sum(c.fds_in_flight for c in conns)

    def usage(self, uid: int) -> dict[str, int]:
        conns = self.by_uid.get(uid, ())
        return {"connections": len(conns), "fds_in_flight": sum(c.fds_in_flight for c in conns)}

    def unthrottle(self, uid: int) -> None:
        """A connection of ``uid`` let go of fds: its paused siblings may read again."""
        if uid in self.throttled:
            self.throttled.discard(uid)
            for c in list(self.by_uid.get(uid, ())):
                if c.task is None and c.state == ConnState.OPEN:
                    c._process()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        conns = self.by_uid.get(conn.caller.uid)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_uid[conn.caller.uid]
        self.unthrottle(conn.caller.uid)

    # -------------------------------------------------------------- accepting

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _RESOURCE_ERRNOS:
                    self._pause_accepting(e)
                else:
                    self._accept_errors.warning("accept failed: %s", e)
                return
            self._accept_delay = 0.0
            self._admit(sock)

    def _pause_accepting(self, e: OSError) -> None:
        """Out of fds (or memory): stop accepting for a while instead of spinning on it.

        Waiting clients stay in the listen backlog; the delay doubles up to a second
        while the condition lasts, and the log says so once per interval.
        """
        self._accept_delay = min(max(self._accept_delay * 2, 0.05), 1.0)
        self._accept_errors.warning("accept failed: %s; pausing the listener", e.strerror)
        if not self._accept_paused:
            self.loop.remove_reader(self.listener.fileno())
            self._accept_paused = True
            self.loop.call_later(self._accept_delay, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._accept_paused and self.listener.fileno() >= 0:
            self._accept_paused = False
            self.loop.add_reader(self.listener.fileno(), self._on_accept)
            self._on_accept()

    def _admit(self, sock: socket.socket) -> None:
        try:
            caller = peer_caller(sock)
        except OSError:
            sock.close()
            return
        problem = self._refusal(caller)
        if problem is not None:
            self._refusals.warning("refused a connection from uid %d pid %d: %s", caller.uid, caller.pid, problem)
            try:  # a best-effort answer, so the client says why instead of "connection reset"
                sock.send(encode({"error": ERROR_PREFIX + problem[0], "parameters": {"message": problem[1]}}),
                          socket.MSG_DONTWAIT)
            except OSError:
                pass
            sock.close()
            return
        sock.setblocking(False)
        conn = Connection(self, sock, caller)
        self.connections.add(conn)
        self.by_uid.setdefault(caller.uid, set()).add(conn)

    def _refusal(self, caller: Caller) -> tuple[str, str] | None:
        b = self.budget
        if self.allowed_uids is not None and caller.uid not in self.allowed_uids:
            return ("PermissionDenied", "this fdboxd serves only its own user")
        if caller.is_root:
            if len(self.connections) >= b.max_connections:
                return ("LimitExceeded", f"at most {b.max_connections} connections")
            return None
        if len(self.connections) >= b.max_connections - b.root_reserve:
            return ("LimitExceeded", f"at most {b.max_connections - b.root_reserve} connections for non-root users")
        if len(self.by_uid.get(caller.uid, ())) >= b.connections_per_uid:
            return ("LimitExceeded", f"at most {b.connections_per_uid} connections per user")
        return None

    # -------------------------------------------------------------- idle connections

    def _sweep_interval(self) -> float:
        return max(0.05, min(self.budget.idle_timeout / 4, 30.0))

    def _sweep_idle(self) -> None:
        """Close non-root connections that did nothing for ``idle_timeout`` seconds,
        a half-sent message included (a client that never finishes one pins its fds)."""
        cutoff = time.monotonic() - self.budget.idle_timeout
        for c in list(self.connections):
            if (not c.caller.is_root and c.task is None and not c.out and c.last_active < cutoff
                    and c.state != ConnState.CLOSED):
                log.debug("closing idle connection of uid %d pid %d", c.caller.uid, c.caller.pid)
                c.close()
        self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep_idle)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if not self._accept_paused:
            self.loop.remove_reader(self.listener.fileno())
        self._accept_paused = False
        for conn in list(self.connections):
            conn.close()
        self.listener.close()


def bind_socket(path: str, mode: int = 0o666) -> socket.socket:
    """A listening socket at ``path``, replacing a stale socket file but nothing else.

    ``mode`` 0666 (the system daemon): anyone may connect; callers are identified by
    SO_PEERCRED and the store enforces ownership. An operator narrows this with the
    socket unit's SocketMode=. 0600: a user daemon, for its own user only.
    """
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
    old = os.umask(0o777 & ~mode)  # never connectable by others, not even between bind and chmod
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(128)
    return sock


def socket_identity(path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of the socket file just bound, for :func:`unlink_socket`."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def unlink_socket(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file this daemon bound, unless it is not ours any more.

    Only while the file is still the one bound (same inode): a second daemon's socket
    or an operator's file that replaced it is left alone.
    """
    import stat

    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass
