"""guest_memfd: held as is, carried across a kexec as a copy, restored into a new one.

The mechanics (copying through a mapping without touching it from Python, the populated
pages, RestoreInto's three phases) are :mod:`fdboxd.gmem`; this is the contract, step by
step:

- put: record whether the host can read it (``extra["guest_memfd"]["shared"]``); entry
  names under :data:`fdboxd.gmem.CARRY_PREFIX` are reserved for the copies;
- seal: refuse a private one, and a backend that cannot carry the memfd copy; in the
  worker, copy it into a memfd (:meth:`prepare`); at commit put the copy into the box
  under its reserved name and mark the entry carried (:meth:`carry`); undone by
  :meth:`unfreeze` (a late failure, Unseal);
- start-up after a kexec: the entry is not held (the guest_memfd died with the old
  kernel) but its copy is: kept, for RestoreInto;
- start-up while sealed (a daemon restart, nothing kept the daemon's reference): the
  entry is not held but its copy is: kept, marked copy-only (:data:`fdboxd.gmem.COPY_ONLY`,
  in List, and a line of Status ``problems``); Unseal keeps that copy, the only one;
  RestoreInto (also on the box once open again) fills a new guest_memfd from it; a seal
  refuses the entry until then;
- restore check: the copy is checked by RestoreInto before it copies, not at start-up;
- Get on a carried, restored or copy-only entry: refused, with how to call RestoreInto;
- remove/finish: drop the copy too.

Its state — which entries a RestoreInto is copying right now — is :attr:`busy`, on the
store's instance of this kind.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import gmem
from ..checksum import Digest, check_fd
from ..errors import FdboxError
from ..fdtypes import FdInfo, FdType, detect, detect_or_refuse
from ..model import Box, BoxState, Caller, Entry, SealItem
from .base import Kind, Preflight, check_sealable, register

if TYPE_CHECKING:
    from ..backends.base import BackendBox
    from .base import StoreSurface

log = logging.getLogger("fdboxd.gmem")


@register
class GuestMemfdKind(Kind):
    types = frozenset({FdType.GUEST_MEMFD})
    mapped_by_vmm = False  # KVM maps it, not the VMM's address space

    def __init__(self) -> None:
        #: (box, name) of the entries a RestoreInto is filling (one at a time each).
        self.busy: set[tuple[str, str]] = set()
        #: (box, name) -> uid of the copy-only entries (see the module docstring), for Status.
        self.copy_only: dict[tuple[str, str], int] = {}

    def reserves(self, name: str) -> str | None:
        if gmem.is_carry_name(name):
            return f"entry names starting with {gmem.CARRY_PREFIX} are reserved for fdboxd"
        return None

    def record(self, fd: int, info: FdInfo, caller: Caller) -> dict[str, Any]:
        return gmem.record(fd, info)

    def check_seal(self, store: StoreSurface, box: str, entry: Entry) -> None:
        if gmem.is_copy_only(entry):
            raise FdboxError("InvalidRequest", f"{box}/{entry.name}: only the copy carried since an earlier seal "
                             "is held (the guest_memfd itself was gone at start-up): RestoreInto a new "
                             "guest_memfd, or remove the entry, then seal", box=box, name=entry.name)
        refusal = gmem.seal_refusal(box, entry)
        if refusal is not None:
            raise refusal
        if not store.backend.accepts(FdType.MEMFD):
            raise FdboxError("UnsupportedType", f"the {store.backend.name} backend cannot carry memfd, "
                             "which a guest_memfd is carried as", box=box, name=entry.name, type=str(entry.type))
        check_sealable(store, box, entry, FdType.MEMFD)

    def preflight(self, box: str, entry: Entry, state: BoxState, seals: int | None,
                  page_size: int | None) -> Preflight:
        if gmem.is_copy_only(entry) and state == BoxState.OPEN:
            return Preflight(problems=[("InvalidRequest", "is held only as the copy an earlier seal carried "
                                        "(its guest_memfd was gone at start-up), which a seal cannot take",
                                        "RestoreInto a new guest_memfd, or remove the entry")])
        if gmem.is_copy_only(entry):
            return Preflight(carrier=FdType.MEMFD, via_luo=True)  # sealed: the copy crosses
        refusal = gmem.seal_refusal(box, entry)
        if refusal is not None:
            return Preflight(problems=[("UnsupportedType", refusal.message.removeprefix(f"{box}/{entry.name} "),
                                        "create it with GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED, "
                                        "or stop this VM before the kexec (its memory cannot be carried)")])
        # carried as a memfd copy, made at seal (so it takes memory only while the box is open)
        return Preflight(carrier=FdType.MEMFD, via_luo=True, copy_bytes=entry.size if state == BoxState.OPEN else 0)

    def prepare(self, item: SealItem) -> None:
        if item.copy < 0:
            item.copy = gmem.copy_out(item.fd, f"{item.box}/{item.name}")

    def carry(self, store: StoreSurface, item: SealItem, entry: Entry) -> bool:
        if item.copy < 0:
            return False
        store.backend.put(item.box, gmem.carry_name(item.name), item.copy, detect(item.copy))
        gmem.set_carried(entry, True)
        return True

    def unfreeze(self, store: StoreSurface, box: str, entry: Entry) -> None:
        """Release the carried copy (a late seal failure, Unseal); it may be gone already.
        Kept while it is the only copy (copy-only: the guest_memfd itself is gone)."""
        if gmem.is_carried(entry) and not gmem.is_copy_only(entry):
            self.drop_copy(store, box, entry)

    def drop_copy(self, store: StoreSurface, box: str, entry: Entry) -> None:
        """Release the carried copy, the only one or not (Remove, Finish, a RestoreInto done)."""
        if not gmem.is_carried(entry):
            return
        gmem.set_carried(entry, False)
        self.copy_only.pop((box, entry.name), None)
        store.backend.discard(box, gmem.carry_name(entry.name))

    def kept_elsewhere(self, entry: Entry, held: BackendBox | None) -> bool:
        """Kept if its carried copy is held. In a box that is not restored the guest_memfd
        should be held too: without it the copy is the only one, and the entry is marked so."""
        if held is None or not gmem.is_carried(entry) or gmem.carry_name(entry.name) not in held.entries:
            return False
        if held.state != BoxState.RESTORED:
            gmem.set_copy_only(entry, True)
            self.copy_only[(entry.box, entry.name)] = entry.uid
            log.warning("%s/%s: the guest_memfd is gone (fdboxd restarted while its box was %s); the copy "
                        "carried since the seal is the only one, kept: RestoreInto takes it back",
                        entry.box, entry.name, held.state)
        return True

    def problems(self, store: StoreSurface, caller: Caller | None) -> list[str]:
        out = []
        for (box, name), uid in sorted(self.copy_only.items()):
            b = store.boxes.get(box)
            e = b.entries.get(name) if b is not None else None
            if e is None or not gmem.is_copy_only(e):
                del self.copy_only[(box, name)]  # gone another way (DeleteBox)
            elif caller is None or caller.is_root or caller.uid == uid:
                out.append(f"{box}/{name}: only the copy carried since the seal is held (the guest_memfd was "
                           "gone at start-up): RestoreInto a new guest_memfd")
        return out

    def verifiable(self, entry: Entry) -> bool:
        return not gmem.is_carried(entry)  # the copy is checked by RestoreInto, before it copies

    def retrieve(self, store: StoreSurface, b: Box, entry: Entry) -> int:
        self._check_retrievable(b, entry)
        return super().retrieve(store, b, entry)

    def lend(self, store: StoreSurface, b: Box, entry: Entry) -> int | None:
        self._check_retrievable(b, entry)
        return super().lend(store, b, entry)

    def lend_many(self, store: StoreSurface, b: Box, entries: list[Entry]) -> list[int] | None:
        for e in entries:
            self._check_retrievable(b, e)
        return super().lend_many(store, b, entries)

    @staticmethod
    def _check_retrievable(b: Box, entry: Entry) -> None:
        if (b.state == BoxState.RESTORED and gmem.is_carried(entry)) or gmem.is_copy_only(entry):
            raise FdboxError(
                "InvalidRequest",
                f"{b.name}/{entry.name} is a guest_memfd carried across the live update as a copy: create a "
                f"new guest_memfd of {entry.size} bytes (GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED) "
                "and call RestoreInto",
                box=b.name, name=entry.name,
            )

    async def restore_into_in_worker(self, store: StoreSurface, caller: Caller, box: str, name: str,
                                     fd: int) -> Entry:
        """``RestoreInto``: fill the caller's new guest_memfd from the carried copy (a worker copies)."""
        return await restore_into_in_worker(store, caller, box, name, fd)

    def release(self, store: StoreSurface, b: Box, entry: Entry) -> None:
        if gmem.is_carried(entry):
            # Carried and not sealed means restored: Finish reopens the box (journalled first)
            # before it releases, and Unseal drops the copy and the mark, so an open box holds
            # a carried entry only then. Its guest_memfd died with the old kernel.
            gone = b.state != BoxState.SEALED or gmem.is_copy_only(entry)
            self.drop_copy(store, b.name, entry)
            if gone:
                return  # the guest_memfd itself died with the old kernel (or the old daemon)
        super().release(store, b, entry)


