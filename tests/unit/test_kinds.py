"""The fd kinds' registry (issue 19): one kind per fd type but ``other``, as LUO's
``luo_register_file_handler`` refuses a second handler (-EEXIST) and a bad one (-EINVAL)."""

from __future__ import annotations

import errno

import pytest

from fdboxd import kinds
from fdboxd.fdtypes import FdType
from fdboxd.kinds import HELD_ONLY, Kind, KindError, Kinds, register


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
