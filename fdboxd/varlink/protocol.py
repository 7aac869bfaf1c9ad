"""Varlink framing with file descriptors — bytes in, messages out, and nothing else.

A message is one JSON object followed by a NUL byte on an AF_UNIX SOCK_STREAM socket.
File descriptors ride as SCM_RIGHTS on the ``sendmsg()`` that carries the first byte
of the message needing them. A reader therefore attaches the fds of a ``recvmsg()`` to
the message whose bytes began in that read.

:class:`Framer` is the whole receive side, used by the server (non-blocking, fed from
the event loop) and the client (blocking): feed it what ``recvmsg`` returned, take
complete ``(message, fds)`` pairs out. It enforces the message size and fd-count limits
and owns every fd it has been given until it hands it out or closes it.

:func:`send_message` is the send side for blocking sockets; the server builds its own
buffers with :func:`encode`.
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

#: Linux refuses more than SCM_MAX_FD (253) fds in one SCM_RIGHTS message.
MAX_FDS_PER_MESSAGE = 253
MAX_MESSAGE_SIZE = 1 << 20
#: What a client accepts in one reply: the daemon is trusted, and a List of 100,000
#: entries is some 30 MiB of JSON.
MAX_REPLY_SIZE = 256 << 20
#: JSON nested deeper than this is refused before it reaches any code that recurses.
MAX_DEPTH = 32
RECV_CHUNK = 64 << 10
_FD_SIZE = array.array("i").itemsize
_OUT_OF_FDS = "file descriptors were truncated: fdboxd is out of file descriptors, try again later"
_OVER_BUDGET = "too many file descriptors in flight for this user: read your replies, then try again"
CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)


class Frame:
    """One received message and the fds that came with it (now owned by the taker).

    A plain class, not a dataclass: the client imports this module, and ``dataclasses``
    (with ``inspect`` behind it) would be most of ``fdbox-qemu start``'s imports."""

    __slots__ = ("message", "fds", "error", "error_name", "oneway")

    def __init__(self, message: Any, fds: list[int] | None = None, error: str | None = None,
                 error_name: str = "InvalidRequest", oneway: bool = False) -> None:
        self.message = message
        self.fds: list[int] = [] if fds is None else fds
        self.error = error  # set instead of message when the frame was refused
        #: The fdbox error name for ``error``: the peer's fault, or ours (out of fds).
        self.error_name = error_name
        #: A refused frame that still parsed as an object saying ``"oneway": true``: its
        #: sender asked for no reply, and gets none (the server answers nothing else
        #: in its place, so the replies after it stay in step).
        self.oneway = oneway

    def __repr__(self) -> str:
        return (f"Frame(message={self.message!r}, fds={self.fds!r}, error={self.error!r}, "
                f"error_name={self.error_name!r}, oneway={self.oneway!r})")


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # built once, not per message
_DECODE = json.JSONDecoder().decode


def _loads(raw: bytes) -> Any:
    """``json.loads(raw)``, minus its encoding sniffing for the usual message: one that
    starts with ``{`` and holds no NUL (the framer split on them) is UTF-8 to
    ``json.detect_encoding`` too, so it is decoded the way ``json.loads`` would
    (``surrogatepass``) and parsed by the same decoder, the same errors included."""
    if raw[:1] == b"{":
        return _DECODE(raw.decode("utf-8", "surrogatepass"))
    return json.loads(raw)


def encode(message: dict[str, Any]) -> bytes:
    """One message on the wire. ASCII-only JSON: a string the peer sent cannot make it fail."""
    return _ENCODE(message).encode() + b"\0"


