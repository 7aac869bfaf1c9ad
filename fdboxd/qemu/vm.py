"""start / suspend / status of one fdbox-held QEMU VM (see the package docstring)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import socket
import stat
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import failpoints, paths
from ..client import Client
from ..errors import FdboxError
from ..names import check_box_name
from . import taps as tapmod
from .taps import TapSpec

if TYPE_CHECKING:
    from .qmp import QMPClient

DEVSTATE = "devstate"
RAM_RE = re.compile(r"ram(\d+)")
HUGETLB_FLAGS = {"2M": os.MFD_HUGETLB | (21 << 26), "1G": os.MFD_HUGETLB | (30 << 26)}
HUGETLB_SIZES = {"2M": 2 << 20, "1G": 1 << 30}
MIN_QEMU = (5, 0, 0)      # -machine memory-backend= (x-ignore-shared is 4.0)
CPR_REBOOT_QEMU = (8, 2, 0)
# Options fdbox-qemu sets itself; the same in QEMU-ARGS would fight over the RAM.
OWN_OPTIONS = ("-m", "-mem-path", "-incoming", "-numa")
MIGRATE_POLL = 0.002
# How long the helper waits for QEMU to listen and load (the unit's TimeoutStartSec= is 5 min).
START_TIMEOUT = 300.0
# ram0's metadata keys recording the start's QEMU-ARGS and binary: `upgrade`'s defaults.
META_ARGS, META_QEMU = "qemu_args", "qemu"
# Under fdboxd's 4096-byte metadata limit, with room for the other keys.
MAX_RECORDED_ARGS = 3072


class Plan:
    """What ``start`` will exec: argv, the fds to keep, and whether it resumes. (A plain
    class: ``dataclasses`` and the ``inspect`` behind it are not imported on this path.)"""

    __slots__ = ("argv", "keep_fds", "resume_fd", "runstate", "created", "box_created")

    def __init__(self, argv: list[str], keep_fds: list[int], resume_fd: int | None = None,
                 runstate: str = "running", created: list[str] | None = None, box_created: bool = False) -> None:
        self.argv = argv
        self.keep_fds = keep_fds
        self.resume_fd = resume_fd
        self.runstate = runstate
        self.created: list[str] = [] if created is None else created
        self.box_created = box_created


def default_qemu() -> str:
    return os.environ.get("FDBOX_QEMU", "qemu-system-x86_64")


def default_run_dir() -> str:
    """Where QMP sockets live: /run/fdbox/qemu for root, the user's runtime dir otherwise."""
    if os.geteuid() == 0:
        return "/run/fdbox/qemu"
    return os.path.join(paths.user_runtime_dir(), "qemu")


