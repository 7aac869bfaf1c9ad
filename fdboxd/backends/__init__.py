"""Where file references live. See :mod:`fdboxd.backends.base` for the contract."""

from __future__ import annotations

import logging
import os

from ..errors import FdboxError
from .base import Backend, BackendBox, BackendEntry

DEVICE_PATH = "/dev/fdbox"
LUO_DEVICE_PATH = "/dev/liveupdate"

log = logging.getLogger("fdboxd.backends")


def open_backend(name: str = "auto", device: str = DEVICE_PATH, luo_device: str = LUO_DEVICE_PATH) -> Backend:
    """Open a backend by name: ``memory``, ``kernel``, ``liveupdate`` or ``auto``.

    ``auto``: plain memfds on LUO when ``/dev/liveupdate`` works, hugetlb memfds (and
    everything on kernels without LUO) on fdbox.ko when ``/dev/fdbox`` exists, the
    memory backend when neither does. The README's backend table says the same.
    """
    if name == "auto":
        return _auto(device, luo_device)
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

        return LiveupdateBackend(luo_device, fdbox_device=device)
    raise FdboxError("InvalidRequest", f"unknown backend {name!r}")


def _auto(device: str, luo_device: str) -> Backend:
    luo = None
    if os.path.exists(luo_device):
        from .liveupdate import LiveupdateBackend

        try:
            luo = LiveupdateBackend(luo_device, fdbox_device=device)
        except FdboxError as e:
            log.warning("LUO not used: %s", e)
    kernel = open_backend("kernel", device) if os.path.exists(device) else None
    if luo is not None and kernel is not None:
        from .mixed import MixedBackend

        return MixedBackend(luo, kernel)
    if luo is not None:
        return luo
    if kernel is not None:
        return kernel
    return open_backend("memory")


__all__ = ["Backend", "BackendBox", "BackendEntry", "open_backend", "DEVICE_PATH", "LUO_DEVICE_PATH"]
