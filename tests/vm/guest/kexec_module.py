"""The two stages of the module-level live-update test (run in the VM by
tests/vm/test_kexec_module.py): memory sealed into fdbox.ko crosses a real kexec.

``stage1 SCENARIO``: load fdbox.ko, build the boxes the scenario wants, seal, write
what was stored (sizes, seals, SHA-256) to ``/out/<scenario>.json``. The stage script
then runs ``vm-kexec``.

``stage2 SCENARIO``: load fdbox.ko in the new kernel and check that it gives back
exactly what ``stage1`` recorded. Any mismatch raises, which fails the stage.

Scenarios:

- ``full``: a 128 MiB hugetlb memfd (with seals) and a 64 MiB one in box ``vm1``, an
  8 MiB one in box ``vm2`` that is never claimed (FINISH must free it), and an open
  box ``scratch`` that must not cross. Hugetlb only: where LUO's memfd handler exists
  (the test kernel) the production module seals no shmem memfd (issue 20, scope); the
  test-build scenarios below load it with ``test_shmem_beside_luo=1`` to keep its shmem
  path (KHO kernels without LUO) tested.
- ``empty``: nothing sealed: the new kernel starts clean.
- ``corrupt-box`` / ``corrupt-root``: stage 1 loads the module with
  ``test_corrupt_handover=1``/``2`` so the box descriptors / the root's version it hands
  over are damaged; the new kernel's module must refuse the whole handover (no box, the
  errno in ``restore_status``, no kernel warning). A damaged box is claimed with its
  root and a reload does not try again; a root of another version is left untouched
  (issue 27, H1), and a reload leaves it untouched again.
- ``other-version`` (issue 27, H1): stage 1 seals with a build of another
  ``FDBOX_KHO_VERSION`` (``$FDBOX_VM_OTHER_MODULE``); stage 2's module leaves the
  handover untouched (``EPROTONOSUPPORT``, the root not claimed, twice), then the build
  of that version restores it byte for byte.
- ``shmem-thp`` (issue 27, M1): booted with ``transparent_hugepage_shmem=always``, a
  3 MiB shmem memfd is two 2 MiB folios, the second running past the end of the file;
  the test build (``test_shmem_beside_luo=1``) seals it and the box restores byte for
  byte.
- ``load-enomem`` (issue 27, M2): stage 2 loads the test build with
  ``test_fail_restore=31``: each allocation of the load path (the box, an entry, a folio
  list copy, the pfn sort buffer, a folio array) fails once with ENOMEM, one per try.
  The box stays pending (``restore_status`` ``ENOMEM``, not listed, the module pinned),
  nothing of it freed; the open and each ``FDBOX_IOC_RESCAN`` retry it, and the fifth
  retry restores it byte for byte.
- ``bad-root-crc`` (issue 27, H1): the root's CRC fails (``test_corrupt_handover=256``);
  stage 2 first loads the test build with ``test_page_info_skew=1`` (KHO's page mark
  read with every order one too high, as after a KHO layout change): the runtime
  self-check refuses (``EPROTO``), nothing read or claimed (L5); then it is left
  untouched (``EINVAL``), then ``fdboxctl release-handover`` gives
  every sealed byte back (MemFree, the per-CPU lists and the huge page pool) and a
  reload finds nothing.
- ``review`` (issue 11, items 3-8): one good box ``vm1`` (a write-sealed memfd, a plain
  one, a hugetlb one); three boxes damaged in three ways by the test build
  (``test_corrupt_handover=28``: a descriptor byte, a folio pfn that KHO never
  preserved, a root pointer to memory that is not preserved), six more behind valid
  CRCs (``bad-nr``, ``bad-dup``, ``bad-idx``; issue 27, L3: ``bad-gap``, a gap before
  the last folio with the size grown to match, ``bad-size``, an empty entry of size
  2^64 - 1, ``bad-xdup``, a folio of the second entry that is a page of the first
  entry's folio list); and box ``slow`` whose
  SEAL is still running (``test_seal_delay_ms``) when ``kexec -e`` starts. Stage 2 starts
  a racer that creates a box named ``vm1`` the moment /dev/fdbox appears, then loads the
  module: every good box is back (``slow`` too: reboot waited for its seal), each
  damaged one is refused alone without a WARN, the racer lost, RESTORE_FD applies the
  preserved seals itself and refuses unfit or foreign targets before copying.

The ``corrupt-*`` and ``review`` scenarios need the test build (``make FDBOX_TEST=1``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
import subprocess
import sys
import threading
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
RAM = 128 * MIB  # the "full" scenario's big entry (hugetlb, as the module's scope is)


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


def free() -> int:
    """Free memory wherever a freed folio can land: the buddy lists (MemFree), the
    per-CPU lists (order-9 folios are cached there and MemFree does not count them:
    the CI failure that read 0 MiB) and the huge page pool."""
    pcp = sum(int(line.split()[1]) for line in Path("/proc/zoneinfo").read_text().splitlines()
              if line.split()[:1] == ["count:"])
    return (meminfo("MemFree") + pcp * mmap.PAGESIZE
            + meminfo("HugePages_Free") // 1024 * meminfo("Hugepagesize"))


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)
    log(f"ok: {what}")


def stage1(scenario: str) -> None:
    if scenario == "review":
        return review_stage1()
    if scenario in UNREAD:
        return unread_stage1(scenario)
    if scenario == "shmem-thp":
        return thp_stage1()
    if scenario == "load-enomem":
        return unread_stage1(scenario)
    corrupt = {"corrupt-box": 1, "corrupt-root": 2}.get(scenario, 0)
    # the corrupt scenarios run the test build, whose hook lets it seal shmem beside LUO
    km.load(params=f"test_corrupt_handover={corrupt} test_shmem_beside_luo=1" if corrupt else "")
    d = uapi.FdboxDevice()
    v = d.version()
    check(bool(v.features & uapi.FDBOX_FEATURE_KHO_ON), "KHO is on in stage 1")
    record: dict[str, object] = {"entries": {}}
    if scenario == "full":
        # hugetlb only: beside LUO's memfd handler the module seals no shmem (issue 20)
        d.create_box("vm1")
        ram = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
        os.ftruncate(ram, RAM)
        sha = fill(ram, RAM, 1)
        fcntl.fcntl(ram, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
        d.put_fd("vm1", "ram", ram, uid=1000, gid=1000)
        record["entries"]["vm1/ram"] = {"size": RAM, "sha256": sha, "seals": F_SEAL_SHRINK | F_SEAL_GROW,
                                        "type": "memfd-hugetlb", "uid": 1000}
        late = mmap.mmap(ram, MIB)  # a sealed hugetlb memfd takes no new writable mapping
        huge = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
        os.ftruncate(huge, 64 * MIB)
        sha = fill(huge, 64 * MIB, 2)
        d.put_fd("vm1", "huge", huge, uid=1000, gid=1000)
        record["entries"]["vm1/huge"] = {"size": 64 * MIB, "sha256": sha, "seals": 0, "type": "memfd-hugetlb",
                                         "uid": 1000}
        d.create_box("vm2")
        small = os.memfd_create("small", os.MFD_CLOEXEC | os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
        os.ftruncate(small, 8 * MIB)
        small_sha = fill(small, 8 * MIB, 3)
        d.put_fd("vm2", "unclaimed", small)
        record["entries"]["vm2/unclaimed"] = {"size": 8 * MIB, "sha256": small_sha, "seals": 0,
                                              "type": "memfd-hugetlb", "uid": 0}
        d.create_box("scratch")  # open: must not cross
        t0 = time.monotonic()
        d.seal("vm1")
        d.seal("vm2")
        record["seal_seconds"] = time.monotonic() - t0
        log(f"sealed {(RAM >> 20) + 72} MiB in {record['seal_seconds']:.2f}s")
        # Written after the seal: the pinned pages are the ones that cross, so this lands.
        late[100:120] = b"written-after-seal!!"
        late.close()
        block = bytearray(os.pread(ram, MIB, 0))
        # recompute the hash of the whole ram entry with the late write
        h = hashlib.sha256()
        with mmap.mmap(ram, RAM, prot=mmap.PROT_READ) as m:
            for off in range(0, RAM, 16 * MIB):
                h.update(m[off : off + 16 * MIB])
        record["entries"]["vm1/ram"]["sha256"] = h.hexdigest()
        check(bytes(block[100:120]) == b"written-after-seal!!", "late write visible")
        s = km.stats(d)
        check(s["pinned_folios"] == (RAM + 64 * MIB + 8 * MIB) // HUGE, f"pinned folios {s['pinned_folios']}")
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
    if scenario == "review":
        return review_stage2()
    if scenario in UNREAD:
        return unread_stage2(scenario)
    if scenario == "shmem-thp":
        return thp_stage2()
    if scenario == "load-enomem":
        return enomem_stage2()
    record = json.loads((OUT / f"{scenario}.json").read_text())
    km.load()
    d = uapi.FdboxDevice()
    v = d.version()
    if not scenario.startswith("corrupt"):
        check(v.restore_status == 0, f"handover accepted (restore_status {v.restore_status})")
    check(bool(v.features & uapi.FDBOX_FEATURE_KHO_BOOT), "booted by a KHO kexec")
    boxes = {b.name: b for b in d.list_boxes()}
    if scenario == "corrupt-root":
        # issue 27, H1: a root of another version is never claimed, so a module of that
        # version can still take it; a reload leaves it untouched again
        for _ in range(2):
            v = d.version()
            check(v.restore_status == -errno.EPROTONOSUPPORT,
                  f"other version: EPROTONOSUPPORT (restore_status {v.restore_status})")
            check(bool(v.features & uapi.FDBOX_FEATURE_HANDOVER_HELD), "handover held")
            check(d.list_boxes() == [] and km.stats(d)["entries"] == 0, "no box, no entry")
            check(KHO_IN.read_bytes()[:8] == b"FDBXROOT", "root untouched")
            d.close()
            km.unload()
            km.load()
            d = uapi.FdboxDevice()
        d.close()
        return
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
            # the module applied the preserved seals itself: no F_ADD_SEALS here
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
    free_before = free()
    d.finish("vm2")
    freed = free() - free_before
    log(f"FINISH freed {freed >> 20} MiB (MemFree {meminfo('MemFree') >> 20} MiB after)")
    check(freed >= 6 * MIB, f"FINISH freed the unclaimed 8 MiB ({freed >> 20} MiB, MemFree and huge pages)")
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


F_SEAL_SEAL, F_SEAL_WRITE = 1, 8
REVIEW_BAD = ("bad-desc", "bad-pfn", "bad-ptr")
#: Issue 20, items 3 and 8: damage behind valid CRCs (test_corrupt_handover 32|64|128): a
#: huge nr_folios with a one-page list, a pfn listed twice, an index whose end wraps 2^64.
REVIEW_BAD_CRC = ("bad-nr", "bad-dup", "bad-idx")
#: Issue 27, L3 (test_corrupt_handover 512|1024|2048), behind valid CRCs: a gap in the
#: folios (the size grown to match), a size of 2^64 - 1 (its page count wraps), a folio
#: of one entry that is a page of another entry's folio list (claimed, then given back).
REVIEW_BAD_L3 = ("bad-gap", "bad-size", "bad-xdup")
MFD_NOEXEC_SEAL = 8
F_SEAL_EXEC = 0x20


def new_memfd(name: str, size: int, flags: int = os.MFD_ALLOW_SEALING) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | flags)
    os.ftruncate(fd, size)
    return fd


def review_stage1() -> None:
    km.load(params="test_corrupt_handover=3836 test_seal_delay_ms=20000 test_shmem_beside_luo=1")
    d = uapi.FdboxDevice()
    record: dict[str, object] = {}
    d.create_box("vm1")
    ram = new_memfd("ram", 16 * MIB)
    record["ram"] = fill(ram, 16 * MIB, 11)
    fcntl.fcntl(ram, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK)
    d.put_fd("vm1", "ram", ram)
    plain = new_memfd("plain", 4 * MIB)
    record["plain"] = fill(plain, 4 * MIB, 12)
    d.put_fd("vm1", "plain", plain)
    huge = new_memfd("huge", 8 * MIB, os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
    record["huge"] = fill(huge, 8 * MIB, 13)
    d.put_fd("vm1", "huge", huge)
    # issue 20, item 6: F_SEAL_EXEC alone (a non-executable memfd) must come back as one
    noexec = new_memfd("noexec", HUGE, os.MFD_HUGETLB | MFD_NOEXEC_SEAL)
    record["noexec"] = fill(noexec, HUGE, 15)
    d.put_fd("vm1", "noexec", noexec)
    d.seal("vm1")
    for i, box in enumerate(REVIEW_BAD + REVIEW_BAD_CRC):
        d.create_box(box)
        if box in REVIEW_BAD_CRC:  # two folios: the damage needs a second one
            fd = new_memfd(box, 2 * HUGE, os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
            fill(fd, 2 * HUGE, 20 + i)
        else:
            fd = new_memfd(box, MIB)
            fill(fd, MIB, 20 + i)
        d.put_fd(box, "mem", fd)
        d.seal(box)
        os.close(fd)
    for i, box in enumerate(REVIEW_BAD_L3):
        d.create_box(box)
        if box == "bad-gap":  # two folios: one for the gap, one after it
            fds = {"mem": new_memfd(box, 2 * HUGE, os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)}
        elif box == "bad-size":  # an empty entry: no folio list for the size to disagree with
            fds = {"empty": new_memfd(box, 0)}
        else:  # two entries of 4 KiB folios: the second names a page of the first's list
            fds = {"a": new_memfd("a", 64 * 1024), "b": new_memfd("b", 64 * 1024)}
        for name, fd in fds.items():
            if os.fstat(fd).st_size:
                fill(fd, os.fstat(fd).st_size, 30 + i)
            d.put_fd(box, name, fd)
        d.seal(box)
        for fd in fds.values():
            os.close(fd)
    for fd in (ram, plain, huge, noexec):
        os.close(fd)
    # "slow": SEAL sleeps 20 s between preserving and publishing, in a child that outlives
    # this script; vm-kexec's `kexec -e` comes while it sleeps.
    slow = new_memfd("slow", 4 * MIB)
    record["slow"] = fill(slow, 4 * MIB, 14)
    d.create_box("slow")
    d.put_fd("slow", "mem", slow)
    (OUT / "review.json").write_text(json.dumps(record))
    if os.fork() == 0:
        try:
            d.seal("slow")
            log("slow: sealed")
        finally:
            os._exit(0)
    t0 = time.monotonic()
    while "test: slow preserved" not in subprocess_out(["dmesg"]):
        check(time.monotonic() - t0 < 30, "slow box's SEAL started")
        time.sleep(0.1)
    log("slow box is in SEAL; kexec now")


def subprocess_out(cmd: list[str]) -> str:
    import subprocess

    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def expect_errno(err: int, fn, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except uapi.FdboxOSError as e:
        check(e.errno == err, f"{fn.__name__}: {errno.errorcode.get(e.errno)} (want {errno.errorcode[err]})")
        return
    raise AssertionError(f"{fn.__name__} succeeded, want {errno.errorcode[err]}")


def race_for_vm1(result: dict[str, object], stop: threading.Event) -> None:
    """Create box vm1 the moment /dev/fdbox appears (item 8: it must already be restored)."""
    while not stop.is_set():
        try:
            dev = uapi.FdboxDevice()
        except OSError:
            continue
        with dev:
            try:
                dev.create_box("vm1")
                result["outcome"] = "created"
            except uapi.FdboxOSError as e:
                result["outcome"] = errno.errorcode.get(e.errno, str(e.errno))
        return


def review_stage2() -> None:
    record = json.loads((OUT / "review.json").read_text())
    result: dict[str, object] = {}
    stop = threading.Event()
    racer = threading.Thread(target=race_for_vm1, args=(result, stop))
    racer.start()
    km.load()
    racer.join(timeout=30)
    stop.set()
    check(result.get("outcome") == "EEXIST", f"a box created as soon as the device appeared lost: {result}")
    d = uapi.FdboxDevice()
    v = d.version()
    boxes = {b.name: b for b in d.list_boxes()}
    check(set(boxes) == {"vm1", "slow"}, f"good boxes restored, damaged ones refused: {sorted(boxes)}")
    check(v.restore_status == -errno.EINVAL, f"restore_status EINVAL ({v.restore_status})")
    dmesg = subprocess_out(["dmesg"])
    check("restored 2 box(es) from the previous kernel, refused 9" in dmesg, "dmesg counts restored and refused")
    # bad-size fails the descriptor check (its name is not trusted then: refused by number)
    for box in ("bad-pfn", *REVIEW_BAD_CRC, "bad-gap", "bad-xdup"):
        check(any(f"box {box}:" in ln and "refused" in ln for ln in dmesg.splitlines()), f"{box} refused by name")
    check(dmesg.count("refused") >= 9, "every refused box reported")

    entries = {e.name: e for e in d.list_entries("vm1")}
    # item 4: unfit targets are refused before anything is copied
    fd = new_memfd("plain", entries["plain"].size)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    expect_errno(errno.EMEDIUMTYPE, d.restore_fd, "vm1", "plain", ro)
    os.close(ro)
    ws = new_memfd("ws", entries["plain"].size)
    fcntl.fcntl(ws, F_ADD_SEALS, F_SEAL_WRITE)
    expect_errno(errno.EMEDIUMTYPE, d.restore_fd, "vm1", "plain", ws)
    os.close(ws)
    d.create_box("other")
    d.put_fd("other", "taken", fd)
    expect_errno(errno.EEXIST, d.restore_fd, "vm1", "plain", fd)
    check(os.fstat(fd).st_blocks == 0, "nothing copied into a file another box holds")
    d.delete_box("other")
    d.restore_fd("vm1", "plain", fd)
    check(sha_of(fd) == record["plain"], "plain restored")
    os.close(fd)

    # item 3: the module applies the preserved seals; F_SEAL_WRITE waits for no writable mapping
    ram = new_memfd("ram", entries["ram"].size)
    m = mmap.mmap(ram, MIB)
    expect_errno(errno.EMEDIUMTYPE, d.restore_fd, "vm1", "ram", ram)
    m.close()
    check(bool(d.list_entries("vm1")[0].flags & uapi.FDBOX_ENTRY_RESTORE_PENDING), "ram still pending: retry")
    os.ftruncate(ram, 0)
    os.ftruncate(ram, entries["ram"].size)
    d.restore_fd("vm1", "ram", ram)
    seals = fcntl.fcntl(ram, F_GET_SEALS)
    check(seals == F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK, f"preserved seals applied by RESTORE_FD ({seals})")
    try:
        os.pwrite(ram, b"x", 0)
        raise AssertionError("write to a restored write-sealed memfd succeeded")
    except PermissionError:
        log("ok: restored write seal holds")
    check(sha_of(ram) == record["ram"], "ram restored")
    os.close(ram)

    huge = new_memfd("huge", entries["huge"].size, os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
    d.restore_fd("vm1", "huge", huge)
    check(fcntl.fcntl(huge, F_GET_SEALS) == 0, "hugetlb: SEAL's own seals did not cross")
    check(sha_of(huge) == record["huge"], "huge restored")
    os.close(huge)

    # issue 20, item 6: F_SEAL_EXEC alone is restored only into a non-executable target
    # (memfd_add_seals' W^X rule would add the write seals to an executable one)
    e = next(e for e in d.list_entries("vm1") if e.name == "noexec")
    check(e.seals == F_SEAL_EXEC, f"noexec: F_SEAL_EXEC preserved ({e.seals})")
    ex = new_memfd("noexec", e.size, os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
    expect_errno(errno.EMEDIUMTYPE, d.restore_fd, "vm1", "noexec", ex)
    check(os.fstat(ex).st_blocks == 0, "nothing copied into an unfit target")
    os.close(ex)
    fd = new_memfd("noexec", e.size, os.MFD_HUGETLB | MFD_NOEXEC_SEAL)
    d.restore_fd("vm1", "noexec", fd)
    check(fcntl.fcntl(fd, F_GET_SEALS) == F_SEAL_EXEC, "noexec: seals restored")
    check(sha_of(fd) == record["noexec"], "noexec restored")
    os.close(fd)

    # item 5: the reboot notifier waited for the slow SEAL, so the box crossed whole
    [e] = d.list_entries("slow")
    fd = new_memfd("slow", e.size)
    d.restore_fd("slow", "mem", fd)
    check(sha_of(fd) == record["slow"], "slow box (sealed while kexec began) restored")
    os.close(fd)

    for b in ("vm1", "slow"):
        d.finish(b)
        d.delete_box(b)
    s = km.stats(d)
    check(all(s[k] == 0 for k in ("boxes", "entries", "file_refs", "restored_pending")), f"nothing held: {s}")
    d.close()
    km.unload()
    km.load()  # item 6: a second load reads the consumed root safely and takes nothing
    with uapi.FdboxDevice() as d2:
        v2 = d2.version()
        check(v2.restore_status == 0 and d2.list_boxes() == [], "reload: clean")
    km.unload()


UNREAD = ("other-version", "bad-root-crc")
UNREAD_SIZES = {"shm": 16 * MIB, "huge": 16 * MIB}


def other_module() -> str:
    path = os.environ.get("FDBOX_VM_OTHER_MODULE")
    if not path:
        raise RuntimeError("FDBOX_VM_OTHER_MODULE is not set: run through tests/vm/test_kexec_module.py")
    return path


def unread_stage1(scenario: str) -> None:
    """Seal box vm1 (a shmem and a hugetlb memfd) with a handover stage 2's module cannot read."""
    params = "test_shmem_beside_luo=1" + (" test_corrupt_handover=256" if scenario == "bad-root-crc" else "")
    km.load(other_module() if scenario == "other-version" else None, params)
    record: dict[str, str] = {}
    with uapi.FdboxDevice() as d:
        d.create_box("vm1")
        for i, (name, size) in enumerate(UNREAD_SIZES.items()):
            flags = os.MFD_ALLOW_SEALING | (os.MFD_HUGETLB if name == "huge" else 0)
            fd = new_memfd(name, size, flags)
            record[name] = fill(fd, size, 30 + i)
            d.put_fd("vm1", name, fd)
            os.close(fd)
        d.seal("vm1")
    check(KHO_OUT.parent.joinpath("fdbox-release").exists(), "release list published beside the root")
    (OUT / f"{scenario}.json").write_text(json.dumps(record))


