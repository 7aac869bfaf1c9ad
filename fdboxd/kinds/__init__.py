"""One contract per fd kind: what each step of a live update does with an entry.

Modelled on LUO's file handlers (``kernel/liveupdate/luo_file.c``, ``mm/memfd_luo.c``):
a handler per kind of file, registered once, called by code that loops over entries and
never names a kind. Here the loops are :mod:`fdboxd.store` (put, get, remove),
:mod:`fdboxd.lifecycle` (seal, unseal, finish, verify), :mod:`fdboxd.reconcile`
(start-up) and :mod:`fdboxd.preflight` (before a kexec); each asks ``store.kind(entry.type)`` and calls one of the operations below.

============================  =====================================  ==========================
step                          operation                              memfd (the defaults)
============================  =====================================  ==========================
Put                           :meth:`Kind.record` → ``Entry.extra``  nothing recorded
Put (names)                   :meth:`Kind.reserves`                  no reserved names
Preflight (changes nothing)   :meth:`Kind.preflight` → problems,     carried as is (by LUO
                              what crosses, room it needs            where the backend is LUO)
Seal, before any change       :meth:`Kind.check_seal` (raises)       the backend must carry it
Seal, freeze                  :meth:`Kind.seal_fd`                   an fd to checksum
Seal, worker thread           :meth:`Kind.prepare`                   nothing
Seal, commit                  :meth:`Kind.freeze`, :meth:`Kind.carry`  nothing
Seal abort, Unseal            :meth:`Kind.unfreeze`                  nothing
Start-up, entry not held      :meth:`Kind.kept_elsewhere`            lost
Start-up, after reconcile     :meth:`Kind.start`                     nothing
Restore check                 :meth:`Kind.verifiable`                yes
Get                           :meth:`Kind.retrieve`                  the backend's fd
Remove, Finish                :meth:`Kind.release`                   the backend drops it
============================  =====================================  ==========================

Every fd type but ``other`` has exactly one kind (:func:`register` refuses a second one,
as ``luo_register_file_handler`` does with ``-EEXIST``, and a kind that names no type or
``other`` with ``-EINVAL``); ``other`` gets :data:`HELD_ONLY`: held while the daemon
runs, never carried. A kind keeps its ``Entry.extra`` keys and its own state (an
instance per store: :class:`Kinds`). Kinds import nothing above them: they get the
store as a :class:`~fdboxd.kinds.base.StoreSurface`. The contract is :mod:`fdboxd.kinds.base`.
"""

from __future__ import annotations

from . import guest_memfd, memfd, tap  # each registers itself
from .base import HELD_ONLY, HeldOnly, Kind, KindError, Kinds, Preflight, StoreSurface, register, registered

__all__ = ["HELD_ONLY", "HeldOnly", "Kind", "KindError", "Kinds", "Preflight", "StoreSurface", "guest_memfd", "memfd",
           "register", "registered", "tap"]
