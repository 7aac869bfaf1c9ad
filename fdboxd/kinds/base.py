"""The contract between the store and the fd kinds (see :mod:`fdboxd.kinds`).

:class:`Kind` is what a kind implements (the defaults are memfd's), :func:`register`
the one registration, :class:`Kinds` a store's instances. :class:`StoreSurface` is what
a kind, :mod:`fdboxd.lifecycle` and :mod:`fdboxd.reconcile` may use of the store: they
work *over* a :class:`~fdboxd.store.Store`, which imports them, so typing them with the
Store itself would make an import circle (store → lifecycle → store). The rules stay in
the store, each step of a live update in its module, and ``tests/unit/test_layering.py``
keeps it that way; the store satisfies the protocol structurally (mypy checks it).
"""


from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ..backends.base import Backend, BackendBox
from ..checksum import Verify
from ..errors import FdboxError
from ..fdtypes import FdInfo, FdType
from ..manifest import Manifest, Op
from ..model import Box, BoxState, Caller, Entry, Event, SealItem


class StoreSurface(Protocol):
    """What lifecycle, reconcile and the kinds use of a store (see :class:`fdboxd.store.Store`)."""

    backend: Backend
    side: Backend  # the daemon's own memory backend for what the main backend cannot hold
    verify: Verify
    allowed_types: frozenset[FdType]
    manifest: Manifest | None
    boxes: dict[str, Box]
    owners: dict[str, int]
    generation: int
    lost: list[dict[str, Any]]
    adopted: list[dict[str, Any]]
    sealing: set[str]  # boxes between seal_begin and seal_commit/abort
    kinds: Kinds

    def kind(self, fd_type: FdType) -> Kind: ...
    # lookups, with the visibility rules
    def find_box(self, box: str, caller: Caller | None = None) -> Box: ...
    def find_entry(self, box: str, name: str, caller: Caller | None = None) -> Entry: ...
    def check_box_owner(self, caller: Caller, box: str) -> None: ...
    def owned_box(self, caller: Caller, box: str) -> Box: ...
    # where an entry is held
    def backend_for(self, fd_type: FdType) -> Backend: ...
    def create_box_backends(self, box: str) -> None: ...
    def rehold(self, box: str, entry: Entry, fd: int) -> None: ...
    # changes that keep the O(1) counters right
    def count_entry(self, entry: Entry, sign: int) -> None: ...
    def resize(self, entry: Entry, size: int) -> None: ...
    def set_state(self, b: Box, state: BoxState) -> None: ...
    def recount(self) -> None: ...
    def drop_entry(self, b: Box, name: str) -> None: ...
    def claim(self, b: Box, entries: list[Entry]) -> None: ...
    def mark_reopened(self, b: Box) -> Callable[[], None]: ...
    def finish_reopened(self, b: Box) -> None: ...
    def record(self, ops: list[Op], fault: Callable[[], None] | None = None) -> None: ...
    # the record, and the front-ends' listeners
    def record_or_log(self, ops: list[Op]) -> None: ...
    def box_ops(self, names: Iterable[str]) -> list[Op]: ...
    def save_snapshot(self) -> None: ...
    def emit(self, event: Event) -> None: ...


def check_sealable(store: StoreSurface, box: str, entry: Entry, carrier: FdType) -> None:
    """Raise if the backend holds ``carrier`` (what crosses for ``entry``) but cannot seal it
    (:meth:`~fdboxd.backends.base.Backend.seal_refusal`: fdbox.ko beside LUO and a plain memfd)."""
    why = store.backend.seal_refusal(carrier)
    if why is not None:
        raise FdboxError("UnsupportedType", f"{box}/{entry.name} is {why}" if carrier == entry.type else
                         f"{box}/{entry.name} is carried as {why}", box=box, name=entry.name, type=str(entry.type))


