"""The manifest: ``<state-dir>/manifest.json``, the record of names, owners and types.

The backend holds the files; the manifest holds what only the daemon knows about them
(owner, creation time, user metadata, checksums) so that a restarted daemon — or the
daemon in the next kernel — can hand each file back to the right caller.

Format (``schema`` is bumped on any incompatible change; readers refuse newer ones)::

    {
      "schema": 2,
      "generation": 42,                 # bumped on every write
      "written": 1764250000.0,
      "boxes": {
        "vm1": {"state": "open", "created": 1764250000.0, "uid": 1000,
                "entries": {"ram0": {<Entry.to_dict()>}, ...},
                "timeline": {"seal_begin": 1764250001.0, ...}},    # optional, fdboxd.timeline
        ...
      },
      "lost": [{"box": "vm1", "name": "ram1", "type": "memfd", "uid": 1000,   # schema 2
                "size": 4096, "reason": "...", "time": 1764250000.0}, ...]
    }

The box op of the journal carries the same ``timeline`` as an optional sixth element
(``["box", "vm1", "sealed", 1764250000.0, 1000, {"seal_begin": ...}]``); both are
absent while a box has none, so a manifest without live updates reads as before.

Schema 2 added ``lost``: entries that did not survive, kept until their owner
acknowledges them (``AcknowledgeLost``). A schema-1 reader would silently forget them,
so it refuses a schema-2 manifest; a schema-1 manifest reads as one with no losses.

Persistence: a snapshot plus an append-only journal
--------------------------------------------------

``manifest.json`` is the **snapshot**: what an operator reads, written whole and atomically
(temp file in the same directory, ``fsync``, ``rename``, ``fsync`` of the directory).
Every change after it is one line appended to ``manifest.journal`` with a single
``write()``, *before* the change is reported done and **without fsync**::

    {"g": 43, "ops": [["box", "vm1", "open", 1764250000.0, 1000], ["entry", {<Entry.to_dict()>}]]}
    {"g": 44, "ops": [["rm", "vm1", "ram0"]]}

Why no fsync: the fds this records live in the daemon, the kernel box or systemd's fd
store, and none of those outlive a host crash either (only a kexec, and across a kexec
the manifest travels inside the sealed set). A ``write()`` that returned is in the page
cache: it survives the daemon being killed (``SIGKILL``, a crash, an OOM kill); only a
power loss or kernel crash loses it, and that loses the guest memory it describes too.
So a change costs one small ``write()`` whatever the number of entries.

Each op is an *absolute* assignment of one key (a box's header, one entry, the absence
of one entry or box), so replaying a journal twice gives the same result. A line is
applied whole or not at all; a torn last line (a write cut short by a full disk or a
crash mid-write) is ignored.

Generations: every line carries ``g``, the store's generation after that change, and
every snapshot the ``generation`` it was written at, newer than every line it holds
(:meth:`Manifest.save` bumps it; a compaction's is its last line's). A journal line is
replayed only if it is newer than the snapshot: a journal that outlived its snapshot's
rename (the writer killed before the unlink) holds only older lines, which would
otherwise put back the state before a seal over the sealed snapshot.

When the journal outgrows twice the snapshot, :meth:`Manifest.append` renames it to
``manifest.journal.old`` (O(1)) and starts a child process (``python -m
fdboxd.manifest compact DIR``) that folds snapshot + old journal into a new snapshot and
deletes the old journal: the encoding, the fsyncs and the GIL are never the daemon's.
The child and :meth:`Manifest.save` hold an ``flock`` on the state directory, so an
orphaned compaction can never rename an older snapshot over a newer one. At start-up
the daemon loads snapshot + ``.old`` + journal and writes one fresh snapshot.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import failpoints, timeline
from .errors import FdboxError
from .model import Box, BoxState, Entry, compact_json

log = logging.getLogger("fdboxd.manifest")

SCHEMA = 2
FILENAME = "manifest.json"
JOURNAL = "manifest.journal"
OLD_JOURNAL = JOURNAL + ".old"
#: Compact once the journal is this much larger than the snapshot (and at least MIN).
COMPACT_RATIO = 2
COMPACT_MIN = 1 << 20

#: One journal op: ``["box", name, state, created, uid]``, ``["entry", Entry.to_dict()]``,
#: ``["rm", box, name]``, ``["rmbox", name]`` or ``["lost", [record, ...]]`` (the whole list).
Op = list[Any]


@dataclass
class ManifestData:
    boxes: dict[str, Box] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)  # box -> uid of its creator
    generation: int = 0
    #: Unacknowledged lost entries (see fdboxd.store.lost_record).
    lost: list[dict[str, Any]] = field(default_factory=list)


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
                **({"timeline": box.timeline} if box.timeline else {}),
            }
            for name, box in sorted(data.boxes.items())
        },
        "lost": data.lost,
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
            box = Box(name=name, state=BoxState(b["state"]), created=float(b.get("created", 0)),
                      timeline=timeline.decode(b.get("timeline")))
            for ename, e in b["entries"].items():
                entry = Entry.from_dict(e)
                if entry.box != name or entry.name != ename:
                    raise ValueError(f"entry {ename!r} filed under the wrong key")
                box.entries[ename] = entry
            data.boxes[name] = box
            data.owners[name] = int(b.get("uid", 0))
        data.lost = _lost(doc.get("lost", []))
        return data
    except FdboxError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FdboxError("InvalidRequest", f"malformed manifest: {e}") from e


def _lost(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(r, dict) and isinstance(r.get("box"), str)
                                              and isinstance(r.get("name"), str) for r in value):
        raise ValueError("'lost' must be a list of {box, name, ...}")
    return [dict(r) for r in value]


def lost_record(entry: Entry, reason: str) -> dict[str, Any]:
    """What is kept about a lost entry, until its owner acknowledges it."""
    return {"box": entry.box, "name": entry.name, "type": str(entry.type), "uid": entry.uid,
            "size": entry.size, "reason": reason, "time": time.time()}


def lost_op(lost: list[dict[str, Any]]) -> Op:
    return ["lost", list(lost)]


def box_op(box: Box, uid: int) -> Op:
    op: Op = ["box", box.name, str(box.state), box.created, uid]
    return op + [box.timeline] if box.timeline else op


class EncodedJSON(str):
    """A value already in its JSON form (an entry's cached :meth:`~fdboxd.model.Entry.wire`):
    :func:`journal_line` splices it in instead of building and encoding the dict again."""


def entry_op(entry: Entry) -> Op:
    return ["entry", EncodedJSON(entry.wire())]


def journal_line(generation: int, ops: list[Op]) -> bytes:
    """One journal record, the JSON of ``{"g": generation, "ops": ops}`` and a newline."""
    parts = [f'["{op[0]}",{op[1]}]' if len(op) == 2 and isinstance(op[1], EncodedJSON)
             else compact_json(op) for op in ops]
    return f'{{"g":{int(generation)},"ops":[{",".join(parts)}]}}\n'.encode()


def apply(data: ManifestData, ops: list[Op]) -> None:
    """Apply journal ops to ``data`` (the one reader of the op format)."""
    for op in ops:
        kind = op[0]
        if kind == "box":
            _, name, state, created, uid, *rest = op  # rest: the timeline, since issue 18 (optional)
            box = data.boxes.get(name)
            if box is None:
                box = data.boxes[name] = Box(name=name)
            box.state, box.created = BoxState(state), float(created)
            box.timeline = timeline.decode(rest[0]) if rest else {}
            data.owners[name] = int(uid)
        elif kind == "entry":
            entry = Entry.from_dict(op[1])
            box = data.boxes.get(entry.box)
            if box is None:  # cannot happen from the store (a box op comes first); be lenient
                box = data.boxes[entry.box] = Box(name=entry.box)
                data.owners.setdefault(entry.box, entry.uid)
            box.entries[entry.name] = entry
        elif kind == "rm":
            box = data.boxes.get(op[1])
            if box is not None:
                box.entries.pop(op[2], None)
        elif kind == "rmbox":
            data.boxes.pop(op[1], None)
            data.owners.pop(op[1], None)
        elif kind == "lost":
            data.lost = _lost(op[1])
        else:
            raise ValueError(f"unknown journal op {kind!r}")


def replay(data: ManifestData, raw: bytes, source: str = JOURNAL, after: int | None = None) -> None:
    """Apply every whole line of a journal; a torn or unreadable line is skipped, logged.

    ``after``: the generation of the snapshot ``data`` was read from. A line of that
    generation or an older one is already in the snapshot and is skipped: a journal
    outlives its snapshot's rename when the writer dies before unlinking it, and its
    lines would otherwise replay the state before a seal over the sealed snapshot.
    """
    lines = raw.split(b"\n")
    if lines[-1]:
        log.warning("%s: ignoring a torn last line (%d bytes): a write cut short", source, len(lines[-1]))
    stale = 0
    for n, line in enumerate(lines[:-1], 1):
        if not line:
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("ops"), list):
                raise ValueError("not a journal record")
            g = int(rec.get("g", 0))
            if after is not None and g <= after:
                stale += 1
                continue
            apply(data, rec["ops"])
            data.generation = max(data.generation, g)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("%s line %d unreadable, skipped: %s", source, n, e)
    if stale:
        log.warning("%s: skipped %d lines the snapshot (generation %s) already holds: the last writer "
                    "stopped between the snapshot's rename and the journal's removal", source, stale, after)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class Manifest:
    """The snapshot and journal in a state directory (see the module docstring)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / FILENAME
        self.journal_path = self.dir / JOURNAL
        self.old_journal_path = self.dir / OLD_JOURNAL
        self._fd = -1  # the journal, O_APPEND, opened on the first append
        self._journal_size = 0
        self._snapshot_size = 0
        self._compactor: subprocess.Popen[bytes] | None = None

    def load(self) -> ManifestData:
        """Snapshot, then the old journal (a compaction that did not finish), then the journal."""
        if not self.dir.is_dir():
            return ManifestData()
        with _DirLock(self.dir):  # not while an orphaned compaction swaps the files
            self._remove_stale_temp_files()
            raw = _read(self.path)
            data = decode(raw) if raw is not None else ManifestData()
            self._snapshot_size = len(raw or b"")
            snapshot = data.generation if raw is not None else None
            for path in (self.old_journal_path, self.journal_path):
                j = _read(path)
                if j:
                    replay(data, j, path.name, after=snapshot)
        return data

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writers killed mid-write. Every writer holds the directory lock
        while its temp file exists, and we hold it now: any found is stale."""
        for tmp in self.dir.glob(f".{FILENAME}.*.tmp"):
            try:
                tmp.unlink()
                log.info("removed a stale temp file %s", tmp.name)
            except OSError as e:
                log.warning("cannot remove stale %s: %s", tmp, e.strerror)

    def save(self, data: ManifestData) -> None:
        """Write a whole snapshot (start-up, tests) and drop the journals it contains."""
        data.generation += 1
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._reap(wait=True)
        with _DirLock(self.dir):
            raw = encode(data)
            write_snapshot(self.dir, raw, f".{FILENAME}.{os.getpid()}.tmp")
            failpoints.hit("manifest.after_snapshot_rename")
            self._close_journal()
            for path in (self.journal_path, self.old_journal_path):
                path.unlink(missing_ok=True)
        self._snapshot_size = len(raw)

    def append(self, generation: int, ops: list[Op]) -> None:
        """Record one change: one line, one ``write()``, no fsync. Raises OSError.

        A write that fails or is cut short is truncated away, so the journal never keeps
        half a change in front of the next one.
        """
        line = journal_line(generation, ops)
        # The snapshot must stay replaceable: a journal that could never be compacted,
        # over a snapshot that could not be read at start-up, would be accepting changes
        # the next daemon cannot load. One fstatat; the same answer a full write gave.
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                raise OSError(errno.EISDIR, f"{self.path} is not a regular file")
        except FileNotFoundError:
            pass
        if self._fd < 0:
            self._open_journal()
        try:
            failpoints.hit("manifest.journal_append")
            n = os.write(self._fd, line)
            if n != len(line):
                raise OSError(errno.ENOSPC, "short write to the journal")
        except OSError:
            try:
                os.ftruncate(self._fd, self._journal_size)
            except OSError:
                self._close_journal()  # reopened (and re-measured) on the next append
            raise
        self._journal_size += n
        if self._journal_size > max(COMPACT_RATIO * self._snapshot_size, COMPACT_MIN):
            self._start_compaction()

    def open(self) -> None:
        """Open the journal now (the daemon does at start-up: its fd count stays flat)."""
        if self._fd < 0:
            self._open_journal()

    def close(self) -> None:
        self._close_journal()
        self._reap(wait=True)

    # ---------------------------------------------------------------- internals

    def _open_journal(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._journal_size = os.fstat(self._fd).st_size

    def _close_journal(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _start_compaction(self) -> None:
        """Rotate the journal (a rename) and fold it into the snapshot in a child process."""
        self._reap(wait=False)
        if self._compactor is not None or self.old_journal_path.exists():
            if self._compactor is None:  # a previous compaction failed: retry it
                self._spawn_compactor()
            return
        try:
            os.rename(self.journal_path, self.old_journal_path)
        except OSError as e:
            log.warning("cannot rotate the journal: %s", e)
            return
        self._close_journal()
        # The new snapshot will hold snapshot + this journal; estimate its size so the
        # next rotation waits for a journal twice as big as that.
        self._snapshot_size = max(self._snapshot_size, self._journal_size // 2)
        self._journal_size = 0
        self._spawn_compactor()

    def _spawn_compactor(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
            str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))}
        try:
            self._compactor = subprocess.Popen(
                [sys.executable, "-m", "fdboxd.manifest", "compact", str(self.dir)],
                stdin=subprocess.DEVNULL, env=env, close_fds=True,
            )
        except OSError as e:
            log.warning("cannot start the manifest compaction: %s", e)

    def _reap(self, wait: bool) -> None:
        proc = self._compactor
        if proc is None:
            return
        rc = proc.wait() if wait else proc.poll()
        if rc is None:
            return
        self._compactor = None
        if rc != 0:
            log.warning("manifest compaction exited with %d; the journal is kept and retried", rc)
        else:
            try:
                self._snapshot_size = self.path.stat().st_size
            except OSError:
                pass


class _DirLock:
    """``flock`` on the state directory: one snapshot writer at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _DirLock:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def write_snapshot(directory: Path, raw: bytes, tmp_name: str) -> None:
    """Atomically replace ``manifest.json``: temp file, fsync, rename, fsync the directory."""
    tmp = directory / tmp_name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, directory / FILENAME)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep a stray temp file
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def compact(state_dir: str | os.PathLike[str]) -> None:
    """Fold ``manifest.journal.old`` into ``manifest.json`` (run in a child by the daemon)."""
    d = Path(state_dir)
    with _DirLock(d):
        old = d / OLD_JOURNAL
        j = _read(old)
        if j is None:
            return  # done already (by a save at start-up)
        raw = _read(d / FILENAME)
        data = decode(raw) if raw is not None else ManifestData()
        replay(data, j, OLD_JOURNAL, after=data.generation if raw is not None else None)
        write_snapshot(d, encode(data), f".{FILENAME}.{os.getpid()}.compact.tmp")
        failpoints.hit("manifest.compact_after_rename")
        old.unlink()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "compact":
        sys.exit("usage: python3 -m fdboxd.manifest compact STATE_DIR")
    logging.basicConfig(level=logging.WARNING, format="fdboxd.manifest: %(message)s")
    compact(sys.argv[2])
