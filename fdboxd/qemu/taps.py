"""``fdbox-qemu --tap``: the VM's tap devices, held in its box next to the RAM.

A ``--tap IFNAME[,queues=N][,bridge=BR]`` is one tap interface with N queue fds, held
as entries ``tap.IFNAME.q0`` … ``tap.IFNAME.q<N-1>`` of the VM's box (type ``tap``,
so fdboxd records the interface and recreates it after a kexec: :mod:`fdboxd.net`).
``start`` takes the queues the box holds, or, when it holds none of that tap, creates
it with :func:`fdboxd.net.recreate_interface` from a record of what was asked
(``IFF_TAP|IFF_NO_PI|IFF_VNET_HDR``, ``IFF_MULTI_QUEUE`` when N > 1, up, port of BR):
the same code that recreates a recorded tap after a kexec, so a created tap and a
recreated one are made alike. QEMU gets ``-netdev tap,id=IFNAME,fd=N`` (one queue) or
``fds=a:b:…``; the user's QEMU-ARGS carry the ``-device …,netdev=IFNAME``.

Why the queues are re-attached before QEMU gets them: QEMU takes an inherited tap fd
to be attached (its ``enabled`` starts true), but a guest that used fewer queue pairs
than the tap has left the other queues detached (``TUNSETQUEUE IFF_DETACH_QUEUE``) on
the very file the box holds. The next QEMU would then detach an already detached
queue, which the kernel refuses (EINVAL), and QEMU aborts on its
``assert(!r)`` in ``virtio_net_set_queue_pairs()``. Attaching every queue first gives
the next QEMU the fresh-open state it assumes.
"""

from __future__ import annotations

import errno
import fcntl
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ..errors import FdboxError

#: An interface name that is also a valid entry-name part and a QEMU netdev id
#: (QEMU ids: a letter first, then letters, digits, ``-._``); at most IFNAMSIZ-1 bytes.
IFNAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,14}")
BRIDGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,14}")
ENTRY_RE = re.compile(r"tap\.([A-Za-z][A-Za-z0-9._-]{0,14})\.q(\d+)")
MAX_QUEUES = 256  # MAX_TAP_QUEUES in the kernel
TUNSETQUEUE = 0x400454D9  # _IOW('T', 217, int)
IFF_ATTACH_QUEUE = 0x0200


class TapSpec(NamedTuple):
    """One ``--tap``: the interface, its queue count and the bridge to join (if any).
    (A NamedTuple, not a frozen dataclass: ``dataclasses`` is not imported on the
    ``start`` path.)"""

    ifname: str
    queues: int = 1
    bridge: str | None = None

    def entry(self, queue: int) -> str:
        return entry_name(self.ifname, queue)

    def __str__(self) -> str:
        return self.ifname + (f",queues={self.queues}" if self.queues != 1 else "") + (
            f",bridge={self.bridge}" if self.bridge else "")


def entry_name(ifname: str, queue: int) -> str:
    return f"tap.{ifname}.q{queue}"


def parse_tap(text: str) -> TapSpec:
    """``IFNAME[,queues=N][,bridge=BR]`` → TapSpec; InvalidRequest naming what is wrong."""
    ifname, *opts = text.split(",")
    if not IFNAME_RE.fullmatch(ifname):
        raise FdboxError("InvalidRequest", f"--tap {text}: bad interface name {ifname!r} (want a letter, then up "
                         "to 14 letters, digits or -._)")
    queues, bridge = 1, None
    seen: set[str] = set()
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in ("queues", "bridge") or key in seen:
            raise FdboxError("InvalidRequest", f"--tap {text}: bad option {opt!r} (want queues=N or bridge=BR, once each)")
        seen.add(key)
        if key == "queues":
            if not value.isdigit() or not 1 <= int(value) <= MAX_QUEUES:
                raise FdboxError("InvalidRequest", f"--tap {text}: queues must be 1 to {MAX_QUEUES}")
            queues = int(value)
        elif not BRIDGE_RE.fullmatch(value):
            raise FdboxError("InvalidRequest", f"--tap {text}: bad bridge name {value!r}")
        else:
            bridge = value
    return TapSpec(ifname, queues, bridge)


