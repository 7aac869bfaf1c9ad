"""A real QEMU guest keeps running across a real kexec: fdbox-qemu on fdbox.ko.

Inside the test VM, the host's qemu-system-x86_64 (seen over 9p) runs the boot-sector
guest of tests/qemu-guest/tick.S twice at once: ``vma`` on plain memfd RAM, ``vmb`` on
2 MiB hugetlb RAM. Stage 1 starts both with ``fdbox-qemu start``, waits for their ticks,
``fdbox-qemu suspend``s them, seals and kexecs. Stage 2 (new kernel) loads the module,
starts fdboxd, and ``fdbox-qemu start`` resumes both: the guest's own check of the
512 KiB region it filled before the kexec passes (``sum=OK``), the token is the one it
drew at boot, and the counter continues; no guest boots again.

``vma`` also has a network: ``--tap vmanet0,queues=2,bridge=br0`` (bridge br0 comes up
before fdboxd in each stage, as the host's network config would). The boot-sector guest
cannot use it, so the check is from the host side of the test VM's kernel
(``netstage.py qemu-taps``): before and after the kexec, exactly one QEMU holds the
tap's two queues, each the very file fdboxd holds (kcmp), and after the kexec the tap
fdboxd recreated has the MAC, MTU, bridge port and queue count it had before.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import vmlib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qemuguest  # noqa: E402

pytestmark = pytest.mark.vm

STAGE_LIB = ". tests/vm/stagelib.sh\n. tests/vm/qemustage.sh\n"
TAP = "vmanet0"
VMS = {"vma": f"--ram 32M --tap {TAP},queues=2,bridge=br0 -- -device virtio-net-pci,netdev={TAP},mq=on,vectors=6",
       "vmb": "--ram 32M --hugetlb 2M"}
NET = "python3 tests/vm/netstage.py"
TAPS = f'{NET} qemu-taps --ifname {TAP} --daemon-pid "$(cat /run/fdboxd.pid)"'


def _stage1(vms: dict[str, str]) -> str:
    s = STAGE_LIB + f"load_module\n{NET} network\nstart_fdboxd --backend auto --allow-type tap\n"
    for vm, opts in vms.items():
        s += f"qemu_start {vm} 1 {opts}\n"
    for vm in vms:
        s += f"wait_ticks {vm} 1 3\n"
    s += f"{TAPS} --out /out/taps-1.json\n"
    for vm in vms:
        s += f"fq suspend {vm} --json > /out/{vm}-suspend.json\n"
    s += "ctl --json list > /out/before.json\nctl seal --all\nstop_fdboxd\nvm-kexec --reuse-cmdline\n"
    return s


def _stage2(vms: dict[str, str]) -> str:
    s = STAGE_LIB + f"load_module\n{NET} network\nstart_fdboxd --backend auto --allow-type tap\nctl --json status > /out/restored.json\n"
    for vm, opts in vms.items():
        s += f"qemu_start {vm} 2 {opts}\n"
    for vm in vms:
        s += f"wait_ticks {vm} 2 4\n"
    s += f"{TAPS} --out /out/taps-2.json\n"
    s += "ctl --json list > /out/after.json\n"
    for vm in vms:
        s += f'kill "$(cat /run/{vm}.pid)"\n'
    return s


def check_resumed(out: Path, vm: str) -> tuple[qemuguest.Tick, qemuguest.Tick]:
    """The guest ran on after the kexec with the same RAM: returns (last before, first after)."""
    before = qemuguest.ticks(out / f"{vm}-1.serial")
    after = qemuguest.ticks(out / f"{vm}-2.serial")
    assert len(before) >= 3 and all(t.ok for t in before), (vm, before[-3:])
    assert len(qemuguest.boots(out / f"{vm}-1.serial")) == 1
    assert qemuguest.boots(out / f"{vm}-2.serial") == [], f"{vm} booted again instead of resuming"
    assert len(after) >= 4, (vm, (out / f"{vm}-2.log").read_text())
    last = before[-1]
    assert last.n < after[0].n <= last.n + 2, (vm, last, after[0])
    assert all(t.token == last.token and t.ok for t in after), (vm, after[:3])
    return last, after[0]


def test_qemu_guest_survives_kexec_memfd_and_hugetlb(vm_with_module: vmlib.Harness) -> None:
    qemuguest.build(vm_with_module.out_dir)
    run = vm_with_module.run(_stage1(VMS), _stage2(VMS), cmdline_extra=["hugepages=40"], timeout=600)
    run.check()
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    out = run.out_dir
    before = {(e["box"], e["name"]): e for e in json.loads((out / "before.json").read_text())["entries"]}
    assert before[("vma", "ram0")]["type"] == "memfd" and before[("vmb", "ram0")]["type"] == "memfd-hugetlb"
    assert {n for b, n in before if b == "vma"} == {"ram0", "devstate", f"tap.{TAP}.q0", f"tap.{TAP}.q1"}
    restored = json.loads((out / "restored.json").read_text())
    # auto: vma's RAM and both devstates (plain memfds) through LUO, vmb's hugetlb RAM
    # through fdbox.ko (beside LUO's memfd handler the module seals hugetlb only, issue 20)
    assert restored["backend"] == "liveupdate+kernel" and restored["restored"] == 2 and not restored["lost"], restored
    after = {(e["box"], e["name"]) for e in json.loads((out / "after.json").read_text())["entries"]}
    for vm in VMS:
        check_resumed(out, vm)
        assert (vm, "ram0") in after and (vm, "devstate") not in after, after  # dropped once resumed
        s = json.loads((out / f"{vm}-suspend.json").read_text())
        print(f"\n{vm}: suspend {s['total_ms']:.0f} ms (save {s['save_ms']:.0f}, put {s['put_ms']:.0f}), "
              f"devstate {s['devstate_bytes'] >> 10} KiB (nested TCG)")
    check_taps(out)
    print(f"run {run.wall_seconds:.0f}s wall")


def check_taps(out: Path) -> None:
    """QEMU holds the tap fdboxd holds, before the kexec and (recreated) after it."""
    taps = [json.loads((out / f"taps-{n}.json").read_text()) for n in (1, 2)]
    for t in taps:
        assert t["daemon_fds"] == 2 and t["holders"] == 1 and len(t["qemu"]) == 1, t
        assert t["qemu"][0]["fds"] == 2 and t["qemu"][0]["same_file_as_fdboxd"] == [True, True], t
    before, after = (t["observed"] for t in taps)
    # numqueues counts attached queues: QEMU detaches the second while no driver enabled it.
    assert after["master"] == "br0" and after["multi_queue"], after
    for key in ("mac", "mtu", "master", "up", "pi", "vnet_hdr", "multi_queue", "numqueues"):
        assert after[key] == before[key], (key, before, after)
    log = (out / "fdboxd-stage2.log").read_text()
    assert f"recreated {TAP} (2 queue(s))" in log, log
