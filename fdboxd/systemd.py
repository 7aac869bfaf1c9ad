"""fdboxd under systemd: notify, watchdog, socket activation, the fdstore, the journal.

Everything here speaks systemd's documented, stable protocols directly with the
standard library instead of going through systemd-python:

- ``sd_notify``: one ``AF_UNIX``/``SOCK_DGRAM`` datagram of ``KEY=value`` lines to
  ``$NOTIFY_SOCKET``, fds as ``SCM_RIGHTS`` (sd_notify(3) calls the protocol stable);
- socket activation: fds 3… with ``$LISTEN_PID``, ``$LISTEN_FDS``, ``$LISTEN_FDNAMES``
  (sd_listen_fds(3));
- the journal's native protocol: a datagram of fields to
  ``/run/systemd/journal/socket`` (systemd.journal-fields(7), "Native Protocol").

Why not systemd-python: it is a C extension that needs libsystemd headers and a
compiler to install (no wheels on PyPI), and the daemon must run where it is missing
(``python3 -m fdboxd --user`` on the standard library alone). The three protocols
above are a few dozen lines, and speaking them ourselves lets the tests point the
daemon at their own notify and journal sockets.

**fdstore self-preservation** (every backend that declares ``holds_in_process``: memory,
liveupdate, and ``auto``'s mixed backend for its LUO side): each fd held by the daemon
itself (:meth:`~fdboxd.backends.base.Backend.peek`) is also pushed to the service's fd
store (``FDSTORE=1``, ``FDNAME=<box>/<entry>``) and taken out again
(``FDSTOREREMOVE=1``) when the entry goes. When the service restarts, systemd hands
the fds back in ``LISTEN_FDS``; :func:`adopt_store_fds` gives them to the backend
(:meth:`~fdboxd.backends.base.Backend.adopt`) *before* the store is built, so the
store's reconciliation sees them (owners and metadata come from the manifest).

FDNAME encoding: systemd's ``fdname_is_valid`` accepts printable ASCII except ``:``
(the ``LISTEN_FDNAMES`` separator), at most 255 characters. Box and entry names are
already inside that set and neither may contain ``/``, so ``<box>/<entry>`` is
unambiguous; socket fds (``FileDescriptorName=varlink``) have no ``/``. If the pair is
longer than 255 characters (a 63-character box and a long entry), the name is
``<box>/#<sha256 of the entry name>`` and the entry is found again through the
manifest (``#`` cannot occur in an entry name).

**LUO sessions in the fd store** (systemd >= 261, :class:`FdStoreKeeper`): a sealed
box's LUO session fd is pushed as ``FDNAME=luo#<session>`` (``:`` of
``fdboxd:index`` written ``#``; no ``/``, so it is never taken for an entry), and comes
back in ``LISTEN_FDS`` (:attr:`Activation.luo_sessions`). Which keeper holds the
sessions is decided by :func:`choose_luo_keeper`; the reasons are in
:mod:`fdboxd.backends.liveupdate`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import select
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import failpoints
from .backends.base import Backend
from .errors import FdboxError
from .manifest import Manifest
from .model import BoxState, Caller
from .names import check_box_name, check_entry_name
from .sdnotify import Notifier
from .store import Event, Store

log = logging.getLogger("fdboxd.systemd")

SD_LISTEN_FDS_START = 3
FDNAME_MAX = 255
JOURNAL_SOCKET = "/run/systemd/journal/socket"


# ---------------------------------------------------------------------- fd names


def fdname_is_valid(name: str) -> bool:
    """systemd's rule (src/basic/fd-util.c): printable ASCII but ':', ≤ 255 chars."""
    return len(name) <= FDNAME_MAX and all(32 <= ord(c) < 127 and c != ":" for c in name)


def _hashed(entry: str) -> str:
    return "#" + hashlib.sha256(entry.encode()).hexdigest()


def fdname_for(box: str, entry: str) -> str:
    """The FDNAME of entry ``box/entry`` (see the module docstring)."""
    plain = f"{box}/{entry}"
    return plain if len(plain) <= FDNAME_MAX else f"{box}/{_hashed(entry)}"


