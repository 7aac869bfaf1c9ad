#!/usr/bin/env python3
"""A real QEMU guest's blackout across a host live update, split by phase.

    python3 bench/vmm_liveupdate.py [--sizes 256M,1G] [--backend auto|kernel|liveupdate] [--verify ...]

Boots the test kernel in qemu (TCG), loads fdbox.ko, runs fdboxd (``--backend auto`` by
default, as fdboxd itself: LUO for memfd RAM where the kernel has it; ``kernel`` for the
module's copy) and, inside that VM, one QEMU per size (the host's qemu-system-x86_64 over 9p, nested
TCG) with the boot-sector guest of tests/qemu-guest/tick.S on fdbox-held memfd RAM.
Then, one VM after the other so the phases do not overlap:

- QEMU save: ``fdbox-qemu suspend`` (stop, device state into a memfd, put, quit);
- seal:      ``fdboxctl seal VM`` (checksums with fdboxd's default --verify, KHO);
- kexec + boot: ``kexec -e`` until the new kernel's stage script starts (wall clock,
  which the new kernel reads from the RTC: +-1 s);
- restore:   module load + fdboxd start in the new kernel until its socket answers
  (one restore for all boxes);
- QEMU load: ``fdbox-qemu start`` until the guest's first ``sum=OK`` tick on its
  serial port (QEMU start, device state load, cont, first tick <= 55 ms later).

The guest's blackout is the sum. Numbers are for emulated CPUs (and nested emulation
for QEMU itself): compare phases with each other, not with hardware. Prints, asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import qemuguest  # noqa: E402
import vmlib  # noqa: E402

LIB = ". tests/vm/stagelib.sh\n. tests/vm/qemustage.sh\n"


def _mib(size: str) -> int:
    n, unit = int(size[:-1]), size[-1].upper()
    return n << 10 if unit == "G" else n


def stages(sizes: list[str], daemon_args: str = "") -> tuple[str, str]:
    vms = {f"v{s.lower()}": s for s in sizes}
    s1 = LIB + f"load_module\nstart_fdboxd {daemon_args}\n"
    for vm, size in vms.items():
        s1 += f"qemu_start {vm} 1 --ram {size}\n"
    for vm in vms:
        s1 += f"wait_ticks {vm} 1 3\n"
    for vm in vms:
        s1 += (f"t0=$(now); fq suspend {vm} --json > /out/{vm}-suspend.json; t1=$(now); "
               f"echo $t0 $t1 > /out/{vm}-save.t\n")
    for vm in vms:
        s1 += f"t0=$(now); ctl seal {vm} > /dev/null; t1=$(now); echo $t0 $t1 > /out/{vm}-seal.t\n"
    s1 += "ctl --json status > /out/sealed.json\nstop_fdboxd\ndate +%s.%N > /out/kexec.t0\nvm-kexec --reuse-cmdline\n"
    s2 = "date +%s.%N > /out/kexec.t1\n" + LIB
    s2 += f"t0=$(now); load_module; start_fdboxd {daemon_args}; t1=$(now); echo $t0 $t1 > /out/restore.t\n"
    s2 += "ctl --json status > /out/restored.json\n"
    for vm, size in vms.items():
        s2 += (f"t0=$(now); qemu_start {vm} 2 --ram {size}\n"
               f"until grep -q 'sum=OK' /out/{vm}-2.serial 2>/dev/null; do sleep 0.01; done; t1=$(now); "
               f"echo $t0 $t1 > /out/{vm}-load.t\n")
    for vm in vms:
        s2 += f"wait_ticks {vm} 2 3\n"
    for vm in vms:
        s2 += f'kill "$(cat /run/{vm}.pid)"\n'
    return s1, s2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256M,1G", help="guest RAM sizes, one QEMU each (M or G)")
    p.add_argument("--backend", default="auto", choices=["auto", "kernel", "liveupdate"])
    p.add_argument("--verify", default="sample", choices=["full", "sample", "none"])
    a = p.parse_args()
    sizes = a.sizes.split(",")
    kernel = vmlib.find_test_kernel()
    if kernel is None:
        print("no test kernel", file=sys.stderr)
        return 1
    module = vmlib.build_module(vmlib.repo_root() / "kmod", vmlib.kernel_build_dir(kernel))
    mem = max(2048, 2 * sum(_mib(s) for s in sizes) + 1536)
    s1, s2 = stages(sizes, f"--backend {a.backend} --verify {a.verify}")
    with tempfile.TemporaryDirectory(prefix="fdbox-bench-") as tmp:
        out = Path(tmp)
        qemuguest.build(out)
        run = vmlib.run_guest(s1, s2, out_dir=out, module=module, kernel=kernel, initramfs=vmlib.build_initramfs(),
                              memory_mb=mem, timeout=3600)
        if not run.ok:
            print(run.report(), file=sys.stderr)
            return 1

        def span(name: str) -> float:
            t0, t1 = map(float, (out / name).read_text().split())
            return (t1 - t0) * 1000

        kexec_ms = (float((out / "kexec.t1").read_text()) - float((out / "kexec.t0").read_text())) * 1000
        restore_ms = span("restore.t")
        backend = json.loads((out / "restored.json").read_text())["backend"]
        print(f"fdbox-qemu blackout, backend {backend}, --verify {a.verify}; test VM {mem} MiB, qemu TCG,"
              " QEMU nested TCG; ms")
        print(f"{'guest RAM':>9} {'QEMU save':>10} {'seal':>8} {'kexec+boot':>11} {'restore':>8} {'QEMU load':>10}"
              f" {'total':>8} {'VMM side':>9} {'fdbox':>7} {'QEMU':>7}")
        for size in sizes:
            vm = f"v{size.lower()}"
            before, after = qemuguest.ticks(out / f"{vm}-1.serial"), qemuguest.ticks(out / f"{vm}-2.serial")
            ok = bool(before and after and after[0].token == before[-1].token and all(t.ok for t in after)
                      and before[-1].n < after[0].n <= before[-1].n + 2)
            save, seal, load = span(f"{vm}-save.t"), span(f"{vm}-seal.t"), span(f"{vm}-load.t")
            s = json.loads((out / f"{vm}-suspend.json").read_text())
            vmm = save + seal + restore_ms + load
            print(f"{size:>9} {save:10.0f} {seal:8.0f} {kexec_ms:11.0f} {restore_ms:8.0f} {load:10.0f}"
                  f" {vmm + kexec_ms:8.0f} {vmm:9.0f} {seal + restore_ms:7.0f} {save + load:7.0f}"
                  f"  {'resumed OK' if ok else 'NOT RESUMED'}; devstate {s['devstate_bytes'] >> 10} KiB,"
                  f" inside save: migrate {s['save_ms']:.0f} put {s['put_ms']:.0f}")
        print("VMM side = save + seal + restore + load (no kexec+boot); fdbox = seal + restore (restore is"
              " shared by all boxes); QEMU = save + load (each includes a python3 start of fdbox-qemu)")
        print(f"wall: {run.wall_seconds:.0f} s for the whole two-stage run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
