"""Host side of the fdbox.ko tests: boot the test kernel and run tests/vm/guest/test_module.py.

The in-guest file does the work (every ioctl, its errors, bad input, 8-thread stress,
unload rules); this side builds the module, boots the VM with huge pages reserved, and
turns in-guest failures and any kernel BUG/WARNING/Oops into a readable failure here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import vmlib

GUEST = Path(__file__).resolve().parent / "guest"


def _summary(res: vmlib.GuestPytestRun) -> str:
    by: dict[str, int] = {}
    for r in res.results:
        by[r.outcome] = by.get(r.outcome, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(by.items()))


def test_module_in_guest(vm_with_module: vmlib.Harness, vm_test_module: Path) -> None:
    # Production build: the test hooks are not in it (issue 11, item 16). The test build
    # is there for the shmem SEAL tests only (loaded with test_shmem_beside_luo=1: the
    # shmem path of KHO kernels without LUO's memfd handler, which the tier has no kernel
    # for); every other test runs the production module.
    ko = Path(vm_with_module.module or "")
    assert b"test_corrupt_handover" not in ko.read_bytes(), "test hooks in a production build"
    res = vm_with_module.pytest(
        [GUEST / "test_kernel_backend.py", GUEST / "test_module.py"],
        env={"FDBOX_VM_TEST_MODULE": str(vm_test_module)},
        # 2 MiB pages for the hugetlb tests; the 1 GiB hstate (no pages) so a 1 GiB hugetlb
        # memfd can be created and refused (pdpe1gb: the CPU must offer 1 GiB pages).
        cmdline_extra=["hugepages=64", "hugepagesz=1G", "hugepages=0"],
        qemu_extra=["-cpu", "qemu64,+pdpe1gb"],
        timeout=900,
    )
    res.check()
    passed = [r for r in res.results if r.outcome == "passed"]
    skipped = {r.nodeid.rsplit("::", 1)[-1] for r in res.results if r.outcome == "skipped"}
    # Only the no-KHO test may skip in a kho=on boot.
    assert skipped <= {"test_seal_without_kho_is_enodev"}, skipped
    assert len(passed) >= 65, _summary(res)
    files = {r.nodeid.split("::")[0].rsplit("/", 1)[-1] for r in passed}
    assert {"test_module.py", "test_kernel_backend.py"} <= files, files
    print(f"\nin-guest fdbox.ko tests: {_summary(res)} in {res.run.wall_seconds:.0f}s wall")


def test_module_without_kho(vm_with_module: vmlib.Harness) -> None:
    """Booted with kho=off: boxes still hold entries, sealing fails with ENODEV."""
    res = vm_with_module.pytest(
        [GUEST / "test_module.py"],
        pytest_args=["-k", "without_kho or version or put_get or outlive or unload_refused"],
        cmdline_extra=["kho=off"],
        timeout=300,
    )
    res.check()
    outcomes = {r.nodeid.rsplit("::", 1)[-1]: r.outcome for r in res.results}
    assert outcomes.get("test_seal_without_kho_is_enodev") == "passed", outcomes
    assert all(o == "passed" for o in outcomes.values()), outcomes


def test_module_built_without_kho(vm_with_module: vmlib.Harness, vm_kbuild: Path) -> None:
    """The stubs: a module built with FDBOX_DISABLE_KHO=1 holds entries and refuses SEAL
    with ENODEV even on a kho=on kernel (what a kernel without CONFIG_KEXEC_HANDOVER gets)."""
    src = vmlib.cache_dir() / "kmod-nokho-src"  # in the checkout: the guest sees it
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(vmlib.repo_root() / "kmod", src, ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd"))
    p = subprocess.run(["make", "-C", str(src), f"KDIR={vm_kbuild}", "W=1", "FDBOX_DISABLE_KHO=1"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0, p.stdout
    warnings = [line for line in p.stdout.splitlines() if "warning:" in line and "pahole" not in line]
    assert not warnings, warnings
    # The no-KHO build must not need <linux/kho/abi/*> at all (kernels before 7.x lack it).
    deps = "".join(p.read_text() for p in src.glob(".*.o.cmd"))
    assert "fdbox_main.o" in deps and "kho/abi" not in deps, "a no-KHO build includes the KHO ABI headers"
    ko = src / "fdbox.ko"
    undefined = subprocess.run(["nm", "-u", str(ko)], capture_output=True, text=True, check=True).stdout
    assert "kho_" not in undefined, "a no-KHO build must not link against KHO"
    vm_with_module.module = ko
    res = vm_with_module.pytest(
        [GUEST / "test_module.py"],
        pytest_args=["-k", "without_kho or version or put_get or outlive or unload_refused or duplicates"],
        env={"FDBOX_MODULE_KHO": "0"},
        timeout=300,
    )
    res.check()
    outcomes = {r.nodeid.rsplit("::", 1)[-1]: r.outcome for r in res.results}
    assert outcomes.get("test_seal_without_kho_is_enodev") == "passed", outcomes
    assert all(o == "passed" for o in outcomes.values()), outcomes


def test_dkms_builds_for_supported_kernels_only(vm_kbuild: Path, tmp_path: Path) -> None:
    """kmod/dkms.conf (issue 11, item 15): `dkms build` against the test kernel tree makes
    fdbox.ko; for a kernel outside BUILD_EXCLUSIVE_KERNEL (Debian 12's 6.1) DKMS skips the
    build (exit 77) instead of logging a failure on every kernel upgrade."""
    if shutil.which("dkms") is None:
        if os.environ.get("CI"):
            pytest.fail("dkms missing (scripts/install-deps installs it)", pytrace=False)
        pytest.skip("dkms not installed")
    src, tree = tmp_path / "src", tmp_path / "tree"
    shutil.copytree(vmlib.repo_root() / "kmod", src / "fdbox-0.1.0",
                    ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd"))
    tree.mkdir()
    trees = ["--sourcetree", str(src), "--dkmstree", str(tree)]
    release = (vm_kbuild / "include" / "config" / "kernel.release").read_text().strip()

    def dkms(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["dkms", *args, "-m", "fdbox", "-v", "0.1.0", *trees],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    p = dkms("add")
    assert p.returncode == 0, p.stdout
    p = dkms("build", "-k", release, "--kernelsourcedir", str(vm_kbuild))
    assert p.returncode == 0, p.stdout
    assert list(tree.rglob(f"{release}/*/module/fdbox.ko*")), p.stdout
    p = dkms("build", "-k", "6.1.0-28-amd64", "--kernelsourcedir", str(vm_kbuild))
    assert p.returncode == 77 and "BUILD_EXCLUSIVE" in p.stdout, p.stdout
