"""Real guest_memfd (KVM on the host) through a real fdboxd: held, handed back, carried.

guest_memfds come from ``/dev/kvm`` (tests/kvmtest.py: ``KVM_CREATE_VM`` +
``KVM_CREATE_GUEST_MEMFD``, no vCPU). Shared ones (``MMAP | INIT_SHARED``) are filled
with a position-dependent pattern through a mapping; private ones (flags 0) cannot be
mapped at all. Skipped where ``/dev/kvm`` or the capability is missing on the host; then
tests/vm/test_guest_memfd_vm.py runs this file inside the debug test kernel, whose KVM has
guest_memfd, and there a missing capability fails (tests/kvmtest.py:require).

The carry path (fdboxd.gmem) is tested here without kexec: Seal copies the shared
guest_memfd into a memfd in the sealed set; ``RestoreInto`` fills a *new* guest_memfd
of another VM from that copy and checks the seal's SHA-256; and, with a stand-in next
kernel (tests/unit/test_store_liveupdate.py:KexecBackend, which — like a real kexec —
loses every guest_memfd and keeps the memfds), the restored entry then holds the new
guest_memfd. tests/vm/test_guest_memfd_kexec.py carries the memfd half across a real
kexec.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fdboxtest import REPO, memfd_with, pattern, run_as_user, wait_for

import kvmtest
from fdboxd.client import Client, read_all
from fdboxd.errors import FdboxError

SIZE = 16 << 20
OTHER_UID = 65534


@pytest.fixture(scope="module")
def kvm():
    k = kvmtest.require()
    yield k
    k.close()


def gmem_with(kvm: kvmtest.Kvm, data: bytes, size: int = SIZE, flags: int = kvmtest.SHARED) -> int:
    fd = kvm.guest_memfd(size, flags)
    if data:
        kvmtest.write_gmem(fd, data)
    return fd


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def copies_held(daemon) -> int:  # type: ignore[no-untyped-def]
    """How many carried copies (memfds fdboxd.gmem made) the daemon process holds."""
    n = 0
    for fd in os.listdir(f"/proc/{daemon.pid}/fd"):
        try:
            n += "fdbox-gmem-copy" in os.readlink(f"/proc/{daemon.pid}/fd/{fd}")
        except OSError:
            pass
    return n


def error_name(fn) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(FdboxError) as err:
        fn()
    return err.value.name


# ---------------------------------------------------------------------- the host kernel


def test_the_host_kernel_gives_shared_and_private_guest_memfd(kvm):
    """What the rest relies on, checked on the running kernel (6.18 here), not only in kvm.h."""
    assert kvm.flags & kvmtest.SHARED == kvmtest.SHARED  # KVM_CAP_GUEST_MEMFD_FLAGS is a bitmask
    shared = gmem_with(kvm, b"hello")
    private = kvm.guest_memfd(SIZE, kvmtest.PRIVATE)
    try:
        for fd in (shared, private):
            assert kvmtest.is_guest_memfd(fd) and os.fstat(fd).st_size == SIZE
            with pytest.raises(OSError):  # no read(): the daemon must map it
                os.pread(fd, 1, 0)
        assert kvmtest.read_gmem(shared, 5) == b"hello"
        with pytest.raises(OSError):
            kvmtest.read_gmem(private, 5)
    finally:
        os.close(shared)
        os.close(private)


# ---------------------------------------------------------------------- held and handed back


def test_put_get_over_varlink_same_file_and_list(kvm, daemon):
    data = pattern(SIZE, seed=1)
    fd = gmem_with(kvm, data)
    private = kvm.guest_memfd(SIZE, kvmtest.PRIVATE)
    ino, pino = os.fstat(fd).st_ino, os.fstat(private).st_ino
    with daemon.client() as c:
        e = c.put("vm1", "ram0", fd, {"slot": "0", "kind": "guest_memfd"})
        c.put("vm1", "ram1", private, {"slot": "1"})
        os.close(fd)
        os.close(private)
        assert (e["type"], e["size"], e["metadata"]) == ("guest_memfd", SIZE, {"slot": "0", "kind": "guest_memfd"})
        entry, got = c.get("vm1", "ram0")
        try:
            assert os.fstat(got).st_ino == ino and kvmtest.is_guest_memfd(got)
            assert kvmtest.read_gmem(got) == data
        finally:
            os.close(got)
        _, got = c.get("vm1", "ram1")
        assert os.fstat(got).st_ino == pino
        os.close(got)
        listed = {x["name"]: x for x in c.list("vm1")["entries"]}
        assert listed["ram0"]["type"] == listed["ram1"]["type"] == "guest_memfd"
        assert listed["ram0"]["size"] == listed["ram1"]["size"] == SIZE
        assert listed["ram0"]["extra"]["guest_memfd"] == {"shared": True}
        assert listed["ram1"]["extra"]["guest_memfd"] == {"shared": False}
        assert listed["ram1"]["metadata"] == {"slot": "1"} and listed["ram0"]["uid"] == 0
        box = c.list("vm1")["boxes"][0]
        assert (box["entries"], box["size"]) == (2, 2 * SIZE)


CHILD_PUT = r"""
import os, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import kvmtest
from fdboxtest import pattern
from fdboxd.client import Client
kvm = kvmtest.Kvm.open()
fd = kvm.guest_memfd(int(sys.argv[3]), kvmtest.SHARED)
kvmtest.write_gmem(fd, pattern(int(sys.argv[3]), seed=7))
with Client(sys.argv[2]) as c:
    c.put("vm-handback", "ram0", fd, {"pid": str(os.getpid())})