@dataclass
class Preflight:
    """What a kind says of one entry before a kexec (:meth:`Kind.preflight`).

    :mod:`fdboxd.preflight` adds up the room, asks the backend whether it carries
    :attr:`carrier` and turns every problem into one line naming the entry.
    """

    #: (error name, what is wrong, the fix): the entry cannot cross at all
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    #: the fd type the backend must carry across the kexec (None: nothing, e.g. recreated)
    carrier: FdType | None = None
    #: carried by LUO's memfd handler where the backend is LUO (so ``liveupdate=on`` counts)
    via_luo: bool = False
    #: (what, fix) when the backend does not accept :attr:`carrier`; ``{backend}`` is its name
    unaccepted: tuple[str, str] = ("needs a memfd carried, which the {backend} backend cannot do",
                                   "restart fdboxd with --backend auto")
    #: 2 MiB pages the next kernel's pool needs for the restore copy
    hugetlb_pages: int = 0
    #: memory the seal's copies of this entry take
    copy_bytes: int = 0


class KindError(Exception):
    """A registration refused, with the errno LUO would return."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class Kind:
    """An fd kind's operations; the defaults are memfd's (see the module docstring)."""

    #: The fd types this kind handles (each type has one kind).
    types: ClassVar[frozenset[FdType]] = frozenset()
    #: Whether a kexec-capable backend carries the file itself (memory) or not.
    carried_by_backend: ClassVar[bool] = True
    #: Whether a VMM maps the file (so a preflight that cannot open it cannot compare the
    #: VM's mappings with what fdbox holds).
    mapped_by_vmm: ClassVar[bool] = True

    # -- Put
    def reserves(self, name: str) -> str | None:
        """Why an entry name is reserved for fdboxd (and so refused), or None."""
        return None

    def record(self, fd: int, info: FdInfo, caller: Caller) -> dict[str, Any]:
        """What the kind records at put, as ``Entry.extra`` (facts read from the fd)."""
        return {}

    # -- Seal
    def check_seal(self, store: StoreSurface, box: str, entry: Entry) -> None:
        """Raise if ``entry`` cannot be sealed; called for every entry before any change."""
        if not store.backend.accepts(entry.type):
            raise FdboxError("UnsupportedType", f"the {store.backend.name} backend cannot carry {entry.type}",
                             box=box, name=entry.name, type=str(entry.type))
        check_sealable(store, box, entry, entry.type)

    def seal_fd(self, store: StoreSurface, box: str, entry: Entry) -> int | None:
        """An fd of the entry's file for the seal's checksum (owned by the plan), or None."""
        return store.backend_for(entry.type).get(box, entry.name)

    def prepare(self, item: SealItem) -> None:
        """Slow work before the checksum, in a worker thread (the boxes are frozen)."""

    def freeze(self, entry: Entry) -> None:
        """Mark the entry at seal commit (no I/O: cannot fail)."""

    def carry(self, store: StoreSurface, item: SealItem, entry: Entry) -> bool:
        """Put what crosses the kexec instead of the file; True if :meth:`unfreeze` must undo it."""
        return False

    def unfreeze(self, store: StoreSurface, box: str, entry: Entry) -> None:
        """Undo :meth:`carry` (a seal that failed late, or Unseal)."""

    # -- Before the kexec (fdboxctl preflight)
    def preflight(self, box: str, entry: Entry, state: BoxState, seals: int | None,
                  page_size: int | None) -> Preflight:
        """Whether ``entry`` would cross a kexec, from fresh facts (``seals``, ``page_size``
        of a new fd of it, or None when it could not be opened); never changes anything."""
        return Preflight(carrier=entry.type, via_luo=True)

    # -- Start-up
    def kept_elsewhere(self, entry: Entry, held: BackendBox | None) -> bool:
        """An entry no backend holds at start-up is lost, unless the kind keeps it another way."""
        return False

    def problems(self, store: StoreSurface, caller: Caller | None) -> list[str]:
        """Status lines about this kind's entries that the caller may see (kept as they
        change: Status asks every kind each time)."""
        return []

    def start(self, store: StoreSurface) -> list[Any]:
        """Once the store is up: bring back what the kind must recreate (results to log)."""
        return []

    # -- Restore, Get, Remove
    def verifiable(self, entry: Entry) -> bool:
        """Whether a restored entry's file is checked against its seal before anyone takes it."""
        return True

    def retrieve(self, store: StoreSurface, b: Box, entry: Entry) -> int:
        """A new fd for the entry's file (Get, GetBox)."""
        return store.backend_for(entry.type).get(b.name, entry.name)

    def lend(self, store: StoreSurface, b: Box, entry: Entry) -> int | None:
        """The backend's own fd for the entry, borrowed (Backend.lend), or None where
        the backend makes a new one per get; refuses exactly as :meth:`retrieve` does."""
        return store.backend_for(entry.type).lend(b.name, entry.name)

    def lend_many(self, store: StoreSurface, b: Box, entries: list[Entry]) -> list[int] | None:
        """:meth:`lend` for entries of this kind's one type, in one backend call."""
        return store.backend_for(entries[0].type).lend_many(b.name, [e.name for e in entries])

    def release(self, store: StoreSurface, b: Box, entry: Entry) -> None:
        """The entry left its box (Remove, Finish, a failed check): drop what holds it."""
        store.backend_for(entry.type).remove(b.name, entry.name)


