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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import failpoints, timeline
from .checksum import Digest, Verify, check_fd, digest_many, planned_bytes, sha256_fd, workers
from .errors import FdboxError
from .fdtypes import detect
from .manifest import ManifestData, Op, decode, encode, entry_op, lost_op, lost_record
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
    """Record the checksums, seal in the backend, write the manifest (and carry it).

    What a failure at each step leaves (the failpoints name the steps): before the
    backend seals anything (``seal.before_preserve``), nothing sealed; after it, the
    seal is rolled back in reverse: each box sealed in the backend is unsealed
    (``seal.rollback``), the kinds' carried copies dropped, the boxes journalled open and
    the manifest carried again without them (a failure of that last write is logged: the
    next seal, unseal or start rewrites it). An unseal that fails during the rollback
    raises with that box still sealed in the backend; the next start lists it as the
    backend holds it. A daemon killed part-way leaves what the manifest recorded (the
    snapshot is written after the backend seals: ``seal.after_preserve``), and
    :func:`fdboxd.reconcile.reconcile` matches the backend to it at the next start.
    """
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
            if sealed:  # a manifest carried before the failure lists them: carried again without
                _carry_or_log(store, "after the failed seal")
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
    """Undo a seal: the backend releases the box (a LUO session dropped: unpreserved),
    then OPEN is journalled, then the carried manifest is rewritten without it.

    A release that fails raises with nothing changed in the store (the backend may have
    let part go: the next start lists the box as the backend holds it); so does a
    failure right after it (``unseal.after_release``), over a released box. Once released,
    the box is open in memory and a failed journal write is logged and kept for the next
    one (:meth:`~fdboxd.store.Store.record_or_log`). A failure rewriting the carried
    manifest is logged, never answered: it lists the box until the next seal, unseal or
    start rewrites it (after a kexec in between the box is not held, so not restored).
    """
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
    # Done: the box is open and so recorded. What follows cannot undo it, so a failure
    # there is logged, not answered (a restart writes the carried manifest again).
    try:
        failpoints.hit("unseal.after_journal")
        carry_manifest(store)
        failpoints.hit("unseal.after_carry")
    except (FdboxError, OSError) as e:
        log.error("box %s unsealed, but the carried manifest not rewritten (%s): it still lists the box "
                  "until the next seal, unseal or start rewrites it", box, e)
    store.emit(Event("state-changed", box, state=BoxState.OPEN))


def _carry_or_log(store: Store, when: str) -> None:
    """:func:`carry_manifest`, a failure logged (a restart writes it again)."""
    try:
        carry_manifest(store)
    except (FdboxError, OSError) as e:
        log.error("the carried manifest not rewritten %s (%s): the next seal, unseal or start rewrites it",
                  when, e)


def finish(store: Store, caller: Caller, box: str | None = None) -> list[str]:
    """End the restore phase: unclaimed entries of restored boxes are released.

    A box's owner may finish it only while every unclaimed entry in it is theirs (as
    DeleteBox): another user's restored memory is theirs to take, or root's to release
    (``PermissionDenied``). The whole change is journalled before anything is released,
    so a failed journal write is ``BackendUnavailable`` with nothing changed. Then each
    unclaimed entry is released: one the backend refuses stays, unclaimed, in the open
    box (logged, journalled again). Then the backend is told (FINISH): if it refuses,
    the box is restored again with its claims as they were (the unclaimed entries are
    gone already) and journalled so, and a Finish again completes it.
    """
    if box is None and not caller.is_root:
        raise FdboxError("PermissionDenied", "only root may finish every box")
    targets = [store.find_box(box)] if box is not None else [b for b in store.boxes.values() if b.state == BoxState.RESTORED]
    for b in targets:
        store.check_box_owner(caller, b.name)
        if b.state != BoxState.RESTORED:
            raise FdboxError("InvalidRequest", f"box {b.name} is {b.state}, not restored", box=b.name)
        others = sorted(e.name for e in b.entries.values() if not e.claimed and not e.owned_by(caller))
        if others:
            raise FdboxError("PermissionDenied", f"box {b.name} holds other users' unclaimed entries "
                             f"({', '.join(others)}): they take them back, or root finishes the box", box=b.name)
    plan: list[tuple[Box, list[Entry]]] = []
    undos: list[Callable[[], None]] = []
    ops: list[Op] = []
    for b in targets:
        unclaimed = [e for e in b.entries.values() if not e.claimed]
        undos.append(store.mark_reopened(b))
        ops += store.box_ops([b.name]) + [["rm", b.name, e.name] for e in unclaimed]
        plan.append((b, unclaimed))
    try:
        store.record(ops, fault=lambda: failpoints.hit("finish.journal"))
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise
    done = []
    for (b, unclaimed), undo in zip(plan, undos, strict=True):
        for e in unclaimed:
            try:
                failpoints.hit("finish.before_release")
                store.drop_entry(b, e.name)
            except (FdboxError, OSError):
                log.exception("finish %s: cannot release %s; it stays, unclaimed, in the open box", b.name, e.name)
                if e.name not in b.entries:
                    b.entries[e.name] = e
                    store.count_entry(e, +1)
                store.record_or_log([entry_op(e)])
                continue
            store.emit(Event("entry-removed", b.name, entry=e))
        try:
            store.finish_reopened(b)
        except BaseException:
            # The backend still has it restored: so does the store (its unclaimed entries are
            # gone already, the claimed stay claimed), and a Finish again completes it.
            undo()  # restored, its claims as they were
            store.record_or_log(store.box_ops([b.name]))
            raise
        done.append(b.name)
    return done


