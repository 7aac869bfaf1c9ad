"""The guest_memfd tests, run where guest_memfd exists: inside the debug test kernel.

Hosts differ: some hosts' ``/dev/kvm`` (kvm_pvm) gives no ``KVM_CAP_GUEST_MEMFD``, and a
missing host capability is never a CI failure, so there ``tests/integration/
test_guest_memfd.py`` and preflight's guest_memfd check skip. Then this test boots
``../shared/testkernel-debug`` (KVM with ``KVM_SW_PROTECTED_VM``; under TCG ``-cpu max``
emulates SVM, so kvm_amd loads and ``/dev/kvm`` gives guest_memfd) and runs the same
files in it as root, with ``$FDBOX_REQUIRE_GUEST_MEMFD=1``: there a missing capability
fails, and every test must pass (none skipped). The debug kernel's KASAN and lockdep
watch the whole run: a report fails it (``GuestRun.problems``).

Where the host has guest_memfd the integration files ran on the host, and this test
skips saying so (``FDBOX_GMEM_IN_VM=1`` runs it anyway).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import vmlib

sys.path.insert(0, str(vmlib.repo_root() / "tests"))
import kvmtest  # noqa: E402

#: The host tests that need a real guest_memfd (every one of test_guest_memfd.py uses it
#: but the reserved-name check, which runs anyway).
PATHS = (
    "tests/integration/test_guest_memfd.py",
    "tests/integration/test_preflight.py::test_guest_memfd_private_and_room_for_the_copies",
)


def test_guest_memfd_tests_pass_in_the_debug_kernel(vm_debug: vmlib.Harness) -> None:
    missing = kvmtest.host_support()
    if missing is None and not os.environ.get("FDBOX_GMEM_IN_VM"):
        pytest.skip("this host's KVM has guest_memfd: the integration tests ran on the host")
    root = vmlib.repo_root()
    res = vm_debug.pytest(
        [root / p.split("::")[0] for p in PATHS[:1]] + [str(root / PATHS[1])],
        env={kvmtest.REQUIRE_ENV: "1", "FDBOX_TEST_READY_TIMEOUT": "180"},
        cmdline_extra=vmlib.DEBUG_CMDLINE,
        qemu_extra=vmlib.DEBUG_QEMU,
        pytest_args=["--durations=0"],
        memory_mb=2048,
        timeout=2400,  # under load (two lanes, helpers) the 17 tests took past 1500 s
    )
    res.check()
    skipped = [r.nodeid for r in res.results if r.outcome == "skipped"]
    assert not skipped, f"skipped in the debug kernel, where guest_memfd must work: {skipped}"
    passed = [r for r in res.results if r.outcome == "passed"]
    assert len(passed) >= 16, [r.nodeid for r in res.results]
    took = sum(r.seconds for r in res.results)
    print(f"\n{len(passed)} guest_memfd tests passed in the debug kernel ({missing}); "
          f"tests {took:.0f} s, VM wall {res.run.wall_seconds:.0f} s")
    (vm_debug.out_dir / "summary.txt").write_text(f"{len(passed)} passed, {res.run.wall_seconds:.0f} s\n")
    assert Path(res.junit).is_file()
