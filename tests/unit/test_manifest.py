"""manifest.json: encode/decode round trip, schema checks, atomic replacement."""

from __future__ import annotations

import json
import os

import pytest

from fdboxd.errors import FdboxError
from fdboxd.fdtypes import FdType
from fdboxd.manifest import FILENAME, SCHEMA, Manifest, ManifestData, decode, encode
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
