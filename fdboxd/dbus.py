"""The D-Bus front-end: ``io.fdbox1`` at ``/io/fdbox1``, interface ``io.fdbox1.Manager``.

Enabled with ``fdboxd --bus system|session|ADDRESS``; only then is ``dbus_fast`` imported
(the core daemon needs the standard library alone). It runs on the daemon's asyncio
loop, next to the Varlink server, and calls the same :class:`~fdboxd.service.Service`
(the operations and their rules, one instance for both front-ends), so names, limits,
ownership, lending, claiming, the preflight of a seal and errors are the same on both:
a store error ``X`` is the D-Bus error ``io.fdbox1.Error.X``. This module only turns
messages into calls and results into replies.

Why dbus-fast and not pydbus: pydbus (last release 2016) can receive an fd only
through a private attribute and cannot *return* one, so ``Get`` would be impossible.
dbus-fast is maintained, asyncio-native and passes ``h`` both ways once the connection
negotiated fd passing (``negotiate_unix_fd=True``; without it fd calls fail with
``NotSupported``).

Who is calling: the bus tells us, never the message. The sender's unique name is
resolved with one ``org.freedesktop.DBus.GetConnectionCredentials`` call (uid, pid
and, from dbus-daemon, the groups). A unique name belongs to one connection for the
bus's whole life and that connection's credentials are fixed when it authenticates,
so the answer is cached per unique name and dropped on ``NameOwnerChanged``: a
caller costs one extra bus round trip for its first call, none after.

Method calls to our object are taken by a bus message handler (public dbus-fast API)
instead of dbus-fast's own dispatcher, for three reasons the dispatcher cannot serve:
the handler sees the sender (for the uid), it owns the fds that arrived with the call
(dbus-fast never closes received fds: we close them after the call, whatever
happened), and it knows when a reply carrying fds was really written (``bus.send``
returns a future resolved after the write), which is when the fds ``Get`` returns may
be closed. The :class:`Manager` methods below are still declared with dbus-fast's
decorators, so introspection, properties and signals come from one definition.

Entries (``List``, ``PutMany``) are dictionaries ``a{sv}`` with the keys of a Varlink
``Entry``, so ``busctl call`` prints them with their names: ``box`` s, ``name`` s,
``type`` s, ``size`` t, ``uid`` u, ``gid`` u, ``created`` d (seconds since the epoch),
``metadata`` a{ss}; once known ``seals`` x, ``sha256`` s; ``claimed`` b when claimed;
``extra`` s (a JSON object as text) when there is one. Boxes (``ListBoxes``) are
``a{sv}`` too: ``name`` s, ``state`` s, ``entries`` t, ``size`` t, ``owner`` u. Keys may be
added; none is removed or retyped without a new interface name.

``Seal("")`` and ``Finish("")`` mean every box (root only), as a missing ``box`` does
on Varlink. ``SealWithOptions(box, options)`` is ``Seal`` with Varlink's Seal parameters
as ``a{sv}``: ``preflight`` (b) refuses, sealing nothing, when the preflight finds a
problem (the error is the first problem's, as on Varlink); an unknown option is
``InvalidRequest``. ``PutMany(box, [(name, fd index, metadata)])`` stores all or none;
``GetBox(box)`` returns ``[(name, fd index)]``; ``NetRestore(box)`` returns one
``a{sv}`` per interface (``box``, ``name``, ``ifname``, ``status``; ``error`` and
``error_name`` when it failed). ``Preflight()`` returns ``a{sv}`` (``ok``, ``backend``,
``entries``, and ``problems``/``warnings`` as ``aa{ss}`` with the Varlink
``PreflightProblem`` keys). The errors are Varlink's, named ``io.fdbox1.Error.<Name>``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError
from dbus_fast.constants import MessageFlag, NameFlag, PropertyAccess, RequestNameReply
from dbus_fast.service import ServiceInterface, dbus_property

try:
    from dbus_fast.service import dbus_method, dbus_signal
except ImportError:  # dbus-fast < 2 (Debian 12's 1.84): the same decorators, older names
    from dbus_fast.service import method as dbus_method  # type: ignore[no-redef]
    from dbus_fast.service import signal as dbus_signal  # type: ignore[no-redef]

from . import __version__
from .errors import FdboxError, describe
from .model import Caller, Entry, Event
from .service import Got, PutItem, Service
from .varlink.protocol import close_fds

log = logging.getLogger("fdboxd.dbus")

BUS_NAME = "io.fdbox1"
OBJECT_PATH = "/io/fdbox1"
INTERFACE = "io.fdbox1.Manager"
ERROR_PREFIX = "io.fdbox1.Error."
ENTRY_SIGNATURE = "a{sv}"
BOX_SIGNATURE = "a{sv}"

_DBUS = "org.freedesktop.DBus"
_DBUS_PATH = "/org/freedesktop/DBus"
_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
_MAX_CACHED_CALLERS = 4096

#: The caller of the method being run (set by the message handler, read by Manager).
_current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("fdbox_dbus_caller")


@dataclass
class FdReply:
    """A method result that carries fds: ``body`` refers to them by index."""

    body: list[Any]
    fds: list[int]


_ENTRY_TYPES = {"box": "s", "name": "s", "type": "s", "size": "t", "uid": "u", "gid": "u", "created": "d",
                "metadata": "a{ss}", "seals": "x", "sha256": "s", "claimed": "b"}


def entry_dict(e: Entry) -> dict[str, Variant]:
    """An entry as ``a{sv}``: the Varlink ``Entry`` fields under their own names."""
    out = {}
    for key, value in e.to_dict().items():
        if key == "extra":
            out[key] = Variant("s", json.dumps(value, sort_keys=True))
        elif key in _ENTRY_TYPES:
            sig = _ENTRY_TYPES[key]
            out[key] = Variant(sig, float(value) if sig == "d" else value)
    return out


def _dict(d: dict[str, Any], types: dict[str, str]) -> dict[str, Variant]:
    return {k: Variant(types[k], v) for k, v in d.items() if k in types and v is not None}


_BOX_TYPES = {"name": "s", "state": "s", "entries": "t", "size": "t", "owner": "u"}
_NET_TYPES = {"box": "s", "name": "s", "ifname": "s", "status": "s", "error": "s", "error_name": "s"}


def _u32(v: int) -> int:
    return max(0, min(int(v), 0xFFFFFFFF))


def _own_fds(got: Got) -> list[int]:
    """The fds of a Get/GetBox for a reply that may wait in dbus-fast's queue: lent ones
    (the backend's own) are dup'ed, since only the reply's own fds may wait."""
    if not got.borrowed:
        return got.fds
    out: list[int] = []
    try:
        for fd in got.fds:
            out.append(os.dup(fd))  # non-inheritable
    except BaseException:
        close_fds(out)
        raise
    return out


async def _done(result: Any) -> None:
    await result


_SEAL_OPTIONS = frozenset({"preflight"})


class Manager(ServiceInterface):
    """``io.fdbox1.Manager``: one method per :class:`~fdboxd.service.Service` operation, as on Varlink."""

    def __init__(self, service: Service) -> None:
        super().__init__(INTERFACE)
        self.service = service
        self.store = service.store if service is not None else None
        self._shown: dict[str, Any] = {}

    @staticmethod
    def caller() -> Caller:
        return _current_caller.get()

    # ------------------------------------------------------------------ methods

    @dbus_method()
    def Put(self, box: "s", name: "s", fd: "h", metadata: "a{ss}"):  # noqa: F821, N802
        """Store ``fd`` as box/name. The fd is the daemon's to close, and it does."""
        got = self.service.put(self.caller(), box, name, fd, metadata)
        return _done(got) if not isinstance(got, Entry) else None

    @dbus_method()
    def Get(self, box: "s", name: "s") -> "h":  # noqa: F821, N802
        return FdReply([0], _own_fds(self.service.get(self.caller(), box, name)))

    @dbus_method()
    def PutMany(self, box: "s", entries: "a(sha{ss})") -> "aa{sv}":  # noqa: F821, N802
        """Store several fds of one box in one call: all or none (as Varlink's PutMany)."""
        items = [PutItem(name, fd, dict(meta)) for name, fd, meta in entries]
        got = self.service.put_many(self.caller(), box, items)
        if isinstance(got, list):
            return [entry_dict(e) for e in got]

        async def later() -> list[dict[str, Variant]]:
            return [entry_dict(e) for e in await got]

        return later()

    @dbus_method()
    def GetBox(self, box: "s") -> "a(sh)":  # noqa: F821, N802
        got = self.service.get_box(self.caller(), box)
        return FdReply([[[e.name, i] for i, e in enumerate(got.entries)]], _own_fds(got))

    @dbus_method()
    def List(self) -> "aa{sv}":  # noqa: F821, N802
        return [entry_dict(e) for e in self.service.list(self.caller())]

    @dbus_method()
    def ListBoxes(self) -> "aa{sv}":  # noqa: F821, N802
        return [_dict(b, _BOX_TYPES) for b in self.service.list_boxes(self.caller())]

    @dbus_method()
    async def NetRestore(self, box: "s") -> "aa{sv}":  # noqa: F821, N802
        """Recreate the box's recorded network interfaces that are gone (see fdboxd.net)."""
        results = await self.service.net_restore(self.caller(), box)
        return [_dict(r.to_dict(), _NET_TYPES) for r in results]

    @dbus_method()
    def Remove(self, box: "s", name: "s"):  # noqa: F821, N802
        self.service.remove(self.caller(), box, name)

    @dbus_method()
    def DeleteBox(self, box: "s"):  # noqa: F821, N802
        self.service.delete_box(self.caller(), box)

    @dbus_method()
    async def Seal(self, box: "s") -> "as":  # noqa: F821, N802
        """Seal one box, or every open box when ``box`` is '' (root only)."""
        return await self.service.seal(self.caller(), box or None)

    @dbus_method()
    async def SealWithOptions(self, box: "s", options: "a{sv}") -> "as":  # noqa: F821, N802
        """``Seal`` with Varlink's Seal parameters: ``preflight`` (b) refuses, sealing nothing,
        when the preflight of that box (every box when '') finds a problem."""
        unknown = set(options) - _SEAL_OPTIONS
        if unknown:
            raise FdboxError("InvalidRequest", f"unknown option(s) {sorted(unknown)} for SealWithOptions")
        preflight = options["preflight"].value if "preflight" in options else False
        return await self.service.seal(self.caller(), box or None, preflight)

    @dbus_method()
    async def RestoreInto(self, box: "s", name: "s", fd: "h"):  # noqa: F821, N802
        """Fill the caller's new guest_memfd ``fd`` from box/name's carried copy (see fdboxd.gmem)."""
        await self.service.restore_into(self.caller(), box, name, fd)

    @dbus_method()
    def Unseal(self, box: "s"):  # noqa: F821, N802
        self.service.unseal(self.caller(), box)

    @dbus_method()
    def Finish(self, box: "s") -> "as":  # noqa: F821, N802
        """End the restore phase of one box, or of every restored box when '' (root only)."""
        return self.service.finish(self.caller(), box or None)

    @dbus_method()
    def Status(self) -> "a{sv}":  # noqa: F821, N802
        st = self.service.status(self.caller())  # non-root: only the caller's own counts and losses

        def triples(items: list[dict[str, Any]]) -> Variant:
            rows = [[str(i.get("box", "")), str(i.get("name", "")), str(i.get("type", ""))] for i in items]
            return Variant("a(sss)", rows)

        return {
            "version": Variant("s", st["version"]),
            "backend": Variant("s", st["backend"]),
            "survives_kexec": Variant("b", bool(st["survives_kexec"])),
            "state": Variant("s", st["state"]),
            "boxes": Variant("u", _u32(st["boxes"])),
            "entries": Variant("u", _u32(st["entries"])),
            "sealed": Variant("u", _u32(st["sealed"])),
            "restored": Variant("u", _u32(st["restored"])),
            "lost": triples(st["lost"]),
            "adopted": triples(st["adopted"]),
            "problems": Variant("as", [str(x) for x in st["problems"]]),
            "limits": Variant("a{st}", {k: int(v) for k, v in st["limits"].items()}),
            "usage": Variant("a{st}", {k: int(v) for k, v in st["usage"].items()}),
        }

    @dbus_method()
    def Preflight(self) -> "a{sv}":  # noqa: F821, N802
        """Would every entry survive a kexec now (fdboxd.preflight)? As Varlink's Preflight:
        ``ok`` b, ``backend`` s, ``entries`` u, ``problems`` and ``warnings`` aa{ss}."""
        r = self.service.preflight(self.caller())
        return {
            "ok": Variant("b", r.ok),
            "backend": Variant("s", r.backend),
            "entries": Variant("u", _u32(r.entries)),
            "problems": Variant("aa{ss}", [{k: str(v) for k, v in p.to_dict().items()} for p in r.problems]),
            "warnings": Variant("aa{ss}", [{k: str(v) for k, v in p.to_dict().items()} for p in r.warnings]),
        }

    @dbus_method()
    def LastLiveUpdate(self) -> "aa{sv}":  # noqa: F821, N802
        """Each visible box's last live update: box, state, complete, phases (a{sd}: time), durations (a{st}: µs)."""
        out = []
        for r in self.service.last_live_update(self.caller()):
            out.append({
                "box": Variant("s", r["box"]), "state": Variant("s", r["state"]),
                "complete": Variant("b", r["complete"]),
                "phases": Variant("a{sd}", {p["phase"]: float(p["time"]) for p in r["phases"]}),
                "durations": Variant("a{st}", {p["phase"]: int(p["duration_usec"]) for p in r["phases"]
                                               if "duration_usec" in p}),
            })
        return out

    @dbus_method()
    def AcknowledgeLost(self, box: "s") -> "u":  # noqa: F821, N802
        """Forget the caller's lost-entry reports (root: everyone's), of one box or all when ''."""
        return _u32(self.service.acknowledge_lost(self.caller(), box or None))

    # ------------------------------------------------------------------ properties

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":  # noqa: F821, N802
        return self.store.overall_state()

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":  # noqa: F821, N802
        return self.store.backend.name

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":  # noqa: F821, N802
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def EntryCount(self) -> "u":  # noqa: F821, N802
        return _u32(self.store.entry_count())

    # ------------------------------------------------------------------ signals

    @dbus_signal()
    def EntryAdded(self, box: str, name: str, uid: int) -> "ssu":  # noqa: F821, N802
        return [box, name, uid]

    @dbus_signal()
    def EntryRemoved(self, box: str, name: str, uid: int) -> "ssu":  # noqa: F821, N802
        return [box, name, uid]

    @dbus_signal()
    def StateChanged(self, box: str, state: str) -> "ss":  # noqa: F821, N802
        return [box, state]

    def on_event(self, ev: Event) -> None:
        """Store events → signals, then PropertiesChanged for what changed."""
        if ev.kind == "entry-added" and ev.entry is not None:
            self.EntryAdded(ev.box, ev.entry.name, ev.entry.uid)
        elif ev.kind == "entry-removed" and ev.entry is not None:
            self.EntryRemoved(ev.box, ev.entry.name, ev.entry.uid)
        elif ev.kind == "state-changed" and ev.state is not None:
            self.StateChanged(ev.box, str(ev.state))
        self.emit_changes()

    def emit_changes(self) -> None:
        now = {"State": self.store.overall_state(), "EntryCount": _u32(self.store.entry_count())}
        changed = {k: v for k, v in now.items() if self._shown.get(k) != v}
        self._shown.update(now)
        if changed:
            self.emit_properties_changed(changed)


def _complete_introspection() -> dict[str, tuple[str, str, Callable[..., Any]]]:
    """Name every out and signal argument, mark constant properties; return the methods.

    dbus-fast names in-arguments after the Python parameters but leaves results and
    signal arguments unnamed; ``busctl introspect`` and code generators read the names.
    """
    out_names = {"Get": ["fd"], "GetBox": ["entries"], "List": ["entries"], "ListBoxes": ["boxes"],
                 "PutMany": ["entries"], "NetRestore": ["entries"],
                 "Seal": ["sealed"], "SealWithOptions": ["sealed"], "Finish": ["finished"], "Status": ["status"], "Preflight": ["report"],
                 "AcknowledgeLost": ["acknowledged"], "LastLiveUpdate": ["boxes"]}
    signal_names = {"EntryAdded": ["box", "name", "uid"], "EntryRemoved": ["box", "name", "uid"],
                    "StateChanged": ["box", "state"]}
    probe = Manager(None)  # type: ignore[arg-type]
    methods = {}
    for m in ServiceInterface._get_methods(probe):
        for arg, n in zip(m.introspection.out_args, out_names.get(m.name, []), strict=False):
            arg.name = n
        methods[m.name] = (m.in_signature, m.out_signature, m.fn)
    for sig in ServiceInterface._get_signals(probe):
        for arg, n in zip(sig.introspection.args, signal_names.get(sig.name, []), strict=False):
            arg.name = n
    for prop in ServiceInterface._get_properties(probe):
        # dbus-fast < 2 has no annotations on properties: the hint is then left out.
        if prop.name in ("Backend", "Version") and hasattr(prop.introspection, "annotations"):
            prop.introspection.annotations["org.freedesktop.DBus.Property.EmitsChangedSignal"] = "const"
    return methods


# The methods the handler dispatches: name -> (in signature, out signature, function).
_METHODS = _complete_introspection()


class DBusFrontend:
    """Owns the bus connection, the exported :class:`Manager` and the fds in flight."""

    def __init__(self, service: Service, log_op: Callable[..., None] | None = None) -> None:
        self.store = service.store
        self.manager = Manager(service)
        self.log_op = log_op
        self.bus: MessageBus | None = None
        self._callers: OrderedDict[str, asyncio.Future[Caller]] = OrderedDict()
        self._waiting: dict[str, int] = {}  # calls per sender waiting for its identity
        self._in_flight: set[int] = set()  # fds queued in replies, not yet written
        self._tasks: set[asyncio.Future[Any]] = set()
        self._watch: asyncio.Task[Any] | None = None

    async def start(self, bus: str) -> DBusFrontend:
        try:
            # dbus-fast < 2 already connects the socket in the constructor.
            if bus == "system":
                self.bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
            elif bus == "session":
                self.bus = MessageBus(bus_type=BusType.SESSION, negotiate_unix_fd=True)
            else:
                self.bus = MessageBus(bus_address=bus, negotiate_unix_fd=True)
            await self.bus.connect()
        except Exception as e:  # noqa: BLE001 - any failure to reach the bus
            # Not fatal: Varlink is the primary API, and the one moment the bus is
            # missing on purpose is shutdown, when fdbox-seal.service may start us.
            log.error("cannot connect to the D-Bus bus %r: %s; serving Varlink only", bus, e)
            self.bus = None
            return self
        self.bus.add_message_handler(self._on_message)
        self.bus.export(OBJECT_PATH, self.manager)
        await self._bus_call("AddMatch", "s", [
            f"type='signal',sender='{_DBUS}',interface='{_DBUS}',member='NameOwnerChanged'"
        ])
        try:
            reply = await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as e:
            # Typically the policy (io.fdbox1.conf) is not installed, or dbus-daemon was
            # not reloaded since: not fatal, Varlink goes on, the log says what to do.
            log.error("cannot own %s on %s: %s (is io.fdbox1.conf installed and dbus reloaded?); "
                      "serving Varlink only", BUS_NAME, bus, e.text)
            self.bus.disconnect()
            self.bus = None
            return self
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            self.bus.disconnect()
            raise FdboxError("AlreadyExists", f"the D-Bus name {BUS_NAME} is taken on {bus}")
        self.store.subscribe(self.manager.on_event)
        self.manager.emit_changes()  # remember what was shown; nothing is emitted twice
        self._watch = asyncio.ensure_future(self._watch_disconnect(bus))
        log.info("D-Bus: %s at %s on %s", BUS_NAME, OBJECT_PATH, bus)
        return self

    async def _watch_disconnect(self, bus: str) -> None:
        try:
            await self.bus.wait_for_disconnect()  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - the reason is only logged
            log.warning("D-Bus connection to %s lost: %s; Varlink goes on", bus, e)
        else:
            log.info("D-Bus connection to %s closed", bus)
        self._close_in_flight()

    async def close(self) -> None:
        if self.manager.on_event in self.store.listeners:
            self.store.listeners.remove(self.manager.on_event)
        if self.bus is not None and self.bus.connected:
            self.bus.disconnect()
        if self._watch is not None:
            self._watch.cancel()
        self._close_in_flight()

    def _close_in_flight(self) -> None:
        for fd in list(self._in_flight):
            self._release(fd)

    def _release(self, fd: int) -> None:
        if fd in self._in_flight:
            self._in_flight.discard(fd)
            os.close(fd)

    # ------------------------------------------------------------------ dispatch

    def _on_message(self, msg: Message) -> bool:
        """Every message of the connection passes here first; ours are handled here."""
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == _DBUS and len(msg.body) == 3:
                name, _old, new = msg.body
                if not new:
                    self._callers.pop(name, None)
            self._close_received(msg)
            return False
        if msg.message_type != MessageType.METHOD_CALL:
            self._close_received(msg)
            return False
        if msg.path != OBJECT_PATH or msg.interface not in (INTERFACE, None) or msg.member not in _METHODS:
            # Introspect, Properties, Peer, or an unknown method: dbus-fast answers; no
            # method of those takes fds, so any that came along are closed right after.
            self._close_received(msg)
            return False
        fds = list(msg.unix_fds or [])
        for fd in fds:
            os.set_inheritable(fd, False)  # dbus-fast receives without MSG_CMSG_CLOEXEC
        in_sig, out_sig, fn = _METHODS[msg.member]
        if msg.signature != in_sig:
            self._close(fds)
            self._reply(msg, Message.new_error(msg, _INVALID_ARGS,
                                               f"{msg.member} takes ({in_sig}), not ({msg.signature})"), [])
            return True
        try:
            args = self._args(msg, in_sig, fds)
        except FdboxError as e:
            self._close(fds)
            self._reply(msg, Message.new_error(msg, ERROR_PREFIX + e.name, e.message), [])
            return True
        sender = msg.sender
        cached = self._callers.get(sender)
        if (cached is not None and cached.done() and cached.exception() is None
                and not self._waiting.get(sender)):
            self._run(msg, fn, out_sig, args, fds, cached.result())
            return True
        # Wait for the sender's identity; calls queued behind it keep their order
        # (future callbacks run in the order they were added, and no later call of
        # this sender takes the fast path while one is still waiting).
        fut = cached if cached is not None else self._resolve(sender)
        self._waiting[sender] = self._waiting.get(sender, 0) + 1

        def resolved(f: asyncio.Future[Caller]) -> None:
            left = self._waiting.get(sender, 1) - 1
            if left:
                self._waiting[sender] = left
            else:
                self._waiting.pop(sender, None)
            self._run_resolved(msg, fn, out_sig, args, fds, f)

        fut.add_done_callback(resolved)
        return True

    def _args(self, msg: Message, in_sig: str, fds: list[int]) -> list[Any]:
        """The call's arguments with each ``h`` index (at any depth) replaced by the received fd."""
        from dbus_fast.signature import get_signature_tree

        types = get_signature_tree(in_sig).types
        return [_with_fds(t, v, fds) for t, v in zip(types, msg.body, strict=True)]

    def _resolve(self, sender: str) -> asyncio.Future[Caller]:
        fut = asyncio.ensure_future(self._credentials(sender))
        self._callers[sender] = fut
        while len(self._callers) > _MAX_CACHED_CALLERS:
            self._callers.popitem(last=False)
        return fut

    async def _credentials(self, sender: str) -> Caller:
        """uid and pid of ``sender`` in one bus round trip (GetConnectionCredentials)."""
        reply = await self._bus_call("GetConnectionCredentials", "s", [sender])
        creds = reply.body[0] if reply.message_type == MessageType.METHOD_RETURN and reply.body else {}
        uid = creds.get("UnixUserID")
        if uid is None:
            self._callers.pop(sender, None)
            why = reply.error_name if reply.message_type == MessageType.ERROR else "no UnixUserID"
            raise FdboxError("PermissionDenied", f"the bus cannot identify {sender}: {why}")
        uid = int(uid.value)
        pid = int(creds["ProcessID"].value) if "ProcessID" in creds else 0
        return Caller(uid=uid, gid=_gid_of(pid, uid), pid=pid)

    async def _bus_call(self, member: str, signature: str, body: list[Any]) -> Message:
        assert self.bus is not None
        reply = await self.bus.call(Message(destination=_DBUS, path=_DBUS_PATH, interface=_DBUS,
                                            member=member, signature=signature, body=body))
        assert reply is not None
        return reply

    def _run_resolved(self, msg: Message, fn: Callable[..., Any], out_sig: str, args: list[Any],
                      fds: list[int], fut: asyncio.Future[Caller]) -> None:
        exc = fut.exception()
        if exc is not None:
            self._close(fds)
            if isinstance(exc, FdboxError):
                # Typically a caller that sent without waiting for the reply and is gone:
                # nobody can say who it was, so nothing is done for it.
                log.info("%s from %s refused: %s", msg.member, msg.sender, exc.message)
                err = Message.new_error(msg, ERROR_PREFIX + exc.name, exc.message)
            else:
                log.error("cannot identify D-Bus caller %s", msg.sender, exc_info=exc)
                err = Message.new_error(msg, ERROR_PREFIX + "BackendUnavailable", "cannot identify the caller")
            self._reply(msg, err, [])
            return
        self._run(msg, fn, out_sig, args, fds, fut.result())

    def _run(self, msg: Message, fn: Callable[..., Any], out_sig: str, args: list[Any],
             fds: list[int], caller: Caller) -> None:
        token = _current_caller.set(caller)
        try:
            result = fn(self.manager, *args)
        except BaseException as e:  # noqa: BLE001 - every failure becomes a reply
            self._close(fds)
            self._finish(msg, out_sig, caller, None, e)
            return
        finally:
            _current_caller.reset(token)
        if asyncio.iscoroutine(result):
            ctx = contextvars.copy_context()
            ctx.run(_current_caller.set, caller)
            task = ctx.run(asyncio.ensure_future, result)
            self._tasks.add(task)

            def done(t: asyncio.Future[Any]) -> None:
                self._tasks.discard(t)
                self._close(fds)
                if t.cancelled():
                    return
                self._finish(msg, out_sig, caller, None if t.exception() else t.result(), t.exception())

            task.add_done_callback(done)
            return
        self._close(fds)  # the store took its own references (or refused)
        self._finish(msg, out_sig, caller, result, None)

    def _finish(self, msg: Message, out_sig: str, caller: Caller, result: Any, exc: BaseException | None) -> None:
        params = _params(msg)
        if exc is not None:
            name, eparams = describe(exc, msg.member)
            if isinstance(exc, FdboxError) and self.log_op is not None:
                self.log_op(caller, f"{INTERFACE}.{msg.member}", params, exc)
            self._reply(msg, Message.new_error(msg, ERROR_PREFIX + name, eparams["message"]), [])
            return
        if self.log_op is not None:
            self.log_op(caller, f"{INTERFACE}.{msg.member}", params, None)
        if isinstance(result, FdReply):
            body, out_fds = result.body, result.fds
        elif out_sig == "":
            body, out_fds = [], []
        else:
            body, out_fds = [result], []
        try:
            reply = Message.new_method_return(msg, out_sig, body, out_fds)
        except Exception:
            self._close(out_fds)
            raise
        self._reply(msg, reply, out_fds)

    def _reply(self, msg: Message, reply: Message, fds: list[int]) -> None:
        """Send ``reply``; the ``fds`` it carries are closed once written, not before.

        dbus-fast keeps only the fd numbers until the socket is writable, so closing
        them when the handler returns could send a closed (or reused!) number.
        """
        bus = self.bus
        if MessageFlag.NO_REPLY_EXPECTED in msg.flags or bus is None or not bus.connected:
            self._close(fds)
            return
        self._in_flight.update(fds)
        try:
            fut = bus.send(reply)
        except Exception:
            log.exception("cannot send the reply to %s", msg.sender)
            for fd in fds:
                self._release(fd)
            return
        if fds:
            fut.add_done_callback(lambda _f: [self._release(fd) for fd in fds])

    @staticmethod
    def _close(fds: list[int]) -> None:
        close_fds(fds)
        fds.clear()

    def _close_received(self, msg: Message) -> None:
        """Close fds that came with a message we do not handle (they would leak)."""
        if msg.unix_fds:
            fds = list(msg.unix_fds)
            asyncio.get_running_loop().call_soon(self._close, fds)


def _with_fds(t: Any, value: Any, fds: list[int]) -> Any:
    """``value`` of D-Bus type ``t`` with every ``h`` (an index into ``fds``) made the fd."""
    if "h" not in t.signature:
        return value
    if t.token == "h":
        if not isinstance(value, int) or not 0 <= value < len(fds):
            raise FdboxError("InvalidRequest", f"fd index {value}, but the message carried {len(fds)} fds")
        return fds[value]
    if t.token == "a":
        child = t.children[0]
        if child.token == "{":
            return {k: _with_fds(child.children[1], v, fds) for k, v in value.items()}
        return [_with_fds(child, v, fds) for v in value]
    if t.token == "(":
        return [_with_fds(c, v, fds) for c, v in zip(t.children, value, strict=True)]
    return value


def _params(msg: Message) -> dict[str, Any]:
    """The box/name of a call, for the operation log."""
    body = msg.body
    out: dict[str, Any] = {}
    if body and isinstance(body[0], str):
        out["box"] = body[0]
    if len(body) > 1 and isinstance(body[1], str) and msg.member in ("Put", "Get", "Remove"):
        out["name"] = body[1]
    return out


def _gid_of(pid: int, uid: int) -> int:
    """The caller's effective gid: from /proc while its uid still matches, else its passwd group."""
    if pid:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[1]) == uid:
                return int(fields["Gid"].split()[1])
        except (OSError, KeyError, ValueError, IndexError):
            pass
    try:
        import pwd

        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid
