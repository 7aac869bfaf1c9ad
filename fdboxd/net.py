"""Network devices through a live update: record tap/macvtap interfaces, recreate them.

A tap fd cannot ride KHO: the interface dies with the old kernel. So fdbox *holds* tap
fds like any other entry (the daemon's memory side, :attr:`Store.side`, never the
kernel box) and, when a tap is put, *records* the interface it belongs to in
``Entry.extra["net"]``. Sealing marks the entry ``extra["recreate"] = True``. After a
kexec (or a daemon restart that lost the fd) the store keeps such entries although no
backend holds them, and :func:`restore_pending` recreates them at start; on request
:func:`restore_box` does it for one box (Varlink ``NetRestore``, ``fdboxctl
net-restore BOX``). The owner then ``Get``\\s new fds under the same names.

Design decisions
================

**One entry per queue fd.** A multi-queue tap (``IFF_MULTI_QUEUE``) is several entries,
one per queue fd, each carrying the same interface record; entries of one box with the
same ``(netns, ifname)`` are the queues of one interface and are recreated together
(the interface once, then one ``TUNSETIFF`` per queue). This keeps ``Put`` one fd per
entry, mirrors systemd's fdstore (one name per fd) and lets a VMM name queues as it
likes (``net0.q0``, ``net0.q1``...). Queues of a tap are interchangeable to the kernel,
so no queue index is recorded. Keep all queues of one interface in one box: a restore
of another box holding more queues of it would find the name taken.

**What is recorded** (``extra["net"]``, version 1): ``ifname``, ``kind`` (``tap`` or
``macvtap``), ``mac``, ``mtu``, ``up`` (administrative IFF_UP), ``tun_flags`` (IFF_TAP,
IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE...: TUNGETIFF, except IFF_NO_PI, whose bit
TUNGETIFF reuses for IFF_NOFILTER, so it comes from netlink ``IFLA_TUN_PI``) and
``flags`` (their names), ``persist``, ``owner``/``group`` (TUNSETOWNER/TUNSETGROUP values, -1 for
none, read from netlink ``IFLA_TUN_OWNER``/``IFLA_TUN_GROUP`` — sysfs would show the
daemon's namespace, not the tap's), ``vnet_hdr_sz`` and ``sndbuf`` of the fd,
``master`` (bridge name), ``vlans`` (bridge port VLANs: vid, pvid, untagged),
``netns`` (below), and for macvtap ``link`` (lower device) and ``mode``. Offloads
(TUNSETOFFLOAD) have no getter; a VMM sets them again on the new fd, as it does at start.

**Which network namespace.** The tap's namespace is asked of the *kernel*, not the
caller: ``TUNGETDEVNETNS`` on the tap fd (Linux 5.2+) returns the device's netns.
macvtap fds do not answer it, so for them the caller's namespace
(``/proc/<SO_PEERCRED pid>/ns/net``) is used and the interface must be found there. A
namespace inode does not survive kexec, so it is recorded by a *name* that does:

- ``{"daemon": true}`` if it is the daemon's own namespace (recreated there);
- ``{"name": N}`` if ``/run/netns/N`` is that namespace (``ip netns add`` names);
  after kexec ``/run/netns/N`` must exist again before the restore: fdbox does not
  create namespaces (someone else's ``ip netns add N`` would then fail), it fails the
  entry with ``NotFound`` and ``net-restore`` may be run again once it exists;
- ``{"anonymous": true}`` otherwise (a container's unnamed netns): the tap is held
  across VMM restarts as usual but cannot be found again, so recreating it fails with a
  clear ``NotFound``.

**Threads, not the loop.** Every interface operation uses pyroute2's synchronous
``IPRoute`` in a short-lived worker thread that first ``setns()``\\s into the target
namespace (a thread's namespace is its own; the thread ends with it, so nothing leaks
into the daemon). That same thread opens ``/dev/net/tun``, because a tun device is
created in the namespace of whoever *opened* ``/dev/net/tun``. The daemon's loop never
waits for that thread: a tap Put reads its interface first (:func:`records_ahead`, in
an executor the front-end's call awaits) and the store's synchronous put then takes
the record read (:func:`prerecorded`); ``NetRestore`` recreates interfaces the same way
(:func:`restore_box_async`). Only the start-up restore (:func:`restore_pending`, before
the daemon serves) waits for the thread where it runs. ``AsyncIPRoute`` in the daemon
loop would need an async store, and pyroute2's own ``netns=`` forks a child per
socket. pyroute2 is imported only here, and only when a tap is put or restored: the
rest of fdbox runs on the standard library alone.

**Failures.** Each interface is checked before anything is created (name free, bridge
present and a bridge, lower device present, namespace present); a check or a later
step that fails undoes what was created for that interface only and fails its entries
with a clear error; other interfaces go on.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import failpoints
from .errors import FdboxError
from .fdtypes import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_TUN,
    IFF_VNET_HDR,
    FdInfo,
    FdType,
    detect,
)

if TYPE_CHECKING:
    from .model import Caller, Entry
    from .kinds.base import StoreSurface as Store

log = logging.getLogger("fdboxd.net")

RECORD_VERSION = 1
NETNS_DIR = "/run/netns"
TUN_PATH = "/dev/net/tun"

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
TUNGETSNDBUF = 0x800454D3
TUNSETSNDBUF = 0x400454D4
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNGETDEVNETNS = 0x54E3  # _IO('T', 227), Linux 5.2+
IFF_PERSIST = 0x0800
IFF_NAPI = 0x0010
IFF_NAPI_FRAGS = 0x0020
IFF_ONE_QUEUE = 0x2000
IFF_DETACH_QUEUE = 0x0400
#: The TUNSETIFF flags that are chosen at open time and must be asked for again.
TUN_OPEN_FLAGS = IFF_TUN | IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE | IFF_NAPI | IFF_NAPI_FRAGS
FLAG_NAMES = {
    IFF_TUN: "IFF_TUN", IFF_TAP: "IFF_TAP", IFF_NAPI: "IFF_NAPI", IFF_NAPI_FRAGS: "IFF_NAPI_FRAGS",
    IFF_MULTI_QUEUE: "IFF_MULTI_QUEUE", IFF_PERSIST: "IFF_PERSIST", IFF_NO_PI: "IFF_NO_PI",
    IFF_ONE_QUEUE: "IFF_ONE_QUEUE", IFF_VNET_HDR: "IFF_VNET_HDR",
}
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4

T = TypeVar("T")


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in sorted(FLAG_NAMES.items()) if flags & bit]


# ---------------------------------------------------------------------- namespaces


def _libc() -> ctypes.CDLL:
    from .fdtypes import libc

    return libc()  # type: ignore[no-any-return]


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(nsfd: int | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that first joins the network namespace ``nsfd``, and
    wait for it: never on the daemon's loop (see :func:`in_netns_async`).

    ``None`` runs it in the daemon's own namespace (still in a thread: pyroute2's sync
    API runs its own event loop, which cannot nest in the daemon's running loop).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            if nsfd is not None:
                _setns(nsfd)
            failpoints.hit("net.in_netns")
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="fdboxd-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


async def in_netns_async(nsfd: int | None, fn: Callable[[], T]) -> T:
    """:func:`in_netns` for the event loop: an executor thread waits for the netns
    thread, the loop awaits it and serves meanwhile. ``nsfd`` must stay open until
    this returns."""
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, in_netns, nsfd, fn)


def netns_identity(nsfd: int) -> dict[str, Any]:
    """A name for the namespace behind ``nsfd`` that means the same after a kexec."""
    st = os.fstat(nsfd)
    key = (st.st_dev, st.st_ino)
    own = os.stat("/proc/self/ns/net")
    if key == (own.st_dev, own.st_ino):
        return {"daemon": True}
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except OSError:
        names = []
    for name in names:
        try:
            s = os.stat(os.path.join(NETNS_DIR, name))
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == key:
            return {"name": name}
    return {"anonymous": True}


def describe_netns(ns: dict[str, Any]) -> str:
    if ns.get("daemon"):
        return "the daemon's network namespace"
    if ns.get("name"):
        return f"network namespace {ns['name']}"
    return "an unnamed network namespace"


def open_netns(ns: dict[str, Any]) -> int | None:
    """An fd for a recorded namespace (``None``: the daemon's own). FdboxError if gone."""
    if ns.get("daemon"):
        return None
    name = ns.get("name")
    if not name:
        raise FdboxError("NotFound", "the tap was in an unnamed network namespace, which cannot be found again")
    if "/" in name or name in (".", ".."):
        raise FdboxError("InvalidRequest", f"bad network namespace name {name!r}")
    try:
        return os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise FdboxError(
            "NotFound", f"network namespace {name} does not exist ({NETNS_DIR}/{name}: {e.strerror}); "
            "create it and run net-restore again",
        ) from e


def _tap_netns_fd(fd: int, kind: str, caller_pid: int) -> int:
    """The tap's own namespace from the kernel; for macvtap, the caller's."""
    if kind == "tap":
        try:
            return fcntl.ioctl(fd, TUNGETDEVNETNS)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTTY):
                raise FdboxError("InvalidRequest", f"TUNGETDEVNETNS failed: {e.strerror}") from e
    if caller_pid <= 0:
        raise FdboxError("InvalidRequest", "cannot tell the network namespace of this tap")
    try:
        return os.open(f"/proc/{caller_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise FdboxError("InvalidRequest", f"cannot open the caller's network namespace: {e.strerror}") from e


# ---------------------------------------------------------------------- netlink helpers


def _ipr():  # type: ignore[no-untyped-def]
    # pyroute2 warns at import when the kernel has no tc (/proc/net/psched): not ours.
    quiet = logging.getLogger("pyroute2.netlink.rtnl.tcmsg")
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.ERROR)
    try:
        from pyroute2 import IPRoute
    except ImportError as e:
        raise FdboxError("BackendUnavailable", "tap devices need the pyroute2 package") from e
    return IPRoute()