def parse_fdname(fdname: str) -> tuple[str, str] | None:
    """``(box, entry-or-#hash)`` of an entry's FDNAME, ``None`` for anything else."""
    box, sep, rest = fdname.partition("/")
    if not sep or not box or not rest:
        return None
    return box, rest


LUO_FDNAME_PREFIX = "luo#"


def luo_fdname(session: str) -> str:
    """The FDNAME of LUO session ``session`` in the fd store (``:`` is not allowed there)."""
    return LUO_FDNAME_PREFIX + session.replace(":", "#")


# ---------------------------------------------------------------------- activation


@dataclass
class Activation:
    """What systemd passed in ``LISTEN_FDS``: the Varlink listener and stored entries."""

    listener: socket.socket | None = None
    store_fds: list[tuple[str, int]] = field(default_factory=list)  # (fdname, fd)
    #: LUO session fds the fd store gave back (``luo#…``): for the liveupdate backend.
    luo_sessions: list[tuple[str, int]] = field(default_factory=list)  # (fdname, fd)
    #: FDNAMEs adopted into the backend, so they need not be pushed again.
    adopted: set[str] = field(default_factory=set)

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None, unset: bool = True) -> Activation:
        env = os.environ if environ is None else environ
        act = cls()
        try:
            pid = int(env.get("LISTEN_PID", "0"))
            count = int(env.get("LISTEN_FDS", "0"))
        except ValueError:
            pid, count = 0, 0
        names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
        if unset:
            for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(k, None)
        if pid != os.getpid() or count <= 0:
            return act
        if len(names) != count:
            names = ["unknown"] * count
        for i, name in enumerate(names):
            fd = SD_LISTEN_FDS_START + i
            try:
                os.set_inheritable(fd, False)
                st = os.fstat(fd)
            except OSError:
                log.warning("LISTEN_FDS names fd %d (%s) but it is not open", fd, name)
                continue
            if name.startswith(LUO_FDNAME_PREFIX):
                act.luo_sessions.append((name, fd))
            elif parse_fdname(name) is not None:
                act.store_fds.append((name, fd))
            elif act.listener is None and stat.S_ISSOCK(st.st_mode) and _is_listening_stream(fd):
                act.listener = socket.socket(fileno=fd)
                log.info("socket activation: Varlink listener from fd %d (%s)", fd, name)
            else:
                log.warning("ignoring passed fd %d named %r", fd, name)
                os.close(fd)
        return act


def _is_listening_stream(fd: int) -> bool:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return (s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM
                and bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)))
    except OSError:
        return False
    finally:
        s.close()


def adopt_store_fds(act: Activation, backend: Backend, manifest: Manifest) -> list[str]:
    """Give the fdstore's fds to a backend that ``holds_in_process``, before the store is
    built; then seal, once each, the boxes the manifest records sealed (all adopted
    first: a LUO seal preserves the box's files as they are then).

    Returns the FDNAMEs that could not be adopted (their fds are closed; the caller
    removes them from the fdstore once the notify socket is known).
    """
    refused: list[str] = []
    if not act.store_fds:
        return refused
    if not backend.holds_in_process:
        log.warning("%d fds from the fd store ignored: backend %s keeps its own", len(act.store_fds), backend.name)
        for name, fd in act.store_fds:
            os.close(fd)
            refused.append(name)
        act.store_fds = []
        return refused
    try:
        data = manifest.load()
    except FdboxError as e:
        log.error("manifest unreadable (%s): fd store entries adopted without owners", e.message)
        data = None
    sealed: list[str] = []
    for fdname, fd in act.store_fds:
        parsed = parse_fdname(fdname)
        assert parsed is not None
        box, entry = parsed
        mbox = data.boxes.get(box) if data else None
        if entry.startswith("#"):
            match = [e for e in (mbox.entries if mbox else {}) if fdname_for(box, e) == fdname]
            entry = match[0] if match else entry[1:]  # unknown: named by its hash
        try:
            check_box_name(box)
            check_entry_name(entry)
            backend.adopt(box, entry, fd)
        except (FdboxError, OSError) as e:
            log.warning("fd store entry %r not adopted: %s", fdname, e)
            os.close(fd)
            refused.append(fdname)
            continue
        act.adopted.add(fdname_for(box, entry))
        if mbox is not None and mbox.state == BoxState.SEALED and box not in sealed:
            sealed.append(box)
    failpoints.hit("adopt.before_seal")
    for box in sealed:
        try:
            backend.seal(box)
        except (FdboxError, OSError) as e:  # the store's reconciliation sees it open
            log.error("box %s, sealed before the restart, not sealed again: %s", box, e)
    log.info("adopted %d fds from the systemd fd store", len(act.adopted))
    act.store_fds = []
    return refused


