"""tap (and macvtap) queues: held while fdboxd runs, recreated after a kexec.

No kernel carries a network device across kexec, so a tap is *recorded* instead: at put
the interface's attributes (name, queues, flags, MAC, MTU, owner, bridge port, VLANs,
netns: ``extra["net"]``, read by :mod:`fdboxd.net`); at seal commit the entry is marked
``recreate``; after the kexec no backend holds it, which is expected, and the daemon
recreates the interface at start (:meth:`start`) or on ``NetRestore``, then holds the
new queue fds as the entry. The fds themselves are held by the daemon's memory side,
whatever the backend. :mod:`fdboxd.net` (and pyroute2 behind it) is imported only when a
tap is put or must be recreated.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..fdtypes import FdInfo, FdType
from ..model import Box, BoxState, Caller, Entry
from .base import Kind, Preflight, register

if TYPE_CHECKING:
    from ..backends.base import BackendBox
    from .base import StoreSurface

log = logging.getLogger("fdboxd.net")

#: The keys this kind keeps in ``Entry.extra``.
RECORD, RECREATE = "net", "recreate"


@register
class TapKind(Kind):
    types = frozenset({FdType.TAP})
    carried_by_backend = False
    mapped_by_vmm = False

    def record(self, fd: int, info: FdInfo, caller: Caller) -> dict[str, Any]:
        from .. import net

        return {RECORD: net.record(fd, info, caller.pid)}

    def check_seal(self, store: StoreSurface, box: str, entry: Entry) -> None:
        pass  # sealed with its box, recreated after the kexec

    def seal_fd(self, store: StoreSurface, box: str, entry: Entry) -> int | None:
        return None  # nothing to checksum

    def preflight(self, box: str, entry: Entry, state: BoxState, seals: int | None,
                  page_size: int | None) -> Preflight:
        rec = entry.extra.get(RECORD)
        if not isinstance(rec, dict):
            return Preflight(problems=[("UnsupportedType", "is a tap with no interface record, so it cannot be "
                                        "recreated after the kexec", "put it again (fdboxd records the interface "
                                        "at put)")])
        if rec.get("netns", {}).get("anonymous"):
            return Preflight(problems=[("UnsupportedType", f"is tap {rec.get('ifname')} in an unnamed network "
                                        "namespace, which cannot be found again after the kexec", "create the tap "
                                        "in a named namespace (ip netns add NAME; /run/netns/NAME) or in fdboxd's "
                                        "own, then put it again")])
        return Preflight()  # recreated from its record: nothing for the backend to carry

    def freeze(self, entry: Entry) -> None:
        if RECORD in entry.extra:
            entry.extra = {**entry.extra, RECREATE: True}  # held, not carried: recreated after kexec

    def kept_elsewhere(self, entry: Entry, held: BackendBox | None) -> bool:
        return bool(entry.extra.get(RECREATE))

    def start(self, store: StoreSurface) -> list[Any]:
        waiting = pending(store)
        if not waiting:
            return []  # nothing to recreate: a start without taps never imports net
        from .. import net  # standard library only; pyroute2 is imported if there is work

        done = net.restore_pending(store, waiting)
        log.info("network devices: %d recreated, %d failed",
                 sum(r.status == "recreated" for r in done), sum(r.status == "failed" for r in done))
        return done

    def verifiable(self, entry: Entry) -> bool:
        return False

    def release(self, store: StoreSurface, b: Box, entry: Entry) -> None:
        if entry.extra.get(RECREATE):
            store.side.discard(b.name, entry.name)  # recorded for recreation: maybe nothing held
            return
        super().release(store, b, entry)

    def restore_box(self, store: StoreSurface, caller: Caller, box: str) -> list[Any]:
        """``NetRestore``: recreate every recorded interface of ``box`` that is gone."""
        from .. import net

        return net.restore_box(store, caller, box)


def pending(store: StoreSurface) -> dict[str, list[Entry]]:
    """Tap entries marked for recreation that no backend holds (after a kexec or restart)."""
    marked = [(box, e) for box, b in store.boxes.items() for e in b.entries.values()
              if e.type == FdType.TAP and e.extra.get(RECREATE) and RECORD in e.extra]
    if not marked:
        return {}  # the usual start: no inventory of the side backend asked for
    held = store.side.inventory()
    out: dict[str, list[Entry]] = {}
    for box, e in marked:
        hb = held.get(box)
        if hb is None or e.name not in hb.entries:
            out.setdefault(box, []).append(e)
    return out


def of(store: StoreSurface) -> TapKind:
    """The store's instance of this kind (for the front-ends' requests that only it serves)."""
    kind = store.kind(FdType.TAP)
    assert isinstance(kind, TapKind)
    return kind