def _nested(msg: Any, *path: str) -> Any:
    cur = msg
    for key in path:
        if cur is None:
            return None
        cur = cur.get_attr(key)
    return cur


def _lookup(ipr: Any, ifname: str) -> Any | None:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        return None
    return ipr.link("get", index=found[0])[0]


def _kind(link: Any) -> str | None:
    return _nested(link, "IFLA_LINKINFO", "IFLA_INFO_KIND")


def _port_vlans(ipr: Any, index: int) -> list[dict[str, Any]]:
    """The bridge VLANs of port ``index`` (empty without VLAN filtering)."""
    out = []
    for msg in ipr.get_vlans():
        if msg.get("index") != index:
            continue
        spec = msg.get_attr("IFLA_AF_SPEC")
        if spec is None:
            continue
        for value in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO"):
            vid, flags = int(value["vid"]), int(value["flags"])
            out.append({
                "vid": vid,
                "pvid": bool(flags & BRIDGE_VLAN_INFO_PVID),
                "untagged": bool(flags & BRIDGE_VLAN_INFO_UNTAGGED),
            })
    return sorted(out, key=lambda v: v["vid"])


def _vlan_flags(v: dict[str, Any]) -> int:
    return (BRIDGE_VLAN_INFO_PVID if v.get("pvid") else 0) | (BRIDGE_VLAN_INFO_UNTAGGED if v.get("untagged") else 0)


