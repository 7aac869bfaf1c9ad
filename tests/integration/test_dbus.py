"""io.fdbox1 on a real, private dbus-daemon: gdbus puts, busctl/dbus-fast/Varlink get.

The test starts its own ``dbus-daemon`` with a session-like configuration in a temp
directory (any uid may connect, fds may pass), starts fdboxd with ``--bus ADDRESS``
and drives it with the real tools: ``gdbus call`` sends fds (busctl on systemd 252
cannot: "UNIX file descriptor not supported as type"), ``busctl`` receives them and
introspects, a second uid is a real process after ``setresuid``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fdboxtest import memfd_with, pattern, wait_for

from fdboxd.client import read_all
from fdboxd.errors import ERROR_NAMES, FdboxError

pytest.importorskip("dbus_fast")
for _tool in ("dbus-daemon", "gdbus", "busctl", "dbus-monitor"):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} not installed", allow_module_level=True)

OTHER_UID = 65534
DEST = ["-d", "io.fdbox1", "-o", "/io/fdbox1"]
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture(scope="module")
def bus():
    d = Path(tempfile.mkdtemp(prefix="fdbox-bus-", dir="/tmp"))
    d.chmod(0o755)  # the second uid must reach the socket
    conf = d / "bus.conf"
    conf.write_text(BUS_CONFIG.format(path=d / "bus"))
    proc = subprocess.Popen(["dbus-daemon", "--nofork", f"--config-file={conf}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: (d / "bus").exists(), 10), "dbus-daemon did not start"
    yield f"unix:path={d / 'bus'}"
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(d, ignore_errors=True)


def name_owned(address: str) -> bool:
    out = subprocess.run(["busctl", f"--address={address}", "call", "org.freedesktop.DBus",
                          "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameHasOwner", "s", "io.fdbox1"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "b true"


@pytest.fixture
def dbus_daemon(daemon_factory, bus):
    d = daemon_factory("--bus", bus)
    assert wait_for(lambda: name_owned(bus), 10), d.log()
    yield d
    d.stop()
    assert wait_for(lambda: not name_owned(bus), 10)


def demote(uid: int):  # type: ignore[no-untyped-def]
    def fn() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    return fn


def gdbus(address: str, method: str, *args: str, fd: int | None = None, uid: int | None = None,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    """``gdbus call``; an ``fd`` becomes the process's fd 3 (``3<&0``), the way a shell passes one."""
    cmd = ["gdbus", "call", "-a", address, *DEST, "-m", f"io.fdbox1.Manager.{method}", *args]
    if fd is not None:
        cmd = ["sh", "-c", 'exec "$@" 3<&0', "sh", *cmd]
    out = subprocess.run(cmd, stdin=fd if fd is not None else subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=30, preexec_fn=demote(uid) if uid is not None else None)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def put(address: str, box: str, name: str, fd: int, metadata: str = "@a{ss} {}", **kw):  # type: ignore[no-untyped-def]
    return gdbus(address, "Put", box, name, "3", metadata, fd=fd, **kw)


