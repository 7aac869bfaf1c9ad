"""An object that owns one fd: closed once, by ``close()`` or ``with``.

The device and session wrappers (``uapi.FdboxDevice``, ``uapi_luo.LuoDevice``,
``uapi_luo.LuoSession``) each hold exactly one fd whose lifetime matters beyond the
process: a forgotten ``/dev/fdbox`` fd keeps fdbox.ko from unloading, a forgotten
``/dev/liveupdate`` fd keeps every other agent out of LUO. This is that rule, once.

Closing on garbage collection is the subclass's choice (``close_on_gc``): right for a
device the wrapper opened itself, wrong for a LUO session fd, which is often wrapped
only to ask it one thing while another holder keeps it (closing an unfinished session
drops its preservations).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self


class OwnedFd:
    """Holds ``self.fd`` (``-1`` once closed)."""

    fd: int = -1
    close_on_gc = False

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __del__(self) -> None:
        if self.close_on_gc:
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
