"""The ``io.fdbox.Store`` and ``org.varlink.service`` methods: parameters in, replies out.

This module knows the method names, checks parameter shapes, maps fd indexes to the
fds of the message, and calls the :class:`~fdboxd.service.Service` — the operations
and their rules, shared with the D-Bus front-end (:mod:`fdboxd.dbus`). It knows nothing
about sockets (that is :mod:`fdboxd.varlink.server`) or bytes (:mod:`fdboxd.varlink.protocol`).

A handler returns a :class:`Reply`: parameters plus the fds to attach, which the server
closes once they are sent. The fds that came *with* a call are always closed by the
server after the handler returns, whatever happened: backends took their own references.
"""

from __future__ import annotations

import importlib.resources
import inspect
from collections.abc import Awaitable, Callable
from itertools import chain
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import __version__
from ..errors import FdboxError
from ..model import Caller, Entry, SealItem, compact_json
from ..service import Got, PutItem, Service, check_metadata
from . import INTERFACE, SERVICE

T = TypeVar("T")

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
        return check_metadata(value)  # contents are checked by the store


def _then(result: T | Awaitable[T], reply: Callable[[T], Reply]) -> Reply | Awaitable[Reply]:
    """``reply(result)``, at once or once an awaitable result is there (a tap's Put)."""
    if not inspect.isawaitable(result):
        return reply(result)  # type: ignore[arg-type]

    async def later() -> Reply:
        return reply(await result)  # type: ignore[misc]

    return later()


class StoreService:
    """Dispatches Varlink method calls to the :class:`~fdboxd.service.Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service
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

    def do_Put(self, call: Call) -> Reply | Awaitable[Reply]:
        return _then(self.service.put(call.caller, call.str("box"), call.str("name"), call.fd(call.params.get("fd")),
                                      call.metadata(call.params.get("metadata"))), entry_reply)

    def do_PutMany(self, call: Call) -> Reply | Awaitable[Reply]:
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
        return _then(self.service.put_many(call.caller, call.str("box"), items),
                     lambda entries: wire_reply('{"entries":[%s]}' % ",".join(e.wire() for e in entries)))

    def do_Get(self, call: Call) -> Reply:
        got = self.service.get(call.caller, call.str("box"), call.str("name"))
        return Reply(fds=got.fds, raw=b'{"parameters":{"entry":' + got.entries[0].wire_bytes() + _GET_TAIL,
                     borrowed=got.borrowed)

    def do_GetBox(self, call: Call) -> Reply:
        got: Got = self.service.get_box(call.caller, call.str("box"))
        n = len(got.entries)
        wires = [e.wire_bytes() for e in got.entries]
        opens, tails = (_ENTRY_OPENS, _FD_TAILS) if n <= len(_FD_TAILS) else _got_entry_pieces(n)
        body = b"".join(chain.from_iterable(zip(opens, wires, tails)))
        return Reply(fds=got.fds, raw=b'{"parameters":{"entries":[' + body + b"]}}\0", borrowed=got.borrowed)

    def do_List(self, call: Call) -> Reply:
        box = call.opt_str("box")
        entries = self.service.list(call.caller, box)
        boxes = self.service.list_boxes(call.caller, box)
        # The entries' cached wire forms, joined: O(n) but a string join, not n encodes.
        return wire_reply('{"entries":[%s],"boxes":%s}' % (
            ",".join(e.wire() for e in entries), compact_json(boxes)))

    def do_Remove(self, call: Call) -> Reply:
        self.service.remove(call.caller, call.str("box"), call.str("name"))
        return Reply(raw=_EMPTY)

    def do_DeleteBox(self, call: Call) -> Reply:
        self.service.delete_box(call.caller, call.str("box"))
        return Reply()

    async def do_Seal(self, call: Call) -> Reply:
        """Seal in a worker; with ``more``, one progress reply per entry checksummed."""

        def progress(item: SealItem, done: int, total: int) -> None:
            if call.more is not None:
                call.more({"progress": {"box": item.box, "name": item.name, "done": done, "total": total}})

        preflight = call.params.get("preflight")
        sealed = await self.service.seal(call.caller, call.opt_str("box"), False if preflight is None else preflight,
                                         progress)
        return Reply({"sealed": sealed})

    def do_Preflight(self, call: Call) -> Reply:
        return Reply(self.service.preflight(call.caller).to_dict())

    async def do_RestoreInto(self, call: Call) -> Reply:
        """Fill the caller's new guest_memfd from a carried copy (fdboxd.gmem); copying in a worker."""
        entry = await self.service.restore_into(call.caller, call.str("box"), call.str("name"),
                                                call.fd(call.params.get("fd")))
        return wire_reply('{"entry":%s}' % entry.wire())

    def do_Unseal(self, call: Call) -> Reply:
        self.service.unseal(call.caller, call.str("box"))
        return Reply()

    async def do_NetRestore(self, call: Call) -> Reply:
        results = await self.service.net_restore(call.caller, call.str("box"))
        return Reply({"entries": [r.to_dict() for r in results]})

    def do_Finish(self, call: Call) -> Reply:
        return Reply({"finished": self.service.finish(call.caller, call.opt_str("box"))})

    def do_Status(self, call: Call) -> Reply:
        return Reply(self.service.status(call.caller))

    def do_AcknowledgeLost(self, call: Call) -> Reply:
        return Reply({"acknowledged": self.service.acknowledge_lost(call.caller, call.opt_str("box"))})

    def do_LastLiveUpdate(self, call: Call) -> Reply:
        return Reply({"boxes": self.service.last_live_update(call.caller)})


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