def check_document(raw: bytes, doc: Any) -> str | None:
    """Why a parsed message is unacceptable, or None: too deep, or a lone surrogate.

    ``json.loads`` accepts ``"\\ud800"`` (a string no UTF-8 encoder takes back) and
    nesting up to the interpreter's recursion limit. Both are refused here, at the
    edge, so nothing behind the framer meets them (a surrogate let through comes back
    in an error reply that names it, which the peer's framer must refuse). It reads
    bytes with ``surrogatepass``, so the raw UTF-8 form of a surrogate (ED A0..BF xx)
    is one too, with no backslash in sight. The walk runs only when the raw bytes
    could hold either (cheap byte counts first): ordinary messages skip it.
    """
    deep = raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
    escaped = b"\\u" in raw or b"\xed" in raw
    if not (deep or escaped):
        return None
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if escaped and not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError:
                    return "a string holds a lone UTF-16 surrogate"
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return f"JSON nested deeper than {MAX_DEPTH}"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
    return None


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of SCM_RIGHTS in recvmsg ancillary data (nothing else is asked for)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
            fds.extend(arr)
    return fds


class Framer:
    """Splits a byte stream into NUL-terminated JSON messages with their fds.

    Oversized messages and undecodable JSON become :class:`Frame` objects with
    ``error`` set, so the server can answer them; the stream then resynchronises at the
    next NUL. ``max_fds`` bounds the fds of one *message*, however many reads it spans:
    past it, the message's fds are closed at once (not when its NUL comes, which a
    hostile peer never sends) and the frame is refused. No exception leaves
    :meth:`feed`: every frame becomes a message or an error.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE, max_fds: int = MAX_FDS_PER_MESSAGE,
                 fd_room: Callable[[], int] | None = None) -> None:
        self.max_size = max_size
        self.max_fds = max_fds
        #: The ancillary room one recvmsg asks for: exactly max_fds (see recv_into).
        self.cmsg_space = socket.CMSG_SPACE(min(max_fds, MAX_FDS_PER_MESSAGE) * _FD_SIZE)
        #: How many more fds the owner may hold now (the server's per-uid budget), or None.
        #: A message whose fds do not fit is refused at once, never waited on: pausing
        #: on a half-read message would wait for bytes that only reading brings.
        self.fd_room = fd_room
        self._buf = bytearray()
        self._fds: list[int] = []  # fds for the message currently being read
        self._skipping = False  # discarding the rest of an oversized message
        self._problem: str | None = None  # the fds of the current message were refused
        self._frames: deque[Frame] = deque()
        self._frame_fds = 0  # fds held by the frames in _frames

    def feed(self, data: bytes, fds: list[int] | None = None, truncated: bool = False) -> None:
        """Add one ``recvmsg`` result. ``truncated`` is MSG_CTRUNC: some fds were lost.

        The kernel ends a stream read right after the chunk that carried fds, and a
        sender puts a message's fds on the ``sendmsg`` that starts it, so the fds belong
        to the *last* message that begins in this read (or, if none begins here, to the
        message still arriving).
        """
        if (not truncated and not self._buf and not self._skipping and self._problem is None
                and not self._fds and data.find(b"\0") == len(data) - 1 and len(data) <= self.max_size + 1):
            # The usual read: exactly one whole message and nothing pending. The same
            # steps as below (fds checked against the limits, then decoded), minus the
            # split and the bookkeeping a message spread over reads needs.
            if fds:
                self._take_fds(list(fds), None)
            self._finish(data[:-1])
            return
        fds = list(fds or [])
        problem = None
        if truncated:
            # The room asked for is max_fds: a short array means the kernel could not
            # install them all here (we are at our fd limit), not that the peer sent
            # too many. The two get different answers.
            problem = (f"file descriptors were truncated: more than {self.max_fds} in one message"
                       if len(fds) >= self.max_fds else _OUT_OF_FDS)
        parts = data.split(b"\0")
        in_progress = bool(self._buf) or self._skipping
        last = len(parts) - 1
        starts = [i for i in range(len(parts)) if (i > 0 or not in_progress) and (i < last or parts[i])]
        target = starts[-1] if starts else 0
        for i, part in enumerate(parts):
            if i == target and (fds or problem):
                self._take_fds(fds, problem)
            if not self._skipping:
                if len(self._buf) + len(part) > self.max_size:
                    self._skipping = True
                    self._buf.clear()
                else:
                    self._buf += part
            if i < last:
                self._finish()

    @property
    def partial_fds(self) -> int:
        """Fds of the message still being read."""
        return len(self._fds)

    @property
    def fd_count(self) -> int:
        """Fds owned here: the partial message's and those of untaken frames."""
        return len(self._fds) + self._frame_fds

    def _take_fds(self, fds: list[int], problem: str | None) -> None:
        if problem is None and len(self._fds) + len(fds) > self.max_fds:
            problem = f"more than {self.max_fds} file descriptors in one message"
        if problem is None and fds and self.fd_room is not None and len(fds) > self.fd_room():
            problem = _OVER_BUDGET
        if problem is not None or self._problem is not None:
            # Refused: close now, so a message that never ends pins nothing.
            close_fds(self._fds)
            close_fds(fds)
            self._fds = []
            self._problem = self._problem or problem
            return
        self._fds.extend(fds)

    def _finish(self, raw: bytes | None = None) -> None:
        """End the message being read: its bytes are ``raw``, or what was buffered."""
        fds, self._fds = self._fds, []
        problem, self._problem = self._problem, None
        if raw is None:
            raw = bytes(self._buf)
            self._buf.clear()
        if self._skipping:
            self._skipping = False
            problem = f"message larger than {self.max_size} bytes"
        oneway = False
        if problem is None:
            problem, oneway = self._decode(raw, fds)
            if problem is None:
                return
        close_fds(fds)
        name = {_OUT_OF_FDS: "BackendUnavailable", _OVER_BUDGET: "LimitExceeded"}.get(problem, "InvalidRequest")
        self._frames.append(Frame(None, [], problem, name, oneway))

    def _decode(self, raw: bytes, fds: list[int]) -> tuple[str | None, bool]:
        """Queue the frame of ``raw``; or say why not, and whether it asked for no reply
        (the caller closes ``fds``). Only a parsed object can ask: in bytes that are not
        JSON, nothing can be believed, ``"oneway"`` included, so they get their answer."""
        try:
            message = _loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"not a JSON message: {e}", False
        except RecursionError:
            return f"JSON nested deeper than {MAX_DEPTH}", False
        except Exception as e:  # noqa: BLE001 - whatever the parser raises, the frame gets an answer
            return f"not a JSON message: {type(e).__name__}", False
        if not isinstance(message, dict):
            return "a message must be a JSON object", False
        problem = check_document(raw, message)
        if problem is not None:
            return problem, message.get("oneway") is True
        self._frames.append(Frame(message, fds))
        self._frame_fds += len(fds)
        return None, False

    @property
    def has_frames(self) -> bool:
        return bool(self._frames)

    def take(self) -> Frame | None:
        if not self._frames:
            return None
        frame = self._frames.popleft()
        self._frame_fds -= len(frame.fds)
        return frame

    def close(self) -> None:
        """Close every fd still owned: those of a partial message and untaken frames."""
        close_fds(self._fds)
        self._fds = []
        while self._frames:
            close_fds(self._frames.popleft().fds)
        self._frame_fds = 0


# Plain ints: the socket module's are IntFlag members, whose operators run Python code.
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def recv_into(sock: socket.socket, framer: Framer) -> bool:
    """One ``recvmsg`` into ``framer``. False on end of stream. Raises BlockingIOError."""
    # Room for exactly the framer's limit: a peer that sends more gets MSG_CTRUNC (the
    # kernel drops the excess) instead of making us install fds we will refuse anyway.
    data, ancdata, flags, _ = sock.recvmsg(RECV_CHUNK, framer.cmsg_space, _MSG_CMSG_CLOEXEC)
    fds = fds_from_ancdata(ancdata) if ancdata else []
    if not data:
        close_fds(fds)
        return False
    framer.feed(data, fds, truncated=bool(flags & _MSG_CTRUNC))
    return True


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one message (blocking socket), fds attached to its first byte."""
    data = encode(message)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])
