"""The manifest: ``<state-dir>/manifest.json``, the record of names, owners and types.

The backend holds the files; the manifest holds what only the daemon knows about them
(owner, creation time, user metadata, checksums) so that a restarted daemon — or the
daemon in the next kernel — can hand each file back to the right caller.

Format (``schema`` is bumped on any incompatible change; readers refuse newer ones)::

    {
      "schema": 1,
      "generation": 42,                 # bumped on every write
      "written": 1764250000.0,
      "boxes": {
        "vm1": {"state": "open", "created": 1764250000.0, "uid": 1000,
                "entries": {"ram0": {<Entry.to_dict()>}, ...}},
        ...
      }
    }

Writes are atomic: a temp file in the same directory, ``fsync``, ``rename``, then
``fsync`` of the directory, so a crash leaves either the old or the new manifest.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FdboxError
from .model import Box, BoxState, Entry

SCHEMA = 1
FILENAME = "manifest.json"


@dataclass
class ManifestData:
    boxes: dict[str, Box] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)  # box -> uid of its creator
    generation: int = 0


def encode(data: ManifestData) -> bytes:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "generation": data.generation,
        "written": time.time(),
        "boxes": {
            name: {
                "state": str(box.state),
                "created": box.created,
                "uid": data.owners.get(name, 0),
                "entries": {e.name: e.to_dict() for e in box.entries.values()},
            }
            for name, box in sorted(data.boxes.items())
        },
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def decode(raw: bytes) -> ManifestData:
    """Parse a manifest; anything malformed is an ``InvalidRequest`` naming the problem."""
    try:
        doc = json.loads(raw)
        schema = doc["schema"]
        if not isinstance(schema, int) or schema > SCHEMA or schema < 1:
            raise FdboxError("InvalidRequest", f"manifest schema {schema!r} not supported (max {SCHEMA})")
        data = ManifestData(generation=int(doc.get("generation", 0)))
        for name, b in doc["boxes"].items():
            box = Box(name=name, state=BoxState(b["state"]), created=float(b.get("created", 0)))
            for ename, e in b["entries"].items():
                entry = Entry.from_dict(e)
                if entry.box != name or entry.name != ename:
                    raise ValueError(f"entry {ename!r} filed under the wrong key")
                box.entries[ename] = entry
            data.boxes[name] = box
            data.owners[name] = int(b.get("uid", 0))
        return data
    except FdboxError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FdboxError("InvalidRequest", f"malformed manifest: {e}") from e


class Manifest:
    """The manifest file in a state directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / FILENAME

    def load(self) -> ManifestData:
        """The saved manifest, or an empty one if there is none yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return ManifestData()
        return decode(raw)

    def save(self, data: ManifestData) -> None:
        data.generation += 1
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.dir / f".{FILENAME}.{os.getpid()}.tmp"
        raw = encode(data)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not also keep a stray temp file
            raise
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
