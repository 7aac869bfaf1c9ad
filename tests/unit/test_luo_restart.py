"""The LUO backend's restore and index rewrite, on the host: create before drop, release last.

The real /dev/liveupdate is exercised in tests/vm (and by the host model of the crash
matrix). Here a small recorder stands in for it, keeping only what these rules need:
sessions by name, outgoing ones preserved while a keeper holds them, incoming ones
retrieved once, RETRIEVE_FD EINVAL on an outgoing session, FINISH recorded. The keeper
is an fd-store stand-in that holds real fds (the FdStore protocol of fdboxd.systemd).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field

import pytest

from fdboxd import failpoints, uapi_luo
from fdboxd.backends import liveupdate
from fdboxd.backends.liveupdate import INDEX_SESSION, LiveupdateBackend
from fdboxd.errors import FdboxError
from fdboxd.fdtypes import FdInfo, FdType
from fdboxd.model import BoxState


@dataclass
class Session:
    name: str
    incoming: bool
    files: dict[int, int] = field(default_factory=dict)  # token -> fd (the kernel's reference)
    retrieved: bool = False
    finished: bool = False
    key: int = -1  # st_ino of the memfd standing in for the session's file


class Kernel:
    """Sessions as LUO keeps them; a memfd per session stands in for its file."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.by_key: dict[int, Session] = {}
        self.refuse_create = "\0"  # session names starting with this cannot be created

    def new_fd(self, s: Session) -> int:
        fd = os.memfd_create(f"luo_session {s.name}")
        s.key = os.fstat(fd).st_ino
        self.by_key[s.key] = s
        return fd

    def kexec(self, kept: set[str]) -> Kernel:
        """The next kernel: the outgoing sessions some keeper still held come back incoming."""
        nxt = Kernel()
        for name, s in self.sessions.items():
            if not s.incoming and name in kept:
                nxt.sessions[name] = Session(name, True, {t: os.dup(fd) for t, fd in s.files.items()})
        return nxt


KERNEL = Kernel()


class FakeSession:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def s(self) -> Session:
        return KERNEL.by_key[os.fstat(self.fd).st_ino]

    def preserve_fd(self, fd: int, token: int) -> None:
        self.s.files[token] = os.dup(fd)

    def retrieve_fd(self, token: int) -> int:
        if not self.s.incoming or token not in self.s.files:
            raise uapi_luo.LuoOSError(errno.EINVAL, "retrieve_fd")
        return os.dup(self.s.files[token])  # a second retrieve gives the same file

    def finish(self) -> None:
        self.s.finished = True

    def get_name(self) -> str:
        return self.s.name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FakeDevice:
    def __init__(self, path: str = "") -> None:
        pass

    def create_session(self, name: str) -> FakeSession:
        if name.startswith(KERNEL.refuse_create):
            raise uapi_luo.LuoOSError(errno.ENOMEM, "create_session")
        if name in KERNEL.sessions:
            raise uapi_luo.LuoOSError(errno.EEXIST, "create_session")
        s = KERNEL.sessions[name] = Session(name, False)
        return FakeSession(KERNEL.new_fd(s))

    def retrieve_session(self, name: str) -> FakeSession:
        s = KERNEL.sessions.get(name)
        if s is None or not s.incoming:
            raise uapi_luo.LuoOSError(errno.ENOENT, "retrieve_session")
        if s.retrieved:
            raise uapi_luo.LuoOSError(errno.EINVAL, "retrieve_session")
        s.retrieved = True
        return FakeSession(KERNEL.new_fd(s))

    def close(self) -> None:
        pass


class FdStore:
    """systemd's fd store, as the FdStore protocol sees it: it holds what it is given."""

    keeps_sessions = True

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def hold(self, name: str, fd: int) -> None:
        old = self.held.pop(name, None)
        if old is not None:
            os.close(old)
        self.held[name] = os.dup(fd)

    def drop(self, name: str) -> None:
        fd = self.held.pop(name, None)
        if fd is None:
            raise FdboxError("BackendUnavailable", f"{name} not in the fd store")
        os.close(fd)
        s = KERNEL.sessions.get(name)
        if s is not None and not s.incoming:  # the last fd of an outgoing session: unpreserved
            del KERNEL.sessions[name]

    def given_back(self) -> list[int]:
        """What LISTEN_FDS hands a restarted fdboxd (copies: the store keeps its own)."""
        return [os.dup(fd) for fd in self.held.values()]

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_luo(monkeypatch):
    global KERNEL
    KERNEL = Kernel()
    monkeypatch.setattr(uapi_luo, "LuoDevice", FakeDevice)
    monkeypatch.setattr(uapi_luo, "LuoSession", FakeSession)
    monkeypatch.setattr(liveupdate.Holder, "reclaim", classmethod(lambda cls, keep=None: []))
    yield
    failpoints.configure(None)


