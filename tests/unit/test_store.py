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
    # No name oracle: another user's box or entry answers as a missing one would.
    assert err(store.get, BOB, "vm", "a") == "NotFound"
    assert err(store.remove, BOB, "vm", "a") == "NotFound"
    assert err(store.put, BOB, "vm", "b", fds()) == "PermissionDenied"  # cannot be hidden: a put creates
    assert err(store.delete_box, BOB, "vm") == "NotFound"
    assert err(store.seal, BOB, "vm") == "NotFound"
    assert err(store.seal, BOB) == "PermissionDenied"
    assert err(store.get_box, BOB, "vm") == "NotFound"
    assert err(store.list, BOB, "vm") == "NotFound"
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
    # Losses are remembered until acknowledged, the earlier one included...
    assert [(x["box"], x["name"]) for x in s3.status()["lost"]] == [("vm", "gone"), ("vm", "kept")]
    # ...and the emptied box stays its owner's meanwhile (nobody else takes the VM's name).
    assert s3.boxes["vm"].entries == {} and s3.owners["vm"] == ALICE.uid
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
    assert err(s.get, ALICE, "orphan", "e") == "NotFound"  # root's: as if missing
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
    assert err(s2.get, Caller(2000, 2000), "vm", "ram0") == "NotFound"
    backend.close()


# ---------------------------------------------------------------- issue 13


def test_lost_entries_persist_until_their_owner_acknowledges(tmp_path, fds):
    s1 = Store(MemoryBackend(), Manifest(tmp_path))
    s1.put(ALICE, "vm", "ram0", fds(b"a"))
    s1.put(BOB, "bobvm", "ram0", fds(b"b"))
    s2 = Store(MemoryBackend(), Manifest(tmp_path))  # the memory backend died with the daemon
    assert [(r["box"], r["uid"]) for r in s2.status(ALICE)["lost"]] == [("vm", ALICE.uid)]
    assert [r["box"] for r in s2.status(BOB)["lost"]] == ["bobvm"]
    assert len(s2.status(ROOT)["lost"]) == 2
    assert err(s2.put, BOB, "vm", "x", fds()) == "PermissionDenied"  # alice's name stays hers
    s3 = Store(MemoryBackend(), Manifest(tmp_path))  # and across another restart
    assert s3.acknowledge_lost(ALICE) == 1
    assert s3.status(ALICE)["lost"] == [] and len(s3.status(BOB)["lost"]) == 1
    s4 = Store(MemoryBackend(), Manifest(tmp_path))
    assert s4.status(ALICE)["lost"] == [] and [r["box"] for r in s4.status(BOB)["lost"]] == ["bobvm"]
    assert s4.acknowledge_lost(ROOT, "bobvm") == 1 and s4.status(ROOT)["lost"] == []


def test_non_root_status_counts_only_the_callers_own(store, fds):
    store.put(ALICE, "a1", "x", fds())
    store.put(ALICE, "a2", "x", fds())
    store.put(BOB, "b1", "x", fds())
    st = store.status(BOB)
    assert (st["boxes"], st["entries"]) == (1, 1)
    assert (store.status(ROOT)["boxes"], store.status(ROOT)["entries"]) == (3, 3)
    assert store.usage(ALICE.uid) == {"boxes": 2, "entries": 2, "bytes": 8}


