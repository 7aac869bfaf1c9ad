"""The core of fdbox: rules, ownership, limits and events over a backend.

Every front-end (Varlink, D-Bus, the systemd fdstore mirror) calls the same
:class:`Store` methods with a :class:`~fdboxd.model.Caller` it got from the kernel, so
the rules below hold the same everywhere:

- names follow :mod:`fdboxd.names`; types are *detected* (:mod:`fdboxd.fdtypes`) and
  only ``allowed_types`` are accepted;
- a box belongs to whoever created it; only its owner (or root) may put into it, seal,
  unseal or delete it; only an entry's owner (or root) may get or remove the entry;
  non-root callers see only their own entries;
- a sealed box takes no put and no remove;
- every change is recorded in the manifest's journal (one ``write()``, see
  :mod:`fdboxd.manifest`) before it is reported done; if that write fails the caller gets
  ``BackendUnavailable`` and nothing changed: a Put is undone, a Remove, DeleteBox, claim
  (Get in a restored box) or Finish is journalled *before* the backend lets anything go.
  The exceptions are changes the backend already made and cannot take back (a seal
  rolled back, a restored entry refused at start-up): those are logged and kept for the
  next write (:meth:`Store.record_or_log`);
- no request costs more than its own entries: counts are kept as things change, and
  the manifest is never rewritten whole on the request path;
- the caller's fds are never closed here: backends take their own references.

The store is single-threaded: the daemon calls it from its one asyncio loop. The
seal/restore lifecycle is :mod:`fdboxd.lifecycle` (long work — checksumming a big box
at seal time — runs in worker threads through
:func:`~fdboxd.lifecycle.seal_in_worker`); start-up reconciliation with the backends is
:mod:`fdboxd.reconcile`; the journal and snapshot are :mod:`fdboxd.manifest`.
"""

from __future__ import annotations

from collections import Counter

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import failpoints, lifecycle, timeline
from .backends.base import Backend
from .backends.memory import MemoryBackend
from .checksum import DEFAULT_VERIFY, Verify
from .errors import FdboxError
from .fdtypes import MEMORY_TYPES, FdInfo, FdType, detect, detect_or_refuse
from .kinds import Kind, Kinds
from .lifecycle import CARRY_BOX, CARRY_ENTRY, SealItem, SealPlan, file_digest, seal_in_worker
from .limits import Limits
from .manifest import Manifest, ManifestData, Op, box_op, encode, entry_op, lost_op
from .model import Box, BoxState, Caller, Entry, Event
from .names import BoxRules, check_box_name, check_entry_name
from .reconcile import reconcile

# Names other modules and tests import from here, wherever they now live.
__all__ = ["CARRY_BOX", "CARRY_ENTRY", "Event", "Limits", "PutItem", "SealItem", "SealPlan", "Store",
           "file_digest", "seal_in_worker"]

log = logging.getLogger("fdboxd.store")


@dataclass(frozen=True)
class PutItem:
    name: str
    fd: int
    metadata: dict[str, str]


Listener = Callable[[Event], None]


