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
  :mod:`fdboxd.manifest`) before it is reported done; if that write fails the change is
  undone and the caller gets ``BackendUnavailable``;
- no request costs more than its own entries: counts are kept as things change, and
  the manifest is never rewritten whole on the request path;
- the caller's fds are never closed here: backends take their own references.

The store is single-threaded: the daemon calls it from its one asyncio loop. Long work
(checksumming a big box at seal time) is done in :meth:`Store.seal` in one go; callers
that must stay responsive run it in a worker while holding the loop's attention
elsewhere — see the Varlink server.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import gmem
from .backends.base import Backend
from .backends.memory import MemoryBackend
from .checksum import DEFAULT_VERIFY, Digest, Verify, check_many, digest_many, planned_bytes, sha256_fd
from .errors import FdboxError
from .fdtypes import MEMORY_TYPES, FdInfo, FdType, detect
from .limits import Limits
from .manifest import Manifest, ManifestData, Op, box_op, decode, encode, entry_op
from .model import Box, BoxState, Caller, Entry
from .names import check_box_name, check_entry_name

log = logging.getLogger("fdboxd.store")

#: The box that carries the manifest of the sealed boxes across kexec, inside the sealed
#: set itself, so the next kernel's daemon learns owners, metadata and checksums even
#: when the state directory did not survive. Reserved: callers cannot name it.
CARRY_BOX = "fdboxd.manifest"
CARRY_ENTRY = "manifest.json"


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
    box: str
    name: str
    fd: int  # owned by the plan
    digest: Digest | None = None  # filled by whoever checksums (fdboxd.checksum)
    type: FdType = FdType.MEMFD
    #: guest_memfd: the memfd copy that is carried and checksummed instead (owned by the
    #: plan), made by :meth:`SealPlan.copy_guest_memfds`; see fdboxd.gmem
    copy: int = -1

    @property
    def source(self) -> int:
        """The file whose bytes are sealed: the entry's own, or its carried copy."""
        return self.copy if self.copy >= 0 else self.fd


@dataclass
class SealPlan:
    """What :meth:`Store.seal_begin` froze: boxes and one open fd per memory entry."""

    boxes: list[str]
    items: list[SealItem] = field(default_factory=list)

    def copy_guest_memfds(self) -> None:
        """Copy each guest_memfd into the memfd that is carried instead (slow: a worker runs it)."""
        for item in self.items:
            if item.type == FdType.GUEST_MEMFD and item.copy < 0:
                item.copy = gmem.copy_out(item.fd, f"{item.box}/{item.name}")

    def close(self) -> None:
        for item in self.items:
            if item.fd >= 0:
                os.close(item.fd)
                item.fd = -1
            if item.copy >= 0:
                os.close(item.copy)
                item.copy = -1


@dataclass(frozen=True)
class PutItem:
    name: str
    fd: int
    metadata: dict[str, str]


Listener = Callable[[Event], None]


