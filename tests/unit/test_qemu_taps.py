"""``--tap IFNAME[,queues=N][,bridge=BR]`` parsing, entry names and QEMU's -netdev (fdboxd.qemu.taps)."""

from __future__ import annotations

import pytest

from fdboxd.errors import FdboxError
from fdboxd.names import check_entry_name
from fdboxd.qemu.taps import TapSpec, check_held, held, netdev_args, parse_tap


def test_parse_tap_options():
    assert parse_tap("net0") == TapSpec("net0", 1, None)
    assert parse_tap("vm1-net0,queues=4,bridge=br0") == TapSpec("vm1-net0", 4, "br0")
    assert parse_tap("n.1,bridge=br-lan,queues=2") == TapSpec("n.1", 2, "br-lan")


@pytest.mark.parametrize("bad", ["", "0net", "net0,", "net0,queues", "net0,queues=0", "net0,queues=257",
                                 "net0,queues=-1", "net0,bridge=", "net0,bridge=a:b", "net0,mac=x",
                                 "net0,queues=1,queues=2", "a" * 16, "net/0", "net 0"])
def test_parse_tap_refuses(bad):
    with pytest.raises(FdboxError) as e:
        parse_tap(bad)
    assert e.value.name == "InvalidRequest"


def test_entry_names_are_valid_and_read_back():
    spec = parse_tap("a.q1-x_y,queues=3")
    names = [spec.entry(i) for i in range(3)]
    for n in names:
        check_entry_name(n)
    got = held({n: {"type": "tap"} for n in names} | {"ram0": {"type": "memfd"}, "tap.zz.q0": {"type": "memfd"}})
    assert set(got) == {"a.q1-x_y"} and sorted(got["a.q1-x_y"]) == [0, 1, 2]


def test_netdev_fd_for_one_queue_fds_for_more():
    assert netdev_args(TapSpec("net0"), [7]) == ["-netdev", "tap,id=net0,fd=7"]
    assert netdev_args(TapSpec("net0", 3), [7, 8, 9]) == ["-netdev", "tap,id=net0,fds=7:8:9"]


def test_held_tap_must_match_queues_and_bridge():
    rec = {"type": "tap", "extra": {"net": {"master": "br0"}}}
    check_held("vm1", TapSpec("net0", 2, "br0"), {0: rec, 1: rec})
    for spec in (TapSpec("net0", 1, "br0"), TapSpec("net0", 3, "br0"), TapSpec("net0", 2, None),
                 TapSpec("net0", 2, "br1")):
        with pytest.raises(FdboxError) as e:
            check_held("vm1", spec, {0: rec, 1: rec})
        assert e.value.name == "InvalidRequest"
