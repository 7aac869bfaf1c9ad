"""The two stages of the module-level live-update test (run in the VM by
tests/vm/test_kexec_module.py): memory sealed into fdbox.ko crosses a real kexec.

``stage1 SCENARIO``: load fdbox.ko, build the boxes the scenario wants, seal, write
what was stored (sizes, seals, SHA-256) to ``/out/<scenario>.json``. The stage script
then runs ``vm-kexec``.

``stage2 SCENARIO``: load fdbox.ko in the new kernel and check that it gives back
exactly what ``stage1`` recorded. Any mismatch raises, which fails the stage.

Scenarios:

- ``full``: a 256 MiB memfd (with seals) and a 64 MiB hugetlb memfd in box ``vm1``,
  a small memfd in box ``vm2`` that is never claimed (FINISH must free it), and an open
  box ``scratch`` that must not cross.
- ``empty``: nothing sealed: the new kernel starts clean.
- ``corrupt-box`` / ``corrupt-root``: stage 1 loads the module with
  ``test_corrupt_handover=1``/``2`` so the box / root descriptor it hands over is
  damaged; the new kernel's module must refuse the whole handover (no box, the errno
  in ``restore_status``, no kernel warning) and a reload must not try again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import sys
import struct
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kmodtools as km  # noqa: E402

from fdboxd import uapi  # noqa: E402

F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SHRINK, F_SEAL_GROW = 2, 4
MIB = 1 << 20
HUGE = 2 * MIB
OUT = Path("/out")
KHO_OUT = Path("/sys/kernel/debug/kho/out/sub_fdts/fdbox")
KHO_IN = Path("/sys/kernel/debug/kho/in/sub_fdts/fdbox")


def log(msg: str) -> None:
    print(f"[kexec-module] {msg}", flush=True)


def fill(fd: int, size: int, seed: int) -> str:
    """Write a position-dependent pattern of ``size`` bytes through a mapping; return its SHA-256."""
    block = bytearray(os.urandom(MIB))
    h = hashlib.sha256()
    with mmap.mmap(fd, size) as m:
        for off in range(0, size, MIB):
            block[:16] = f"{seed:04d}:{off // MIB:010d}|".encode()
            n = min(MIB, size - off)
            m[off : off + n] = block[:n]
            h.update(block[:n])
    return h.hexdigest()


def sha_of(fd: int) -> str:
    size = os.fstat(fd).st_size
    h = hashlib.sha256()
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
        for off in range(0, size, 16 * MIB):
            h.update(m[off : off + 16 * MIB])
    return h.hexdigest()


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)
    log(f"ok: {what}")


def stage1(scenario: str) -> None:
    corrupt = {"corrupt-box": 1, "corrupt-root": 2}.get(scenario, 0)
    km.load(params=f"test_corrupt_handover={corrupt}" if corrupt else "")
    d = uapi.FdboxDevice()
    v = d.version()
    check(bool(v.features & uapi.FDBOX_FEATURE_KHO_ON), "KHO is on in stage 1")
    record: dict[str, object] = {"entries": {}}
    if scenario == "full":
        d.create_box("vm1")
        ram = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(ram, 256 * MIB)
        sha = fill(ram, 256 * MIB, 1)
        fcntl.fcntl(ram, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
        d.put_fd("vm1", "ram", ram, uid=1000, gid=1000)
        record["entries"]["vm1/ram"] = {"size": 256 * MIB, "sha256": sha, "seals": F_SEAL_SHRINK | F_SEAL_GROW,
                                        "type": "memfd", "uid": 1000}
        huge = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
        os.ftruncate(huge, 64 * MIB)
        sha = fill(huge, 64 * MIB, 2)
        d.put_fd("vm1", "huge", huge, uid=1000, gid=1000)
        record["entries"]["vm1/huge"] = {"size": 64 * MIB, "sha256": sha, "seals": 0, "type": "memfd-hugetlb",
                                         "uid": 1000}
        d.create_box("vm2")
        small = os.memfd_create("small", os.MFD_CLOEXEC)
        os.ftruncate(small, 8 * MIB)
        small_sha = fill(small, 8 * MIB, 3)
        d.put_fd("vm2", "unclaimed", small)
        record["entries"]["vm2/unclaimed"] = {"size": 8 * MIB, "sha256": small_sha, "seals": 0, "type": "memfd",
                                              "uid": 0}
        d.create_box("scratch")  # open: must not cross
        t0 = time.monotonic()
        d.seal("vm1")
        d.seal("vm2")
        record["seal_seconds"] = time.monotonic() - t0
        log(f"sealed 328 MiB in {record['seal_seconds']:.2f}s")
        # Written after the seal: the pinned pages are the ones that cross, so this lands.
        with mmap.mmap(ram, MIB) as m:
            m[100:120] = b"written-after-seal!!"
        block = bytearray(os.pread(ram, MIB, 0))
        # recompute the hash of the whole ram entry with the late write
        h = hashlib.sha256()
        with mmap.mmap(ram, 256 * MIB, prot=mmap.PROT_READ) as m:
            for off in range(0, 256 * MIB, 16 * MIB):
                h.update(m[off : off + 16 * MIB])
        record["entries"]["vm1/ram"]["sha256"] = h.hexdigest()
        check(bytes(block[100:120]) == b"written-after-seal!!", "late write visible")
        s = km.stats(d)
        check(s["pinned_folios"] == 256 * MIB // 4096 + 32 + 8 * MIB // 4096, f"pinned folios {s['pinned_folios']}")
        # the caller's fds may be closed: the box holds the files
        for fd in (ram, huge, small):
            os.close(fd)
    if corrupt:
        d.create_box("doomed")
        fd = os.memfd_create("doomed", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4 * MIB)
        fill(fd, 4 * MIB, 4)
        d.put_fd("doomed", "mem", fd)
        d.seal("doomed")
        os.close(fd)
    if scenario != "empty":
        # The handover as KHO will pass it on: the root descriptor in debugfs.
        raw = KHO_OUT.read_bytes()
        magic, version, nr_boxes = struct.unpack_from("<QII", raw)
        check(magic == 0x544F4F5258424446, "root descriptor magic FDBXROOT")
        check(nr_boxes == (1 if corrupt else 2), f"root lists {nr_boxes} sealed boxes")
    else:
        check(not KHO_OUT.exists(), "no fdbox subtree when nothing is sealed")
    (OUT / f"{scenario}.json").write_text(json.dumps(record))
    d.close()


def stage2(scenario: str) -> None:
    record = json.loads((OUT / f"{scenario}.json").read_text())
    km.load()
    d = uapi.FdboxDevice()
    v = d.version()
    if not scenario.startswith("corrupt"):
        check(v.restore_status == 0, f"handover accepted (restore_status {v.restore_status})")
    check(bool(v.features & uapi.FDBOX_FEATURE_KHO_BOOT), "booted by a KHO kexec")
    boxes = {b.name: b for b in d.list_boxes()}
    if scenario.startswith("corrupt"):
        check(v.restore_status == -22, f"handover refused with EINVAL (restore_status {v.restore_status})")
        check(boxes == {}, "no box from a damaged handover")
        check(km.stats(d)["entries"] == 0, "no entries")
        check(KHO_IN.read_bytes()[:8] == b"FDBXUSED", "handover marked consumed")
        d.close()
        km.unload()
        km.load()  # a reload does not look at the handover again
        with uapi.FdboxDevice() as d2:
            v2 = d2.version()
            check(v2.restore_status == 0 and d2.list_boxes() == [], "reload: clean, nothing retried")
        return
    if scenario == "empty":
        check(boxes == {}, "no boxes after a kexec with nothing sealed")
        check(not v.features & uapi.FDBOX_FEATURE_RESTORED, "nothing restored")
        check(km.stats(d)["entries"] == 0, "no entries")
        d.close()
        km.unload()
        km.load()  # a second load in the same boot is clean too
        return
    check(set(boxes) == {"vm1", "vm2"}, f"sealed boxes came back, open ones did not: {sorted(boxes)}")
    check(all(b.state == uapi.BoxState.RESTORED for b in boxes.values()), "state restored")
    check(bool(v.features & uapi.FDBOX_FEATURE_RESTORED), "RESTORED feature bit")
    s = km.stats(d)
    check((s["entries"], s["restored_pending"], s["file_refs"]) == (3, 3, 0), f"3 pending entries: {s}")

    got: dict[str, dict[str, object]] = {}
    timing = {}
    for box in ("vm1",):
        for e in d.list_entries(box):
            check(bool(e.flags & uapi.FDBOX_ENTRY_RESTORE_PENDING), f"{box}/{e.name} pending")
            try:
                d.get_fd(box, e.name)
                raise AssertionError("GET_FD on a pending entry succeeded")
            except uapi.FdboxOSError as err:
                check(err.errno == 61, f"GET_FD before RESTORE_FD is ENODATA ({err})")
            flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            if e.type == uapi.EntryType.MEMFD_HUGETLB:
                flags |= os.MFD_HUGETLB
            fd = os.memfd_create(e.name, flags)
            os.ftruncate(fd, e.size)
            free_before = meminfo("MemFree")
            t0 = time.monotonic()
            d.restore_fd(box, e.name, fd)
            timing[e.name] = time.monotonic() - t0
            if e.seals:
                fcntl.fcntl(fd, F_ADD_SEALS, e.seals)
            g = d.get_fd(box, e.name)
            check(os.fstat(g).st_ino == os.fstat(fd).st_ino, "GET_FD returns the filled memfd")
            os.close(g)
            got[f"{box}/{e.name}"] = {
                "size": os.fstat(fd).st_size,
                "sha256": sha_of(fd),
                "seals": fcntl.fcntl(fd, F_GET_SEALS) & ~1,
                "type": "memfd-hugetlb" if e.type == uapi.EntryType.MEMFD_HUGETLB else "memfd",
                "uid": e.uid,
            }
            log(f"restored {box}/{e.name}: {e.size >> 20} MiB in {timing[e.name]:.2f}s, "
                f"MemFree {free_before >> 20} -> {meminfo('MemFree') >> 20} MiB")
            os.close(fd)
    for name in ("vm1/ram", "vm1/huge"):
        check(got[name] == record["entries"][name], f"{name} identical: size, seals, type, owner, SHA-256")

    # vm2 is never claimed: FINISH frees its preserved memory and drops the entry
    free_before = meminfo("MemFree")
    d.finish("vm2")
    freed = meminfo("MemFree") - free_before
    check(freed >= 7 * MIB, f"FINISH freed the unclaimed 8 MiB ({freed >> 20} MiB)")
    check(d.list_entries("vm2") == [], "unclaimed entry dropped")
    d.finish("vm1")
    check(all(b.state == uapi.BoxState.OPEN for b in d.list_boxes()), "all boxes open after FINISH")
    s = km.stats(d)
    check((s["restored_pending"], s["entries"], s["file_refs"]) == (0, 2, 2), f"counters {s}")
    check(KHO_IN.read_bytes()[:8] == b"FDBXUSED", "handover marked consumed")
    # The restored boxes are ordinary boxes now: they can be sealed again for the next kexec.
    d.seal("vm1")
    d.unseal("vm1")
    for b in ("vm1", "vm2"):
        d.delete_box(b)
    d.close()
    km.unload()
    (OUT / f"{scenario}-stage2.json").write_text(json.dumps({"restore_seconds": timing}))


if __name__ == "__main__":
    {"stage1": stage1, "stage2": stage2}[sys.argv[1]](sys.argv[2])
