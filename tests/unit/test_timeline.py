"""The timeline of a live update (issue 18 §4), on the host: phases recorded by the
store as they happen, carried across a (stand-in) kexec inside the sealed manifest,
reported with durations, and read back from the journal and the snapshot."""

from __future__ import annotations

import os
import time

from fdboxd import timeline
from fdboxd.manifest import Manifest, ManifestData, apply, box_op, decode, encode
from fdboxd.model import Box, BoxState, Caller
from fdboxd.store import Store
from test_store_liveupdate import ALICE, ROOT, KexecBackend, memfd

BOB = Caller(1001, 1001)


def _phases(report: dict) -> list[str]:
    return [p["phase"] for p in report["phases"]]


def test_a_live_update_end_to_end_across_a_stand_in_kexec(tmp_path):
    backend = KexecBackend()
    s = Store(backend, Manifest(tmp_path))
    fd = memfd(b"guest ram" * 100)
    s.put(ALICE, "vm1", "ram0", fd)
    s.put(ALICE, "vm1", "devstate", memfd(b"device state"))
    s.seal(ALICE, "vm1")
    [r] = s.last_live_update(ALICE)
    assert _phases(r) == ["put", "seal_begin", "seal_end"] and not r["complete"]
    assert all(p.get("duration_usec", 0) >= 0 for p in r["phases"])

    # The next kernel: a new store over the stand-in backend, with the state directory lost,
    # so the timeline can only have come in the manifest carried in the sealed set.
    nxt = backend.kexec()
    s2 = Store(nxt, Manifest(tmp_path / "new"))
    boot = time.time() - 1.0
    s2.mark_restored(kernel_up=boot, restore_begin=boot + 0.5)
    s2.mark_restored(kernel_up=boot + 9, restore_begin=boot + 9)  # a daemon restart changes nothing
    entry, got = s2.get(ALICE, "vm1", "ram0")
    os.close(got)
    entry, got = s2.get(ALICE, "vm1", "devstate")  # the last claim: the box is open again
    os.close(got)
    [r] = s2.last_live_update(ALICE)
    assert _phases(r) == ["put", "seal_begin", "seal_end", "kernel_up", "restore_begin", "restore_end",
                          "first_get", "reopened"]
    assert r["complete"] and r["state"] == "open"
    by = {p["phase"]: p for p in r["phases"]}
    assert by["kernel_up"]["time"] == boot and by["restore_begin"]["duration_usec"] == 500_000
    assert r["sealed_to_restored_usec"] > 0 and r["put_to_first_get_usec"] >= r["sealed_to_restored_usec"]

    # ... and it was journalled: a daemon restart in the new kernel reports the same.
    s2.manifest.close()
    s3 = Store(nxt, Manifest(tmp_path / "new"))
    assert s3.last_live_update(ROOT) == [r]

    # A new put starts the next live update.
    s3.put(ALICE, "vm1", "ram1", memfd(b"x"))
    [r] = s3.last_live_update(ALICE)
    assert _phases(r) == ["put"]


def test_unseal_ends_a_live_update_and_others_do_not_see_it(tmp_path):
    s = Store(KexecBackend(), Manifest(tmp_path))
    s.put(ALICE, "vm1", "ram0", memfd(b"a"))
    s.put(BOB, "vm2", "ram0", memfd(b"b"))
    s.seal(ALICE, "vm1")
    s.unseal(ALICE, "vm1")
    [r] = s.last_live_update(ALICE)
    assert _phases(r) == ["put", "seal_begin", "seal_end", "unsealed"] and r["complete"]
    assert [b["box"] for b in s.last_live_update(BOB)] == ["vm2"]
    assert [b["box"] for b in s.last_live_update(ROOT)] == ["vm1", "vm2"]


def test_the_manifest_keeps_the_timeline_and_reads_old_records():
    b = Box("vm1", BoxState.SEALED, timeline={"seal_begin": 1.0, "seal_end": 2.5})
    data = ManifestData(boxes={"vm1": b}, owners={"vm1": 1000})
    assert decode(encode(data)).boxes["vm1"].timeline == b.timeline
    again = ManifestData()
    apply(again, [box_op(b, 1000)])
    assert again.boxes["vm1"].timeline == b.timeline
    old = ManifestData()
    apply(old, [["box", "vm1", "open", 1.0, 1000]])  # a box op written before timelines
    assert old.boxes["vm1"].timeline == {}

    assert len(box_op(Box("vm2"), 0)) == 5  # no timeline, nothing new on disk
    assert timeline.decode({"seal_end": "x", "bogus": 1.0, "put": 3}) == {"put": 3.0}


def test_kernel_and_process_start_times_are_in_the_past():
    now = time.time()
    assert timeline.kernel_boot_time() < timeline.process_start_time() <= now + 0.05