class HeldOnly(Kind):
    """Files of type ``other`` (``--allow-type other``): held while fdboxd runs, never carried."""

    carried_by_backend = False
    mapped_by_vmm = False

    def check_seal(self, store: StoreSurface, box: str, entry: Entry) -> None:
        pass  # sealed with its box; the kexec does not carry it

    def preflight(self, box: str, entry: Entry, state: BoxState, seals: int | None,
                  page_size: int | None) -> Preflight:
        return Preflight(problems=[("UnsupportedType", f"is of type {entry.type}, which fdbox cannot carry "
                                    "across a kexec", "remove it, or recreate it after the kexec yourself")])

    def seal_fd(self, store: StoreSurface, box: str, entry: Entry) -> int | None:
        return None

    def verifiable(self, entry: Entry) -> bool:
        return False


HELD_ONLY = HeldOnly()

_REGISTRY: dict[FdType, type[Kind]] = {}


def register(kind: type[Kind]) -> type[Kind]:
    """Register a kind for its types, once (a class decorator)."""
    if not kind.types or FdType.OTHER in kind.types:
        raise KindError(errno.EINVAL, f"{kind.__name__} must name fd types, and not {FdType.OTHER}")
    taken = sorted(str(t) for t in kind.types if t in _REGISTRY)
    if taken:
        raise KindError(errno.EEXIST, f"{kind.__name__}: {', '.join(taken)} already has a kind")
    for t in kind.types:
        _REGISTRY[t] = kind
    return kind


def registered() -> dict[FdType, type[Kind]]:
    """The registry (a copy): fd type → kind class (filled when :mod:`fdboxd.kinds` is imported)."""
    return dict(_REGISTRY)


class Kinds:
    """One store's kind instances (a kind's state, such as guest_memfd's busy set, is per store)."""

    def __init__(self) -> None:
        by_class: dict[type[Kind], Kind] = {}
        self._of: dict[FdType, Kind] = {}
        for t, cls in registered().items():
            self._of[t] = by_class.setdefault(cls, cls())
        self._all = list(by_class.values())  # each kind once, in registration order

    def of(self, fd_type: FdType) -> Kind:
        return self._of.get(fd_type, HELD_ONLY)

    def all(self) -> list[Kind]:
        return list(self._all)

    def reserved(self, name: str) -> str | None:
        """Why an entry name is reserved by any kind, or None."""
        for k in self._all:  # every Put asks: no copy
            why = k.reserves(name)
            if why:
                return why
        return None
