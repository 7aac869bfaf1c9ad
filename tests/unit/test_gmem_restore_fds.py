"""RestoreInto's fds (issue 25 item 14): the worker copies from an fd of its own.

``restore_copy`` runs in a worker thread while the loop goes on; the loop may close the
backend's fd of the carried copy meanwhile (a Finish, a Remove). So the copy's fd is
made on the loop, in ``restore_begin`` (a new fd from the backend), handed to the
worker in the plan, and the worker closes that one fd and touches nothing else.

SIMULATED guest_memfd: this host's /dev/kvm has no guest_memfd (tests/integration/
test_guest_memfd.py runs where one exists), so, as tests/vm/gmemstage.py does, memfds
named ``standin-gmem-*`` are *detected* as guest_memfd (nothing else is patched). The
seal's copy out through a mapping, the carried copy, its checksum and the fill of the
target are the real code on real memfds; what a stand-in cannot show is the KVM side.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_store_liveupdate import KexecBackend  # noqa: E402

from fdboxd import fdtypes, gmem, store as store_module  # noqa: E402
from fdboxd.checksum import Verify  # noqa: E402
from fdboxd.kinds import guest_memfd  # noqa: E402
from fdboxd.manifest import Manifest  # noqa: E402
from fdboxd.model import BoxState, Caller  # noqa: E402
from fdboxd.store import Store  # noqa: E402

ROOT = Caller(0, 0)
STANDIN = "standin-gmem-"
SIZE = 1 << 20


@pytest.fixture
def standin(monkeypatch):  # type: ignore[no-untyped-def]
    """fdboxd's detection sees ``standin-gmem-*`` memfds as guest_memfd (see the module doc)."""
    real = fdtypes.detect

    def detect(fd: int) -> fdtypes.FdInfo:
        info = real(fd)
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return info
        if info.type == fdtypes.FdType.MEMFD and link.startswith("/memfd:" + STANDIN):
            return fdtypes.FdInfo(fdtypes.FdType.GUEST_MEMFD, info.size)
        return info

    for module in (fdtypes, store_module, guest_memfd):
        monkeypatch.setattr(module, "detect", detect)

    def make(name: str, data: bytes = b"") -> int:
        fd = os.memfd_create(STANDIN + name, os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        if data:
            os.pwrite(fd, data, 0)
        return fd

    return make


def restored_store(tmp_path: Path, standin, data: bytes) -> tuple[Store, KexecBackend]:  # type: ignore[no-untyped-def]
    """A guest_memfd put and sealed, then a "kexec": its copy crossed, the original did not."""
    backend = KexecBackend()
    old = Store(backend, Manifest(tmp_path / "old"), verify=Verify.FULL)
    fd = standin("ram0", data)
    old.put(ROOT, "vm1", "ram0", fd)
    os.close(fd)
    old.seal(ROOT, "vm1")
    nb = backend.kexec()
    new = Store(nb, Manifest(tmp_path / "new"), verify=Verify.FULL)
    assert new.boxes["vm1"].state == BoxState.RESTORED and gmem.is_carried(new.boxes["vm1"].entries["ram0"])
    return new, nb


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_the_worker_copies_from_its_own_fd_made_on_the_loop(tmp_path, standin):
    data = b"guest RAM " * 1000
    new, nb = restored_store(tmp_path, standin, data)
    held = nb.peek("vm1", gmem.carry_name("ram0"))  # the backend's own fd of the copy
    target = standin("new-ram0")
    plan = guest_memfd.restore_begin(new, ROOT, "vm1", "ram0", target)
    source = getattr(plan, "source", None)
    # Meanwhile, on the loop: the backend closes its fd of the copy (as a Finish or a
    # Remove would). The worker does not ask the backend for it afterwards.
    nb.remove("vm1", gmem.carry_name("ram0"))
    assert not fd_open(held)
    assert guest_memfd.restore_copy(plan) is None  # checksum good, target filled
    assert os.pread(target, len(data), 0) == data
    # It copied from the plan's own fd of the copy, made on the loop, and closed it once.
    assert source is not None and source != held
    assert plan.source == -1 and not fd_open(source)
    guest_memfd.restore_abort(plan)
    os.close(target)


def test_the_worker_closes_only_its_own_fd(tmp_path, standin):
    data = b"more RAM " * 100
    new, nb = restored_store(tmp_path, standin, data)
    held = nb.peek("vm1", gmem.carry_name("ram0"))
    target = standin("new-ram0")
    plan = guest_memfd.restore_begin(new, ROOT, "vm1", "ram0", target)
    source = plan.source
    assert guest_memfd.restore_copy(plan) is None
    assert not fd_open(source) and fd_open(held)  # the backend's fd is untouched
    entry = guest_memfd.restore_commit(plan, None)
    assert entry.name == "ram0" and plan.target == -1
    os.close(target)


def test_a_plan_given_up_before_the_worker_closes_both_fds(tmp_path, standin):
    new, nb = restored_store(tmp_path, standin, b"x")
    target = standin("new-ram0")
    plan = guest_memfd.restore_begin(new, ROOT, "vm1", "ram0", target)
    source, mine = plan.source, plan.target
    guest_memfd.restore_abort(plan)  # e.g. the call was cancelled before the worker ran
    assert not fd_open(source) and not fd_open(mine) and fd_open(target)
    assert fd_open(nb.peek("vm1", gmem.carry_name("ram0")))
    # And a copy already gone is refused at the start, on the loop, before any fd is made.
    nb.remove("vm1", gmem.carry_name("ram0"))
    with pytest.raises(Exception) as err:
        guest_memfd.restore_begin(new, ROOT, "vm1", "ram0", target)
    assert getattr(err.value, "name", None) == "NotFound" and "carried since seal is gone" in str(err.value)
    os.close(target)