def of(store: StoreSurface) -> GuestMemfdKind:
    """The store's instance of this kind (for the front-ends' requests that only it serves)."""
    kind = store.kind(FdType.GUEST_MEMFD)
    assert isinstance(kind, GuestMemfdKind)
    return kind


# ---------------------------------------------------------------------- RestoreInto
#
# Three phases over a Store, like sealing (fdboxd.lifecycle.seal_in_worker): check and
# reserve on the daemon's loop, copy in a worker thread, then record on the loop.

@dataclass
class RestorePlan:
    store: StoreSurface
    box: str
    entry: Entry
    target: int  # a dup of the caller's guest_memfd, owned by the plan
    sealed: bool  # a rehearsal on a sealed box: nothing in the box changes
    #: A new fd of the carried copy, made on the loop (the backend's own fd may be
    #: closed there by a Remove or Finish while the worker copies): the plan's, the
    #: worker closes it (:func:`restore_copy`), else :func:`restore_abort`.
    source: int = -1

    @property
    def key(self) -> tuple[str, str]:
        return (self.box, self.entry.name)


def restore_begin(store: StoreSurface, caller: Caller, box: str, name: str, fd: int) -> RestorePlan:
    """Check everything RestoreInto needs, before any byte moves; reserve the entry."""
    entry = store.find_entry(box, name, caller)  # another user's: NotFound, as if missing
    if entry.type != FdType.GUEST_MEMFD:
        raise FdboxError("UnsupportedType", f"{box}/{name} is {entry.type}, not a guest_memfd: use Get",
                         box=box, name=name, type=str(entry.type))
    b = store.boxes[box]
    if b.state == BoxState.OPEN and not gmem.is_copy_only(entry):
        raise FdboxError("NotSealed", f"box {box} is open: no copy was carried (Seal takes it); Get returns "
                         "the guest_memfd itself", box=box, state=str(b.state))
    if not gmem.is_carried(entry):
        raise FdboxError("InvalidRequest", f"{box}/{name} was restored already: Get it", box=box, name=name)
    if (box, name) in of(store).busy:
        raise FdboxError("InvalidRequest", f"{box}/{name} is being restored by another call", box=box, name=name)
    info = detect_or_refuse(fd)
    if info.type != FdType.GUEST_MEMFD:
        raise FdboxError("UnsupportedType", f"the target is {info.type}, not a guest_memfd", type=str(info.type))
    if info.size != entry.size:
        raise FdboxError("InvalidRequest", f"the target guest_memfd has {info.size} bytes, {box}/{name} "
                         f"{entry.size}: create it with the entry's size", box=box, name=name)
    try:
        source = store.backend.get(box, gmem.carry_name(name))
    except FdboxError as e:
        raise FdboxError("NotFound", f"the copy of {box}/{name} carried since seal is gone ({e.message})",
                         box=box, name=name) from None
    try:
        target = os.dup(fd)
    except BaseException:
        os.close(source)
        raise
    plan = RestorePlan(store, box, entry, target, sealed=b.state == BoxState.SEALED, source=source)
    of(store).busy.add(plan.key)
    return plan


