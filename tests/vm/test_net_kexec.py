"""A bridged multi-queue tap comes back after a real kexec, under the same entry names.

Stage 1: the host's network (bridge br0, veth vA/vB) comes up, fdboxd starts on the
kernel backend with ``--allow-type tap``, the "VMM" (tests/vm/netstage.py) opens a
two-queue tap on br0 and puts both queues next to a memfd, then ``seal --all`` and
kexec. The tap dies with the old kernel. Stage 2: the network comes up again, fdboxd
starts and recreates the tap from the record that crossed the kexec in the sealed
manifest; the VMM gets both queues back by name, the interface matches what ``ip``
showed before, and frames pass both ways.
"""

from __future__ import annotations

import json

import pytest

import vmlib

pytestmark = pytest.mark.vm

STAGE_LIB = ". tests/vm/stagelib.sh\n"
NET = "python3 tests/vm/netstage.py"


def test_bridged_tap_recreated_after_kexec(vm_with_module: vmlib.Harness) -> None:
    stage1 = STAGE_LIB + f"""
load_module
{NET} network
start_fdboxd --backend auto --allow-type tap
vmm store --box vm1 --mem ram0=16M --seed net-1
{NET} put --box vm1 --out /out/net-before.json
ctl --json list vm1 > /out/before.json
ctl seal --all
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + f"""
load_module
{NET} network
start_fdboxd --backend auto --allow-type tap
ctl --json list vm1 > /out/after.json
{NET} verify --box vm1 --before /out/net-before.json > /out/net-verify.txt
vmm verify --box vm1 --mem ram0=16M --seed net-1 > /out/verify.txt
"""
    run = vm_with_module.run(stage1, stage2, timeout=900)
    run.check()
    out = run.out_dir
    log = (out / "fdboxd-stage2.log").read_text()
    assert (out / "net-verify.txt").read_text().startswith("OK net vmtap0"), log
    assert "OK vm1/ram0" in (out / "verify.txt").read_text()
    before = {e["name"]: e for e in json.loads((out / "before.json").read_text())["entries"]}
    after = {e["name"]: e for e in json.loads((out / "after.json").read_text())["entries"]}
    assert set(before) == set(after) == {"ram0", "net0.q0", "net0.q1"}
    for q in ("net0.q0", "net0.q1"):
        assert after[q]["type"] == "tap"
        assert after[q]["extra"]["recreate"] is True
        rec_before = dict(before[q]["extra"]["net"])
        rec_after = dict(after[q]["extra"]["net"])
        assert rec_after == rec_before
    assert "recreated vmtap0 (2 queue(s))" in log, log
