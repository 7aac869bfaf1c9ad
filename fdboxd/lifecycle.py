"""The seal/restore lifecycle: functions over a :class:`~fdboxd.store.Store`.

The store keeps the rules (who may put, get, remove; what a state allows); this module
moves boxes through their life around a kexec: ``seal_begin`` checks everything and
freezes the boxes, a worker checksums (:func:`seal_in_worker`), ``seal_commit`` records
the checksums, seals in the backend and carries the manifest of the sealed boxes inside
the sealed set (:data:`CARRY_BOX`); in the next kernel :func:`take_carried_manifest`
takes it back at start-up and :func:`verify_restored` checks every restored entry before
anyone may take it; ``unseal`` and ``finish`` end the cycle. :class:`Store` keeps methods
of the same names that call these, so front-ends and tests see one object.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import failpoints, timeline
from .checksum import Digest, Verify, check_many, digest_many, planned_bytes, sha256_fd
from .errors import FdboxError
from .fdtypes import detect
from .manifest import ManifestData, Op, decode, encode, lost_op, lost_record
from .model import Box, BoxState, Caller, Entry, Event, SealItem

if TYPE_CHECKING:
    from .kinds.base import StoreSurface as Store

log = logging.getLogger("fdboxd.lifecycle")

#: The box that carries the manifest of the sealed boxes across kexec, inside the sealed
#: set itself, so the next kernel's daemon learns owners, metadata and checksums even
#: when the state directory did not survive. Reserved: callers cannot name it.
CARRY_BOX = "fdboxd.manifest"
CARRY_ENTRY = "manifest.json"


@dataclass
class SealPlan:
    """What :func:`seal_begin` froze: boxes and one open fd per entry with bytes to seal."""

    boxes: list[str]
    items: list[SealItem] = field(default_factory=list)
    #: Each item's kind (the store's instances), so a worker thread needs no store.
    kinds: list[Any] = field(default_factory=list)

    def prepare(self) -> None:
        """Each kind's slow work before the checksum (a guest_memfd's copy): a worker runs it."""
        for item, kind in zip(self.items, self.kinds, strict=True):
            kind.prepare(item)

    def digest(self, verify: Verify, report: Callable[[int, int], None] | None = None) -> None:
        """Checksum every item's source, in parallel threads (slow: a worker runs it);
        ``report(item_index, nbytes)`` after every chunk (:func:`fdboxd.checksum.digest_many`)."""
        for item, d in zip(self.items, digest_many([i.source for i in self.items], verify, report), strict=True):
            item.digest = d

    def close(self) -> None:
        for item in self.items:
            if item.fd >= 0:
                os.close(item.fd)
                item.fd = -1
            if item.copy >= 0:
                os.close(item.copy)
                item.copy = -1


def seal(store: Store, caller: Caller, box: str | None = None) -> list[str]:
    """Seal one box, or every open box (``box=None``), in one go. Returns the boxes sealed.

    The daemon's front-ends use the three phases below instead, so that checksumming
    gigabytes runs in a worker thread while the loop keeps serving (and the watchdog
    keeps being fed); this is the same thing, synchronously.
    """
    plan = seal_begin(store, caller, box)
    try:
        plan.prepare()
        plan.digest(store.verify)
    except BaseException:
        seal_abort(store, plan)
        raise
    return seal_commit(store, plan)


def seal_begin(store: Store, caller: Caller, box: str | None = None) -> SealPlan:
    """Check everything, then freeze the boxes (no put/remove) and open each entry.

    Every entry is checked first, so a failure leaves nothing half-sealed. The plan
    holds one fd per memory entry for checksumming; :func:`seal_commit` or
    :func:`seal_abort` closes them.
    """
    if box is not None:
        targets = [store.find_box(box)]
        store.check_box_owner(caller, box)
        if targets[0].state == BoxState.SEALED or box in store.sealing:
            raise FdboxError("Sealed", f"box {box} is already sealed", box=box)
        if targets[0].state == BoxState.RESTORED:
            raise FdboxError("InvalidRequest", f"box {box} is restored: claim or finish it first", box=box)
    else:
        if not caller.is_root:
            raise FdboxError("PermissionDenied", "only root may seal every box")
        targets = [b for b in store.boxes.values() if b.state == BoxState.OPEN and b.name not in store.sealing]
    for b in targets:
        for e in b.entries.values():
            if e.type not in store.allowed_types:
                raise FdboxError("UnsupportedType", f"{b.name}/{e.name} is {e.type}", box=b.name, name=e.name)
            store.kind(e.type).check_seal(store, b.name, e)
    failpoints.hit("seal.begin")
    plan = SealPlan([b.name for b in targets])
    try:
        for b in targets:
            for e in sorted(b.entries.values(), key=lambda e: e.name):
                kind = store.kind(e.type)
                fd = kind.seal_fd(store, b.name, e)
                if fd is not None:
                    plan.items.append(SealItem(b.name, e.name, fd, type=e.type))
                    plan.kinds.append(kind)
    except BaseException:
        plan.close()
        raise
    store.sealing.update(plan.boxes)
    for b in targets:
        timeline.mark(b, "seal_begin")
    return plan


def seal_commit(store: Store, plan: SealPlan) -> list[str]:
    """Record the checksums, seal in the backend, write the manifest (and carry it)."""
    try:
        for item in plan.items:
            if item.digest is None:
                raise FdboxError("InvalidRequest", f"{item.box}/{item.name} was not checksummed")
            entry = store.boxes[item.box].entries[item.name]
            store.resize(entry, item.digest.size)
            entry.sha256 = item.digest.sha256
            extra = {k: v for k, v in entry.extra.items() if k != "sample"}
            if item.digest.sample is not None:
                extra["sample"] = item.digest.sample
            entry.extra = extra  # assigned, not changed in place: see Entry.wire()
        for name in plan.boxes:
            for e in store.boxes[name].entries.values():
                store.kind(e.type).freeze(e)
        sealed: list[str] = []
        carried: list[tuple[SealItem, Any]] = []
        try:
            failpoints.hit("seal.before_preserve")
            for item, kind in zip(plan.items, plan.kinds, strict=True):  # what crosses instead, sealed with its box
                if kind.carry(store, item, store.boxes[item.box].entries[item.name]):
                    carried.append((item, kind))
            for name in plan.boxes:
                store.backend.seal(name)
                store.set_state(store.boxes[name], BoxState.SEALED)
                sealed.append(name)
                failpoints.hit("seal.after_preserve")
            for name in plan.boxes:  # before the snapshot: the times cross the kexec with it
                timeline.mark(store.boxes[name], "seal_end")
            # A seal writes the whole snapshot (temp, fsync, rename), not a journal line:
            # a kexec follows, and a state directory that cannot take the sealed manifest
            # must refuse the seal (and so the kexec) rather than half-record it. A line
            # appended to a full file system can still fit in the journal's last page.
            store.save_snapshot()
            failpoints.hit("seal.after_manifest")
            carry_manifest(store)
            failpoints.hit("seal.after_carry")
        except BaseException:
            for name in sealed:
                failpoints.hit("seal.rollback")
                store.backend.unseal(name)
                store.set_state(store.boxes[name], BoxState.OPEN)
            for item, kind in carried:
                kind.unfreeze(store, item.box, store.boxes[item.box].entries[item.name])
            store.record_or_log(store.box_ops(sealed))
            raise
    finally:
        seal_abort(store, plan)
    for name in sealed:
        store.emit(Event("state-changed", name, state=BoxState.SEALED))
    return sealed


def seal_abort(store: Store, plan: SealPlan) -> None:
    """Forget a plan: close its fds and let its boxes take puts again."""
    plan.close()
    store.sealing.difference_update(plan.boxes)


def unseal(store: Store, caller: Caller, box: str) -> None:
    b = store.find_box(box)
    store.check_box_owner(caller, box)
    if b.state != BoxState.SEALED:
        raise FdboxError("NotSealed", f"box {box} is {b.state}", box=box, state=str(b.state))
    failpoints.hit("unseal.begin")
    store.backend.unseal(box)
    failpoints.hit("unseal.after_release")
    store.set_state(b, BoxState.OPEN)
    timeline.mark(b, "unsealed")
    for e in b.entries.values():
        store.kind(e.type).unfreeze(store, box, e)
    store.record_or_log(store.box_ops([box]))
    failpoints.hit("unseal.after_journal")
    try:
        carry_manifest(store)
    except FdboxError:
        log.exception("could not rewrite the carried manifest after unsealing %s", box)
    failpoints.hit("unseal.after_carry")
    store.emit(Event("state-changed", box, state=BoxState.OPEN))


def finish(store: Store, caller: Caller, box: str | None = None) -> list[str]:
    """End the restore phase: unclaimed entries of restored boxes are released."""
    if box is None and not caller.is_root:
        raise FdboxError("PermissionDenied", "only root may finish every box")
    targets = [store.find_box(box)] if box is not None else [b for b in store.boxes.values() if b.state == BoxState.RESTORED]
    for b in targets:
        store.check_box_owner(caller, b.name)
        if b.state != BoxState.RESTORED:
            raise FdboxError("InvalidRequest", f"box {b.name} is {b.state}, not restored", box=b.name)
    done = []
    ops: list[Op] = []
    for b in targets:
        for e in [e for e in b.entries.values() if not e.claimed]:
            store.drop_entry(b, e.name)
            ops.append(["rm", b.name, e.name])
            store.emit(Event("entry-removed", b.name, entry=e))
        store.reopen(b)
        done.append(b.name)
    store.record_or_log(ops + store.box_ops(done))
    return done


def verify_restored(store: Store) -> list[dict[str, Any]]:
    """Check every restored entry against what was recorded when it was sealed.

    How much is read is ``store.verify`` (see :mod:`fdboxd.checksum`); entries are
    checked in parallel threads. An entry that does not match is dropped and
    reported in ``lost`` with the reason: handing a VM memory that changed under it
    is worse than handing none. Returns the entries that failed.
    """
    todo: list[tuple[Box, Entry, int]] = []
    problems: dict[tuple[str, str], str] = {}
    for b in store.boxes.values():
        if b.state != BoxState.RESTORED:
            continue
        for e in sorted(b.entries.values(), key=lambda e: e.name):
            if (not store.kind(e.type).verifiable(e) or store.verify == Verify.NONE
                    or (e.sha256 is None and "sample" not in e.extra)):
                continue  # nothing to check against (getting it would restore it early)
            try:
                todo.append((b, e, store.backend_for(e.type).get(b.name, e.name)))
            except (FdboxError, OSError) as err:
                problems[(b.name, e.name)] = f"cannot restore: {err}"
    try:
        results = check_many([(fd, Digest(e.size, e.sha256, e.extra.get("sample"))) for _, e, fd in todo],
                             store.verify)
    finally:
        for _, _, fd in todo:
            os.close(fd)
    for (b, e, _), problem in zip(todo, results):
        if problem is not None:
            problems[(b.name, e.name)] = problem
    failed = []
    for (box, name), problem in sorted(problems.items()):
        b = store.boxes[box]
        e = b.entries[name]
        log.error("restored entry %s/%s refused: %s", box, name, problem)
        report = lost_record(e, problem)
        failed.append(report)
        store.lost.append(report)
        try:
            store.drop_entry(b, name)
        except FdboxError:
            if b.entries.pop(name, None) is not None:  # drop_entry fails after its pop, or before it
                store.count_entry(e, -1)
    if failed:
        store.record_or_log([["rm", r["box"], r["name"]] for r in failed] + [lost_op(store.lost)])
    return failed


def carry_manifest(store: Store) -> None:
    """Put the manifest of every sealed box into the sealed set (kexec-capable backends)."""
    if not store.backend.survives_kexec:
        return
    drop_carry_box(store)
    sealed = {n: b for n, b in store.boxes.items() if b.state == BoxState.SEALED}
    if not sealed:
        return
    raw = encode(ManifestData(boxes=sealed, owners={n: store.owners.get(n, 0) for n in sealed},
                              generation=store.generation))
    fd = store.backend.manifest_memfd(raw)
    try:
        store.backend.create_box(CARRY_BOX)
        store.backend.put(CARRY_BOX, CARRY_ENTRY, fd, detect(fd))
        store.backend.seal(CARRY_BOX)
    except BaseException:
        drop_carry_box(store)
        raise
    finally:
        os.close(fd)


def drop_carry_box(store: Store) -> None:
    held = store.backend.inventory().get(CARRY_BOX)
    if held is None:
        return
    if held.state == BoxState.SEALED:
        store.backend.unseal(CARRY_BOX)
    elif held.state == BoxState.RESTORED:
        store.backend.finish(CARRY_BOX)
    store.backend.delete_box(CARRY_BOX)


def take_carried_manifest(store: Store, data: ManifestData, held: dict[str, Any]) -> ManifestData:
    """After kexec: the manifest that crossed with the data wins for restored boxes."""
    try:
        fd = store.backend.get(CARRY_BOX, CARRY_ENTRY)
        try:
            carried = decode(_read_fd(fd).rstrip(b"\0"))  # a hugetlb carrier's padding
        finally:
            os.close(fd)
    except (FdboxError, OSError) as e:
        log.error("the manifest carried across kexec is unreadable: %s", e)
        return data
    finally:
        drop_carry_box(store)
    for name, box in carried.boxes.items():
        hbox = held.get(name)
        if hbox is not None and hbox.state == BoxState.RESTORED:
            data.boxes[name] = box
            data.owners[name] = carried.owners.get(name, 0)
    log.info("restored the manifest of %d sealed boxes from the previous kernel", len(carried.boxes))
    return data


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
    """:func:`seal` for the event loop: checksums run in worker threads.

    The loop stays free to serve other clients and feed the watchdog while gigabytes are
    read. The boxes are frozen (``seal_begin``) before the first byte is read, so nothing
    changes under the checksums. Entries are hashed in parallel (one thread per CPU);
    ``progress(item, done_bytes, total_bytes)`` is called on the loop after every chunk
    (:data:`fdboxd.checksum.CHUNK`), so a large entry shows movement while it is hashed.
    ``done``/``total`` count the bytes ``store.verify`` actually reads.
    """
    import asyncio

    plan = seal_begin(store, caller, box)
    try:
        loop = asyncio.get_running_loop()
        # The kinds' slow part first (a guest_memfd's copy is what is checksummed and carried).
        await loop.run_in_executor(None, plan.prepare)
        total = sum(planned_bytes(os.fstat(i.source).st_size, store.verify) for i in plan.items)
        done = 0

        def report(i: int, n: int) -> None:  # worker thread, under digest_many's lock
            nonlocal done
            done += n
            if progress is not None:
                loop.call_soon_threadsafe(progress, plan.items[i], min(done, total), total)

        await loop.run_in_executor(None, plan.digest, store.verify, report)
        if progress is not None and plan.items and done < total:
            progress(plan.items[-1], total, total)  # a file that shrank still ends at 100%
    except BaseException:
        seal_abort(store, plan)
        raise
    return seal_commit(store, plan)
