"""Live update in a real kernel: sealed boxes survive a real kexec, byte for byte.

Stage 1 boots the test kernel (with huge pages reserved), loads fdbox.ko, starts fdboxd
on ``--backend auto`` (the memfd crosses through LUO, the hugetlb memfd through the
module: beside LUO's memfd handler fdbox.ko seals hugetlb only, issue 20), lets the
stand-in VMM store a memfd and a hugetlb memfd, seals
with ``fdboxctl seal --all`` and kexecs (``kexec -s``: KHO hands the sealed set over).
Stage 2, in the new kernel, loads the module, starts fdboxd, and the stand-in VMM gets
its memory back by name: same sizes, same seals, same SHA-256.

What each stage did is written under ``/out`` so failures read as what went wrong, not
as "stage 2 failed".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vmlib

pytestmark = pytest.mark.vm

# Shell functions every stage uses: load the module, run fdboxd.
STAGE_LIB = ". tests/vm/stagelib.sh\n"

REGIONS = "--mem ram0=256M --hugetlb ram1=64M"
HUGEPAGES = "hugepages=48"  # 2 MiB pages: 64 MiB needs 32, with room for the restore copy


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_memfd_and_hugetlb_survive_kexec(vm_with_module: vmlib.Harness) -> None:
    # --verify full: this test compares the whole-file SHA-256 recorded at seal with the
    # bytes read back (the default, sample, records no whole-file digest for large entries).
    stage1 = STAGE_LIB + f"""
load_module
start_fdboxd --backend auto --verify full
vmm store --box vm1 {REGIONS} --seed kexec-1
ctl --json list vm1 > /out/before.json
ctl seal --all
ctl --json status > /out/sealed-status.json
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + f"""
load_module
start_fdboxd --backend auto --verify full
ctl --json status > /out/restored-status.json
vmm verify --box vm1 {REGIONS} --seed kexec-1 | tee /out/verify.txt
ctl --json list vm1 > /out/after.json
ctl --json status > /out/final-status.json
"""
    run = vm_with_module.run(stage1, stage2, cmdline_extra=(HUGEPAGES,), timeout=900)
    run.check()
    out = run.out_dir
    before = {e["name"]: e for e in _json(out / "before.json")["entries"]}
    after = {e["name"]: e for e in _json(out / "after.json")["entries"]}
    assert set(before) == set(after) == {"ram0", "ram1"}
    sealed = _json(out / "sealed-status.json")
    assert sealed["backend"] == "liveupdate+kernel" and sealed["sealed"] == 1
    restored = _json(out / "restored-status.json")
    assert restored["restored"] == 1, restored
    assert restored["lost"] == [], restored["lost"]
    verify = (out / "verify.txt").read_text()
    assert verify.count("OK vm1/") == 2, verify
    for name, size, kind in (("ram0", 256 << 20, "memfd"), ("ram1", 64 << 20, "memfd-hugetlb")):
        assert after[name]["size"] == size
        assert after[name]["type"] == kind
        assert after[name]["sha256"] == restored_sha(out, name)
        assert after[name]["metadata"] == before[name]["metadata"]
    final = _json(out / "final-status.json")
    assert final["state"] == "open", final  # every entry claimed: the box reopened


def restored_sha(out: Path, name: str) -> str:
    """The SHA-256 the stand-in VMM computed of ``name`` as it got it back after the kexec."""
    for line in (out / "verify.txt").read_text().splitlines():
        if line.startswith("OK vm1/" + name + " "):
            return line.rsplit("sha256=", 1)[1]
    raise AssertionError(f"no verify line for {name}")


def test_seal_unseal_get_loses_nothing(vm_with_module: vmlib.Harness) -> None:
    stage1 = STAGE_LIB + f"""
load_module
start_fdboxd --backend auto
vmm store --box vm1 --mem ram0=8M --hugetlb ram1=4M --seed unseal
ctl seal vm1
ctl --json status > /out/sealed.json
ctl unseal vm1
ctl --json status > /out/unsealed.json
vmm verify --box vm1 --mem ram0=8M --hugetlb ram1=4M --seed unseal | tee /out/verify.txt
stop_fdboxd
"""
    run = vm_with_module.run(stage1, cmdline_extra=("hugepages=8",), timeout=300)
    run.check()
    out = run.out_dir
    assert _json(out / "sealed.json")["sealed"] == 1
    assert _json(out / "unsealed.json")["sealed"] == 0
    assert (out / "verify.txt").read_text().count("OK vm1/") == 2


def test_kexec_with_nothing_sealed_starts_clean(vm_with_module: vmlib.Harness) -> None:
    stage1 = STAGE_LIB + """
load_module
start_fdboxd
vmm store --box vm1 --mem ram0=4M --seed unsealed
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + """
load_module
start_fdboxd
ctl --json status > /out/status.json
ctl --json list > /out/list.json
"""
    run = vm_with_module.run(stage1, stage2, timeout=300)
    run.check()
    status = _json(run.out_dir / "status.json")
    assert (status["boxes"], status["entries"], status["restored"]) == (0, 0, 0), status
    assert status["lost"] == [] and status["adopted"] == []
    assert _json(run.out_dir / "list.json")["entries"] == []
