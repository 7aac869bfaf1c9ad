"""Store rules, called directly with a MemoryBackend and a real manifest on disk."""

from __future__ import annotations

import os

import pytest

from fdboxd.backends.memory import MemoryBackend
from fdboxd.errors import FdboxError
from fdboxd.fdtypes import MEMORY_TYPES, FdType
from fdboxd.manifest import Manifest
from fdboxd.model import BoxState, Caller
from fdboxd.store import Limits, PutItem, Store

ROOT = Caller(0, 0)
ALICE = Caller(1000, 1000)
BOB = Caller(1001, 1001)


def memfd(data: bytes = b"data") -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


@pytest.fixture
def fds():
    opened: list[int] = []

    def make(data: bytes = b"data") -> int:
        fd = memfd(data)
        opened.append(fd)
        return fd

    yield make
    for fd in opened:
        os.close(fd)


@pytest.fixture
def store(tmp_path):
    s = Store(MemoryBackend(), Manifest(tmp_path / "state"))
    yield s
    s.backend.close()


def err(fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(FdboxError) as ei:
        fn(*args, **kw)
    return ei.value.name


def test_put_get_keeps_own_reference(store, fds):
    fd = fds(b"hello")
    e = store.put(ALICE, "vm", "ram0", fd, {"k": "v"})
    assert (e.type, e.size, e.uid, e.gid, e.metadata) == (FdType.MEMFD, 5, 1000, 1000, {"k": "v"})
    entry, got = store.get(ALICE, "vm", "ram0")
    assert os.pread(got, 5, 0) == b"hello"
    assert os.get_inheritable(got) is False
    os.close(got)


def test_caller_fd_is_not_closed_on_failure(store, fds):
    fd = fds()
    store.put(ALICE, "vm", "a", fd)
    assert err(store.put, ALICE, "vm", "a", fd) == "AlreadyExists"
    os.fstat(fd)  # still ours


def test_ownership(store, fds):
    store.put(ALICE, "vm", "a", fds())
    assert err(store.get, BOB, "vm", "a") == "PermissionDenied"
    assert err(store.remove, BOB, "vm", "a") == "PermissionDenied"
    assert err(store.put, BOB, "vm", "b", fds()) == "PermissionDenied"
    assert err(store.delete_box, BOB, "vm") == "PermissionDenied"
    assert err(store.seal, BOB, "vm") == "PermissionDenied"
    assert err(store.seal, BOB) == "PermissionDenied"
    assert err(store.get_box, BOB, "vm") == "PermissionDenied"
    assert store.list(BOB) == [] and store.list_boxes(BOB) == []
    assert [e.name for e in store.list(ALICE)] == ["a"]
    _, fd = store.get(ROOT, "vm", "a")  # root may
    os.close(fd)
    store.put(ROOT, "vm", "r", fds())  # root may put into anyone's box...
    assert [e.name for e in store.list(ALICE)] == ["a"]  # ...and alice does not see root's entry
    assert err(store.delete_box, ALICE, "vm") == "PermissionDenied"  # it holds root's entry
    store.remove(ROOT, "vm", "r")
    store.delete_box(ALICE, "vm")
    assert store.boxes == {}


def test_types_are_detected_and_filtered(store, fds):
    r, w = os.pipe()
    try:
        assert err(store.put, ALICE, "vm", "p", r) == "UnsupportedType"
    finally:
        os.close(r)
        os.close(w)
    assert "vm" not in store.boxes  # a failed first put creates no box


def test_other_type_allowed_by_option(tmp_path):
    s = Store(MemoryBackend(), Manifest(tmp_path), allowed_types=MEMORY_TYPES | {FdType.OTHER})
    r, w = os.pipe()
    try:
        assert s.put(ALICE, "vm", "p", r).type == FdType.OTHER
    finally:
        os.close(r)
        os.close(w)
        s.backend.close()


def test_invalid_names_and_requests(store, fds):
    assert err(store.put, ALICE, "bad/box", "a", fds()) == "InvalidName"
    assert err(store.put, ALICE, "vm", "bad name", fds()) == "InvalidName"
    assert err(store.get, ALICE, "vm", "a") == "NotFound"  # the box is looked up first
    store.put(ALICE, "vm", "ok", fds())
    assert err(store.get, ALICE, "vm", "-x") == "InvalidName"
    assert err(store.put_many, ALICE, "vm", []) == "InvalidRequest"
    assert err(store.put_many, ALICE, "vm", [PutItem("a", fds(), {}), PutItem("a", fds(), {})]) == "AlreadyExists"
    assert set(store.boxes["vm"].entries) == {"ok"}
    assert err(store.put, ALICE, "vm", "a", fds(), {"k": 1}) == "InvalidRequest"
    closed = memfd()
    os.close(closed)
    assert err(store.put, ALICE, "vm", "a", closed) == "InvalidRequest"


def test_not_found(store, fds):
    assert err(store.get, ALICE, "vm", "a") == "NotFound"
    store.put(ALICE, "vm", "a", fds())
    assert err(store.get, ALICE, "vm", "b") == "NotFound"
    assert err(store.remove, ALICE, "vm", "b") == "NotFound"
    assert err(store.list, ALICE, "nobox") == "NotFound"


def test_seal_rules(store, fds):
    store.put(ALICE, "vm", "a", fds(b"abc"))
    assert err(store.unseal, ALICE, "vm") == "NotSealed"
    assert store.seal(ALICE, "vm") == ["vm"]
    assert store.boxes["vm"].state == BoxState.SEALED
    assert store.boxes["vm"].entries["a"].sha256 is not None
    assert err(store.seal, ALICE, "vm") == "Sealed"
    assert err(store.put, ALICE, "vm", "b", fds()) == "Sealed"
    assert err(store.remove, ALICE, "vm", "a") == "Sealed"
    assert err(store.delete_box, ALICE, "vm") == "Sealed"
    assert store.overall_state() == "sealed"
    store.unseal(ALICE, "vm")
    store.remove(ALICE, "vm", "a")
    assert err(store.finish, ALICE, "vm") == "InvalidRequest"  # only restored boxes finish


def test_limits(tmp_path, fds):
    s = Store(MemoryBackend(), Manifest(tmp_path), limits=Limits(max_boxes=2, max_entries_per_box=2,
                                                                 max_entries_total=3, max_metadata_keys=2,
                                                                 max_metadata_bytes=10))
    s.put(ALICE, "a", "1", fds())
    s.put(ALICE, "a", "2", fds())
    assert err(s.put, ALICE, "a", "3", fds()) == "LimitExceeded"
    s.put(ALICE, "b", "1", fds())
    assert err(s.put, ALICE, "c", "1", fds()) == "LimitExceeded"  # boxes
    assert err(s.put, ALICE, "b", "2", fds()) == "LimitExceeded"  # entries in total
    s.remove(ALICE, "b", "1")
    assert err(s.put, ALICE, "b", "x", fds(), {"a": "1", "b": "2", "c": "3"}) == "LimitExceeded"
    assert err(s.put, ALICE, "b", "x", fds(), {"a": "x" * 20}) == "LimitExceeded"
    s.backend.close()


def test_manifest_failure_undoes_the_put(store, fds, tmp_path):
    store.put(ALICE, "vm", "a", fds())
    store.manifest.path.unlink()
    store.manifest.path.mkdir()
    assert err(store.put, ALICE, "vm", "b", fds()) == "BackendUnavailable"
    assert err(store.put, ALICE, "new", "b", fds()) == "BackendUnavailable"
    assert set(store.boxes) == {"vm"} and set(store.boxes["vm"].entries) == {"a"}
    assert set(store.backend.inventory()) == {"vm"}
    assert set(store.backend.inventory()["vm"].entries) == {"a"}


def test_put_many_all_or_nothing(store, fds):
    r, w = os.pipe()
    try:
        assert err(store.put_many, ALICE, "vm", [PutItem("a", fds(), {}), PutItem("b", r, {})]) == "UnsupportedType"
    finally:
        os.close(r)
        os.close(w)
    assert store.boxes == {}
    got = store.put_many(ALICE, "vm", [PutItem(f"e{i}", fds(bytes([i])), {}) for i in range(10)])
    assert [e.name for e in got] == [f"e{i}" for i in range(10)]
    pairs = store.get_box(ALICE, "vm")
    assert [os.pread(fd, 1, 0) for _, fd in pairs] == [bytes([i]) for i in range(10)]
    for _, fd in pairs:
        os.close(fd)


def test_events(store, fds):
    seen = []
    store.subscribe(lambda ev: seen.append((ev.kind, ev.box, ev.entry.name if ev.entry else None, ev.state)))
    store.put(ALICE, "vm", "a", fds())
    store.seal(ALICE, "vm")
    store.unseal(ALICE, "vm")
    store.remove(ALICE, "vm", "a")
    assert seen == [("entry-added", "vm", "a", None), ("state-changed", "vm", None, BoxState.SEALED),
                    ("state-changed", "vm", None, BoxState.OPEN), ("entry-removed", "vm", "a", None)]


def test_reconcile_reports_lost_and_keeps_what_the_backend_holds(tmp_path, fds):
    backend = MemoryBackend()
    s1 = Store(backend, Manifest(tmp_path))
    s1.put(ALICE, "vm", "kept", fds(b"k"))
    s1.put(ALICE, "vm", "gone", fds(b"g"))
    backend.remove("vm", "gone")  # the backend lost one behind the store's back
    s2 = Store(backend, Manifest(tmp_path))
    assert [(x["box"], x["name"]) for x in s2.status()["lost"]] == [("vm", "gone")]
    assert set(s2.boxes["vm"].entries) == {"kept"}
    assert s2.boxes["vm"].entries["kept"].uid == ALICE.uid  # owner from the manifest
    s3 = Store(MemoryBackend(), Manifest(tmp_path))  # a fresh process: everything lost
    assert [(x["box"], x["name"]) for x in s3.status()["lost"]] == [("vm", "kept")]
    assert s3.boxes == {}
    backend.close()


def test_reconcile_adopts_unknown_entries_as_roots(tmp_path, fds):
    backend = MemoryBackend()
    backend.create_box("orphan")
    from fdboxd.fdtypes import detect

    fd = fds(b"x")
    backend.put("orphan", "e", fd, detect(fd))
    s = Store(backend, Manifest(tmp_path))
    assert [(x["box"], x["name"]) for x in s.status()["adopted"]] == [("orphan", "e")]
    assert s.boxes["orphan"].entries["e"].uid == 0
    assert err(s.get, ALICE, "orphan", "e") == "PermissionDenied"
    backend.close()


def test_reconcile_adopts_with_the_owner_the_backend_recorded(tmp_path, fds):
    """With the manifest gone, an entry still belongs to whoever put it (the kernel records it)."""
    backend = MemoryBackend()
    s = Store(backend, Manifest(tmp_path / "a"))
    s.put(ALICE, "vm", "ram0", fds(b"alice's"))
    s2 = Store(backend, Manifest(tmp_path / "b"))  # same references, no manifest
    assert [(x["box"], x["name"]) for x in s2.status()["adopted"]] == [("vm", "ram0")]
    e = s2.boxes["vm"].entries["ram0"]
    assert (e.uid, e.gid) == (ALICE.uid, ALICE.gid)
    assert s2.owners["vm"] == ALICE.uid
    entry, fd = s2.get(ALICE, "vm", "ram0")
    assert os.pread(fd, 7, 0) == b"alice's"
    os.close(fd)
    assert err(s2.get, Caller(2000, 2000), "vm", "ram0") == "PermissionDenied"
    backend.close()
