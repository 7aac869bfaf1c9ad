#!/usr/bin/env python3
"""Time the guest_memfd carry path by phase, with real guest_memfd from /dev/kvm.

    bench/guest_memfd.py [--size-mib 1024] [--runs 3]

Phases (fdboxd.gmem): ``copy_out`` (seal: the kernel copies the guest_memfd's mapping
into a new memfd, the part added to the blackout before kexec), ``check`` (the seal's
full SHA-256 of that copy, fdboxd.checksum), ``fill`` (RestoreInto: the kernel copies
the carried memfd into the new guest_memfd's mapping, after kexec). For scale it also
times a plain memfd-to-memfd ``copy_file_range`` of the same size, the cheapest copy the
kernel offers between two files (guest_memfd cannot be its source or target: no
read/write). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import kvmtest  # noqa: E402

from fdboxd import gmem  # noqa: E402
from fdboxd.checksum import sha256_fd  # noqa: E402


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    size = a.size_mib << 20
    try:
        kvm = kvmtest.Kvm.open()
    except kvmtest.KvmUnavailable as e:
        print(f"no guest_memfd here: {e}")
        return 1
    src = kvm.guest_memfd(size, kvmtest.SHARED)
    with mmap.mmap(src, size) as m:
        block = os.urandom(1 << 20)
        for off in range(0, size, len(block)):
            m[off : off + len(block)] = block
    print(f"guest_memfd {a.size_mib} MiB, {a.runs} runs, best of each (GiB/s = size / seconds)")
    best: dict[str, float] = {}
    for _ in range(a.runs):
        t, copy = timed(lambda: gmem.copy_out(src))
        best["copy_out (seal)"] = min(best.get("copy_out (seal)", 1e9), t)
        t, _ = timed(lambda: sha256_fd(copy))
        best["sha256 of the copy (seal, --verify full)"] = min(best.get("sha256 of the copy (seal, --verify full)", 1e9), t)
        with kvmtest.Kvm.open() as vm2:
            target = vm2.guest_memfd(size, kvmtest.SHARED)
            t, _ = timed(lambda: gmem.fill(target, copy, size))
            best["fill (RestoreInto)"] = min(best.get("fill (RestoreInto)", 1e9), t)
            os.close(target)
        plain = os.memfd_create("bench-plain")
        os.ftruncate(plain, 0)

        def cfr() -> None:
            off = 0
            while off < size:
                off += os.copy_file_range(copy, plain, size - off, off, off)

        t, _ = timed(cfr)
        best["memfd->memfd copy_file_range (for scale)"] = min(best.get("memfd->memfd copy_file_range (for scale)", 1e9), t)
        os.close(plain)
        os.close(copy)
    for phase, t in best.items():
        print(f"{phase:45s} {t * 1000:9.1f} ms  {size / t / (1 << 30):6.2f} GiB/s")
    os.close(src)
    kvm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
