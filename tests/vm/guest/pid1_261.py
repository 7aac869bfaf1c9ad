#!/usr/bin/env python3
"""In-guest half of tests/vm/test_luo_fdstore.py: this process plays systemd 261's PID 1
for fdboxd, since the guest has no systemd 261 (and no systemd at all).

What it plays, from systemd's source (src/core/luo.c, src/shared/luo-util.c): the
Varlink socket ``/run/systemd/io.systemd.Manager`` answering Describe with version 261;
a notify socket with an fd store (FDSTORE=1, FDSTOREREMOVE=1, BARRIER=1); starting
fdboxd with the store in LISTEN_FDS; keeping the store's session fds open into the
kexec (systemd-shutdown's job); and after the kexec retrieving each session by name
and handing it back in LISTEN_FDS (PID 1's job). What it does not play: the "systemd"
session for plain memfds, which fdboxd's sealed boxes do not need.

``boot1`` seals two boxes, restarts fdboxd from the store, unseals and seals one box
again, stops fdboxd and keeps the sessions (it stays alive: run it in the background
and wait for ``/out/pid1-261-boot1.json``). ``boot2`` retrieves the sessions named in
``/out/pid1-261-store.json`` and starts fdboxd with them; the host test judges both.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "tests/vm/guest"))

from luo_stages import check, make  # noqa: E402

from fdboxd import uapi_luo  # noqa: E402
from fdboxd.client import Client  # noqa: E402

SOCK = "/run/fdbox/fdboxd.sock"
NOTIFY = "/run/pid1/notify"
MANAGER = "/run/systemd/io.systemd.Manager"
BOXES = {"vm1": [("ram0", 4), ("ram1", 2)], "vm2": [("ram0", 3)]}


class Pid1:
    def __init__(self, version: str = "261.1-1", preserve: bool = True) -> None:
        """``version``: what Describe says; ``preserve``: the unit has FileDescriptorStorePreserve=yes
        (both for tests/vm/guest/carry_stages.py, which plays 252: the holder keeps the sessions)."""
        self.version = version
        self.preserve = preserve
        os.makedirs("/run/pid1", exist_ok=True)
        os.makedirs("/run/systemd", exist_ok=True)
        self.store: dict[str, int] = {}
        self.messages: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(NOTIFY)
        self.varlink = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.varlink.bind(MANAGER)
        self.varlink.listen(4)
        threading.Thread(target=self._notify, daemon=True).start()
        threading.Thread(target=self._describe, daemon=True).start()
        self.proc: subprocess.Popen[bytes] | None = None

    def _describe(self) -> None:
        while True:
            conn, _ = self.varlink.accept()
            with conn:
                conn.recv(65536)
                reply = {"parameters": {"context": {}, "runtime": {"Version": self.version}}}
                conn.sendall(json.dumps(reply).encode() + b"\0")

    def _notify(self) -> None:
        size = array.array("i").itemsize
        while True:
            data, anc, _f, _a = self.notify.recvmsg(65536, socket.CMSG_SPACE(16 * size))
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % size]))
            for fd in fds:  # systemd receives with MSG_CMSG_CLOEXEC: no fdboxd inherits them
                os.set_inheritable(fd, False)
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.lock:
                self.messages.append(msg)
                if msg.get("FDSTORE") == "1" and len(fds) == 1:
                    old = self.store.pop(msg["FDNAME"], None)
                    if old is not None:
                        os.close(old)
                    self.store[msg["FDNAME"]] = fds.pop()
                elif msg.get("FDSTOREREMOVE") == "1":
                    old = self.store.pop(msg["FDNAME"], None)
                    if old is not None:
                        os.close(old)
            for fd in fds:  # BARRIER=1's pipe among them: closing it answers the barrier
                os.close(fd)

    def start(self, passed: list[tuple[str, int]], log: str) -> None:
        """fdboxd as systemd starts it: fds 3.. named in LISTEN_FDNAMES, LISTEN_PID its own."""
        src = []
        for _, fd in passed:  # dups above the target range, so dup2 cannot clobber one
            low: list[int] = []
            dup = os.dup(fd)
            while dup < 3 + len(passed):
                low.append(dup)
                dup = os.dup(fd)
            for extra in low:  # no stray copy may keep a session alive
                os.close(extra)
            src.append(dup)

        def place() -> None:
            for i, fd in enumerate(src):
                os.dup2(fd, 3 + i)

        env = dict(os.environ, NOTIFY_SOCKET=NOTIFY, FDSTORE="16384",
                   LISTEN_FDS=str(len(passed)), LISTEN_FDNAMES=":".join(n for n, _ in passed))
        if self.preserve:
            env["FDBOX_FDSTORE_PRESERVE"] = "yes"
        since = len(self.messages)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-m", "fdboxd", "--backend",
                 "liveupdate", "--socket", SOCK, "--state-dir", "/var/lib/fdbox"],
                env=env, stdout=out, stderr=out, close_fds=False, preexec_fn=place)  # src: CLOEXEC dups
        for fd in src:
            os.close(fd)
        deadline = time.monotonic() + 300
        while not any(m.get("READY") == "1" for m in self.messages[since:]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fdboxd did not become ready (exit {self.proc.poll()})")
            time.sleep(0.2)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(60)

    def snapshot(self) -> dict[str, str]:
        """The store: FDNAME -> what the fd is (a session's name, or a memfd)."""
        with self.lock:
            return {n: os.readlink(f"/proc/self/fd/{fd}") for n, fd in sorted(self.store.items())}


def holders() -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if argv0.startswith("@fdboxd"):
            out.append(argv0)
    return out


def boot1() -> None:
    os.makedirs("/run/fdbox", exist_ok=True)
    os.makedirs("/var/lib/fdbox", exist_ok=True)
    pid1 = Pid1()
    pid1.start([], "/out/fdboxd-261-a.log")
    res: dict[str, object] = {}
    with Client(SOCK) as c:
        for box, regions in BOXES.items():
            fds = [make(box, n, mib, "261") for n, mib in regions]
            c.put_many(box, [(n, fd) for (n, _), fd in zip(regions, fds)])
            for fd in fds:
                os.close(fd)
        c.seal("vm1")
        c.seal("vm2")
    res["sealed"] = pid1.snapshot()
    res["holders_sealed"] = holders()
    pid1.stop()
    with pid1.lock:
        kept = sorted(pid1.store.items())
    pid1.start(kept, "/out/fdboxd-261-b.log")  # a restart: the store comes back in LISTEN_FDS
    with Client(SOCK) as c:
        res["status_restarted"] = c.status()
        c.unseal("vm2")
        res["unsealed"] = pid1.snapshot()
        c.seal("vm2")  # a session named vm2 again, at once: the old one must be gone
    res["resealed"] = pid1.snapshot()
    res["holders"] = holders()
    pid1.stop()
    with pid1.lock:
        sessions = {n: uapi_luo.LuoSession(fd).get_name() for n, fd in pid1.store.items() if n.startswith("luo#")}
    _write("/out/pid1-261-store.json", sessions)
    _write("/out/pid1-261-boot1.json", res)  # last: the stage waits for it
    while True:  # systemd-shutdown's part: keep the sessions open into the kexec
        time.sleep(3600)


def boot2() -> None:
    os.makedirs("/run/fdbox", exist_ok=True)
    with open("/out/pid1-261-store.json") as f:
        sessions = json.load(f)
    dev = uapi_luo.LuoDevice()
    got = [(fdname, dev.retrieve_session(name).fd) for fdname, name in sorted(sessions.items())]
    dev.close()  # PID 1 is done with the device before fdboxd starts
    pid1 = Pid1()
    pid1.store = {fdname: os.dup(fd) for fdname, fd in got}  # PID 1 puts them in the unit's store
    pid1.start(got, "/out/fdboxd-261-c.log")
    for _, fd in got:
        os.close(fd)
    res: dict[str, object] = {"passed": sorted(sessions)}
    with Client(SOCK) as c:
        res["status"] = c.status()
        res["verified"] = {}
        for box, regions in BOXES.items():
            entries = {e["name"]: fd for e, fd in c.get_box(box)}
            for n, mib in regions:
                fd = entries.pop(n, None)
                res["verified"][f"{box}/{n}"] = "missing" if fd is None else check(fd, box, n, mib, "261")
                if fd is not None:
                    os.close(fd)
    res["store"] = pid1.snapshot()
    res["removed"] = sorted(m["FDNAME"] for m in pid1.messages if m.get("FDSTOREREMOVE") == "1")
    res["holders"] = holders()
    pid1.stop()
    _write("/out/pid1-261-boot2.json", res)


def _write(path: str, doc: object) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.rename(path + ".tmp", path)


if __name__ == "__main__":
    {"boot1": boot1, "boot2": boot2}[sys.argv[1]]()
