"""Start-up reconciliation: the backends say what exists, the manifest who owns it.

One function over a :class:`~fdboxd.store.Store`, run once when the store is built:
entries the manifest names but no backend holds are reported in ``store.lost``;
entries a backend holds that the manifest does not know are adopted
(``store.adopted``); after a kexec, the manifest carried in the sealed set wins for the
restored boxes (:func:`fdboxd.lifecycle.take_carried_manifest`). The reconciled state is
written as a fresh snapshot before the daemon serves anyone.

Nothing is released here that a failed start would need again: the carried manifest is
only read (:meth:`fdboxd.store.Store.started` drops it once the daemon has started) and
LUO FINISHes nothing before then. A start that fails or dies during reconciliation (the
snapshot cannot be written, a kill at ``reconcile.after_carried_read``) leaves the
backends as it found them, apart from the LUO sessions of boxes the manifest has open,
which :func:`_match_preserved` has released (their files are the open boxes', held).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import failpoints
from .errors import FdboxError
from .lifecycle import CARRY_BOX, carried_boxes, carry_manifest, take_carried_manifest
from .manifest import ManifestData, lost_record
from .model import Box, BoxState, Entry

if TYPE_CHECKING:
    from .kinds.base import StoreSurface as Store

log = logging.getLogger("fdboxd.reconcile")


def reconcile(store: Store, data: ManifestData) -> None:
    """Believe the backends for what exists, the manifest for who owns it."""
    # What the manifest recorded sealed, before the backends' view changes it: a LUO
    # session of such a box may hold the only copy of its files (no fd store gave them back).
    recorded = {n for n, b in data.boxes.items() if b.state == BoxState.SEALED}
    held = dict(store.backend.inventory())
    carried = held.pop(CARRY_BOX, None)
    if carried is not None and carried.state == BoxState.RESTORED:
        data = take_carried_manifest(store, data, held)
        failpoints.hit("reconcile.after_carried_read")
    if store.side is not store.backend:
        for name, sbox in store.side.inventory().items():
            held.setdefault(name, sbox).entries.update(sbox.entries)
    store.generation = data.generation
    store.lost = [dict(r) for r in data.lost]  # unacknowledged losses of earlier runs
    for name, box in data.boxes.items():
        hbox = held.get(name)
        for ename, entry in list(box.entries.items()):
            if hbox is not None and ename in hbox.entries:
                entry.size = hbox.entries[ename].size
                continue
            if store.kind(entry.type).kept_elsewhere(entry, hbox):
                continue  # a tap to recreate, a guest_memfd carried as a copy (fdboxd.kinds)
            del box.entries[ename]
            store.lost.append(lost_record(entry, "no backend held it at start-up"))
            log.warning("entry %s/%s is in the manifest but no backend holds it", name, ename)
        if hbox is not None:
            box.state = hbox.state
        elif not box.entries and not any(r["box"] == name for r in store.lost):
            log.warning("box %s is in the manifest but no backend holds it", name)
            continue
        elif not box.entries:
            # Its entries are lost: the box (empty, open) stays its owner's until they
            # acknowledge the loss, so nobody else can take the VM's name meanwhile.
            store.create_box_backends(name)
            box.state = BoxState.OPEN
        store.boxes[name] = box
        store.owners[name] = data.owners.get(name, 0)
    for name, hbox in held.items():
        box = store.boxes.get(name)
        if box is None:
            box = store.boxes[name] = Box(name, hbox.state)
            uids = {he.uid for he in hbox.entries.values()}
            store.owners[name] = uids.pop() if len(uids) == 1 else 0
        for ename, he in hbox.entries.items():
            if ename not in box.entries and not store.kinds.reserved(ename):
                box.entries[ename] = Entry(name, ename, he.type, he.size, he.uid, he.gid)
                store.adopted.append({"box": name, "name": ename, "type": str(he.type), "uid": he.uid})
                log.warning("adopted %s/%s (uid %d) held by the backend but not in the manifest",
                            name, ename, he.uid)
    store.recount()
    _match_preserved(store, recorded)
    if store.manifest is not None:
        store.save_snapshot()
        store.manifest.open()


def _match_preserved(store: Store, recorded: set[str]) -> None:
    """What crosses the next kexec is what the manifest says is sealed, nothing else.

    The last daemon may have died (or failed) between preserving and recording: a
    session of a box recorded open, an index or a carried manifest listing boxes no
    longer sealed, or no carried manifest at all. The backend releases what no box
    sealed or ``recorded`` sealed accounts for (the files stay in the open box) and
    rewrites its index; the carried manifest is written again from the reconciled boxes
    when it lists others. A box recorded sealed whose files came back from nowhere but
    its session (no fd store) keeps that session, and the carried manifest is left as
    found. A failure is logged: the next seal or unseal rewrites both.
    """
    sealed = {n for n, b in store.boxes.items() if b.state == BoxState.SEALED}
    keep = sealed | recorded
    store.backend.reconciled(keep | ({CARRY_BOX} if keep else set()))
    incoming = store.backend.inventory().get(CARRY_BOX)
    if incoming is not None and incoming.state == BoxState.RESTORED:
        return  # the manifest that crossed the kexec: dropped once started (lifecycle.release_carried)
    if not store.backend.survives_kexec or not recorded <= sealed or carried_boxes(store) == sealed:
        return
    try:
        carry_manifest(store)
    except (FdboxError, OSError) as e:
        log.error("the carried manifest not rewritten at start-up (%s): the next seal or unseal rewrites it", e)

