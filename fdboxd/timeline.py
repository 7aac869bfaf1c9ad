"""The timeline of a box's last live update, as fdboxd saw it (issue 18 §4).

Every box keeps the wall-clock time of each phase of its current (or last) live update
in :attr:`fdboxd.model.Box.timeline`. The phases, in order:

=============  ================================================  ==========================
phase          when                                              duration reported
=============  ================================================  ==========================
``put``        the last Put into the box before the seal (a      —
               VMM's device state, ``devstate``, usually)
``seal_begin`` Seal froze the box                                since ``put``
``seal_end``   the box is sealed (checksums taken, carried)      the seal
``kernel_up``  the next kernel started (boot time from           the reboot: shutdown after
               ``CLOCK_BOOTTIME``, read by the daemon there)     the seal, kexec, boot
``restore_begin``  that kernel's fdboxd was exec'd               kernel up → daemon exec
``restore_end``    the box restored and checked, ready to Get    the restore
``first_get``  the first Get / GetBox / RestoreInto after it     since ``restore_end``
``reopened``   every entry claimed, or Finish: the box is open   since ``first_get``
``unsealed``   Unseal (no kexec happened)                        since ``seal_end``
=============  ================================================  ==========================

Times are seconds since the epoch (``time.time()``): they have to mean the same on both
sides of a kexec, which a monotonic clock does not. They travel with the box in the
manifest — the snapshot's ``"timeline"`` and the journal's box op — and so inside the
manifest carried in the sealed set. A new cycle starts at the first ``put`` or
``seal_begin`` after the last one ended (``reopened`` or ``unsealed``).

Each phase is also one journal line (``FDBOX_PHASE=``, ``FDBOX_BOX=``,
``FDBOX_DURATION_USEC=``) when it happens; ``fdboxctl report`` and ``LastLiveUpdate``
show the whole timeline with the durations above.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .model import Box

log = logging.getLogger("fdboxd.timeline")

PHASES = ("put", "seal_begin", "seal_end", "kernel_up", "restore_begin", "restore_end",
          "first_get", "reopened", "unsealed")
#: The phase each one's duration is measured from (the first of these present).
SINCE: dict[str, tuple[str, ...]] = {
    "seal_begin": ("put",),
    "seal_end": ("seal_begin",),
    "kernel_up": ("seal_end",),
    "restore_begin": ("kernel_up",),
    "restore_end": ("restore_begin",),
    "first_get": ("restore_end",),
    "reopened": ("first_get", "restore_end"),
    "unsealed": ("seal_end", "seal_begin"),
}
ENDS = ("reopened", "unsealed")


def kernel_boot_time() -> float:
    """When the running kernel started, in ``time.time()`` seconds (now − CLOCK_BOOTTIME).

    Not ``/proc/uptime``: the unit's ``ProcSubset=pid`` hides it.
    """
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def process_start_time(pid: str = "self") -> float:
    """When a process was exec'd, in ``time.time()`` seconds (``/proc/PID/stat`` field 22)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return kernel_boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def duration_usec(timeline: dict[str, float], phase: str) -> int | None:
    t = timeline.get(phase)
    for since in SINCE.get(phase, ()):
        if since in timeline and t is not None:
            return max(0, round((t - timeline[since]) * 1e6))
    return None


def mark(box: Box, phase: str, when: float | None = None, log_it: bool = True) -> None:
    """Record ``phase`` for ``box`` now (or at ``when``) and log it as one journal line
    (not for ``put``: the request's own log line says it, and Put is the hot path)."""
    assert phase in PHASES, phase
    if phase in ("put", "seal_begin") and any(p in box.timeline for p in ENDS):
        box.timeline = {}  # the last live update ended: this is a new one
    if phase == "first_get" and "first_get" in box.timeline:
        return
    t = time.time() if when is None else when
    box.timeline = {**box.timeline, phase: t}  # assigned: Box.timeline is never changed in place
    if not log_it:
        return
    usec = duration_usec(box.timeline, phase)
    fields = {"FDBOX_PHASE": phase, "FDBOX_BOX": box.name}
    if usec is not None:
        fields["FDBOX_DURATION_USEC"] = str(usec)
        log.info("live update %s: %s after %.3f s", box.name, phase, usec / 1e6, extra=fields)
    else:
        log.info("live update %s: %s", box.name, phase, extra=fields)


def report(box: Box) -> dict[str, Any]:
    """One box's last live update: phases in order, each with its time and duration."""
    tl = box.timeline
    phases = [{"phase": p, "time": tl[p], **({"duration_usec": d} if (d := duration_usec(tl, p)) is not None else {})}
              for p in PHASES if p in tl]
    out: dict[str, Any] = {"box": box.name, "state": str(box.state), "phases": phases,
                           "complete": any(p in tl for p in ENDS)}
    if "seal_end" in tl and "restore_end" in tl:
        out["sealed_to_restored_usec"] = round((tl["restore_end"] - tl["seal_end"]) * 1e6)
    if "put" in tl and "first_get" in tl:
        out["put_to_first_get_usec"] = round((tl["first_get"] - tl["put"]) * 1e6)
    return out


def decode(value: Any) -> dict[str, float]:
    """A timeline read from a manifest: known phases with numeric times, nothing else."""
    if not isinstance(value, dict):
        return {}
    return {p: float(v) for p, v in value.items() if p in PHASES and isinstance(v, (int, float))}
