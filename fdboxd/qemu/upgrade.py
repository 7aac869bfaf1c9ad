"""``fdbox-qemu upgrade``: replace a running VM's QEMU, moving only its device state.

The old QEMU keeps running while the new one starts on the same fdbox-held RAM (the
``ramN`` memfds, reopened) and the same taps (the very queue fds the box holds), with
``-incoming defer -S`` and its QMP under ``RUN_DIR/upgrade/VM.qmp``. Once it listens,
the old QEMU migrates to it over a unix socket with ``x-ignore-shared`` (the RAM is
shared, so only device state moves: the guest pauses for that alone), and the new QEMU
is continued: that ``cont`` is the switch. Then the old QEMU quits and the new QEMU's
QMP socket is renamed to ``RUN_DIR/VM.qmp`` (after the old one has exited: QEMU unlinks
the path it bound when it exits).

Never two QEMUs running the guest, nor none: any failure before the switch (the new
QEMU refuses its arguments, exits, does not listen, the migration or the load fails)
kills the new QEMU, waits for it to be gone, and only then continues the old one if it
was running; a failure after the switch leaves the new one running and makes sure the
old one is gone (it is stopped, postmigrate: a SIGKILL loses nothing). The box is never
changed. An upgrade that is itself killed midway leaves its new QEMU behind; the next
upgrade of that VM first quits it if it is still ``inmigrate`` (it never ran the guest),
or finishes the switch if the device state had moved (the old QEMU ``postmigrate``):
killed in that window of a few milliseconds, the upgrade leaves the guest paused until
it is run again.

QEMU-ARGS default to the ones ``start`` recorded in ``ram0``'s metadata. A QEMU of
another version needs a versioned machine type (``-machine pc-i440fx-7.2``): the device
state of an unversioned one (``pc``, ``q35``) means something else in each version, so
that combination is refused before anything moves.

Taps while the new QEMU is ``inmigrate`` (measured with QEMU 7.2, docs/integrating.md):
it reads at most one frame per tap queue, the first one that comes after it started,
holds it in its net queue and stops reading that queue until the guest runs in it; the
old QEMU gets every later frame. After the switch the new QEMU delivers the held frame
(late, maybe out of order); after a failed upgrade it dies with the new QEMU (one lost
frame per queue, as on a lossy link).
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from .. import failpoints
from ..client import Client
from ..errors import FdboxError
from ..names import check_box_name
from . import taps as tapmod
from . import vm as vmmod
from .qmp import QMPClient

UPGRADE_DIR = "upgrade"  # fleet.UPGRADE_DIR says the same
CONNECT_POLL = 0.005
SWITCH_POLL = 0.0005  # while the guest is paused
MACHINE_VERSION_RE = re.compile(r"-\d+\.\d+$")


def upgrade_dir(run_dir: str) -> str:
    return os.path.join(run_dir, UPGRADE_DIR)


def machine_type(qemu_args: Sequence[str]) -> str | None:
    """The machine type QEMU-ARGS ask for (the last ``-machine``/``-M``), None if none."""
    found = None
    for flag, value in zip(qemu_args, qemu_args[1:]):
        if flag in ("-machine", "-M", "--machine"):
            for part in value.split(","):
                key, eq, v = part.partition("=")
                if not eq:
                    found = key
                    break
                if key == "type":
                    found = v
                    break
    return found


def machine_pinned(qemu_args: Sequence[str]) -> bool:
    """Whether QEMU-ARGS pin a versioned machine type (``pc-i440fx-7.2``, ``pc-q35-8.2``)."""
    t = machine_type(qemu_args)
    return t is not None and bool(MACHINE_VERSION_RE.search(t))


def unit_of(pid: int) -> str | None:
    """The systemd service whose cgroup holds process ``pid`` (None: none, or unknown)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return unit_in_cgroup(f.read())
    except OSError:
        return None


def unit_in_cgroup(text: str) -> str | None:
    """The innermost ``*.service`` of a /proc/PID/cgroup text."""
    for line in text.splitlines():
        for part in reversed(line.split(":", 2)[-1].split("/")):
            if part.endswith(".service"):
                return part
    return None