#: The key of ``Entry.extra`` on a restored entry whose check could not run (a resource
#: error: ENOMEM, EAGAIN, EBUSY...): why, and that Get retries it. Shown by List.
UNVERIFIED = "unverified"


def verify_restored(store: Store) -> list[dict[str, Any]]:
    """Check every restored entry against what was recorded when it was sealed.

    How much is read is ``store.verify`` (see :mod:`fdboxd.checksum`); entries are
    checked in parallel threads. Only a proven mismatch (size or checksum) drops an
    entry, reported in ``lost`` with the reason: handing a VM memory that changed under
    it is worse than handing none. An entry that cannot be checked now (its restore or
    read failed: ENOMEM with the hugetlb pool not reserved yet, EAGAIN, EBUSY...) is
    kept, restored, with ``extra["unverified"]`` saying why; a Get of it checks it again
    first (:func:`check_unverified`). Returns the entries dropped. A drop the backend
    refuses still takes the entry out of the store (it is reported lost, never handed
    out); the backend may then still hold the file, which a restart lists as adopted.
    """
    todo: list[tuple[Box, Entry]] = []
    for b in store.boxes.values():
        if b.state != BoxState.RESTORED:
            continue
        for e in sorted(b.entries.values(), key=lambda e: e.name):
            if _checkable(store, e):
                todo.append((b, e))
    return _check_entries(store, todo)[0]


def check_unverified(store: Store, b: Box, entries: list[Entry]) -> None:
    """Before a restored entry is handed out: check again those :func:`verify_restored`
    could not. Raises ``BackendUnavailable`` (nothing deleted: try again) while the
    error lasts, ``NotFound`` if the check now proves a mismatch (dropped, reported lost)."""
    if b.state != BoxState.RESTORED:
        return
    todo = [(b, e) for e in entries if UNVERIFIED in e.extra]
    if not todo:
        return
    failed, unverified = _check_entries(store, todo)
    if failed:
        r = failed[0]
        raise FdboxError("NotFound", f"{r['box']}/{r['name']} failed its check after the restore and was "
                         f"dropped: {r['reason']} (Status lists it as lost)", box=r["box"], name=r["name"])
    if unverified:
        e = unverified[0]
        raise FdboxError("BackendUnavailable", f"{b.name}/{e.name} is restored but not checked yet "
                         f"({e.extra[UNVERIFIED]}); nothing was deleted: try again", box=b.name, name=e.name)


def _checkable(store: Store, e: Entry) -> bool:
    return (store.kind(e.type).verifiable(e) and store.verify != Verify.NONE
            and (e.sha256 is not None or "sample" in e.extra))


def _check_entries(store: Store, todo: list[tuple[Box, Entry]]) -> tuple[list[dict[str, Any]], list[Entry]]:
    """Check restored entries: drop the proven mismatches (reported lost), mark the ones
    that could not be checked, clear the mark of those that pass. Returns (the lost
    records of the dropped, the entries left unverified)."""
    opened: list[tuple[Box, Entry, int]] = []
    errors: dict[tuple[str, str], str] = {}  # could not check: kept
    mismatches: dict[tuple[str, str], str] = {}  # proven: dropped
    for b, e in todo:
        try:
            failpoints.hit("restore.verify_get")
            opened.append((b, e, store.backend_for(e.type).get(b.name, e.name)))
        except (FdboxError, OSError) as err:
            errors[(b.name, e.name)] = f"cannot restore: {err}"
    try:
        results = _check_all([(fd, Digest(e.size, e.sha256, e.extra.get("sample"))) for _, e, fd in opened],
                             store.verify)
    finally:
        for _, _, fd in opened:
            os.close(fd)
    ops: list[Op] = []
    for (b, e, _), (mismatch, error) in zip(opened, results, strict=True):
        if mismatch is not None:
            mismatches[(b.name, e.name)] = mismatch
        elif error is not None:
            errors[(b.name, e.name)] = f"cannot read: {error}"
        elif UNVERIFIED in e.extra:
            e.extra = {k: v for k, v in e.extra.items() if k != UNVERIFIED}
            log.info("restored entry %s/%s checked now: it matches its seal", b.name, e.name)
            ops.append(entry_op(e))
    unverified = []
    for (box, name), why in sorted(errors.items()):
        e = store.boxes[box].entries[name]
        log.warning("restored entry %s/%s kept, not checked: %s; a Get checks it again", box, name, why)
        e.extra = {**e.extra, UNVERIFIED: f"{why}; kept, a Get checks it again"}
        ops.append(entry_op(e))
        unverified.append(e)
    failed = []
    for (box, name), problem in sorted(mismatches.items()):
        b = store.boxes[box]
        e = b.entries[name]
        log.error("restored entry %s/%s refused: %s", box, name, problem)
        report = lost_record(e, problem)
        failed.append(report)
        store.lost.append(report)
        failpoints.hit("restore.verify_drop")
        try:
            store.drop_entry(b, name)
        except FdboxError:
            if b.entries.pop(name, None) is not None:  # drop_entry fails after its pop, or before it
                store.count_entry(e, -1)
        ops.append(["rm", box, name])
    if failed:
        ops.append(lost_op(store.lost))
    if ops:
        store.record_or_log(ops)
    return failed, unverified