def unread_stage2(scenario: str) -> None:
    record = json.loads((OUT / f"{scenario}.json").read_text())
    want = -errno.EPROTONOSUPPORT if scenario == "other-version" else -errno.EINVAL
    if scenario == "bad-root-crc":
        # issue 27, L5: a KHO whose page mark reads otherwise (test_page_info_skew: every
        # order one too high) is caught by the runtime self-check: nothing read or claimed
        km.load(params="test_page_info_skew=1")
        with uapi.FdboxDevice() as d:
            v = d.version()
            check(v.restore_status == -errno.EPROTO, f"skewed page mark: restore_status {v.restore_status}")
            check(not v.features & uapi.FDBOX_FEATURE_HANDOVER_HELD, "skewed page mark: nothing held")
            check(d.list_boxes() == [], "skewed page mark: no box")
        check(KHO_IN.read_bytes()[:8] == b"FDBXROOT", "skewed page mark: root not claimed")
        check("does not read as this module's copy of union kho_page_info" in subprocess_out(["dmesg"]),
              "skewed page mark: logged")
        km.unload()
    for _ in range(2):  # a reload leaves it untouched too
        km.load()
        with uapi.FdboxDevice() as d:
            v = d.version()
            check(v.restore_status == want, f"refused: restore_status {v.restore_status} (want {want})")
            check(bool(v.features & uapi.FDBOX_FEATURE_HANDOVER_HELD), "handover held")
            check(d.list_boxes() == [] and km.stats(d)["entries"] == 0, "no box, no entry")
        check(KHO_IN.read_bytes()[:8] == b"FDBXROOT", "root not claimed")
        km.unload()
    check("left untouched" in subprocess_out(["dmesg"]), "the kernel log says the handover is left untouched")
    if scenario == "other-version":
        km.load(other_module())  # the build of the handover's version restores it
        with uapi.FdboxDevice() as d:
            v = d.version()
            check(v.restore_status == 0 and not v.features & uapi.FDBOX_FEATURE_HANDOVER_HELD,
                  f"its own version takes it ({v.restore_status})")
            for e in d.list_entries("vm1"):
                flags = os.MFD_ALLOW_SEALING | (os.MFD_HUGETLB if e.type == uapi.EntryType.MEMFD_HUGETLB else 0)
                fd = new_memfd(e.name, e.size, flags)
                d.restore_fd("vm1", e.name, fd)
                check(sha_of(fd) == record[e.name], f"vm1/{e.name} restored byte for byte")
                os.close(fd)
            d.finish("vm1")
            d.delete_box("vm1")
        check(KHO_IN.read_bytes()[:8] == b"FDBXUSED", "handover consumed")
        km.unload()
        return
    km.load()
    before = free()
    p = subprocess.run([sys.executable, "-m", "fdboxd.ctl", "release-handover", "--json"],
                       capture_output=True, text=True)
    check(p.returncode == 0, f"fdboxctl release-handover: {p.returncode} {p.stdout} {p.stderr}")
    freed = free() - before
    out = json.loads(p.stdout)
    sealed = sum(UNREAD_SIZES.values())
    log(f"release gave back {out['bytes'] >> 20} MiB in {out['folios']} folios; free memory +{freed >> 20} MiB")
    check(out["bytes"] >= sealed, f"release freed all {sealed >> 20} MiB sealed ({out['bytes']} bytes)")
    check(freed >= sealed - 4 * MIB, f"free memory grew by what was sealed ({freed >> 20} MiB)")
    check("released the previous kernel's handover" in subprocess_out(["dmesg"]), "release logged")
    with uapi.FdboxDevice() as d:
        check(not d.version().features & uapi.FDBOX_FEATURE_HANDOVER_HELD, "nothing held any more")
        expect_errno(errno.ENOENT, d.release_handover)
    check(KHO_IN.read_bytes()[:8] == b"FDBXUSED", "root kept, marked consumed")
    km.unload()
    km.load()
    with uapi.FdboxDevice() as d:
        v = d.version()
        check(v.restore_status == 0 and d.list_boxes() == [], "reload after release: clean")
    km.unload()


