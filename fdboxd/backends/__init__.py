"""Where file references live. See :mod:`fdboxd.backends.base` for the contract."""

from __future__ import annotations

import logging
import os

from ..errors import FdboxError
from .base import Backend, BackendBox, BackendEntry

DEVICE_PATH = "/dev/fdbox"
LUO_DEVICE_PATH = "/dev/liveupdate"

log = logging.getLogger("fdboxd.backends")


def open_backend(name: str = "auto", device: str = DEVICE_PATH, luo_device: str = LUO_DEVICE_PATH,
                 luo_wait: float | None = None) -> Backend:
    """Open a backend by name: ``memory``, ``kernel``, ``liveupdate`` or ``auto``.

    ``auto``: plain memfds on LUO when ``/dev/liveupdate`` works, hugetlb memfds (and
    everything on kernels without LUO) on fdbox.ko when ``/dev/fdbox`` exists, the
    memory backend when neither does. The README's backend table says the same.
    ``luo_wait``: how long an open of /dev/liveupdate retries while another process
    holds it (default :data:`fdboxd.backends.liveupdate.OPEN_RETRY_S`).
    """
    if name == "auto":
        return _auto(device, luo_device, luo_wait)
    if name == "memory":
        from .memory import MemoryBackend

        return MemoryBackend()
    if name == "kernel":
        try:
            from .kernel import KernelBackend
        except ImportError as e:  # pragma: no cover - only while the module is absent
            raise FdboxError("BackendUnavailable", f"kernel backend not available: {e}") from e
        return KernelBackend(device)
    if name == "liveupdate":
        from .liveupdate import LiveupdateBackend

        return _liveupdate(luo_device, device, luo_wait)
    raise FdboxError("InvalidRequest", f"unknown backend {name!r}")


def _liveupdate(luo_device: str, device: str, luo_wait: float | None) -> Backend:
    from .liveupdate import OPEN_RETRY_S, LiveupdateBackend

    return LiveupdateBackend(luo_device, fdbox_device=device, wait=OPEN_RETRY_S if luo_wait is None else luo_wait)


def _auto(device: str, luo_device: str, luo_wait: float | None) -> Backend:
    luo = None
    problem = None
    if os.path.exists(luo_device):
        try:
            luo = _liveupdate(luo_device, device, luo_wait)
        except FdboxError as e:
            problem = f"LUO not used: {e.message}"
            log.warning("%s", problem)
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
