"""fdbox-qemu upgrade's pure parts: which machine type QEMU-ARGS pin, the command line."""

from __future__ import annotations

import pytest

from fdboxd.qemu import cli
from fdboxd.qemu.upgrade import machine_pinned, machine_type


@pytest.mark.parametrize(("args", "mtype", "pinned"), [
    ([], None, False),
    (["-accel", "tcg"], None, False),
    (["-machine", "pc"], "pc", False),
    (["-M", "q35,accel=kvm"], "q35", False),
    (["-machine", "pc-i440fx-7.2"], "pc-i440fx-7.2", True),
    (["-machine", "accel=kvm,type=pc-q35-8.2"], "pc-q35-8.2", True),
    (["-machine", "pc-i440fx-7.2", "-machine", "q35"], "q35", False),  # the last one counts
    (["-machine", "accel=tcg"], None, False),
])
def test_machine_type_and_pinning(args, mtype, pinned):
    assert machine_type(args) == mtype
    assert machine_pinned(args) is pinned


@pytest.mark.parametrize("argv", [["upgrade"], ["upgrade", "--all", "vm1"], ["upgrade", "vm1", "vm2", "--", "-S"],
                                  ["upgrade", "--all", "--", "-S"], ["status", "--", "-S"]])
def test_upgrade_command_line_refusals(argv, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["--run-dir", str(tmp_path), *argv])
    assert e.value.code == 2


def test_unit_in_cgroup():
    from fdboxd.qemu.upgrade import unit_in_cgroup

    assert unit_in_cgroup("0::/system.slice/fdbox-qemu@vm1.service\n") == "fdbox-qemu@vm1.service"
    assert unit_in_cgroup("0::/user.slice/user-0.slice/session-3.scope\n") is None
    assert unit_in_cgroup("0::/system.slice/fdbox-qemu@vm1.service/payload\n") == "fdbox-qemu@vm1.service"
    assert unit_in_cgroup("4:memory:/process_api/x\n0::/\n") is None


def test_one_suspend_or_upgrade_of_a_vm_at_a_time(tmp_path):
    """VMLock: an upgrade (wait=0) is refused while a suspend holds the VM; a suspend
    (wait > 0) gets it once the other lets go; another VM is not held up."""
    import threading

    from fdboxd.errors import FdboxError
    from fdboxd.qemu.vm import VMLock

    held = VMLock(str(tmp_path), "vm1", wait=0)
    with pytest.raises(FdboxError) as e:
        VMLock(str(tmp_path), "vm1", wait=0)
    assert e.value.name == "AlreadyExists"
    VMLock(str(tmp_path), "vm2", wait=0).close()
    threading.Timer(0.2, held.close).start()
    with VMLock(str(tmp_path), "vm1", wait=30):
        pass