# ---------------------------------------------------------------------- notify


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2 / 1_000_000


class SystemdIntegration:
    """READY/STATUS/WATCHDOG/STOPPING and the fdstore mirror of a running daemon."""

    def __init__(self, store: Store, activation: Activation, refused: list[str] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.store = store
        self.activation = activation
        self.notifier = notifier or Notifier()
        self.refused = refused or []
        self._watchdog: asyncio.Task[Any] | None = None
        self._pin: int | None = None
        self._stopping = False
        #: Mirror held fds into the fd store: what the backend declares, not its class.
        self.mirror = self.notifier.enabled and store.backend.holds_in_process

    def attach(self, state_dir: str | None = None) -> None:
        """Subscribe to the store and bring the fdstore in line with what is held."""
        if not self.notifier.enabled:
            return
        self.store.subscribe(self.on_event)
        if state_dir is not None:
            self._pin_state_dir(state_dir)
        if not self.mirror:
            return
        for fdname in self.refused:
            self.notifier.send(f"FDSTOREREMOVE=1\nFDNAME={fdname}")
        backend = self.store.backend
        pushed = 0
        for e in self.store.list(_ROOT):
            name = fdname_for(e.box, e.name)
            if name in self.activation.adopted:
                continue
            fd = backend.peek(e.box, e.name)
            if fd is None:
                continue  # held by the kernel, or recorded only (a tap to recreate)
            if self._push(name, fd):
                pushed += 1
        if pushed:
            log.info("pushed %d held fds to the systemd fd store", pushed)

    def _push(self, fdname: str, fd: int) -> bool:
        if not fdname_is_valid(fdname):  # cannot happen with valid names; checked anyway
            log.error("not pushing %r to the fd store: invalid FDNAME", fdname)
            return False
        return self.notifier.send(f"FDSTORE=1\nFDNAME={fdname}", [fd])

    def on_event(self, ev: Event) -> None:
        if self.mirror and ev.entry is not None:
            name = fdname_for(ev.box, ev.entry.name)
            if ev.kind == "entry-added":
                fd = self.store.backend.peek(ev.box, ev.entry.name)
                if fd is not None:
                    self._push(name, fd)
            elif ev.kind == "entry-removed":
                self.notifier.send(f"FDSTOREREMOVE=1\nFDNAME={name}")
        self.notifier.send(f"STATUS={self.status_text()}")

    def status_text(self) -> str:
        st = self.store.status()
        return (f"{st['boxes']} boxes, {st['entries']} entries, {st['sealed']} sealed, "
                f"{st['restored']} restored; backend {st['backend']}")

    def ready(self) -> None:
        if not self.notifier.enabled:
            return
        self.notifier.send(f"READY=1\nSTATUS={self.status_text()}\nMAINPID={os.getpid()}")
        interval = watchdog_interval()
        if interval is not None:
            self._watchdog = asyncio.ensure_future(self._feed(interval))

    async def _feed(self, interval: float) -> None:
        """Ping from the event loop itself: a stuck loop stops the pings, as it should."""
        while True:
            self.notifier.send("WATCHDOG=1", droppable=True)
            await asyncio.sleep(interval)

    def stopping(self) -> None:
        """STOPPING=1, once; the watchdog stops with it."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not self._stopping:
            self._stopping = True
            self.notifier.send("STOPPING=1\nSTATUS=stopping")

    def close(self) -> None:
        self.stopping()
        if self.on_event in self.store.listeners:
            self.store.listeners.remove(self.on_event)
        if self._pin is not None:
            os.close(self._pin)
            self._pin = None
        self.notifier.close()

    def _pin_state_dir(self, path: str) -> None:
        """Hold the state directory open so shutdown cannot unmount it under a seal.

        At ``systemctl kexec`` fdboxd keeps running through shutdown.target (its unit
        does not conflict with it) while fdbox-seal.service writes the sealed manifest;
        a separate ``/var`` is unmounted by umount.target in parallel. An open fd makes
        that unmount fail (EBUSY) until systemd-shutdown kills us and remounts it
        read-only, after the manifest was fsync'ed.
        """
        try:
            self._pin = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            log.debug("cannot pin %s: %s", path, e)


_ROOT = Caller(uid=0, gid=0, pid=0)


# ---------------------------------------------------------------------- LUO keeper

#: The first systemd whose PID 1 carries fd-store LUO sessions across kexec (NEWS, v261).
FDSTORE_LUO_VERSION = 261
#: PID 1's own Varlink socket (io.systemd.Manager; Describe gives runtime.Version).
MANAGER_VARLINK = "/run/systemd/io.systemd.Manager"
#: Set by units/optional/fdboxd.service.d/10-fdstore-preserve.conf beside
#: FileDescriptorStorePreserve=yes: systemd passes no variable that says so itself.
PRESERVE_ENV = "FDBOX_FDSTORE_PRESERVE"


def parse_manager_version(text: object) -> int | None:
    """The major version of a systemd version string: ``"261.2-1"``, ``"v262~rc1"`` -> 261, 262."""
    m = re.match(r"v?(\d+)", text) if isinstance(text, str) else None
    return int(m.group(1)) if m else None


def manager_version(address: str = MANAGER_VARLINK, timeout: float = 1.0) -> int | None:
    """The running manager's version from ``io.systemd.Manager.Describe``; None if it cannot say.

    Asked of PID 1 itself, not of ``systemctl --version``: after a package upgrade the
    binary on disk is newer than the manager that will serialize the fd store at the
    kexec. No socket (systemd < 257, or no systemd) means an older manager.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(address)
        s.sendall(json.dumps({"method": "io.systemd.Manager.Describe"}).encode() + b"\0")
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\0" not in buf and len(buf) < (1 << 20) and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        reply = json.loads(buf.partition(b"\0")[0])
        return parse_manager_version(reply["parameters"]["runtime"]["Version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("no manager version from %s: %s", address, e)
        return None
    finally:
        s.close()


@dataclass(frozen=True)
class KeeperChoice:
    """Who keeps sealed LUO sessions open until the kexec, and why (one log line)."""

    fdstore: bool
    reason: str


def choose_luo_keeper(version: int | None, notify: bool, fdstore_max: int, preserve: bool) -> KeeperChoice:
    """systemd's fd store when the manager carries it across kexec, else the holder process.

    All four must hold: the manager is systemd >= 261 (``version``), fdboxd is its
    service with a notify socket (``notify``) and an fd store (``fdstore_max``, systemd's
    ``$FDSTORE``), and the unit sets FileDescriptorStorePreserve=yes (``preserve``): PID 1
    serializes only such units' stores at the kexec.
    """
    if version is None:
        return KeeperChoice(False, "the manager's version is unknown (no io.systemd.Manager)")
    if version < FDSTORE_LUO_VERSION:
        return KeeperChoice(False, f"systemd {version} < {FDSTORE_LUO_VERSION} does not carry the fd store across kexec")
    if not notify:
        return KeeperChoice(False, f"systemd {version}, but fdboxd is not its service (no $NOTIFY_SOCKET)")
    if fdstore_max <= 0:
        return KeeperChoice(False, f"systemd {version}, but the unit has no fd store (FileDescriptorStoreMax=)")
    if not preserve:
        return KeeperChoice(False, f"systemd {version}, but the unit does not set FileDescriptorStorePreserve=yes "
                                   f"(${PRESERVE_ENV})")
    return KeeperChoice(True, f"systemd {version} carries the fd store across kexec (FileDescriptorStorePreserve=yes)")


class FdStoreKeeper:
    """Sealed LUO sessions in the service's own fd store, the holder's job on systemd >= 261.

    ``hold`` pushes the session (``FDSTORE=1``, ``FDPOLL=0``: a session fd has no poll
    of its own) and ``drop`` removes it (``FDSTOREREMOVE=1``; systemd closes its copy,
    the last one, and the kernel unpreserves). Both end with ``BARRIER=1`` and wait for
    systemd to close the barrier pipe, i.e. to have processed the message: a ``drop``
    is followed at once by a new session of the same name (EEXIST while the old one
    lives), and a seal must not report success before PID 1 holds the session.
    ``keeps_sessions`` is the choice (:func:`choose_luo_keeper`); with False the keeper
    still removes sessions that came back from the store and are done with.
    """

    def __init__(self, notifier: Notifier, keeps_sessions: bool = True, barrier_timeout: float = 5.0) -> None:
        self.notifier = notifier
        self.keeps_sessions = keeps_sessions
        self.barrier_timeout = barrier_timeout

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None,
                     manager: str = MANAGER_VARLINK) -> FdStoreKeeper | None:
        """The keeper of this service's fd store (None without one), the choice logged."""
        env = os.environ if environ is None else environ
        notifier = Notifier(env.get("NOTIFY_SOCKET", ""))
        try:
            fdstore_max = int(env.get("FDSTORE", "0"))
        except ValueError:
            fdstore_max = 0
        if not notifier.enabled:
            return None
        choice = choose_luo_keeper(manager_version(manager), True, fdstore_max, env.get(PRESERVE_ENV) == "yes")
        log.info("LUO sessions are kept by %s: %s",
                 "systemd's fd store" if choice.fdstore else "the holder process", choice.reason)
        return cls(notifier, choice.fdstore)

    def _send(self, text: str, fds: list[int] | None = None) -> None:
        if not self.notifier.send(text, fds or []):
            raise FdboxError("BackendUnavailable", f"systemd fd store: {text.splitlines()[0]} not sent")
        self.barrier()

    def hold(self, name: str, fd: int) -> None:
        self._send(f"FDSTORE=1\nFDNAME={luo_fdname(name)}\nFDPOLL=0", [fd])

    def drop(self, name: str) -> None:
        self._send(f"FDSTOREREMOVE=1\nFDNAME={luo_fdname(name)}")

    def barrier(self) -> None:
        """sd_notify_barrier(3): wait until systemd processed everything sent before."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            sent = self.notifier.send("BARRIER=1", [w])
            os.close(w)
            w = -1
            p = select.poll()
            p.register(r, select.POLLHUP)
            if not sent or not p.poll(self.barrier_timeout * 1000):
                raise FdboxError("BackendUnavailable", "systemd did not confirm the fd store change "
                                 f"within {self.barrier_timeout:g} s (BARRIER=1)")
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def close(self) -> None:
        """Leave: the fd store keeps what it holds (until a new fdboxd takes it, or the kexec)."""
        self.notifier.close()


# ---------------------------------------------------------------------- journal


_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def under_journald(stream: Any = None) -> bool:
    """True if ``stream`` (stderr) is the journal stream systemd gave us ($JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


class JournalHandler(logging.Handler):
    """Send records with the journal's native protocol, ``FDBOX_*`` extras as fields.

    ``log.info("...", extra={"FDBOX_BOX": "vm1", "FDBOX_OP": "Put"})`` becomes a journal
    entry ``journalctl FDBOX_BOX=vm1`` finds. If the datagram cannot be sent, the line
    goes to stderr (which journald also reads) so nothing is lost.
    """

    def __init__(self, path: str | None = None, identifier: str = "fdboxd") -> None:
        super().__init__()
        self.path = path or os.environ.get("FDBOX_JOURNAL_SOCKET") or JOURNAL_SOCKET
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.fallback = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(logging.Formatter("fdboxd: %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, str] = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
                "LOGGER": record.name,
            }
            for k, v in record.__dict__.items():
                if k.startswith("FDBOX_") and v is not None:
                    fields[k] = str(v)
            self.sock.sendto(encode_journal_fields(fields), self.path)
        except OSError:
            self.fallback.emit(record)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def encode_journal_fields(fields: dict[str, str]) -> bytes:
    """The native protocol: ``KEY=value\\n``, or ``KEY\\n<le64 size><value>\\n`` if multi-line."""
    out = bytearray()
    for k, v in fields.items():
        data = v.encode("utf-8", "replace")
        if b"\n" in data:
            out += k.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += k.encode() + b"=" + data + b"\n"
    return bytes(out)


LINE_FORMAT = "fdboxd: %(levelname)s %(message)s"


#: How long the line of a call (a record with ``FDBOX_OP``) may wait on the event loop
#: to be written together with the lines after it.
LINE_BATCH_SECONDS = 0.05


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """:data:`LINE_FORMAT` lines on stderr, a plain record (no exception, no stack)
    without the Formatter's generic steps.

    Every state-changing call logs one line, and a ``write()`` per line was a tenth of
    a request's CPU: the lines of calls served on the event loop are held for at most
    :data:`LINE_BATCH_SECONDS` and written in one go. Any other record (a warning, a
    line from a worker thread) writes what is held first, in order; so do shutdown
    and :meth:`flush`. A SIGKILL can lose the held lines, never the journal's changes.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.exc_info or record.stack_info:
                self._write_held()
                super().emit(record)
                return
            line = f"fdboxd: {record.levelname} {record.getMessage()}\n"
            if "FDBOX_OP" in record.__dict__ and self._hold(line):
                return
            self._held.append(line)
            self._write_held()
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)

    def take_call_line(self, line: str) -> None:
        """A call's line, whole (``LINE_FORMAT`` and a newline), as if logged at INFO."""
        self.acquire()
        try:
            if not self._hold(line):
                self._held.append(line)
                self._write_held()
                self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must not raise
            pass
        finally:
            self.release()

    def _hold(self, line: str) -> bool:
        """Hold a call's line if this runs on the event loop (the first one held sets
        the timer that writes them); False elsewhere, where it is written now."""
        aio = sys.modules.get("asyncio")
        try:
            loop = aio.get_running_loop() if aio is not None else None
        except RuntimeError:
            loop = None
        if loop is None:
            return False
        if not self._held:
            loop.call_later(LINE_BATCH_SECONDS, self.flush)
        self._held.append(line)
        return True

    def _write_held(self) -> None:
        if self._held:
            data = "".join(self._held)
            self._held.clear()
            self.stream.write(data)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_held()
        finally:
            self.release()
        super().flush()


def hold_call_line(line: str) -> bool:
    """Give a call's INFO line straight to the stderr :class:`LineHandler` when it is the
    one handler logging has (as :func:`setup_logging` leaves it): True if taken. The
    journal, or any other set-up, gets a record instead (False: log it)."""
    handlers = logging.root.handlers
    if len(handlers) != 1 or type(handlers[0]) is not LineHandler or handlers[0].filters:
        return False
    handlers[0].take_call_line(line)
    return True


def setup_logging(level: str) -> None:
    """Journal fields when stderr is journald's stream, plain lines on stderr otherwise."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # No record names a thread or process: skip the lookups every record would make
    # (a fifth of the cost of the one INFO line each change logs).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if under_journald():
        handler: logging.Handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = LineHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LINE_FORMAT))
        # A plain line names no source file: skip the stack walk (findCaller) every
        # record makes, as the logging docs' "Optimization" section says. The journal
        # keeps it: CODE_FILE/CODE_LINE come from it.
        logging._srcfile = None
    root.handlers[:] = [handler]
