"""fdboxd on the kernel backend, in the VM: the backend contract over /dev/fdbox, and a
daemon that is SIGKILLed and restarted without losing anything.

Runs inside the VM (tests/vm/test_module.py boots it). Uses the real daemon process
(``daemon_factory`` from tests/conftest.py) and the real module.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kmodtools as km
from fdboxtest import DaemonProcess, make_runtime_dir
from fdboxd import uapi
from fdboxd.backends import open_backend
from fdboxd.backends.kernel import KernelBackend
from fdboxd.errors import FdboxError
from fdboxd.fdtypes import FdType, detect
from fdboxd.model import BoxState

HUGE = 2 << 20


@pytest.fixture(scope="module", autouse=True)
def module() -> Iterator[None]:
    if not km.is_loaded():
        km.load()
    yield


class GuestDaemon(DaemonProcess):
    """fdboxd in the guest: python starts slowly there (imports over 9p, TCG), so wait longer."""

    def wait_ready(self, timeout: float = 180.0) -> None:
        super().wait_ready(timeout)


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., GuestDaemon]]:
    started: list[GuestDaemon] = []

    def factory(*args: str) -> GuestDaemon:
        d = GuestDaemon(make_runtime_dir(), args)
        started.append(d)
        return d.start()

    yield factory
    for d in started:
        d.kill()


def _empty_the_module() -> None:
    with uapi.FdboxDevice() as d:
        km.empty(d)


@pytest.fixture(autouse=True)
def clean_module() -> Iterator[None]:
    _empty_the_module()
    yield
    _empty_the_module()
    with uapi.FdboxDevice() as d:
        s = km.stats(d)
    assert (s["entries"], s["file_refs"], s["pinned_folios"]) == (0, 0, 0), s


@pytest.fixture
def backend() -> Iterator[KernelBackend]:
    b = KernelBackend()
    yield b
    b.close()


def memfd(data: bytes, flags: int = 0) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | flags)
    os.write(fd, data)
    return fd


def digest(fd: int) -> str:
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
        return hashlib.sha256(m[:]).hexdigest()


def huge_memfd(pattern: bytes) -> int:
    fd = os.memfd_create("h", os.MFD_CLOEXEC | os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, HUGE)
    with mmap.mmap(fd, HUGE) as m:
        m[: len(pattern)] = pattern
    return fd


# --------------------------------------------------------------------------- backend


def test_auto_picks_kernel_when_device_exists() -> None:
    """With /dev/fdbox, auto uses the module: alone on a kernel without LUO, beside LUO
    (plain memfds there, hugetlb here) where /dev/liveupdate exists (this guest boots
    with liveupdate=on). Without LUO, the module alone."""
    b = open_backend("auto")
    try:
        assert b.name == ("liveupdate+kernel" if os.path.exists("/dev/liveupdate") else "kernel")
    finally:
        b.close()
    b = open_backend("auto", luo_device="/nonexistent/liveupdate")
    try:
        assert b.name == "kernel"
    finally:
        b.close()


def test_backend_contract(backend: KernelBackend) -> None:
    assert backend.accepts(FdType.MEMFD) and backend.accepts(FdType.MEMFD_HUGETLB)
    assert not backend.accepts(FdType.TAP) and not backend.accepts(FdType.GUEST_MEMFD)
    backend.create_box("vm1")
    fd = memfd(b"contract" * 1000)
    backend.put("vm1", "ram", fd, detect(fd))
    want = digest(fd)
    os.close(fd)
    got = backend.get("vm1", "ram")
    assert digest(got) == want
    os.close(got)
    inv = backend.inventory()
    assert set(inv) == {"vm1"}
    assert inv["vm1"].state == BoxState.OPEN
    e = inv["vm1"].entries["ram"]
    assert (e.type, e.size) == (FdType.MEMFD, 8000)

    with pytest.raises(FdboxError) as exc:
        backend.put("vm1", "ram", memfd(b"x"), detect(memfd(b"x")))
    assert exc.value.name == "AlreadyExists"
    with pytest.raises(FdboxError) as exc:
        backend.get("vm1", "nope")
    assert exc.value.name == "NotFound"
    r, w = os.pipe()
    with pytest.raises(FdboxError) as exc:
        backend.put("vm1", "pipe", r, detect(r))
    assert exc.value.name == "UnsupportedType"
    os.close(r)
    os.close(w)
    with pytest.raises(FdboxError) as exc:
        backend.create_box("vm1")
    assert exc.value.name == "AlreadyExists"

    backend.remove("vm1", "ram")
    assert backend.inventory()["vm1"].entries == {}
    backend.delete_box("vm1")
    backend.delete_box("vm1")  # deleting what is gone is done
    assert backend.inventory() == {}


def test_backend_seal_states(backend: KernelBackend) -> None:
    if not backend.survives_kexec:
        pytest.fail("KHO is off in this boot: the kernel backend cannot seal")
    if hugepages_free() < 1:
        pytest.fail("no free huge pages")
    backend.create_box("s")
    fd = huge_memfd(b"seal me")  # beside LUO the module seals no shmem (issue 20)
    backend.put("s", "m", fd, detect(fd))
    backend.finish("s")  # not restored: nothing to release, no error
    backend.seal("s")
    assert backend.inventory()["s"].state == BoxState.SEALED
    with pytest.raises(FdboxError) as exc:
        backend.put("s", "m2", memfd(b"y"), detect(fd))
    assert exc.value.name == "Sealed"
    with pytest.raises(FdboxError) as exc:
        backend.seal("s")
    assert exc.value.name == "Sealed"
    backend.unseal("s")
    with pytest.raises(FdboxError) as exc:
        backend.unseal("s")
    assert exc.value.name == "NotSealed"
    os.close(fd)


# --------------------------------------------------------------------------- daemon


def _fill(c, boxes: int = 3, per_box: int = 4) -> dict[tuple[str, str], str]:  # type: ignore[no-untyped-def]
    sums = {}
    for b in range(boxes):
        for i in range(per_box):
            data = os.urandom(4096 * (i + 1) + b)
            fd = memfd(data)
            c.put(f"vm{b}", f"mem{i}", fd, metadata={"slot": str(i)})
            os.close(fd)
            sums[(f"vm{b}", f"mem{i}")] = hashlib.sha256(data).hexdigest()
    return sums


def _check_all(c, sums: dict[tuple[str, str], str]) -> None:  # type: ignore[no-untyped-def]
    listed = {(e["box"], e["name"]): e for e in c.list()["entries"]}
    assert set(listed) == set(sums)
    for (box, name), want in sums.items():
        if name.startswith("mem"):
            assert listed[(box, name)]["metadata"] == {"slot": name[3:]}
        entry, fd = c.get(box, name)
        try:
            assert digest(fd) == want, f"{box}/{name}"
        finally:
            os.close(fd)


@pytest.fixture
def shmem_seal() -> Iterator[None]:
    """fdboxd's kernel backend seals its manifest as a shmem memfd, which the production
    module leaves to LUO on this kernel: the daemon alone on the module is the setup of KHO
    kernels without LUO's memfd handler (see :func:`kmodtools.shmem_beside_luo`)."""
    with km.shmem_beside_luo():
        yield