def check_unique(specs: Iterable[TapSpec]) -> None:
    seen: set[str] = set()
    for s in specs:
        if s.ifname in seen:
            raise FdboxError("InvalidRequest", f"--tap {s.ifname} given twice")
        seen.add(s.ifname)


def held(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[int, Mapping[str, Any]]]:
    """The taps a box holds, from its entry names: ifname → {queue index: entry}."""
    out: dict[str, dict[int, Mapping[str, Any]]] = {}
    for name, e in entries.items():
        if (m := ENTRY_RE.fullmatch(name)) and e.get("type") == "tap":
            out.setdefault(m.group(1), {})[int(m.group(2))] = e
    return out


def check_held(vm: str, spec: TapSpec, queues: Mapping[int, Mapping[str, Any]]) -> None:
    """The held tap must be the one ``spec`` asks for: same queue count, same bridge."""
    if sorted(queues) != list(range(spec.queues)):
        have = ", ".join(entry_name(spec.ifname, i) for i in sorted(queues))
        raise FdboxError("InvalidRequest", f"box {vm} holds tap {spec.ifname} with {len(queues)} queue(s) ({have}), "
                         f"but --tap asks for {spec.queues}; start with the held tap's arguments, or remove its "
                         "entries first (fdboxctl rm)", box=vm)
    rec = queues[0].get("extra", {}).get("net", {})
    if "master" in rec and rec["master"] != spec.bridge:
        raise FdboxError("InvalidRequest", f"box {vm} holds tap {spec.ifname} on bridge {rec['master'] or '(none)'}, "
                         f"but --tap asks for {spec.bridge or 'no bridge'}", box=vm)


def create(spec: TapSpec) -> list[int]:
    """Create tap ``spec`` in this process's network namespace: its open queue fds.

    Refused when an interface of that name exists (fdbox does not adopt a tap it did not
    create) or the bridge is missing or not a bridge; a failure leaves no interface.
    """
    # Imported here, not at the top: every fdbox-qemu start and suspend imports this
    # module, and only a start that creates a tap needs fdboxd.net (issue 18: each
    # import is on the blackout path, ~0.5 s of a TCG guest's fdbox-qemu).
    from .. import net

    flags = net.IFF_TAP | net.IFF_NO_PI | net.IFF_VNET_HDR | (net.IFF_MULTI_QUEUE if spec.queues > 1 else 0)
    rec: dict[str, Any] = {
        "ifname": spec.ifname, "kind": "tap", "mac": None, "mtu": None, "up": True,
        "master": spec.bridge, "master_kind": "bridge" if spec.bridge else None,
        "vlans": None,  # a new port: the bridge's default VLANs
        "tun_flags": flags, "owner": -1, "group": -1, "persist": False,
        "vnet_hdr_sz": None, "sndbuf": None, "netns": {"daemon": True},
    }
    try:
        return net.in_netns(None, lambda: net.recreate_interface(rec, spec.queues))
    except FdboxError as e:
        if e.name == "AlreadyExists":
            raise FdboxError("AlreadyExists", f"interface {spec.ifname} exists but is not held in this box: fdbox-qemu "
                             "only uses a tap it created (pick another name, or delete it)") from None
        raise
    except OSError as e:
        name = "PermissionDenied" if e.errno in (errno.EPERM, errno.EACCES) else "BackendUnavailable"
        raise FdboxError(name, f"cannot create tap {spec.ifname}: {e.strerror or e}") from None
    except Exception as e:  # pyroute2's NetlinkError
        raise FdboxError("BackendUnavailable", f"cannot create tap {spec.ifname}: {e}") from None


def attach(fd: int) -> None:
    """Attach a queue a previous QEMU detached (see the module docstring); EINVAL means it
    is attached already, or the tap is single-queue."""
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", IFF_ATTACH_QUEUE))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise FdboxError("BackendUnavailable", f"cannot attach a tap queue: {e.strerror}") from None


def netdev_args(spec: TapSpec, fds: list[int]) -> list[str]:
    key = f"fd={fds[0]}" if len(fds) == 1 else "fds=" + ":".join(str(fd) for fd in fds)
    return ["-netdev", f"tap,id={spec.ifname},{key}"]
