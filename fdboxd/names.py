"""Box and entry name rules (see conventions: "Model").

Box names fit a LUO session name (63 characters); entry names are a strict subset of
systemd's FDNAME rules, so an entry can be mirrored into ``LISTEN_FDNAMES`` unchanged.
The kernel module enforces the same rules; these are checked first so a bad name never
reaches a backend.
"""

from __future__ import annotations

import re

from .errors import FdboxError

BOX_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,62}")
ENTRY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=,-]{0,254}")
BOX_NAME_MAX = 63
ENTRY_NAME_MAX = 255


def check_box_name(name: object) -> str:
    """Return ``name`` if it is a valid box name, else raise ``InvalidName``."""
    if not isinstance(name, str) or not BOX_NAME_RE.fullmatch(name):
        raise FdboxError("InvalidName", f"invalid box name {name!r}", box=_printable(name))
    return name


def check_entry_name(name: object) -> str:
    """Return ``name`` if it is a valid entry name, else raise ``InvalidName``."""
    if not isinstance(name, str) or not ENTRY_NAME_RE.fullmatch(name):
        raise FdboxError("InvalidName", f"invalid entry name {name!r}", name=_printable(name))
    return name


def _printable(name: object) -> str:
    text = name if isinstance(name, str) else repr(name)
    return text[:80]
