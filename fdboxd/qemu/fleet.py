"""Several VMs at once: find the running ones, suspend (or upgrade) them in parallel,
list them all.

A host's live update stops every VM, so its blackout is the slowest VM's, not the sum,
only if the VMs are suspended side by side. ``suspend VM...`` and ``suspend --all`` run
one thread per VM in this one process: each thread is one QMP conversation with its own
QEMU plus a few fdboxd calls, all blocking socket I/O that releases the GIL, so N VMs
cost one interpreter start (issue 18: no process start per VM on the blackout path)
and about one VM's wall time. Each VM's suspend is :func:`.vm.suspend`, all or nothing
for that VM; one VM failing does not stop the others, and the exit status says so.
``upgrade VM...`` / ``--all`` run :func:`.upgrade.upgrade` the same way.

Which VMs run: a QEMU that ``fdbox-qemu start`` became has ``-qmp unix:RUN_DIR/VM.qmp``
(one that ``upgrade`` started, ``-qmp unix:RUN_DIR/upgrade/VM.qmp``) on its command
line, so ``/proc/*/cmdline`` finds it even if its QMP socket is gone (a
VM that cannot be suspended must fail the kexec, not be skipped); a socket in RUN_DIR
that answers counts too. Stale sockets of a QEMU that died are ignored.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..client import Client
from ..errors import FdboxError
from ..names import check_box_name
from . import vm as vmmod
from .qmp import QMPClient

UPGRADE_DIR = "upgrade"  # fdboxd.qemu.upgrade.UPGRADE_DIR (not imported: suspend's path does not need it)

MAX_THREADS = 64


@dataclass
class Outcome:
    """One VM's result in a batch: the suspend's phase times, or the error it raised."""

    vm: str
    result: dict[str, Any] | None = None
    error: FdboxError | None = None


def _uids(pid: str) -> tuple[int, int] | None:
    """A process's real and effective uid (from its status, not /proc/PID's owner, which
    is root for a process that made itself non-dumpable)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    real, effective = line.split()[1:3]
                    return int(real), int(effective)
    except (OSError, ValueError):
        pass
    return None


def qemu_processes(run_dir: str) -> dict[str, int]:
    """VM name -> pid of every process whose command line has ``-qmp unix:RUN_DIR/VM.qmp,…``
    and that runs as RUN_DIR's owner (the user whose fdbox-qemu started the VMs there: the
    directory is private to it) or root. Anyone can put that argument on a command line;
    a process of another user is no VM of this run dir, and counting it would let any
    local user fail every ``suspend --all``, and so every kexec. (A QEMU that dropped to
    another user with ``-runas`` is found by its socket only, as :func:`running_vms` does.)
    A QEMU that ``upgrade`` started has its QMP under ``RUN_DIR/upgrade/`` on its command
    line and counts too (where both are there, mid-upgrade, the pid is the old one's)."""
    want = os.path.abspath(run_dir)
    try:
        owner = os.stat(want).st_uid
    except OSError:
        owner = os.geteuid()
    allowed = {owner, 0}
    upgraded = os.path.join(want, UPGRADE_DIR)
    found: dict[str, int] = {}
    late: dict[str, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if b"-qmp" not in argv:
            continue
        uids = _uids(pid)
        if uids is None or not set(uids) <= allowed:
            continue
        for flag, spec in zip(argv, argv[1:]):
            if flag != b"-qmp" or not spec.startswith(b"unix:"):
                continue
            path = os.fsdecode(spec[5:].split(b",", 1)[0])
            where, base = os.path.split(path)
            if not base.endswith(".qmp"):
                continue
            if os.path.abspath(where) == want:
                found[base[:-4]] = int(pid)
            elif os.path.abspath(where) == upgraded:  # started by `upgrade`; its socket renamed into RUN_DIR
                late.setdefault(base[:-4], int(pid))
    return late | found


def running_vms(run_dir: str) -> dict[str, int | None]:
    """Every VM with a QEMU: name -> its pid (None when only its QMP socket was found)."""
    running: dict[str, int | None] = dict(qemu_processes(run_dir))
    for path in glob.glob(os.path.join(glob.escape(run_dir), "*.qmp")):
        name = os.path.basename(path)[:-4]
        if name not in running and vmmod.qemu_alive(path):
            running[name] = None
    return running


def _suspend_one(vm: str, socket_path: str | None, run_dir: str) -> Outcome:
    qmp = vmmod.qmp_path(run_dir, vm)
    try:
        return Outcome(vm, result=vmmod.suspend(vm, socket_path=socket_path, run_dir=run_dir))
    except FdboxError as e:
        pid = qemu_processes(run_dir).get(vm) if e.name == "NotFound" and not vmmod.qemu_alive(qmp) else None
        if pid is not None:  # say what is really wrong: the QEMU is there, its socket is not
            e = FdboxError("NotFound", f"VM {vm}: its QEMU (pid {pid}) runs but does not answer on {qmp}: "
                           "it cannot be suspended, and a kexec would lose it", box=vm)
        return Outcome(vm, error=e)
    except Exception as e:  # noqa: BLE001 - one VM's surprise must not hide the others' results
        return Outcome(vm, error=FdboxError("BackendUnavailable", f"VM {vm}: unexpected {e!r}", box=vm))


def suspend_many(vms: Sequence[str], *, socket_path: str | None, run_dir: str) -> list[Outcome]:
    """Suspend ``vms`` concurrently; one Outcome per VM, in the order given.

    Every name is checked before any VM is touched (a bad name changes nothing).
    """
    names = list(dict.fromkeys(vms))
    for name in names:
        check_box_name(name)
    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(len(names), MAX_THREADS), thread_name_prefix="suspend") as pool:
        return list(pool.map(lambda n: _suspend_one(n, socket_path, run_dir), names))


