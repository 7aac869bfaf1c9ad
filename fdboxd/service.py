"""The operations of fdboxd, once for every front-end: Varlink and D-Bus both call these.

A front-end decodes its wire format (Varlink JSON, D-Bus messages) into Python values,
names the caller (``SO_PEERCRED``, the bus's credentials), calls one method of
:class:`Service` and encodes what comes back; a store error ``X`` is its error ``X``.
The rules of an operation live here, so a fix lands once and both front-ends keep it:

- ``Get``/``GetBox`` lend the backend's own fd where the backend holds one (no fd made),
  else make a new one; either way the same checks and the same claim of a restored
  box (:meth:`Service.get`). A lent fd is the backend's: the front-end sends it at once
  or sends a dup of it, and never closes it (:class:`Got`).
- ``Seal`` with ``preflight`` runs the preflight in the same loop turn as the seal's
  freeze, so nothing can be put between the check and the freeze, and refuses, sealing
  nothing, with the first problem's error (:meth:`Service.seal`).
- ``Put`` of a tap reads its interface (netlink, in the tap's network namespace) in a
  worker the loop awaits, before the store's synchronous put; a Put of anything else
  is synchronous, as the store is (:meth:`Service.put_many`). ``NetRestore`` recreates
  interfaces in workers the same way (:func:`fdboxd.net.restore_box_async`).
- ``Status`` is the store's status with the limits and the caller's usage, the Varlink
  connections' included (:attr:`Service.connection_usage`).

What stays in a front-end: its wire types (a Varlink parameter that must be a string,
a D-Bus signature), fd indexes into its message, the caller's identity, and how it
sends fds.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import __version__
from .errors import FdboxError
from .kinds import guest_memfd
from .model import Caller, Entry
from .preflight import Preflighter, Report
from .store import PutItem, SealItem, Store, seal_in_worker

__all__ = ["Got", "PutItem", "Service", "check_metadata"]

Progress = Callable[[SealItem, int, int], None]


@dataclass
class Got:
    """What ``Get``/``GetBox`` hand out: entries with one fd each, in order.

    ``borrowed``: the fds are the backend's own (:meth:`~fdboxd.store.Store.lend`), valid
    only until anything else runs on the loop: send them at once or dup them, never
    close them. Otherwise they are new and the front-end's to close once sent.
    """

    entries: list[Entry]
    fds: list[int]
    borrowed: bool


def check_metadata(value: object) -> dict[str, str]:
    """A Put's metadata: absent is empty; an object, or InvalidRequest (the store checks
    its keys, values and size)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FdboxError("InvalidRequest", "metadata must be an object of strings")
    return value


