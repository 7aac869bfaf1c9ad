"""fdboxd and systemd's protocols, with the test playing systemd.

A real ``NOTIFY_SOCKET`` datagram socket receives READY=1, STATUS=, WATCHDOG=1 and the
FDSTORE=1 messages with their fds; the daemon is then stopped and started again with
those fds passed back the way systemd passes them (``LISTEN_PID``/``LISTEN_FDS``/
``LISTEN_FDNAMES``, the Varlink socket first), and every entry must be there with its
bytes, owner and state. Socket activation alone is checked with the real
``systemd-socket-activate``; the journal with a datagram socket standing in for
journald's.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fdboxtest import READY_TIMEOUT, REPO, DaemonProcess, memfd_with, pattern, run_as_user, wait_for

from fdboxd.backends.memory import MemoryBackend
from fdboxd.backends.mixed import MixedBackend
from fdboxd.client import Client, read_all
from fdboxd.errors import FdboxError
from fdboxd.fdtypes import FdType
from fdboxd.manifest import Manifest
from fdboxd.model import Caller
from fdboxd.store import Store
from fdboxd.systemd import (
    FDNAME_MAX,
    Activation,
    FdStoreKeeper,
    Notifier,
    SystemdIntegration,
    adopt_store_fds,
    fdname_for,
    fdname_is_valid,
    manager_version,
    parse_fdname,
)

OTHER_UID = 65534


F_DUPFD_QUERY = 1027  # fcntl(2), Linux 6.10


def _same_fd(a: int, b: int) -> bool:
    """systemd's same_fd() (src/basic/fd-util.c), which service_add_fd_store() asks of
    every stored fd before it stores one: the same open file description."""
    import fcntl

    return fcntl.fcntl(a, F_DUPFD_QUERY, b) == 1


class NotifySocket:
    """What systemd's end of NOTIFY_SOCKET sees: messages, and the fds they carried.

The fd store keeps an fd as systemd's service_add_fd_store() does: one whose open file
description is stored already (under any name) is closed and not stored.

    A thread reads all the time, as systemd does: an unread datagram socket fills up
    and would make the daemon wait.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self.store: dict[str, int] = {}  # FDNAME -> fd, maintained like systemd's fdstore
        self.dropped: list[str] = []  # FDNAMEs of fds the store had already (same_fd)
        self.lock = threading.Lock()
        # Called in the reader thread with each message, before the next is read: a
        # sender waiting on BARRIER=1 (sent after the message) is still waiting then.
        self.on_message: Callable[[dict[str, str]], None] | None = None
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fd_size = array.array("i").itemsize
        while self.running:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(253 * fd_size))
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % fd_size]))
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if self.on_message is not None:
                self.on_message(msg)
            with self.lock:
                self.messages.append(msg)
                if msg.get("FDSTORE") == "1":
                    assert len(fds) == 1 and fdname_is_valid(msg["FDNAME"]), msg
                    if any(_same_fd(held, fds[0]) for held in self.store.values()):
                        os.close(fds[0])  # systemd keeps an open file once: this name is dropped
                        self.dropped.append(msg["FDNAME"])
                        continue
                    old = self.store.pop(msg["FDNAME"], None)
                    if old is not None:
                        os.close(old)
                    self.store[msg["FDNAME"]] = fds[0]
                    continue
                if msg.get("FDSTOREREMOVE") == "1":
                    old = self.store.pop(msg["FDNAME"], None)
                    if old is not None:
                        os.close(old)
            for fd in fds:
                os.close(fd)

    def wait(self, predicate, timeout: float = max(10.0, READY_TIMEOUT)) -> bool:  # type: ignore[no-untyped-def]
        return wait_for(predicate, timeout)

    def seen(self, key: str, value: str | None = None, since: int = 0) -> list[dict[str, str]]:
        with self.lock:
            return [m for m in self.messages[since:] if key in m and (value is None or m[key] == value)]

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        for fd in self.store.values():
            os.close(fd)
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(tmp_path / "notify")
    yield n
    n.close()