class Store:
    """The rules over a backend (see the module docstring).

    Front-ends call the request methods (``put``, ``get``, ``seal``, ``status``...).
    :mod:`fdboxd.lifecycle`, :mod:`fdboxd.reconcile` and the fd kinds use a small
    surface below the requests, public so that no module reaches into another's
    private names (``tests/unit/test_layering.py``):

    - lookups with the visibility rules: :meth:`find_box`, :meth:`find_entry`,
      :meth:`check_box_owner`, :meth:`owned_box`;
    - where an entry is held: :meth:`backend_for`, :meth:`create_box_backends`;
    - changes that keep the O(1) counters right: :meth:`count_entry`, :meth:`resize`,
      :meth:`set_state`, :meth:`recount` (start-up only), :meth:`drop_entry`,
      :meth:`claim`, :meth:`mark_reopened` and :meth:`finish_reopened`; ``sealing`` is
      the set of boxes between seal_begin and seal_commit/abort;
    - the record: :meth:`record` (journal a change before it is done),
      :meth:`record_or_log` (a change done already), :meth:`box_ops` (ops restating whole
      boxes), :meth:`save_snapshot`; and :meth:`emit` for the front-ends' listeners.
    """

    def __init__(
        self,
        backend: Backend,
        manifest: Manifest | None = None,
        *,
        limits: Limits = Limits(),
        allowed_types: Iterable[FdType] = MEMORY_TYPES,
        verify: Verify = DEFAULT_VERIFY,
        box_rules: BoxRules | None = None,
    ) -> None:
        self.backend = backend
        #: How much of each entry seal hashes and restore checks (fdboxd --verify).
        self.verify = Verify(verify)
        # Types the main backend cannot hold (tap fds with the kernel backend) are
        # held by the daemon itself.
        self.side: Backend = backend if backend.holds_every_type else MemoryBackend()
        self.manifest = manifest
        self.limits = limits
        self.allowed_types = frozenset(allowed_types)
        self.boxes: dict[str, Box] = {}
        self.owners: dict[str, int] = {}
        self.generation = 0
        #: Entries the manifest named but no backend held at start (reported, not invented).
        self.lost: list[dict[str, Any]] = []
        #: Entries a backend held that the manifest did not know (adopted as root's).
        self.adopted: list[dict[str, Any]] = []
        self.listeners: list[Listener] = []
        #: Which box names which uid may create (fdboxd --box-owners; see fdboxd.names).
        self.box_rules: BoxRules = box_rules or BoxRules()
        #: Each fd type's kind (fdboxd.kinds): what put, seal, restore and remove do with it.
        self.kinds = Kinds()
        self.sealing: set[str] = set()  # boxes between seal_begin and seal_commit/abort
        self._n_entries = 0  # kept as entries come and go: Status and limits are O(1)
        #: Per-uid usage, kept the same way (quotas and non-root Status stay O(1)): boxes
        #: owned, entries and recorded bytes. Changed only through _count_entry/_own.
        self._uid_boxes: Counter[int] = Counter()
        self._uid_entries: Counter[int] = Counter()
        self._uid_bytes: Counter[int] = Counter()
        self._n_state: dict[BoxState, int] = {s: 0 for s in BoxState}
        self._unrecorded: list[Op] = []  # ops of done changes whose journal write failed
        reconcile(self, manifest.load() if manifest else ManifestData())  # fdboxd.reconcile

    # ------------------------------------------------------------------ start-up

    def recount(self) -> None:
        self._n_entries = sum(len(b.entries) for b in self.boxes.values())
        self._n_state = {s: 0 for s in BoxState}
        for b in self.boxes.values():
            self._n_state[b.state] += 1
        self._uid_boxes = Counter(self.owners[n] for n in self.boxes if n in self.owners)
        self._uid_entries, self._uid_bytes = Counter(), Counter()
        for b in self.boxes.values():
            for e in b.entries.values():
                self._uid_entries[e.uid] += 1
                self._uid_bytes[e.uid] += e.size

    def count_entry(self, entry: Entry, sign: int) -> None:
        """An entry joined (+1) or left (-1) the store: the O(1) counters follow."""
        self._n_entries += sign
        self._uid_entries[entry.uid] += sign
        self._uid_bytes[entry.uid] += sign * entry.size

    def resize(self, entry: Entry, size: int) -> None:
        """Record a new size for an entry (the seal measures it again)."""
        self._uid_bytes[entry.uid] += size - entry.size
        entry.size = size

    def _own(self, box: str, uid: int | None) -> None:
        """``box`` now belongs to ``uid`` (None: the box is gone)."""
        old = self.owners.pop(box, None)
        if old is not None:
            self._uid_boxes[old] -= 1
        if uid is not None:
            self.owners[box] = uid
            self._uid_boxes[uid] += 1


    # ------------------------------------------------------------------ queries

    def status(self, caller: Caller | None = None) -> dict[str, Any]:
        """The whole store's counts; for a non-root ``caller``, only what is theirs."""
        if caller is None or caller.is_root:  # the O(1) counters
            boxes, entries = len(self.boxes), self._n_entries
            sealed, restored = self._n_state[BoxState.SEALED], self._n_state[BoxState.RESTORED]
            lost, adopted = list(self.lost), list(self.adopted)
        else:  # what the caller may see: O(boxes)
            mine = [b for b in self.boxes.values() if self._visible(caller, b)]
            boxes, entries = len(mine), sum(1 for b in mine for e in b.entries.values() if e.uid == caller.uid)
            sealed = sum(b.state == BoxState.SEALED for b in mine)
            restored = sum(b.state == BoxState.RESTORED for b in mine)
            lost = [r for r in self.lost if r.get("uid") == caller.uid]
            adopted = [r for r in self.adopted if r.get("uid") == caller.uid]
        return {
            "backend": self.backend.name, "survives_kexec": self.backend.survives_kexec,
            "boxes": boxes, "entries": entries, "sealed": sealed, "restored": restored,
            "state": self.overall_state(), "lost": lost, "adopted": adopted, "generation": self.generation,
            "problems": (self.backend.problems() + self._unverified_problems(caller)
                         + [p for k in self.kinds.all() for p in k.problems(self, caller)]),
        }

    def _unverified_problems(self, caller: Caller | None) -> list[str]:
        """One line per restored entry kept unchecked (:data:`fdboxd.lifecycle.UNVERIFIED`)."""
        if not self._n_state[BoxState.RESTORED]:
            return []
        return [f"{b.name}/{e.name}: restored but not checked against its seal ({e.extra[lifecycle.UNVERIFIED]})"
                for b in self.boxes.values() if b.state == BoxState.RESTORED
                for e in b.entries.values()
                if lifecycle.UNVERIFIED in e.extra and (caller is None or e.owned_by(caller))]

    def usage(self, uid: int) -> dict[str, int]:
        """What ``uid`` holds, against the per-uid quotas: boxes owned, entries, bytes."""
        return {"boxes": self._uid_boxes[uid], "entries": self._uid_entries[uid], "bytes": self._uid_bytes[uid]}

    def acknowledge_lost(self, caller: Caller, box: str | None = None) -> int:
        """Forget the caller's lost-entry reports (root: everybody's), of one box or all."""
        keep, gone = [], 0
        for r in self.lost:
            if (caller.is_root or r.get("uid") == caller.uid) and (box is None or r["box"] == box):
                gone += 1
            else:
                keep.append(r)
        if gone:
            self.lost = keep
            self.record([lost_op(self.lost)])
        return gone

    def overall_state(self) -> str:
        """One word for the whole store: open, sealed (every non-empty box), restored."""
        if self._n_state[BoxState.RESTORED]:
            return "restored"
        if self.boxes and self._n_state[BoxState.SEALED] == len(self.boxes):
            return "sealed"
        return "open"

    def list(self, caller: Caller, box: str | None = None) -> list[Entry]:
        boxes = [self.find_box(box, caller)] if box is not None else list(self.boxes.values())
        out = []
        for b in sorted(boxes, key=lambda b: b.name):
            for e in sorted(b.entries.values(), key=lambda e: e.name):
                if e.owned_by(caller):
                    out.append(e)
        return out

    def list_boxes(self, caller: Caller) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.boxes):
            b = self.boxes[name]
            mine = [] if caller.is_root else [e for e in b.entries.values() if e.owned_by(caller)]
            if caller.is_root or mine or self.owners.get(name) == caller.uid:
                s = b.summary()
                s["owner"] = self.owners.get(name, 0)
                if not caller.is_root:
                    s["entries"] = len(mine)
                    s["size"] = sum(e.size for e in mine)
                out.append(s)
        return out

    # ------------------------------------------------------------------ changes

    def put(self, caller: Caller, box: str, name: str, fd: int, metadata: dict[str, str] | None = None) -> Entry:
        return self.put_many(caller, box, [PutItem(name, fd, metadata or {})])[0]

    def put_many(self, caller: Caller, box: str, items: list[PutItem]) -> list[Entry]:
        """Put several entries into one box: all of them, or none. Every check runs before
        anything is held; then each entry is held by its backend and the whole put is
        journalled. A backend that refuses an entry, or a journal write that fails
        (``BackendUnavailable``), undoes what this put held (and the box, if it made it).
        A daemon killed before the journal write leaves the entries unrecorded: gone with
        the process on the memory backend, listed as adopted (root's) on fdbox.ko."""
        check_box_name(box)
        if box == CARRY_BOX:
            raise FdboxError("InvalidName", f"box name {box} is reserved for fdboxd", box=box)
        for it in items:
            reserved = self.kinds.reserved(it.name) if isinstance(it.name, str) else None
            if reserved:
                raise FdboxError("InvalidName", reserved, box=box, name=it.name)
        if not items:
            raise FdboxError("InvalidRequest", "no entries to put", box=box)
        names = [check_entry_name(it.name) for it in items]
        if len(set(names)) != len(names):
            raise FdboxError("AlreadyExists", "the same name twice in one request", box=box)
        infos = [self._check_fd(it.fd) for it in items]
        for it in items:
            self._check_metadata(it.metadata)
        b = self.boxes.get(box)
        if b is not None:
            if not (caller.is_root or self.owners.get(box) == caller.uid):
                raise FdboxError("PermissionDenied", f"box {box} belongs to another user", box=box)
            if b.state != BoxState.OPEN or box in self.sealing:
                state = "sealing" if b.state == BoxState.OPEN else str(b.state)
                raise FdboxError("Sealed", f"box {box} is {state}", box=box, state=state)
            for n in names:
                if n in b.entries:
                    raise FdboxError("AlreadyExists", f"{box}/{n} exists", box=box, name=n)
        elif len(self.boxes) >= self.limits.cap(self.limits.max_boxes, caller.is_root):
            raise FdboxError("LimitExceeded", f"at most {self.limits.max_boxes} boxes", limit="boxes")
        have = len(b.entries) if b else 0
        if have + len(items) > self.limits.max_entries_per_box:
            raise FdboxError(
                "LimitExceeded", f"at most {self.limits.max_entries_per_box} entries per box", box=box, limit="entries_per_box"
            )
        if self._n_entries + len(items) > self.limits.cap(self.limits.max_entries_total, caller.is_root):
            raise FdboxError("LimitExceeded", f"at most {self.limits.max_entries_total} entries", limit="entries")
        self._check_quota(caller, box, b is None, infos)

        extras = [self.kind(info.type).record(it.fd, info, caller) for it, info in zip(items, infos, strict=True)]

        created_box = b is None
        if created_box:
            self._create_box(box)
            b = self.boxes[box]
            self._own(box, caller.uid)
        done: list[Entry] = []
        try:
            for it, info, extra in zip(items, infos, extras, strict=True):
                self.backend_for(info.type).put(box, it.name, it.fd, info, caller.uid, caller.gid)
                entry = Entry(
                    box, it.name, info.type, info.size, caller.uid, caller.gid,
                    metadata=dict(it.metadata), seals=info.seals, extra=extra,
                )
                b.entries[it.name] = entry
                self.count_entry(entry, +1)
                done.append(entry)
            ops: list[Op] = [box_op(b, caller.uid)] if created_box else []
            self.record(ops + [entry_op(e) for e in done])
            timeline.mark(b, "put", log_it=False)  # in memory; the seal's snapshot records it
        except BaseException:
            for entry in done:
                self.drop_entry(b, entry.name)
            if created_box:
                self._delete_box_backends(box)
                del self.boxes[box]
                self._n_state[BoxState.OPEN] -= 1
                self._own(box, None)
            raise
        for entry in done:
            if "warning" in entry.extra:  # a kind's word at put (fdboxd.kinds.memfd: hugetlb)
                log.warning("put %s/%s: it %s", box, entry.name, entry.extra["warning"],
                            extra={"FDBOX_BOX": box, "FDBOX_ENTRY": entry.name})
        if self.listeners:
            for entry, it in zip(done, items, strict=False):
                self.emit(Event("entry-added", box, entry=entry, fd=it.fd))
        return done

    def get(self, caller: Caller, box: str, name: str) -> tuple[Entry, int]:
        """A new fd for one entry (the caller closes it). In a restored box, a claim, and
        first the check a start-up could not make (:func:`fdboxd.lifecycle.check_unverified`)."""
        entry = self.find_entry(box, name, caller)
        b = self.boxes[box]
        lifecycle.check_unverified(self, b, [entry])
        fd = self._get_fd(b, entry)
        try:
            self.claim(b, [entry])
        except BaseException:
            os.close(fd)
            raise
        return entry, fd

    def lend(self, caller: Caller, box: str, name: str) -> tuple[Entry, int] | None:
        """:meth:`get` with the backend's own fd, borrowed (see :meth:`lend_box`); None,
        with nothing done, where the backend makes a new fd per get."""
        entry = self.find_entry(box, name, caller)
        b = self.boxes[box]
        lifecycle.check_unverified(self, b, [entry])
        fd = self.kind(entry.type).lend(self, b, entry)
        if fd is None:
            return None
        self.claim(b, [entry])
        return entry, fd

    def lend_box(self, caller: Caller, box: str) -> list[tuple[Entry, int]] | None:
        """:meth:`get_box` with the backends' own fds, borrowed (:meth:`Backend.lend`):
        no fd made and none to close. None, with nothing done, where a backend makes a
        new fd per get; the caller then asks :meth:`get_box`. The same checks, the same claim."""
        b, mine = self._box_for_get(caller, box)
        if not mine:
            return []
        lifecycle.check_unverified(self, b, mine)
        first = mine[0].type
        if all(e.type is first for e in mine):  # the usual box: one kind, one backend call
            fds = self.kind(first).lend_many(self, b, mine)
        else:
            each = [self.kind(e.type).lend(self, b, e) for e in mine]
            fds = None if None in each else each  # type: ignore[assignment]
        if fds is None:
            return None
        self.claim(b, mine)
        return list(zip(mine, fds, strict=True))

    def _box_for_get(self, caller: Caller, box: str) -> tuple[Box, list[Entry]]:
        """The box and the caller's entries in it by name, for GetBox (PermissionDenied
        when it has entries and none is theirs)."""
        b = self.find_box(box, caller)
        if caller.is_root:
            mine = [b.entries[n] for n in sorted(b.entries)]
        else:
            mine = sorted((e for e in b.entries.values() if e.owned_by(caller)), key=lambda e: e.name)
        if not mine and b.entries:
            raise FdboxError("PermissionDenied", f"no entry of box {box} belongs to you", box=box)
        return b, mine

    def get_box(self, caller: Caller, box: str) -> list[tuple[Entry, int]]:
        """Every entry of a box the caller owns, with a new fd each: all or nothing."""
        b, mine = self._box_for_get(caller, box)
        lifecycle.check_unverified(self, b, mine)
        out: list[tuple[Entry, int]] = []
        try:
            for e in mine:
                out.append((e, self._get_fd(b, e)))
            self.claim(b, mine)
        except BaseException:
            for _, fd in out:
                os.close(fd)
            raise
        return out

    def remove(self, caller: Caller, box: str, name: str) -> None:
        """Journalled first: a failed journal write is ``BackendUnavailable`` with the entry
        still held. Then the backend lets it go; if that fails, the entry stays (and the
        journal is told so again)."""
        entry = self.find_entry(box, name, caller)
        b = self.boxes[box]
        if b.state == BoxState.SEALED or box in self.sealing:
            raise FdboxError("Sealed", f"box {box} is sealed", box=box)
        self.record([["rm", box, name]], fault=lambda: failpoints.hit("remove.journal"))
        try:
            failpoints.hit("remove.before_release")
            self.drop_entry(b, name)
        except BaseException:
            if name not in b.entries:  # drop_entry pops before the backend is asked
                b.entries[name] = entry
                self.count_entry(entry, +1)
            self.record_or_log([entry_op(entry)])
            raise
        if self.listeners:
            self.emit(Event("entry-removed", box, entry=entry))

    def delete_box(self, caller: Caller, box: str) -> None:
        """Journalled first, as :meth:`remove`: a failed write changes nothing. A backend
        that then refuses the delete leaves the box listed, and the journal is told so
        again; what was let go before the refusal (the main backend's entries, when the
        side backend refuses) is gone, and the next start reports it lost."""
        b = self.find_box(box)
        self.check_box_owner(caller, box)
        if any(not e.owned_by(caller) for e in b.entries.values()):
            raise FdboxError("PermissionDenied", f"box {box} holds other users' entries", box=box)
        if b.state == BoxState.SEALED or box in self.sealing:
            raise FdboxError("Sealed", f"box {box} is sealed", box=box)
        self.record([["rmbox", box]], fault=lambda: failpoints.hit("remove.box_journal"))
        entries = list(b.entries.values())
        try:
            failpoints.hit("remove.box_before_release")
            self._delete_box_backends(box)
        except BaseException:
            self.record_or_log(self.box_ops([box]))  # the box is still here
            raise
        del self.boxes[box]
        for e in entries:
            self.count_entry(e, -1)
        self._n_state[b.state] -= 1
        self._own(box, None)
        for e in entries:
            self.emit(Event("entry-removed", box, entry=e))

    # ------------------------------------------------------------------ seal and restore

    # The lifecycle lives in fdboxd.lifecycle as functions over a Store; these keep the
    # one object front-ends and tests call.

    def seal(self, caller: Caller, box: str | None = None) -> list[str]:
        """Seal one box, or every open box (``box=None``), in one go (:func:`fdboxd.lifecycle.seal`)."""
        return lifecycle.seal(self, caller, box)

    def seal_begin(self, caller: Caller, box: str | None = None) -> SealPlan:
        return lifecycle.seal_begin(self, caller, box)

    def seal_commit(self, plan: SealPlan) -> list[str]:
        return lifecycle.seal_commit(self, plan)

    def seal_abort(self, plan: SealPlan) -> None:
        lifecycle.seal_abort(self, plan)

    def unseal(self, caller: Caller, box: str) -> None:
        lifecycle.unseal(self, caller, box)

    def finish(self, caller: Caller, box: str | None = None) -> list[str]:
        """End the restore phase: unclaimed entries of restored boxes are released (not
        another user's, but by root: :func:`fdboxd.lifecycle.finish`)."""
        return lifecycle.finish(self, caller, box)

    def verify_restored(self) -> list[dict[str, Any]]:
        """Check every restored entry against its seal (:func:`fdboxd.lifecycle.verify_restored`)."""
        return lifecycle.verify_restored(self)

    def owned_box(self, caller: Caller, box: str) -> Box:
        """The box, if the caller may act on it as a whole (its creator, or root)."""
        b = self.find_box(box)
        self.check_box_owner(caller, box)
        return b

    def rehold(self, box: str, entry: Entry, fd: int) -> None:
        """Hold a new file for an existing entry (a tap recreated after kexec).

        The old reference, if the backend still has one, is dropped first; front-ends
        that mirror held fds (the systemd fdstore) see a removal and an addition. A put
        that fails after that leaves the entry listed with no file held for it: a tap is
        recreated at the next start; a guest_memfd's carried copy, dropped only after
        this, is still there for a RestoreInto again.
        """
        backend = self.backend_for(entry.type)
        if backend.inventory().get(box) is None:
            backend.create_box(box)
        if backend.discard(box, entry.name):  # nothing held is the usual case after kexec
            self.emit(Event("entry-removed", box, entry=entry))
        backend.put(box, entry.name, fd, detect(fd), entry.uid, entry.gid)
        self.emit(Event("entry-added", box, entry=entry, fd=fd))

    # ------------------------------------------------------------------ helpers

    def kind(self, fd_type: FdType) -> Kind:
        """The kind that handles files of ``fd_type`` (:mod:`fdboxd.kinds`)."""
        return self.kinds.of(fd_type)

    def started(self) -> None:
        """The daemon has started and every entry sits where a restart finds it again:
        release what only a failed start would have needed, the manifest carried across
        the kexec first (:func:`fdboxd.lifecycle.release_carried`), then the backend's
        (:meth:`~fdboxd.backends.base.Backend.started`: LUO FINISHes its incoming sessions).
        Until then a start that fails or dies leaves both for the next start."""
        lifecycle.release_carried(self)
        self.backend.started()

    def start_kinds(self) -> None:
        """Once the store serves: each kind brings back what it recreates (taps after a kexec)."""
        for kind in self.kinds.all():
            try:
                kind.start(self)
            except Exception:
                log.exception("start-up of %s entries failed", type(kind).__name__)

    def entry_count(self) -> int:
        return self._n_entries

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def emit(self, event: Event) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a front-end's mirror must never undo a done change
                log.exception("event listener failed on %s", event.kind)

    def _visible(self, caller: Caller, b: Box) -> bool:
        """Whether the caller may learn that box exists: root, its owner, or one of its entries'."""
        return (caller.is_root or self.owners.get(b.name) == caller.uid
                or any(e.uid == caller.uid for e in b.entries.values()))

    def find_box(self, box: str, caller: Caller | None = None) -> Box:
        """The box; NotFound if missing or, for ``caller``, not visible (no name oracle:
        another user's box and no box at all get the same answer)."""
        check_box_name(box)
        b = self.boxes.get(box)
        if b is None or (caller is not None and not self._visible(caller, b)):
            raise FdboxError("NotFound", f"no box {box}", box=box)
        return b

    def find_entry(self, box: str, name: str, caller: Caller | None = None) -> Entry:
        """The entry; for ``caller``, NotFound unless theirs (as if it did not exist)."""
        b = self.find_box(box, caller)
        check_entry_name(name)
        e = b.entries.get(name)
        if e is None or (caller is not None and not e.owned_by(caller)):
            raise FdboxError("NotFound", f"no entry {box}/{name}", box=box, name=name)
        return e

    def check_box_owner(self, caller: Caller, box: str) -> None:
        if not (caller.is_root or self.owners.get(box) == caller.uid):
            if not self._visible(caller, self.boxes[box]):
                raise FdboxError("NotFound", f"no box {box}", box=box)
            raise FdboxError("PermissionDenied", f"box {box} belongs to another user", box=box)

    def _check_quota(self, caller: Caller, box: str, new_box: bool, infos: list[FdInfo]) -> None:
        """Per-uid quotas and the box-name rules, before anything changes."""
        lim = self.limits
        if lim.max_entry_size and any(i.size > lim.max_entry_size for i in infos):
            raise FdboxError("LimitExceeded", f"an entry is over {lim.max_entry_size} bytes", box=box,
                             limit="entry_size")
        if caller.is_root:
            return
        if new_box:
            owner = self.box_rules.owner(box)
            if owner is not None and owner != caller.uid:
                raise FdboxError("PermissionDenied", f"box name {box} is reserved for another user", box=box)
        u = self.usage(caller.uid)
        if new_box and u["boxes"] >= lim.max_boxes_per_uid:
            raise FdboxError("LimitExceeded", f"at most {lim.max_boxes_per_uid} boxes per user", limit="boxes_per_uid")
        if u["entries"] + len(infos) > lim.max_entries_per_uid:
            raise FdboxError("LimitExceeded", f"at most {lim.max_entries_per_uid} entries per user",
                             limit="entries_per_uid")
        if lim.max_bytes_per_uid and u["bytes"] + sum(i.size for i in infos) > lim.max_bytes_per_uid:
            raise FdboxError("LimitExceeded", f"at most {lim.max_bytes_per_uid} bytes per user", limit="bytes_per_uid")

    def _check_fd(self, fd: int) -> FdInfo:
        info = detect_or_refuse(fd)
        if info.type not in self.allowed_types:
            accepted = sorted(str(t) for t in self.allowed_types)
            wider = sorted(str(t) for t in FdType if t not in self.allowed_types)
            hint = f"; fdboxd --allow-type {'|'.join(wider)} widens that" if wider else ""
            raise FdboxError("UnsupportedType", f"files of type {info.type} are not accepted: this daemon "
                             f"takes {', '.join(accepted)}{hint}", type=str(info.type), accepted=accepted)
        return info

    def _check_metadata(self, metadata: object) -> None:
        if type(metadata) is dict and not metadata:
            return  # the usual case: nothing to check
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise FdboxError("InvalidRequest", "metadata must map strings to strings")
        if len(metadata) > self.limits.max_metadata_keys:
            raise FdboxError("LimitExceeded", f"at most {self.limits.max_metadata_keys} metadata keys", limit="metadata")
        if sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items()) > self.limits.max_metadata_bytes:
            raise FdboxError("LimitExceeded", f"metadata over {self.limits.max_metadata_bytes} bytes", limit="metadata")

    def backend_for(self, fd_type: FdType) -> Backend:
        return self.backend if self.backend.accepts(fd_type) else self.side

    def _create_box(self, box: str) -> None:
        self.create_box_backends(box)
        self.boxes[box] = Box(box)
        self._n_state[BoxState.OPEN] += 1

    def create_box_backends(self, box: str) -> None:
        self.backend.create_box(box)
        if self.side is not self.backend:
            self.side.create_box(box)

    def set_state(self, b: Box, state: BoxState) -> None:
        self._n_state[b.state] -= 1
        self._n_state[state] += 1
        b.state = state

    def _delete_box_backends(self, box: str) -> None:
        self.backend.delete_box(box)
        if self.side is not self.backend:
            self.side.delete_box(box)

    def drop_entry(self, b: Box, name: str) -> None:
        """The entry leaves its box: counters follow, its kind releases what holds it."""
        entry = b.entries.pop(name)
        self.count_entry(entry, -1)
        self.kind(entry.type).release(self, b, entry)

    def _get_fd(self, b: Box, entry: Entry) -> int:
        """A new fd for the file an entry holds (its kind may refuse: a guest_memfd known by its copy)."""
        return self.kind(entry.type).retrieve(self, b, entry)

    def claim(self, b: Box, entries: list[Entry]) -> None:
        """In a restored box: ``entries`` were taken back. Journalled before anything else
        changes: if the journal write fails, nothing did (``BackendUnavailable``). The
        last claim reopens the box, and only then is the backend told (FINISH)."""
        if b.state != BoxState.RESTORED:
            return
        before = b.timeline, [(e, e.claimed) for e in entries]
        first = "first_get" not in b.timeline
        if first:
            timeline.mark(b, "first_get")
        for e in entries:
            e.claimed = True
        last = all(e.claimed for e in b.entries.values())
        undo_reopen = self.mark_reopened(b) if last else None
        if last:
            ops = self.box_ops([b.name])
        else:
            ops = ([box_op(b, self.owners.get(b.name, 0))] if first else []) + [entry_op(e) for e in entries]

        def undo() -> None:
            if undo_reopen is not None:
                undo_reopen()
            b.timeline = before[0]
            for e, was in before[1]:
                e.claimed = was

        try:
            self.record(ops, fault=lambda: failpoints.hit("restore.claim_journal"))
        except BaseException:
            undo()
            raise
        if last:
            try:
                self.finish_reopened(b)
            except BaseException:
                undo()
                self.record_or_log(self.box_ops([b.name]))
                raise

    def mark_restored(self, kernel_up: float, restore_begin: float) -> None:
        """After a kexec, once every restored box is checked: the restore side of their timelines."""
        names = []
        for b in self.boxes.values():
            if b.state == BoxState.RESTORED and "restore_end" not in b.timeline:
                timeline.mark(b, "kernel_up", kernel_up)
                timeline.mark(b, "restore_begin", restore_begin)
                timeline.mark(b, "restore_end")
                names.append(b.name)
        if names:
            self.record_or_log(self.box_ops(names))

    def last_live_update(self, caller: Caller) -> list[dict[str, Any]]:
        """Each visible box's last live update (:func:`fdboxd.timeline.report`), boxes by name."""
        return [timeline.report(b) for _, b in sorted(self.boxes.items())
                if b.timeline and self._visible(caller, b)]

    def mark_reopened(self, b: Box) -> Callable[[], None]:
        """The store's half of reopening a restored box (open, nothing claimed), to journal
        before :meth:`finish_reopened` tells the backend; returns what undoes it."""
        state, tl, claimed = b.state, b.timeline, {n: e.claimed for n, e in b.entries.items()}
        self.set_state(b, BoxState.OPEN)
        timeline.mark(b, "reopened")
        for e in b.entries.values():
            e.claimed = False

        def undo() -> None:
            self.set_state(b, state)
            b.timeline = tl
            for n, was in claimed.items():
                if n in b.entries:
                    b.entries[n].claimed = was

        return undo

    def finish_reopened(self, b: Box) -> None:
        """The backend's half of reopening (FINISH), once the journal holds the reopened box.
        A FINISH that fails raises with the store's half done: the callers (:meth:`claim`,
        :func:`fdboxd.lifecycle.finish`) undo it and journal the box restored again."""
        failpoints.hit("restore.before_backend_finish")
        self.backend.finish(b.name)
        self.emit(Event("state-changed", b.name, state=BoxState.OPEN))

    def snapshot_bytes(self) -> int:
        """The size of the snapshot a seal would write now (the preflight's room check)."""
        return len(encode(self._manifest_data()))

    def _manifest_data(self) -> ManifestData:
        return ManifestData(boxes=self.boxes, owners=self.owners, generation=self.generation, lost=self.lost)

    def box_ops(self, names: Iterable[str]) -> list[Op]:
        """Journal ops that restate whole boxes (after a seal, a finish: O(those boxes))."""
        ops: list[Op] = []
        for name in names:
            b = self.boxes[name]
            ops.append(box_op(b, self.owners.get(name, 0)))
            ops.extend(entry_op(e) for e in b.entries.values())
        return ops

    def record(self, ops: list[Op], fault: Callable[[], None] | None = None) -> None:
        """Journal one change before it is reported done (see :mod:`fdboxd.manifest`);
        ``BackendUnavailable`` if the write fails. ``fault``: this change's failpoint
        (``lambda: failpoints.hit("remove.journal")``), which fails as the write would."""
        if self.manifest is None or not ops:
            return
        try:
            if fault is not None:
                fault()
            self.manifest.append(self.generation + 1, self._unrecorded + ops)
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"cannot write the manifest journal: {e.strerror}") from e
        self._unrecorded = []
        self.generation += 1

    def record_or_log(self, ops: list[Op]) -> None:
        """Journal a change that already happened in the backend and cannot be undone."""
        try:
            self.record(ops)
        except FdboxError:
            self._unrecorded.extend(ops)
            log.exception("manifest journal write failed; the next successful write will include this change")

    def save_snapshot(self) -> None:
        if self.manifest is None:
            return
        data = self._manifest_data()
        try:
            self.manifest.save(data)
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"cannot write the manifest: {e.strerror}") from e
        finally:
            # Even when the save failed: the snapshot may be in place with this generation,
            # and a journal line not newer than its snapshot is skipped at replay.
            self.generation = data.generation
        self._unrecorded = []  # the snapshot holds every change, the unjournalled ones too
