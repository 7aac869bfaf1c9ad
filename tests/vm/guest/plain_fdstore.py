"""A plain service that keeps one memfd in systemd's fd store (FileDescriptorStorePreserve=yes).

Run as ``Type=notify`` by tests/vm/test_debian_roots.py beside fdboxd, with the root's
own python3 and nothing of fdbox: the first start (no ``LISTEN_FDS``) makes a 4 MiB memfd
with a pattern, pushes it (``FDSTORE=1``, ``FDNAME=plain``) and says ``READY=1``; a later
start (after the kexec, systemd 262 having carried the store through its LUO session
``systemd``) gets it back in ``LISTEN_FDS`` and checks it. Each start appends one line,
``plain: stored|back|missing|damaged sha256=...``, to ``/out/plain.txt`` and the journal.
"""

from __future__ import annotations

import array
import hashlib
import os
import signal
import socket

SIZE = 4 << 20
FDNAME = "plain"


def pattern() -> bytes:
    block = hashlib.sha256(b"fdbox plain fd store").digest() * 128  # 4 KiB
    return block * (SIZE // len(block))


def notify(text: str, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([text.encode()], anc, 0, addr)


def say(line: str) -> None:
    print(line, flush=True)
    with open("/out/plain.txt", "a") as f:
        f.write(line + "\n")


def main() -> None:
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    n = int(os.environ.get("LISTEN_FDS", "0")) if os.environ.get("LISTEN_PID") == str(os.getpid()) else 0
    mine = [3 + i for i in range(n) if i < len(names) and names[i] == FDNAME]
    if mine:
        data = os.pread(mine[0], SIZE + 1, 0)
        ok = data == pattern()
        say(f"plain: {'back' if ok else 'damaged'} sha256={hashlib.sha256(data).hexdigest()} size={len(data)}")
    elif os.path.exists("/out/plain.txt"):
        say("plain: missing (no fd named plain in LISTEN_FDS)")
    else:
        fd = os.memfd_create("plain", os.MFD_CLOEXEC)
        os.write(fd, pattern())
        notify(f"FDSTORE=1\nFDNAME={FDNAME}", [fd])
        say(f"plain: stored sha256={hashlib.sha256(pattern()).hexdigest()} size={SIZE}")
        os.close(fd)
    notify("READY=1")
    signal.pause()


if __name__ == "__main__":
    main()