def qmp_path(run_dir: str, vm: str) -> str:
    return os.path.join(run_dir, f"{vm}.qmp")


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``512MiB``, ``1073741824`` → bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        raise FdboxError("InvalidRequest", f"bad size {text!r}: want e.g. 64M, 1G or a byte count")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def ensure_run_dir(run_dir: str) -> None:
    """Create ``run_dir`` 0700 and refuse one that another user owns or that is a symlink."""
    os.makedirs(os.path.dirname(run_dir) or ".", mode=0o755, exist_ok=True)
    try:
        os.mkdir(run_dir, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(run_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise FdboxError("PermissionDenied", f"{run_dir} is not a private directory of uid {os.geteuid()}")


class VMLock:
    """``RUN_DIR/VM.lock``, flocked: one ``suspend`` or ``upgrade`` of a VM at a time (two
    migrations of one QEMU would undo each other). ``wait``: seconds to wait for the
    other one to finish (0: not at all); then ``AlreadyExists``."""

    def __init__(self, run_dir: str, vm: str, wait: float) -> None:
        self.fd = os.open(os.path.join(run_dir, f"{vm}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                          0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise FdboxError("AlreadyExists", f"a suspend or upgrade of VM {vm} is running", box=vm) from None
                time.sleep(0.01)

    def __enter__(self) -> VMLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        os.close(self.fd)


def qemu_alive(path: str) -> bool:
    """Whether something listens on the QMP socket ``path`` (without waiting in its backlog)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        s.connect(path)
        return True
    except BlockingIOError:
        return True  # its backlog is full: QEMU is there, busy with another client
    except OSError:
        return False
    finally:
        s.close()


def vm_state(qemu: str | None, has_devstate: bool) -> str:
    """``running``, ``suspended`` (no QEMU, a devstate to resume from), ``resuming`` (QEMU
    up, the device state not loaded or not yet dropped), ``stopped`` (RAM held, nothing to
    resume: the next start boots), or QEMU's own word (``paused``, ``prelaunch``, …)."""
    if qemu is None or qemu == "not running":
        return "suspended" if has_devstate else "stopped"
    if qemu.startswith("unreachable"):
        return "unreachable"
    if qemu == "inmigrate" or has_devstate:
        return "resuming"
    return qemu


def box_state(c: Client, vm: str) -> str | None:
    for b in c.list().get("boxes", []):
        if b.get("name") == vm:
            return str(b.get("state"))
    return None


def reopen(fd: int, flags: int) -> int:
    """A new open file description of the same file: its own offset, so QEMU reading the
    device state does not move the offset of the copy fdboxd holds."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


# ---------------------------------------------------------------------- start


def check_qemu_args(qemu_args: Sequence[str]) -> None:
    """Refuse QEMU-ARGS that set what fdbox-qemu sets (the RAM, -incoming)."""
    for a in qemu_args:
        if "-" + a.lstrip("-").split("=", 1)[0] in OWN_OPTIONS and a.startswith("-"):
            raise FdboxError("InvalidRequest", f"QEMU-ARGS must not contain {a}: fdbox-qemu sets the RAM and -incoming itself")
        if "memory-backend=" in a:
            raise FdboxError("InvalidRequest", "QEMU-ARGS must not set memory-backend: fdbox-qemu does")


def qemu_argv(qemu: str, ram: Sequence[tuple[int, int]], taps: Sequence[tuple[TapSpec, list[int]]], qmp: str) -> list[str]:
    """QEMU's argv up to the user's QEMU-ARGS: the RAM (fd, size) as shared file backends,
    the taps' queue fds, and QMP on ``qmp``."""
    argv = [qemu]
    for i, (fd, size) in enumerate(ram):
        argv += ["-object", f"memory-backend-file,id=ram{i},size={size},mem-path=/proc/self/fd/{fd},share=on"]
    argv += ["-m", f"{sum(size for _, size in ram) >> 10}K"]
    if len(ram) == 1:
        argv += ["-machine", "memory-backend=ram0"]
    else:
        for i in range(len(ram)):
            argv += ["-numa", f"node,nodeid={i},memdev=ram{i}"]
    for t, fds in taps:
        argv += tapmod.netdev_args(t, fds)
    argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv


def recorded_args(entry: dict[str, Any]) -> tuple[list[str] | None, str | None]:
    """The QEMU-ARGS and QEMU binary a start recorded in ram0's metadata (None: not recorded)."""
    meta = entry.get("metadata") or {}
    args = None
    if META_ARGS in meta:
        try:
            loaded = json.loads(meta[META_ARGS])
        except ValueError:
            loaded = None
        if isinstance(loaded, list) and all(isinstance(a, str) for a in loaded):
            args = loaded
    return args, meta.get(META_QEMU)


def plan_start(c: Client, vm: str, ram: Sequence[int], hugetlb: str | None, qemu_args: Sequence[str],
               qmp: str, qemu: str, taps: Sequence[TapSpec] = ()) -> Plan:
    """Get or create the RAM and tap entries, pick boot or resume, and build QEMU's argv.

    Everything is checked before anything is created, and what is created (RAM memfds,
    taps) is put in one ``PutMany``: a refused start leaves the box as it was.
    """
    tapmod.check_unique(taps)
    check_qemu_args(qemu_args)
    page = HUGETLB_SIZES[hugetlb] if hugetlb else os.sysconf("SC_PAGE_SIZE")
    for i, size in enumerate(ram):
        if size % page:
            raise FdboxError("InvalidRequest", f"ram{i}: {size} bytes is not a multiple of the {page}-byte page size")
    state = box_state(c, vm)
    if state == "sealed":
        raise FdboxError("Sealed", f"box {vm} is sealed (ready for kexec): unseal it first (fdboxctl unseal {vm})", box=vm)
    got: dict[str, tuple[dict[str, Any], int]] = {}
    if state is not None:
        got = {e["name"]: (e, fd) for e, fd in c.get_box(vm)}
    try:
        plan = _plan(c, vm, ram, hugetlb, qemu_args, qmp, qemu, got, taps)
        plan.box_created = state is None and bool(plan.created)
        return plan
    finally:
        for _, fd in got.values():
            if fd >= 0:
                os.close(fd)


def _plan(c: Client, vm: str, ram: Sequence[int], hugetlb: str | None, qemu_args: Sequence[str],
          qmp: str, qemu: str, got: dict[str, tuple[dict[str, Any], int]], taps: Sequence[TapSpec]) -> Plan:
    stored = sorted((int(m.group(1)), n) for n in got if (m := RAM_RE.fullmatch(n)))
    want_type = "memfd-hugetlb" if hugetlb else "memfd"
    keep: list[int] = []
    ram_fds: list[int] = []
    created: list[str] = []
    items: list[tuple[str, int, dict[str, str]]] = []
    held = tapmod.held({n: e for n, (e, _) in got.items()})
    if unasked := sorted(set(held) - {t.ifname for t in taps}):
        raise FdboxError("InvalidRequest", f"box {vm} holds tap {unasked[0]}, but no --tap {unasked[0]} was given; "
                         "give it, or remove its entries first (fdboxctl rm)", box=vm)
    for t in taps:
        if t.ifname in held:
            tapmod.check_held(vm, t, held[t.ifname])
    tap_fds: dict[str, list[int]] = {}
    try:
        if stored:
            if [i for i, _ in stored] != list(range(len(ram))):
                raise FdboxError("InvalidRequest", f"box {vm} holds {', '.join(n for _, n in stored)}, "
                                 f"but --ram was given {len(ram)} time(s)", box=vm)
            for i, size in enumerate(ram):
                e, fd = got[f"ram{i}"]
                if int(e["size"]) != size:
                    raise FdboxError("InvalidRequest", f"{vm}/ram{i} holds {_mib(int(e['size']))}, --ram says {_mib(size)}",
                                     box=vm, name=f"ram{i}")
                if e["type"] != want_type:
                    raise FdboxError("InvalidRequest", f"{vm}/ram{i} is {e['type']}, but this start asks for {want_type}"
                                     + (f" ({hugetlb} pages)" if hugetlb else ""), box=vm, name=f"ram{i}")
                ram_fds.append(reopen(fd, os.O_RDWR))
        else:
            if DEVSTATE in got:
                raise FdboxError("InvalidRequest", f"box {vm} holds a devstate but no RAM: refusing to resume on fresh RAM", box=vm)
            # MFD_ALLOW_SEALING: fdbox.ko refuses to SEAL a hugetlb memfd that has F_SEAL_SEAL
            # (it must add F_SEAL_FUTURE_WRITE while sealed; see kmod/README.md).
            flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | (HUGETLB_FLAGS[hugetlb] if hugetlb else 0)
            for i, size in enumerate(ram):
                try:
                    fd = os.memfd_create(f"{vm}-ram{i}", flags)
                except OSError as e:
                    raise FdboxError("UnsupportedType", f"cannot create a {want_type} for ram{i}: {e.strerror}") from None
                ram_fds.append(fd)
                try:
                    os.ftruncate(fd, size)
                except OSError as e:
                    raise FdboxError("LimitExceeded", f"cannot size ram{i} to {_mib(size)}: {e.strerror}") from None
                meta = {"vm": vm}
                if i == 0:  # the defaults of a later `upgrade`
                    recorded = json.dumps(list(qemu_args))
                    if len(recorded) <= MAX_RECORDED_ARGS:
                        meta.update({META_ARGS: recorded, META_QEMU: qemu})
                items.append((f"ram{i}", fd, meta))
        for t in taps:
            if t.ifname in held:
                tap_fds[t.ifname] = fds = []
                for i in range(t.queues):
                    fds.append(got[t.entry(i)][1])  # a tap cannot be reopened: QEMU gets this very fd
                    got[t.entry(i)] = (got[t.entry(i)][0], -1)  # now ours (closed on failure below)
                    tapmod.attach(fds[-1])
            else:
                tap_fds[t.ifname] = fds = tapmod.create(t)
                meta = {"vm": vm, "tap": t.ifname, "queues": str(t.queues), **({"bridge": t.bridge} if t.bridge else {})}
                items += [(t.entry(i), fd, dict(meta, queue=str(i))) for i, fd in enumerate(fds)]
        if items:
            c.put_many(vm, items)
            created = [name for name, _, _ in items]
        plan = Plan(argv=qemu_argv(qemu, list(zip(ram_fds, ram, strict=True)),
                                   [(t, tap_fds[t.ifname]) for t in taps], qmp),
                    keep_fds=keep, created=created)
        keep += ram_fds
        for t in taps:
            keep += tap_fds[t.ifname]
        if DEVSTATE in got:
            e, fd = got[DEVSTATE]
            plan.resume_fd = reopen(fd, os.O_RDONLY)
            keep.append(plan.resume_fd)
            plan.runstate = e.get("metadata", {}).get("runstate", "running")
            # -S: QEMU must not continue the guest on its own once the state is loaded; the
            # helper continues it only after devstate is gone from the box (a QEMU crash
            # later must never find a devstate older than the RAM).
            plan.argv += ["-incoming", "defer", "-S"]
        plan.argv += list(qemu_args)
        return plan
    except BaseException:
        for fd in ram_fds + [fd for fds in tap_fds.values() for fd in fds]:
            os.close(fd)
        raise


def start(vm: str, ram: Sequence[int], hugetlb: str | None, qemu_args: Sequence[str], *,
          socket_path: str | None, run_dir: str, qemu: str, taps: Sequence[TapSpec] = ()) -> int:
    """Set up and exec QEMU (does not return unless the exec fails).

    A start that fails before QEMU runs the guest (QEMU missing, refusing an argument,
    exiting before its QMP answers) removes what this start put into the box (the RAM
    and taps it created, and the box if it created it) and says so; what it found in the
    box (a suspended VM's RAM and devstate) it never touches.
    """
    check_box_name(vm)
    if not ram:
        raise FdboxError("InvalidRequest", "--ram SIZE is required")
    ensure_run_dir(run_dir)
    qmp = qmp_path(run_dir, vm)
    if qemu_alive(qmp):
        raise FdboxError("AlreadyExists", f"VM {vm} is already running (QMP at {qmp})", box=vm)
    try:
        os.unlink(qmp)  # stale socket of a QEMU that died
    except FileNotFoundError:
        pass
    with Client(socket_path) as c:
        plan = plan_start(c, vm, ram, hugetlb, qemu_args, qmp, qemu, taps)
    # QEMU holds the write end until it exits: the helper sees EOF when it is gone, even
    # while it is a zombie nobody reaped (kill(pid, 0) cannot tell); a byte instead says
    # the exec failed and this process undoes the start itself.
    watch_r, watch_w = os.pipe()
    try:
        failpoints.hit("qemu.start.after_put")
        for fd in plan.keep_fds:
            os.set_inheritable(fd, True)
        # systemd's notify socket is the helper's to use, not QEMU's (QEMU does not speak it).
        notify = os.environ.pop("NOTIFY_SOCKET", None)
        if plan.resume_fd is not None or notify or plan.created:
            _spawn_helper(vm, qmp, plan, socket_path, notify, watch_r, watch_w)
        os.close(watch_r)
        failpoints.hit("qemu.start.before_exec")
        os.set_inheritable(watch_w, True)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execvp(plan.argv[0], plan.argv)
        except OSError as e:
            raise FdboxError("BackendUnavailable", f"cannot run {plan.argv[0]}: {e.strerror}") from None
    except BaseException as e:
        try:
            os.write(watch_w, b"x")  # the helper leaves the undo to this process
        except OSError:
            pass
        if plan.created:
            note = undo_start(vm, plan.created, plan.box_created, socket_path)
            if isinstance(e, FdboxError):
                raise FdboxError(e.name, f"{e.message}; {note}", **e.params) from None
            if isinstance(e, OSError):
                raise FdboxError("BackendUnavailable", f"{e}; {note}") from None
        raise
    return 127  # pragma: no cover


def undo_start(vm: str, created: Sequence[str], box_created: bool, socket_path: str | None) -> str:
    """Remove the entries a failed start created (and its box, if the start created it
    and nothing else is in it); what was done, in words."""
    removed: list[str] = []
    try:
        failpoints.hit("qemu.start.before_undo")
        with Client(socket_path) as c:
            for name in created:
                c.remove(vm, name)
                removed.append(name)
            gone = False
            if box_created and not c.list(vm).get("entries"):
                c.delete_box(vm)
                gone = True
    except (FdboxError, OSError) as e:
        left = [n for n in created if n not in removed]
        why = e.message if isinstance(e, FdboxError) else str(e)
        return (f"removed {', '.join(removed) or 'nothing'} of what this start created; "
                f"{', '.join(left)} left in box {vm} ({why}): fdboxctl rm {vm} NAME")
    return f"removed {', '.join(removed)}" + (f" and box {vm}" if gone else "") + " (created by this start)"


class QemuWatch:
    """The helper's view of the QEMU being exec'd: gone (EOF on the pipe whose write end
    QEMU holds), or an exec that failed (the start process wrote a byte)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.exec_failed = False

    def gone(self) -> bool:
        if not select.select([self.fd], [], [], 0)[0]:
            return False
        self.exec_failed = os.read(self.fd, 1) == b"x"
        return True


def _spawn_helper(vm: str, qmp: str, plan: Plan, socket_path: str | None, notify: str | None,
                  watch_r: int, watch_w: int) -> None:
    """Fork (twice, so QEMU never has to reap it) the process that loads the device state
    (when resuming), tells systemd ``READY=1`` (when ``notify`` is set) and, when QEMU
    never came up, removes what this start created (:func:`undo_start`).

    A fork, not a new program: no interpreter starts on the resume path for it, and the
    one process does all three jobs. READY comes once the guest runs as it should (running,
    or paused if it was suspended paused or QEMU-ARGS hold ``-S``) and, on a resume,
    once ``devstate`` is gone from the box: a suspend that ``systemctl start`` let
    through can then never race the helper's removal. The unit is ``Type=notify`` with
    ``NotifyAccess=all``; the main pid stays QEMU's, as before.
    """
    qemu_pid = os.getpid()  # exec keeps it
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    code = 1
    resuming = plan.resume_fd is not None
    watch = QemuWatch(watch_r)
    try:
        if os.fork():
            os._exit(0)
        os.close(watch_w)
        # Imported here, after the fork: QEMU's exec (the parent) does not wait for them.
        from ..sdnotify import Notifier
        for fd in plan.keep_fds:  # the helper holds no guest memory
            if fd != plan.resume_fd:
                os.close(fd)
        try:
            if resuming:
                assert plan.resume_fd is not None
                times = resume(vm, qmp, plan.resume_fd, plan.runstate, socket_path, qemu_pid, watch=watch)
                note = f"resumed (device state loaded in {times['load_ms']:.1f} ms)"
            else:
                note = f"started ({wait_started(qmp, qemu_pid, watch=watch)})"
        except QemuGone as e:
            if watch.exec_failed:  # the start process reports and undoes it
                code = 0
                return
            msg = f"fdbox-qemu: {vm}: {'resume' if resuming else 'start'} failed: {e.message}"
            if plan.created:
                msg += "; " + undo_start(vm, plan.created, plan.box_created, socket_path)
            if resuming:
                msg += "; devstate kept in the box"
            print(msg, file=sys.stderr)
            return
        if notify:
            n = Notifier(notify)
            n.send(f"READY=1\nSTATUS={note}")
            n.barrier()
            n.close()
        code = 0
    except FdboxError as e:
        print(f"fdbox-qemu: {vm}: {'resume' if resuming else 'start'} failed: {e.message}", file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - report anything, never return into the exec path
        print(f"fdbox-qemu: {vm}: {'resume' if resuming else 'start'} failed: {e!r}", file=sys.stderr)
    finally:
        sys.stderr.flush()
        os._exit(code)


class QemuGone(FdboxError):
    """QEMU exited (or was never exec'd) before it answered on QMP."""

    def __init__(self, message: str) -> None:
        super().__init__("BackendUnavailable", message)


def _connect_when_up(qmp: str, qemu_pid: int, deadline: float, watch: QemuWatch | None = None) -> QMPClient:
    """QEMU's QMP, as soon as the QEMU being exec'd listens on it."""
    from .qmp import QMPClient

    while True:
        try:
            return QMPClient(qmp, timeout=max(1.0, deadline - time.monotonic()))
        except FdboxError:
            if watch is not None:
                if watch.gone():
                    raise QemuGone("QEMU exited before it listened on QMP" if not watch.exec_failed
                                   else "QEMU could not be run") from None
            else:
                try:
                    os.kill(qemu_pid, 0)
                except ProcessLookupError:
                    raise QemuGone("QEMU exited before it listened on QMP") from None
            if time.monotonic() > deadline:
                raise FdboxError("BackendUnavailable", f"QEMU did not open {qmp} in time") from None
            time.sleep(0.005)


def wait_started(qmp: str, qemu_pid: int, timeout: float = START_TIMEOUT, watch: QemuWatch | None = None) -> str:
    """A booting VM: QEMU's run state once QMP answers (``running``, or ``prelaunch`` with -S)."""
    with _connect_when_up(qmp, qemu_pid, time.monotonic() + timeout, watch) as q:
        return str(q.execute("query-status")["status"])


def resume(vm: str, qmp: str, devstate_fd: int, runstate: str, socket_path: str | None, qemu_pid: int,
           timeout: float = START_TIMEOUT, watch: QemuWatch | None = None) -> dict[str, float]:
    """In the helper: wait for QEMU's QMP, load the device state, drop devstate, continue.

    QEMU runs with ``-S``, so the guest stays paused after the load until devstate is
    gone from the box: a guest that ran never leaves a devstate behind it for a later
    start to load over RAM that moved on. Any failure before the removal quits QEMU (the
    guest never ran: the box is as before this start, a new start resumes). A removal
    that fails leaves the guest paused and raises: if fdboxd cannot say whether devstate
    is still there, QEMU keeps the only loaded copy and stays for the operator. Once
    devstate is gone the guest is continued whatever happens (a helper killed in that
    instant leaves it paused in QEMU, the only holder of its state: ``status`` says
    ``paused``, and a QMP ``cont`` goes on).
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    q = _connect_when_up(qmp, qemu_pid, deadline, watch)
    times: dict[str, float] = {}
    with q:
        t1 = time.monotonic()
        try:
            _set_migration(q)
            q.execute("migrate-incoming", {"uri": f"fd:{devstate_fd}"})
            os.close(devstate_fd)  # QEMU has its own (inherited) copy
            wait_migration(q, "load", deadline)
            while q.execute("query-status")["status"] == "inmigrate":
                if time.monotonic() > deadline:
                    raise FdboxError("BackendUnavailable", "QEMU loaded the device state but stays in inmigrate")
                time.sleep(MIGRATE_POLL)
            times["load_ms"] = (time.monotonic() - t1) * 1000
            failpoints.hit("qemu.resume.after_load")
        except (FdboxError, OSError) as e:
            _quit_unresumed(vm, q)
            if isinstance(e, OSError):
                raise FdboxError("BackendUnavailable", f"{e}; QEMU quit, the guest did not run") from None
            raise FdboxError(e.name, f"{e.message}; QEMU quit, the guest did not run", **e.params) from None
        _drop_devstate(vm, q, socket_path)
        # Past the point of no return: the loaded QEMU holds the only copy of the device
        # state, so nothing may stop the guest from continuing now.
        try:
            failpoints.hit("qemu.resume.before_cont")
        except OSError as e:
            print(f"fdbox-qemu: {vm}: {e} after devstate was dropped: continuing the guest anyway", file=sys.stderr)
        if runstate == "running" and q.execute("query-status")["status"] != "running":
            q.execute("cont")
    times["total_ms"] = (time.monotonic() - t0) * 1000
    print(f"fdbox-qemu: {vm}: resumed (device state loaded in {times['load_ms']:.1f} ms)", file=sys.stderr)
    return times


def _quit_unresumed(vm: str, q: QMPClient) -> None:
    try:
        q.execute("quit")
    except FdboxError as e:
        if e.name == "BackendUnavailable":
            return  # QEMU is gone already (a QEMU that cannot load the state exits)
        print(f"fdbox-qemu: {vm}: could not quit QEMU after the failed resume: {e.message}", file=sys.stderr)


def _drop_devstate(vm: str, q: QMPClient, socket_path: str | None) -> None:
    """Remove devstate before the guest continues; on failure, ask again whether it is
    still there: yes → quit QEMU (the box is as before); unknown → leave QEMU paused."""
    try:
        with Client(socket_path) as c:
            c.remove(vm, DEVSTATE)
        return
    except (FdboxError, OSError) as e:
        why = e.message if isinstance(e, FdboxError) else str(e)
    try:
        with Client(socket_path) as c:
            still = any(e["name"] == DEVSTATE for e in c.list(vm).get("entries", []))
    except (FdboxError, OSError):
        raise FdboxError("BackendUnavailable", f"device state loaded, but devstate could not be removed from box {vm} "
                         f"({why}) and fdboxd cannot say whether it is still there: the guest stays paused in QEMU, "
                         f"not continued; once fdboxd answers, either `fdboxctl rm {vm} {DEVSTATE}` and continue it "
                         f"(QMP cont), or quit QEMU and start again", box=vm) from None
    if still:
        _quit_unresumed(vm, q)
        raise FdboxError("BackendUnavailable", f"devstate could not be removed from box {vm} ({why}): the guest was "
                         "not continued and QEMU quit; the box is as before this start: start again", box=vm)
    # The removal went through (its answer was lost): the guest may continue.


def _set_migration(q: QMPClient) -> None:
    if q.version < MIN_QEMU:
        raise FdboxError("InvalidRequest", "QEMU %d.%d.%d is too old: fdbox-qemu needs 5.0 or newer" % q.version)
    q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    if q.version >= CPR_REBOOT_QEMU:
        q.execute("migrate-set-parameters", {"mode": "cpr-reboot"})


def wait_migration(q: QMPClient, what: str, deadline: float) -> dict[str, Any]:
    while True:
        info = q.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise FdboxError("InvalidRequest", f"QEMU's device state {what} {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise FdboxError("BackendUnavailable", f"QEMU's device state {what} did not finish (status {status})")
        time.sleep(MIGRATE_POLL)


# ---------------------------------------------------------------------- suspend


def suspend(vm: str, *, socket_path: str | None, run_dir: str, timeout: float = 120.0) -> dict[str, Any]:
    """Save the VM's device state into the box as ``devstate`` and quit QEMU.

    Any failure before QEMU quits continues the guest if it was running: a failed
    suspend leaves the VM as it was.
    """
    check_box_name(vm)
    qmp = qmp_path(run_dir, vm)
    if not qemu_alive(qmp) and not os.path.isdir(run_dir):
        raise FdboxError("NotFound", f"VM {vm} is not running (no QEMU on {qmp})", box=vm)
    t0 = time.monotonic()
    deadline = t0 + timeout
    with VMLock(run_dir, vm, wait=timeout):  # an upgrade running now finishes first
        return _suspend_locked(vm, qmp, socket_path, t0, deadline)


def _suspend_locked(vm: str, qmp: str, socket_path: str | None, t0: float, deadline: float) -> dict[str, Any]:
    from .qmp import QMPClient

    if not qemu_alive(qmp):
        raise FdboxError("NotFound", f"VM {vm} is not running (no QEMU on {qmp})", box=vm)
    with QMPClient(qmp) as q, Client(socket_path) as c:
        status = q.execute("query-status")["status"]
        if status in ("inmigrate", "postmigrate", "finish-migrate"):
            raise FdboxError("InvalidRequest", f"VM {vm} is {status}: not suspendable now", box=vm)
        state = box_state(c, vm)
        if state is None:
            raise FdboxError("NotFound", f"no box {vm}: this QEMU was not started by fdbox-qemu", box=vm)
        if state == "sealed":
            raise FdboxError("Sealed", f"box {vm} is already sealed", box=vm)
        entries = {e["name"]: e for e in c.list(vm).get("entries", [])}
        rams = sorted(n for n in entries if RAM_RE.fullmatch(n))
        if not rams:
            raise FdboxError("InvalidRequest", f"box {vm} has no RAM entries", box=vm)
        for n in rams:  # x-ignore-shared skips only shared RAM: anything else would be copied
            if q.execute("qom-get", {"path": f"/objects/{n}", "property": "share"}) is not True:
                raise FdboxError("InvalidRequest", f"QEMU's {n} is not a shared memory backend", box=vm)
        _set_migration(q)
        running = status == "running"
        t_stop = time.monotonic()
        if running:
            q.execute("stop")
        memfd = os.memfd_create(f"{vm}-devstate", os.MFD_CLOEXEC)
        put_done = False
        try:
            try:
                failpoints.hit("qemu.suspend.after_stop")
                t_save = time.monotonic()
                q.execute("getfd", {"fdname": "fdbox-devstate"}, fds=[memfd])
                q.execute("migrate", {"uri": "fd:fdbox-devstate"})
                wait_migration(q, "save", deadline)
                t_put = time.monotonic()
                if DEVSTATE in entries:  # stale: left by a resume that could not remove it
                    c.remove(vm, DEVSTATE)
                    failpoints.hit("qemu.suspend.after_stale_remove")
                meta = {"runstate": "running" if running else "paused", "qemu": "%d.%d.%d" % q.version}
                c.put(vm, DEVSTATE, memfd, meta)
                put_done = True
                t_quit = time.monotonic()
                failpoints.hit("qemu.suspend.after_devstate")
            except BaseException:
                if put_done and not _undo_devstate(vm, c, q):
                    raise  # QEMU quit: the VM is suspended after all
                if running:
                    try:
                        q.execute("cont")
                    except FdboxError as e:
                        print(f"fdbox-qemu: {vm}: could not continue the guest after the failed suspend: {e.message}",
                              file=sys.stderr)
                raise
            size = os.fstat(memfd).st_size
        finally:
            os.close(memfd)
        q.execute("quit")
        q.wait_closed(timeout=max(1.0, deadline - time.monotonic()))
        t_end = time.monotonic()
    return {"vm": vm, "devstate_bytes": size, "was": status,
            "stop_ms": (t_save - t_stop) * 1000, "save_ms": (t_put - t_save) * 1000,
            "put_ms": (t_quit - t_put) * 1000, "quit_ms": (t_end - t_quit) * 1000,
            "total_ms": (t_end - t0) * 1000}


def _undo_devstate(vm: str, c: Client, q: QMPClient) -> bool:
    """A suspend failed after its devstate was put: remove it before the guest may
    continue (a running guest never leaves a devstate behind). If it cannot be removed,
    quit QEMU instead (the stopped guest matches the devstate: the VM is suspended);
    False then."""
    try:
        c.remove(vm, DEVSTATE)
        return True
    except (FdboxError, OSError) as e:
        print(f"fdbox-qemu: {vm}: the suspend failed after devstate was put, and devstate cannot be removed "
              f"({e}): QEMU quits, the VM stays suspended", file=sys.stderr)
    try:
        q.execute("quit")
    except FdboxError:
        pass
    return False


# ---------------------------------------------------------------------- status


def status(vm: str, *, socket_path: str | None, run_dir: str) -> dict[str, Any]:
    """Box state, entries and QEMU's run state (``not running`` if no QEMU answers)."""
    check_box_name(vm)
    qmp = qmp_path(run_dir, vm)
    out: dict[str, Any] = {"vm": vm, "qmp": qmp, "box": None, "entries": [], "qemu": "not running"}
    with Client(socket_path) as c:
        out["box"] = box_state(c, vm)
        if out["box"] is not None:
            out["entries"] = [{"name": e["name"], "type": e["type"], "size": e["size"]}
                              for e in c.list(vm).get("entries", [])]
    if qemu_alive(qmp):
        try:
            from .qmp import QMPClient

            with QMPClient(qmp, timeout=5.0) as q:
                out["qemu"] = q.execute("query-status")["status"]
                out["qemu_version"] = "%d.%d.%d" % q.version
        except FdboxError as e:
            out["qemu"] = f"unreachable ({e.message})"
    has_devstate = any(e["name"] == DEVSTATE for e in out["entries"])
    out["resumable"] = has_devstate and out["qemu"] == "not running"
    out["state"] = vm_state(out["qemu"], has_devstate)
    if out["box"] is None and out["qemu"] == "not running":
        raise FdboxError("NotFound", f"no VM {vm}: no box and no QEMU", box=vm)
    return out
