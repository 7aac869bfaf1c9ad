"""Tap and macvtap devices through fdboxd: record at put, delete, recreate, pass frames.

Everything happens in network namespaces the tests create with ``ip netns add`` and
delete afterwards; the daemon runs with ``--allow-type tap`` as root. The attributes
the daemon recorded are checked against what ``ip -d -j link`` reports (not against
fdbox's own reading), before the interfaces are deleted and after they are recreated.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import uuid

import pytest
from fdboxtest import REPO
from nettest import ip, link_json, observed, open_tap, pass_frames, setup_bridged, vnet_hdr_sz

from fdboxd import net
from fdboxd.errors import FdboxError
from fdboxd.fdtypes import FdType, detect

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates network namespaces: needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun"),
]

TAP_FLAGS = net.IFF_TAP | net.IFF_NO_PI | net.IFF_VNET_HDR | net.IFF_MULTI_QUEUE


@pytest.fixture
def netns():
    """A fresh named network namespace (lo up), deleted with everything in it."""
    name = f"fdbt-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    yield name
    ip("netns", "del", name, check=False)


def check_record(rec: dict, seen: dict) -> None:
    assert rec["mac"] == seen["mac"]
    assert rec["mtu"] == seen["mtu"]
    assert rec["up"] == seen["up"]
    assert rec["master"] == seen["master"]
    assert ("IFF_VNET_HDR" in rec["flags"]) == bool(seen["vnet_hdr"])
    assert ("IFF_NO_PI" in rec["flags"]) == (not seen["pi"])
    assert ("IFF_MULTI_QUEUE" in rec["flags"]) == bool(seen["multi_queue"])

@pytest.fixture
def tap_daemon(daemon_factory):  # type: ignore[no-untyped-def]
    return daemon_factory("--allow-type", "tap")


# ---------------------------------------------------------------------------- tests


def test_tap_refused_unless_allowed(daemon, netns):
    fds = open_tap(netns, "tapx", net.IFF_TAP | net.IFF_NO_PI)
    try:
        with daemon.client() as c, pytest.raises(FdboxError) as err:
            c.put("vm", "tapx", fds[0])
        assert err.value.name == "UnsupportedType"
    finally:
        for fd in fds:
            os.close(fd)


def test_bridged_multiqueue_tap_recreated(tap_daemon, netns):
    setup_bridged(netns)
    q = open_tap(netns, "tap0", TAP_FLAGS, queues=2)
    single = open_tap(netns, "tap1", net.IFF_TAP)  # packet info on, no vnet header, stays down
    for fd in q:
        fcntl.ioctl(fd, net.TUNSETVNETHDRSZ, struct.pack("i", 12))
    fcntl.ioctl(q[0], net.TUNSETOWNER, 1234)
    fcntl.ioctl(q[0], net.TUNSETGROUP, 4321)
    ip("-n", netns, "link", "set", "tap0", "address", "02:00:5e:10:20:30", "mtu", "1400", "master", "br0")
    ip("-n", netns, "link", "set", "tap0", "up")
    ip("-n", netns, "link", "set", "tap1", "address", "02:00:5e:10:20:31", "mtu", "9000")
    before = {n: observed(netns, n) for n in ("tap0", "tap1")}
    assert before["tap0"]["numqueues"] == 2 and before["tap0"]["master"] == "br0"
    pass_frames(netns, q, 12, b"before")

    with tap_daemon.client() as c:
        entries = c.put_many("vm1", [("net0.q0", q[0]), ("net0.q1", q[1]), ("net1", single[0])])
        for fd in q + single:
            os.close(fd)
        recs = {e["name"]: e["extra"]["net"] for e in entries}
        for name, ifname in (("net0.q0", "tap0"), ("net0.q1", "tap0"), ("net1", "tap1")):
            rec = recs[name]
            assert rec["ifname"] == ifname and rec["kind"] == "tap"
            assert rec["netns"] == {"name": netns}
            check_record(rec, before[ifname])
        assert recs["net0.q0"]["owner"] == 1234 and recs["net0.q0"]["group"] == 4321
        assert recs["net1"]["owner"] == -1 and recs["net1"]["group"] == -1
        assert recs["net0.q0"]["vnet_hdr_sz"] == 12
        assert recs["net1"]["master"] is None and recs["net1"]["up"] is False

        # Nothing to do while the interfaces are alive and held.
        assert {r["status"] for r in c.net_restore("vm1")} == {"kept"}

        assert c.seal("vm1") == ["vm1"]
        listed = {e["name"]: e for e in c.list("vm1")["entries"]}
        assert all(e["extra"].get("recreate") for e in listed.values())

        ip("-n", netns, "link", "del", "tap0")
        ip("-n", netns, "link", "del", "tap1")
        assert ip("-n", netns, "link", "show", "tap0", check=False).returncode != 0

        results = c.net_restore("vm1")
        assert sorted((r["name"], r["status"]) for r in results) == [
            ("net0.q0", "recreated"), ("net0.q1", "recreated"), ("net1", "recreated")]

        after = {n: observed(netns, n) for n in ("tap0", "tap1")}
        for n in ("tap0", "tap1"):
            assert after[n] == before[n], n
        assert after["tap0"]["user"] == before["tap0"]["user"] is not None

        got = {}
        for name in ("net0.q0", "net0.q1", "net1"):
            entry, fd = c.get("vm1", name)
            got[name] = fd
            info = detect(fd)
            assert info.type == FdType.TAP
            assert info.ifname == entry["extra"]["net"]["ifname"]
            # (TUNGETIFF's 0x1000 is IFF_NOFILTER, not IFF_NO_PI: packet info is compared via ip above)
            mask = net.TUN_OPEN_FLAGS & ~net.IFF_NO_PI
            assert info.tun_flags & mask == entry["extra"]["net"]["tun_flags"] & mask
        assert vnet_hdr_sz(got["net0.q0"]) == vnet_hdr_sz(got["net0.q1"]) == 12
        try:
            pass_frames(netns, [got["net0.q0"], got["net0.q1"]], 12, b"after")
        finally:
            for fd in got.values():
                os.close(fd)
        # Restoring again finds them alive: idempotent.
        assert {r["status"] for r in c.net_restore("vm1")} == {"kept"}


def test_taken_name_fails_only_that_entry(tap_daemon, netns):
    a = open_tap(netns, "tapa", net.IFF_TAP | net.IFF_NO_PI)
    b = open_tap(netns, "tapb", net.IFF_TAP | net.IFF_NO_PI)
    with tap_daemon.client() as c:
        c.put_many("vm2", [("a", a[0]), ("b", b[0])])
        for fd in a + b:
            os.close(fd)
        c.seal("vm2")
        ip("-n", netns, "link", "del", "tapa")
        ip("-n", netns, "link", "del", "tapb")
        ip("-n", netns, "link", "add", "tapa", "type", "bridge")  # someone else's now
        ip("-n", netns, "link", "set", "tapa", "mtu", "1234")
        results = {r["name"]: r for r in c.net_restore("vm2")}
        assert results["a"]["status"] == "failed"
        assert results["a"]["error_name"] == "AlreadyExists"
        assert "tapa" in results["a"]["error"] and "already exists" in results["a"]["error"]
        assert results["b"]["status"] == "recreated"
        squatter = link_json(netns, "tapa")
        assert squatter["linkinfo"]["info_kind"] == "bridge" and squatter["mtu"] == 1234
        assert link_json(netns, "tapb")["linkinfo"]["info_kind"] == "tun"
        # The failed entry keeps its record, so a later net-restore can retry it.
        listed = {e["name"]: e for e in c.list("vm2")["entries"]}
        assert listed["a"]["extra"]["net"]["ifname"] == "tapa"


def test_ctl_net_restore_exit_code(tap_daemon, netns):
    a = open_tap(netns, "tapc", net.IFF_TAP | net.IFF_NO_PI)
    with tap_daemon.client() as c:
        c.put("vm3", "c", a[0])
    os.close(a[0])
    ctl = [sys.executable, "-m", "fdboxd.ctl", "--socket", tap_daemon.socket]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([*ctl, "net-restore", "vm3"], capture_output=True, text=True, env=env, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "kept" in ok.stdout and "vm3/c" in ok.stdout
    ip("-n", netns, "link", "del", "tapc")
    ip("-n", netns, "link", "add", "tapc", "type", "bridge")
    bad = subprocess.run([*ctl, "net-restore", "vm3"], capture_output=True, text=True, env=env, timeout=30)
    assert bad.returncode != 0
    assert "failed" in bad.stdout and "AlreadyExists" in bad.stdout


def test_daemon_restart_recreates_sealed_taps(daemon_factory, netns):
    """The post-kexec path on the host: the fds die with the daemon, the record stays."""
    setup_bridged(netns)
    d = daemon_factory("--allow-type", "tap")
    q = open_tap(netns, "tapr", TAP_FLAGS, queues=2)
    ip("-n", netns, "link", "set", "tapr", "master", "br0", "address", "02:00:5e:00:00:77")
    ip("-n", netns, "link", "set", "tapr", "up")
    before = observed(netns, "tapr")
    with d.client() as c:
        c.put_many("vmr", [("q0", q[0]), ("q1", q[1])])
        c.seal("vmr")
    for fd in q:
        os.close(fd)
    d.stop()  # the daemon's fds were the last: the non-persistent tap is gone
    assert ip("-n", netns, "link", "show", "tapr", check=False).returncode != 0
    d.start()
    assert observed(netns, "tapr") == before
    assert "recreated" in d.log()
    with d.client() as c:
        got = c.get_box("vmr")
        fds = [fd for _, fd in got]
        try:
            assert sorted(e["name"] for e, _ in got) == ["q0", "q1"]
            pass_frames(netns, fds, 10, b"restart")
        finally:
            for fd in fds:
                os.close(fd)


def _bridge_vlans_supported(ns: str) -> bool:
    ok = ip("-n", ns, "link", "add", "vlbr", "type", "bridge", "vlan_filtering", "1", check=False).returncode == 0
    ip("-n", ns, "link", "del", "vlbr", check=False)
    return ok


def test_bridge_port_vlans_recreated(tap_daemon, netns):
    if not _bridge_vlans_supported(netns):
        pytest.skip("this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")
    ip("-n", netns, "link", "add", "br0", "type", "bridge", "vlan_filtering", "1")
    fds = open_tap(netns, "tapv", net.IFF_TAP | net.IFF_NO_PI)
    ip("-n", netns, "link", "set", "tapv", "master", "br0")
    subprocess.run(["bridge", "-n", netns, "vlan", "add", "dev", "tapv", "vid", "10"], check=True)
    subprocess.run(["bridge", "-n", netns, "vlan", "add", "dev", "tapv", "vid", "20", "pvid", "untagged"], check=True)
    subprocess.run(["bridge", "-n", netns, "vlan", "del", "dev", "tapv", "vid", "1"], check=True)

    def vlans() -> list:
        out = subprocess.run(["bridge", "-n", netns, "-j", "vlan", "show", "dev", "tapv"],
                             capture_output=True, text=True, check=True).stdout
        return sorted((v["vlan"], sorted(v.get("flags", []))) for v in json.loads(out)[0]["vlans"])

    want = vlans()
    assert want == [(10, []), (20, sorted(["PVID", "Egress Untagged"]))]
    with tap_daemon.client() as c:
        entry = c.put("vmv", "n", fds[0])
        os.close(fds[0])
        assert entry["extra"]["net"]["vlans"] == [
            {"vid": 10, "pvid": False, "untagged": False}, {"vid": 20, "pvid": True, "untagged": True}]
        ip("-n", netns, "link", "del", "tapv")
        assert [r["status"] for r in c.net_restore("vmv")] == ["recreated"]
    assert vlans() == want


def test_macvtap_recreated(tap_daemon, netns):
    """A macvtap put from inside its namespace (the caller's netns is where it is found)."""
    ip("-n", netns, "link", "add", "vM", "type", "veth", "peer", "name", "vN")
    ip("-n", netns, "link", "add", "mvt0", "link", "vM", "type", "macvtap", "mode", "bridge")
    ip("-n", netns, "link", "set", "mvt0", "address", "02:00:5e:aa:00:01", "mtu", "1450")
    ip("-n", netns, "link", "set", "mvt0", "up")
    before = link_json(netns, "mvt0")
    putter = (
        "import os, sys\n"
        "from fdboxd import net\n"
        "from fdboxd.client import Client\n"
        "idx = int(open('/sys/class/net/mvt0/ifindex').read())\n"
        "maj, mi = open(f'/sys/class/net/mvt0/macvtap/tap{idx}/dev').read().split(':')\n"
        "node = sys.argv[2] + '/tapnode'\n"
        "os.mknod(node, 0o20600, os.makedev(int(maj), int(mi)))\n"
        "fd = os.open(node, os.O_RDWR)\n"
        "with Client(sys.argv[1]) as c:\n"
        "    e = c.put('vmm', 'mv', fd)\n"
        "print(e['extra']['net']['kind'], e['extra']['net']['link'], e['extra']['net']['mode'])\n"
    )
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", putter, tap_daemon.socket,
                          str(tap_daemon.runtime_dir)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["macvtap", "vM", "bridge"]
    ip("-n", netns, "link", "del", "mvt0")
    with tap_daemon.client() as c:
        assert [r["status"] for r in c.net_restore("vmm")] == ["recreated"]
        after = link_json(netns, "mvt0")
        for key in ("address", "mtu", "link"):
            assert after[key] == before[key], key
        assert after["linkinfo"]["info_data"]["mode"] == "bridge"
        assert ("UP" in after["flags"]) == ("UP" in before["flags"])
        entry, fd = c.get("vmm", "mv")
        try:
            info = detect(fd)
            assert info.type == FdType.TAP and info.net_kind == "macvtap" and info.ifname == "mvt0"
            assert info.tun_flags == entry["extra"]["net"]["tun_flags"]  # macvtap's TUNGETIFF is exact
        finally:
            os.close(fd)


def test_core_runs_without_pyroute2(netns, monkeypatch):
    """pyroute2 is imported only for taps: memfds work without it, a tap put says why not."""
    from fdboxtest import memfd_with

    from fdboxd.backends.memory import MemoryBackend
    from fdboxd.fdtypes import MEMORY_TYPES
    from fdboxd.model import Caller
    from fdboxd.store import Store

    monkeypatch.setitem(sys.modules, "pyroute2", None)  # "import pyroute2" now raises ImportError
    store = Store(MemoryBackend(), allowed_types=MEMORY_TYPES | {FdType.TAP})
    root = Caller(0, 0, os.getpid())
    mfd = memfd_with(b"guest")
    fds = open_tap(netns, "tapn", net.IFF_TAP | net.IFF_NO_PI)
    try:
        assert store.put(root, "vm", "ram", mfd).type == FdType.MEMFD
        with pytest.raises(FdboxError) as err:
            store.put(root, "vm", "net", fds[0])
        assert err.value.name == "BackendUnavailable" and "pyroute2" in err.value.message
        assert [e.name for e in store.list(root, "vm")] == ["ram"]
    finally:
        os.close(mfd)
        for fd in fds:
            os.close(fd)
        store.backend.close()


NETNS_DELAY_MS = 2000


def _netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def _a_thread_in(pid: int, ino: int) -> bool:
    """Whether a thread of ``pid`` has joined the network namespace ``ino`` (a netns worker at work)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tids:
        try:
            if os.stat(f"/proc/{pid}/task/{tid}/ns/net").st_ino == ino:
                return True
        except FileNotFoundError:
            continue
    return False


def _status_while(daemon, netns: str, call) -> tuple[float, bool, object]:  # type: ignore[no-untyped-def]
    """Run ``call`` in a thread; once a daemon thread is inside ``netns`` (stalled there by the
    failpoint), time one Status. Returns (Status's seconds, whether ``call`` was still
    running then, what ``call`` returned)."""
    import threading
    import time

    from fdboxtest import wait_for

    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["ok"] = call()
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert wait_for(lambda: _a_thread_in(daemon.pid, _netns_inode(netns)), 30), daemon.log()
    t0 = time.monotonic()
    with daemon.client() as c:
        assert c.status()["backend"]
    took = time.monotonic() - t0
    running = t.is_alive()
    t.join(60)
    assert "error" not in out, out
    return took, running, out["ok"]


def test_netns_work_does_not_block_the_loop(daemon_factory, netns):
    """Item 13: a tap Put reads its interface, NetRestore recreates it, in the tap's
    namespace; the loop goes on meanwhile. The failpoint stalls the netns thread for
    2 s inside the namespace; a Status sent then answers at once, before the Put (then
    the NetRestore) is done. Before the fix the loop joined that thread: Status waited
    the 2 s out."""
    d = daemon_factory("--allow-type", "tap", env={"FDBOX_FAILPOINTS": f"net.in_netns=delay({NETNS_DELAY_MS})"})
    fds = open_tap(netns, "tapslow", net.IFF_TAP | net.IFF_NO_PI)

    def put() -> dict:  # type: ignore[type-arg]
        with d.client() as c:
            return c.put("slow", "net0", fds[0])

    try:
        took, running, _ = _status_while(d, netns, put)
        print(f"Status while a tap Put's netns thread stalls {NETNS_DELAY_MS} ms: {took * 1000:.0f} ms")
    finally:
        for fd in fds:
            os.close(fd)
    assert running and took < NETNS_DELAY_MS / 2000, (took, running)
    with d.client() as c:
        (entry,) = c.list("slow")["entries"]
        assert entry["extra"]["net"]["ifname"] == "tapslow"  # the record read in the worker was kept
        c.seal("slow")
    ip("-n", netns, "link", "del", "tapslow")

    def restore() -> list:  # type: ignore[type-arg]
        with d.client() as c:
            return c.net_restore("slow")

    took, running, results = _status_while(d, netns, restore)
    print(f"Status while NetRestore's netns thread stalls {NETNS_DELAY_MS} ms: {took * 1000:.0f} ms")
    assert running and took < NETNS_DELAY_MS / 2000, (took, running)
    assert [(r["name"], r["status"]) for r in results] == [("net0", "recreated")]  # type: ignore[attr-defined]
    assert ip("-n", netns, "link", "show", "tapslow", check=False).returncode == 0