def _peer_pid(q: QMPClient) -> int:
    pid, _, _ = struct.unpack("3i", q.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(pid)


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait for process ``pid`` (not our child) to exit; True when it has."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _reopen_output(pid: int, n: int) -> int | None:
    """The old QEMU's stdout/stderr (``n``), opened again for the new one (a file, a tty,
    a pipe); None where that cannot be done (a socket: the journal's stream)."""
    try:
        return os.open(f"/proc/{pid}/fd/{n}", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None


def _recover(vm: str, qmp: str, new_qmp: str, was_path: str, notify: str | None = None) -> str | None:
    """Deal with a QEMU an earlier upgrade of ``vm`` left at RUN_DIR/upgrade/VM.qmp (it was
    killed before it finished); what was done, or None if nothing was left.

    ``inmigrate``: it never ran the guest: it quits. Loaded (``paused``, or ``running``)
    while the QEMU at VM.qmp is ``postmigrate``: the device state moved and the old QEMU
    stopped at that moment, so the new one is the guest: the upgrade is finished (the new
    QEMU continued if the guest was running, the old one retired). ``running`` with
    nothing at VM.qmp (killed after the old QEMU quit, before the rename): the rename.
    Anything else is refused.
    """
    if not vmmod.qemu_alive(new_qmp):
        for path in (new_qmp, was_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return None
    with QMPClient(new_qmp, timeout=10.0) as new:
        status = new.execute("query-status")["status"]
        pid = _peer_pid(new)
        if status == "inmigrate":
            new.execute("quit")
            if not _wait_exit(pid, 10.0):
                os.kill(pid, signal.SIGKILL)
            return f"quit the QEMU (pid {pid}) an interrupted upgrade left in inmigrate"
        old_status = None
        if status == "running" and not vmmod.qemu_alive(qmp):
            os.rename(new_qmp, qmp)
            _notify_mainpid(notify, pid, new)
            return f"finished an interrupted upgrade: QEMU pid {pid} runs the guest (its QMP moved to {qmp})"
        if vmmod.qemu_alive(qmp):
            try:
                with QMPClient(qmp, timeout=10.0) as old:
                    old_status = old.execute("query-status")["status"]
                    old_pid = _peer_pid(old)
                    if status in ("paused", "running") and old_status == "postmigrate":
                        try:
                            with open(was_path) as f:
                                was = f.read().strip()
                        except FileNotFoundError:
                            was = "running"
                        if was == "running" and status != "running":
                            new.execute("cont")
                        _notify_mainpid(notify, pid, new)
                        _retire(vm, old, old_pid, new_qmp, qmp)
                        return f"finished an interrupted upgrade: QEMU pid {pid} runs the guest, pid {old_pid} quit"
            except FdboxError:
                pass
    raise FdboxError("InvalidRequest", f"a QEMU (pid {pid}) is {status} at {new_qmp}, left by an interrupted upgrade, "
                     f"and the one at {qmp} is {old_status or 'not answering'}: check which QEMU runs the guest "
                     "before upgrading again", box=vm)


def upgrade(vm: str, *, socket_path: str | None, run_dir: str, qemu: str | None = None,
            qemu_args: Sequence[str] | None = None, timeout: float = 120.0,
            notify: str | None = None) -> dict[str, Any]:
    """Replace VM ``vm``'s running QEMU by a new one (``qemu``, or the recorded binary) on
    the same RAM and taps; its phase times, pids and versions.

    ``notify``: systemd's notify socket (``systemctl reload`` of the VM's unit): once the
    new QEMU runs the guest and before the old one is told to quit, ``MAINPID=`` the new
    QEMU and ``READY=1`` go there, so the unit tracks the new QEMU and never sees its
    main process exit."""
    check_box_name(vm)
    qmp = vmmod.qmp_path(run_dir, vm)
    t0 = time.monotonic()
    deadline = t0 + timeout
    udir = upgrade_dir(run_dir)
    vmmod.ensure_run_dir(udir)
    new_qmp = os.path.join(udir, f"{vm}.qmp")
    mig = os.path.join(udir, f"{vm}.mig")
    was_path = os.path.join(udir, f"{vm}.was")
    lock = vmmod.VMLock(run_dir, vm, wait=0)
    try:
        note = _recover(vm, qmp, new_qmp, was_path, notify)
        if note is not None:
            print(f"fdbox-qemu: {vm}: {note}", file=sys.stderr)
        if not vmmod.qemu_alive(qmp):
            raise FdboxError("NotFound", f"VM {vm} is not running (no QEMU on {qmp})", box=vm)
        with QMPClient(qmp) as old, Client(socket_path) as c:
            old_pid = _peer_pid(old)
            unit = unit_of(old_pid)
            if unit is not None and unit.startswith("fdbox-qemu@") and notify is None:
                # By hand, the unit would see its main process (the old QEMU) exit and go
                # inactive while the new QEMU runs the guest outside it.
                raise FdboxError("InvalidRequest", f"VM {vm} runs under {unit}: upgrade it with "
                                 f"`systemctl reload {unit}` (the unit must learn the new QEMU's pid)", box=vm)
            status = old.execute("query-status")["status"]
            if status not in ("running", "paused"):
                raise FdboxError("InvalidRequest", f"VM {vm} is {status}: not upgradable now", box=vm)
            state = vmmod.box_state(c, vm)
            if state is None:
                raise FdboxError("NotFound", f"no box {vm}: this QEMU was not started by fdbox-qemu", box=vm)
            if state == "sealed":
                raise FdboxError("Sealed", f"box {vm} is sealed (ready for kexec): unseal it first", box=vm)
            got = {e["name"]: (e, fd) for e, fd in c.get_box(vm)}
            try:
                plan = _plan(vm, old, got, qemu, qemu_args, new_qmp)
            finally:
                for _, fd in got.values():
                    os.close(fd)
            try:
                with open(was_path, "w") as f:  # for _recover, should this upgrade be killed mid-way
                    f.write(status)
                r = _switch(vm, old, old_pid, status == "running", plan, new_qmp, qmp, mig, deadline, notify)
                os.unlink(was_path)
            finally:
                for fd in plan["fds"]:
                    os.close(fd)
        t_end = time.monotonic()
        r.update(vm=vm, was=status, total_ms=(t_end - t0) * 1000)
        return r
    finally:
        lock.close()


def _plan(vm: str, old: QMPClient, got: dict[str, tuple[dict[str, Any], int]], qemu: str | None,
          qemu_args: Sequence[str] | None, new_qmp: str) -> dict[str, Any]:
    """The new QEMU's argv and the fds it inherits; refused (InvalidRequest) before anything starts."""
    if vmmod.DEVSTATE in got:
        raise FdboxError("InvalidRequest", f"box {vm} holds a devstate: the VM is resuming, not upgradable now", box=vm)
    rams = sorted((int(m.group(1)), n) for n in got if (m := vmmod.RAM_RE.fullmatch(n)))
    if not rams or [i for i, _ in rams] != list(range(len(rams))):
        raise FdboxError("InvalidRequest", f"box {vm} has no ram0, ram1, … entries", box=vm)
    for _, n in rams:  # x-ignore-shared skips only shared RAM
        if old.execute("qom-get", {"path": f"/objects/{n}", "property": "share"}) is not True:
            raise FdboxError("InvalidRequest", f"QEMU's {n} is not a shared memory backend", box=vm)
    recorded, recorded_qemu = vmmod.recorded_args(got["ram0"][0])
    if qemu_args is None:
        if recorded is None:
            raise FdboxError("InvalidRequest", f"no QEMU-ARGS recorded for VM {vm} (its RAM predates the record): "
                             "give them after --", box=vm)
        qemu_args = recorded
    vmmod.check_qemu_args(qemu_args)
    binary = qemu or recorded_qemu or vmmod.default_qemu()
    fds: list[int] = []
    try:
        ram = []
        for _, n in rams:
            fds.append(vmmod.reopen(got[n][1], os.O_RDWR))
            ram.append((fds[-1], int(got[n][0]["size"])))
        taps = []
        for ifname, queues in sorted(tapmod.held({n: e for n, (e, _) in got.items()}).items()):
            spec = tapmod.TapSpec(ifname, len(queues))
            qfds = []
            for i in sorted(queues):
                qfds.append(os.dup(got[spec.entry(i)][1]))  # the very open tap: a tap cannot be reopened
                fds.append(qfds[-1])
                tapmod.attach(qfds[-1])
            taps.append((spec, qfds))
        argv = vmmod.qemu_argv(binary, ram, taps, new_qmp) + ["-incoming", "defer", "-S", *qemu_args]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return {"argv": argv, "fds": fds, "args": list(qemu_args)}


def _connect_new(proc: subprocess.Popen[bytes], new_qmp: str, deadline: float) -> QMPClient:
    while True:
        try:
            return QMPClient(new_qmp, timeout=max(1.0, deadline - time.monotonic()))
        except FdboxError:
            rc = proc.poll()
            if rc is not None:
                raise FdboxError("InvalidRequest", f"the new QEMU exited (status {rc}) before it answered on QMP "
                                 "(did it refuse its arguments? see its output)") from None
            if time.monotonic() > deadline:
                raise FdboxError("BackendUnavailable", f"the new QEMU did not open {new_qmp} in time") from None
            time.sleep(CONNECT_POLL)


def _switch(vm: str, old: QMPClient, old_pid: int, running: bool, plan: dict[str, Any], new_qmp: str, qmp: str,
            mig: str, deadline: float, notify: str | None = None) -> dict[str, Any]:
    out = [_reopen_output(old_pid, n) for n in (1, 2)]
    try:
        t_spawn = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # systemd's socket is not QEMU's
        proc = subprocess.Popen(plan["argv"], pass_fds=plan["fds"], stdin=subprocess.DEVNULL,
                                stdout=out[0], stderr=out[1], env=env)
    except OSError as e:
        raise FdboxError("BackendUnavailable", f"cannot run {plan['argv'][0]}: {e.strerror}") from None
    finally:
        for fd in out:
            if fd is not None:
                os.close(fd)
    times: dict[str, Any] = {"old_pid": old_pid, "new_pid": proc.pid}
    switched = False
    try:
        failpoints.hit("qemu.upgrade.after_spawn")
        with _connect_new(proc, new_qmp, deadline) as new:
            times["spawn_ms"] = (time.monotonic() - t_spawn) * 1000
            times["old_qemu"], times["new_qemu"] = ("%d.%d.%d" % old.version, "%d.%d.%d" % new.version)
            new_version = new.version
            if old.version != new.version and not machine_pinned(plan["args"]):
                raise FdboxError("InvalidRequest", f"the new QEMU is {times['new_qemu']}, the old {times['old_qemu']}: "
                                 "a version change needs a versioned machine type in QEMU-ARGS "
                                 f"(e.g. -machine pc-i440fx-{old.version[0]}.{old.version[1]}), not "
                                 f"{machine_type(plan['args']) or 'the default'}", box=vm)
            for q in (old, new):
                if q.version < vmmod.MIN_QEMU:
                    raise FdboxError("InvalidRequest", "QEMU %d.%d.%d is too old: fdbox-qemu needs 5.0 or newer" % q.version)
                q.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
            if old.version >= vmmod.CPR_REBOOT_QEMU:  # a suspend may have left cpr-reboot set
                old.execute("migrate-set-parameters", {"mode": "normal"})
            try:
                os.unlink(mig)
            except FileNotFoundError:
                pass
            new.execute("migrate-incoming", {"uri": f"unix:{mig}"})
            failpoints.hit("qemu.upgrade.before_migrate")
            t_mig = time.monotonic()
            old.execute("migrate", {"uri": f"unix:{mig}"})
            # Watch the new QEMU, not the old one: once it has loaded the whole stream, the
            # old one stopped the guest before it wrote the device state (its "completed"
            # may come a moment later), and every poll here is guest blackout.
            while (st := new.execute("query-status")["status"]) == "inmigrate":
                info = old.execute("query-migrate")
                if info.get("status") in ("failed", "cancelled"):
                    raise FdboxError("InvalidRequest", f"the migration to the new QEMU {info['status']}: "
                                     f"{info.get('error-desc', 'no reason given')}")
                if time.monotonic() > deadline:
                    raise FdboxError("BackendUnavailable", "the new QEMU stays in inmigrate")
                time.sleep(SWITCH_POLL)
            t_sent = time.monotonic()
            if st != "paused":
                raise FdboxError("BackendUnavailable", f"the new QEMU is {st} after the load, not paused")
            failpoints.hit("qemu.upgrade.before_switch")
            if running:
                try:
                    new.execute("cont")
                except FdboxError:
                    # Its answer lost: the switch happened only if the new QEMU lives and runs.
                    if proc.poll() is not None or _status(new_qmp) != "running":
                        raise
            switched = True
            t_switch = time.monotonic()
            times.update(migrate_ms=(t_sent - t_mig) * 1000, blackout_ms=(t_switch - t_mig) * 1000)
    except BaseException as e:
        if not switched:
            _roll_back(vm, old, proc, running)
            if isinstance(e, OSError):
                raise FdboxError("BackendUnavailable", f"{e}; the new QEMU was killed, the old one runs on") from None
            if isinstance(e, FdboxError):
                raise FdboxError(e.name, f"{e.message}; the new QEMU was killed, the old one runs on", **e.params) from None
            raise
        print(f"fdbox-qemu: {vm}: the new QEMU runs the guest, but: {e!r}", file=sys.stderr)
    try:
        os.unlink(mig)
    except FileNotFoundError:
        pass
    failpoints.hit("qemu.upgrade.after_switch")
    _notify_mainpid(notify, proc.pid, new_version)
    _retire(vm, old, old_pid, new_qmp, qmp)
    times["quit_ms"] = (time.monotonic() - t_switch) * 1000
    return times


def _notify_mainpid(notify: str | None, pid: int, version: QMPClient | tuple[int, int, int]) -> None:
    """Tell systemd (a unit's reload) that QEMU ``pid`` is the unit's main process now."""
    if not notify:
        return
    from ..sdnotify import Notifier

    v = version.version if isinstance(version, QMPClient) else version
    n = Notifier(notify)
    n.send(f"MAINPID={pid}\nREADY=1\nSTATUS=upgraded: QEMU %d.%d.%d (pid {pid}) runs the guest" % v)
    n.barrier()
    n.close()


def _status(qmp: str) -> str | None:
    try:
        with QMPClient(qmp, timeout=5.0) as q:
            return str(q.execute("query-status")["status"])
    except FdboxError:
        return None


def _roll_back(vm: str, old: QMPClient, proc: subprocess.Popen[bytes], running: bool) -> None:
    """Before the switch: the new QEMU dies (and is gone) before the old one may continue."""
    proc.kill()
    proc.wait()
    if not running:
        return
    try:
        st = old.execute("query-status")["status"]
        if st != "running":
            old.execute("cont")
    except FdboxError as e:
        print(f"fdbox-qemu: {vm}: the new QEMU is gone, but the old one could not be continued ({e.message}): "
              f"the guest is paused in it; continue it over QMP", file=sys.stderr)


def _bound_qmp(pid: int) -> str | None:
    """The QMP path on QEMU ``pid``'s command line (the path it bound, and unlinks at exit)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    for flag, spec in zip(argv, argv[1:]):
        if flag == b"-qmp" and spec.startswith(b"unix:"):
            return os.path.abspath(os.fsdecode(spec[5:].split(b",", 1)[0]))
    return None


def _retire(vm: str, old: QMPClient, old_pid: int, new_qmp: str, qmp: str) -> None:
    """After the switch: the old QEMU (stopped, postmigrate) quits, or is killed, and the
    new QEMU's socket takes the VM's QMP path. A QEMU unlinks the path it bound when it
    exits: one that ``start`` became bound ``qmp`` (it goes first, then the rename); one an
    earlier upgrade started bound ``new_qmp`` (the rename first, so it unlinks nothing)."""
    rename_first = _bound_qmp(old_pid) != os.path.abspath(qmp)
    if rename_first:
        os.rename(new_qmp, qmp)
    try:
        old.execute("quit")
    except FdboxError:
        pass
    if not _wait_exit(old_pid, 30.0):
        print(f"fdbox-qemu: {vm}: the old QEMU (pid {old_pid}) did not quit: killed", file=sys.stderr)
        os.kill(old_pid, signal.SIGKILL)
        _wait_exit(old_pid, 10.0)
    if not rename_first:
        os.rename(new_qmp, qmp)
