"""The store's half of a live update, on the host: seal in phases, the manifest carried
inside the sealed set, restore, checksum verification, claims and finish.

The kernel's half (KHO) is proven in tests/vm; here a memory backend stands in for
"the next kernel" by copying each sealed file's bytes into a fresh memfd — the same
thing the module's restore does — so the store's logic is exercised with real files.
"""

from __future__ import annotations

import os

import pytest

from fdboxd.backends.base import BackendBox, BackendEntry
from fdboxd.backends.memory import MemoryBackend
from fdboxd.errors import FdboxError
from fdboxd.fdtypes import FdType
from fdboxd.manifest import Manifest
from fdboxd.model import BoxState, Caller
from fdboxd.store import CARRY_BOX, Store, file_digest

ROOT = Caller(0, 0)
ALICE = Caller(1000, 1000)


class KexecBackend(MemoryBackend):
    """A memory backend that claims to survive kexec, and can 'kexec' into a new one."""

    survives_kexec = True

    def kexec(self) -> KexecBackend:
        nxt = KexecBackend()
        for name, box in self.inventory().items():
            if box.state != BoxState.SEALED:
                continue  # open boxes die with the old kernel
            nxt._boxes[name] = BackendBox(name, BoxState.RESTORED)
            for ename, e in box.entries.items():
                if e.type == FdType.GUEST_MEMFD:
                    continue  # bound to a VM of the old kernel: gone (its memfd copy crosses)
                old = self.peek(name, ename)
                fd = os.memfd_create(ename, os.MFD_ALLOW_SEALING)
                size = os.fstat(old).st_size
                if size:
                    os.pwrite(fd, os.pread(old, size, 0), 0)
                nxt._fds[(name, ename)] = fd
                nxt._boxes[name].entries[ename] = BackendEntry(ename, e.type, e.size)
        self.close()
        return nxt


def memfd(data: bytes) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    return fd


@pytest.fixture
def sealed(tmp_path):
    backend = KexecBackend()
    store = Store(backend, Manifest(tmp_path / "old"))
    for i in range(3):
        fd = memfd(bytes([i]) * (4096 * (i + 1)))
        store.put(ALICE, "vm1", f"ram{i}", fd, {"slot": str(i)})
        os.close(fd)
    fd = memfd(b"open box")
    store.put(ROOT, "scratch", "x", fd)
    os.close(fd)
    assert store.seal(ALICE, "vm1") == ["vm1"]
    return store, backend


def test_seal_records_checksums_and_carries_manifest(sealed):
    store, backend = sealed
    for e in store.list(ALICE, "vm1"):
        fd = backend.get("vm1", e.name)
        assert (e.size, e.sha256) == file_digest(fd)
        os.close(fd)
    inv = backend.inventory()
    assert inv[CARRY_BOX].state == BoxState.SEALED
    assert CARRY_BOX not in {b["name"] for b in store.list_boxes(ROOT)}
    with pytest.raises(FdboxError) as err:
        store.put(ROOT, CARRY_BOX, "x", memfd(b""))
    assert err.value.name == "InvalidName"


def test_restore_after_kexec_uses_carried_manifest(sealed, tmp_path):
    store, backend = sealed
    new = Store(backend.kexec(), Manifest(tmp_path / "new"))  # empty state dir: only the carried manifest
    assert new.status()["restored"] == 1
    assert "scratch" not in new.boxes  # it was not sealed
    entries = new.list(ALICE, "vm1")
    assert [(e.name, e.uid, e.metadata["slot"]) for e in entries] == [("ram0", 1000, "0"), ("ram1", 1000, "1"), ("ram2", 1000, "2")]
    assert new.verify_restored() == []
    assert CARRY_BOX in new.backend.inventory()  # read, and kept until the daemon has started
    new.started()
    assert CARRY_BOX not in new.backend.inventory()  # then released
    with pytest.raises(FdboxError) as err:
        new.get(Caller(1001, 1001), "vm1", "ram0")
    assert err.value.name == "NotFound"  # another user's entry: as if missing
    for i, e in enumerate(entries):
        entry, fd = new.get(ALICE, "vm1", e.name)
        assert os.pread(fd, 10, 0) == bytes([i]) * 10
        os.close(fd)
    assert new.boxes["vm1"].state == BoxState.OPEN  # every entry claimed


def test_restore_refuses_changed_data(sealed, tmp_path):
    store, backend = sealed
    nb = backend.kexec()
    os.pwrite(nb.peek("vm1", "ram1"), b"\xff", 100)  # one byte changed "in flight"
    new = Store(nb, Manifest(tmp_path / "new"))
    failed = new.verify_restored()
    assert [f["name"] for f in failed] == ["ram1"]
    assert "checksum mismatch" in failed[0]["reason"]
    assert "ram1" not in new.boxes["vm1"].entries
    assert any(x["name"] == "ram1" for x in new.status()["lost"])


