"""Box and entry name rules (conventions: "Model")."""

from __future__ import annotations

import pytest

from fdboxd.errors import FdboxError
from fdboxd.names import check_box_name, check_entry_name

GOOD_BOXES = ["a", "vm1", "VM-1", "vm.1", "vm_1", "user@host", "a+b", "0", "x" * 63]
BAD_BOXES = ["", "-vm", ".vm", "_vm", "vm/1", "vm 1", "vm=1", "vm,1", "x" * 64, "vm\n", "vm\0", "väm", None, 5, b"vm"]
GOOD_ENTRIES = ["ram0", "a", "slot=1", "a,b", "ram.0", "x@y+z-w_v", "9" * 255]
BAD_ENTRIES = ["", "-x", "=x", "a:b", "a/b", "a b", "x" * 256, "é", None, ["a"]]


@pytest.mark.parametrize("name", GOOD_BOXES)
def test_good_box_names(name):
    assert check_box_name(name) == name


@pytest.mark.parametrize("name", BAD_BOXES)
def test_bad_box_names(name):
    with pytest.raises(FdboxError) as ei:
        check_box_name(name)
    assert ei.value.name == "InvalidName"


@pytest.mark.parametrize("name", GOOD_ENTRIES)
def test_good_entry_names(name):
    assert check_entry_name(name) == name


@pytest.mark.parametrize("name", BAD_ENTRIES)
def test_bad_entry_names(name):
    with pytest.raises(FdboxError) as ei:
        check_entry_name(name)
    assert ei.value.name == "InvalidName"


def test_entry_names_fit_listen_fdnames():
    # systemd refuses ':' and control characters in FDNAME; our rules never allow them.
    for ch in ":\n\t\0 ":
        with pytest.raises(FdboxError):
            check_entry_name("a" + ch)


def test_error_parameters_are_printable_and_bounded():
    with pytest.raises(FdboxError) as ei:
        check_box_name("x" * 1000)
    assert len(ei.value.params["box"]) <= 80
