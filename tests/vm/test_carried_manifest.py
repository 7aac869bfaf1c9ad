"""The manifest fdboxd carries inside the sealed set (box ``fdboxd.manifest``) crosses a
real kexec, and it is the one the latest seal wrote.

After each kexec fdboxd starts with its state directory removed, so what it knows of
owners, metadata and checksums comes from the carried copy alone: an entry it had to
*adopt* (no metadata, no checksum) means the manifest did not cross, or an old one did.
In-guest steps: tests/vm/guest/carry_stages.py.

* ``--backend kernel`` (fdbox.ko alone) on this kernel, which has LUO: the module seals
  no plain memfd here, so a box with one is refused before anything changes, naming
  ``--backend auto`` (and preflight says the same); a hugetlb box seals, its manifest
  crosses in a hugetlb memfd, and the box comes back byte for byte.
* ``--backend liveupdate`` under a systemd 252 stand-in (fd store for the memfds, the
  ``@`` holder for the sessions): seal ``vm1``, restart fdboxd, seal ``vm2``, kexec: the
  manifest that comes back names ``vm2`` too (the restarted daemon once kept the old
  session and carried the manifest of before the restart). Then ``vm1`` is sealed again,
  fdboxd restarted, and the kexec follows with no seal after the restart: ``vm1``
  crosses (the restarted daemon once closed the LUO index it reclaimed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vmlib

pytestmark = pytest.mark.vm

STAGE_LIB = ". tests/vm/stagelib.sh\n"
STEP = "python3 tests/vm/guest/carry_stages.py"
FORGET_STATE = "rm -rf /var/lib/fdbox\n"  # only the carried manifest can tell owners and metadata


def _json(out: Path, step: str) -> dict:
    return json.loads((out / f"carry-{step}.json").read_text())


def test_kernel_backend_beside_luo_carries_hugetlb_and_its_manifest(vm_with_module: vmlib.Harness) -> None:
    stage1 = STAGE_LIB + f"""
load_module
start_fdboxd --backend kernel
{STEP} ko-1
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + FORGET_STATE + f"""
load_module
start_fdboxd --backend kernel
{STEP} ko-2
stop_fdboxd
"""
    # 4 pages for vm1, 1 for the manifest; as many again for the restore copies
    run = vm_with_module.run(stage1, stages=[stage1, stage2], cmdline_extra=("hugepages=16",), timeout=600)
    run.check()
    out = run.out_dir

    s1 = _json(out, "ko-1")
    for refused in (s1["seal_shmem"], s1["seal_all"]):
        assert refused["name"] == "UnsupportedType", refused
        assert "vm2/ram0" in refused["message"] and "--backend auto" in refused["message"], refused
    assert s1["after_refusals"] == {"sealed": 0, "states": {"vm1": "open", "vm2": "open"}}, s1  # nothing changed
    shmem = [p for p in s1["preflight"] if p.get("box") == "vm2"]
    assert len(shmem) == 1 and "--backend auto" in shmem[0]["fix"], s1["preflight"]
    assert [p for p in s1["preflight"] if p.get("box") != "vm2"] == [], s1["preflight"]
    assert s1["sealed"] == ["vm1"], s1

    s2 = _json(out, "ko-2")
    assert s2["restored"] == 1 and s2["adopted"] == [] and s2["lost"] == [], s2
    assert s2["vm1"] == s1["vm1"], (s1["vm1"], s2["vm1"])  # metadata and checksum: the carried manifest
    assert s2["vm1"]["ram0"]["metadata"] == {"vm": "kept"} and s2["vm1"]["ram0"]["type"] == "memfd-hugetlb", s2
    assert s2["verified"] == {"ram0": "OK type=memfd-hugetlb"}, s2["verified"]


def test_liveupdate_carries_the_latest_manifest_after_a_daemon_restart(vm: vmlib.Harness) -> None:
    stage1 = STAGE_LIB + f"""
{STEP} luo-1
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + FORGET_STATE + f"""
start_fdboxd --backend liveupdate
{STEP} luo-2
stop_fdboxd
cp /out/fdboxd-stage2.log /out/fdboxd-stage2-after-kexec.log
start_fdboxd --backend liveupdate
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage3 = STAGE_LIB + f"""
start_fdboxd --backend liveupdate
{STEP} luo-3
stop_fdboxd
"""
    run = vm.run(stage1, stages=[stage1, stage2, stage3], timeout=900)
    run.check()
    out = run.out_dir

    s1 = _json(out, "luo-1")
    assert s1["restarted"] == {"sealed": 1, "lost": []}, s1  # the fd store gave vm1 back, sealed
    assert s1["sealed"] == ["vm2"], s1

    s2 = _json(out, "luo-2")
    assert s2["restored"] == 2 and s2["lost"] == [], s2
    assert s2["adopted"] == [], s2["adopted"]  # vm2 is in the manifest that crossed
    assert s2["vm2"] == s1["vm2"], (s1["vm2"], s2["vm2"])
    assert all(v.startswith("OK ") for v in s2["verified"].values()) and len(s2["verified"]) == 3, s2["verified"]
    assert s2["sealed"] == ["vm1"], s2
    log2 = (out / "fdboxd-stage2-after-kexec.log").read_text()
    assert "restored the manifest of 2 sealed boxes from the previous kernel" in log2, log2[-2000:]

    s3 = _json(out, "luo-3")
    assert s3["restored"] == 1 and s3["verified"] == {"ram0": "OK type=memfd"}, s3
