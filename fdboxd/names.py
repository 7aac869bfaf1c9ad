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


class BoxRules:
    """Who may *create* a box of a given name: the answer to box-name squatting.

    Box names are otherwise first come, first served, so a tenant could take another's
    VM name before that VM starts. Two rules, root exempt from both:

    - built in: a name that starts with a uid and a dot (``1000.vm1``) belongs to that
      uid; every user has a namespace nobody else can enter;
    - ``fdboxd --box-owners FILE``: lines of ``PATTERN OWNER`` (shell-style pattern,
      uid or user name; ``#`` starts a comment). The first pattern that matches a
      name decides who may create it; names no line matches stay first come, first served.

    The check is at creation only: an existing box keeps its owner.
    """

    def __init__(self, rules: list[tuple[str, int]] | None = None) -> None:
        self.rules = list(rules or [])

    @classmethod
    def load(cls, path: str) -> BoxRules:
        import pwd

        rules = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                words = line.split("#", 1)[0].split()
                if not words:
                    continue
                if len(words) != 2:
                    raise ValueError(f"{path}:{n}: expected 'PATTERN OWNER'")
                pattern, owner = words
                try:
                    uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
                except KeyError:
                    raise ValueError(f"{path}:{n}: no user {owner!r}") from None
                rules.append((pattern, uid))
        return cls(rules)

    def owner(self, box: str) -> int | None:
        """The uid that alone (with root) may create ``box``, or None if anyone may."""
        import fnmatch

        prefix, dot, _ = box.partition(".")
        if dot and prefix.isdigit():
            return int(prefix)
        for pattern, uid in self.rules:
            if fnmatch.fnmatchcase(box, pattern):
                return uid
        return None
