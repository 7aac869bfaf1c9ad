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
import shutil
import subprocess
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


@pytest.fixture(scope="session")
def vm_other_version_module(vm_kbuild: Path) -> Path:
    """fdbox.ko built with FDBOX_TEST=1 FDBOX_KHO_VERSION=99: a handover no other build reads."""
    src = vmlib.cache_dir() / "kmod-v99-src"  # in the checkout: the guest sees it
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(vmlib.repo_root() / "kmod", src, ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd"))
    p = subprocess.run(["make", "-C", str(src), f"KDIR={vm_kbuild}", "FDBOX_TEST=1", "FDBOX_KHO_VERSION=99"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        pytest.fail(f"FDBOX_KHO_VERSION=99 build failed:\n{p.stdout}", pytrace=False)
    return src / "fdbox.ko"


@pytest.mark.parametrize("scenario", ["other-version", "bad-root-crc"])
def test_unreadable_handover_is_left_untouched(vm_with_test_module: vmlib.Harness, vm_other_version_module: Path,
                                               scenario: str) -> None:
    """Issue 27, H1: a handover the module cannot read (another FDBOX_KHO_VERSION, a root
    whose CRC fails) is not claimed: the build of its version restores it byte for byte
    later, or `fdboxctl release-handover` gives all of its memory back."""
    s1, s2 = _stages(scenario)
    run = vm_with_test_module.run(s1, s2, cmdline_extra=["hugepages=24"], memory_mb=1024, timeout=600,
                                  env={"FDBOX_VM_OTHER_MODULE": str(vm_other_version_module)})
    run.check()  # includes: no BUG/WARNING/Oops in either kernel
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    print(f"\n{scenario} kexec run: {run.wall_seconds:.0f}s wall")


def test_shmem_folio_past_eof_restores(vm_with_test_module: vmlib.Harness) -> None:
    """Issue 27, M1: shmem makes large folios past i_size (huge=always); a box whose last
    folio runs past the end of its memfd is restored, byte for byte (it was refused)."""
    s1, s2 = _stages("shmem-thp")
    run = vm_with_test_module.run(s1, s2, cmdline_extra=["transparent_hugepage_shmem=always"], timeout=300)
    run.check()
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    print(f"\nshmem-thp kexec run: {run.wall_seconds:.0f}s wall")


def test_transient_load_failure_keeps_box_pending(vm_with_test_module: vmlib.Harness) -> None:
    """Issue 27, M2: ENOMEM at each allocation of the load path (an FDBOX_TEST hook: a
    kexec on the debug kernel for failslab is not tried here) keeps the box pending with
    nothing claimed or freed; open and FDBOX_IOC_RESCAN retry it until it is restored."""
    s1, s2 = _stages("load-enomem")
    run = vm_with_test_module.run(s1, s2, cmdline_extra=["hugepages=24"], memory_mb=1024, timeout=300)
    run.check()
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    print(f"\nload-enomem kexec run: {run.wall_seconds:.0f}s wall")
