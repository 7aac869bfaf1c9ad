"""fdboxd.gmem's reserved names for carried copies: valid entry names, never a user's."""

from __future__ import annotations

from fdboxd import gmem
from fdboxd.names import check_entry_name


def test_carry_names_are_valid_reserved_and_distinct():
    short, long = "ram0", "r" + "a" * 254
    for name in (short, long, "x" * 243, "x" * 244):
        c = gmem.carry_name(name)
        assert check_entry_name(c) == c and len(c) <= 255
        assert gmem.is_carry_name(c) and not gmem.is_carry_name(name)
    assert gmem.carry_name(short) == "fdboxd.gmem.ram0"
    assert gmem.carry_name(long) != gmem.carry_name(long[:-1] + "b")
    assert gmem.carry_name("x" * 243) == "fdboxd.gmem." + "x" * 243  # fits: kept readable
