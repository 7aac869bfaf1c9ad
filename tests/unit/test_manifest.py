"""manifest.json: encode/decode round trip, schema checks, atomic replacement; the journal."""

from __future__ import annotations

import json
import os

import pytest

from fdboxd.errors import FdboxError
from fdboxd.fdtypes import FdType
from fdboxd import manifest as manifest_mod
from fdboxd.manifest import FILENAME, JOURNAL, OLD_JOURNAL, SCHEMA, Manifest, ManifestData, box_op, decode, encode, entry_op
from fdboxd.model import Box, BoxState, Entry


def sample() -> ManifestData:
    b = Box("vm1", BoxState.SEALED, created=1000.0)
    b.entries["ram0"] = Entry("vm1", "ram0", FdType.MEMFD, 4096, 1000, 1000, created=1001.5,
                              metadata={"slot": "0"}, seals=1, sha256="ab" * 32)
    b.entries["ram1"] = Entry("vm1", "ram1", FdType.MEMFD_HUGETLB, 2 << 20, 1000, 1000, created=1002.0,
                              claimed=True, extra={"k": [1, 2]})
    return ManifestData(boxes={"vm1": b, "empty": Box("empty", created=5.0)}, owners={"vm1": 1000, "empty": 0},
                        generation=7)


def test_round_trip():
    data = sample()
    back = decode(encode(data))
    assert back.generation == 7
    assert back.owners == {"vm1": 1000, "empty": 0}
    assert set(back.boxes) == {"vm1", "empty"}
    vm1 = back.boxes["vm1"]
    assert vm1.state == BoxState.SEALED and vm1.created == 1000.0
    assert vm1.entries["ram0"] == data.boxes["vm1"].entries["ram0"]
    assert vm1.entries["ram1"] == data.boxes["vm1"].entries["ram1"]


def test_encoding_is_versioned_and_stable():
    doc = json.loads(encode(sample()))
    assert doc["schema"] == SCHEMA
    assert list(doc["boxes"]) == sorted(doc["boxes"])
    assert doc["boxes"]["vm1"]["uid"] == 1000


@pytest.mark.parametrize(
    "raw",
    [
        b"", b"not json", b"[]", b"{}", b'{"schema": 99, "boxes": {}}', b'{"schema": 0, "boxes": {}}',
        b'{"schema": "1", "boxes": {}}', b'{"schema": 1}', b'{"schema": 1, "boxes": {"b": {"state": "weird", "entries": {}}}}',
        b'{"schema": 1, "boxes": {"b": {"state": "open", "entries": {"x": {"box": "b"}}}}}',
    ],
)
def test_malformed_manifests_are_refused(raw):
    with pytest.raises(FdboxError) as ei:
        decode(raw)
    assert ei.value.name == "InvalidRequest"


def test_entry_filed_under_wrong_key_is_refused():
    doc = json.loads(encode(sample()))
    doc["boxes"]["vm1"]["entries"]["ram9"] = doc["boxes"]["vm1"]["entries"].pop("ram0")
    with pytest.raises(FdboxError):
        decode(json.dumps(doc).encode())


def test_missing_manifest_is_empty(tmp_path):
    data = Manifest(tmp_path / "nothing-yet").load()
    assert data.boxes == {} and data.generation == 0


def test_save_load_and_generation(tmp_path):
    m = Manifest(tmp_path / "state")
    data = sample()
    m.save(data)
    assert data.generation == 8
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / FILENAME).stat().st_mode & 0o777 == 0o600
    back = m.load()
    assert back.generation == 8 and set(back.boxes) == {"vm1", "empty"}
    assert sorted(os.listdir(tmp_path / "state")) == [FILENAME]  # no temp file left