def launch_activated(d: DaemonProcess, passed: list[tuple[str, int]], env: dict[str, str]) -> subprocess.Popen:
    """Start ``d``'s command as systemd would: fds 3.. in order, LISTEN_* naming them."""
    src = [os.dup(fd) for _, fd in passed]  # above the target range, so dup2 cannot clobber
    while any(fd < 3 + len(src) for fd in src):
        src = [os.dup(fd) if fd < 3 + len(src) else fd for fd in src]

    def place() -> None:
        for i, fd in enumerate(src):
            os.dup2(fd, 3 + i)

    full_env = dict(os.environ)
    full_env.pop("NOTIFY_SOCKET", None)
    full_env.update(env, PYTHONPATH=str(REPO), LISTEN_FDS=str(len(passed)),
                    LISTEN_FDNAMES=":".join(name for name, _ in passed))
    log = open(d.log_path, "ab")
    try:
        proc = subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *d.command()], env=full_env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(REPO),
                                pass_fds=list(range(3, 3 + len(src))), preexec_fn=place)
    finally:
        log.close()
        for fd in src:
            os.close(fd)
    d.proc = proc
    d.wait_ready()
    return proc


def restart_from_fdstore(d: DaemonProcess, notify: NotifySocket, kept: dict[str, int]) -> subprocess.Popen:
    """Restart ``d`` as systemd does after a stop: the Varlink socket (named by the socket
    unit) first, then the fdstore ``kept`` in LISTEN_FDNAMES. The caller keeps its copies
    of the fds, as systemd does."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(d.socket):  # fdboxd removes the socket file it bound
            os.unlink(d.socket)
        listener.bind(d.socket)
        listener.listen(16)
        return launch_activated(d, [("varlink", listener.fileno()), *sorted(kept.items())],
                                {"NOTIFY_SOCKET": notify.path})
    finally:
        listener.close()


def test_fdname_encoding():
    assert fdname_for("vm1", "ram0") == "vm1/ram0"
    assert parse_fdname("vm1/ram0") == ("vm1", "ram0")
    assert parse_fdname("varlink") is None and parse_fdname("fdboxd.socket") is None
    long = "e" + "x" * 254
    name = fdname_for("b" * 63, long)
    assert len(name) <= FDNAME_MAX and fdname_is_valid(name) and name.startswith("b" * 63 + "/#")
    assert fdname_for("b" * 63, long) != fdname_for("b" * 63, long[:-1] + "y")
    assert not fdname_is_valid("a:b") and not fdname_is_valid("x" * 256) and not fdname_is_valid("a\nb")


def test_notify_fdstore_and_restart_with_the_fds_passed_back(daemon_factory, notify, tmp_path):
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"}
    d = daemon_factory(env=env)
    assert notify.wait(lambda: notify.seen("READY", "1")), d.log()
    ready = notify.seen("READY", "1")[0]
    assert "0 entries" in ready["STATUS"] and ready["MAINPID"] == str(d.pid)
    assert notify.wait(lambda: len(notify.seen("WATCHDOG", "1")) >= 3), "no watchdog pings"

    blobs = {
        ("vm1", "ram0"): pattern(64 * 1024 + 5, seed=1),
        ("vm1", "ram1"): pattern(4096, seed=2),
        ("vm2", "disk"): b"second box",
        ("vm2", "gone"): b"removed before the restart",
        ("vm3", "l" + "o" * 254): b"a name too long for box/entry as FDNAME",
    }
    with d.client() as c:
        for (box, name), data in blobs.items():
            fd = memfd_with(data)
            c.put(box, name, fd, {"k": name[:8]})
            os.close(fd)
        c.remove("vm2", "gone")
        c.seal("vm1")
    del blobs[("vm2", "gone")]

    def nobody_puts() -> str:
        fd = memfd_with(b"owned by nobody")
        with Client(d.socket) as c:
            c.put("nobox", "mine", fd)
        return "ok"

    assert run_as_user(OTHER_UID, nobody_puts) == {"ok": "ok"}
    blobs[("nobox", "mine")] = b"owned by nobody"

    want = {fdname_for(b, n) for b, n in blobs}
    assert fdname_for("vm3", "l" + "o" * 254).startswith("vm3/#")  # the hashed form is exercised
    assert notify.wait(lambda: set(notify.store) == want), (sorted(notify.store), notify.messages[-3:])
    with notify.lock:
        kept = dict(notify.store)
    assert notify.seen("FDSTOREREMOVE", "1")[0]["FDNAME"] == "vm2/gone"
    assert any("5 entries" in m["STATUS"] for m in notify.seen("STATUS"))
    for (box, name), data in blobs.items():  # systemd holds the very same files
        assert read_all(kept[fdname_for(box, name)]) == data

    assert d.stop() == 0
    assert notify.wait(lambda: notify.seen("STOPPING", "1")), d.log()
    time.sleep(0.2)
    assert len(notify.seen("STOPPING", "1")) == 1

    # Restart as systemd does: the Varlink socket first, then the fdstore.
    n_before = len(notify.messages)
    restart_from_fdstore(d, notify, kept)
    assert notify.wait(lambda: notify.seen("READY", "1", since=n_before)), d.log()
    with d.client() as c:
        st = c.status()
        assert st["entries"] == len(blobs) and not st["lost"] and not st["adopted"], st
        listed = {(e["box"], e["name"]): e for e in c.list()["entries"]}
        boxes = {b["name"]: b for b in c.list()["boxes"]}
        for (box, name), data in blobs.items():
            entry, fd = c.get(box, name)
            try:
                assert read_all(fd) == data, (box, name)
            finally:
                os.close(fd)
        assert listed[("nobox", "mine")]["uid"] == OTHER_UID  # owners come from the manifest
        assert listed[("vm1", "ram0")]["metadata"] == {"k": "ram0"}
        assert boxes["vm1"]["state"] == "sealed" and boxes["vm2"]["state"] == "open"
    assert "adopted %d fds from the systemd fd store" % len(blobs) in d.log()
    # Nothing adopted is pushed again, nothing is removed: the store stays as it was.
    time.sleep(0.3)
    assert not notify.seen("FDSTORE", since=n_before) and not notify.seen("FDSTOREREMOVE", since=n_before)
    d.stop()


def test_unknown_store_fd_is_adopted_as_roots(daemon_factory, notify):
    """An fd the manifest does not know (e.g. the manifest was lost) is kept, as root's."""
    d = daemon_factory(start=False, env={"NOTIFY_SOCKET": notify.path})
    fd = memfd_with(b"orphan")
    launch_activated(d, [("orph/ram0", fd)], {"NOTIFY_SOCKET": notify.path})
    os.close(fd)
    with d.client() as c:
        st = c.status()
        assert st["adopted"] == [{"box": "orph", "name": "ram0", "type": "memfd", "uid": 0}]
        entry, got = c.get("orph", "ram0")
        assert read_all(got) == b"orphan" and entry["uid"] == 0
        os.close(got)
    d.stop()