def suspend_all(*, socket_path: str | None, run_dir: str) -> list[Outcome]:
    """Suspend every VM that has a QEMU under ``run_dir`` (none running: an empty list)."""
    return suspend_many(sorted(running_vms(run_dir)), socket_path=socket_path, run_dir=run_dir)


def _upgrade_one(vm: str, socket_path: str | None, run_dir: str, qemu: str | None,
                 qemu_args: Sequence[str] | None, notify: str | None) -> Outcome:
    from . import upgrade

    try:
        return Outcome(vm, result=upgrade.upgrade(vm, socket_path=socket_path, run_dir=run_dir, qemu=qemu,
                                                  qemu_args=qemu_args, notify=notify))
    except FdboxError as e:
        return Outcome(vm, error=e)
    except Exception as e:  # noqa: BLE001 - one VM's surprise must not hide the others' results
        return Outcome(vm, error=FdboxError("BackendUnavailable", f"VM {vm}: unexpected {e!r}", box=vm))


def upgrade_many(vms: Sequence[str], *, socket_path: str | None, run_dir: str, qemu: str | None = None,
                 qemu_args: Sequence[str] | None = None, notify: str | None = None) -> list[Outcome]:
    """Upgrade ``vms`` concurrently (each its own QEMU-ARGS unless ``qemu_args`` is given,
    which is for one VM); one Outcome per VM, in the order given. Names checked first.
    ``notify`` (systemd's socket, a unit's reload) is used only when there is one VM."""
    names = list(dict.fromkeys(vms))
    for name in names:
        check_box_name(name)
    if qemu_args is not None and len(names) != 1:
        raise FdboxError("InvalidRequest", "QEMU-ARGS are for one VM: with several, each keeps its own")
    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(len(names), MAX_THREADS), thread_name_prefix="upgrade") as pool:
        one = notify if len(names) == 1 else None
        return list(pool.map(lambda n: _upgrade_one(n, socket_path, run_dir, qemu, qemu_args, one), names))


def upgrade_all(*, socket_path: str | None, run_dir: str, qemu: str | None = None) -> list[Outcome]:
    """Upgrade every VM whose QEMU answers under ``run_dir``."""
    names = sorted(n for n in running_vms(run_dir) if vmmod.qemu_alive(vmmod.qmp_path(run_dir, n)))
    return upgrade_many(names, socket_path=socket_path, run_dir=run_dir, qemu=qemu)


# ---------------------------------------------------------------------- status


def _qemu_status(qmp: str) -> str:
    try:
        with QMPClient(qmp, timeout=5.0) as q:
            return str(q.execute("query-status")["status"])
    except FdboxError as e:
        return f"unreachable ({e.message})"


def _ifname(e: dict[str, Any]) -> str:
    extra = e.get("extra")
    net = extra.get("net") if isinstance(extra, dict) else None
    return str(net.get("ifname")) if isinstance(net, dict) and net.get("ifname") else str(e["name"])


def describe(vm: str, box_state: str | None, entries: Iterable[dict[str, Any]], qemu: str | None,
             pid: int | None = None) -> dict[str, Any]:
    """One row of ``status``: what fdbox holds for ``vm`` and what its QEMU says."""
    entries = list(entries)
    ram = [e for e in entries if vmmod.RAM_RE.fullmatch(e["name"])]
    dev = next((e for e in entries if e["name"] == vmmod.DEVSTATE), None)
    taps: dict[str, int] = defaultdict(int)
    for e in entries:
        if e.get("type") == "tap":
            taps[_ifname(e)] += 1
    return {
        "vm": vm,
        "state": vmmod.vm_state(qemu, dev is not None),
        "qemu": qemu or "not running",
        "pid": pid,
        "box": box_state,
        "ram_bytes": sum(int(e["size"]) for e in ram),
        "ram": sorted(e["name"] for e in ram),
        "ram_type": sorted({str(e["type"]) for e in ram}),
        "taps": [{"ifname": name, "queues": n} for name, n in sorted(taps.items())],
        "devstate_bytes": int(dev["size"]) if dev is not None else None,
    }


def status_all(*, socket_path: str | None, run_dir: str) -> list[dict[str, Any]]:
    """Every VM fdbox holds (a box with RAM entries) or that has a QEMU under ``run_dir``."""
    with Client(socket_path) as c:
        listing = c.list()
    boxes = {str(b["name"]): str(b["state"]) for b in listing.get("boxes", [])}
    by_box: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in listing.get("entries", []):
        by_box[str(e["box"])].append(e)
    live = running_vms(run_dir)
    names = sorted({b for b, es in by_box.items() if any(vmmod.RAM_RE.fullmatch(e["name"]) for e in es)} | set(live))
    up = [n for n in names if vmmod.qemu_alive(vmmod.qmp_path(run_dir, n))]
    qemu: dict[str, str] = {}
    if up:  # one QMP round trip per VM, side by side
        with ThreadPoolExecutor(max_workers=min(len(up), MAX_THREADS)) as pool:
            qemu = dict(zip(up, pool.map(lambda n: _qemu_status(vmmod.qmp_path(run_dir, n)), up), strict=True))
    for n in names:
        if n in live and n not in qemu:
            qemu[n] = f"unreachable (no QMP on {vmmod.qmp_path(run_dir, n)})"
    return [describe(n, boxes.get(n), by_box.get(n, []), qemu.get(n), live.get(n)) for n in names]