def test_save_replaces_atomically(tmp_path):
    """The new manifest appears by rename: a reader holding the old one keeps it whole."""
    m = Manifest(tmp_path)
    m.save(sample())
    old_fd = os.open(m.path, os.O_RDONLY)
    old_ino = os.fstat(old_fd).st_ino
    try:
        data = sample()
        del data.boxes["empty"]
        m.save(data)
        assert os.stat(m.path).st_ino != old_ino  # a new file was renamed into place
        old = decode(os.pread(old_fd, 1 << 20, 0))
        assert set(old.boxes) == {"vm1", "empty"}  # the old one is intact
        assert set(m.load().boxes) == {"vm1"}
    finally:
        os.close(old_fd)


def test_failed_save_keeps_the_old_manifest(tmp_path):
    m = Manifest(tmp_path)
    m.save(sample())
    before = m.path.read_bytes()
    # A directory where the temp file would go: the write fails before any rename.
    tmp = tmp_path / f".{FILENAME}.{os.getpid()}.tmp"
    tmp.mkdir()
    with pytest.raises(OSError):
        m.save(ManifestData())
    assert m.path.read_bytes() == before


def test_failed_rename_leaves_no_temp_file(tmp_path):
    m = Manifest(tmp_path)
    m.path.mkdir()  # the manifest path is a directory: rename fails
    with pytest.raises(OSError):
        m.save(sample())
    assert sorted(os.listdir(tmp_path)) == [FILENAME]


# ---------------------------------------------------------------- the journal


def _entry(box: str, name: str, **kw) -> Entry:  # type: ignore[no-untyped-def]
    return Entry(box, name, FdType.MEMFD, 4096, 1000, 1000, created=1.0, **kw)


def test_journal_replays_over_the_snapshot(tmp_path):
    m = Manifest(tmp_path)
    m.save(sample())
    vm2 = Box("vm2", created=3.0)
    m.append(9, [box_op(vm2, 1000), entry_op(_entry("vm2", "a", metadata={"slot": "1"}))])
    m.append(10, [entry_op(_entry("vm2", "b"))])
    m.append(11, [["rm", "vm2", "a"], ["rm", "vm1", "ram1"]])
    m.append(12, [["rmbox", "empty"]])
    m.close()
    back = Manifest(tmp_path).load()
    assert back.generation == 12
    assert set(back.boxes) == {"vm1", "vm2"}
    assert set(back.boxes["vm2"].entries) == {"b"} and back.owners["vm2"] == 1000
    assert set(back.boxes["vm1"].entries) == {"ram0"}
    assert json.loads((tmp_path / FILENAME).read_bytes())["generation"] == 8  # the snapshot is untouched


def test_save_folds_the_journal_away(tmp_path):
    m = Manifest(tmp_path)
    m.append(1, [box_op(Box("vm", created=1.0), 0), entry_op(_entry("vm", "a"))])
    data = m.load()
    m.save(data)
    assert sorted(os.listdir(tmp_path)) == [FILENAME]
    assert set(Manifest(tmp_path).load().boxes["vm"].entries) == {"a"}