def _check_all(items: list[tuple[int, Digest]], mode: Verify) -> list[tuple[str | None, str | None]]:
    """:func:`~fdboxd.checksum.check_fd` for each, in parallel: (mismatch, error) each. A read
    that fails is an error (the entry is kept), not a mismatch."""
    def one(item: tuple[int, Digest]) -> tuple[str | None, str | None]:
        try:
            return check_fd(item[0], item[1], mode), None
        except OSError as e:
            return None, str(e)

    if not items:
        return []
    with ThreadPoolExecutor(workers(len(items)), thread_name_prefix="fdbox-check") as pool:
        return list(pool.map(one, items))


def carry_manifest(store: Store) -> None:
    """Put the manifest of every sealed box into the sealed set (kexec-capable backends).

    Drop before create (the carry box has one name): the one held is dropped first, then
    the new one is created, filled and sealed. A failure in between leaves no carried
    manifest (a half-made one is dropped) and raises: a seal then rolls back, an unseal
    or a start logs it, and the next seal, unseal or start writes it again. A kexec
    before that carries the sealed boxes without it: the state directory's manifest is
    then their only record of owners, metadata and checksums.
    """
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


def carried_boxes(store: Store) -> set[str] | None:
    """The boxes the carried manifest held now lists (empty: none is held; None: one is
    held that cannot be read)."""
    held = store.backend.inventory().get(CARRY_BOX)
    if held is None:
        return set()
    try:
        fd = store.backend.get(CARRY_BOX, CARRY_ENTRY)
        try:
            return set(decode(_read_fd(fd).rstrip(b"\0")).boxes)
        finally:
            os.close(fd)
    except (FdboxError, OSError) as e:
        log.warning("the carried manifest held is unreadable: %s", e)
        return None


def drop_carry_box(store: Store) -> None:
    """Release the carried manifest held now: unseal it (or FINISH it, restored), then
    delete its box. A failure between leaves the box held, open or finished: the next
    drop deletes it. One whose unseal failed stays sealed and crosses: after the kexec it
    is read as the carried manifest, though it may be older than the boxes it lists."""
    held = store.backend.inventory().get(CARRY_BOX)
    if held is None:
        return
    if held.state == BoxState.SEALED:
        store.backend.unseal(CARRY_BOX)
    elif held.state == BoxState.RESTORED:
        store.backend.finish(CARRY_BOX)
    store.backend.delete_box(CARRY_BOX)


def take_carried_manifest(store: Store, data: ManifestData, held: dict[str, Any]) -> ManifestData:
    """After kexec: the manifest that crossed with the data wins for restored boxes.

    Only read: the carried box stays held (restored) until :func:`release_carried`, once
    the daemon has started and written what it read into its own snapshot. A start that
    fails or dies before then (the state directory may not have survived the kexec, so
    the carried manifest is the only record of owners, metadata and checksums) leaves it
    for the next start to read again. An unreadable one is logged and left too."""
    try:
        fd = store.backend.get(CARRY_BOX, CARRY_ENTRY)
        try:
            carried = decode(_read_fd(fd).rstrip(b"\0"))  # a hugetlb carrier's padding
        finally:
            os.close(fd)
    except (FdboxError, OSError) as e:
        log.error("the manifest carried across kexec is unreadable: %s", e)
        return data
    for name, box in carried.boxes.items():
        hbox = held.get(name)
        if hbox is not None and hbox.state == BoxState.RESTORED:
            data.boxes[name] = box
            data.owners[name] = carried.owners.get(name, 0)
    log.info("restored the manifest of %d sealed boxes from the previous kernel", len(carried.boxes))
    return data


def release_carried(store: Store) -> None:
    """Once started (the reconciled snapshot written, every restored file where a restart
    finds it): drop the manifest that crossed the kexec (FINISH and DELETE_BOX on fdbox.ko).
    A failure is logged and changes nothing: the box stays held, and the next seal (which
    drops it before carrying its own) or a restart reads or drops it again. A kill before
    the drop leaves it to the next start, which reads it again (the same boxes, restored)."""
    held = store.backend.inventory().get(CARRY_BOX)
    if held is None or held.state != BoxState.RESTORED:
        return
    try:
        failpoints.hit("start.before_carry_drop")
        drop_carry_box(store)
    except (FdboxError, OSError) as e:
        log.error("the manifest carried across the kexec not released (%s): the next seal drops it", e)


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
