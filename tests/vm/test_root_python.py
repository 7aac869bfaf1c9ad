"""The unit tier on Debian 13's Python 3.13 and Debian testing's Python 3.14.

tests/unit/ runs with the root's own ``/usr/bin/python3`` and its ``python3-pytest``
(roots.pytest_root: the base root of tests/vm/roots.py plus pytest from the mirror),
chroot'ed on a throwaway overlay of the root with this checkout bind-mounted at its
path (roots.run_in_root): no VM, the unit tier is pure Python. Left out: the two
tests that compile the C uAPI/KVM headers (the roots have no gcc; the host tier runs
them). About 70 s a root here, plus ~30 s for the pytest layer the first time.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import roots

EXPECT = {"forky": "3.14", "trixie": "3.13"}
NEEDS_CC = ("tests/unit/test_kvm_header.py", "tests/unit/test_uapi_header.py")


@pytest.mark.parametrize("suite", ["forky", "trixie"])
def test_unit_tier_on_the_roots_python(suite: str, vm_roots_tools: None) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (unshare, mount, chroot)")
    cached = any(roots.roots_dir().glob(f"{suite}-pytest-{roots.RECIPES[suite].digest()}"))
    if not cached and (problem := roots.mirror_problem(suite)):
        pytest.skip(f"no {suite} root with pytest cached and the Debian mirror cannot serve it: {problem}")
    times: dict[str, float] = {}
    root = roots.pytest_root(suite, times)
    t0 = time.monotonic()
    ignore = " ".join(f"--ignore={f}" for f in NEEDS_CC)
    p = roots.run_in_root(root, "python3 --version; PYTHONDONTWRITEBYTECODE=1 python3 -m pytest -q "
                                f"-p no:cacheprovider -o addopts= {ignore} tests/unit 2>&1 | tail -n 40")
    times["unit tier"] = round(time.monotonic() - t0, 1)
    print(f"\n{suite}: " + ", ".join(f"{k} {v}s" for k, v in times.items()))
    assert p.returncode == 0, p.stdout
    assert p.stdout.startswith(f"Python {EXPECT[suite]}."), p.stdout
    summary = p.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"failed|error", summary), p.stdout