# ---------------------------------------------------------------------- record


def _ioctl_int(fd: int, req: int) -> int | None:
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, req, buf, True)
    except OSError:
        return None
    return int(buf[0])


def read_interface(ipr: Any, ifname: str, kind: str) -> dict[str, Any]:
    """The recordable attributes of ``ifname``, as seen through ``ipr``."""
    link = _lookup(ipr, ifname)
    if link is None:
        raise FdboxError("NotFound", f"interface {ifname} not found in the tap's network namespace")
    lkind = _kind(link)
    if kind == "tap" and lkind != "tun":
        raise FdboxError("InvalidRequest", f"interface {ifname} is {lkind}, not a tun/tap device")
    if kind == "macvtap" and lkind != "macvtap":
        raise FdboxError("InvalidRequest", f"interface {ifname} is {lkind}, not macvtap")
    rec: dict[str, Any] = {
        "ifname": ifname,
        "kind": kind,
        "mac": link.get_attr("IFLA_ADDRESS"),
        "mtu": link.get_attr("IFLA_MTU"),
        "up": bool(link["flags"] & IFF_UP),
        "master": None,
        "vlans": [],
    }
    master = link.get_attr("IFLA_MASTER")
    if master:
        m = ipr.link("get", index=master)[0]
        rec["master"] = m.get_attr("IFLA_IFNAME")
        rec["master_kind"] = _kind(m)
        if rec["master_kind"] == "bridge":
            rec["vlans"] = _port_vlans(ipr, link["index"])
    data = _nested(link, "IFLA_LINKINFO", "IFLA_INFO_DATA")
    if kind == "tap":
        owner = data.get_attr("IFLA_TUN_OWNER") if data is not None else None
        group = data.get_attr("IFLA_TUN_GROUP") if data is not None else None
        rec["owner"] = -1 if owner is None else int(owner)
        rec["group"] = -1 if group is None else int(group)
        rec["persist"] = bool(data.get_attr("IFLA_TUN_PERSIST")) if data is not None else False
        rec["pi"] = bool(data.get_attr("IFLA_TUN_PI")) if data is not None else None
    else:
        lower = link.get_attr("IFLA_LINK")
        rec["link"] = ipr.link("get", index=lower)[0].get_attr("IFLA_IFNAME") if lower else None
        rec["mode"] = data.get_attr("IFLA_MACVTAP_MODE") if data is not None else None
    return rec


