"""``auto`` on a kernel with LUO and fdbox.ko: the routing of MixedBackend, with memory
backends standing in for both sides (the real ones are exercised in tests/vm/test_luo.py)."""

from __future__ import annotations

import os

import pytest

from fdboxd.backends.memory import MemoryBackend
from fdboxd.backends.mixed import MixedBackend
from fdboxd.errors import FdboxError
from fdboxd.fdtypes import FdInfo, FdType
from fdboxd.model import BoxState


class Side(MemoryBackend):
    def __init__(self, types: set[FdType], fail_seal: bool = False) -> None:
        super().__init__()
        self.types = types
        self.fail_seal = fail_seal

    def accepts(self, fd_type: FdType) -> bool:
        return fd_type in self.types

    def seal(self, box: str) -> None:
        if self.fail_seal:
            raise FdboxError("AlreadyExists", "preserved already")
        super().seal(box)


def mixed(fail_luo: bool = False) -> tuple[MixedBackend, Side, Side]:
    luo = Side({FdType.MEMFD}, fail_seal=fail_luo)
    ko = Side({FdType.MEMFD_HUGETLB, FdType.GUEST_MEMFD})
    return MixedBackend(luo, ko), luo, ko  # type: ignore[arg-type]


def put(b: MixedBackend, box: str, name: str, t: FdType) -> None:
    fd = os.memfd_create(name)
    try:
        b.put(box, name, fd, FdInfo(t, 0))
    finally:
        os.close(fd)


def test_each_file_goes_to_exactly_one_side() -> None:
    b, luo, ko = mixed()
    b.create_box("vm")
    put(b, "vm", "ram0", FdType.MEMFD)
    put(b, "vm", "ram1", FdType.MEMFD_HUGETLB)
    assert set(luo.inventory()["vm"].entries) == {"ram0"}
    assert set(ko.inventory()["vm"].entries) == {"ram1"}
    assert set(b.inventory()["vm"].entries) == {"ram0", "ram1"}
    assert not b.accepts(FdType.TAP)  # taps stay with the store's side backend
    b.seal("vm")
    assert luo.inventory()["vm"].state == ko.inventory()["vm"].state == BoxState.SEALED
    b.unseal("vm")
    assert b.inventory()["vm"].state == BoxState.OPEN
    os.close(b.get("vm", "ram1"))
    b.remove("vm", "ram1")
    with pytest.raises(FdboxError):
        b.get("vm", "ram1")


def test_a_failed_luo_seal_leaves_nothing_sealed() -> None:
    b, luo, ko = mixed(fail_luo=True)
    b.create_box("vm")
    put(b, "vm", "ram0", FdType.MEMFD)
    put(b, "vm", "ram1", FdType.MEMFD_HUGETLB)
    with pytest.raises(FdboxError):
        b.seal("vm")
    assert ko.inventory()["vm"].state == BoxState.OPEN
    assert luo.inventory()["vm"].state == BoxState.OPEN


def test_a_box_restored_on_one_side_reopens_on_both() -> None:
    b, luo, ko = mixed()
    luo.create_box("vm")
    luo._boxes["vm"].state = BoxState.RESTORED
    assert b.inventory()["vm"].state == BoxState.RESTORED
    b.finish("vm")
    assert "vm" in ko.inventory() and b.inventory()["vm"].state == BoxState.OPEN


class CountingSide(Side):
    """A side that counts how often its inventory is read (an ioctl per box on fdbox.ko)."""

    def __init__(self, types: set[FdType]) -> None:
        super().__init__(types)
        self.reads = 0

    def inventory(self):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().inventory()


def test_get_put_and_remove_read_no_inventory() -> None:
    luo, ko = CountingSide({FdType.MEMFD}), CountingSide({FdType.MEMFD_HUGETLB, FdType.GUEST_MEMFD})
    ko.create_box("carried")  # held before the daemon started (a restored box)
    fd = os.memfd_create("x")
    ko.put("carried", "ram1", fd, FdInfo(FdType.MEMFD_HUGETLB, 0))
    os.close(fd)
    b = MixedBackend(luo, ko)  # type: ignore[arg-type]
    luo.reads = ko.reads = 0
    b.create_box("vm")
    for i in range(20):
        put(b, "vm", f"ram{i}", FdType.MEMFD if i % 2 else FdType.MEMFD_HUGETLB)
    for i in range(20):
        os.close(b.get("vm", f"ram{i}"))
    os.close(b.get("carried", "ram1"))
    assert b.peek("vm", "ram1") is not None and b.peek("vm", "ram0") is not None
    for i in range(10):
        b.remove("vm", f"ram{i}")
    assert (luo.reads, ko.reads) == (0, 0)
    assert set(luo.inventory()["vm"].entries) == {f"ram{i}" for i in range(11, 20, 2)}
    assert set(ko.inventory()["vm"].entries) == {f"ram{i}" for i in range(10, 20, 2)}
    with pytest.raises(FdboxError):
        b.get("vm", "ram0")
    b.delete_box("vm")
    with pytest.raises(FdboxError):
        b.get("vm", "ram11")
    assert "vm" not in luo.inventory() and "vm" not in ko.inventory()


def test_a_failure_between_the_two_sides_unseals_the_kernel_half() -> None:
    from fdboxd import failpoints

    b, luo, ko = mixed()
    b.create_box("vm")
    put(b, "vm", "ram0", FdType.MEMFD)
    put(b, "vm", "ram1", FdType.MEMFD_HUGETLB)
    failpoints.configure("seal.after_kernel_side=error(EIO)")
    try:
        with pytest.raises(OSError):
            b.seal("vm")
    finally:
        failpoints.configure(None)
    assert ko.inventory()["vm"].state == luo.inventory()["vm"].state == BoxState.OPEN
