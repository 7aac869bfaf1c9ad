"""The fd kinds' registry (issue 19): one kind per fd type but ``other``, as LUO's
``luo_register_file_handler`` refuses a second handler (-EEXIST) and a bad one (-EINVAL)."""

from __future__ import annotations

import errno

import pytest

from fdboxd import kinds
from fdboxd.fdtypes import FdType
from fdboxd.kinds import HELD_ONLY, Kind, KindError, Kinds, register
from fdboxd.model import BoxState, Entry


def test_every_fd_type_but_other_has_exactly_one_kind():
    reg = kinds.registered()
    assert set(reg) == {t for t in FdType if t != FdType.OTHER}
    for t, cls in reg.items():
        assert t in cls.types
        assert sum(t in c.types for c in set(reg.values())) == 1, t


def test_other_is_held_only():
    k = Kinds()
    assert k.of(FdType.OTHER) is HELD_ONLY
    assert not HELD_ONLY.carried_by_backend


def test_a_second_kind_for_a_type_is_refused_and_changes_nothing():
    before = kinds.registered()

    class Again(Kind):
        types = frozenset({FdType.MEMFD, FdType.MEMFD_HUGETLB})

    with pytest.raises(KindError) as e:
        register(Again)
    assert e.value.errno == errno.EEXIST
    assert kinds.registered() == before


@pytest.mark.parametrize("types", [frozenset(), frozenset({FdType.OTHER})])
def test_a_kind_without_types_or_for_other_is_invalid(types):
    before = kinds.registered()
    cls = type("Bad", (Kind,), {"types": types})
    with pytest.raises(KindError) as e:
        register(cls)
    assert e.value.errno == errno.EINVAL
    assert kinds.registered() == before


def test_each_store_has_its_own_kind_instances():
    a, b = Kinds(), Kinds()
    assert a.of(FdType.GUEST_MEMFD) is not b.of(FdType.GUEST_MEMFD)
    assert a.of(FdType.MEMFD) is a.of(FdType.MEMFD_HUGETLB)  # one kind, two types


def test_reserved_names_come_from_the_kinds():
    k = Kinds()
    assert k.reserved("fdboxd.gmem.ram0")
    assert k.reserved("ram0") is None


def _entry(t: FdType, size: int = 4 << 20, **extra: object) -> Entry:
    return Entry(box="vm1", name="e", type=t, size=size, uid=0, gid=0, extra=dict(extra))


def test_each_kind_answers_preflight_for_its_entries():
    """What fdboxd.preflight asks of a kind, per kind (preflight.py names none)."""
    k = Kinds()
    opened = BoxState.OPEN
    plain = k.of(FdType.MEMFD).preflight("vm1", _entry(FdType.MEMFD), opened, 0, 4096)
    assert (plain.problems, plain.carrier, plain.via_luo) == ([], FdType.MEMFD, True)

    huge = k.of(FdType.MEMFD_HUGETLB).preflight("vm1", _entry(FdType.MEMFD_HUGETLB, 5 << 20), opened, 0, 2 << 20)
    assert (huge.problems, huge.carrier, huge.via_luo, huge.hugetlb_pages) == ([], FdType.MEMFD_HUGETLB, False, 3)
    no_allow = k.of(FdType.MEMFD_HUGETLB).preflight("vm1", _entry(FdType.MEMFD_HUGETLB), opened, 1, 2 << 20)
    assert [p[0] for p in no_allow.problems] == ["UnsupportedType"] and "MFD_ALLOW_SEALING" in no_allow.problems[0][1]
    # a sealed box's seals are fdbox.ko's own: not held against it
    assert k.of(FdType.MEMFD_HUGETLB).preflight("vm1", _entry(FdType.MEMFD_HUGETLB), BoxState.SEALED, 1,
                                                2 << 20).problems == []

    gm = k.of(FdType.GUEST_MEMFD)
    private = gm.preflight("vm1", _entry(FdType.GUEST_MEMFD, guest_memfd={"shared": False}), opened, None, None)
    assert private.problems and private.problems[0][1].startswith("is a private guest_memfd")
    shared = gm.preflight("vm1", _entry(FdType.GUEST_MEMFD, guest_memfd={"shared": True}), opened, None, None)
    assert (shared.problems, shared.carrier, shared.copy_bytes) == ([], FdType.MEMFD, 4 << 20)

    tap = k.of(FdType.TAP)
    assert "no interface record" in tap.preflight("vm1", _entry(FdType.TAP), opened, None, None).problems[0][1]
    anon = tap.preflight("vm1", _entry(FdType.TAP, net={"ifname": "t0", "netns": {"anonymous": True}}), opened,
                         None, None)
    assert "unnamed network namespace" in anon.problems[0][1]
    good = tap.preflight("vm1", _entry(FdType.TAP, net={"ifname": "t0", "netns": {}}), opened, None, None)
    assert (good.problems, good.carrier) == ([], None)  # recreated, not carried

    other = k.of(FdType.OTHER).preflight("vm1", _entry(FdType.OTHER), opened, None, None)
    assert other.problems[0][:2] == ("UnsupportedType", "is of type other, which fdbox cannot carry across a kexec")