@dataclass
class Ahead:
    """A tap's record read before its put (:func:`records_ahead`): the record, or the
    error reading it raised, for :func:`record` to return or raise in its place."""

    ifname: str | None
    value: dict[str, Any] | None = None
    error: BaseException | None = None


#: fd -> what :func:`records_ahead` read for it, while :func:`prerecorded` is in force.
_ahead: dict[int, Ahead] = {}


async def records_ahead(fds: list[int], caller_pid: int) -> dict[int, Ahead]:
    """Read the interface of every tap among ``fds`` in a worker, the loop free meanwhile.

    Not taps, or fds that are no good: left out (the store's put says what is wrong).
    An error reading a record is kept, not raised: the put raises it where it asks for
    the record, after its own checks, as without the read ahead.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    out: dict[int, Ahead] = {}
    for fd in fds:
        try:
            info = detect(fd)
        except Exception:  # noqa: BLE001 - the store's check says why
            continue
        if info.type != FdType.TAP or fd in out:
            continue
        ahead = Ahead(info.ifname)
        try:
            ahead.value = await loop.run_in_executor(None, _record_now, fd, info, caller_pid)
        except Exception as e:  # noqa: BLE001 - raised at the put, in order
            ahead.error = e
        out[fd] = ahead
    return out


@contextmanager
def prerecorded(ahead: dict[int, Ahead]) -> Iterator[None]:
    """While in force (one synchronous put on the loop), :func:`record` of these fds
    returns what :func:`records_ahead` read instead of reading again."""
    _ahead.update(ahead)
    try:
        yield
    finally:
        for fd in ahead:
            _ahead.pop(fd, None)


def record(fd: int, info: FdInfo, caller_pid: int = 0) -> dict[str, Any]:
    """Everything needed to recreate the interface of tap fd ``fd`` (put time): read now,
    or read ahead in a worker (:func:`records_ahead`, :func:`prerecorded`)."""
    ahead = _ahead.pop(fd, None)
    if ahead is not None and ahead.ifname == info.ifname:
        if ahead.error is not None:
            raise ahead.error
        assert ahead.value is not None
        return ahead.value
    return _record_now(fd, info, caller_pid)


def _record_now(fd: int, info: FdInfo, caller_pid: int) -> dict[str, Any]:
    if info.type != FdType.TAP or info.ifname is None or info.tun_flags is None:
        raise FdboxError("UnsupportedType", "not a tap fd", type=str(info.type))
    kind = info.net_kind or "tap"
    nsfd = _tap_netns_fd(fd, kind, caller_pid)
    try:
        netns = netns_identity(nsfd)

        def read() -> dict[str, Any]:
            with _ipr() as ipr:
                return read_interface(ipr, info.ifname or "", kind)

        try:
            rec = in_netns(nsfd, read)
        except FdboxError:
            raise
        except Exception as e:  # OSError, pyroute2's NetlinkError
            raise FdboxError("BackendUnavailable", f"cannot read interface {info.ifname}: {e}") from e
    finally:
        os.close(nsfd)
    flags = info.tun_flags
    if kind == "tap" and rec.get("pi") is not None:
        # TUNGETIFF reports IFF_NOFILTER (0x1000, no socket filter attached) in the bit
        # IFF_NO_PI uses, so packet information is taken from netlink (IFLA_TUN_PI).
        flags = (flags & ~(IFF_NO_PI | IFF_DETACH_QUEUE)) | (0 if rec["pi"] else IFF_NO_PI)
    rec.pop("pi", None)
    rec.update({
        "version": RECORD_VERSION,
        "netns": netns,
        "tun_flags": flags,
        "flags": flag_names(flags),
        "vnet_hdr_sz": _ioctl_int(fd, TUNGETVNETHDRSZ),
        "sndbuf": _ioctl_int(fd, TUNGETSNDBUF),
    })
    return rec


# ---------------------------------------------------------------------- recreate


@dataclass
class Result:
    """What happened to one entry in a restore."""

    box: str
    name: str
    ifname: str
    status: str  # "recreated" | "kept" | "failed"
    error: str | None = None
    error_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"box": self.box, "name": self.name, "ifname": self.ifname, "status": self.status}
        if self.error is not None:
            d["error"] = self.error
            d["error_name"] = self.error_name
        return d


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def _open_tun(ifname: str, flags: int) -> int:
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(ifname, flags & TUN_OPEN_FLAGS))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_macvtap(ifindex: int) -> int:
    """Open the macvtap char device of ``ifindex`` in *this thread's* namespace.

    ``/dev/tapN`` is named by an ifindex that is per namespace, so the device number is
    read from a sysfs mounted in a private mount namespace of this thread (which shows
    the thread's network namespace) and opened through a private node.
    """
    CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 1 << 18
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"mode=0700") != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs")
    os.mkdir("/tmp/sys")
    if libc.mount(b"sysfs", b"/tmp/sys", b"sysfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount sysfs")
    with open(f"/tmp/sys/class/macvtap/tap{ifindex}/dev") as f:
        major, minor = (int(x) for x in f.read().strip().split(":"))
    node = f"/tmp/tap{ifindex}"
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(major, minor))
    return os.open(node, os.O_RDWR | os.O_CLOEXEC)


def _check_prerequisites(ipr: Any, rec: dict[str, Any]) -> None:
    ifname = rec["ifname"]
    if ipr.link_lookup(ifname=ifname):
        raise FdboxError(
            "AlreadyExists", f"interface {ifname} already exists in {describe_netns(rec['netns'])} "
            "and is not held by fdbox; nothing was changed",
        )
    if rec.get("master"):
        m = _lookup(ipr, rec["master"])
        if m is None:
            raise FdboxError("NotFound", f"bridge {rec['master']} of {ifname} does not exist")
        if rec.get("master_kind") and _kind(m) != rec["master_kind"]:
            raise FdboxError("InvalidRequest", f"{rec['master']} is {_kind(m)}, not {rec['master_kind']}")
    if rec["kind"] == "macvtap" and (not rec.get("link") or not ipr.link_lookup(ifname=rec["link"])):
        raise FdboxError("NotFound", f"lower device {rec.get('link')} of macvtap {ifname} does not exist")


def _configure(ipr: Any, rec: dict[str, Any], index: int) -> None:
    """MAC, MTU, bridge, VLANs and up/down of the new interface ``index``."""
    if rec.get("mac"):
        ipr.link("set", index=index, address=rec["mac"])
    if rec.get("mtu"):
        ipr.link("set", index=index, mtu=rec["mtu"])
    if rec.get("master"):
        ipr.link("set", index=index, master=ipr.link_lookup(ifname=rec["master"])[0])
    if rec.get("master") and rec.get("vlans", []) is not None:  # None: a new port, the bridge's defaults
        want = {v["vid"]: _vlan_flags(v) for v in rec.get("vlans", [])}
        have = {v["vid"]: _vlan_flags(v) for v in _port_vlans(ipr, index)}
        if want or have:
            for vid in set(have) - set(want):
                ipr.vlan_filter("del", index=index, vlan_info={"vid": vid})
            for vid, flags in sorted(want.items()):
                if have.get(vid) != flags:
                    ipr.vlan_filter("add", index=index, vlan_info={"vid": vid, "flags": flags})
    ipr.link("set", index=index, state="up" if rec.get("up") else "down")


def _set_fd_attrs(fd: int, rec: dict[str, Any]) -> None:
    if rec["kind"] == "macvtap":
        # A macvtap queue opens as IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; TUNSETIFF changes
        # only IFF_VNET_HDR and IFF_MULTI_QUEUE on it (drivers/net/tap.c).
        keep = rec["tun_flags"] & (IFF_VNET_HDR | IFF_MULTI_QUEUE)
        fcntl.ioctl(fd, TUNSETIFF, _ifreq("", IFF_TAP | IFF_NO_PI | keep))
    if rec.get("vnet_hdr_sz") and rec["tun_flags"] & IFF_VNET_HDR:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", rec["vnet_hdr_sz"]))
    if rec.get("sndbuf"):
        fcntl.ioctl(fd, TUNSETSNDBUF, struct.pack("i", rec["sndbuf"]))


def recreate_interface(rec: dict[str, Any], queues: int) -> list[int]:
    """Recreate one interface with ``queues`` open fds. Run in the target namespace.

    ``fdbox-qemu --tap`` creates new taps with it too (a record without MAC, MTU or
    VLANs: the kernel's and the bridge's defaults), so both are made the same way.
    """
    fds: list[int] = []
    created_index: int | None = None
    with _ipr() as ipr:
        _check_prerequisites(ipr, rec)
        try:
            if rec["kind"] == "tap":
                for _ in range(queues):
                    fds.append(_open_tun(rec["ifname"], rec["tun_flags"]))
                created_index = ipr.link_lookup(ifname=rec["ifname"])[0]
                # These three take their value as the ioctl argument itself, not a pointer.
                if rec.get("owner", -1) != -1:
                    fcntl.ioctl(fds[0], TUNSETOWNER, rec["owner"])
                if rec.get("group", -1) != -1:
                    fcntl.ioctl(fds[0], TUNSETGROUP, rec["group"])
                if rec.get("persist"):
                    fcntl.ioctl(fds[0], TUNSETPERSIST, 1)
            else:
                lower = ipr.link_lookup(ifname=rec["link"])[0]
                kw: dict[str, Any] = {"ifname": rec["ifname"], "kind": "macvtap", "link": lower}
                if rec.get("mode"):
                    kw["macvtap_mode"] = rec["mode"]
                ipr.link("add", **kw)
                created_index = ipr.link_lookup(ifname=rec["ifname"])[0]
            _configure(ipr, rec, created_index)
            if rec["kind"] == "macvtap":
                for _ in range(queues):
                    fds.append(_macvtap_here(created_index))
            for fd in fds:
                _set_fd_attrs(fd, rec)
        except BaseException:
            for fd in fds:
                os.close(fd)
            if created_index is not None and (rec["kind"] == "macvtap" or rec.get("persist")):
                try:
                    ipr.link("del", index=created_index)
                except Exception:  # already gone with its last fd
                    pass
            raise
    return fds


def _macvtap_here(ifindex: int) -> int:
    """Open macvtap ``ifindex`` of the current thread's netns from a helper thread."""
    ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return in_netns(ns, lambda: _open_macvtap(ifindex))
    finally:
        os.close(ns)


def _group(entries: Iterable[Entry]) -> dict[tuple[str, str], list[Entry]]:
    """Entries by interface: the queues of one tap are recreated together."""
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in sorted(entries, key=lambda e: e.name):
        rec = e.extra.get("net")
        if e.type != FdType.TAP or not isinstance(rec, dict):
            continue
        key = (repr(sorted(rec.get("netns", {}).items())), rec["ifname"])
        groups.setdefault(key, []).append(e)
    return groups


def _held_alive(store: Store, box: str, name: str) -> bool:
    """Whether the side still holds a tap fd that is attached to a live interface."""
    try:
        fd = store.side.get(box, name)
    except FdboxError:
        return False
    try:
        info = detect(fd)
        return info.type == FdType.TAP and bool(info.ifname)
    finally:
        os.close(fd)


#: One piece of netns work a restore asks its driver to run: (netns fd or None, what to run there).
NetnsWork = tuple["int | None", Callable[[], list[int]]]


def _restore_steps(store: Store, box: str, entries: list[Entry]) -> Generator[NetnsWork, list[int], list[Result]]:
    """Recreate the interfaces of ``entries`` (all in ``box``) and hold the new fds.

    The netns work is yielded to a driver that runs it (:func:`in_netns` where nothing
    else runs, :func:`in_netns_async` on the loop) and sends back its fds or throws its
    error; so between a yield and its answer the store may have changed, and an entry
    that left its box meanwhile is not held again.
    """
    results: list[Result] = []
    for (_ns, ifname), group in sorted(_group(entries).items(), key=lambda kv: kv[0][1]):
        rec = group[0].extra["net"]
        if all(_held_alive(store, box, e.name) for e in group):
            results += [Result(box, e.name, ifname, "kept") for e in group]
            continue
        try:
            nsfd = open_netns(rec.get("netns", {}))
            try:
                fds = yield (nsfd, lambda rec=rec, n=len(group): recreate_interface(rec, n))
            finally:
                if nsfd is not None:
                    os.close(nsfd)
        except FdboxError as e:
            log.warning("cannot recreate %s for %s/%s: %s", ifname, box, [x.name for x in group], e.message)
            results += [Result(box, x.name, ifname, "failed", e.message, e.name) for x in group]
            continue
        except Exception as e:  # OSError, pyroute2's NetlinkError: this interface only
            msg = f"recreating {ifname} failed: {getattr(e, 'strerror', None) or e}"
            log.warning("%s/%s: %s", box, [x.name for x in group], msg)
            results += [Result(box, x.name, ifname, "failed", msg, "BackendUnavailable") for x in group]
            continue
        try:
            for entry, fd in zip(group, fds, strict=True):
                if _entry_in(store, box, entry):
                    store.rehold(box, entry, fd)
                    results.append(Result(box, entry.name, ifname, "recreated"))
                else:
                    results.append(Result(box, entry.name, ifname, "failed", "removed while its interface was "
                                          "being recreated", "NotFound"))
        finally:
            for fd in fds:
                os.close(fd)  # the side holds its own dup
        log.info("recreated %s (%d queue(s)) in %s for box %s", ifname, len(group),
                 describe_netns(rec.get("netns", {})), box)
    return results


def _entry_in(store: Store, box: str, entry: Entry) -> bool:
    b = store.boxes.get(box)
    return b is not None and b.entries.get(entry.name) is entry


def restore_entries(store: Store, box: str, entries: list[Entry]) -> list[Result]:
    """Recreate the interfaces of ``entries`` (all in ``box``), waiting for each netns
    thread where it runs: for the start-up restore, before the daemon serves."""
    steps = _restore_steps(store, box, entries)
    try:
        work = next(steps)
        while True:
            try:
                fds = in_netns(*work)
            except Exception as e:  # noqa: BLE001 - handed to the step that asked
                work = steps.throw(e)
            else:
                work = steps.send(fds)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def restore_entries_async(store: Store, box: str, entries: list[Entry]) -> list[Result]:
    """:func:`restore_entries` on the loop: each netns step in a worker, awaited."""
    steps = _restore_steps(store, box, entries)
    try:
        work = next(steps)
        while True:
            try:
                fds = await in_netns_async(*work)
            except Exception as e:  # noqa: BLE001 - handed to the step that asked
                work = steps.throw(e)
            else:
                work = steps.send(fds)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def restore_box(store: Store, caller: Caller, box: str) -> list[Result]:
    """``NetRestore`` off the loop: recreate every recorded interface of ``box`` that is gone."""
    b = store.owned_box(caller, box)
    mine = [e for e in b.entries.values() if e.owned_by(caller)]
    return restore_entries(store, box, mine)


async def restore_box_async(store: Store, caller: Caller, box: str) -> list[Result]:
    """``NetRestore`` on the loop: :func:`restore_box`, the loop serving meanwhile."""
    b = store.owned_box(caller, box)
    mine = [e for e in b.entries.values() if e.owned_by(caller)]
    return await restore_entries_async(store, box, mine)


def restore_pending(store: Store, pending: dict[str, list[Entry]]) -> list[Result]:
    """At daemon start: recreate what a kexec (or a lost fd) took away (``pending``: the
    tap kind's :func:`fdboxd.kinds.tap.pending`). Never raises."""
    results: list[Result] = []
    for box, entries in sorted(pending.items()):
        try:
            results += restore_entries(store, box, entries)
        except Exception:
            log.exception("restoring the network devices of box %s failed", box)
    return results
