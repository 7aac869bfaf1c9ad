"""Optional dependencies: checked once at start-up, before anything is bound.

The core (memory backend, Varlink socket, fdboxctl) needs the standard library only;
two front-ends need a package. A missing or too old one is a one-line error at
start (``fdboxd: --bus needs dbus-fast >= 1.84 ...``), never a traceback after the
socket was bound. The lowest versions are the ones Debian 12 ships
(``python3-dbus-fast`` 1.84, ``python3-pyroute2`` 0.7.2), tested by
tests/integration/test_optional_deps.py.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Optional:
    module: str  # what is imported
    dist: str  # what pip calls it
    minimum: tuple[int, ...]
    debian: str  # what apt calls it
    needed_for: str  # the option that needs it

    def problem(self) -> str | None:
        """None when usable, else the one line that says what to install."""
        want = ".".join(map(str, self.minimum))
        hint = f"install {self.debian} (Debian) or `pip install '{self.dist}>={want}'`"
        if importlib.util.find_spec(self.module) is None:
            return f"{self.needed_for} needs {self.dist} >= {want}, which is not installed: {hint}"
        # Imported here, not at the top: importlib.metadata costs ~20 ms of start-up
        # (email, zipfile, csv ...), and only --bus and taps ask for it.
        from importlib import metadata

        try:
            have = metadata.version(self.dist)
        except metadata.PackageNotFoundError:
            return None  # importable without metadata (a checkout): trust it
        if _version_tuple(have) < self.minimum:
            return f"{self.needed_for} needs {self.dist} >= {want}, found {have}: {hint}"
        return None


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


DBUS = Optional("dbus_fast", "dbus-fast", (1, 84), "python3-dbus-fast", "--bus")
NET = Optional("pyroute2", "pyroute2", (0, 7), "python3-pyroute2", "--allow-type tap")