class Service:
    """The store's operations for the front-ends: one instance, shared by all of them."""

    def __init__(self, store: Store, limits: dict[str, int] | None = None,
                 preflighter: Preflighter | None = None) -> None:
        self.store = store
        self.limits = limits or {}
        self.preflighter = preflighter or Preflighter(store.backend.name)
        #: uid -> {"connections", "fds_in_flight"}: set by the Varlink server, shown in Status.
        self.connection_usage: Callable[[int], dict[str, int]] | None = None

    # ------------------------------------------------------------------ entries

    def put(self, caller: Caller, box: str, name: str, fd: int, metadata: object = None) -> Entry | Awaitable[Entry]:
        """Hold ``fd`` as box/name (the store takes its own reference; ``fd`` stays the
        caller's until the result is there). An awaitable where :meth:`put_many` is one."""
        got = self.put_many(caller, box, [PutItem(name, fd, check_metadata(metadata))])
        if isinstance(got, list):
            return got[0]

        async def one() -> Entry:
            return (await got)[0]

        return one()

    def put_many(self, caller: Caller, box: str, items: list[PutItem]) -> list[Entry] | Awaitable[list[Entry]]:
        """Several entries of one box: all or none.

        The entries, at once; or, when an fd is a character device (a tap, maybe), an
        awaitable of them: a tap's interface is read in a worker first
        (:func:`fdboxd.net.records_ahead`), so the loop goes on meanwhile, and the store's
        put, still synchronous, takes what was read. Its checks and errors are the
        same either way, in the same order (an error of the read is raised where the
        store asks for the record).
        """
        if not any(_char_device(it.fd) for it in items):
            return self.store.put_many(caller, box, items)
        return self._put_after_records(caller, box, items)

    async def _put_after_records(self, caller: Caller, box: str, items: list[PutItem]) -> list[Entry]:
        from . import net  # a tap is possible: only then

        ahead = await net.records_ahead([it.fd for it in items], caller.pid)
        with net.prerecorded(ahead):
            return self.store.put_many(caller, box, items)

    def get(self, caller: Caller, box: str, name: str) -> Got:
        """One entry's fd: lent where the backend holds one, else new (see :class:`Got`)."""
        lent = self.store.lend(caller, box, name)
        if lent is not None:
            return Got([lent[0]], [lent[1]], borrowed=True)
        entry, fd = self.store.get(caller, box, name)
        return Got([entry], [fd], borrowed=False)

    def get_box(self, caller: Caller, box: str) -> Got:
        """Every entry of the box the caller owns, each with its fd: all or nothing."""
        got = self.store.lend_box(caller, box)
        borrowed = got is not None
        if got is None:
            got = self.store.get_box(caller, box)
        return Got([e for e, _ in got], [fd for _, fd in got], borrowed)

    def list(self, caller: Caller, box: str | None = None) -> list[Entry]:
        return self.store.list(caller, box)

    def list_boxes(self, caller: Caller, box: str | None = None) -> list[dict[str, Any]]:
        return [b for b in self.store.list_boxes(caller) if box is None or b["name"] == box]

    def remove(self, caller: Caller, box: str, name: str) -> None:
        """Journalled before the backend lets go: a failed write is ``BackendUnavailable``
        with the entry held (:meth:`fdboxd.store.Store.remove`)."""
        self.store.remove(caller, box, name)

    def delete_box(self, caller: Caller, box: str) -> None:
        """As :meth:`remove`, for a whole box (:meth:`fdboxd.store.Store.delete_box`)."""
        self.store.delete_box(caller, box)

    # ------------------------------------------------------------------ live update

    async def seal(self, caller: Caller, box: str | None, preflight: object = False,
                   progress: Progress | None = None) -> list[str]:
        """Seal one box, or every open box when ``box`` is None (root only).

        With ``preflight``, refuse (sealing nothing) when :meth:`preflight` of that box
        (or of everything) finds a problem; checked in the same loop turn as the seal's
        freeze. ``progress(item, done, total)`` as :func:`~fdboxd.store.seal_in_worker`.
        """
        if not isinstance(preflight, bool):
            raise FdboxError("InvalidRequest", "parameter 'preflight' must be a boolean")
        if preflight:
            report = self.preflighter.run(self.store, caller, box)
            if not report.ok:
                raise report.refusal()
        return await seal_in_worker(self.store, caller, box, progress)

    def preflight(self, caller: Caller) -> Report:
        """Would every entry the caller sees survive a kexec now (:mod:`fdboxd.preflight`)?"""
        return self.preflighter.run(self.store, caller)

    def unseal(self, caller: Caller, box: str) -> None:
        """Done once the box is released and open; what a failure leaves is
        :func:`fdboxd.lifecycle.unseal`'s."""
        self.store.unseal(caller, box)

    def finish(self, caller: Caller, box: str | None) -> list[str]:
        """End the restore phase of one box, or of every restored box when None (root only);
        journalled before anything is released (:func:`fdboxd.lifecycle.finish`)."""
        return self.store.finish(caller, box)

    async def restore_into(self, caller: Caller, box: str, name: str, fd: int) -> Entry:
        """Fill the caller's new guest_memfd ``fd`` from box/name's carried copy (:mod:`fdboxd.gmem`)."""
        return await guest_memfd.of(self.store).restore_into_in_worker(self.store, caller, box, name, fd)

    async def net_restore(self, caller: Caller, box: str) -> list[Any]:
        """Recreate the box's recorded network interfaces that are gone (:mod:`fdboxd.net`),
        the netlink work in workers the loop awaits."""
        from . import net  # pyroute2 only if there is work

        return await net.restore_box_async(self.store, caller, box)

    # ------------------------------------------------------------------ reports

    def status(self, caller: Caller) -> dict[str, Any]:
        """The store's status as the caller may see it (non-root: its own counts and
        losses), with the version, the limits and the caller's usage."""
        st = self.store.status(caller)
        usage = self.store.usage(caller.uid)
        if self.connection_usage is not None:
            usage.update(self.connection_usage(caller.uid))
        return {
            "version": __version__,
            "backend": st["backend"],
            "survives_kexec": st["survives_kexec"],
            "state": st["state"],
            "boxes": st["boxes"],
            "entries": st["entries"],
            "sealed": st["sealed"],
            "restored": st["restored"],
            "lost": st["lost"],
            "adopted": st["adopted"],
            "problems": st["problems"],
            "limits": self.limits,
            "usage": usage,
        }

    def acknowledge_lost(self, caller: Caller, box: str | None) -> int:
        return self.store.acknowledge_lost(caller, box)

    def last_live_update(self, caller: Caller) -> list[dict[str, Any]]:
        return self.store.last_live_update(caller)


def _char_device(fd: object) -> bool:
    """Whether ``fd`` is a character device (taps and macvtaps are); False for a bad fd
    (the store's own check says what is wrong with it)."""
    try:
        return stat.S_ISCHR(os.fstat(fd).st_mode)  # type: ignore[arg-type]
    except (OSError, TypeError, ValueError):
        return False
