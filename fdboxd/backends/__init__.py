"""Where file references live. See :mod:`fdboxd.backends.base` for the contract."""

from __future__ import annotations

import os

from ..errors import FdboxError
from .base import Backend, BackendBox, BackendEntry

DEVICE_PATH = "/dev/fdbox"


def open_backend(name: str = "auto", device: str = DEVICE_PATH) -> Backend:
    """Open a backend by name: ``memory``, ``kernel``, or ``auto`` (kernel if the device exists)."""
    if name == "auto":
        name = "kernel" if os.path.exists(device) else "memory"
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


__all__ = ["Backend", "BackendBox", "BackendEntry", "open_backend", "DEVICE_PATH"]