THP_SIZE = 3 * MIB  # two PMD folios: [0, 2 MiB) and [2 MiB, 4 MiB), the second past EOF


def thp_stage1() -> None:
    km.load(params="test_shmem_beside_luo=1")
    with uapi.FdboxDevice() as d:
        d.create_box("thp")
        fd = new_memfd("thp", THP_SIZE)
        # write(), not a mapping: a fault maps a PMD folio only where the VMA covers all
        # of it, the write path takes the huge=always policy as it is
        data = os.urandom(THP_SIZE)
        for off in range(0, THP_SIZE, MIB):
            os.pwrite(fd, data[off : off + MIB], off)
        sha = hashlib.sha256(data).hexdigest()
        d.put_fd("thp", "mem", fd)
        d.seal("thp")
        pinned = km.stats(d)["pinned_folios"]
        check(pinned == 2, f"3 MiB shmem memfd is 2 huge folios ({pinned} pinned): one runs past EOF")
        os.close(fd)
    (OUT / "shmem-thp.json").write_text(json.dumps({"sha256": sha}))


def thp_stage2() -> None:
    record = json.loads((OUT / "shmem-thp.json").read_text())
    km.load()
    with uapi.FdboxDevice() as d:
        v = d.version()
        check(v.restore_status == 0, f"handover accepted (restore_status {v.restore_status})")
        [e] = d.list_entries("thp")
        fd = new_memfd("thp", e.size)
        d.restore_fd("thp", "mem", fd)
        check(sha_of(fd) == record["sha256"], "thp/mem restored byte for byte")
        os.close(fd)
        d.finish("thp")
        d.delete_box("thp")
    km.unload()


