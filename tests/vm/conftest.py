"""Fixtures of the VM test tier (see vmlib.py for what a run is).

Tests that use ``vm`` (or ``vm_kernel``) are marked ``vm`` automatically, so
``pytest -m "not vm"`` leaves the tier out. When the test kernel or a host tool
is missing they skip, except in CI: with ``$CI`` set and the test kernel
directory present, a VM test that cannot run fails.

In-guest tests live in tests/vm/guest/ (never collected on the host, see
pyproject's norecursedirs and ``collect_ignore`` below) and are run by a host
test through ``vm.pytest([...])``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vmlib  # noqa: E402

if not vmlib.in_guest():
    collect_ignore = ["guest"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots the test kernel in qemu (slow)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "vm_kernel" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vm)


def _cannot_run(reason: str) -> None:
    """Skip, or fail when CI must run the tier (``$CI`` set and the test kernel dir present)."""
    if os.environ.get("CI") and vmlib.test_kernel_dir().is_dir():
        pytest.fail(f"VM tier cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vm_kernel() -> vmlib.TestKernel:
    """The test kernel; skips (fails in CI) when it or qemu/kexec/busybox is missing."""
    kernel = vmlib.find_test_kernel()
    if kernel is None:
        _cannot_run(f"no test kernel at {vmlib.test_kernel_dir()} (set FDBOX_TEST_KERNEL_DIR)")
    missing = vmlib.missing_tools()
    if missing:
        _cannot_run("missing host tools: " + ", ".join(missing))
    assert kernel is not None
    return kernel


@pytest.fixture(scope="session")
def vm_initramfs(vm_kernel: vmlib.TestKernel) -> Path:
    """The initramfs, built once per content (cached under build/vm)."""
    return vmlib.build_initramfs()


@pytest.fixture(scope="session")
def vm_kbuild(vm_kernel: vmlib.TestKernel) -> Path:
    """linux-build.tar.xz extracted (once) for out-of-tree module builds."""
    if not vm_kernel.build_tarball.is_file():
        _cannot_run(f"no {vm_kernel.build_tarball}")
    return vmlib.kernel_build_dir(vm_kernel)


@pytest.fixture(scope="session")
def vm_module(vm_kbuild: Path) -> Path:
    """fdbox.ko built from kmod/ against the test kernel, once per session."""
    src = vmlib.repo_root() / "kmod"
    if not (src / "Makefile").is_file():
        _cannot_run(f"{src}/Makefile missing")
    try:
        return vmlib.build_module(src, vm_kbuild)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def vm_test_module(vm_kbuild: Path) -> Path:
    """fdbox.ko built with FDBOX_TEST=1 (the hooks that damage the handover, slow SEAL
    down, or let it seal shmem beside LUO), once per session; never a production build."""
    try:
        ko = vmlib.build_module(vmlib.repo_root() / "kmod", vm_kbuild, name="kmod-test",
                                make_args=("FDBOX_TEST=1",))
    except RuntimeError as e:
        pytest.fail(f"FDBOX_TEST=1 build failed:\n{e}", pytrace=False)
    assert b"test_corrupt_handover" in ko.read_bytes()
    return ko


@pytest.fixture(scope="session")
def vm_roots_tools(vm_kernel: vmlib.TestKernel) -> None:
    """The host tools the Debian roots need (tests/vm/roots.py: mmdebstrap, the package
    build); skips (fails in CI) when one is missing."""
    import roots

    missing = roots.missing_tools()
    if missing:
        _cannot_run("missing host tools for the Debian roots: " + ", ".join(missing))


@pytest.fixture(scope="session")
def vm_debug_kernel(vm_kernel: vmlib.TestKernel) -> vmlib.TestKernel:
    """The debug test kernel (KASAN, lockdep, KVM with guest_memfd); skips (fails in CI)
    when its directory is missing."""
    kernel = vmlib.find_debug_kernel()
    if kernel is None:
        _cannot_run(f"no debug test kernel at {vmlib.debug_kernel_dir()} (set FDBOX_TEST_KERNEL_DEBUG_DIR)")
    assert kernel is not None
    return kernel


@pytest.fixture
def vm_debug(vm_debug_kernel: vmlib.TestKernel, vm_initramfs: Path, tmp_path: Path) -> vmlib.Harness:
    """Like ``vm``, on the debug kernel: pass ``cmdline_extra=vmlib.DEBUG_CMDLINE`` (and
    ``qemu_extra=vmlib.DEBUG_QEMU`` for KVM) to its runs."""
    return vmlib.Harness(kernel=vm_debug_kernel, initramfs=vm_initramfs, out_dir=tmp_path / "out")


@pytest.fixture
def vm(vm_kernel: vmlib.TestKernel, vm_initramfs: Path, tmp_path: Path) -> Iterator[vmlib.Harness]:
    """A :class:`vmlib.Harness` writing to ``tmp_path/out`` (no module; see ``vm_with_module``)."""
    yield vmlib.Harness(kernel=vm_kernel, initramfs=vm_initramfs, out_dir=tmp_path / "out")


@pytest.fixture
def vm_with_module(vm: vmlib.Harness, vm_module: Path) -> vmlib.Harness:
    """Like ``vm``, with ``$FDBOX_VM_MODULE`` set to the built fdbox.ko in every stage."""
    vm.module = vm_module
    return vm