class RestoreFails(KexecBackend):
    """A next kernel whose restore of one entry fails like fdbox.ko's without a free huge
    page (kernel.py: BackendUnavailable "cannot create a memfd to restore"), ``times`` times."""

    def __init__(self, old: KexecBackend, name: str, times: int) -> None:
        super().__init__()
        self._boxes, self._fds = old._boxes, old._fds
        self.failing, self.times = name, times

    def get(self, box: str, name: str) -> int:
        if name == self.failing and self.times > 0:
            self.times -= 1
            raise FdboxError("BackendUnavailable", f"cannot create a memfd to restore {box}/{name}: "
                             "[Errno 12] Cannot allocate memory")
        return super().get(box, name)


def test_a_restore_that_fails_for_want_of_memory_keeps_the_entry_until_a_get_succeeds(sealed, tmp_path):
    store, backend = sealed
    nb = RestoreFails(backend.kexec(), "ram1", times=2)
    new = Store(nb, Manifest(tmp_path / "new"))
    assert new.verify_restored() == []  # nothing dropped
    assert new.status()["lost"] == []
    assert "Cannot allocate memory" in new.boxes["vm1"].entries["ram1"].extra["unverified"]
    assert set(nb.inventory()["vm1"].entries) == {"ram0", "ram1", "ram2"}  # the preserved pages stay
    with pytest.raises(FdboxError) as err:
        new.get(ALICE, "vm1", "ram1")  # still no memory: retryable, nothing deleted
    assert err.value.name == "BackendUnavailable"
    assert "ram1" in new.boxes["vm1"].entries
    entry, fd = new.get(ALICE, "vm1", "ram1")  # the pool has room now: checked, then handed back
    assert os.pread(fd, 10, 0) == bytes([1]) * 10
    os.close(fd)
    assert "unverified" not in entry.extra and entry.claimed


def test_finish_by_the_owner_leaves_another_users_unclaimed_entry(sealed, tmp_path):
    store, backend = sealed
    store.unseal(ALICE, "vm1")
    fd = memfd(b"root's")
    store.put(ROOT, "vm1", "devstate", fd)  # root may put into alice's box
    os.close(fd)
    store.seal(ALICE, "vm1")
    new = Store(backend.kexec(), Manifest(tmp_path / "new"))
    with pytest.raises(FdboxError) as err:
        new.finish(ALICE, "vm1")
    assert err.value.name == "PermissionDenied" and "devstate" in err.value.message
    assert "devstate" in new.boxes["vm1"].entries
    assert new.finish(ROOT, "vm1") == ["vm1"]  # root may release it


def test_finish_releases_unclaimed(sealed, tmp_path):
    store, backend = sealed
    new = Store(backend.kexec(), Manifest(tmp_path / "new"))
    _, fd = new.get(ALICE, "vm1", "ram0")
    os.close(fd)
    assert new.finish(ALICE, "vm1") == ["vm1"]
    assert [e.name for e in new.list(ALICE, "vm1")] == ["ram0"]
    assert new.boxes["vm1"].state == BoxState.OPEN
    assert set(new.backend.inventory()["vm1"].entries) == {"ram0"}


def test_unseal_drops_carried_manifest_and_nothing_is_lost(sealed):
    store, backend = sealed
    store.unseal(ALICE, "vm1")
    assert CARRY_BOX not in backend.inventory()
    assert len(store.list(ALICE, "vm1")) == 3
    fd = memfd(b"more")
    store.put(ALICE, "vm1", "ram3", fd)  # open again
    os.close(fd)


def test_seal_phases_freeze_the_box(tmp_path):
    store = Store(KexecBackend(), Manifest(tmp_path))
    fd = memfd(b"a" * 8192)
    store.put(ALICE, "vm1", "ram0", fd)
    plan = store.seal_begin(ALICE, "vm1")
    with pytest.raises(FdboxError) as err:
        store.put(ALICE, "vm1", "ram1", fd)
    assert err.value.name == "Sealed"
    with pytest.raises(FdboxError) as err:
        store.remove(ALICE, "vm1", "ram0")
    assert err.value.name == "Sealed"
    store.seal_abort(plan)
    assert store.boxes["vm1"].state == BoxState.OPEN
    store.put(ALICE, "vm1", "ram1", fd)  # thawed
    with pytest.raises(FdboxError) as err:
        store.seal(ALICE, "nope")
    assert err.value.name == "NotFound"
    with pytest.raises(FdboxError) as err:
        store.seal(ALICE)  # all boxes: root only
    assert err.value.name == "PermissionDenied"
    os.close(fd)