print(os.fstat(fd).st_ino)
"""


def test_hand_back_to_a_restarted_client(kvm, daemon):
    """A VMM process puts its guest_memfd and exits (its VM fd closes); a new one gets it."""
    out = subprocess.run([sys.executable, "-c", CHILD_PUT, str(REPO), daemon.socket, str(SIZE)],
                         capture_output=True, text=True, timeout=60, check=True)
    ino = int(out.stdout.strip())
    with daemon.client() as c:
        entry, fd = c.get("vm-handback", "ram0")
    try:
        assert entry["type"] == "guest_memfd" and os.fstat(fd).st_ino == ino
        assert kvmtest.read_gmem(fd) == pattern(SIZE, seed=7)
    finally:
        os.close(fd)


def test_other_users_cannot_get_it(kvm, daemon):
    fd = gmem_with(kvm, b"secret")
    with daemon.client() as c:
        c.put("vm-own", "ram0", fd)
    os.close(fd)

    def other() -> str:
        with Client(daemon.socket) as c:
            c.get("vm-own", "ram0")
        return "got it"

    assert run_as_user(OTHER_UID, other)["error"] == "NotFound"  # as if missing: no name oracle


def test_survives_a_daemon_restart_through_the_fdstore(kvm, daemon_factory, tmp_path):
    """Memory backend under systemd: the guest_memfd is in the fdstore and comes back."""
    from test_systemd import NotifySocket, restart_from_fdstore

    notify = NotifySocket(tmp_path / "notify")
    try:
        d = daemon_factory(env={"NOTIFY_SOCKET": notify.path})
        data = pattern(SIZE, seed=4)
        fd = gmem_with(kvm, data)
        ino = os.fstat(fd).st_ino
        with d.client() as c:
            c.put("vm1", "ram0", fd, {"slot": "0"})
        os.close(fd)
        assert notify.wait(lambda: "vm1/ram0" in notify.store), notify.messages[-3:]
        with notify.lock:
            kept = dict(notify.store)
        assert d.stop() == 0
        restart_from_fdstore(d, notify, kept)
        with d.client() as c:
            assert c.status()["adopted"] == [] and c.status()["lost"] == []
            entry, got = c.get("vm1", "ram0")
        try:
            assert (entry["type"], entry["metadata"]) == ("guest_memfd", {"slot": "0"})
            assert os.fstat(got).st_ino == ino and kvmtest.read_gmem(got) == data
        finally:
            os.close(got)
    finally:
        notify.close()


# ---------------------------------------------------------------------- seal rules


def test_private_guest_memfd_is_refused_at_seal_and_nothing_is_sealed(kvm, daemon):
    mem = memfd_with(b"plain memory")
    shared = gmem_with(kvm, b"shared")
    private = kvm.guest_memfd(SIZE, kvmtest.PRIVATE)
    mmap_only = kvm.guest_memfd(SIZE, kvmtest.GUEST_MEMFD_FLAG_MMAP)  # mappable, but every access faults
    with daemon.client() as c:
        c.put("good", "ram0", shared)
        c.put("vm1", "mem", mem)
        c.put("vm1", "ram0", private)
        c.put("vm2", "ram0", mmap_only)
        for box in ("vm1", "vm2"):
            with pytest.raises(FdboxError) as err:
                c.seal(box)
            assert err.value.name == "UnsupportedType"
            assert "private guest_memfd" in err.value.message and f"{box}/ram0" in err.value.message
            assert "GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED" in err.value.message
        with pytest.raises(FdboxError) as err:
            c.seal()  # all boxes: one refusal, none sealed
        assert err.value.name == "UnsupportedType"
        assert c.status()["sealed"] == 0
        assert {b["name"]: b["state"] for b in c.list()["boxes"]} == {"good": "open", "vm1": "open", "vm2": "open"}
        c.put("vm1", "later", mem)  # still open
        assert daemon.alive()
    for fd in (mem, shared, private, mmap_only):
        os.close(fd)


def test_an_mmap_only_guest_memfd_cannot_crash_the_daemon(kvm, daemon):
    """A mapping whose every access is SIGBUS: the daemon only ever lets the kernel touch it."""
    fd = kvm.guest_memfd(SIZE, kvmtest.GUEST_MEMFD_FLAG_MMAP)
    with daemon.client() as c:
        e = c.put("vm1", "ram0", fd)
        assert e["extra"]["guest_memfd"] == {"shared": False}
        assert error_name(lambda: c.seal("vm1")) == "UnsupportedType"
        assert c.status()["entries"] == 1
    os.close(fd)
    assert daemon.alive()


def test_reserved_copy_names_cannot_be_put(daemon):
    fd = memfd_with(b"x")
    with daemon.client() as c:
        assert error_name(lambda: c.put("vm1", "fdboxd.gmem.ram0", fd)) == "InvalidName"
    os.close(fd)


# ---------------------------------------------------------------------- the carry path


def test_seal_carries_a_copy_and_restore_into_fills_a_new_guest_memfd(kvm, daemon_factory):
    daemon = daemon_factory("--verify", "full")  # a whole SHA-256 a client can compare
    data = pattern(SIZE, seed=9)
    fd = gmem_with(kvm, data)
    with daemon.client() as c:
        c.put("vm1", "ram0", fd, {"slot": "0"})
        assert copies_held(daemon) == 0
        assert c.seal("vm1") == ["vm1"]
        e = c.list("vm1")["entries"][0]
        assert e["sha256"] == sha(data) and e["extra"]["guest_memfd"] == {"shared": True, "carried": True}
        assert copies_held(daemon) == 1
        # The VMM's VM is gone; a new VM of the restarted VMM makes its own guest_memfd.
        with kvmtest.Kvm.open() as vm2:
            target = vm2.guest_memfd(SIZE, kvmtest.SHARED)
            entry = c.restore_into("vm1", "ram0", target)
            assert entry["sha256"] == sha(data)
            assert kvmtest.read_gmem(target) == data
            # A sealed box is a rehearsal: the box still holds the original (and the copy).
            _, got = c.get("vm1", "ram0")
            assert os.fstat(got).st_ino == os.fstat(fd).st_ino
            os.close(got)
            assert c.list("vm1")["boxes"][0]["state"] == "sealed"
            # Wrong targets: clear errors, nothing changes.
            small = vm2.guest_memfd(SIZE // 2, kvmtest.SHARED)
            private = vm2.guest_memfd(SIZE, kvmtest.PRIVATE)
            mem = memfd_with(b"\0" * SIZE)
            assert error_name(lambda: c.restore_into("vm1", "ram0", small)) == "InvalidRequest"
            assert error_name(lambda: c.restore_into("vm1", "ram0", private)) == "UnsupportedType"
            assert error_name(lambda: c.restore_into("vm1", "ram0", mem)) == "UnsupportedType"
            assert error_name(lambda: c.restore_into("vm1", "nope", target)) == "NotFound"

            def other() -> str:
                with Client(daemon.socket) as oc:
                    oc.restore_into("vm1", "ram0", target)
                return "filled"

            assert run_as_user(OTHER_UID, other)["error"] == "NotFound"
            for x in (target, small, private, mem):
                os.close(x)
        c.unseal("vm1")  # drops the copy
        assert c.list("vm1")["entries"][0]["extra"]["guest_memfd"] == {"shared": True}
        assert copies_held(daemon) == 0
        with kvmtest.Kvm.open() as vm3:
            t = vm3.guest_memfd(SIZE, kvmtest.SHARED)
            assert error_name(lambda: c.restore_into("vm1", "ram0", t)) == "NotSealed"
            os.close(t)
    os.close(fd)


def test_restore_into_a_memfd_entry_is_refused(kvm, daemon):
    mem = memfd_with(b"x" * 4096)
    with daemon.client() as c:
        c.put("vm1", "mem", mem)
        c.seal("vm1")
        t = kvm.guest_memfd(SIZE, kvmtest.SHARED)
        assert error_name(lambda: c.restore_into("vm1", "mem", t)) == "UnsupportedType"
        os.close(t)
    os.close(mem)


async def _dbus_restore_into(address: str, box: str, name: str, fd: int) -> tuple[str, list]:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(destination="io.fdbox1", path="/io/fdbox1", interface="io.fdbox1.Manager",
                                       member="RestoreInto", signature="ssh", body=[box, name, 0], unix_fds=[fd]))
        return (reply.error_name or "" if reply.message_type == MessageType.ERROR else "ok"), reply.body
    finally:
        bus.disconnect()


@pytest.fixture
def dbus_address(tmp_path):
    """A private dbus-daemon as in test_dbus.py (which would skip this whole module if imported early)."""
    pytest.importorskip("dbus_fast")
    import test_dbus

    d = Path(tempfile.mkdtemp(prefix="fdbox-bus-", dir="/tmp"))
    conf = d / "bus.conf"
    conf.write_text(test_dbus.BUS_CONFIG.format(path=d / "bus"))
    proc = subprocess.Popen(["dbus-daemon", "--nofork", f"--config-file={conf}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (d / "bus").exists(), 10), "dbus-daemon did not start"
        yield f"unix:path={d / 'bus'}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_put_get_and_restore_into_over_dbus(kvm, daemon_factory, dbus_address):
    import test_dbus

    address = dbus_address
    d = daemon_factory("--bus", address)
    assert wait_for(lambda: test_dbus.name_owned(address), 10), d.log()
    data = pattern(SIZE, seed=12)
    fd = gmem_with(kvm, data)
    test_dbus.put(address, "vm1", "ram0", fd, "{'slot': '0'}")
    assert asyncio.run(_dbus_list(address)) == {("vm1", "ram0"): ("guest_memfd", SIZE)}
    got = asyncio.run(_dbus_fast_get_fd(address, "vm1", "ram0"))
    try:
        assert os.fstat(got).st_ino == os.fstat(fd).st_ino and kvmtest.read_gmem(got) == data
    finally:
        os.close(got)
    with kvmtest.Kvm.open() as vm2:
        target = vm2.guest_memfd(SIZE, kvmtest.SHARED)
        status, body = asyncio.run(_dbus_restore_into(address, "vm1", "ram0", target))
        assert status == "io.fdbox1.Error.NotSealed", (status, body)
        assert test_dbus.gdbus(address, "Seal", "vm1").stdout.strip() == "(['vm1'],)"
        status, body = asyncio.run(_dbus_restore_into(address, "vm1", "ram0", target))
        assert status == "ok", (status, body)
        assert kvmtest.read_gmem(target) == data
        os.close(target)
    introspect = test_dbus.busctl(address, "introspect", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager")
    assert any(line.split()[:3] == [".RestoreInto", "method", "ssh"] for line in introspect.stdout.splitlines())
    os.close(fd)
    d.stop()


async def _dbus_list(address: str) -> dict[tuple[str, str], tuple[str, int]]:
    """D-Bus List as {(box, name): (type, size)}, whether entries are structs or a{sv}."""
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(destination="io.fdbox1", path="/io/fdbox1", interface="io.fdbox1.Manager",
                                       member="List", signature="", body=[]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        out = {}
        for e in reply.body[0]:
            if isinstance(e, dict):  # a{sv}
                f = {k: v.value for k, v in e.items()}
                out[(f["box"], f["name"])] = (f["type"], int(f["size"]))
            else:  # (ssstuuda{ss}xsbs)
                out[(e[0], e[1])] = (e[2], int(e[3]))
        return out
    finally:
        bus.disconnect()


async def _dbus_fast_get_fd(address: str, box: str, name: str) -> int:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(destination="io.fdbox1", path="/io/fdbox1", interface="io.fdbox1.Manager",
                                       member="Get", signature="ss", body=[box, name]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return reply.unix_fds[reply.body[0]]
    finally:
        bus.disconnect()


# ---------------------------------------------------------------------- across a stand-in kexec


def test_restore_into_after_a_stand_in_kexec(kvm, tmp_path):
    """The store's whole carry path with a next kernel that keeps memfds and loses guest_memfds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_store_liveupdate import KexecBackend

    from fdboxd import gmem
    from fdboxd.kinds import guest_memfd
    from fdboxd.manifest import Manifest
    from fdboxd.model import BoxState, Caller
    from fdboxd.store import Store

    alice = Caller(1000, 1000)
    data = [pattern(SIZE, seed=20), pattern(SIZE // 4, seed=21)]
    backend = KexecBackend()
    store = Store(backend, Manifest(tmp_path / "old"))
    for i, blob in enumerate(data):
        fd = gmem_with(kvm, blob, size=len(blob))
        store.put(alice, "vm1", f"ram{i}", fd, {"slot": str(i)})
        os.close(fd)
    mem = memfd_with(b"device state")
    store.put(alice, "vm1", "devstate", mem)
    os.close(mem)
    assert store.seal(alice, "vm1") == ["vm1"]
    new = Store(backend.kexec(), Manifest(tmp_path / "new"))  # only the carried manifest
    assert new.status()["restored"] == 1 and new.status()["lost"] == []
    assert new.verify_restored() == []
    names = [e.name for e in new.list(alice, "vm1")]
    assert names == ["devstate", "ram0", "ram1"]  # the copies are not entries
    assert error_name(lambda: new.get(alice, "vm1", "ram0")) == "InvalidRequest"  # says: RestoreInto
    with kvmtest.Kvm.open() as vm2:
        target = vm2.guest_memfd(SIZE, kvmtest.SHARED)
        assert error_name(lambda: guest_memfd.restore_into(new, Caller(1001, 1001), "vm1", "ram0", target)) == "NotFound"
        entry = guest_memfd.restore_into(new, alice, "vm1", "ram0", target)
        assert entry.claimed and entry.metadata == {"slot": "0"}
        assert kvmtest.read_gmem(target) == data[0]
        _, got = new.get(alice, "vm1", "ram0")  # now the entry *is* the new guest_memfd
        assert os.fstat(got).st_ino == os.fstat(target).st_ino
        os.close(got)
        assert error_name(lambda: guest_memfd.restore_into(new, alice, "vm1", "ram0", target)) == "InvalidRequest"
        os.close(target)
    assert gmem.carry_name("ram0") not in new.backend.inventory()["vm1"].entries
    # ram1 is never restored: finish releases it and its copy without error.
    _, fd = new.get(alice, "vm1", "devstate")
    os.close(fd)
    assert new.finish(alice, "vm1") == ["vm1"]
    assert new.boxes["vm1"].state == BoxState.OPEN
    assert sorted(new.backend.inventory()["vm1"].entries) == ["devstate", "ram0"]


def test_a_damaged_copy_is_refused_and_reported(kvm, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_store_liveupdate import KexecBackend

    from fdboxd import gmem
    from fdboxd.checksum import Verify
    from fdboxd.kinds import guest_memfd
    from fdboxd.manifest import Manifest
    from fdboxd.model import Caller
    from fdboxd.store import Store

    root = Caller(0, 0)
    backend = KexecBackend()
    store = Store(backend, Manifest(tmp_path / "old"), verify=Verify.FULL)  # one flipped byte is caught
    fd = gmem_with(kvm, pattern(SIZE, seed=30))
    store.put(root, "vm1", "ram0", fd)
    os.close(fd)
    store.seal(root, "vm1")
    nb = backend.kexec()
    os.pwrite(nb.peek("vm1", gmem.carry_name("ram0")), b"\xff", 12345)  # one byte changed in flight
    new = Store(nb, Manifest(tmp_path / "new"), verify=Verify.FULL)
    target = kvm.guest_memfd(SIZE, kvmtest.SHARED)
    kvmtest.write_gmem(target, b"untouched")
    with pytest.raises(FdboxError) as err:
        guest_memfd.restore_into(new, root, "vm1", "ram0", target)
    assert err.value.name == "BackendUnavailable" and "checksum mismatch" in err.value.message
    assert "the target was not written" in err.value.message
    assert kvmtest.read_gmem(target, 9) == b"untouched"
    assert "ram0" not in new.boxes["vm1"].entries
    assert [x["name"] for x in new.status()["lost"]] == ["ram0"]
    os.close(target)


def test_seal_copy_reports_progress(kvm, daemon):
    """Seal with ``more`` streams progress for a guest_memfd too (its copy is what is checksummed)."""
    fd = gmem_with(kvm, pattern(SIZE, seed=40))
    with daemon.client() as c:
        c.put("vm1", "ram0", fd)
        seen: list[dict] = []
        assert c.seal("vm1", progress=seen.append) == ["vm1"]
    os.close(fd)
    assert seen, "no progress reply"
    last = seen[-1]
    assert last["name"] == "ram0" and last["done"] == last["total"] > 0, seen


def test_an_entry_finished_during_restore_into_is_not_resurrected(kvm, tmp_path):
    """RestoreInto's commit re-checks the entry: a finish that ran during the copy wins."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_store_liveupdate import KexecBackend

    from fdboxd import gmem
    from fdboxd.kinds import guest_memfd
    from fdboxd.manifest import Manifest
    from fdboxd.model import Caller
    from fdboxd.store import Store

    root = Caller(0, 0)
    backend = KexecBackend()
    store = Store(backend, Manifest(tmp_path / "old"))
    fd = gmem_with(kvm, b"abc")
    store.put(root, "vm1", "ram0", fd)
    os.close(fd)
    store.seal(root, "vm1")
    new = Store(backend.kexec(), Manifest(tmp_path / "new"))
    target = kvm.guest_memfd(SIZE, kvmtest.SHARED)
    plan = guest_memfd.restore_begin(new, root, "vm1", "ram0", target)
    assert error_name(lambda: guest_memfd.restore_begin(new, root, "vm1", "ram0", target)) == "InvalidRequest"  # busy
    problem = guest_memfd.restore_copy(plan)  # what the worker does
    assert problem is None and kvmtest.read_gmem(target, 3) == b"abc"
    assert new.finish(root, "vm1") == ["vm1"]  # meanwhile, on the loop
    assert error_name(lambda: guest_memfd.restore_commit(plan, problem)) == "NotFound"
    assert "ram0" not in new.boxes["vm1"].entries and new.side.inventory()["vm1"].entries == {}
    assert plan.target == -1  # the plan's dup is closed
    os.close(target)


def test_only_populated_pages_are_copied_and_filled(kvm):
    """Guest RAM is mostly holes: neither the copy nor the new guest_memfd allocates them."""
    import mmap

    from fdboxd import gmem
    from fdboxd.checksum import sha256_fd

    size = 64 << 20
    src = kvm.guest_memfd(size, kvmtest.SHARED)
    kvmtest.write_gmem(src, b"first page")
    kvmtest.write_gmem(src, pattern(4 << 20, seed=50), 32 << 20)
    kvmtest.write_gmem(src, b"last", size - 4)
    assert gmem.populated(src, size) == [(0, 4096), (32 << 20, 36 << 20), (size - 4096, size)]
    want = bytearray(size)
    want[0:10] = b"first page"
    want[32 << 20 : 36 << 20] = pattern(4 << 20, seed=50)
    want[size - 4 :] = b"last"
    copy = gmem.copy_out(src)
    try:
        assert os.fstat(copy).st_blocks * 512 == (4 << 20) + 2 * 4096  # holes stay holes
        assert sha256_fd(copy)[1] == sha(bytes(want))
        with kvmtest.Kvm.open() as vm2:
            target = vm2.guest_memfd(size, kvmtest.SHARED)
            gmem.fill(target, copy, size)
            assert gmem.populated(target, size) == gmem.populated(src, size)
            with mmap.mmap(target, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[:] == want
            os.close(target)
    finally:
        os.close(copy)
        os.close(src)
