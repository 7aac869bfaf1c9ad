"""The limits that keep one local user from exhausting the daemon, in one place.

Two kinds, both refused with ``LimitExceeded`` or applied as back-pressure:

- :class:`Limits`, what the store holds: boxes, entries, bytes, metadata. The global
  caps count everybody, but non-root callers stop at seven eighths of each, so root
  (the operator) can always still put. Per-uid quotas apply to non-root callers only.
- :class:`Budget`, what the Varlink server holds for callers in flight: connections
  (per uid, with a reserve only root may use) and fds received or queued but not yet
  handled or written (per connection and per uid; over budget, a connection is simply
  not read until it drains, and a message whose fds would take the uid past its
  budget is refused with its fds closed at once). Idle non-root connections are closed after a timeout.

:func:`add_arguments` puts every one of them in ``fdboxd --help`` with its default,
and ``Status`` reports the caller's usage against them (:func:`fdboxd.store.Store.usage`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    """Bounds on what the store holds (all: LimitExceeded). 0 means no limit."""

    max_boxes: int = 1024
    max_entries_per_box: int = 1024
    max_entries_total: int = 16384
    max_metadata_keys: int = 32
    max_metadata_bytes: int = 4096
    max_boxes_per_uid: int = 64
    max_entries_per_uid: int = 1024
    max_bytes_per_uid: int = 0
    max_entry_size: int = 0

    def cap(self, limit: int, root: bool) -> int:
        """A global cap as it applies to a caller: root may use the last eighth."""
        return limit if root else limit - limit // 8


@dataclass(frozen=True)
class Budget:
    """What the Varlink server holds for connected callers at once.

    Root (uid 0) has no per-uid quota, may use the ``root_reserve`` connections nobody
    else can, and its connections never time out. The per-connection fd budget is
    back-pressure (reading pauses), never a refusal.
    """

    max_connections: int = 1024
    root_reserve: int = 16
    connections_per_uid: int = 64
    fds_per_connection: int = 512
    fds_per_uid: int = 1024
    idle_timeout: float = 300.0  # seconds; 0: never


#: (option, dataclass, field, type, help). The option's default is the field's.
_OPTIONS: list[tuple[str, type, str, type, str]] = [
    ("--max-boxes", Limits, "max_boxes", int, "boxes in all"),
    ("--max-entries", Limits, "max_entries_total", int, "entries in all"),
    ("--max-entries-per-box", Limits, "max_entries_per_box", int, "entries in one box"),
    ("--max-boxes-per-uid", Limits, "max_boxes_per_uid", int, "boxes one non-root user may own"),
    ("--max-entries-per-uid", Limits, "max_entries_per_uid", int, "entries one non-root user may own"),
    ("--max-bytes-per-uid", Limits, "max_bytes_per_uid", int, "bytes one non-root user may store (0: no limit)"),
    ("--max-entry-size", Limits, "max_entry_size", int, "bytes in one entry (0: no limit)"),
    ("--max-connections", Budget, "max_connections", int, "Varlink connections in all"),
    ("--root-reserved-connections", Budget, "root_reserve", int, "connections only root may use"),
    ("--max-connections-per-uid", Budget, "connections_per_uid", int, "connections of one non-root user"),
    ("--max-fds-in-flight-per-connection", Budget, "fds_per_connection", int,
     "fds one connection may have received but not handled, or queued in unread replies (then it is not read)"),
    ("--max-fds-in-flight-per-uid", Budget, "fds_per_uid", int, "the same, over all connections of one non-root user"),
    ("--idle-timeout", Budget, "idle_timeout", float, "seconds before an idle non-root connection is closed (0: never)"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits (see the README's security section)")
    for option, cls, name, kind, text in _OPTIONS:
        default = next(f.default for f in fields(cls) if f.name == name)
        g.add_argument(option, type=kind, default=default, dest=f"{cls.__name__}.{name}",
                       metavar="SECONDS" if kind is float else "N",
                       help=f"{text} (default: %(default)s)")


def from_args(a: argparse.Namespace) -> tuple[Limits, Budget]:
    values = vars(a)
    lim = {n: values[f"Limits.{n}"] for _, c, n, _, _ in _OPTIONS if c is Limits}
    bud = {n: values[f"Budget.{n}"] for _, c, n, _, _ in _OPTIONS if c is Budget}
    for option, _c, name, _k, _t in _OPTIONS:
        v = lim.get(name, bud.get(name))
        if v is None or v < 0:
            raise ValueError(f"{option} must not be negative")
    return Limits(**lim), Budget(**bud)
