"""A real Linux guest that holds one TCP connection, for the ``fdbox-qemu --tap`` tests.

The guest is the test kernel (``../shared/testkernel/bzImage``, virtio-net built in)
with an initramfs built here from the static busybox: its /init sets the address given
on the command line (``fdbox.addr=``) on eth0, connects once with ``nc`` to
``fdbox.server=HOST:PORT`` and writes ``TOKEN N`` there every second, N counting from
0, TOKEN drawn at boot. It never reconnects: when the connection ends, the guest says
so on the console and powers off. So a server that sees one connection whose counter
goes on without a gap has seen the same guest and the same connection throughout.

:class:`Server` is that server, listening in the test's network namespace;
:func:`assert_continues` is the check the tests make after a resume, and which their
controls (a tap that is not the held one, fresh RAM) must fail.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "vm"))
import vmlib  # noqa: E402

LINE_RE = re.compile(r"([0-9a-f]{8}) (\d+)")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    fdbox.addr=*) addr=${arg#*=} ;;
    fdbox.server=*) server=${arg#*=} ;;
    esac
done
ip link set lo up
ip link set eth0 up
ip addr add "$addr" dev eth0
token=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \\n')
echo "guest: up token=$token queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
i=0
while :; do
    echo "$token $i"
    echo "guest: sent $i" > /dev/console
    i=$((i + 1))
    sleep 1
done | nc "${server%:*}" "${server#*:}"
echo "guest: connection closed"
poweroff -f
"""


def kernel() -> Path | None:
    k = vmlib.find_test_kernel()
    return k.bzimage if k else None


def build_initramfs(out_dir: Path) -> Path:
    """An uncompressed newc cpio: static busybox and the /init above."""
    bb = vmlib.busybox_path()
    if bb is None:
        raise FileNotFoundError("no static busybox (apt install busybox-static)")
    d, f, c = 0o040755, 0o100755, 0o020600
    entries = [(n, d, b"", 0, 0) for n in ("bin", "dev", "proc", "sys")] + [
        ("dev/console", c, b"", 5, 1),
        ("bin/busybox", f, bb.read_bytes(), 0, 0),
        ("init", f, INIT.encode(), 0, 0),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "netguest.cpio"
    path.write_bytes(vmlib.cpio_newc(entries))
    return path


def qemu_args(bzimage: Path, initrd: Path, serial: Path, *, addr: str, server: str, netdev: str, mac: str,
              queues: int = 1) -> list[str]:
    """QEMU-ARGS: TCG, one vCPU, the kernel and initramfs, a virtio-net NIC on ``netdev``."""
    nic = f"virtio-net-pci,netdev={netdev},mac={mac}"
    if queues > 1:
        nic += f",mq=on,vectors={2 * queues + 2}"
    return ["-accel", "tcg", "-smp", "1", "-display", "none", "-vga", "none", "-nodefaults", "-no-user-config",
            "-no-reboot", "-kernel", str(bzimage), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 fdbox.addr={addr} fdbox.server={server}",
            "-device", nic, "-serial", f"file:{serial}", "-monitor", "none"]


class Server:
    """A TCP server in a network namespace; ``lines[i]`` is what connection i sent."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.port = listener.getsockname()[1]
        self.lines: list[list[str]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.lines.append([])
                mine = self.lines[-1]
            threading.Thread(target=self._read, args=(conn, mine), daemon=True).start()

    def _read(self, conn: socket.socket, mine: list[str]) -> None:
        buf = b""
        with conn:
            while data := conn.recv(4096):
                buf += data
                *done, buf = buf.split(b"\n")
                with self.lock:
                    mine += [d.decode(errors="replace") for d in done]

    def snapshot(self) -> list[list[str]]:
        with self.lock:
            return [list(x) for x in self.lines]

    def close(self) -> None:
        self.listener.close()


def counters(lines: list[str]) -> tuple[str, list[int]]:
    """(token, counters) of one connection; AssertionError on a line that is not ``TOKEN N``."""
    parsed = [LINE_RE.fullmatch(x) for x in lines]
    assert all(parsed), lines
    tokens = {m.group(1) for m in parsed if m}
    assert len(tokens) <= 1, f"one connection, two guests: {tokens}"
    return (tokens.pop() if tokens else ""), [int(m.group(2)) for m in parsed if m]


def wait_lines(server: Server, count: int, timeout: float) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        got = server.snapshot()
        if (got and len(got[0]) >= count) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def assert_continues(server: Server, before: int, *, more: int = 3, timeout: float = 30.0) -> list[int]:
    """The one connection of ``server`` sent ``more`` further counters after the first
    ``before`` lines, with no gap, and no second connection came: the same guest and the
    same TCP connection went on. Returns the counters."""
    got = wait_lines(server, before + more, timeout)
    assert len(got) == 1, f"{len(got)} connections: the guest reconnected (or never connected)"
    _, ns = counters(got[0])
    assert ns == list(range(len(ns))), f"counter gap or restart: {ns}"
    assert len(ns) >= before + more, f"the connection did not go on: {len(ns)} counters, {before} before"
    return ns


def tap_fds(pid: int, ifname: str) -> list[int]:
    """The fds of process ``pid`` that are queues of tap ``ifname`` (tun's fdinfo ``iff:``)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if re.search(rf"^iff:\s+{re.escape(ifname)}$", info, re.MULTILINE):
            out.append(int(fd))
    return sorted(out)
