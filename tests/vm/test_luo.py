"""The liveupdate backend in a real kernel: memfds cross real kexecs through LUO.

One run, four boots (the VM budget is a few minutes, so the checks share boots):

1. ``--backend auto`` with fdbox.ko loaded (LUO for plain memfds, the module for
   hugetlb): a second agent can open /dev/liveupdate while fdboxd runs; seal→unseal of
   a mixed box loses nothing and unfreezes the memfd; a memfd fdbox.ko holds, and one
   file named twice, are refused at seal (never preserved twice); then the mixed box
   ``vm1`` (memfd on LUO + hugetlb on the module) and ``vm9`` are sealed, fdboxd stops,
   and the ``@`` holder process alone keeps the sessions open into the kexec.
2. auto again: ``vm1`` comes back whole, byte for byte; ``vm9`` is left restored and
   unclaimed (its session retrieved, never claimed) while a new box ``vm2`` is sealed;
   kexec.
3. ``--backend liveupdate`` without the module: ``vm2`` is back byte for byte; ``vm9``
   did not survive the second kexec and nothing reports it as carried; then a kexec
   with nothing sealed.
4. ``--backend liveupdate``: the daemon starts clean, no LUO session is left over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vmlib

pytestmark = pytest.mark.vm

STAGE_LIB = ". tests/vm/stagelib.sh\n"
CHECK = "python3 tests/vm/guest/luo_checks.py"
VM1 = "--mem ram0=64M --hugetlb ram1=8M"
HUGEPAGES = "hugepages=24"  # 2 MiB pages: 8 MiB + the module's restore copy + scratch


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _ok_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("OK ")]


def test_liveupdate_backend_across_kexecs(vm_with_module: vmlib.Harness) -> None:
    stage1 = STAGE_LIB + f"""
load_module
start_fdboxd --backend auto
{CHECK} second-agent > /out/agent-running.json
vmm store --box scratch --mem s0=8M --hugetlb s1=4M --seed scratch
ctl seal scratch
{CHECK} holder > /out/holder-scratch.json
ctl unseal scratch
vmm verify --box scratch --mem s0=8M --hugetlb s1=4M --seed scratch > /out/scratch-verify.txt
ctl delete-box scratch
{CHECK} double > /out/double.json
vmm store --box vm1 {VM1} --seed luo-1
vmm store --box vm9 --mem r=4M --seed luo-9
ctl seal --all
ctl --json status > /out/sealed-status.json
{CHECK} second-agent > /out/agent-sealed.json
stop_fdboxd
{CHECK} holder > /out/holder-stopped.json
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + f"""
load_module
start_fdboxd --backend auto
ctl --json status > /out/restored-status.json
{CHECK} second-agent > /out/agent-restored.json
vmm verify --box vm1 {VM1} --seed luo-1 > /out/vm1-verify.txt
vmm store --box vm2 --mem ram0=16M --seed luo-2
ctl seal vm2
ctl --json status > /out/stage2-sealed.json
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage3 = STAGE_LIB + """
start_fdboxd --backend liveupdate
ctl --json status > /out/stage3-status.json
ctl --json list > /out/stage3-list.json
vmm verify --box vm2 --mem ram0=16M --seed luo-2 > /out/vm2-verify.txt
ctl --json status > /out/stage3-final.json
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage4 = STAGE_LIB + f"""
start_fdboxd --backend liveupdate
ctl --json status > /out/stage4-status.json
stop_fdboxd
{CHECK} second-agent > /out/agent-stage4.json
"""
    run = vm_with_module.run(stage1, stages=[stage1, stage2, stage3, stage4],
                             cmdline_extra=(HUGEPAGES,), timeout=600)
    run.check()
    out = run.out_dir

    # stage 1: the device is free while fdboxd runs, before and after a seal
    assert _json(out / "agent-running.json")["opened"], _json(out / "agent-running.json")
    assert _json(out / "agent-sealed.json")["opened"], _json(out / "agent-sealed.json")
    held = _json(out / "holder-scratch.json")["holders"]
    assert len(held) == 1 and held[0]["argv0"] == "@fdboxd-luo-holder", held
    assert held[0]["sessions"] == 3, held  # the box, the carried manifest and the index
    assert len(_ok_lines(out / "scratch-verify.txt")) == 2  # seal→unseal lost nothing
    double = _json(out / "double.json")
    assert double["module_held"] == "AlreadyExists", double
    assert double["twice"] == "AlreadyExists", double
    assert double["module_held_sealed"] == 0 and double["after"] == 0, double
    sealed = _json(out / "sealed-status.json")
    assert sealed["backend"] == "liveupdate+kernel" and sealed["sealed"] == 2, sealed
    stopped = _json(out / "holder-stopped.json")["holders"]
    # fdboxd is gone; the holder keeps vm1, vm9, the manifest box and the index
    assert len(stopped) == 1 and stopped[0]["sessions"] == 4, stopped

    # stage 2: the mixed box is back whole; the device is free after the restore
    restored = _json(out / "restored-status.json")
    assert restored["restored"] == 2 and restored["lost"] == [], restored
    assert _json(out / "agent-restored.json")["opened"]
    vm1 = _ok_lines(out / "vm1-verify.txt")
    assert len(vm1) == 2 and any("ram1" in line for line in vm1), vm1
    assert _json(out / "stage2-sealed.json")["sealed"] == 1

    # stage 3: vm2 back on the liveupdate backend alone; vm9 did not cross a 2nd kexec
    s3 = _json(out / "stage3-status.json")
    assert s3["backend"] == "liveupdate" and s3["restored"] == 1 and s3["lost"] == [], s3
    boxes = {e["box"] for e in _json(out / "stage3-list.json")["entries"]}
    assert boxes == {"vm2"}, boxes
    assert len(_ok_lines(out / "vm2-verify.txt")) == 1
    assert _json(out / "stage3-final.json")["state"] == "open"

    # stage 4: a kexec with nothing sealed starts clean
    s4 = _json(out / "stage4-status.json")
    assert (s4["boxes"], s4["entries"], s4["restored"]) == (0, 0, 0), s4
    assert s4["lost"] == [] and s4["adopted"] == [], s4
    assert _json(out / "agent-stage4.json")["opened"]