def test_socket_activation_with_systemd_socket_activate(daemon_factory):
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate not installed")
    d = daemon_factory(start=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = open(d.log_path, "ab")
    proc = subprocess.Popen(["systemd-socket-activate", "-l", d.socket, "--fdname=varlink",
                             "-E", "PYTHONPATH", *d.command()],
                            env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    try:
        assert wait_for(lambda: os.path.exists(d.socket), 10)
        fd = memfd_with(b"activated")
        with Client(d.socket) as c:  # the first connection starts fdboxd on the passed socket
            c.put("act", "m", fd)
            entry, got = c.get("act", "m")
            assert read_all(got) == b"activated"
            os.close(got)
        os.close(fd)
        assert "socket activation: Varlink listener from fd 3 (varlink)" in d.log()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_journal_fields_when_stderr_is_journald(daemon_factory, tmp_path):
    jsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    jsock.bind(str(tmp_path / "journal"))
    jsock.settimeout(5)
    d = daemon_factory(start=False)
    d.log_path.touch()
    st = os.stat(d.log_path)
    d.env.update(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", FDBOX_JOURNAL_SOCKET=str(tmp_path / "journal"))
    d.start()
    fd = memfd_with(b"j")
    with d.client() as c:
        c.put("jbox", "jentry", fd)
    os.close(fd)
    records = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(r.get("FDBOX_OP") == "Put" for r in records):
        data = jsock.recv(65536)
        records.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))
    put = [r for r in records if r.get("FDBOX_OP") == "Put"]
    assert put, records
    assert put[0]["FDBOX_BOX"] == "jbox" and put[0]["FDBOX_ENTRY"] == "jentry"
    assert put[0]["SYSLOG_IDENTIFIER"] == "fdboxd" and put[0]["PRIORITY"] == "6"
    assert "Put jbox/jentry by uid 0" in put[0]["MESSAGE"]
    assert "Put jbox/jentry" not in d.log()  # went to the journal, not to stderr
    d.stop()
    jsock.close()


def test_plain_logs_without_journald(daemon):
    fd = memfd_with(b"p")
    with daemon.client() as c:
        c.put("pbox", "p", fd)
    os.close(fd)
    assert wait_for(lambda: "fdboxd: INFO Put pbox/p by uid" in daemon.log())


def test_core_runs_without_optional_dependencies(tmp_path):
    """``python3 -m fdboxd --user`` imports neither dbus_fast nor systemd-python."""
    code = ("import sys, fdboxd.daemon, fdboxd.systemd; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('dbus_fast', 'systemd')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO),
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------- LUO sessions, systemd >= 261
#
# What can be tested with systemd 252: the choice (from a real io.systemd.Manager
# socket answering Describe as 261 would), fdboxd's end of the fd store (FDSTORE=1,
# FDSTOREREMOVE=1, BARRIER=1 against a real notify socket) and the sessions coming back
# in LISTEN_FDS. Memfds stand in for session fds (the store never looks inside, as in
# tests/unit/test_luo_holder.py); real sessions need /dev/liveupdate (tests/vm). PID 1
# carrying them across a kexec needs systemd 261 itself, which these machines do not have.


class ManagerVarlink:
    """PID 1's /run/systemd/io.systemd.Manager: answers Describe with ``reply``."""

    def __init__(self, path: Path, reply: dict) -> None:
        self.path = str(path)
        self.reply = reply
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.calls: list[dict] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\0" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                self.calls.append(json.loads(buf.partition(b"\0")[0]))
                conn.sendall(json.dumps(self.reply).encode() + b"\0")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def describe(version: str) -> dict:
    return {"parameters": {"context": {"ShowStatus": False}, "runtime": {"Version": version, "Architecture": "x86-64"}}}


def test_manager_version_is_asked_of_pid1_over_varlink(tmp_path):
    assert manager_version(str(tmp_path / "absent")) is None  # systemd < 257: no such socket
    for i, (version, major) in enumerate([("252.39-1~deb12u1", 252), ("261.1-1", 261), ("262~rc1", 262)]):
        m = ManagerVarlink(tmp_path / f"m{i}", describe(version))
        try:
            assert manager_version(m.path) == major
            assert m.calls == [{"method": "io.systemd.Manager.Describe"}]
        finally:
            m.close()
    m = ManagerVarlink(tmp_path / "err", {"error": "org.varlink.service.MethodNotFound", "parameters": {}})
    try:
        assert manager_version(m.path) is None
    finally:
        m.close()


def test_keeper_choice_from_the_service_environment(tmp_path, notify):
    unit = {"NOTIFY_SOCKET": notify.path, "FDSTORE": "16384", "FDBOX_FDSTORE_PRESERVE": "yes"}
    for version, keeps in [("252.39-1~deb12u1", False), ("260.1", False), ("261.1-1", True), ("262", True)]:
        m = ManagerVarlink(tmp_path / f"m-{version}", describe(version))
        try:
            keeper = FdStoreKeeper.from_environ(unit, manager=m.path)
            assert keeper is not None and keeper.keeps_sessions is keeps, version
            keeper.close()
            without = FdStoreKeeper.from_environ(dict(unit, FDBOX_FDSTORE_PRESERVE=""), manager=m.path)
            assert without is not None and not without.keeps_sessions  # the drop-in is missing
            without.close()
        finally:
            m.close()
    assert FdStoreKeeper.from_environ({"FDSTORE": "16384"}, manager=str(tmp_path / "x")) is None  # no systemd


def test_fdstore_keeper_holds_and_drops_sessions(notify):
    """hold/drop return only once systemd processed them (BARRIER=1): no waiting here."""
    keeper = FdStoreKeeper(Notifier(notify.path))
    box, index = memfd_with(b"session vm1"), memfd_with(b"index session")
    st = os.fstat(box)
    try:
        keeper.hold("vm1", box)
        keeper.hold("fdboxd:index", index)
    finally:
        os.close(box)  # fdboxd keeps no copy: the store's is the one that keeps it preserved
        os.close(index)
    with notify.lock:
        assert set(notify.store) == {"luo#vm1", "luo#fdboxd#index"}, notify.store
        held = os.fstat(notify.store["luo#vm1"])
    assert (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)
    pushed = notify.seen("FDSTORE", "1")
    assert [m["FDNAME"] for m in pushed] == ["luo#vm1", "luo#fdboxd#index"]
    assert all(m["FDPOLL"] == "0" for m in pushed)  # a session fd has no poll of its own
    assert len(notify.seen("BARRIER", "1")) == 2
    keeper.drop("vm1")  # unseal: systemd closes the last copy, the kernel unpreserves
    with notify.lock:
        assert set(notify.store) == {"luo#fdboxd#index"}
    keeper.close()


def test_fdstore_keeper_fails_when_systemd_does_not_answer(tmp_path):
    """A manager that never reads: the seal fails in bounded time instead of trusting it."""
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(tmp_path / "deaf"))
    keeper = FdStoreKeeper(Notifier(str(tmp_path / "deaf")), barrier_timeout=0.3)
    fd = memfd_with(b"x")
    try:
        t0 = time.monotonic()
        with pytest.raises(FdboxError) as e:
            keeper.hold("vm1", fd)
        assert e.value.name == "BackendUnavailable" and "BARRIER" in e.value.message
        assert time.monotonic() - t0 < 3
    finally:
        os.close(fd)
        keeper.close()
        deaf.close()


ACTIVATION_PROBE = """
import json, os
from fdboxd.systemd import Activation
a = Activation.from_environ()
st = {n: os.fstat(fd).st_ino for n, fd in a.luo_sessions}
print(json.dumps({"luo": [n for n, _ in a.luo_sessions], "entries": [n for n, _ in a.store_fds],
                  "listener": a.listener is not None, "ino": st}))
"""


def test_sessions_come_back_in_listen_fds(notify, tmp_path):
    """After a restart (or, on 261, after PID 1 retrieved them behind a kexec) the
    sessions come back beside the entries and the Varlink socket, and are told apart."""
    keeper = FdStoreKeeper(Notifier(notify.path))
    session = memfd_with(b"session vm1")
    ino = os.fstat(session).st_ino
    keeper.hold("vm1", session)
    os.close(session)
    entry = memfd_with(b"ram")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "varlink"))
    listener.listen(1)
    with notify.lock:
        passed = [("varlink", listener.fileno()), ("luo#vm1", notify.store["luo#vm1"]), ("vm1/ram0", entry)]
    src = [os.dup(fd) for _, fd in passed]
    while any(fd < 3 + len(src) for fd in src):
        src = [os.dup(fd) if fd < 3 + len(src) else fd for fd in src]

    def place() -> None:
        for i, fd in enumerate(src):
            os.dup2(fd, 3 + i)

    env = dict(os.environ, PYTHONPATH=str(REPO), LISTEN_FDS=str(len(passed)),
               LISTEN_FDNAMES=":".join(n for n, _ in passed))
    try:
        out = subprocess.run(["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-c", ACTIVATION_PROBE],
                             env=env, pass_fds=list(range(3, 3 + len(src))), preexec_fn=place,
                             capture_output=True, text=True, timeout=60, check=True)
    finally:
        for fd in src:
            os.close(fd)
        os.close(entry)
        listener.close()
        keeper.close()
    got = json.loads(out.stdout)
    assert got == {"luo": ["luo#vm1"], "entries": ["vm1/ram0"], "listener": True, "ino": {"luo#vm1": ino}}, got


