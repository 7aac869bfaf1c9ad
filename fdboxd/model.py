"""The data model: boxes of named entries, their states, and who is asking.

A **box** is a named group of entries, usually one VM's files. An **entry** is one named
file in a box. Boxes move ``open`` → ``sealed`` (no put/remove; ready for kexec) →
(after kexec) ``restored`` (entries can be taken back) → ``open`` again when every entry
was claimed, on ``Unseal`` or on finish.

These are plain records. The rules live in :mod:`fdboxd.store`; the file references
live in a backend. Both the manifest and every front-end serialise entries through
:meth:`Entry.to_dict`, so a field is named once.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

from .fdtypes import FdType

#: Compact JSON, non-ASCII kept: the same text as ``json.dumps(value, separators=(",", ":"),
#: ensure_ascii=False)``, from one encoder built once (``json.dumps`` with options builds a
#: new ``JSONEncoder`` per call, a fifth of what encoding an entry costs).
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class BoxState(enum.StrEnum):
    OPEN = "open"
    SEALED = "sealed"
    RESTORED = "restored"


@dataclass(frozen=True)
class Caller:
    """Who is asking, as the kernel told us (SO_PEERCRED, the bus), never the message."""

    uid: int
    gid: int
    pid: int = 0

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@dataclass
class Entry:
    box: str
    name: str
    type: FdType
    size: int
    uid: int
    gid: int
    created: float = field(default_factory=time.time)
    metadata: dict[str, str] = field(default_factory=dict)
    seals: int | None = None
    sha256: str | None = None
    #: In a restored box: the owner took it back (the box reopens when all are).
    claimed: bool = False
    #: Type-specific facts worth carrying (a tap's interface record, see fdboxd.net).
    extra: dict[str, Any] = field(default_factory=dict)

    def __setattr__(self, name: str, value: Any) -> None:
        # Any assignment invalidates the cached wire forms. Change ``metadata`` and
        # ``extra`` by assigning a new dict, never in place, or List shows stale data.
        # (Plain dict stores: this runs for every field of every Entry built.)
        d = self.__dict__
        d[name] = value
        d["_wire"] = d["_wire_bytes"] = None

    def wire(self) -> str:
        """:meth:`to_dict` as compact JSON, cached until a field is assigned.

        A List of 10,000 entries is then a join of cached strings instead of 10,000
        dicts built and encoded per request (measured: 2 ms instead of 90 ms).
        """
        w: str | None = self.__dict__.get("_wire")
        if w is None:
            w = compact_json(self.to_dict())
            object.__setattr__(self, "_wire", w)
        return w

    def wire_bytes(self) -> bytes:
        """:meth:`wire` encoded, cached the same way: replies splice it in as it is."""
        b: bytes | None = self.__dict__.get("_wire_bytes")
        if b is None:
            b = self.wire().encode()
            self.__dict__["_wire_bytes"] = b
        return b

    def owned_by(self, caller: Caller) -> bool:
        return caller.is_root or caller.uid == self.uid

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "box": self.box,
            "name": self.name,
            "type": str(self.type),
            "size": self.size,
            "uid": self.uid,
            "gid": self.gid,
            "created": self.created,
            "metadata": dict(self.metadata),
        }
        if self.seals is not None:
            d["seals"] = self.seals
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        if self.claimed:
            d["claimed"] = True
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        return cls(
            box=str(d["box"]),
            name=str(d["name"]),
            type=FdType(d["type"]),
            size=int(d["size"]),
            uid=int(d["uid"]),
            gid=int(d["gid"]),
            created=float(d["created"]),
            metadata={str(k): str(v) for k, v in d.get("metadata", {}).items()},
            seals=d.get("seals"),
            sha256=d.get("sha256"),
            claimed=bool(d.get("claimed", False)),
            extra=dict(d.get("extra", {})),
        )


@dataclass
class Box:
    name: str
    state: BoxState = BoxState.OPEN
    entries: dict[str, Entry] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    #: Phase → wall-clock time of the box's current or last live update (fdboxd.timeline).
    timeline: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": str(self.state),
            "entries": len(self.entries),
            "size": sum(e.size for e in self.entries.values()),
        }


@dataclass(frozen=True)
class Event:
    """A change front-ends may mirror: D-Bus signals, the systemd fdstore, the journal.

    ``fd`` is set on ``entry-added`` only and is borrowed: valid during the callback.
    """

    kind: str  # "entry-added" | "entry-removed" | "state-changed"
    box: str
    entry: Entry | None = None
    state: BoxState | None = None
    fd: int | None = None


@dataclass
class SealItem:
    """One entry's file, frozen for a seal (:func:`fdboxd.lifecycle.seal_begin`): the
    plan owns ``fd`` (and ``copy``) until commit or abort."""

    box: str
    name: str
    fd: int
    digest: Any = None  # a fdboxd.checksum.Digest, filled by whoever checksums
    type: FdType = FdType.MEMFD
    #: A file carried instead of the entry's own (a guest_memfd's memfd copy, made by
    #: its kind's ``prepare`` in a worker thread); owned by the plan.
    copy: int = -1

    @property
    def source(self) -> int:
        """The file whose bytes are sealed: the entry's own, or its carried copy."""
        return self.copy if self.copy >= 0 else self.fd