def open_backend(store: FdStore) -> LiveupdateBackend:
    return LiveupdateBackend("/dev/liveupdate-fake", carried=store.given_back(), fdstore=store)


def memfd(data: bytes) -> int:
    fd = os.memfd_create("ram")
    os.write(fd, data)
    return fd


def put(b: LiveupdateBackend, box: str, name: str, data: bytes) -> None:
    fd = memfd(data)
    try:
        b.put(box, name, fd, FdInfo(FdType.MEMFD, len(data)))
    finally:
        os.close(fd)


def kexec(store: FdStore) -> FdStore:
    """The kexec under systemd >= 261: what the fd store held crosses, PID 1 retrieves it
    and puts it back in the (new) fd store."""
    global KERNEL
    KERNEL = KERNEL.kexec({n for n in store.held})
    for fd in store.held.values():
        os.close(fd)
    nxt = FdStore()
    for name in KERNEL.sessions:
        s = FakeDevice().retrieve_session(name)
        nxt.hold(name, s.fd)
        s.close()
    return nxt


def read(b: LiveupdateBackend, box: str, name: str) -> bytes:
    fd = b.get(box, name)
    try:
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def sealed_and_kexeced() -> FdStore:
    store = FdStore()
    b = open_backend(store)
    b.create_box("vm1")
    put(b, "vm1", "ram0", b"guest RAM")
    b.seal("vm1")
    b.close()
    return kexec(store)


def test_a_failed_start_leaves_every_session_for_the_next_one() -> None:
    """Nothing is FINISHed or dropped from the fd store until started(): a start that
    fails after the backend opened (a newer manifest, the bus name taken) leaves LUO as
    it found it, and the next start restores the same files."""
    store = sealed_and_kexeced()
    first = open_backend(store)
    assert first.inventory()["vm1"].state == BoxState.RESTORED
    assert not any(s.finished for s in KERNEL.sessions.values())
    assert set(store.held) == {"vm1", INDEX_SESSION}
    first.close()  # the start failed: the daemon exits without started()

    second = open_backend(store)
    assert second.inventory()["vm1"].state == BoxState.RESTORED
    assert read(second, "vm1", "ram0") == b"guest RAM"
    assert not any(s.finished for s in KERNEL.sessions.values())
    second.started()
    assert all(s.finished for s in KERNEL.sessions.values())
    assert store.held == {}
    assert read(second, "vm1", "ram0") == b"guest RAM"  # held in the process now
    second.close()


def test_finish_goes_box_first_index_last_and_a_kill_between_loses_nothing() -> None:
    """The index is the last session FINISHed, so a start killed between two FINISHes
    still finds every unfinished box through it."""
    store = FdStore()
    b = open_backend(store)
    for box in ("vm1", "vm2"):
        b.create_box(box)
        put(b, box, "ram0", box.encode())
        b.seal(box)
    b.close()
    store = kexec(store)
    first = open_backend(store)
    order: list[str] = []
    real_finish = FakeSession.finish

    def finish(self: FakeSession) -> None:
        order.append(self.s.name)
        if len(order) == 2:
            raise KeyboardInterrupt  # the process dies at the second FINISH
        real_finish(self)

    FakeSession.finish = finish  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            first.started()
    finally:
        FakeSession.finish = real_finish  # type: ignore[method-assign]
    assert order[0] == "vm1" and INDEX_SESSION not in order
    first.close()
    second = open_backend(store)
    assert read(second, "vm2", "ram0") == b"vm2"
    second.started()
    second.close()


def test_a_failed_index_rewrite_keeps_the_old_index() -> None:
    """The index is replaced create-before-drop: when the new one cannot be made, the
    seal fails and every box sealed before still crosses, listed by the old index."""
    store = FdStore()
    b = open_backend(store)
    for box in ("vm1", "vm2"):
        b.create_box(box)
        put(b, box, "ram0", box.encode())
    b.seal("vm1")
    KERNEL.refuse_create = INDEX_SESSION  # no index session can be made (ENOMEM)
    with pytest.raises(FdboxError):
        b.seal("vm2")
    assert b.inventory()["vm2"].state == BoxState.OPEN
    b.close()
    store = kexec(store)
    nb = open_backend(store)
    assert nb.inventory()["vm1"].state == BoxState.RESTORED
    assert read(nb, "vm1", "ram0") == b"vm1"
    assert "vm2" not in nb.inventory()
    nb.started()
    nb.close()