class _Side(MemoryBackend):
    """One side of ``auto``'s MixedBackend on the host (the real LUO and fdbox.ko sides
    are exercised in tests/vm): what it accepts and whether it holds in-process."""

    def __init__(self, types: set[FdType], in_process: bool) -> None:
        super().__init__()
        self.types = types
        self.holds_in_process = in_process

    def accepts(self, fd_type: FdType) -> bool:
        return fd_type in self.types


def test_auto_mixed_backend_keeps_its_plain_memfds_in_the_fd_store(notify, tmp_path):
    """``auto`` with LUO and fdbox.ko: plain memfds (RAM and devstate) are held by the
    daemon, so they go to the fd store and come back at a restart (a package upgrade
    restarts fdboxd); the backend declares it (holds_in_process), it is no MemoryBackend."""
    alice = Caller(1000, 1000)
    ko = _Side({FdType.MEMFD_HUGETLB, FdType.GUEST_MEMFD}, in_process=False)  # the kernel's: outlives us

    def start(act: Activation) -> tuple[Store, SystemdIntegration]:
        backend = MixedBackend(_Side({FdType.MEMFD}, in_process=True), ko)  # type: ignore[arg-type]
        refused = adopt_store_fds(act, backend, Manifest(tmp_path))
        store = Store(backend, Manifest(tmp_path))
        sd = SystemdIntegration(store, act, refused, notifier=Notifier(notify.path))
        sd.attach()
        return store, sd

    store, sd = start(Activation())
    blobs = {"ram0": pattern(64 * 1024, seed=3), "devstate": b"device state"}
    for name, data in blobs.items():
        fd = memfd_with(data)
        store.put(alice, "vm1", name, fd, {"k": name})
        os.close(fd)
    want = {fdname_for("vm1", n) for n in blobs}
    assert notify.wait(lambda: want <= set(notify.store), 5), sorted(notify.store)

    sd.close()  # the daemon stops: what it held in-process dies with it
    store.manifest.close()
    store.backend.close()
    with notify.lock:
        kept = [(n, os.dup(fd)) for n, fd in notify.store.items() if n in want]
    store, sd = start(Activation(store_fds=kept))
    try:
        assert not store.status()["lost"] and not store.status()["adopted"], store.status()
        for name, data in blobs.items():
            entry, fd = store.get(alice, "vm1", name)
            try:
                assert read_all(fd) == data and entry.metadata == {"k": name}
            finally:
                os.close(fd)
    finally:
        sd.close()
        store.manifest.close()


