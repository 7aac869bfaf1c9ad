"""Where file references live. See :mod:`fdboxd.backends.base` for the contract."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ..errors import FdboxError
from .base import OPEN_RETRY_S, Backend, BackendBox, BackendEntry

if TYPE_CHECKING:
    from .liveupdate import FdStore

DEVICE_PATH = "/dev/fdbox"
LUO_DEVICE_PATH = "/dev/liveupdate"

log = logging.getLogger("fdboxd.backends")


def open_backend(name: str = "auto", device: str = DEVICE_PATH, luo_device: str = LUO_DEVICE_PATH,
                 luo_wait: float | None = None, luo_sessions: list[int] | None = None,
                 fdstore: FdStore | None = None) -> Backend:
    """Open a backend by name: ``memory``, ``kernel``, ``liveupdate`` or ``auto``.

    ``auto``: plain memfds on LUO when ``/dev/liveupdate`` works, hugetlb memfds (and
    everything on kernels without LUO) on fdbox.ko when ``/dev/fdbox`` exists, the
    memory backend when neither does. The README's backend table says the same.
    ``luo_wait``: how long an open of /dev/liveupdate retries while another process
    holds it (default :data:`OPEN_RETRY_S`). ``luo_sessions``
    (LUO session fds the fd store gave back; the LUO side owns them) and ``fdstore`` (the
    service's fd store) are for the LUO side too: see :mod:`fdboxd.backends.liveupdate`.
    """
    luo = {"carried": luo_sessions, "fdstore": fdstore}
    if name == "auto":
        return _auto(device, luo_device, luo_wait, luo)
    if name == "liveupdate":
        return _liveupdate(luo_device, device, luo_wait, luo)
    _unused_sessions(luo_sessions)
    if name == "memory":
        from .memory import MemoryBackend

        return MemoryBackend()
    if name == "kernel":
        try:
            from .kernel import KernelBackend
        except ImportError as e:  # pragma: no cover - only while the module is absent
            raise FdboxError("BackendUnavailable", f"kernel backend not available: {e}") from e
        return KernelBackend(device)
    raise FdboxError("InvalidRequest", f"unknown backend {name!r}")


def _unused_sessions(fds: list[int] | None) -> None:
    """No LUO side to give them to: close ours (the fd store keeps its copy, preserved)."""
    for fd in fds or ():
        os.close(fd)
    if fds:
        log.warning("%d LUO sessions from the fd store not used: the backend has no LUO side", len(fds))


def _liveupdate(luo_device: str, device: str, luo_wait: float | None, luo: dict[str, Any]) -> Backend:
    from .liveupdate import LiveupdateBackend

    return LiveupdateBackend(luo_device, fdbox_device=device, wait=OPEN_RETRY_S if luo_wait is None else luo_wait,
                             **luo)


def _auto(device: str, luo_device: str, luo_wait: float | None, luo_args: dict[str, Any]) -> Backend:
    luo = None
    problem = None
    if os.path.exists(luo_device):
        try:
            luo = _liveupdate(luo_device, device, luo_wait, luo_args)  # owns the sessions
        except FdboxError as e:
            problem = f"LUO not used: {e.message}"
            log.warning("%s", problem)
    else:
        _unused_sessions(luo_args["carried"])
    kernel = open_backend("kernel", device) if os.path.exists(device) else None
    chosen: Backend
    if luo is not None and kernel is not None:
        from .mixed import MixedBackend

        chosen = MixedBackend(luo, kernel)
    else:
        chosen = luo if luo is not None else kernel if kernel is not None else open_backend("memory")
    if problem:
        chosen.startup_problems = (problem,)
    return chosen


__all__ = ["Backend", "BackendBox", "BackendEntry", "open_backend", "DEVICE_PATH", "LUO_DEVICE_PATH"]