class Store:
    def __init__(
        self,
        backend: Backend,
        manifest: Manifest | None = None,
        *,
        limits: Limits = Limits(),
        allowed_types: Iterable[FdType] = MEMORY_TYPES,
        verify: Verify = DEFAULT_VERIFY,
    ) -> None:
        self.backend = backend
        #: How much of each entry seal hashes and restore checks (fdboxd --verify).
        self.verify = Verify(verify)
        # Types the main backend cannot hold (tap fds with the kernel backend) are
        # held by the daemon itself.
        self.side: Backend = backend if isinstance(backend, MemoryBackend) else MemoryBackend()
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
        self._sealing: set[str] = set()  # boxes between seal_begin and seal_commit/abort
        self._n_entries = 0  # kept as entries come and go: Status and limits are O(1)
        self._n_state: dict[BoxState, int] = {s: 0 for s in BoxState}
        self._unrecorded: list[Op] = []  # ops of done changes whose journal write failed
        self._reconcile(manifest.load() if manifest else ManifestData())

    # ------------------------------------------------------------------ start-up

    def _reconcile(self, data: ManifestData) -> None:
        """Believe the backends for what exists, the manifest for who owns it."""
        held = dict(self.backend.inventory())
        carried = held.pop(CARRY_BOX, None)
        if carried is not None and carried.state == BoxState.RESTORED:
            data = self._take_carried_manifest(data, held)
        if self.side is not self.backend:
            for name, sbox in self.side.inventory().items():
                held.setdefault(name, sbox).entries.update(sbox.entries)
        self.generation = data.generation
        for name, box in data.boxes.items():
            hbox = held.get(name)
            for ename, entry in list(box.entries.items()):
                if hbox is not None and ename in hbox.entries:
                    entry.size = hbox.entries[ename].size
                    continue
                if entry.extra.get("recreate"):
                    continue  # e.g. a tap to be recreated after kexec (fdboxd.net)
                if hbox is not None and gmem.is_carried(entry) and gmem.carry_name(ename) in hbox.entries:
                    continue  # a guest_memfd carried as a copy (fdboxd.gmem): RestoreInto
                del box.entries[ename]
                self.lost.append({"box": name, "name": ename, "type": str(entry.type)})
                log.warning("entry %s/%s is in the manifest but no backend holds it", name, ename)
            if hbox is not None:
                box.state = hbox.state
            elif not box.entries:
                log.warning("box %s is in the manifest but no backend holds it", name)
                continue
            self.boxes[name] = box
            self.owners[name] = data.owners.get(name, 0)
        for name, hbox in held.items():
            box = self.boxes.get(name)
            if box is None:
                box = self.boxes[name] = Box(name, hbox.state)
                uids = {he.uid for he in hbox.entries.values()}
                self.owners[name] = uids.pop() if len(uids) == 1 else 0
            for ename, he in hbox.entries.items():
                if ename not in box.entries and not gmem.is_carry_name(ename):
                    box.entries[ename] = Entry(name, ename, he.type, he.size, he.uid, he.gid)
                    self.adopted.append({"box": name, "name": ename, "type": str(he.type)})
                    log.warning("adopted %s/%s (uid %d) held by the backend but not in the manifest",
                                name, ename, he.uid)
        self._recount()
        if self.manifest is not None:
            self._save()
            self.manifest.open()

    def _recount(self) -> None:
        self._n_entries = sum(len(b.entries) for b in self.boxes.values())
        self._n_state = {s: 0 for s in BoxState}
        for b in self.boxes.values():
            self._n_state[b.state] += 1

    def _take_carried_manifest(self, data: ManifestData, held: dict[str, Any]) -> ManifestData:
        """After kexec: the manifest that crossed with the data wins for restored boxes."""
        try:
            fd = self.backend.get(CARRY_BOX, CARRY_ENTRY)
            try:
                carried = decode(_read_fd(fd))
            finally:
                os.close(fd)
        except (FdboxError, OSError) as e:
            log.error("the manifest carried across kexec is unreadable: %s", e)
            return data
        finally:
            self._drop_carry_box()
        for name, box in carried.boxes.items():
            hbox = held.get(name)
            if hbox is not None and hbox.state == BoxState.RESTORED:
                data.boxes[name] = box
                data.owners[name] = carried.owners.get(name, 0)
        log.info("restored the manifest of %d sealed boxes from the previous kernel", len(carried.boxes))
        return data

    def verify_restored(self) -> list[dict[str, Any]]:
        """Check every restored entry against what was recorded when it was sealed.

        How much is read is ``self.verify`` (see :mod:`fdboxd.checksum`); entries are
        checked in parallel threads. An entry that does not match is dropped and
        reported in ``lost`` with the reason: handing a VM memory that changed under it
        is worse than handing none. Returns the entries that failed.
        """
        todo: list[tuple[Box, Entry, int]] = []
        problems: dict[tuple[str, str], str] = {}
        for b in self.boxes.values():
            if b.state != BoxState.RESTORED:
                continue
            for e in sorted(b.entries.values(), key=lambda e: e.name):
                if (e.type not in MEMORY_TYPES or self.verify == Verify.NONE
                        or (e.sha256 is None and "sample" not in e.extra)):
                    continue  # nothing to check against (getting it would restore it early)
                if gmem.is_carried(e):
                    continue  # a carried guest_memfd's copy is checked by RestoreInto, before it copies
                try:
                    todo.append((b, e, self._backend_for(e.type).get(b.name, e.name)))
                except (FdboxError, OSError) as err:
                    problems[(b.name, e.name)] = f"cannot restore: {err}"
        try:
            results = check_many([(fd, Digest(e.size, e.sha256, e.extra.get("sample"))) for _, e, fd in todo],
                                 self.verify)
        finally:
            for _, _, fd in todo:
                os.close(fd)
        for (b, e, _), problem in zip(todo, results):
            if problem is not None:
                problems[(b.name, e.name)] = problem
        failed = []
        for (box, name), problem in sorted(problems.items()):
            b = self.boxes[box]
            e = b.entries[name]
            log.error("restored entry %s/%s refused: %s", box, name, problem)
            report = {"box": box, "name": name, "type": str(e.type), "reason": problem}
            failed.append(report)
            self.lost.append(report)
            try:
                self._drop(b, name)
            except FdboxError:
                b.entries.pop(name, None)
                self._n_entries -= 1
        if failed:
            self._record_or_log([["rm", r["box"], r["name"]] for r in failed])
        return failed

    def _carry_manifest(self) -> None:
        """Put the manifest of every sealed box into the sealed set (kexec-capable backends)."""
        if not self.backend.survives_kexec:
            return
        self._drop_carry_box()
        sealed = {n: b for n, b in self.boxes.items() if b.state == BoxState.SEALED}
        if not sealed:
            return
        raw = encode(ManifestData(boxes=sealed, owners={n: self.owners.get(n, 0) for n in sealed},
                                  generation=self.generation))
        fd = os.memfd_create("fdboxd-manifest", os.MFD_CLOEXEC)
        try:
            os.write(fd, raw)
            self.backend.create_box(CARRY_BOX)
            self.backend.put(CARRY_BOX, CARRY_ENTRY, fd, detect(fd))
            self.backend.seal(CARRY_BOX)
        except BaseException:
            self._drop_carry_box()
            raise
        finally:
            os.close(fd)

    def _drop_carry_box(self) -> None:
        held = self.backend.inventory().get(CARRY_BOX)
        if held is None:
            return
        if held.state == BoxState.SEALED:
            self.backend.unseal(CARRY_BOX)
        elif held.state == BoxState.RESTORED:
            self.backend.finish(CARRY_BOX)
        self.backend.delete_box(CARRY_BOX)

    # ------------------------------------------------------------------ queries

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "survives_kexec": self.backend.survives_kexec,
            "boxes": len(self.boxes),
            "entries": self._n_entries,
            "sealed": self._n_state[BoxState.SEALED],
            "restored": self._n_state[BoxState.RESTORED],
            "state": self.overall_state(),
            "lost": list(self.lost),
            "adopted": list(self.adopted),
            "generation": self.generation,
        }

    def overall_state(self) -> str:
        """One word for the whole store: open, sealed (every non-empty box), restored."""
        if self._n_state[BoxState.RESTORED]:
            return "restored"
        if self.boxes and self._n_state[BoxState.SEALED] == len(self.boxes):
            return "sealed"
        return "open"

    def list(self, caller: Caller, box: str | None = None) -> list[Entry]:
        boxes = [self._box(box)] if box is not None else list(self.boxes.values())
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
        """Put several entries into one box: all of them, or none."""
        check_box_name(box)
        if box == CARRY_BOX:
            raise FdboxError("InvalidName", f"box name {box} is reserved for fdboxd", box=box)
        for it in items:
            if isinstance(it.name, str) and gmem.is_carry_name(it.name):
                raise FdboxError("InvalidName", f"entry names starting with {gmem.CARRY_PREFIX} are reserved for fdboxd",
                                 box=box, name=it.name)
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
            if b.state != BoxState.OPEN or box in self._sealing:
                state = "sealing" if b.state == BoxState.OPEN else str(b.state)
                raise FdboxError("Sealed", f"box {box} is {state}", box=box, state=state)
            for n in names:
                if n in b.entries:
                    raise FdboxError("AlreadyExists", f"{box}/{n} exists", box=box, name=n)
        elif len(self.boxes) >= self.limits.max_boxes:
            raise FdboxError("LimitExceeded", f"at most {self.limits.max_boxes} boxes", limit="boxes")
        have = len(b.entries) if b else 0
        if have + len(items) > self.limits.max_entries_per_box:
            raise FdboxError(
                "LimitExceeded", f"at most {self.limits.max_entries_per_box} entries per box", box=box, limit="entries_per_box"
            )
        if self._n_entries + len(items) > self.limits.max_entries_total:
            raise FdboxError("LimitExceeded", f"at most {self.limits.max_entries_total} entries", limit="entries")

        extras = [self._type_record(it.fd, info, caller) for it, info in zip(items, infos, strict=True)]

        created_box = b is None
        if created_box:
            self._create_box(box)
            b = self.boxes[box]
            self.owners[box] = caller.uid
        done: list[Entry] = []
        try:
            for it, info, extra in zip(items, infos, extras, strict=True):
                self._backend_for(info.type).put(box, it.name, it.fd, info, caller.uid, caller.gid)
                entry = Entry(
                    box, it.name, info.type, info.size, caller.uid, caller.gid,
                    metadata=dict(it.metadata), seals=info.seals, extra=extra,
                )
                b.entries[it.name] = entry
                self._n_entries += 1
                done.append(entry)
            ops: list[Op] = [box_op(b, caller.uid)] if created_box else []
            self._record(ops + [entry_op(e) for e in done])
        except BaseException:
            for entry in done:
                self._drop(b, entry.name)
            if created_box:
                self._delete_box_backends(box)
                del self.boxes[box]
                self._n_state[BoxState.OPEN] -= 1
                self.owners.pop(box, None)
            raise
        for entry, it in zip(done, items, strict=False):
            self._emit(Event("entry-added", box, entry=entry, fd=it.fd))
        return done

    def get(self, caller: Caller, box: str, name: str) -> tuple[Entry, int]:
        """A new fd for one entry (the caller closes it). In a restored box, a claim."""
        entry = self._entry(box, name)
        if not entry.owned_by(caller):
            raise FdboxError("PermissionDenied", f"{box}/{name} belongs to another user", box=box, name=name)
        fd = self._get_fd(self.boxes[box], entry)
        self._claim(self.boxes[box], [entry])
        return entry, fd

    def get_box(self, caller: Caller, box: str) -> list[tuple[Entry, int]]:
        """Every entry of a box the caller owns, with a new fd each: all or nothing."""
        b = self._box(box)
        mine = sorted((e for e in b.entries.values() if e.owned_by(caller)), key=lambda e: e.name)
        if not mine and b.entries:
            raise FdboxError("PermissionDenied", f"no entry of box {box} belongs to you", box=box)
        out: list[tuple[Entry, int]] = []
        try:
            for e in mine:
                out.append((e, self._get_fd(b, e)))
        except BaseException:
            for _, fd in out:
                os.close(fd)
            raise
        self._claim(b, mine)
        return out

    def remove(self, caller: Caller, box: str, name: str) -> None:
        entry = self._entry(box, name)
        if not entry.owned_by(caller):
            raise FdboxError("PermissionDenied", f"{box}/{name} belongs to another user", box=box, name=name)
        b = self.boxes[box]
        if b.state == BoxState.SEALED or box in self._sealing:
            raise FdboxError("Sealed", f"box {box} is sealed", box=box)
        self._drop(b, name)
        self._record_or_log([["rm", box, name]])
        self._emit(Event("entry-removed", box, entry=entry))

    def delete_box(self, caller: Caller, box: str) -> None:
        b = self._box(box)
        self._check_box_owner(caller, box)
        if any(not e.owned_by(caller) for e in b.entries.values()):
            raise FdboxError("PermissionDenied", f"box {box} holds other users' entries", box=box)
        if b.state == BoxState.SEALED or box in self._sealing:
            raise FdboxError("Sealed", f"box {box} is sealed", box=box)
        entries = list(b.entries.values())
        self._delete_box_backends(box)
        del self.boxes[box]
        self._n_entries -= len(entries)
        self._n_state[b.state] -= 1
        self.owners.pop(box, None)
        self._record_or_log([["rmbox", box]])
        for e in entries:
            self._emit(Event("entry-removed", box, entry=e))

    def seal(self, caller: Caller, box: str | None = None) -> list[str]:
        """Seal one box, or every open box (``box=None``), in one go. Returns the boxes sealed.

        The daemon's front-ends use the three phases below instead, so that checksumming
        gigabytes runs in a worker thread while the loop keeps serving (and the watchdog
        keeps being fed); this is the same thing, synchronously.
        """
        plan = self.seal_begin(caller, box)
        try:
            plan.copy_guest_memfds()
            for item, d in zip(plan.items, digest_many([i.source for i in plan.items], self.verify)):
                item.digest = d
        except BaseException:
            self.seal_abort(plan)
            raise
        return self.seal_commit(plan)

    def seal_begin(self, caller: Caller, box: str | None = None) -> SealPlan:
        """Check everything, then freeze the boxes (no put/remove) and open each entry.

        Every entry is checked first, so a failure leaves nothing half-sealed. The plan
        holds one fd per memory entry for checksumming; :meth:`seal_commit` or
        :meth:`seal_abort` closes them.
        """
        if box is not None:
            targets = [self._box(box)]
            self._check_box_owner(caller, box)
            if targets[0].state == BoxState.SEALED or box in self._sealing:
                raise FdboxError("Sealed", f"box {box} is already sealed", box=box)
            if targets[0].state == BoxState.RESTORED:
                raise FdboxError("InvalidRequest", f"box {box} is restored: claim or finish it first", box=box)
        else:
            if not caller.is_root:
                raise FdboxError("PermissionDenied", "only root may seal every box")
            targets = [b for b in self.boxes.values() if b.state == BoxState.OPEN and b.name not in self._sealing]
        for b in targets:
            for e in b.entries.values():
                if e.type not in self.allowed_types:
                    raise FdboxError("UnsupportedType", f"{b.name}/{e.name} is {e.type}", box=b.name, name=e.name)
                if e.type == FdType.GUEST_MEMFD:
                    refusal = gmem.seal_refusal(b.name, e)
                    if refusal is not None:
                        raise refusal
                    if not self.backend.accepts(FdType.MEMFD):
                        raise FdboxError("UnsupportedType", f"the {self.backend.name} backend cannot carry memfd, "
                                         "which a guest_memfd is carried as", box=b.name, name=e.name, type=str(e.type))
                elif e.type in MEMORY_TYPES and not self.backend.accepts(e.type):
                    raise FdboxError("UnsupportedType", f"the {self.backend.name} backend cannot carry {e.type}",
                                     box=b.name, name=e.name, type=str(e.type))
        plan = SealPlan([b.name for b in targets])
        try:
            for b in targets:
                for e in sorted(b.entries.values(), key=lambda e: e.name):
                    if e.type in MEMORY_TYPES:
                        plan.items.append(SealItem(b.name, e.name, self._backend_for(e.type).get(b.name, e.name),
                                                   type=e.type))
        except BaseException:
            plan.close()
            raise
        self._sealing.update(plan.boxes)
        return plan

    def seal_commit(self, plan: SealPlan) -> list[str]:
        """Record the checksums, seal in the backend, write the manifest (and carry it)."""
        try:
            for item in plan.items:
                if item.digest is None:
                    raise FdboxError("InvalidRequest", f"{item.box}/{item.name} was not checksummed")
                entry = self.boxes[item.box].entries[item.name]
                entry.size, entry.sha256 = item.digest.size, item.digest.sha256
                extra = {k: v for k, v in entry.extra.items() if k != "sample"}
                if item.digest.sample is not None:
                    extra["sample"] = item.digest.sample
                entry.extra = extra  # assigned, not changed in place: see Entry.wire()
            for name in plan.boxes:
                for e in self.boxes[name].entries.values():
                    if e.type == FdType.TAP and "net" in e.extra:
                        e.extra = {**e.extra, "recreate": True}  # held, not carried: fdboxd.net recreates it
            sealed: list[str] = []
            carried: list[SealItem] = []
            try:
                for item in plan.items:  # guest_memfd copies are sealed with their box
                    if item.copy >= 0:
                        self.backend.put(item.box, gmem.carry_name(item.name), item.copy, detect(item.copy))
                        carried.append(item)
                        gmem.set_carried(self.boxes[item.box].entries[item.name], True)
                for name in plan.boxes:
                    self.backend.seal(name)
                    self._set_state(self.boxes[name], BoxState.SEALED)
                    sealed.append(name)
                self._record(self._box_ops(sealed))
                self._carry_manifest()
            except BaseException:
                for name in sealed:
                    self.backend.unseal(name)
                    self._set_state(self.boxes[name], BoxState.OPEN)
                for item in carried:
                    self._drop_copy(item.box, self.boxes[item.box].entries[item.name])
                self._record_or_log(self._box_ops(sealed))
                raise
        finally:
            self.seal_abort(plan)
        for name in sealed:
            self._emit(Event("state-changed", name, state=BoxState.SEALED))
        return sealed

    def seal_abort(self, plan: SealPlan) -> None:
        """Forget a plan: close its fds and let its boxes take puts again."""
        plan.close()
        self._sealing.difference_update(plan.boxes)

    def unseal(self, caller: Caller, box: str) -> None:
        b = self._box(box)
        self._check_box_owner(caller, box)
        if b.state != BoxState.SEALED:
            raise FdboxError("NotSealed", f"box {box} is {b.state}", box=box, state=str(b.state))
        self.backend.unseal(box)
        self._set_state(b, BoxState.OPEN)
        for e in b.entries.values():
            if gmem.is_carried(e):
                self._drop_copy(box, e)
        self._record_or_log(self._box_ops([box]))
        try:
            self._carry_manifest()
        except FdboxError:
            log.exception("could not rewrite the carried manifest after unsealing %s", box)
        self._emit(Event("state-changed", box, state=BoxState.OPEN))

    def finish(self, caller: Caller, box: str | None = None) -> list[str]:
        """End the restore phase: unclaimed entries of restored boxes are released."""
        if box is None and not caller.is_root:
            raise FdboxError("PermissionDenied", "only root may finish every box")
        targets = [self._box(box)] if box is not None else [b for b in self.boxes.values() if b.state == BoxState.RESTORED]
        for b in targets:
            self._check_box_owner(caller, b.name)
            if b.state != BoxState.RESTORED:
                raise FdboxError("InvalidRequest", f"box {b.name} is {b.state}, not restored", box=b.name)
        done = []
        ops: list[Op] = []
        for b in targets:
            for e in [e for e in b.entries.values() if not e.claimed]:
                self._drop(b, e.name)
                ops.append(["rm", b.name, e.name])
                self._emit(Event("entry-removed", b.name, entry=e))
            self._reopen(b)
            done.append(b.name)
        self._record_or_log(ops + self._box_ops(done))
        return done

    def owned_box(self, caller: Caller, box: str) -> Box:
        """The box, if the caller may act on it as a whole (its creator, or root)."""
        b = self._box(box)
        self._check_box_owner(caller, box)
        return b

    def rehold(self, box: str, entry: Entry, fd: int) -> None:
        """Hold a new file for an existing entry (a tap recreated after kexec).

        The old reference, if the backend still has one, is dropped first; front-ends
        that mirror held fds (the systemd fdstore) see a removal and an addition.
        """
        backend = self._backend_for(entry.type)
        if backend.inventory().get(box) is None:
            backend.create_box(box)
        try:
            backend.remove(box, entry.name)
        except FdboxError:
            pass  # nothing held: the usual case after kexec
        else:
            self._emit(Event("entry-removed", box, entry=entry))
        backend.put(box, entry.name, fd, detect(fd), entry.uid, entry.gid)
        self._emit(Event("entry-added", box, entry=entry, fd=fd))

    # ------------------------------------------------------------------ helpers

    def entry_count(self) -> int:
        return self._n_entries

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def _emit(self, event: Event) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a front-end's mirror must never undo a done change
                log.exception("event listener failed on %s", event.kind)

    def _box(self, box: str) -> Box:
        check_box_name(box)
        b = self.boxes.get(box)
        if b is None:
            raise FdboxError("NotFound", f"no box {box}", box=box)
        return b

    def _entry(self, box: str, name: str) -> Entry:
        b = self._box(box)
        check_entry_name(name)
        e = b.entries.get(name)
        if e is None:
            raise FdboxError("NotFound", f"no entry {box}/{name}", box=box, name=name)
        return e

    def _check_box_owner(self, caller: Caller, box: str) -> None:
        if not (caller.is_root or self.owners.get(box) == caller.uid):
            raise FdboxError("PermissionDenied", f"box {box} belongs to another user", box=box)

    def _check_fd(self, fd: int) -> FdInfo:
        try:
            info = detect(fd)
        except OSError as e:
            raise FdboxError("InvalidRequest", f"not a usable file descriptor: {e.strerror}") from e
        if info.type not in self.allowed_types:
            raise FdboxError("UnsupportedType", f"files of type {info.type} are not accepted", type=str(info.type))
        return info

    def _type_record(self, fd: int, info: FdInfo, caller: Caller) -> dict[str, Any]:
        """What a type records at put (``Entry.extra``): a tap's interface, a guest_memfd's access."""
        if info.type == FdType.GUEST_MEMFD:
            return gmem.record(fd, info)
        if info.type != FdType.TAP:
            return {}
        from . import net

        return {"net": net.record(fd, info, caller.pid)}

    def _check_metadata(self, metadata: object) -> None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise FdboxError("InvalidRequest", "metadata must map strings to strings")
        if len(metadata) > self.limits.max_metadata_keys:
            raise FdboxError("LimitExceeded", f"at most {self.limits.max_metadata_keys} metadata keys", limit="metadata")
        if sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items()) > self.limits.max_metadata_bytes:
            raise FdboxError("LimitExceeded", f"metadata over {self.limits.max_metadata_bytes} bytes", limit="metadata")

    def _backend_for(self, fd_type: FdType) -> Backend:
        return self.backend if self.backend.accepts(fd_type) else self.side

    def _create_box(self, box: str) -> None:
        self.backend.create_box(box)
        if self.side is not self.backend:
            self.side.create_box(box)
        self.boxes[box] = Box(box)
        self._n_state[BoxState.OPEN] += 1

    def _set_state(self, b: Box, state: BoxState) -> None:
        self._n_state[b.state] -= 1
        self._n_state[state] += 1
        b.state = state

    def _delete_box_backends(self, box: str) -> None:
        self.backend.delete_box(box)
        if self.side is not self.backend:
            self.side.delete_box(box)

    def _drop(self, b: Box, name: str) -> None:
        entry = b.entries.pop(name)
        self._n_entries -= 1
        if gmem.is_carried(entry):
            self._drop_copy(b.name, entry)
            if b.state == BoxState.RESTORED:
                return  # the guest_memfd itself died with the old kernel
        if entry.extra.get("recreate") and entry.type not in MEMORY_TYPES:
            try:
                self.side.remove(b.name, name)
            except FdboxError:
                pass  # recorded for recreation only, nothing held
            return
        self._backend_for(entry.type).remove(b.name, name)

    def _get_fd(self, b: Box, entry: Entry) -> int:
        """A new fd for the file an entry holds (refusing a guest_memfd known only by its copy)."""
        if b.state == BoxState.RESTORED and gmem.is_carried(entry):
            raise FdboxError(
                "InvalidRequest",
                f"{b.name}/{entry.name} is a guest_memfd carried across the live update as a copy: create a "
                f"new guest_memfd of {entry.size} bytes (GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED) "
                "and call RestoreInto",
                box=b.name, name=entry.name,
            )
        return self._backend_for(entry.type).get(b.name, entry.name)

    def _drop_copy(self, box: str, entry: Entry) -> None:
        """Release a guest_memfd's carried copy (fdboxd.gmem); it may be gone already."""
        gmem.set_carried(entry, False)
        try:
            self.backend.remove(box, gmem.carry_name(entry.name))
        except FdboxError:
            pass

    def _claim(self, b: Box, entries: list[Entry]) -> None:
        if b.state != BoxState.RESTORED:
            return
        for e in entries:
            e.claimed = True
        if all(e.claimed for e in b.entries.values()):
            self._reopen(b)
            self._record_or_log(self._box_ops([b.name]))
        else:
            self._record_or_log([entry_op(e) for e in entries])

    def _reopen(self, b: Box) -> None:
        self.backend.finish(b.name)
        self._set_state(b, BoxState.OPEN)
        for e in b.entries.values():
            e.claimed = False
        self._emit(Event("state-changed", b.name, state=BoxState.OPEN))

    def _manifest_data(self) -> ManifestData:
        return ManifestData(boxes=self.boxes, owners=self.owners, generation=self.generation)

    def _box_ops(self, names: Iterable[str]) -> list[Op]:
        """Journal ops that restate whole boxes (after a seal, a finish: O(those boxes))."""
        ops: list[Op] = []
        for name in names:
            b = self.boxes[name]
            ops.append(box_op(b, self.owners.get(name, 0)))
            ops.extend(entry_op(e) for e in b.entries.values())
        return ops

    def _record(self, ops: list[Op]) -> None:
        """Journal one change before it is reported done (see :mod:`fdboxd.manifest`)."""
        if self.manifest is None or not ops:
            return
        try:
            self.manifest.append(self.generation + 1, self._unrecorded + ops)
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"cannot write the manifest journal: {e.strerror}") from e
        self._unrecorded = []
        self.generation += 1

    def _record_or_log(self, ops: list[Op]) -> None:
        """Journal a change that already happened in the backend and cannot be undone."""
        try:
            self._record(ops)
        except FdboxError:
            self._unrecorded.extend(ops)
            log.exception("manifest journal write failed; the next successful write will include this change")

    def _save(self) -> None:
        if self.manifest is None:
            return
        data = self._manifest_data()
        try:
            self.manifest.save(data)
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"cannot write the manifest: {e.strerror}") from e
        self.generation = data.generation


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def file_digest(fd: int) -> tuple[int, str]:
    """Size and SHA-256 of the whole file behind ``fd`` (by pread: moves no cursor, maps nothing)."""
    return sha256_fd(fd)


