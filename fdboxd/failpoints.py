"""Named failpoints: make one step of fdboxd or fdbox-qemu fail, die or stall on purpose.

Why: fdbox's promise is about the unhappy paths (a restart mid-seal, ENOMEM while
restoring, a kill between two steps). Those paths are proven by making them happen, one
step at a time, with the real daemon and real files — not by fakes that share the code's
assumptions (tests/integration/test_crash_matrix.py walks every fdboxd failpoint listed here
but the few it names as off its cycle; docs/operating.md has a row for each).

Set them with one environment variable, read once when this module is imported::

    FDBOX_FAILPOINTS=NAME=ACTION[,NAME=ACTION...]

    ACTION := [COUNT*]error(ERRNO)   raise OSError(ERRNO), e.g. error(ENOMEM) or error(12)
            | [COUNT*]kill           SIGKILL this process at once (no cleanup runs)
            | [COUNT*]delay(MS)      sleep MS milliseconds, then go on
            | off                    nothing (the same as leaving NAME out)

``COUNT*`` fires on the first COUNT hits only (``1*error(ENOMEM)``: a transient error
that a retry gets past); without it every hit fires. An unknown NAME or a malformed
ACTION is a :class:`ValueError` at import, so a typo never passes silently as "no
fault".

Cost when unset: :func:`hit` is one dictionary lookup on an empty dict.

Every failpoint is declared in :data:`FAILPOINTS` (name → the step it marks), the one list
a test enumerates; ``tests/unit/test_failpoints.py`` checks that each declared name is hit
somewhere in the code and that the code hits no undeclared one. Names are
``MODULE.STEP`` (``seal.after_preserve``): the module of the unhappy path, then where in
it.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import signal
import time

ENV = "FDBOX_FAILPOINTS"

#: Every failpoint: name → the step it marks (what has happened when it fires). Sorted by
#: name; add yours here, then call :func:`hit` at that step.
FAILPOINTS: dict[str, str] = {
    "adopt.before_seal": "every fd from systemd's fd store is adopted; boxes sealed before the restart not sealed again",
    "failpoints.selftest": "tests/unit/test_failpoints.py's own point (fires only where the test calls it)",
    "finish.before_release": "Finish is journalled (box open, unclaimed entries gone); one is not released yet",
    "finish.journal": "Finish's journal write: the box is reopened in memory only, nothing released",
    "manifest.after_snapshot_rename": "a snapshot is in place (renamed, fsynced); the journals it holds remain",
    "manifest.compact_after_rename": "the compaction's snapshot is in place; manifest.journal.old is not removed yet",
    "manifest.journal_append": "a journal line is about to be written (any change): nothing of it is on disk",
    "net.in_netns": "a netns worker thread joined the target network namespace, before its interface work",
    "qemu.resume.after_load": "fdbox-qemu start's helper: QEMU loaded the device state, paused; devstate still in the box",
    "qemu.resume.before_cont": "fdbox-qemu start's helper: devstate removed from the box, the guest not yet continued",
    "qemu.start.after_put": "fdbox-qemu start: the RAM (and new taps) it created are in the box; QEMU not yet exec'd",
    "qemu.start.before_exec": "fdbox-qemu start: the helper is forked, QEMU about to be exec'd",
    "qemu.start.before_undo": "fdbox-qemu start failed (QEMU did not start): what it created is about to be removed",
    "qemu.suspend.after_devstate": "fdbox-qemu suspend: devstate is in the box, QEMU (stopped) not yet told to quit",
    "qemu.suspend.after_stale_remove": "fdbox-qemu suspend: a stale devstate was removed, the new one not yet put",
    "qemu.suspend.after_stop": "fdbox-qemu suspend: the guest is stopped, nothing saved or put yet",
    "qemu.upgrade.after_spawn": "fdbox-qemu upgrade: the new QEMU is started (-incoming defer), the old one runs",
    "qemu.upgrade.after_switch": "fdbox-qemu upgrade: the new QEMU runs the guest; the old one not yet told to quit",
    "qemu.upgrade.before_migrate": "fdbox-qemu upgrade: the new QEMU listens for the device state; the old one runs",
    "qemu.upgrade.before_switch": "fdbox-qemu upgrade: device state in the new QEMU (paused), the old one postmigrate: nothing runs the guest",
    "reconcile.after_carried_read": "after a kexec: the carried manifest is read (not dropped); nothing written",
    "remove.before_release": "Remove is journalled; the backend still holds the entry",
    "remove.box_before_release": "DeleteBox is journalled; the backend still holds the box",
    "remove.box_journal": "DeleteBox's journal write: nothing changed yet",
    "remove.journal": "Remove's journal write: nothing changed yet",
    "restore.after_retrieve": "a carried LUO session's files are retrieved and its keeper holds it; not FINISHed",
    "restore.before_backend_finish": "a restored box is reopened and journalled (last claim, Finish); no FINISH yet",
    "restore.claim_journal": "a claim's journal write (Get in a restored box): the fd is made, nothing recorded",
    "restore.verify_drop": "a restored entry failed its checksum and is reported lost; it is not dropped yet",
    "restore.verify_get": "a restored entry is about to be opened for its check (at start, or a Get's retry)",
    "seal.after_carry": "seal: sealed in the backend, snapshot written, manifest carried; no reply yet",
    "seal.after_index_create": "the new LUO index session is held by the keeper; the older one not dropped yet",
    "seal.after_kernel_side": "auto (LUO + fdbox.ko): the box's fdbox.ko half is sealed, its LUO half not yet",
    "seal.after_manifest": "seal: sealed in the backend, snapshot (SEALED) written; manifest not carried",
    "seal.after_preserve": "seal: a box sealed in the backend, SEALED in memory; no snapshot written",
    "seal.after_session_held": "a box's LUO session holds its files and the keeper has it; the index not rewritten yet",
    "seal.before_preserve": "seal: checksums recorded, boxes frozen; nothing sealed in the backend",
    "seal.begin": "seal: every check passed; nothing frozen, opened or sealed",
    "seal.rollback": "seal: a later step failed; a box sealed in the backend is about to be unsealed",
    "start.after_index_rewrite": "start-up: LUO sessions of open boxes released, the index rewritten; the carried manifest not yet",
    "start.before_carry_drop": "the daemon has started; the manifest carried across the kexec is not dropped yet",
    "start.before_finish": "the daemon has started; an incoming LUO session is about to be FINISHed",
    "unseal.after_carry": "unseal: OPEN journalled, the carried manifest rewritten without the box",
    "unseal.after_journal": "unseal: released, OPEN journalled; the carried manifest still lists the box",
    "unseal.after_release": "unseal: the backend released the box (session dropped); the store says SEALED",
    "unseal.after_session_drop": "a box's LUO session is dropped (unpreserved); the index still lists it",
    "unseal.begin": "unseal: the box is sealed; nothing released yet",
}


class _Action:
    # A plain class: fdbox-qemu start imports this module, and not dataclasses.
    __slots__ = ("kind", "arg", "left")

    def __init__(self, kind: str, arg: int = 0, left: int = -1) -> None:
        self.kind = kind  # "error" | "kill" | "delay"
        self.arg = arg  # errno or milliseconds
        self.left = left  # hits that still fire; -1: every hit

    def fire(self, name: str) -> None:
        if self.left == 0:
            return
        if self.left > 0:
            self.left -= 1
        if self.kind == "error":
            raise OSError(self.arg, f"{os.strerror(self.arg)} (failpoint {name})")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "delay":
            time.sleep(self.arg / 1000)


_active: dict[str, _Action] = {}

_ACTION_RE = re.compile(r"^(?:(\d+)\*)?(error|kill|delay|off)(?:\(([A-Za-z0-9]+)\))?$")


def _parse_action(name: str, text: str) -> _Action | None:
    m = _ACTION_RE.match(text.strip())
    if not m:
        raise ValueError(f"{ENV}: {name}: bad action {text!r} (error(ERRNO), kill, delay(MS) or off)")
    count, kind, arg = m.groups()
    if kind == "off":
        return None
    left = int(count) if count is not None else -1
    if kind == "kill":
        if arg is not None:
            raise ValueError(f"{ENV}: {name}: kill takes no argument")
        return _Action("kill", 0, left)
    if arg is None:
        raise ValueError(f"{ENV}: {name}: {kind} needs an argument")
    if kind == "delay":
        if not arg.isdigit():
            raise ValueError(f"{ENV}: {name}: delay wants milliseconds, not {arg!r}")
        return _Action("delay", int(arg), left)
    if arg.isdigit():
        num = int(arg)
    else:
        num = getattr(_errno, arg, -1)
        if not isinstance(num, int) or num <= 0 or not arg.startswith("E"):
            raise ValueError(f"{ENV}: {name}: unknown errno {arg!r}")
    return _Action("error", num, left)


def parse(spec: str) -> dict[str, _Action]:
    """The failpoints ``spec`` (the variable's syntax) sets; :class:`ValueError` if malformed."""
    out: dict[str, _Action] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, action = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"{ENV}: {item!r} is not NAME=ACTION")
        if name not in FAILPOINTS:
            raise ValueError(f"{ENV}: unknown failpoint {name!r} (fdboxd.failpoints.FAILPOINTS lists them)")
        a = _parse_action(name, action)
        if a is not None:
            out[name] = a
    return out


def configure(spec: str | None) -> None:
    """Replace the active set (``None`` or ``""``: none). For in-process tests; a daemon
    reads :data:`ENV` at import."""
    global _active
    _active = parse(spec) if spec else {}


def active() -> dict[str, str]:
    """The failpoints that are set, name → their action (for the start-up log line)."""
    return {n: (f"{a.left}*" if a.left >= 0 else "") + a.kind + (f"({a.arg})" if a.kind != "kill" else "")
            for n, a in _active.items()}


def hit(name: str) -> None:
    """The step ``name`` is reached: do what its failpoint says, if it is set."""
    a = _active.get(name)
    if a is not None:
        a.fire(name)


configure(os.environ.get(ENV))
