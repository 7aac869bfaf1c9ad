"""The LUO session holder: a tiny process that keeps sealed sessions open until kexec.

A LUO session preserves its files only while its fd is open, up to the kexec itself
(closing an outgoing session unpreserves everything in it). fdboxd does not live that
long under systemd: ``systemd-shutdown`` kills every remaining process before it calls
kexec, sparing only root processes whose ``argv[0]`` starts with ``@`` (systemd's
"root storage daemon" rule, src/shared/killall.c). So fdboxd hands each sealed
session fd to this holder, started as ``@fdboxd-luo-holder``, and keeps none itself.

Run as a script (``python3 <this file>``, by path: it imports nothing from fdboxd, so
it cannot break when the package moves). ``argv[1]`` is the fd of a SOCK_SEQPACKET socket to fdboxd;
each request is one datagram, answered by one datagram ``ok`` or ``error …``:

- ``hold NAME`` with one fd (SCM_RIGHTS): keep it as NAME (replacing and closing an
  older fd of that name);
- ``drop NAME``: close it (for unseal: the kernel unpreserves when the last fd goes);
- ``lend``: send a copy of every held fd, one datagram ``fd NAME`` each, then ``ok``,
  and keep holding them; ``forget``: close every held fd. A restarted fdboxd reclaims
  its sessions with ``lend``, hands each to its own keeper, and only then says
  ``forget``: create before drop, so a restarted fdboxd that dies half-way through a
  reclaim leaves every session held;
- ``take``: ``lend`` and ``forget`` in one (the request of fdboxd before ``lend``).

When fdboxd goes away (EOF), the holder keeps its fds and listens on the abstract
socket :data:`RECLAIM_ADDRESS` so a new fdboxd can ``take`` them; it answers only root
peers (``SO_PEERCRED``). It exits when it holds nothing, and is otherwise ended by the
kexec.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import sys

RECLAIM_ADDRESS = "\0fdboxd:luo-holder"
ARGV0 = "@fdboxd-luo-holder"
MAX_MSG = 4096


def recv_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def _serve(sock: socket.socket, held: dict[str, int]) -> None:
    """Answer requests until EOF."""
    while True:
        try:
            msg, fds = recv_message(sock)
        except OSError:
            return
        if not msg and not fds:
            return
        cmd, _, name = msg.decode(errors="replace").partition(" ")
        reply = "ok"
        if cmd == "hold" and len(fds) == 1 and name:
            old = held.pop(name, None)
            if old is not None:
                os.close(old)
            held[name] = fds.pop()
        elif cmd == "drop" and name:
            old = held.pop(name, None)
            reply = "ok" if old is not None else "error not held"
            if old is not None:
                os.close(old)
        elif cmd in ("lend", "take", "forget") and not name:
            if cmd != "forget":
                for n, fd in sorted(held.items()):
                    sock.sendmsg([f"fd {n}".encode()],
                                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            if cmd != "lend":
                for fd in held.values():
                    os.close(fd)
                held.clear()
        else:
            reply = "error bad request"
        for fd in fds:  # anything unexpected
            os.close(fd)
        sock.send(reply.encode())


def main() -> int:
    # Signals from the terminal or a stopping service are not ours to act on: only
    # losing everything we hold ends us (or the kexec). SIGKILL still works.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    held: dict[str, int] = {}
    first = socket.socket(fileno=int(sys.argv[1]))
    _serve(first, held)
    first.close()
    if not held:
        return 0
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        lsock.bind(RECLAIM_ADDRESS)
        lsock.listen(1)
    except OSError:
        signal.pause()  # name squatted: keep holding until the kexec, reclaim impossible
        return 0
    while held:
        conn, _ = lsock.accept()
        with conn:
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.geteuid():
                continue
            _serve(conn, held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
