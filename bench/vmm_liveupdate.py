#!/usr/bin/env python3
"""QEMU guests' blackout across a host live update, by phase, for 1, 2, 4 … VMs at once.

    python3 bench/vmm_liveupdate.py [--vms 1,2,4] [--ram 256M] [--backend auto|kernel|liveupdate] [--verify ...]

Boots the test kernel in qemu (TCG), loads fdbox.ko, runs fdboxd (``--backend auto`` by
default, as fdboxd itself: LUO for memfd RAM where the kernel has it) and, inside that
VM, N QEMUs (the host's qemu-system-x86_64 over 9p, nested TCG) with the boot-sector
guest of tests/qemu-guest/tick.S on fdbox-held memfd RAM. One kexec per VM count, all
in the same run, so the counts are measured side by side on the same machine state. For
each count, as a host's live update does it:

- QEMU save: one ``fdbox-qemu suspend --all`` (every VM side by side, one process);
- seal:      ``fdbox-call --more io.fdbox.Store.Seal``, as fdbox-seal.service runs it;
- kexec + boot: ``kexec -e`` until the new kernel's stage script starts (wall clock,
  which the new kernel reads from the RTC: +-1 s);
- restore:   module load + fdboxd's exec until its socket first answers (fdboxd
  answers once it restored every box);
- QEMU load: all N ``fdbox-qemu start`` at once, until the last VM's ``READY=1`` (the
  notification fdbox-qemu@.service waits for: ``systemctl start`` would return then);
  ``ticking`` is until every guest printed its first good tick after it.

The guest's blackout is the sum (the last VM back ends it). The floors (issue 18 §1)
are measured in the same guest and run (bench/floors.py): ``python3 -c pass``, ``import
asyncio``, fdboxd's exec to first reply with nothing to restore. Numbers are for
emulated CPUs (and nested emulation for QEMU itself): compare rows with each other, not
with hardware. The goal (issue 22): 4 VMs cost at most twice one VM; printed met or not.
Prints, asserts nothing.

Run inside the guest (by the stages below) as ``bench/vmm_liveupdate.py --guest notify VM...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vm"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import floors  # noqa: E402

LIB = ". tests/vm/stagelib.sh\n. tests/vm/qemustage.sh\n" + floors.SHELL + r"""
ts() { date +%s.%N; }
# notify_listen VM...: a listener for each VM's NOTIFY_SOCKET (/run/notify/VM.sock)
# that writes the wall time of its READY=1 to /out/VM-ready.t; started before the clock.
notify_listen() {
    rm -rf /run/notify; mkdir -p /run/notify
    python3 bench/vmm_liveupdate.py --guest notify "$@" > /out/notify-$FDBOX_VM_STAGE.log 2>&1 &
    until [ -e /run/notify/listening ]; do sleep 0.05; done
}
# qemu_kill VM: stop VM's QEMU, found by its -qmp argument as `fdbox-qemu suspend --all`
# finds it (/run/VM.pid is the backgrounded shell's), and wait until it is gone.
qemu_kill() {
    for c in /proc/[0-9]*/cmdline; do
        if { tr '\0' '\n' < "$c"; } 2> /dev/null | grep -qx "unix:/run/fdbox/qemu/$1.qmp,server=on,wait=off"; then
            p=${c#/proc/}; p=${p%/cmdline}
            kill "$p" 2> /dev/null || true
            while kill -0 "$p" 2> /dev/null; do sleep 0.1; done
        fi
    done
}
# wait_ready VM: until VM's READY=1 was seen (its QEMU must stay up; 10 min at most).
wait_ready() {
    i=0
    until [ -e "/out/$1-ready.t" ]; do
        i=$((i + 1))
        if [ $i -ge 60000 ] || ! kill -0 "$(cat "/run/$1.pid")" 2> /dev/null; then
            log "$1: no READY=1"; cat "/out/$1-2.log"; return 1
        fi
        sleep 0.01
    done
}
"""
STATE = "/var/lib/fdbox"
SOCK = "/run/fdbox/fdboxd.sock"


# ---------------------------------------------------------------------------- guest


def guest_notify(vms: list[str], where: Path = Path("/run/notify"), out: Path = Path("/out"),
                 timeout: float = 1800.0) -> None:
    """What systemd's end of each VM's NOTIFY_SOCKET sees: the time READY=1 came.

    Closes every fd a message carries (the helper's BARRIER=1 pipe), as systemd does.
    """
    socks = {}
    for vm in vms:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        s.bind(str(where / f"{vm}.sock"))
        socks[s.fileno()] = (vm, s)
    (where / "listening").touch()
    waiting = set(vms)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(list(socks), [], [], 1.0)
        for fd in ready:
            vm, s = socks[fd]
            data, fds, _flags, _addr = socket.recv_fds(s, 4096, 4)
            t = time.time()
            for f in fds:
                os.close(f)
            if b"READY=1" in data.split(b"\n"):
                (out / f"{vm}-ready.t").write_text(f"{t:.6f}\n")
                waiting.discard(vm)


# ---------------------------------------------------------------------------- host


def names(n: int) -> list[str]:
    return [f"n{n}v{i}" for i in range(n)]


def stage_scripts(counts: list[int], ram: str, daemon_args: str, call: Path) -> list[str]:
    """One stage per VM count plus a last one: stage k resumes count k-1's VMs (after the
    kexec), then boots count k's, suspends them all at once, seals and kexecs."""
    head = LIB + f"CALL={call}\n"
    out: list[str] = []
    prev: list[str] = []
    for k, n in enumerate([*counts, 0], start=1):
        # The kexec's end: the first thing the new kernel's stage does.
        s = (f"date +%s.%N > /out/kexec-{len(prev)}.t1\n" if prev else "") + head + "floors\n"
        s += f"t0=$(ts); load_module; echo $t0 $(ts) > /out/modload-{k}.t\n"
        s += f"fdboxd_timed {SOCK} {STATE} /out/fdboxd-{k}.log /out/fdboxd-{k}.t {daemon_args}\n"
        s += f"ctl --json status > /out/status-{k}.json\n"
        if prev:
            s += f"notify_listen {' '.join(prev)}\n"
            s += "t0=$(ts)\n"
            for vm in prev:
                s += f"export NOTIFY_SOCKET=/run/notify/{vm}.sock; qemu_start {vm} 2 --ram {ram}\n"
            s += "unset NOTIFY_SOCKET\n"
            s += f"echo $t0 > /out/load-{len(prev)}.t0\n"
            for vm in prev:
                s += f"wait_ready {vm}\n"
            for vm in prev:
                s += f"until grep -q 'sum=OK' /out/{vm}-2.serial 2> /dev/null; do sleep 0.01; done\n"
            s += f"echo $t0 $(ts) > /out/ticking-{len(prev)}.t\n"
            for vm in prev:
                s += f"wait_ticks {vm} 2 3\n"
            for vm in prev:  # free the memory for the next count
                s += f"qemu_kill {vm}; ctl delete-box {vm}\n"
        cur = names(n)
        for vm in cur:
            s += f"qemu_start {vm} 1 --ram {ram}\n"
        for vm in cur:
            s += f"wait_ticks {vm} 1 3\n"
        stop = f'kill -TERM "$(cat {STATE}.pid)"; while kill -0 "$(cat {STATE}.pid)" 2> /dev/null; do sleep 0.1; done\n'
        if cur:
            s += f"t0=$(ts); fq suspend --all --json > /out/suspend-{n}.json; echo $t0 $(ts) > /out/save-{n}.t\n"
            s += f"t0=$(ts); $CALL --more io.fdbox.Store.Seal > /out/seal-{n}.out; echo $t0 $(ts) > /out/seal-{n}.t\n"
            s += stop + f"date +%s.%N > /out/kexec-{n}.t0\nvm-kexec --reuse-cmdline\n"
        else:
            s += stop
        out.append(s)
        prev = cur
    return out


def _mib(size: str) -> int:
    n, unit = int(size[:-1]), size[-1].upper()
    return n << 10 if unit == "G" else n


def report(out: Path, counts: list[int], ram: str, backend_arg: str, verify: str, mem: int, stages: int) -> None:
    fl = floors.read(out, stages, [out / "fdboxd-1.t"])
    restored = [json.loads(f.read_text()) for k in range(2, stages + 1) if (f := out / f"status-{k}.json").exists()]
    backend = restored[0]["backend"] if restored else backend_arg
    print(f"fdbox-qemu blackout by VM count, backend {backend}, --verify {verify}, {ram} RAM per VM; "
          f"test VM {mem} MiB, qemu TCG, QEMU nested TCG; ms")
    print(fl.line())
    print(f"{'VMs':>4} {'QEMU save':>10} {'seal':>7} {'kexec+boot':>11} {'restore':>8} {'QEMU load':>10}"
          f" {'blackout':>9} {'VMM side':>9} {'ticking':>8}  per VM: migrate max, READY first..last")
    # Each phase's floor: what a Python step costs here before it does anything.
    py, fd = fl.python_pass_s * 1000, fl.fdboxd_ready_s * 1000
    print(f"{'floor':>5} {py:9.0f} {'-':>7} {'-':>11} {fd:8.0f} {py:10.0f}   (python3 -c pass: the interpreter "
          "fdbox-qemu suspend/start is; fdboxd exec to first reply with nothing to restore)")
    rows: dict[int, tuple[float, float]] = {}
    for k, n in enumerate(counts, start=1):
        vms = names(n)
        ms = {name: floors.span(out / f"{name}-{n}.t") * 1000 for name in ("save", "seal")}
        t0_file, t1_file = out / f"kexec-{n}.t0", out / f"kexec-{n}.t1"
        kexec = ((float(t1_file.read_text()) - float(t0_file.read_text())) * 1000
                 if t0_file.exists() and t1_file.exists() else math.nan)
        restore = (floors.span(out / f"modload-{k + 1}.t") + floors.span(out / f"fdboxd-{k + 1}.t")) * 1000
        load_t0 = float((out / f"load-{n}.t0").read_text()) if (out / f"load-{n}.t0").exists() else math.nan
        ready = [float(f.read_text()) - load_t0 for vm in vms if (f := out / f"{vm}-ready.t").exists()]
        load = max(ready) * 1000 if len(ready) == n else math.nan
        ticking = floors.span(out / f"ticking-{n}.t") * 1000
        lines = [json.loads(line) for line in (out / f"suspend-{n}.json").read_text().splitlines()] \
            if (out / f"suspend-{n}.json").exists() else []
        migrate = max((r.get("save_ms", math.nan) for r in lines), default=math.nan)
        failed = [r["vm"] for r in lines if "error" in r]
        resumed = all(_resumed(out, vm) for vm in vms)
        vmm = ms["save"] + ms["seal"] + restore + load
        rows[n] = (vmm + kexec, vmm)
        first = min(ready) * 1000 if ready else math.nan
        print(f"{n:>4} {ms['save']:10.0f} {ms['seal']:7.0f} {kexec:11.0f} {restore:8.0f} {load:10.0f}"
              f" {vmm + kexec:9.0f} {vmm:9.0f} {ticking:8.0f}  {migrate:.0f}, {first:.0f}..{load:.0f}"
              f"  {'all resumed OK' if resumed and not failed else 'NOT ALL RESUMED ' + ' '.join(failed)}")
    print("restore = module load + fdboxd exec to first answer (it answers once every box is restored); "
          "QEMU load = all starts at once until the last READY=1; VMM side = blackout - kexec+boot")
    if 1 in rows and 4 in rows:
        for i, what in enumerate(("blackout", "VMM side")):
            ratio = rows[4][i] / rows[1][i]
            print(f"goal: 4 VMs <= 2 x 1 VM ({what}): {rows[4][i]:.0f} / {rows[1][i]:.0f} ms = {ratio:.2f}: "
                  f"{'met' if ratio <= 2 else 'NOT met'}")


def _resumed(out: Path, vm: str) -> bool:
    import qemuguest

    before, after = qemuguest.ticks(out / f"{vm}-1.serial"), qemuguest.ticks(out / f"{vm}-2.serial")
    return bool(before and after and after[0].token == before[-1].token and all(t.ok for t in after)
                and before[-1].n < after[0].n <= before[-1].n + 2 and not qemuguest.boots(out / f"{vm}-2.serial"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--vms", default="1,2,4", help="VM counts, one kexec each (default: 1,2,4)")
    p.add_argument("--ram", default="256M", help="guest RAM per VM (M or G)")
    p.add_argument("--backend", default="auto", choices=["auto", "kernel", "liveupdate"])
    p.add_argument("--verify", default="sample", choices=["full", "sample", "none"])
    p.add_argument("--timeout", type=float, default=5400)
    a = p.parse_args()
    if a.guest:
        step, *args = a.guest
        if step != "notify":
            raise SystemExit(f"unknown step {step}")
        guest_notify(args)
        return 0

    import qemuguest
    import vmlib
    from fdboxtest import build_libexec

    counts = [int(x) for x in a.vms.split(",")]
    kernel = vmlib.find_test_kernel()
    if kernel is None:
        print("no test kernel (see tests/vm/vmlib.py)", file=sys.stderr)
        return 2
    module = vmlib.build_module(vmlib.repo_root() / "kmod", vmlib.kernel_build_dir(kernel))
    mem = max(2048, 2 * max(counts) * _mib(a.ram) + 1536)
    stages = stage_scripts(counts, a.ram, f"--backend {a.backend} --verify {a.verify}", build_libexec("fdbox-call"))
    out = Path(tempfile.mkdtemp(prefix="fdbox-bench-vmm-"))
    qemuguest.build(out)
    run = vmlib.run_guest(stages[0], stages=stages, out_dir=out, module=module, kernel=kernel,
                          initramfs=vmlib.build_initramfs(), memory_mb=mem, timeout=a.timeout)
    if not run.ok:
        print(run.report(), file=sys.stderr)
        return 1
    report(out, counts, a.ram, a.backend, a.verify, mem, len(stages))
    print(f"wall: {run.wall_seconds:.0f} s for the whole {len(stages)}-stage run (raw data: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