def test_torn_last_line_is_ignored_not_fatal(tmp_path):
    m = Manifest(tmp_path)
    m.append(1, [box_op(Box("vm", created=1.0), 0), entry_op(_entry("vm", "a"))])
    m.append(2, [entry_op(_entry("vm", "b"))])
    m.close()
    whole = (tmp_path / JOURNAL).read_bytes()
    line = json.dumps({"g": 3, "ops": [["rm", "vm", "a"]]}).encode()
    (tmp_path / JOURNAL).write_bytes(whole + line[: len(line) // 2])  # a write cut short
    back = Manifest(tmp_path).load()
    assert set(back.boxes["vm"].entries) == {"a", "b"} and back.generation == 2
    # and the next append after a torn line starts on a line of its own
    (tmp_path / JOURNAL).write_bytes(whole + b"garbage{\n")
    m2 = Manifest(tmp_path)
    m2.append(4, [["rm", "vm", "b"]])
    m2.close()
    assert set(Manifest(tmp_path).load().boxes["vm"].entries) == {"a"}


def test_replaying_a_journal_twice_is_harmless(tmp_path):
    """A compaction that renamed its snapshot but died before deleting the old journal."""
    m = Manifest(tmp_path)
    m.save(ManifestData())
    ops = [[box_op(Box("vm", created=1.0), 0), entry_op(_entry("vm", "a"))], [["rm", "vm", "a"]],
           [entry_op(_entry("vm", "b"))], [["rmbox", "vm"]], [box_op(Box("vm", created=2.0), 7)],
           [entry_op(_entry("vm", "c"))]]
    for g, o in enumerate(ops, 1):
        m.append(g, o)
    m.close()
    once = m.load()
    os.rename(tmp_path / JOURNAL, tmp_path / OLD_JOURNAL)
    manifest_mod.compact(tmp_path)
    assert not (tmp_path / OLD_JOURNAL).exists()
    for g, o in enumerate(ops, 1):  # the same journal again, over a snapshot that has it
        m.append(g, o)
    m.close()
    twice = Manifest(tmp_path).load()
    assert encode(once).split(b'"written"')[0] == encode(twice).split(b'"written"')[0]
    assert set(twice.boxes["vm"].entries) == {"c"} and twice.owners["vm"] == 7


def test_journal_is_compacted_in_a_child_process(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "COMPACT_MIN", 4096)
    m = Manifest(tmp_path)
    m.save(ManifestData())
    m.append(1, [box_op(Box("vm", created=1.0), 0)])
    for i in range(200):
        m.append(2 + i, [entry_op(_entry("vm", f"e{i}", metadata={"pad": "x" * 64}))])
    m.close()  # waits for the compaction
    assert not (tmp_path / OLD_JOURNAL).exists()
    snap = decode((tmp_path / FILENAME).read_bytes())
    assert len(snap.boxes["vm"].entries) > 20  # the rotated part is in the snapshot now
    assert len(Manifest(tmp_path).load().boxes["vm"].entries) == 200
    journal = (tmp_path / JOURNAL).read_bytes()
    assert b'"e0"' not in journal and b'"e199"' in journal  # the journal holds only what came after


def test_failed_append_leaves_no_half_line(tmp_path):
    m = Manifest(tmp_path)
    m.append(1, [box_op(Box("vm", created=1.0), 0)])
    (tmp_path / FILENAME).mkdir()  # the snapshot could not be replaced: refuse the change
    with pytest.raises(OSError):
        m.append(2, [entry_op(_entry("vm", "a"))])
    (tmp_path / FILENAME).rmdir()
    m.close()
    assert (tmp_path / JOURNAL).read_bytes().count(b"\n") == 1


def test_journal_lines_the_snapshot_already_holds_are_not_replayed(tmp_path):
    """A writer killed between the snapshot's rename and the journal's unlink: the journal
    holds the state before the snapshot (here: the box open, before the seal)."""
    m = Manifest(tmp_path)
    opened = sample()
    opened.boxes["vm1"].state = BoxState.OPEN
    m.append(7, [box_op(opened.boxes["vm1"], 1000)])  # older than the snapshot below
    stale = (tmp_path / JOURNAL).read_bytes()
    m.save(sample())  # generation 8, vm1 sealed; the journal is removed...
    (tmp_path / JOURNAL).write_bytes(stale)  # ...or would have been
    m.append(9, [["rmbox", "empty"]])  # a change after the snapshot still counts
    m.close()
    back = Manifest(tmp_path).load()
    assert back.boxes["vm1"].state == BoxState.SEALED
    assert "empty" not in back.boxes and back.generation == 9


def test_a_compaction_skips_what_the_snapshot_holds(tmp_path):
    m = Manifest(tmp_path)
    m.save(sample())  # generation 8
    (tmp_path / OLD_JOURNAL).write_bytes(b'{"g":5,"ops":[["rmbox","vm1"]]}\n{"g":9,"ops":[["rmbox","empty"]]}\n')
    manifest_mod.compact(tmp_path)
    back = Manifest(tmp_path).load()
    assert set(back.boxes) == {"vm1"}