def test_a_rewrite_cut_between_create_and_drop_uses_the_newer_index() -> None:
    """A failure after the new index exists and before the old is dropped: both cross,
    and the one with the higher generation is read (vm2's seal failed: the failed seal
    rewrote that index without vm2, and vm2 is not carried)."""
    store = FdStore()
    b = open_backend(store)
    for box in ("vm1", "vm2"):
        b.create_box(box)
        put(b, box, "ram0", box.encode())
    b.seal("vm1")
    b.unseal("vm1")
    b.seal("vm1")  # rewrites through the stand-in, and back: one index, the usual name
    assert [n for n in store.held if n in liveupdate.INDEX_SESSIONS] == [INDEX_SESSION]
    failpoints.configure("seal.after_index_create=error(EIO)")
    with pytest.raises(OSError):
        b.seal("vm2")
    failpoints.configure(None)
    assert len([n for n in store.held if n in liveupdate.INDEX_SESSIONS]) == 2
    b.close()
    store = kexec(store)
    indexes = {n: json.loads(os.pread(KERNEL.sessions[n].files[0], 4096, 0)) for n in liveupdate.INDEX_SESSIONS}
    assert indexes[INDEX_SESSION]["boxes"] == ["vm1"]
    nb = open_backend(store)
    assert indexes[liveupdate.INDEX_SESSIONS[1]]["boxes"] == ["vm1"]
    assert {n for n, x in nb.inventory().items() if x.state == BoxState.RESTORED} == {"vm1"}
    nb.started()
    nb.close()


def test_adopted_box_is_sealed_once_with_every_file(tmp_path) -> None:
    """A restart whose sealed sessions did not come back (their keeper lost them): the
    box the manifest records sealed is sealed again from the fd store's files, all of
    them in one session, not the first file alone."""
    from fdboxd.manifest import Manifest
    from fdboxd.model import Caller
    from fdboxd.store import Store
    from fdboxd.systemd import Activation, adopt_store_fds, fdname_for

    root = Caller(0, 0)
    b = open_backend(FdStore())
    store = Store(b, Manifest(tmp_path))
    for name in ("ram0", "ram1", "devstate"):
        fd = memfd(name.encode())
        store.put(root, "vm1", name, fd)
        os.close(fd)
    store.seal(root, "vm1")
    mirror = [(fdname_for("vm1", n), os.dup(b.peek("vm1", n))) for n in ("ram0", "ram1", "devstate")]
    store.manifest.close()
    b.close()
    KERNEL.sessions.clear()  # the sessions went with their keeper

    nb = open_backend(FdStore())
    assert adopt_store_fds(Activation(store_fds=mirror), nb, Manifest(tmp_path)) == []
    assert nb.inventory()["vm1"].state == BoxState.SEALED
    assert sorted(KERNEL.sessions["vm1"].files) == [0, 1, 2, 3]  # the description, then every file
    nb.close()


def test_a_seal_failing_after_its_session_is_held_leaves_the_box_open_and_the_index_as_it_was() -> None:
    store = FdStore()
    b = open_backend(store)
    for box in ("vm1", "vm2"):
        b.create_box(box)
        put(b, box, "ram0", box.encode())
    b.seal("vm1")
    failpoints.configure("seal.after_session_held=error(ENOMEM)")
    with pytest.raises(OSError):
        b.seal("vm2")
    failpoints.configure(None)
    assert b.inventory()["vm2"].state == BoxState.OPEN
    assert sorted(store.held) == [INDEX_SESSION, "vm1"]
    b.seal("vm2")  # nothing left behind in the way
    b.close()


def test_a_restart_without_the_files_keeps_the_session_of_a_box_recorded_sealed(tmp_path) -> None:
    """A restart whose fd store did not give the sealed box's files back (only its
    sessions): the session is the files' only copy. The start-up match releases the
    sessions of boxes recorded open, never this one: it crosses, and the box is restored."""
    from fdboxd.manifest import Manifest
    from fdboxd.model import Caller
    from fdboxd.store import Store

    root = Caller(0, 0)
    fdstore = FdStore()
    b = open_backend(fdstore)
    store = Store(b, Manifest(tmp_path))
    fd = memfd(b"guest RAM")
    store.put(root, "vm1", "ram0", fd)
    os.close(fd)
    store.seal(root, "vm1")
    store.manifest.close()
    b.close()

    nb = open_backend(fdstore)  # the sessions come back, the files do not
    restarted = Store(nb, Manifest(tmp_path))
    assert "vm1" in KERNEL.sessions
    restarted.manifest.close()
    nb.close()
    after = open_backend(kexec(fdstore))
    assert after.inventory()["vm1"].state == BoxState.RESTORED
    assert read(after, "vm1", "ram0") == b"guest RAM"
    after.started()
    after.close()