def restore_copy(plan: RestorePlan) -> str | None:
    """The worker's part: check the carried copy against the seal, fill the target.

    It touches only the plan's own fds (made on the loop by :func:`restore_begin`), never
    the backend, and closes the plan's copy fd when done. Returns None, or why the copy
    failed its check (then the target was not touched).
    """
    what = f"{plan.box}/{plan.entry.name}"
    source, plan.source = plan.source, -1
    try:
        e = plan.entry
        sample = e.extra.get("sample")
        problem = check_fd(source, Digest(e.size, e.sha256, sample if isinstance(sample, str) else None),
                           plan.store.verify)
        if problem is None:
            gmem.fill(plan.target, source, e.size, what)
        return problem
    finally:
        os.close(source)


def restore_commit(plan: RestorePlan, problem: str | None) -> Entry:
    """Record the outcome; in a restored box the entry then holds the new guest_memfd."""
    store, entry = plan.store, plan.entry
    try:
        b = store.boxes.get(plan.box)
        if b is None or b.entries.get(entry.name) is not entry or (b.state == BoxState.SEALED) != plan.sealed:
            # Finished, deleted or unsealed while the copy ran: the target holds the
            # copied bytes but the entry is no longer there to take it.
            raise FdboxError("NotFound", f"{plan.box}/{entry.name} changed while it was being restored",
                             box=plan.box, name=entry.name)
        if problem is not None:
            problem = f"the carried copy fails its check ({problem}); the target was not written"
            if not plan.sealed:
                log.error("restored entry %s/%s refused: %s", plan.box, entry.name, problem)
                store.lost.append({"box": plan.box, "name": entry.name, "type": str(entry.type), "reason": problem})
                store.drop_entry(b, entry.name)
                store.record_or_log([["rm", plan.box, entry.name]])
            raise FdboxError("BackendUnavailable", f"{plan.box}/{entry.name}: {problem}", box=plan.box, name=entry.name)
        if plan.sealed:
            return entry  # a rehearsal: the box keeps the original and its copy
        store.rehold(plan.box, entry, plan.target)
        of(store).drop_copy(store, plan.box, entry)
        entry.extra = {**entry.extra, gmem.EXTRA: {**gmem.extra_of(entry.extra), "shared": True}}
        store.claim(b, [entry])
        return entry
    finally:
        restore_abort(plan)


def restore_abort(plan: RestorePlan) -> None:
    if plan.target >= 0:
        os.close(plan.target)
        plan.target = -1
    if plan.source >= 0:  # the worker never ran
        os.close(plan.source)
        plan.source = -1
    of(plan.store).busy.discard(plan.key)


def restore_into(store: StoreSurface, caller: Caller, box: str, name: str, fd: int) -> Entry:
    """Fill the caller's new guest_memfd ``fd`` with ``box/name``'s carried bytes, synchronously."""
    plan = restore_begin(store, caller, box, name, fd)
    try:
        problem = restore_copy(plan)
    except BaseException:
        restore_abort(plan)
        raise
    return restore_commit(plan, problem)


async def restore_into_in_worker(store: StoreSurface, caller: Caller, box: str, name: str, fd: int) -> Entry:
    """:func:`restore_into` for the event loop: the copy runs in a worker thread."""
    import asyncio

    plan = restore_begin(store, caller, box, name, fd)
    try:
        problem = await asyncio.get_running_loop().run_in_executor(None, restore_copy, plan)
    except BaseException:
        restore_abort(plan)
        raise
    return restore_commit(plan, problem)