def error_of(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0, out.stdout
    m = re.search(r"GDBus\.Error:([\w.]+):", out.stderr)
    assert m, out.stderr
    return m.group(1)


def busctl(address: str, *args: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["busctl", f"--address={address}", *args], capture_output=True, text=True,
                          timeout=30, preexec_fn=demote(uid) if uid is not None else None)


async def _dbus_fast_get(address: str, box: str, name: str) -> bytes:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(destination="io.fdbox1", path="/io/fdbox1", interface="io.fdbox1.Manager",
                                       member="Get", signature="ss", body=[box, name]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        assert reply.signature == "h" and len(reply.unix_fds) == 1
        fd = reply.unix_fds[reply.body[0]]
        try:
            return read_all(fd)
        finally:
            os.close(fd)
    finally:
        bus.disconnect()


def test_gdbus_put_then_varlink_busctl_and_dbus_fast_get(dbus_daemon, bus):
    data = pattern(2 * 4096 + 77, seed=3)
    fd = memfd_with(data, "guest-ram")
    before = dbus_daemon.fd_count()
    put(bus, "vm1", "ram0", fd, "{'slot': '0'}")
    os.close(fd)
    # The Varlink client sees the same store, the same bytes, and the metadata.
    with dbus_daemon.client() as c:
        entry, got = c.get("vm1", "ram0")
        try:
            assert read_all(got) == data
        finally:
            os.close(got)
    assert entry["type"] == "memfd" and entry["size"] == len(data) and entry["metadata"] == {"slot": "0"}
    assert entry["uid"] == 0
    # busctl receives the fd (prints "h N"); dbus-fast receives it and reads the bytes.
    out = busctl(bus, "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "Get", "ss", "vm1", "ram0")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"h \d+", out.stdout.strip()), out.stdout
    for _ in range(3):
        assert asyncio.run(_dbus_fast_get(bus, "vm1", "ram0")) == data
    # The fd that came in with Put is closed, every fd sent with Get is closed after
    # it was written: only the held reference remains.
    assert wait_for(lambda: dbus_daemon.fd_count() == before + 1, 5), os.listdir(f"/proc/{dbus_daemon.pid}/fd")
    # List: one a{sv} per entry, the Varlink Entry's fields under their names.
    out = gdbus(bus, "List")
    for field in ("'box': <'vm1'>", "'name': <'ram0'>", "'type': <'memfd'>", f"'size': <uint64 {len(data)}>",
                  "'uid': <uint32 0>", "'metadata': <{'slot': '0'}>"):
        assert field in out.stdout, (field, out.stdout)
    out = busctl(bus, "--json=short", "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "List")
    assert out.returncode == 0, out.stderr
    (entry,) = json.loads(out.stdout)["data"][0]
    assert entry["name"] == {"type": "s", "data": "ram0"} and entry["size"] == {"type": "t", "data": len(data)}


def test_introspection_is_complete(dbus_daemon, bus):
    out = busctl(bus, "introspect", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager")
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines()[1:]:
        f = line.split()
        if f and f[0].startswith("."):
            rows[f[0][1:]] = (f[1], f[2], f[3])
    assert rows["Put"] == ("method", "ssha{ss}", "-")
    assert rows["Get"] == ("method", "ss", "h")
    assert rows["List"] == ("method", "-", "aa{sv}")
    assert rows["ListBoxes"] == ("method", "-", "aa{sv}")
    assert rows["GetBox"] == ("method", "s", "a(sh)")
    assert rows["PutMany"] == ("method", "sa(sha{ss})", "aa{sv}")
    assert rows["NetRestore"] == ("method", "s", "aa{sv}")
    assert rows["SealWithOptions"] == ("method", "sa{sv}", "as")
    for m, sig in {"Remove": "ss", "DeleteBox": "s", "Seal": "s", "Unseal": "s", "Status": "-", "Finish": "s"}.items():
        assert rows[m][:2] == ("method", sig), m
    for p, sig in {"State": "s", "Backend": "s", "Version": "s", "EntryCount": "u"}.items():
        assert rows[p][:2] == ("property", sig), p
    assert rows["Backend"][2] == '"memory"'
    for s, sig in {"EntryAdded": "ssu", "EntryRemoved": "ssu", "StateChanged": "ss"}.items():
        assert rows[s][:2] == ("signal", sig), s
    xml = subprocess.run(["gdbus", "introspect", "-a", bus, *DEST, "--xml"], capture_output=True, text=True).stdout
    import xml.etree.ElementTree as ET

    iface = ET.fromstring(xml).find("interface[@name='io.fdbox1.Manager']")
    assert iface is not None, xml
    get_out = iface.find("method[@name='Get']/arg[@direction='out']")
    assert get_out.attrib == {"name": "fd", "direction": "out", "type": "h"}
    for arg in iface.iter("arg"):  # every argument is named
        assert arg.get("name"), ET.tostring(arg)
    const = {p.get("name") for p in iface.findall("property")
             if p.find("annotation[@name='org.freedesktop.DBus.Property.EmitsChangedSignal']") is not None}
    assert const == {"Backend", "Version"}


def test_every_error_name(dbus_daemon, bus, tmp_path):
    seen = set()

    def expect(name: str, out: subprocess.CompletedProcess[str]) -> None:
        assert error_of(out) == f"io.fdbox1.Error.{name}", out.stderr
        seen.add(name)

    fd = memfd_with(b"x" * 100)
    put(bus, "vm1", "a", fd)
    expect("NotFound", gdbus(bus, "Get", "vm1", "nope", check=False))
    expect("AlreadyExists", put(bus, "vm1", "a", fd, check=False))
    expect("InvalidName", put(bus, "bad box!", "a", fd, check=False))
    regular = tmp_path / "plain"
    regular.write_bytes(b"not a memfd")
    with open(regular, "rb") as f:
        expect("UnsupportedType", put(bus, "vm1", "b", f.fileno(), check=False))
    expect("NotSealed", gdbus(bus, "Unseal", "vm1", check=False))
    expect("InvalidRequest", gdbus(bus, "Finish", "vm1", check=False))
    many = "{" + ", ".join(f"'k{i}': 'v'" for i in range(40)) + "}"
    expect("LimitExceeded", put(bus, "vm1", "c", fd, many, check=False))
    expect("NotFound", gdbus(bus, "Get", "vm1", "a", uid=OTHER_UID, check=False))  # no name oracle
    expect("PermissionDenied", gdbus(bus, "Finish", "", uid=OTHER_UID, check=False))  # root's alone
    assert gdbus(bus, "Seal", "vm1").stdout.strip() == "(['vm1'],)"
    expect("Sealed", put(bus, "vm1", "d", fd, check=False))
    gdbus(bus, "Unseal", "vm1")
    # A manifest that cannot be written: the put is undone, BackendUnavailable.
    manifest = Path(dbus_daemon.state_dir) / "manifest.json"
    manifest.unlink()
    manifest.mkdir()
    (manifest / "keep").write_text("")
    try:
        expect("BackendUnavailable", put(bus, "vm1", "e", fd, check=False))
    finally:
        shutil.rmtree(manifest)
    os.close(fd)
    assert seen == set(ERROR_NAMES)
    # Wrong argument types are the bus's standard error, not a crash.
    out = busctl(bus, "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "Get", "s", "vm1")
    assert out.returncode != 0 and "vm1" not in out.stdout
    assert dbus_daemon.alive()


def test_second_uid_is_identified_by_the_bus(dbus_daemon, bus):
    root_fd = memfd_with(b"root's")
    put(bus, "rootbox", "secret", root_fd)
    mine = memfd_with(b"nobody's bytes")
    put(bus, "nobox", "mine", mine, uid=OTHER_UID)
    # The uid was taken from the bus, not from anything the caller said.
    with dbus_daemon.client() as c:
        entries = {(e["box"], e["name"]): e for e in c.list()["entries"]}
    assert entries[("nobox", "mine")]["uid"] == OTHER_UID
    assert entries[("rootbox", "secret")]["uid"] == 0
    # The other uid sees and gets only its own entries.
    out = gdbus(bus, "List", uid=OTHER_UID)
    assert "'mine'" in out.stdout and "secret" not in out.stdout
    for call in (["Get", "rootbox", "secret"], ["Remove", "rootbox", "secret"], ["DeleteBox", "rootbox"],
                 ["Seal", "rootbox"]):  # root's: answered as if missing (no name oracle)
        assert error_of(gdbus(bus, *call, uid=OTHER_UID, check=False)) == "io.fdbox1.Error.NotFound", call
    assert error_of(gdbus(bus, "Seal", "", uid=OTHER_UID, check=False)) == "io.fdbox1.Error.PermissionDenied"
    assert error_of(put(bus, "rootbox", "intruder", mine, uid=OTHER_UID, check=False)) == \
        "io.fdbox1.Error.PermissionDenied"
    out = busctl(bus, "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "Get", "ss", "nobox", "mine",
                 uid=OTHER_UID)
    assert out.returncode == 0 and out.stdout.startswith("h "), out.stderr
    gdbus(bus, "Remove", "nobox", "mine", uid=OTHER_UID)
    os.close(root_fd)
    os.close(mine)


class Monitor:
    """``dbus-monitor`` on a match rule, its output read line by line by a thread.

    Started, it has registered: the bus sends a monitor ``NameLost`` for its own unique
    name inside ``BecomeMonitor``, once the monitor's match rules are in place, and
    ``dbus-monitor`` prints it (it flushes after every message). No fixed sleep: under
    load the registration can take seconds. Stopped with SIGTERM, not SIGINT: a test
    run started from a non-interactive shell's background job inherits SIGINT ignored,
    and ``dbus-monitor`` keeps the disposition it inherits (it then never exits).
    """

    def __init__(self, address: str, *rules: str, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(["dbus-monitor", "--address", address, *rules], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not wait_for(lambda: "member=NameLost" in self.text(), timeout):
            self.stop()
            raise AssertionError(f"dbus-monitor did not register as a monitor in {timeout} s: {self.text()!r}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(list(self.lines))

    def members(self) -> list[str]:
        return re.findall(r"member=(\w+)", self.text())

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(30)
        self._reader.join(30)
        return self.text()


def test_signals_and_properties_changed(dbus_daemon, bus):
    mon = Monitor(bus, "type='signal',sender='io.fdbox1'")
    try:
        fd = memfd_with(b"abc")
        put(bus, "vm2", "disk", fd)
        os.close(fd)
        assert gdbus(bus, "Seal", "vm2").returncode == 0
        gdbus(bus, "Unseal", "vm2")
        gdbus(bus, "Remove", "vm2", "disk")
        # The last of them: EntryRemoved, then PropertiesChanged with EntryCount back to 0.
        last = re.compile(r'member=EntryRemoved.*member=PropertiesChanged.*string "EntryCount"\s+variant\s+uint32 0',
                          re.DOTALL)
        assert wait_for(lambda: last.search(mon.text()), 30), mon.text()
    finally:
        text = mon.stop()
    members = [m for m in re.findall(r"member=(\w+)", text) if m not in ("NameAcquired", "NameLost")]
    assert members.count("EntryAdded") == 1 and members.count("EntryRemoved") == 1, text
    assert members.count("StateChanged") == 2, text
    assert 'string "sealed"' in text and 'string "open"' in text
    assert "PropertiesChanged" in members
    assert 'string "EntryCount"' in text and 'string "State"' in text
    out = busctl(bus, "get-property", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "EntryCount")
    assert out.stdout.strip() == "u 0"


def test_status_over_dbus(dbus_daemon, bus):
    out = busctl(bus, "--json=short", "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "Status")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)["data"][0]
    assert st["backend"]["data"] == "memory" and st["state"]["data"] == "open"
    assert st["entries"]["data"] == 0 and st["limits"]["data"]["max_boxes"] > 0


def test_daemon_survives_losing_the_bus(daemon_factory, tmp_path):
    d = tmp_path / "bus2"
    d.mkdir()
    conf = tmp_path / "bus2.conf"
    conf.write_text(BUS_CONFIG.format(path=d / "bus"))
    proc = subprocess.Popen(["dbus-daemon", "--nofork", f"--config-file={conf}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (d / "bus").exists(), 10)
        address = f"unix:path={d / 'bus'}"
        daemon = daemon_factory("--bus", address)
        assert wait_for(lambda: name_owned(address), 10)
    finally:
        proc.terminate()
        proc.wait(10)
    # The daemon notices the lost bus on its own time: wait for it to say so (under CI load
    # that can take more than any fixed pause), then it must still serve.
    assert wait_for(lambda: "D-Bus connection" in daemon.log(), 30), daemon.log()
    assert daemon.alive(), daemon.log()
    fd = memfd_with(b"still here")
    with daemon.client() as c:
        c.put("vm", "m", fd)
        assert c.status()["entries"] == 1
    os.close(fd)


async def _pipelined(address: str, rounds: int) -> list[str]:
    """Put/Remove/Put of one name, all sent before any reply: order must hold."""
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    fds = []
    try:
        calls = []
        for i in range(rounds):
            fd = memfd_with(f"round {i}".encode())
            fds.append(fd)
            for member, sig, body, ufds in (("Put", "ssha{ss}", ["pipe", "x", 0, {}], [fd]),
                                            ("Remove", "ss", ["pipe", "x"], [])):
                calls.append(bus.call(Message(destination="io.fdbox1", path="/io/fdbox1",
                                              interface="io.fdbox1.Manager", member=member, signature=sig,
                                              body=body, unix_fds=ufds)))
        replies = await asyncio.gather(*calls)
        return [r.error_name if r.message_type == MessageType.ERROR else "ok" for r in replies]
    finally:
        bus.disconnect()
        for fd in fds:
            os.close(fd)


def test_pipelined_calls_keep_their_order_and_leak_nothing(dbus_daemon, bus):
    before = dbus_daemon.fd_count()
    assert asyncio.run(_pipelined(bus, 20)) == ["ok"] * 40
    assert wait_for(lambda: dbus_daemon.fd_count() == before, 5), os.listdir(f"/proc/{dbus_daemon.pid}/fd")


async def _no_reply_remove(address: str, box: str, name: str) -> None:
    from dbus_fast import Message, MessageFlag
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        await bus.send(Message(destination="io.fdbox1", path="/io/fdbox1", interface="io.fdbox1.Manager",
                               member="Remove", signature="ss", body=[box, name],
                               flags=MessageFlag.NO_REPLY_EXPECTED))
        await asyncio.sleep(1.0)  # still connected while the daemon asks the bus who we are
    finally:
        bus.disconnect()


def test_no_reply_expected_calls(dbus_daemon, bus):
    fd = memfd_with(b"fire and forget")
    put(bus, "nr", "x", fd)
    put(bus, "nr", "y", fd)
    os.close(fd)
    asyncio.run(_no_reply_remove(bus, "nr", "x"))
    with dbus_daemon.client() as c:
        assert wait_for(lambda: [e["name"] for e in c.list()["entries"]] == ["y"], 5)


async def _get_box(address: str, box: str) -> dict[str, bytes]:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(destination="io.fdbox1", path="/io/fdbox1", interface="io.fdbox1.Manager",
                                       member="GetBox", signature="s", body=[box]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        out = {}
        for name, idx in reply.body[0]:
            out[name] = read_all(reply.unix_fds[idx])
        for fd in reply.unix_fds:
            os.close(fd)
        return out
    finally:
        bus.disconnect()


def test_get_box_returns_every_fd(dbus_daemon, bus):
    blobs = {"ram0": pattern(8192, seed=9), "ram1": b"one", "vars": b"uefi vars"}
    for name, data in blobs.items():
        fd = memfd_with(data)
        put(bus, "gb", name, fd)
        os.close(fd)
    before = dbus_daemon.fd_count()
    assert asyncio.run(_get_box(bus, "gb")) == blobs
    assert wait_for(lambda: dbus_daemon.fd_count() == before, 5)


def test_unreachable_bus_is_not_fatal(daemon_factory, tmp_path):
    d = daemon_factory("--bus", f"unix:path={tmp_path / 'no-bus-here'}")
    fd = memfd_with(b"varlink only")
    with d.client() as c:
        c.put("v", "x", fd)
        assert c.status()["entries"] == 1
    os.close(fd)
    assert "serving Varlink only" in d.log()


def test_lost_entries_and_usage_over_dbus(dbus_daemon, bus):
    fd = memfd_with(b"ram")
    put(bus, "lostvm", "ram0", fd)
    os.close(fd)
    dbus_daemon.kill()  # the memory backend's fds die with it
    dbus_daemon.start()
    assert wait_for(lambda: name_owned(bus), 10), dbus_daemon.log()
    out = busctl(bus, "--json=short", "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "Status")
    st = json.loads(out.stdout)["data"][0]
    assert st["lost"]["data"] == [["lostvm", "ram0", "memfd"]]
    assert st["usage"]["data"]["boxes"] == 1  # the emptied box stays its owner's
    assert gdbus(bus, "AcknowledgeLost", "").stdout.strip() == "(uint32 1,)"
    out = busctl(bus, "--json=short", "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "Status")
    assert json.loads(out.stdout)["data"][0]["lost"]["data"] == []
def test_put_many_over_dbus_is_all_or_nothing(dbus_daemon, bus):
    """PutMany on D-Bus: the Varlink method, the same errors. (gdbus cannot send fds
    nested in a struct, so dbus-fast is the client here.)"""
    a, b = memfd_with(b"slot zero"), memfd_with(b"slot one")
    name, body = asyncio.run(_put_many_raw(bus, "many", [("ram0", 0, {"slot": "0"}), ("ram1", 1, {})], [a, b]))
    assert name == "ok", body
    assert [e["name"].value for e in body[0]] == ["ram0", "ram1"]
    assert body[0][0]["type"].value == "memfd" and body[0][0]["metadata"].value == {"slot": "0"}
    with dbus_daemon.client() as c:
        got = {e["name"]: e for e in c.list("many")["entries"]}
        assert set(got) == {"ram0", "ram1"}
        _, fd = c.get("many", "ram1")
    assert read_all(fd) == b"slot one"
    os.close(fd)
    # A bad name in the batch: the error is Varlink's, and nothing of the batch is stored.
    name, _ = asyncio.run(_put_many_raw(bus, "other", [("ok", 0, {}), ("bad/name", 1, {})], [a, b]))
    assert name == "io.fdbox1.Error.InvalidName"
    # An fd index the message did not carry.
    name, _ = asyncio.run(_put_many_raw(bus, "other", [("ok", 7, {})], [a]))
    assert name == "io.fdbox1.Error.InvalidRequest"
    with dbus_daemon.client() as c:
        assert "other" not in {b["name"] for b in c.list()["boxes"]}
    os.close(a)
    os.close(b)


async def _put_many_raw(address: str, box: str, items: list, fds: list[int]):  # type: ignore[no-untyped-def,type-arg]
    from dbus_fast import Message
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(destination="io.fdbox1", path="/io/fdbox1", interface="io.fdbox1.Manager",
                                       member="PutMany", signature="sa(sha{ss})", body=[box, items],
                                       unix_fds=fds))
        return reply.error_name or "ok", reply.body
    finally:
        bus.disconnect()


def test_net_restore_and_list_boxes_over_dbus(dbus_daemon, bus):
    put(bus, "nb", "ram0", memfd_with(b"x"))
    # No interface recorded: nothing to recreate, an empty list (as on Varlink).
    out = gdbus(bus, "NetRestore", "nb")
    assert out.stdout.strip() in ("(@aa{sv} [],)", "([],)"), out.stdout
    assert error_of(gdbus(bus, "NetRestore", "no-such-box", check=False)) == "io.fdbox1.Error.NotFound"
    out = gdbus(bus, "ListBoxes")
    assert "'name': <'nb'>" in out.stdout and "'state': <'open'>" in out.stdout and "'entries': <uint64 1>" in out.stdout


def test_seal_empty_string_means_every_box(dbus_daemon, bus):
    put(bus, "s1", "ram0", memfd_with(b"one"))
    put(bus, "s2", "ram0", memfd_with(b"two"))
    out = gdbus(bus, "Seal", "")
    assert "'s1'" in out.stdout and "'s2'" in out.stdout, out.stdout
    with dbus_daemon.client() as c:
        assert {b["name"]: b["state"] for b in c.list()["boxes"]} == {"s1": "sealed", "s2": "sealed"}


def test_caller_identity_costs_one_bus_call_per_connection(dbus_daemon, bus):
    """GetConnectionCredentials once per unique name (cached), not per call."""
    # The Lists too: the bus routes in order, so once the fifth List is seen, every
    # GetConnectionCredentials fdboxd sent before answering them has been seen.
    mon = Monitor(bus, "type='method_call',interface='org.freedesktop.DBus'",
                  "type='method_call',interface='io.fdbox1.Manager',member='List'")
    script = f"""
import asyncio
from dbus_fast import Message
from dbus_fast.aio import MessageBus
async def main():
    bus = await MessageBus(bus_address={bus!r}).connect()
    for _ in range(5):
        r = await bus.call(Message(destination="io.fdbox1", path="/io/fdbox1", interface="io.fdbox1.Manager",
                                   member="List"))
        assert r.message_type.name == "METHOD_RETURN", r.body
    bus.disconnect()
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: mon.text().count("member=List") == 5, 30), mon.text()
    text = mon.stop()
    assert text.count("member=GetConnectionCredentials") == 1, text
    assert "GetConnectionUnixUser" not in text and "GetConnectionUnixProcessID" not in text


def test_preflight_on_the_bus_is_varlinks(dbus_daemon, bus):
    """``Preflight()`` answers the same report as Varlink's, as a{sv} with aa{ss} problems."""
    fd = memfd_with(b"p" * 4096)
    try:
        put(bus, "vm1", "ram0", fd)
    finally:
        os.close(fd)
    out = busctl(bus, "--json=short", "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "Preflight")
    assert out.returncode == 0, out.stderr
    (report,) = json.loads(out.stdout)["data"]
    with dbus_daemon.client() as c:
        want = c.preflight()
    assert report["ok"]["data"] is want["ok"] is False
    assert report["backend"]["data"] == want["backend"] and report["entries"]["data"] == want["entries"] == 1
    assert report["problems"]["data"] == [{k: str(v) for k, v in p.items()} for p in want["problems"]]
    assert any(p["box"] == "vm1" and p["name"] == "ram0" for p in report["problems"]["data"])


# ------------------------------------------------------------------ one service, two front-ends
# Varlink and D-Bus call one fdboxd.service.Service: the same call on either front-end
# follows the same rules. Each test runs once per front-end and compares with the other.

FRONT_ENDS = ("varlink", "dbus")


async def _dbus_raw(address: str, member: str, signature: str = "", body: list | None = None):  # type: ignore[no-untyped-def,type-arg]
    """One io.fdbox1.Manager call with dbus-fast: (error name or None, body, fds received)."""
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        reply = await bus.call(Message(destination="io.fdbox1", path="/io/fdbox1", interface="io.fdbox1.Manager",
                                       member=member, signature=signature, body=body or []))
        fds = list(reply.unix_fds or [])
        if reply.message_type == MessageType.ERROR:
            return reply.error_name.removeprefix("io.fdbox1.Error."), reply.body, fds
        return None, reply.body, fds
    finally:
        bus.disconnect()


def front_get(front: str, daemon, bus: str, box: str, name: str) -> tuple[str | None, int | None]:  # type: ignore[no-untyped-def]
    """Get on one front-end: (error name, None) or (None, fd)."""
    if front == "varlink":
        try:
            with daemon.client() as c:
                return None, c.get(box, name)[1]
        except FdboxError as e:
            return e.name, None
    err, body, fds = asyncio.run(_dbus_raw(bus, "Get", "ss", [box, name]))
    if err:
        return err, None
    assert len(fds) == 1 and body == [0], (body, fds)
    return None, fds[0]


def front_get_box(front: str, daemon, bus: str, box: str) -> tuple[str | None, dict[str, int]]:  # type: ignore[no-untyped-def]
    if front == "varlink":
        try:
            with daemon.client() as c:
                return None, {e["name"]: fd for e, fd in c.get_box(box)}
        except FdboxError as e:
            return e.name, {}
    err, body, fds = asyncio.run(_dbus_raw(bus, "GetBox", "s", [box]))
    return err, ({name: fds[i] for name, i in body[0]} if not err else {})


def front_seal(front: str, daemon, bus: str, box: str, **options: object) -> tuple[str | None, list[str]]:  # type: ignore[no-untyped-def]
    """Seal with options (Varlink's Seal parameters; D-Bus SealWithOptions' a{sv})."""
    if front == "varlink":
        try:
            with daemon.client() as c:
                return None, c.call("Seal", {"box": box, **options})[0]["sealed"]
        except FdboxError as e:
            return e.name, []
    from dbus_fast import Variant

    opts = {k: Variant("b" if isinstance(v, bool) else "s", v) for k, v in options.items()}
    err, body, _ = asyncio.run(_dbus_raw(bus, "SealWithOptions", "sa{sv}", [box, opts]))
    return err, (body[0] if not err else [])


def box_states(daemon) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with daemon.client() as c:
        return {b["name"]: b["state"] for b in c.list()["boxes"]}


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_seal_with_preflight_refuses_on_both_front_ends(front, dbus_daemon, bus):
    """The memory backend carries nothing across a kexec: a preflighted seal of a box
    with an entry refuses, seals nothing, and names the preflight's first problem —
    on D-Bus (SealWithOptions) exactly as on Varlink (Seal with preflight)."""
    fd = memfd_with(b"ram" * 1000)
    try:
        with dbus_daemon.client() as c:
            c.put("pf", "ram0", fd)
            want = c.preflight()
    finally:
        os.close(fd)
    assert not want["ok"]
    err, sealed = front_seal(front, dbus_daemon, bus, "pf", preflight=True)
    assert err == want["problems"][0]["error"] and sealed == []
    assert box_states(dbus_daemon) == {"pf": "open"}  # nothing sealed
    assert "preflight: " in dbus_daemon.log()
    # The same parameter checks: a preflight that is not a boolean.
    assert front_seal(front, dbus_daemon, bus, "pf", preflight="yes")[0] == "InvalidRequest"
    assert box_states(dbus_daemon) == {"pf": "open"}
    # Without the preflight the same box seals, as plain Seal does.
    assert front_seal(front, dbus_daemon, bus, "pf", preflight=False) == (None, ["pf"])
    assert box_states(dbus_daemon) == {"pf": "sealed"}


def test_seal_with_options_over_busctl_and_unknown_options(dbus_daemon, bus):
    """The documented command line: busctl's a{sv}; an option Varlink's Seal has not is refused."""
    put(bus, "pb", "ram0", memfd_with(b"x"))
    out = busctl(bus, "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "SealWithOptions", "sa{sv}",
                 "pb", "1", "preflight", "b", "true")
    assert out.returncode != 0 and "preflight: " in out.stderr, (out.stdout, out.stderr)
    out = busctl(bus, "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "SealWithOptions", "sa{sv}",
                 "pb", "1", "force", "b", "true")
    assert out.returncode != 0 and "force" in out.stderr, out.stderr
    assert box_states(dbus_daemon) == {"pb": "open"}
    out = busctl(bus, "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "SealWithOptions", "sa{sv}",
                 "pb", "0")
    assert out.returncode == 0 and out.stdout.strip() == 'as 1 "pb"', (out.stdout, out.stderr)


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_get_follows_the_same_rules_on_both_front_ends(front, dbus_daemon, bus):
    """Get and GetBox hand out the held file itself (the backend's fd lent, or a dup of
    it: one open file description, so one offset), check ownership without a name
    oracle, refuse what is missing, and leave no fd behind, on either front-end."""
    data = pattern(3 * 4096 + 5, seed=11)
    a, b = memfd_with(data), memfd_with(b"second")
    try:
        with dbus_daemon.client() as c:
            c.put("gr", "ram0", a)
            c.put("gr", "vars", b)
    finally:
        os.close(a)
        os.close(b)
    before = dbus_daemon.settled_fd_count()
    other = "dbus" if front == "varlink" else "varlink"
    err, fd = front_get(front, dbus_daemon, bus, "gr", "ram0")
    assert err is None
    try:
        assert os.pread(fd, len(data) + 1, 0) == data
        os.lseek(fd, 4096, os.SEEK_SET)  # the held file's offset: the other front-end sees it
        err, fd2 = front_get(other, dbus_daemon, bus, "gr", "ram0")
        assert err is None
        try:
            assert os.lseek(fd2, 0, os.SEEK_CUR) == 4096
            assert os.fstat(fd2).st_ino == os.fstat(fd).st_ino
        finally:
            os.lseek(fd2, 0, os.SEEK_SET)
            os.close(fd2)
    finally:
        os.close(fd)
    err, got = front_get_box(front, dbus_daemon, bus, "gr")
    try:
        assert err is None and sorted(got) == ["ram0", "vars"]
        assert os.pread(got["vars"], 100, 0) == b"second"
    finally:
        for x in got.values():
            os.close(x)
    # Missing, and another user's: both NotFound, on both.
    assert front_get(front, dbus_daemon, bus, "gr", "nope") == ("NotFound", None)
    assert front_get(front, dbus_daemon, bus, "no-box", "ram0") == ("NotFound", None)
    if front == "dbus":
        assert error_of(gdbus(bus, "Get", "gr", "ram0", uid=OTHER_UID, check=False)) == "io.fdbox1.Error.NotFound"
    else:
        from fdboxtest import run_as_user

        from fdboxd.client import Client

        def get_as_other():  # type: ignore[no-untyped-def]
            with Client(dbus_daemon.socket) as c:
                c.get("gr", "ram0")

        assert run_as_user(OTHER_UID, get_as_other)["error"] == "NotFound"
    # Every fd handed out (lent and sent, or dup'ed for dbus-fast's queue) is closed after.
    assert wait_for(lambda: dbus_daemon.fd_count() == before, 5), os.listdir(f"/proc/{dbus_daemon.pid}/fd")
