"""The ``io.fdbox.Store`` and ``org.varlink.service`` methods: parameters in, replies out.

This module knows the method names, checks parameter shapes, maps fd indexes to the
fds of the message, and calls the :class:`~fdboxd.store.Store`. It knows nothing about
sockets (that is :mod:`fdboxd.varlink.server`) or bytes (:mod:`fdboxd.varlink.protocol`).

A handler returns a :class:`Reply`: parameters plus the fds to attach, which the server
closes once they are sent. The fds that came *with* a call are always closed by the
server after the handler returns, whatever happened: backends took their own references.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from itertools import chain
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..errors import FdboxError
from ..kinds import guest_memfd, tap
from ..model import Caller, Entry, compact_json
from ..preflight import Preflighter
from ..store import PutItem, SealItem, Store, seal_in_worker
from . import INTERFACE, SERVICE

SERVICE_DESCRIPTION = """\
# The Varlink Service Interface is provided by every varlink service.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

error InterfaceNotFound (interface: string)
error MethodNotFound (method: string)
error MethodNotImplemented (method: string)
error InvalidParameter (parameter: string)
"""


def interface_description() -> str:
    return importlib.resources.files(__package__).joinpath(f"{INTERFACE}.varlink").read_text()


class VarlinkError(Exception):
    """A protocol-level error with a full Varlink error name (not an fdbox problem)."""

    def __init__(self, error: str, **params: Any) -> None:
        super().__init__(error)
        self.error = error
        self.params = params


@dataclass
class Reply:
    params: dict[str, Any] = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)
    #: The whole reply message, already encoded (NUL included), when a handler built it
    #: from cached pieces; ``params`` is then ignored by the server.
    raw: bytes | None = None
    #: ``fds`` are a backend's own (:meth:`~fdboxd.store.Store.lend_box`): the server
    #: sends them at once or dups them to queue them, and never closes them.
    borrowed: bool = False


def wire_reply(parameters: str, fds: list[int] | None = None) -> Reply:
    """A reply whose parameters are already JSON, built from entries' cached wire forms
    (:meth:`~fdboxd.model.Entry.wire`): no dict is built and nothing encoded twice."""
    return Reply(fds=fds or [], raw=b'{"parameters":' + parameters.encode() + b"}\0")


_EMPTY = b'{"parameters":{}}\0'


def entry_reply(entry: Entry, tail: bytes = b"}}\0", fds: list[int] | None = None) -> Reply:
    """``{"parameters":{"entry":ENTRY`` + ``tail``: the entry's cached bytes spliced in,
    so a Put or Get reply costs one concatenation (the entry's JSON is built once)."""
    return Reply(fds=fds or [], raw=b'{"parameters":{"entry":' + entry.wire_bytes() + tail)


_GET_TAIL = b',"fd":0}}\0'


def _got_entry_pieces(n: int) -> tuple[list[bytes], list[bytes]]:
    """What goes before and after each entry of a GetBox reply: ``{"entry":`` (``,`` from
    the second on) and ``,"fd":N}``; kept for the fds one message can carry (SCM_MAX_FD)."""
    return [b'{"entry":'] + [b',{"entry":'] * (n - 1), [b',"fd":%d}' % i for i in range(n)]


_ENTRY_OPENS, _FD_TAILS = _got_entry_pieces(253)

Handler = Callable[["Call"], Any]  # returns a Reply, or an awaitable of one


@dataclass
class Call:
    caller: Caller
    params: dict[str, Any]
    fds: list[int]
    #: Set when the caller asked for "more": sends an intermediate reply (continues=true).
    more: Callable[[dict[str, Any]], None] | None = None

    def str(self, key: str) -> str:
        v = self.params.get(key)
        if not isinstance(v, str):
            raise FdboxError("InvalidRequest", f"parameter {key!r} must be a string")
        return v

    def opt_str(self, key: str) -> str | None:
        return None if self.params.get(key) is None else self.str(key)

    def fd(self, index: object, key: str = "fd") -> int:
        if not isinstance(index, int) or isinstance(index, bool):
            raise FdboxError("InvalidRequest", f"parameter {key!r} must be an fd index")
        if not 0 <= index < len(self.fds):
            raise FdboxError(
                "InvalidRequest", f"{key!r} is {index}, but the message carried {len(self.fds)} fds"
            )
        return self.fds[index]

    def metadata(self, value: object) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise FdboxError("InvalidRequest", "metadata must be an object of strings")
        return value  # contents are checked by the store


class StoreService:
    """Dispatches Varlink method calls to a :class:`Store`."""

    def __init__(self, store: Store, limits: dict[str, int] | None = None,
                 preflighter: Preflighter | None = None) -> None:
        self.store = store
        self.limits = limits or {}
        self.preflighter = preflighter or Preflighter(store.backend.name)
        #: uid -> {"connections", "fds_in_flight"}: set by the server, shown in Status.
        self.connection_usage: Callable[[int], dict[str, int]] | None = None
        self.methods: dict[str, tuple[Handler, frozenset[str]]] = {}
        for name, params in _SIGNATURES.items():
            self.methods[f"{INTERFACE}.{name}"] = (getattr(self, f"do_{name}"), params)
        self.methods[f"{SERVICE}.GetInfo"] = (self.do_GetInfo, frozenset())
        self.methods[f"{SERVICE}.GetInterfaceDescription"] = (self.do_GetInterfaceDescription, frozenset({"interface"}))

    def dispatch(self, method: object, call: Call) -> Reply:
        """Run one call. Raises FdboxError or VarlinkError for the server to turn into replies."""
        if not isinstance(method, str) or "." not in method:
            raise FdboxError("InvalidRequest", "'method' must be a qualified method name")
        entry = self.methods.get(method)
        if entry is None:
            interface = method.rsplit(".", 1)[0]
            if interface not in (INTERFACE, SERVICE):
                raise VarlinkError(f"{SERVICE}.InterfaceNotFound", interface=interface)
            raise VarlinkError(f"{SERVICE}.MethodNotFound", method=method)
        handler, allowed = entry
        if not allowed.issuperset(call.params):
            unknown = set(call.params) - allowed
            raise FdboxError("InvalidRequest", f"unknown parameter(s) {sorted(unknown)} for {method}")
        return handler(call)

    # -------------------------------------------------------------- org.varlink.service

    def do_GetInfo(self, call: Call) -> Reply:
        return Reply({
            "vendor": "fdbox",
            "product": "fdboxd",
            "version": __version__,
            "url": "https://github.com/fdbox/fdbox",
            "interfaces": [SERVICE, INTERFACE],
        })

    def do_GetInterfaceDescription(self, call: Call) -> Reply:
        name = call.params.get("interface")
        if name == INTERFACE:
            return Reply({"description": interface_description()})
        if name == SERVICE:
            return Reply({"description": SERVICE_DESCRIPTION})
        raise VarlinkError(f"{SERVICE}.InterfaceNotFound", interface=name if isinstance(name, str) else "")

    # -------------------------------------------------------------- io.fdbox.Store

    def do_Put(self, call: Call) -> Reply:
        entry = self.store.put(
            call.caller, call.str("box"), call.str("name"), call.fd(call.params.get("fd")),
            call.metadata(call.params.get("metadata")),
        )
        return entry_reply(entry)

    def do_PutMany(self, call: Call) -> Reply:
        raw = call.params.get("entries")
        if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
            raise FdboxError("InvalidRequest", "'entries' must be a list of {name, fd, metadata}")
        items = []
        for i, it in enumerate(raw):
            extra = set(it) - {"name", "fd", "metadata"}
            if extra:
                raise FdboxError("InvalidRequest", f"entries[{i}]: unknown field(s) {sorted(extra)}")
            name = it.get("name")
            if not isinstance(name, str):
                raise FdboxError("InvalidRequest", f"entries[{i}].name must be a string")
            items.append(PutItem(name, call.fd(it.get("fd"), f"entries[{i}].fd"), call.metadata(it.get("metadata"))))
        entries = self.store.put_many(call.caller, call.str("box"), items)
        return wire_reply('{"entries":[%s]}' % ",".join(e.wire() for e in entries))

    def do_Get(self, call: Call) -> Reply:
        box, name = call.str("box"), call.str("name")
        lent = self.store.lend(call.caller, box, name)
        if lent is not None:
            return Reply(fds=[lent[1]], raw=b'{"parameters":{"entry":' + lent[0].wire_bytes() + _GET_TAIL, borrowed=True)
        entry, fd = self.store.get(call.caller, box, name)
        return entry_reply(entry, _GET_TAIL, [fd])

    def do_GetBox(self, call: Call) -> Reply:
        box = call.str("box")
        got = self.store.lend_box(call.caller, box)
        borrowed = got is not None
        if got is None:
            got = self.store.get_box(call.caller, box)
        wires = [e.wire_bytes() for e, _ in got]
        opens, tails = (_ENTRY_OPENS, _FD_TAILS) if len(got) <= len(_FD_TAILS) else _got_entry_pieces(len(got))
        body = b"".join(chain.from_iterable(zip(opens, wires, tails)))
        return Reply(fds=[fd for _, fd in got], raw=b'{"parameters":{"entries":[' + body + b"]}}\0",
                     borrowed=borrowed)

    def do_List(self, call: Call) -> Reply:
        box = call.opt_str("box")
        entries = self.store.list(call.caller, box)
        boxes = [b for b in self.store.list_boxes(call.caller) if box is None or b["name"] == box]
        # The entries' cached wire forms, joined: O(n) but a string join, not n encodes.
        return wire_reply('{"entries":[%s],"boxes":%s}' % (
            ",".join(e.wire() for e in entries), compact_json(boxes)))

    def do_Remove(self, call: Call) -> Reply:
        self.store.remove(call.caller, call.str("box"), call.str("name"))
        return Reply(raw=_EMPTY)

    def do_DeleteBox(self, call: Call) -> Reply:
        self.store.delete_box(call.caller, call.str("box"))
        return Reply()

    async def do_Seal(self, call: Call) -> Reply:
        """Seal in a worker; with ``more``, one progress reply per entry checksummed."""

        def progress(item: SealItem, done: int, total: int) -> None:
            if call.more is not None:
                call.more({"progress": {"box": item.box, "name": item.name, "done": done, "total": total}})

        box = call.opt_str("box")
        preflight = call.params.get("preflight")
        if preflight is not None and not isinstance(preflight, bool):
            raise FdboxError("InvalidRequest", "parameter 'preflight' must be a boolean")
        if preflight:
            # In the same loop turn as seal_begin: nothing can be put between the check
            # and the freeze.
            report = self.preflighter.run(self.store, call.caller, box)
            if not report.ok:
                raise report.refusal()
        return Reply({"sealed": await seal_in_worker(self.store, call.caller, box, progress)})

    def do_Preflight(self, call: Call) -> Reply:
        return Reply(self.preflighter.run(self.store, call.caller).to_dict())

    async def do_RestoreInto(self, call: Call) -> Reply:
        """Fill the caller's new guest_memfd from a carried copy (fdboxd.gmem); copying in a worker."""
        entry = await guest_memfd.of(self.store).restore_into_in_worker(
            self.store, call.caller, call.str("box"), call.str("name"), call.fd(call.params.get("fd")))
        return wire_reply('{"entry":%s}' % entry.wire())

    def do_Unseal(self, call: Call) -> Reply:
        self.store.unseal(call.caller, call.str("box"))
        return Reply()

    def do_NetRestore(self, call: Call) -> Reply:
        results = tap.of(self.store).restore_box(self.store, call.caller, call.str("box"))
        return Reply({"entries": [r.to_dict() for r in results]})

    def do_Finish(self, call: Call) -> Reply:
        return Reply({"finished": self.store.finish(call.caller, call.opt_str("box"))})

    def do_Status(self, call: Call) -> Reply:
        st = self.store.status(call.caller)  # non-root: only the caller's own counts
        usage = self.store.usage(call.caller.uid)
        if self.connection_usage is not None:
            usage.update(self.connection_usage(call.caller.uid))
        return Reply({
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
        })

    def do_AcknowledgeLost(self, call: Call) -> Reply:
        return Reply({"acknowledged": self.store.acknowledge_lost(call.caller, call.opt_str("box"))})

    def do_LastLiveUpdate(self, call: Call) -> Reply:
        return Reply({"boxes": self.store.last_live_update(call.caller)})


_SIGNATURES: dict[str, frozenset[str]] = {
    "Put": frozenset({"box", "name", "fd", "metadata"}),
    "PutMany": frozenset({"box", "entries"}),
    "Get": frozenset({"box", "name"}),
    "GetBox": frozenset({"box"}),
    "List": frozenset({"box"}),
    "Remove": frozenset({"box", "name"}),
    "DeleteBox": frozenset({"box"}),
    "Seal": frozenset({"box", "preflight"}),
    "Unseal": frozenset({"box"}),
    "RestoreInto": frozenset({"box", "name", "fd"}),
    "Finish": frozenset({"box"}),
    "NetRestore": frozenset({"box"}),
    "Status": frozenset(),
    "Preflight": frozenset(),
    "AcknowledgeLost": frozenset({"box"}),
    "LastLiveUpdate": frozenset(),
}
