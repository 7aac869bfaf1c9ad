"""tests/kvmtest.py must say what Linux's include/uapi/linux/kvm.h says.

The header comes from the test kernel's build tree (``linux-build.tar.xz`` beside the
checkout, see tests/vm/vmlib.py; the 7.2 reference sources do not include it). It is
not installed (``make headers_install`` was not run), so it cannot be included whole;
instead the definitions the tests use — the ``#define`` lines and ``struct
kvm_create_guest_memfd`` — are cut out of the header's text verbatim and compiled with
gcc against the system's ``<linux/ioctl.h>``, and the program prints each value.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vm"))
import kvmtest  # noqa: E402
import vmlib  # noqa: E402

MEMBER = "linux-build/include/uapi/linux/kvm.h"
DEFINES = ["KVMIO", "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION",
           "KVM_CREATE_GUEST_MEMFD", "KVM_CAP_GUEST_MEMFD", "KVM_CAP_GUEST_MEMFD_FLAGS",
           "GUEST_MEMFD_FLAG_MMAP", "GUEST_MEMFD_FLAG_INIT_SHARED", "KVM_API_VERSION"]


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> str:
    extracted = vmlib.cache_dir() / "linux-build" / "include/uapi/linux/kvm.h"
    if extracted.is_file():
        return extracted.read_text()
    tarball = vmlib.test_kernel_dir() / "linux-build.tar.xz"
    if not tarball.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"no {tarball}: the kvm.h check cannot run in CI")
        pytest.skip(f"no {tarball}")
    # tar(1) with xz(1): several times faster than Python's tarfile on this archive
    return subprocess.run(["tar", "-xJf", str(tarball), "-O", MEMBER], check=True,
                          capture_output=True, text=True).stdout


def _definitions(text: str) -> str:
    lines = []
    for name in DEFINES:
        m = re.search(rf"^#define\s+{name}\s.*$", text, re.M)
        assert m is not None, f"{name} not defined in kvm.h"
        lines.append(m.group(0))
    m = re.search(r"^struct kvm_create_guest_memfd \{.*?^\};", text, re.M | re.S)
    assert m is not None, "struct kvm_create_guest_memfd not in kvm.h"
    return "\n".join([m.group(0), *lines])


def _compile(text: str, tmp: Path) -> dict[str, int]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler: the header check cannot run")
    keys = DEFINES + ["sizeof kvm_create_guest_memfd"]
    prog = ["#include <stdio.h>", "#include <linux/types.h>", "#include <linux/ioctl.h>",
            _definitions(text), "int main(void) {"]
    for key in keys:
        expr = "sizeof(struct kvm_create_guest_memfd)" if key.startswith("sizeof ") else key
        prog.append(f'\tprintf("%s=%llu\\n", "{key}", (unsigned long long)({expr}));')
    prog += ["\treturn 0;", "}"]
    src, exe = tmp / "kvm.c", tmp / "kvm"
    src.write_text("\n".join(prog))
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split("=", 1) for line in out.splitlines())}


def _python() -> dict[str, int]:
    values = {name: getattr(kvmtest, name) for name in DEFINES}
    values["sizeof kvm_create_guest_memfd"] = kvmtest.CREATE_GUEST_MEMFD.size
    return values


def test_kvmtest_numbers_match_the_header(header: str, tmp_path: Path) -> None:
    c = _compile(header, tmp_path)
    py = _python()
    wrong = {k: (py[k], c[k]) for k in py if py[k] != c[k]}
    assert not wrong, f"tests/kvmtest.py != kvm.h: {wrong}"


def test_the_check_can_fail(header: str, tmp_path: Path) -> None:
    changed = header.replace("#define KVM_CAP_GUEST_MEMFD_FLAGS 244", "#define KVM_CAP_GUEST_MEMFD_FLAGS 245")
    assert changed != header
    assert _compile(changed, tmp_path)["KVM_CAP_GUEST_MEMFD_FLAGS"] != kvmtest.KVM_CAP_GUEST_MEMFD_FLAGS
