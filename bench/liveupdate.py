#!/usr/bin/env python3
"""Seal and restore time per GiB, measured in the VM across a real kexec.

    python3 bench/liveupdate.py [--size-mib 512] [--hugetlb-mib 128]

Boots the test kernel in qemu (TCG: numbers are for emulated CPUs, compare them with
each other, not with hardware), loads fdbox.ko, stores the regions with the stand-in
VMM, and times inside the guest:

- seal: ``fdboxctl seal --all`` (checksums + KHO preservation);
- restore: fdboxd start-up in the new kernel (the module's restore into fresh memfds
  plus the daemon's checksum verification) until its socket answers;
- claim: the stand-in VMM getting the box back and checking every byte.

Prints the numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))

import vmlib  # noqa: E402

STAGE_LIB = ". tests/vm/stagelib.sh\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=512, help="plain memfd size")
    p.add_argument("--hugetlb-mib", type=int, default=128, help="hugetlb memfd size (2 MiB pages)")
    a = p.parse_args()
    kernel = vmlib.find_test_kernel()
    if kernel is None:
        print("no test kernel", file=sys.stderr)
        return 1
    module = vmlib.build_module(vmlib.repo_root() / "kmod", vmlib.kernel_build_dir(kernel))
    regions = f"--mem ram0={a.size_mib}M"
    if a.hugetlb_mib:
        regions += f" --hugetlb ram1={a.hugetlb_mib}M"
    stage1 = STAGE_LIB + f"""
load_module
start_fdboxd
vmm store --box bench {regions} --seed bench
t0=$(now); ctl seal --all > /dev/null; t1=$(now)
echo "$t0 $t1" > /out/seal.t
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + f"""
t0=$(now); load_module; start_fdboxd; t1=$(now)
vmm verify --box bench {regions} --seed bench > /out/verify.txt; t2=$(now)
echo "$t0 $t1 $t2" > /out/restore.t
"""
    huge_pages = a.hugetlb_mib // 2 + 16
    mem = max(2048, 3 * (a.size_mib + a.hugetlb_mib) + 1024)
    with tempfile.TemporaryDirectory(prefix="fdbox-bench-") as tmp:
        run = vmlib.run_guest(stage1, stage2, out_dir=Path(tmp), module=module, kernel=kernel,
                              initramfs=vmlib.build_initramfs(), memory_mb=mem,
                              cmdline_extra=(f"hugepages={huge_pages}",), timeout=3600)
        if not run.ok:
            print(run.report(), file=sys.stderr)
            return 1
        s0, s1 = map(float, (Path(tmp) / "seal.t").read_text().split())
        r0, r1, r2 = map(float, (Path(tmp) / "restore.t").read_text().split())
        verified = (Path(tmp) / "verify.txt").read_text().count("OK ")
    gib = (a.size_mib + a.hugetlb_mib) / 1024
    print(f"regions: {a.size_mib} MiB memfd + {a.hugetlb_mib} MiB hugetlb = {gib:.3f} GiB (qemu TCG, {mem} MiB guest)")
    print(f"seal:    {s1 - s0:8.2f} s  ({(s1 - s0) / gib:8.2f} s/GiB)")
    print(f"restore: {r1 - r0:8.2f} s  ({(r1 - r0) / gib:8.2f} s/GiB)  module load + fdboxd start (restore + verify)")
    print(f"claim:   {r2 - r1:8.2f} s  ({(r2 - r1) / gib:8.2f} s/GiB)  stand-in VMM GetBox + full read, {verified} regions OK")
    print(f"wall:    {run.wall_seconds:8.2f} s  whole two-stage run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
