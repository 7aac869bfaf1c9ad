"""sd_notify(3) without libsystemd: the one definition of the notify protocol here.

Its own module, on the standard library alone, because two kinds of process speak it:
fdboxd (through :mod:`fdboxd.systemd`) and the small process ``fdbox-qemu start``
forks to say when a guest runs (:mod:`fdboxd.qemu.vm`), which must not import the
daemon's store and asyncio just to send one datagram.

The protocol: one ``AF_UNIX``/``SOCK_DGRAM`` datagram of ``KEY=value`` lines to
``$NOTIFY_SOCKET`` (``@`` = abstract), fds as ``SCM_RIGHTS``; sd_notify(3) calls it
stable. ``BARRIER=1`` (systemd >= 246) carries the write end of a pipe that systemd
closes once it has handled every earlier message: a sender that exits right after
notifying must wait for it, because systemd (252) finds a message's unit from the
sender's pid and drops messages from a pid that is already gone.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket

log = logging.getLogger("fdboxd.systemd")


class Notifier:
    """sd_notify(3) without libsystemd. A no-op when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, address: str | None = None) -> None:
        addr = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address: str | None = None
        self.sock: socket.socket | None = None
        if addr and (addr.startswith("/") or addr.startswith("@")):
            self.address = "\0" + addr[1:] if addr.startswith("@") else addr
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A datagram socket blocks when the receiver's queue is full. systemd reads
            # promptly; if it does not, the loop waits at most this long per message.
            self.sock.settimeout(2.0)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, text: str, fds: list[int] | tuple[int, ...] = (), droppable: bool = False) -> bool:
        """Send one message; ``droppable`` ones (WATCHDOG=1) never wait for queue space."""
        if self.sock is None:
            return False
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            self.sock.sendmsg([text.encode()], anc, socket.MSG_DONTWAIT if droppable else 0, self.address)
            return True
        except BlockingIOError:
            return False  # a full queue: the next ping will do
        except OSError as e:
            log.warning("sd_notify %r failed: %s", text.split("\n", 1)[0], e)
            return False

    def barrier(self, timeout: float = 5.0) -> bool:
        """sd_notify_barrier(3): wait until the receiver handled every earlier message."""
        if self.sock is None:
            return False
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            sent = self.send("BARRIER=1", [w])
            os.close(w)
            w = -1
            if not sent:
                return False
            p = select.poll()
            p.register(r, select.POLLHUP)
            return bool(p.poll(timeout * 1000))
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