def test_daemon_survives_sigkill_with_nothing_lost(shmem_seal: None, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory("--backend", "kernel")
    with d.client() as c:
        assert c.status()["backend"] == "kernel"
        sums = _fill(c)
        if hugepages_free() < 1:
            pytest.fail("no free huge pages")
        h = huge_memfd(b"HUGE DATA")
        c.put("vmh", "huge", h)
        sums[("vmh", "huge")] = digest(h)
        os.close(h)
    fds_before = d.fd_count()
    d.kill()  # SIGKILL: no cleanup runs

    # The kernel still holds everything while no daemon runs.
    with uapi.FdboxDevice() as dev:
        held = {(b.name, e.name) for b in dev.list_boxes() for e in dev.list_entries(b.name)}
    assert held == set(sums)

    d.start()
    with d.client() as c:
        st = c.status()
        assert (st["backend"], st["lost"], st["adopted"]) == ("kernel", [], [])
        assert st["entries"] == len(sums)
        _check_all(c, sums)
    # the daemon does not hold the entries itself (fd count does not grow with entries)
    assert d.fd_count() <= fds_before + 2

    # twice more, with a seal in between: the sealed state survives the kill too (the
    # hugetlb box: beside LUO the module seals no shmem, issue 20)
    probe = KernelBackend()
    can_seal = probe.survives_kexec
    probe.close()
    if can_seal:
        with d.client() as c:
            c.seal("vmh")
        d.kill()
        d.start()
        with d.client() as c:
            boxes = {b["name"]: b for b in c.list()["boxes"]}
            assert boxes["vmh"]["state"] == "sealed"
            c.unseal("vmh")
            _check_all(c, sums)
    d.kill()
    d.start()
    with d.client() as c:
        assert c.status()["lost"] == []
        _check_all(c, sums)
        for box in {b for b, _ in sums}:
            c.delete_box(box)
    d.stop()


def test_daemon_adopts_entries_when_the_manifest_is_gone(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory("--backend", "kernel")
    with d.client() as c:
        sums = _fill(c, boxes=2, per_box=2)
    d.kill()
    # The manifest is the snapshot and its journal (fdboxd.manifest): both gone.
    manifest = Path(d.state_dir) / "manifest.json"
    assert manifest.exists()
    for path in Path(d.state_dir).glob("manifest.*"):
        path.unlink()
    d.start()
    with d.client() as c:
        st = c.status()
        assert len(st["adopted"]) == len(sums) and st["lost"] == []
        for (box, name), want in sums.items():
            _, fd = c.get(box, name)
            assert digest(fd) == want
            os.close(fd)
        for box in {b for b, _ in sums}:
            c.delete_box(box)
    d.stop()


def test_daemon_reports_entries_the_kernel_lost(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory("--backend", "kernel")
    with d.client() as c:
        _fill(c, boxes=1, per_box=3)
    d.kill()
    with uapi.FdboxDevice() as dev:
        dev.remove_entry("vm0", "mem1")  # behind the daemon's back
    d.start()
    with d.client() as c:
        st = c.status()
        assert [(x["box"], x["name"]) for x in st["lost"]] == [("vm0", "mem1")]
        assert {e["name"] for e in c.list()["entries"]} == {"mem0", "mem2"}
        c.delete_box("vm0")
    d.stop()


def hugepages_free() -> int:
    try:
        return int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text())
    except FileNotFoundError:
        return 0

