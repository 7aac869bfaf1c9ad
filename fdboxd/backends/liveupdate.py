"""The ``liveupdate`` backend: plain memfds cross kexec through the kernel's LUO.

The Live Update Orchestrator (``/dev/liveupdate``, Linux >= 6.19, boot with ``kho=on
liveupdate=on``) preserves a memfd's pages in place: after the kexec the same pages come
back, nothing is copied. Only plain shmem memfds (no hugetlb); preserving fills holes
and freezes the size until unseal.

Design (the uAPI is :mod:`fdboxd.uapi_luo`):

- Open boxes are held like the memory backend holds them (a dup per entry, mirrored to
  systemd's fdstore): LUO is involved only while sealed.
- ``seal(box)``: open ``/dev/liveupdate``, create one session named like the box (box
  names are at most 63 bytes, as session names), preserve token 0 = a small JSON memfd
  describing the entries (name, token, type, size, owner), tokens 1.. = the entries;
  rewrite the index session :data:`INDEX_SESSION` (not a valid box name) listing the
  sealed boxes; close the device. Sessions outlive the device fd, so the device is held
  for milliseconds and other agents (systemd >= 261, luod) can open it in between.
- Who keeps a session open until the kexec (the kernel unpreserves a session whose
  last fd closes): not fdboxd, which systemd-shutdown kills first, but a *keeper*,
  handed every sealed session while fdboxd closes its own copy; ``unseal`` asks the
  keeper to drop the session, which unpreserves. Two keepers, chosen at start-up by
  :func:`fdboxd.systemd.choose_luo_keeper` from what the running manager supports:

  - systemd >= 261 with FileDescriptorStorePreserve=yes on the unit: fdboxd's own fd
    store (:class:`fdboxd.systemd.FdStoreKeeper`). What v261 does with it
    (src/core/luo.c, src/shared/luo-util.c): at the kexec PID 1 serializes the fd
    store of every unit with FileDescriptorStorePreserve=yes for systemd-shutdown,
    which puts memfds into one LUO session named ``systemd`` (token 0: a JSON map of
    unit, FDNAME, token). A session fd cannot go into another session (the kernel has
    no handler that can preserve a session file), so an fd that is itself a session
    (``anon_inode:[luo_session] NAME``) is only named in that map and kept open by
    systemd-shutdown until the kexec syscall. After the kexec PID 1 retrieves each by
    name and puts it back in the unit's fd store under its FDNAME; fdboxd gets it in
    ``LISTEN_FDS`` (``carried``). A session is retrieved once (a second
    RETRIEVE_SESSION is EINVAL), so those must be taken from ``LISTEN_FDS``, not by
    name; and since the store keeps them, a restarted fdboxd gets its still-preserved
    sessions back the same way.
  - anything older (Debian 12's 252), or a unit without that setting: the holder
    process (:mod:`fdboxd.backends.luo_holder`, ``argv[0]`` starting with ``@`` so
    systemd-shutdown spares it), as before.
- After the kexec, opening the backend retrieves the index, every session and every
  file — a session the fd store gave back is used as it is, one the holder gave back
  too, any other is retrieved by name and handed to the keeper before it is read — and
  the boxes are reported ``restored`` holding ordinary memfds. Nothing is FINISHed
  then: a start that fails later (a newer manifest, the bus name taken) leaves every
  session with its keeper, and the next start retrieves the same files again.
  :meth:`LiveupdateBackend.started`, called once the daemon has started and (under
  systemd) the fd store's mirror holds the restored files, FINISHes the box sessions,
  the index last, and drops the keeper's copies.
- The index is replaced create-before-drop, through a stand-in session of a second
  name (:data:`INDEX_SESSIONS`), each with a generation: a rewrite that fails half-way
  leaves the old index (or both; the newer is read after the kexec).
- Never twice: a file already preserved (in another session, by fdbox.ko, or named
  twice in fdbox) is refused at seal with ``AlreadyExists``. When ``/dev/fdbox`` is
  available the module is asked too (:meth:`LiveupdateBackend._module_holds`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from .. import failpoints, uapi_luo
from ..errors import FdboxError
from ..fdtypes import FdInfo, FdType, detect
from ..model import BoxState
from . import luo_holder
from .base import OPEN_RETRY_S, BackendBox, BackendEntry
from .memory import MemoryBackend

log = logging.getLogger("fdboxd.liveupdate")

#: The session listing every sealed box's session; a colon keeps it out of box names.
INDEX_SESSION = "fdboxd:index"
#: The index is rewritten create-before-drop, through a stand-in of the second name (a
#: session name exists once); each index records a ``generation`` and after a kexec the
#: highest one that crossed is read (both cross when a rewrite was cut short).
INDEX_SESSIONS = (INDEX_SESSION, "fdboxd:index2")
INDEX_TOKEN = 0
#: Box names that are other agents' session names (systemd >= 261 uses "systemd").
RESERVED_SESSIONS = frozenset({"systemd"})


def _json_memfd(doc: dict[str, Any]) -> int:
    fd = os.memfd_create("fdboxd-luo-index", os.MFD_CLOEXEC)
    os.write(fd, json.dumps(doc, sort_keys=True).encode())
    return fd


def _read_json(fd: int) -> dict[str, Any]:
    size = os.fstat(fd).st_size
    return json.loads(os.pread(fd, size, 0) if size else b"{}")


def _restored_type(rec: dict[str, Any], detected: FdType) -> FdType:
    """A retrieved file's type: the one its seal recorded. LUO's memfd handler makes the
    new memfd with an empty name (mm/memfd_luo.c: memfd_alloc_file("", ...)), which
    :func:`~fdboxd.fdtypes.detect` cannot tell from any tmpfs file: typed ``other``, a
    box restored, claimed and sealed again would preserve none of it."""
    if detected == FdType.OTHER and rec.get("type") == str(FdType.MEMFD):
        return FdType.MEMFD
    return detected


def _luo_error(e: uapi_luo.LuoOSError, what: str, **details: Any) -> FdboxError:
    return FdboxError(e.error_name, f"{what}: {e.strerror}", errno=e.errno, **details)


def device_holders(path: str = uapi_luo.DEVICE_PATH) -> list[str]:
    """``pid N (comm)`` of every other process that has ``path`` open, as far as /proc
    shows them (fdboxd.service's ProtectProc=invisible hides processes it may not trace).

    Only asked when an open got EBUSY: the kernel lets one process at a time hold
    /dev/liveupdate (luod keeps it open; systemd >= 261 opens it at shutdown), and an
    operator needs to know which one, not just that the device was busy.
    """
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return []
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append(f"pid {pid} ({comm})")
                break
    return found


def busy_reason(path: str = uapi_luo.DEVICE_PATH) -> str:
    """The one line that says who holds ``path`` (what Status, the log and errors show)."""
    who = device_holders(path)
    if who:
        return f"{path} is held by {', '.join(who)}"
    return f"{path} is held by another process (not visible to fdboxd: luod, or systemd at shutdown?)"


class DeviceBusy:
    """What the last open of /dev/liveupdate met: ``reason`` is set while it was busy.

    Status reports it until an open succeeds again, so a seal that failed because luod
    held the device says so in ``fdboxctl status`` as well as in its error and the log.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def problems(self) -> list[str]:
        return [self.reason] if self.reason else []


def open_device(path: str = uapi_luo.DEVICE_PATH, wait: float = OPEN_RETRY_S,
                busy: DeviceBusy | None = None) -> uapi_luo.LuoDevice:
    """Open /dev/liveupdate, retrying for up to ``wait`` seconds while another process
    holds it (EBUSY), then failing with one line naming the holder.

    Bounded, not forever: a seal is on the way to a kexec, and systemd's timeout of the
    seal unit would otherwise be the first to say anything. The first EBUSY is logged
    with the holder, and so is the outcome (free after N s, or given up).
    """
    start = time.monotonic()
    reason: str | None = None
    while True:
        try:
            dev = uapi_luo.LuoDevice(path)
        except uapi_luo.LuoOSError as e:
            now = time.monotonic()
            if e.errno == errno.EBUSY:
                if reason is None:
                    reason = busy_reason(path)
                    log.warning("%s; retrying for up to %g s", reason, wait)
                if now - start < wait:
                    time.sleep(0.05)
                    continue
                message = f"{reason}: gave up after {now - start:.1f} s"
                log.error("%s", message)
                if busy is not None:
                    busy.reason = f"{message} ({time.strftime('%Y-%m-%d %H:%M:%S')})"
                raise FdboxError(e.error_name, message, errno=e.errno) from None
            raise FdboxError(e.error_name, f"cannot open {path}: {e.meaning}", errno=e.errno) from None
        if reason is not None:
            log.info("%s became free after %.1f s", path, time.monotonic() - start)
        if busy is not None:
            busy.reason = None
        return dev


class SessionKeeper(Protocol):
    """Keeps sealed session fds open until the kexec: :class:`Holder` or the fd store."""

    def hold(self, name: str, fd: int) -> None: ...
    def drop(self, name: str) -> None: ...
    def close(self) -> None: ...


class FdStore(SessionKeeper, Protocol):
    """The service's fd store (:class:`fdboxd.systemd.FdStoreKeeper`)."""

    keeps_sessions: bool


class Holder:
    """fdboxd's end of the holder process: hold/drop/take session fds by name."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.sock = sock
        self.proc = proc

    @classmethod
    def spawn(cls) -> Holder:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [luo_holder.ARGV0, str(Path(luo_holder.__file__).resolve()), str(theirs.fileno())],
                executable=sys.executable, pass_fds=[theirs.fileno()], cwd="/",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                close_fds=True, start_new_session=True,
                # argv[0] is not a path, so the interpreter cannot find its own
                # installation from it: say where it is (stdlib only, no site-packages).
                env={"PYTHONHOME": f"{sys.base_prefix}:{sys.base_exec_prefix}", "PATH": "/usr/bin:/bin"},
            )
        finally:
            theirs.close()
        return cls(ours, proc)

    @classmethod
    def reclaim(cls, keep: Callable[[str, int], None] | None = None) -> list[tuple[str, int]]:
        """Take the sessions an earlier fdboxd's holder still keeps (after a daemon restart).

        Create before drop: the holder lends them (``lend``: copies, it keeps its own),
        ``keep(name, fd)`` hands each to our keeper, and only once every one is kept is
        the holder told to ``forget`` them; if ``keep`` fails the holder keeps them all.
        A holder from before ``lend`` is asked to ``take`` (send and forget at once).
        Returns ``(name, fd)`` pairs; the fds are the caller's.
        """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(luo_holder.RECLAIM_ADDRESS)
        except OSError:
            s.close()
            return []
        try:
            cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            if int.from_bytes(cred[4:8], sys.byteorder) != os.geteuid():
                log.warning("ignoring a squatter on the LUO holder's reclaim address")
                return []
            s.send(b"lend")
            got, done = cls._received(s)
            lent = done == "ok"
            if not lent:  # an older holder: it knows only "take"
                s.send(b"take")
                got, _done = cls._received(s)
            try:
                for name, fd in got:
                    if keep is not None:
                        keep(name, fd)
            except BaseException:
                for _name, fd in got:
                    os.close(fd)
                raise
            if lent:
                s.send(b"forget")
                if luo_holder.recv_message(s)[0] != b"ok":
                    log.warning("the previous LUO holder did not release its copies: it keeps them until the kexec")
            return got
        finally:
            s.close()

    @staticmethod
    def _received(s: socket.socket) -> tuple[list[tuple[str, int]], str]:
        """The ``fd NAME`` datagrams of a lend or take, and the reply that ended them."""
        got: list[tuple[str, int]] = []
        while True:
            msg, fds = luo_holder.recv_message(s)
            text = msg.decode(errors="replace")
            if text.startswith("fd ") and len(fds) == 1:
                got.append((text[3:], fds[0]))
                continue
            for fd in fds:
                os.close(fd)
            return got, text

    def _call(self, msg: str, fd: int | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder, signed=True))] if fd is not None else []
        try:
            self.sock.sendmsg([msg.encode()], anc)
            reply = self.sock.recv(luo_holder.MAX_MSG).decode(errors="replace")
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"LUO session holder: {e}") from None
        if reply != "ok":
            raise FdboxError("BackendUnavailable", f"LUO session holder: {msg.split()[0]}: {reply or 'gone'}")

    def hold(self, name: str, fd: int) -> None:
        self._call(f"hold {name}", fd)

    def drop(self, name: str) -> None:
        self._call(f"drop {name}")

    def close(self) -> None:
        """Leave: the holder keeps what it holds (until a new fdboxd reclaims it or kexec)."""
        self.sock.close()


class LiveupdateBackend(MemoryBackend):
    """LUO for sealed plain memfds; everything else held in this process.

    Built on :class:`~fdboxd.backends.memory.MemoryBackend` on purpose, and said so by
    its capabilities (:mod:`fdboxd.backends.base`): every entry, open or restored, is a
    dup held in-process (``holds_in_process``: mirrored into systemd's fd store and
    adopted back at a restart), LUO is involved only while a box is sealed, and types
    LUO cannot preserve (taps) are held here too (``holds_every_type``), recorded and
    never sealed into a session.
    """

    name = "liveupdate"
    survives_kexec = True
    holds_in_process = True
    holds_every_type = True

    def __init__(self, device: str = uapi_luo.DEVICE_PATH, fdbox_device: str | None = None,
                 wait: float = OPEN_RETRY_S, carried: list[int] | None = None,
                 fdstore: FdStore | None = None) -> None:
        """``carried``: session fds from ``LISTEN_FDS``; ``fdstore``: the service's fd store."""
        super().__init__()
        self.device = device
        self.fdbox_device = fdbox_device
        #: How long an open retries while another process holds the device (EBUSY).
        self.wait = wait
        self.busy = DeviceBusy()
        self._fdstore = fdstore
        self._keeper: SessionKeeper | None = fdstore if fdstore is not None and fdstore.keeps_sessions else None
        self._sealed: set[str] = set()  # boxes whose session the holder keeps
        #: The index sessions our keeper holds (two only while a rewrite is cut short).
        self._held_index: set[str] = set()
        self._index_generation = 0
        #: Sessions reclaimed from an earlier fdboxd's holder, not yet matched to a box
        #: (the fdstore gives the entries back and seals the box again: see seal()).
        self._orphans: set[str] = set()
        #: Boxes holding only files the fd store gave back (:meth:`adopt`), unchanged
        #: since: the very files an orphan session of that name preserves.
        self._from_store: set[str] = set()
        #: Timings of the last restore (seconds), for the bench and the log.
        self.restore_timing: dict[str, float] = {}
        self._carried: dict[str, uapi_luo.LuoSession] = {}  # retrieved by PID 1, by name
        #: Incoming sessions (after a kexec) that are retrieved and not yet FINISHed, by
        #: name, each with the keeper whose copy keeps it for a restart: FINISHed only by
        #: :meth:`started`, so a start that fails leaves LUO as it found it.
        self._incoming: dict[str, tuple[uapi_luo.LuoSession, SessionKeeper | None]] = {}
        #: Incoming sessions an earlier fdboxd's holder gave back (a start that failed),
        #: re-held by our keeper already.
        self._reclaimed_in: dict[str, uapi_luo.LuoSession] = {}
        outgoing = self._sort_carried(carried or [])
        # Prove the device works now (and take back what the last kernel carried),
        # rather than failing the first seal hours later.
        try:
            dev = open_device(device, wait, self.busy)
        except BaseException:
            # Not restored: close our copies only; the fd store keeps its own for a retry.
            for session in [*self._carried.values(), *outgoing.values()]:
                session.close()
            raise
        try:
            self._reclaim()
            self._restore(dev)
        finally:
            dev.close()
        for name, session in self._carried.items():
            log.warning("LUO session %s from the fd store is not in the index: released once started", name)
            assert self._fdstore is not None  # carried sessions come from it
            self._incoming[name] = (session, self._fdstore)
        self._carried.clear()
        for name, session in self._reclaimed_in.items():
            log.warning("LUO session %s from the holder is not in the index: released once started", name)
            self._incoming[name] = (session, self._keeper)
        self._reclaimed_in.clear()
        self._take_outgoing(outgoing)
        # The holder is started now, not at the first seal: the seal is on the blackout
        # path, and the holder's interpreter start (measured: ~1.5 s of a 2.2 s seal in a
        # TCG guest, bench/liveupdate.py) would be waited for there. Starting it costs
        # the daemon a fork+exec; an idle holder costs one small process, and exits when
        # fdboxd goes away with nothing held.
        self._keeper_or_holder()

    # ------------------------------------------------------------------ contract

    def started(self) -> None:
        """FINISH every incoming session, boxes first and the index last, then drop the
        keeper's copy: LUO releases what was not retrieved (nothing: every file was).
        Until this runs a restart finds every session again (the fd store or the holder
        keeps it) and retrieves the same files; afterwards the restored files are held
        like open ones (in this process, and in the fd store's mirror under systemd)."""
        for name in sorted(self._incoming, key=lambda n: (n in INDEX_SESSIONS, n)):
            failpoints.hit("start.before_finish")
            session, keeper = self._incoming.pop(name)
            self._finish(session, name)
            session.close()
            try:
                if keeper is not None:
                    keeper.drop(name)
            except FdboxError as e:
                log.warning("LUO session %s stays with its keeper: %s", name, e.message)

    def reconciled(self, keep: set[str]) -> None:
        """Match the outgoing sessions to what the store reconciled as sealed.

        A restarted fdboxd takes back every outgoing session (from the holder or the fd
        store) without knowing which seal or unseal the last one finished: a session of a
        box the store has open (a seal killed before its snapshot, an unseal killed before
        its journal's effect) is released, so nothing crosses the kexec unaccounted for;
        its files are the open box's, held here. The index is then rewritten (its content
        cannot be read before a kexec) to list exactly the boxes kept, or dropped when
        none is."""
        for name in sorted(self._sealed - keep):
            try:
                self._keeper_drop(name)
            except FdboxError as e:
                log.error("LUO session %s, of a box not sealed, not released: %s", name, e.message)
                continue
            self._sealed.discard(name)
            self._orphans.discard(name)
            b = self._boxes.get(name)
            if b is not None and b.state == BoxState.SEALED:
                b.state = BoxState.OPEN
            log.warning("LUO session %s released at start-up: the manifest has box %s open "
                        "(a seal or unseal was cut short)", name, name)
        if not self._sealed and not self._held_index:
            return
        dev = None
        try:
            dev = open_device(self.device, self.wait, self.busy)
            self._write_index(dev)
            failpoints.hit("start.after_index_rewrite")
        except (FdboxError, OSError) as e:
            log.error("LUO index not rewritten at start-up (%s): the next seal or unseal rewrites it", e)
        finally:
            if dev is not None:
                dev.close()

    def accepts(self, fd_type: FdType) -> bool:
        return fd_type == FdType.MEMFD

    def problems(self) -> list[str]:
        return super().problems() + self.busy.problems()

    def device_busy(self) -> str | None:
        """Whether another process holds the device right now (preflight asks): the
        one-line reason, or None when it opens. Never waits."""
        try:
            uapi_luo.LuoDevice(self.device).close()
        except uapi_luo.LuoOSError as e:
            return busy_reason(self.device) if e.errno == errno.EBUSY else f"cannot open {self.device}: {e.meaning}"
        return None

    def seal(self, box: str) -> None:
        b = self._box(box)
        if box in self._sealed and box not in self._orphans and b.state == BoxState.SEALED:
            return  # already (systemd's fdstore adoption seals once per entry)
        if box in self._orphans:
            if box in self._from_store:  # the files the session we reclaimed still preserves
                self._orphans.discard(box)
                b.state = BoxState.SEALED
                return
            # Not what that session holds (the carried manifest rewritten, a box put into
            # again after its files were lost): the old session goes, or it would cross
            # instead of what is sealed now.
            self._drop_orphan(box)
        if box in RESERVED_SESSIONS:
            raise FdboxError("InvalidName", f"box {box}: the LUO session name {box!r} belongs to another agent",
                             box=box)
        fds = {name: self._fds[(box, name)] for name, e in b.entries.items() if e.type == FdType.MEMFD}
        self._check_not_preserved(box, fds)
        entries = {}
        for token, name in enumerate(sorted(fds), 1):
            e = b.entries[name]
            entries[name] = {"token": token, "type": str(e.type), "size": os.fstat(fds[name]).st_size,
                             "uid": e.uid, "gid": e.gid}
        dev = open_device(self.device, self.wait, self.busy)
        try:
            session = self._create_session(dev, box)
            try:
                index = _json_memfd({"box": box, "entries": entries})
                try:
                    session.preserve_fd(index, INDEX_TOKEN)
                finally:
                    os.close(index)
                for name, rec in entries.items():
                    try:
                        session.preserve_fd(fds[name], rec["token"])
                    except uapi_luo.LuoOSError as e:
                        raise self._preserve_error(e, box, name) from None
                self._hold(box, session.fd)
            finally:
                session.close()  # the holder has its own copy now (or the seal failed)
            try:
                self._sealed.add(box)
                failpoints.hit("seal.after_session_held")
                self._write_index(dev)
            except BaseException:
                self._sealed.discard(box)
                self._keeper_drop(box)
                try:  # an index made before the failure must not list the box
                    self._write_index(dev)
                except (FdboxError, OSError) as e:
                    log.error("LUO index not rewritten after the failed seal of %s (%s): it may list the "
                              "box; the next seal, unseal or start rewrites it", box, e)
                raise
        finally:
            dev.close()
        b.state = BoxState.SEALED

    def adopt(self, box: str, name: str, fd: int) -> None:
        fresh = box not in self._boxes or box in self._from_store
        super().adopt(box, name, fd)
        if fresh:
            self._from_store.add(box)

    def put(self, box: str, name: str, fd: int, info: FdInfo, uid: int = 0, gid: int = 0) -> None:
        super().put(box, name, fd, info, uid, gid)
        self._from_store.discard(box)

    def remove(self, box: str, name: str) -> None:
        super().remove(box, name)
        self._from_store.discard(box)

    def _drop_orphan(self, box: str) -> None:
        """Release a reclaimed session that no box of ours matches (the kernel unpreserves it)."""
        self._keeper_drop(box)
        self._orphans.discard(box)
        self._sealed.discard(box)
        log.info("LUO session %s left by the previous fdboxd released: box %s changed since", box, box)

    def unseal(self, box: str) -> None:
        b = self._box(box)
        if box in self._sealed:
            self._keeper_drop(box)  # the last fd of the session: the kernel unpreserves
            self._sealed.discard(box)
            dev = None
            try:
                failpoints.hit("unseal.after_session_drop")
                dev = open_device(self.device, self.wait, self.busy)
                self._write_index(dev)
            except (FdboxError, OSError):
                log.exception("index session not rewritten after unsealing %s: the index still lists it, so a "
                              "kexec now logs it not restored (its files are open, held here, and do not cross "
                              "anyway); the next seal or unseal rewrites the index", box)
            finally:
                if dev is not None:
                    dev.close()
        b.state = BoxState.OPEN

    def delete_box(self, box: str) -> None:
        if box in self._sealed:
            self.unseal(box)
        self._from_store.discard(box)
        super().delete_box(box)

    def close(self) -> None:
        for session, _keeper in self._incoming.values():
            session.close()  # not FINISHed (a start that failed): the keeper keeps its copy
        self._incoming.clear()
        for keeper in {id(k): k for k in (self._keeper, self._fdstore) if k is not None}.values():
            keeper.close()
        self._keeper = self._fdstore = None
        super().close()

    # ------------------------------------------------------------------ seal helpers

    def _create_session(self, dev: uapi_luo.LuoDevice, name: str) -> uapi_luo.LuoSession:
        try:
            return dev.create_session(name)
        except uapi_luo.LuoOSError as e:
            if e.errno == errno.EEXIST:
                raise FdboxError("AlreadyExists", f"a LUO session named {name!r} exists already "
                                 "(another agent's, or left by an fdboxd that could not be reclaimed)",
                                 box=name) from None
            raise _luo_error(e, f"create LUO session {name}", box=name) from None

    def _preserve_error(self, e: uapi_luo.LuoOSError, box: str, name: str) -> FdboxError:
        if e.errno == errno.EBUSY:
            return FdboxError("AlreadyExists", f"{box}/{name}: the file is already preserved by LUO "
                              "(in another session, or under a second name)", box=box, name=name)
        if e.errno == errno.ENOENT:
            return FdboxError("UnsupportedType", f"{box}/{name}: LUO cannot preserve this file", box=box, name=name)
        if e.errno == errno.EOPNOTSUPP:
            return FdboxError("UnsupportedType", f"{box}/{name}: LUO cannot preserve this memfd's seals",
                              box=box, name=name)
        return _luo_error(e, f"LUO preserve {box}/{name}", box=box, name=name)

    def _check_not_preserved(self, box: str, fds: dict[str, int]) -> None:
        """Refuse files that are preserved already: LUO would, too (EBUSY), but only after
        a half-made session; the module is asked because only it knows its own."""
        seen: dict[tuple[int, int], str] = {}
        for other in self._sealed:
            held = self._boxes.get(other)
            for n in held.entries if held is not None else ():
                st = os.fstat(self._fds[(other, n)])
                seen[(st.st_dev, st.st_ino)] = f"{other}/{n}"
        for name, fd in sorted(fds.items()):
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise FdboxError("AlreadyExists", f"{box}/{name} is the same file as {seen[key]}, "
                                 "which is or will be preserved: a file is preserved once", box=box, name=name)
            seen[key] = f"{box}/{name}"
            if self._module_holds(fd):
                raise FdboxError("AlreadyExists", f"{box}/{name}: fdbox.ko holds this file; "
                                 "it cannot be preserved twice", box=box, name=name)

    def _module_holds(self, fd: int) -> bool:
        """Whether fdbox.ko holds this file (in any box): PUT_FD refuses such a file
        with EEXIST, so try it on a scratch box. False without the module."""
        path = self.fdbox_device
        if path is None or not os.path.exists(path):
            return False
        from .. import uapi

        probe = "fdboxd.luo-probe"
        try:
            dev = uapi.FdboxDevice(path)
        except OSError:
            return False
        try:
            try:
                dev.create_box(probe)
            except uapi.FdboxOSError as e:
                if e.errno != errno.EEXIST:
                    return False
            try:
                dev.put_fd(probe, "f", fd)
            except uapi.FdboxOSError as e:
                return e.errno == errno.EEXIST
            dev.remove_entry(probe, "f")
            return False
        finally:
            try:
                dev.delete_box(probe)
            except uapi.FdboxOSError:
                pass
            dev.close()

    def _keeper_or_holder(self) -> SessionKeeper:
        """The keeper (the holder process, started now if none was chosen)."""
        if self._keeper is None:
            self._keeper = Holder.spawn()
        return self._keeper

    def _hold(self, name: str, fd: int) -> None:
        self._keeper_or_holder().hold(name, fd)

    def _keeper_drop(self, name: str) -> None:
        if self._keeper is not None:
            self._keeper.drop(name)

    def _write_index(self, dev: uapi_luo.LuoDevice) -> None:
        """Replace the index session with one listing :attr:`_sealed` (none if empty),
        create before drop: a stand-in (``INDEX_SESSIONS[1]``) is made and held
        before the index goes, and the index made again before the stand-in goes, so a
        failure at any step leaves an index listing every box sealed before it, and the
        steady state is the one session :data:`INDEX_SESSION`."""
        if not self._sealed:
            for name in sorted(self._held_index):
                self._drop_index(name)
            return
        if INDEX_SESSION in self._held_index:
            self._put_index(dev, INDEX_SESSIONS[1])
        self._put_index(dev, INDEX_SESSION)

    def _put_index(self, dev: uapi_luo.LuoDevice, name: str) -> None:
        """Create index session ``name``, hold it, then drop every other index held."""
        if name in self._held_index:  # a stale one (reclaimed after a cut-short rewrite)
            self._drop_index(name)
        # A restarted fdboxd cannot read an outgoing index's generation (RETRIEVE_FD is
        # EINVAL before the kexec): the clock orders them across restarts.
        generation = max(self._index_generation + 1, time.time_ns())
        session = self._create_session(dev, name)
        try:
            index = _json_memfd({"version": 1, "generation": generation, "boxes": sorted(self._sealed)})
            try:
                session.preserve_fd(index, INDEX_TOKEN)
            except uapi_luo.LuoOSError as e:
                raise _luo_error(e, "LUO preserve of the index") from None
            finally:
                os.close(index)
            self._hold(name, session.fd)
        finally:
            session.close()
        self._held_index.add(name)
        self._index_generation = generation
        failpoints.hit("seal.after_index_create")
        for old in sorted(self._held_index - {name}):
            self._drop_index(old)

    def _drop_index(self, name: str) -> None:
        """Release an older index session; if that fails it stays preserved and, with a
        lower generation, is never read."""
        try:
            self._keeper_drop(name)
        except FdboxError as e:
            log.warning("older LUO index session %s not released (%s): it crosses too, and is ignored "
                        "after the kexec (a lower generation)", name, e.message)
            return
        self._held_index.discard(name)

    # ------------------------------------------------------------------ restore

    def _restore(self, dev: uapi_luo.LuoDevice) -> None:
        """Retrieve what the previous kernel carried: the index, then every session and
        file. Nothing is FINISHed here (:meth:`started` does): each session is first
        where a restart finds it again (:meth:`_retrieve_kept`)."""
        t0 = time.perf_counter()
        docs: dict[str, dict[str, Any]] = {}
        for name in INDEX_SESSIONS:
            try:
                idx = self._retrieve_kept(dev, name)
            except uapi_luo.LuoOSError as e:
                if e.errno in (errno.ENOENT, errno.EINVAL):
                    continue  # nothing carried (first boot, or a kexec with nothing sealed)
                raise _luo_error(e, f"retrieve the LUO index session {name}") from None
            try:
                docs[name] = self._read_token(idx, INDEX_TOKEN)
            except (uapi_luo.LuoOSError, ValueError) as e:
                log.error("LUO index session %s unreadable: %s", name, e)
        if not docs:
            return
        used = max(docs, key=lambda n: int(docs[n].get("generation", 0)))
        if len(docs) > 1:
            log.info("two LUO index sessions crossed (a rewrite was cut short): %s, the newer, is used", used)
        boxes = docs[used].get("boxes", [])
        t1 = time.perf_counter()
        for box in boxes:
            tb = time.perf_counter()
            try:
                self._restore_box(dev, str(box))
            except (FdboxError, uapi_luo.LuoOSError, ValueError) as e:
                log.error("LUO session %s not restored: %s", box, e)
                continue
            log.info("LUO restore: %s: %d files in %.1f ms", box, len(self._boxes[str(box)].entries),
                     (time.perf_counter() - tb) * 1e3)
        self.restore_timing["retrieve_s"] = time.perf_counter() - t0
        log.info("LUO restore: index %.1f ms, all sessions %.1f ms", (t1 - t0) * 1e3,
                 self.restore_timing["retrieve_s"] * 1e3)

    def _retrieve_kept(self, dev: uapi_luo.LuoDevice, name: str) -> uapi_luo.LuoSession:
        """The incoming session ``name``, recorded in :attr:`_incoming` with the keeper
        whose copy keeps it: the fd store's (PID 1 retrieved it), one the holder gave
        back, or retrieved by name now and handed to our keeper before it is read (a
        session is retrieved once: if this process died holding the only fd, the kernel
        would FINISH it at the close)."""
        session = self._carried.pop(name, None)
        if session is not None:
            assert self._fdstore is not None  # carried sessions come from it
            self._incoming[name] = (session, self._fdstore)
            return session
        session = self._reclaimed_in.pop(name, None)
        if session is None:
            session = dev.retrieve_session(name)
            try:
                self._hold(name, session.fd)
            except FdboxError as e:
                # Going on keeps it in this process at least; failing the start would close it.
                log.error("LUO session %s is held by this process only (%s): a restart before "
                          "the start completes loses it", name, e.message)
                self._incoming[name] = (session, None)
                return session
        self._incoming[name] = (session, self._keeper_or_holder())
        return session

    def _sort_carried(self, fds: list[int]) -> dict[str, uapi_luo.LuoSession]:
        """Sort the fd store's sessions: incoming ones (PID 1 retrieved them after a kexec)
        into :attr:`_carried` for :meth:`_restore`; outgoing ones (a restarted fdboxd,
        no kexec: still preserved) are returned. The kernel tells them apart: RETRIEVE_FD
        on an outgoing session is EINVAL, on an incoming one it gives the file."""
        outgoing: dict[str, uapi_luo.LuoSession] = {}
        for fd in fds:
            session = uapi_luo.LuoSession(fd)
            try:
                name = session.get_name()
            except uapi_luo.LuoOSError as e:
                log.warning("fd %d from the fd store is not a LUO session (%s): closed", fd, e)
                session.close()
                continue
            if self._is_incoming(session):
                self._carried[name] = session
            else:
                outgoing[name] = session
        return outgoing

    @staticmethod
    def _is_incoming(session: uapi_luo.LuoSession) -> bool:
        """Whether a session came from the last kernel: RETRIEVE_FD on an outgoing one
        (still preserved, no kexec since) is EINVAL; an incoming one gives its file (a
        broken incoming one another error, which :meth:`_restore` logs)."""
        try:
            os.close(session.retrieve_fd(INDEX_TOKEN))
        except uapi_luo.LuoOSError as e:
            return e.errno != errno.EINVAL
        return True

    def _take_outgoing(self, outgoing: dict[str, uapi_luo.LuoSession]) -> None:
        """Sessions the fd store kept through a daemon restart: sealed boxes again (their
        entries come back through the manifest and the fdstore mirror, as after a reclaim)."""
        for name, session in outgoing.items():
            try:
                if self._keeper is not self._fdstore:  # the holder keeps them now
                    self._hold(name, session.fd)
                    if self._fdstore is not None:
                        self._fdstore.drop(name)
            finally:
                session.close()  # the keeper has its own copy
            if name in INDEX_SESSIONS:
                self._held_index.add(name)
            else:
                self._orphans.add(name)
                self._sealed.add(name)
        if outgoing:
            log.info("took back %d sealed LUO sessions from the fd store", len(outgoing))

    def _restore_box(self, dev: uapi_luo.LuoDevice, box: str) -> None:
        session = self._retrieve_kept(dev, box)
        desc = self._read_token(session, INDEX_TOKEN)
        b = BackendBox(box, BoxState.RESTORED)
        for name, rec in sorted(desc.get("entries", {}).items()):
            try:
                fd = session.retrieve_fd(int(rec["token"]))
            except uapi_luo.LuoOSError as e:
                log.error("LUO %s/%s not retrieved: %s", box, name, e)
                continue
            info = detect(fd)
            self._set_fd((box, name), fd)
            b.entries[name] = BackendEntry(name, _restored_type(rec, info.type), info.size,
                                           int(rec.get("uid", 0)), int(rec.get("gid", 0)))
        failpoints.hit("restore.after_retrieve")
        self._boxes[box] = b

    @staticmethod
    def _read_token(session: uapi_luo.LuoSession, token: int) -> dict[str, Any]:
        fd = session.retrieve_fd(token)
        try:
            return _read_json(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _finish(session: uapi_luo.LuoSession, name: str) -> None:
        try:
            session.finish()
        except uapi_luo.LuoOSError as e:
            log.warning("LUO session %s: finish failed (%s); released at close", name, e)

    def _reclaim(self) -> None:
        """A restarted fdboxd takes back the sessions the last one's holder keeps: each is
        handed to our keeper at once, then sorted like the fd store's (:meth:`_sort_carried`):
        outgoing ones are sealed boxes again, incoming ones (a start after a kexec that
        failed before :meth:`started`) are restored by :meth:`_restore`."""
        got = Holder.reclaim(self._hold)  # each one held by our keeper before the old holder lets go
        if not got:
            return
        for name, fd in got:
            session = uapi_luo.LuoSession(fd)
            if self._is_incoming(session):
                self._reclaimed_in[name] = session
                continue
            session.close()
            if name in INDEX_SESSIONS:
                # Kept, not closed: it lists the reclaimed sessions, and a kexec before the
                # next seal or unseal rewrites it finds nothing carried without it.
                self._held_index.add(name)
                continue
            self._orphans.add(name)
            self._sealed.add(name)
        log.info("reclaimed %d LUO sessions from the previous fdboxd's holder (%d incoming)",
                 len(got), len(self._reclaimed_in))