def test_per_uid_quotas_and_roots_share_of_the_global_caps(tmp_path, fds):
    s = Store(MemoryBackend(), Manifest(tmp_path), limits=Limits(
        max_boxes=16, max_boxes_per_uid=2, max_entries_per_uid=3, max_bytes_per_uid=10, max_entry_size=8))
    s.put(ALICE, "a1", "x", fds(b"1234"))
    s.put(ALICE, "a2", "x", fds(b"1234"))
    assert err(s.put, ALICE, "a3", "x", fds()) == "LimitExceeded"  # boxes per uid
    assert err(s.put, ALICE, "a1", "y", fds(b"1234")) == "LimitExceeded"  # bytes per uid (12 > 10)
    s.put(ALICE, "a1", "y", fds(b"1"))
    assert err(s.put, ALICE, "a1", "z", fds(b"1")) == "LimitExceeded"  # entries per uid
    assert err(s.put, ROOT, "r", "big", fds(b"123456789")) == "LimitExceeded"  # entry size: everyone
    for i in range(6):  # others fill the non-root part of max_boxes (16 - 16 // 8 = 14)
        s.put(Caller(2000 + i, 2000 + i), f"u{i}a", "x", fds(b"1"))
        s.put(Caller(2000 + i, 2000 + i), f"u{i}b", "x", fds(b"1"))
    assert len(s.boxes) == 16 - 2
    assert err(s.put, BOB, "b", "x", fds()) == "LimitExceeded"
    s.put(ROOT, "root1", "x", fds())  # root is still served
    s.put(ROOT, "root2", "x", fds())


def test_box_names_reserved_by_rule_or_uid_prefix(tmp_path, fds):
    from fdboxd.names import BoxRules

    rules = tmp_path / "owners"
    rules.write_text("# tenant A's VMs\ntenantA-* 1000\nvm-* nobody\n")
    s = Store(MemoryBackend(), Manifest(tmp_path / "state"), box_rules=BoxRules.load(str(rules)))
    assert err(s.put, BOB, "tenantA-web", "ram0", fds()) == "PermissionDenied"
    s.put(ALICE, "tenantA-web", "ram0", fds())
    assert err(s.put, BOB, "1000.vm1", "ram0", fds()) == "PermissionDenied"  # uid prefix: alice's
    s.put(ALICE, "1000.vm1", "ram0", fds())
    s.put(BOB, "1001.vm1", "ram0", fds())
    assert err(s.put, ALICE, "vm-x", "ram0", fds()) == "PermissionDenied"  # nobody's (65534)
    s.put(ROOT, "vm-x", "ram0", fds())  # root is exempt
    s.put(BOB, "free-name", "ram0", fds())  # no rule: first come, first served


def _usage_by_scan(s: Store, uid: int) -> dict[str, int]:
    mine = [e for b in s.boxes.values() for e in b.entries.values() if e.uid == uid]
    return {"boxes": sum(1 for n, o in s.owners.items() if o == uid and n in s.boxes),
            "entries": len(mine), "bytes": sum(e.size for e in mine)}


def test_usage_counters_match_a_full_scan_after_every_kind_of_change(store, fds):
    """Quotas read O(1) counters; they must agree with counting the entries by hand."""
    def check() -> None:
        for c in (ROOT, ALICE, BOB):
            assert store.usage(c.uid) == _usage_by_scan(store, c.uid)

    grows = fds(b"12345")
    store.put(ALICE, "a1", "x", grows)
    store.put_many(ALICE, "a2", [PutItem("y", fds(b"1"), {}), PutItem("z", fds(b"22"), {})])
    store.put(BOB, "b1", "x", fds(b"333"))
    store.put(ROOT, "a1", "root-in-alice", fds(b"4444"))
    check()
    with pytest.raises(FdboxError):  # all or nothing: a refused put_many changes no counter
        store.put_many(BOB, "b2", [PutItem("ok", fds(), {}), PutItem("bad name!", fds(), {})])
    check()
    store.remove(ALICE, "a2", "y")
    store.delete_box(BOB, "b1")
    check()
    os.ftruncate(grows, 100)  # the same file, grown after the put ...
    store.seal(ROOT, "a1")  # ... and the seal measures sizes again
    check()
    store.unseal(ROOT, "a1")
    store.remove(ROOT, "a1", "root-in-alice")
    check()
    assert store.usage(ALICE.uid) == {"boxes": 2, "entries": 2, "bytes": 102}