def enomem_stage2() -> None:
    record = json.loads((OUT / "load-enomem.json").read_text())
    km.load(params="test_fail_restore=31")
    before = free()
    d = uapi.FdboxDevice()  # the open retries once too: the second failure
    tries = 2
    while True:
        v = d.version()
        if not v.features & uapi.FDBOX_FEATURE_RESTORE_PENDING:
            break
        check(v.restore_status == -errno.ENOMEM, f"try {tries}: pending, restore_status ENOMEM ({v.restore_status})")
        check(d.list_boxes() == [], f"try {tries}: a pending box is not listed")
        check(free() < before + 8 * MIB, f"try {tries}: nothing of it freed")
        if tries == 2:
            d.close()
            try:
                km.unload()
                raise AssertionError("fdbox.ko unloaded with a box pending")
            except OSError as e:
                check(e.errno in (errno.EBUSY, errno.EAGAIN), f"no unload while a box is pending ({e})")
            d = uapi.FdboxDevice()  # another retry
            tries += 1
            continue
        r = d.rescan()
        tries += 1
        log(f"rescan: {r.restored} restored, {r.pending} pending")
        check(tries <= 7, "restored after one failure per allocation")
    check(tries == 6, f"each of the 5 allocations failed once: restored on try {tries}")
    check(v.restore_status == 0, f"restore_status 0 once restored ({v.restore_status})")
    check(subprocess_out(["dmesg"]).count("test: failing load allocation") == 5, "5 allocations failed")
    for e in d.list_entries("vm1"):
        flags = os.MFD_ALLOW_SEALING | (os.MFD_HUGETLB if e.type == uapi.EntryType.MEMFD_HUGETLB else 0)
        fd = new_memfd(e.name, e.size, flags)
        d.restore_fd("vm1", e.name, fd)
        check(sha_of(fd) == record[e.name], f"vm1/{e.name} restored byte for byte after the retries")
        os.close(fd)
    d.finish("vm1")
    d.delete_box("vm1")
    d.close()
    km.unload()


if __name__ == "__main__":
    {"stage1": stage1, "stage2": stage2}[sys.argv[1]](sys.argv[2])
