"""The backend contract: the part of fdbox that actually holds file references.

The store (:mod:`fdboxd.store`) owns names, owners, states and rules; a backend only
holds files and answers what it holds. Two backends exist:

- ``memory``: the daemon process holds a dup of each fd. Survives nothing by itself;
  under systemd the fds are also pushed to the service's fdstore (see fdboxd.systemd).
- ``kernel``: ``/dev/fdbox`` holds the references; they survive the daemon and, once a
  box is sealed, kexec.

Rules every backend follows:

- ``put`` takes its *own* reference. The caller's fd stays open and is the caller's to
  close, on success and on failure.
- ``get`` returns a *new* fd (``O_CLOEXEC``) that the caller owns and must close.
- Methods are called only with names the store has validated and in states the store
  has checked; a backend still refuses what it cannot do, with an ``FdboxError``.
- ``inventory`` reports what the backend really holds, so the store can reconcile the
  manifest after a restart or a kexec instead of believing it.

Live update (backends with ``survives_kexec``):

- ``seal(box)`` preserves every entry of the box for the next kernel, all or nothing;
  ``unseal(box)`` undoes it with nothing lost.
- After kexec, ``inventory()`` reports the carried boxes in state ``restored``.
- ``get(box, name)`` on a restored entry restores it *transparently*: the backend makes
  a fresh memfd of the entry's kind (``MFD_HUGETLB`` with the right page size for
  hugetlb entries, ``MFD_ALLOW_SEALING``), sizes it, has the preserved data copied in,
  re-applies the seals, and from then on the entry holds that file; the caller gets a
  new fd for it like for any entry. A second ``get`` returns the same file again.
- ``finish(box)`` on a restored box releases whatever was not restored (those entries
  are gone from the inventory afterwards) and reopens the box.
- The store uses one reserved box, ``fdboxd.manifest`` (see ``fdboxd.store.CARRY_BOX``),
  through these same calls — create_box, put, seal, unseal, get, finish, delete_box —
  to carry its manifest across the kexec inside the sealed set, in a memfd of the type
  :attr:`Backend.manifest_carrier` names (a hugetlb one where the backend seals no
  plain memfd: fdbox.ko beside LUO).
- :meth:`Backend.seal_refusal` says, before anything changes, why a type the backend
  holds cannot be sealed (``seal`` would refuse it only half-way through a seal).
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field

from ..errors import FdboxError
from ..fdtypes import FdInfo, FdType
from ..model import BoxState

#: Default of --liveupdate-wait: how long the LUO backend waits for another agent to release
#: /dev/liveupdate. Here, not in .liveupdate, so the daemon's argument parser does not
#: import that backend (and ctypes behind it) on every start.
OPEN_RETRY_S = 10.0


@dataclass
class BackendEntry:
    name: str
    type: FdType
    size: int
    #: The owner as recorded with the reference (the kernel keeps it too), so entries
    #: adopted without a manifest still belong to whoever put them.
    uid: int = 0
    gid: int = 0


@dataclass
class BackendBox:
    name: str
    state: BoxState
    entries: dict[str, BackendEntry] = field(default_factory=dict)


class Backend(abc.ABC):
    """A backend; what it can do is *declared* by the capabilities below, each backend
    setting its own, and the rest of fdboxd reads the declarations (never the class:
    ``auto``'s mixed backend holds in-process like the memory backend without being one).
    """

    #: Short name shown in Status and on D-Bus ("memory", "kernel").
    name: str = "?"
    #: Capability: sealed boxes survive a kexec with this backend.
    survives_kexec: bool = False
    #: Capability: some entries are held by this process only (a dup each, gone with
    #: it): :meth:`peek` gives them, the daemon mirrors them into systemd's fd store
    #: (fdboxd.systemd) and :meth:`adopt` takes them back at a restart.
    holds_in_process: bool = False
    #: Capability: besides the types it :meth:`accepts`, this backend holds any other
    #: type in this process (taps, recorded for recreation) and never carries them: the
    #: store uses it as its side backend; without it the store keeps a separate memory
    #: backend for them.
    holds_every_type: bool = False
    #: Capability: the kernel module the next kernel must have to take this backend's
    #: handover back (``"fdbox"``: without fdbox.ko there, its boxes stay reserved until
    #: released); None where the handover needs no module (LUO's, or nothing crosses).
    next_kernel_module: str | None = None

    @abc.abstractmethod
    def accepts(self, fd_type: FdType) -> bool:
        """Whether this backend can hold files of this type at all."""

    @abc.abstractmethod
    def create_box(self, box: str) -> None: ...

    @abc.abstractmethod
    def delete_box(self, box: str) -> None:
        """Drop the box and every reference it holds."""

    @abc.abstractmethod
    def put(self, box: str, name: str, fd: int, info: FdInfo, uid: int = 0, gid: int = 0) -> None:
        """Hold a reference to the file behind ``fd`` (the caller keeps ``fd``), owned by uid/gid."""

    @abc.abstractmethod
    def get(self, box: str, name: str) -> int:
        """Return a new fd for the entry; the caller owns it."""

    def lend(self, box: str, name: str) -> int | None:
        """The fd this backend itself holds for the entry, borrowed: never close it, and
        use it only before anything else runs on the loop (sent at once, as an fd holder
        sends its own reference). None where every get makes a new fd (the kernel's)."""
        return None

    def lend_many(self, box: str, names: list[str]) -> list[int] | None:
        """:meth:`lend` for several entries: all, or None."""
        fds = [self.lend(box, n) for n in names]
        return None if None in fds else fds  # type: ignore[return-value]

    @abc.abstractmethod
    def remove(self, box: str, name: str) -> None: ...

    def peek(self, box: str, name: str) -> int | None:
        """The fd this process holds for the entry (borrowed: never close it), for the fd
        store's mirror; None where the entry is held elsewhere (the kernel) or not at all."""
        return None

    def adopt(self, box: str, name: str, fd: int) -> None:
        """Take ownership of ``fd`` (the fd store's) as entry ``box/name``: backends that
        declare :attr:`holds_in_process` only. On an error ``fd`` stays the caller's."""
        raise FdboxError("UnsupportedType", f"backend {self.name} holds nothing in this process: "
                         f"{box}/{name} from the fd store not adopted", box=box, name=name)

    def discard(self, box: str, name: str) -> bool:
        """Remove the entry if this backend holds it; whether it did (a quiet :meth:`remove`)."""
        try:
            self.remove(box, name)
        except FdboxError:
            return False
        return True

    #: The memfd type the store carries its manifest in (see the module docstring).
    manifest_carrier: FdType = FdType.MEMFD
    #: 2 MiB huge pages that manifest takes (a hugetlb carrier: one; preflight counts it).
    manifest_huge_pages = 0

    def manifest_memfd(self, raw: bytes) -> int:
        """A new memfd of type :attr:`manifest_carrier` holding ``raw`` (the caller owns it)."""
        fd = os.memfd_create("fdboxd-manifest", os.MFD_CLOEXEC)
        try:
            os.write(fd, raw)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def seal_refusal(self, fd_type: FdType) -> str | None:
        """Why entries of ``fd_type``, which :meth:`accepts` holds, cannot be sealed here,
        with the fix (one line); None when they can. Asked before any change."""
        return None

    @abc.abstractmethod
    def seal(self, box: str) -> None:
        """Make the box ready to cross kexec (the store already refused bad states)."""

    @abc.abstractmethod
    def unseal(self, box: str) -> None:
        """Undo :meth:`seal` with nothing lost."""

    def finish(self, box: str) -> None:
        """A restored box is done: release restore-only resources. Default: nothing."""

    def started(self) -> None:
        """The daemon has started and every entry sits where a restart finds it again
        (the fd store's mirror under systemd included): release what only a start that
        failed would have needed (LUO: FINISH the incoming sessions). Default: nothing."""

    def reconciled(self, keep: set[str]) -> None:
        """The store has reconciled at start-up: ``keep`` are the boxes it knows sealed
        (and what crosses with them). Release whatever the backend still preserves for any
        other box (a seal or unseal cut short left it) and make the backend's own records
        list exactly ``keep``. A failure is logged, never raised: the start goes on with
        the state as it found it. Default: nothing (nothing is preserved apart from boxes)."""

    @abc.abstractmethod
    def inventory(self) -> dict[str, BackendBox]:
        """What the backend really holds, by box name."""

    #: One-line reasons the backend is not what was asked for, found when it was opened
    #: (``auto`` without LUO because another process held /dev/liveupdate, ...).
    startup_problems: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        """One line per thing that does not work as configured right now (Status shows
        them): never silent, and never more than a line each."""
        return list(self.startup_problems)

    def close(self) -> None:
        """Release the backend's handle (not its entries, for the kernel backend)."""
