"""Live update at the module level: boxes sealed in fdbox.ko cross a real kexec.

Stage 1 boots the test kernel with huge pages reserved, seals a 128 MiB and a 64 MiB
hugetlb memfd (plus one entry nobody claims and an open box that must not cross;
hugetlb because beside LUO the module seals no shmem, issue 20), and kexecs with KHO; stage 2 loads the module in the new kernel and checks
sizes, seals, owner and SHA-256 of what comes back, that FINISH frees the unclaimed
memory, and that the restored boxes can be sealed again. The in-guest work is in
tests/vm/guest/kexec_module.py; any failed check fails its stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vmlib

SCRIPT = "tests/vm/guest/kexec_module.py"


def _stages(scenario: str) -> tuple[str, str]:
    return (
        f"$PYTHON {SCRIPT} stage1 {scenario}\nvm-kexec\n",
        f"$PYTHON {SCRIPT} stage2 {scenario}\n",
    )


def test_sealed_memfd_and_hugetlb_cross_kexec(vm_with_module: vmlib.Harness) -> None:
    s1, s2 = _stages("full")
    # 100 pages sealed, 96 more for the restore copies
    run = vm_with_module.run(s1, s2, cmdline_extra=["hugepages=110"], memory_mb=2048, timeout=600)
    run.check()
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    assert "restored 2 box(es) from the previous kernel" in run.stage(2).dmesg
    stage1 = json.loads((vm_with_module.out_dir / "full.json").read_text())
    stage2 = json.loads((vm_with_module.out_dir / "full-stage2.json").read_text())
    print(f"\nseal 200 MiB (hugetlb): {stage1['seal_seconds']:.2f}s; restore: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in stage2["restore_seconds"].items())
          + f" (TCG guest); run {run.wall_seconds:.0f}s wall")


def test_kexec_with_nothing_sealed_starts_clean(vm_with_module: vmlib.Harness) -> None:
    s1, s2 = _stages("empty")
    run = vm_with_module.run(s1, s2, timeout=300)
    run.check()
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    assert "fdbox" not in "".join(line for line in run.stage(2).dmesg.splitlines() if "refused" in line)


@pytest.fixture
def vm_with_test_module(vm: vmlib.Harness, vm_test_module: Path) -> vmlib.Harness:
    """``vm`` with fdbox.ko built with FDBOX_TEST=1: the hooks that damage the handover."""
    vm.module = vm_test_module
    return vm


def test_damaged_handover_is_refused_whole(vm_with_test_module: vmlib.Harness) -> None:
    for scenario in ("corrupt-box", "corrupt-root"):
        s1, s2 = _stages(scenario)
        run = vm_with_test_module.run(s1, s2, timeout=300, out_dir=vm_with_test_module.out_dir / scenario)
        run.check()  # includes: no BUG/WARNING/Oops in either kernel
        assert [s.status for s in run.stages] == ["kexec", "ok"], scenario
        assert "previous kernel's boxes refused" in run.stage(2).dmesg, scenario


def test_review_handover_and_restore(vm_with_test_module: vmlib.Harness) -> None:
    """Issue 11, items 3-8 in one kexec: damaged boxes refused one by one (no WARN, no oops),
    the good ones restored; a SEAL in flight at `kexec -e` is waited for; restored boxes
    exist before /dev/fdbox does; RESTORE_FD applies seals and checks its target first."""
    s1, s2 = _stages("review")
    run = vm_with_test_module.run(s1, s2, cmdline_extra=["hugepages=24"], memory_mb=1024, timeout=600)
    run.check()  # includes: no BUG/WARNING/Oops in either kernel
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    assert "fdbox: reboot: waiting for a seal/unseal in progress" in run.console
    print(f"\nreview kexec run: {run.wall_seconds:.0f}s wall")