async def seal_in_worker(
    store: Store, caller: Caller, box: str | None = None,
    progress: Callable[[SealItem, int, int], None] | None = None,
) -> list[str]:
    """:meth:`Store.seal` for the event loop: checksums run in worker threads.

    The loop stays free to serve other clients and feed the watchdog while gigabytes are
    read. The boxes are frozen (``seal_begin``) before the first byte is read, so nothing
    changes under the checksums. Entries are hashed in parallel (one thread per CPU);
    ``progress(item, done_bytes, total_bytes)`` is called on the loop after every chunk
    (:data:`fdboxd.checksum.CHUNK`), so a large entry shows movement while it is hashed.
    ``done``/``total`` count the bytes ``store.verify`` actually reads.
    """
    import asyncio

    plan = store.seal_begin(caller, box)
    try:
        loop = asyncio.get_running_loop()
        # guest_memfd first: its copy is what is checksummed and carried (fdboxd.gmem).
        await loop.run_in_executor(None, plan.copy_guest_memfds)
        total = sum(planned_bytes(os.fstat(i.source).st_size, store.verify) for i in plan.items)
        done = 0

        def report(i: int, n: int) -> None:  # worker thread, under digest_many's lock
            nonlocal done
            done += n
            if progress is not None:
                loop.call_soon_threadsafe(progress, plan.items[i], min(done, total), total)

        digests = await loop.run_in_executor(
            None, digest_many, [i.source for i in plan.items], store.verify, report)
        for item, d in zip(plan.items, digests):
            item.digest = d
        if progress is not None and plan.items and done < total:
            progress(plan.items[-1], total, total)  # a file that shrank still ends at 100%
    except BaseException:
        store.seal_abort(plan)
        raise
    return store.seal_commit(plan)