def test_the_same_open_file_under_two_names_survives_a_restart(daemon_factory, notify):
    """systemd stores an open file once: an fd put under a second name must still reach
    the fd store as a file of its own, or that name is lost at the restart."""
    d = daemon_factory(env={"NOTIFY_SOCKET": notify.path})
    fd = memfd_with(b"shared pages")
    with d.client() as c:
        c.put("vm1", "ram0", fd)
        c.put("vm1", "alias", fd)  # the same open file description
    os.close(fd)
    want = {"vm1/ram0", "vm1/alias"}
    assert notify.wait(lambda: want <= set(notify.store) or bool(notify.dropped), 5)
    assert not notify.dropped, notify.dropped
    with notify.lock:
        kept = {n: notify.store[n] for n in want}
    assert d.stop() == 0
    restart_from_fdstore(d, notify, kept)
    with d.client() as c:
        st = c.status()
        assert st["entries"] == 2 and not st["lost"], st
        _e, a = c.get("vm1", "ram0")
        _e, b = c.get("vm1", "alias")
    try:
        assert (os.fstat(a).st_ino, read_all(a)) == (os.fstat(b).st_ino, b"shared pages")
        os.pwrite(a, b"SHARED", 0)  # the same file: one write, both names
        assert read_all(b) == b"SHARED pages"
    finally:
        os.close(a)
        os.close(b)
    d.stop()
