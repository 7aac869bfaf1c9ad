"""``fdbox-qemu --tap``: a real Linux guest keeps its TCP connection across a QEMU restart
(suspend + start) and across ``fdbox-qemu upgrade``.

The guest (tests/linuxguest.py: the test kernel, a busybox initramfs, virtio-net) holds
one TCP connection to a server in a network namespace of the test's own and writes a
counter to it every second. ``fdbox-qemu start --tap net0,bridge=br0`` creates the tap
on the namespace's bridge and puts it in the VM's box; ``suspend`` quits QEMU with the
tap still held; ``start`` with the same arguments hands the same tap to the next QEMU,
and the server sees the same connection go on: one connection, the counter without a
gap. With ``queues=2`` too (the guest, one vCPU, uses one queue pair, so QEMU detached
the second queue: the restart must attach it again).

Controls, each asserted to fail the same check: a resume on fresh RAM, and a resume
with the very same arguments on a tap that is not the held one (its entries removed,
so ``start`` creates a new ``net0`` on br0). That one loses the connection although it
sits on the same bridge: a bridge without a MAC of its own takes the lowest of its
ports', so the new tap's random MAC becomes br0's, and the guest's ARP entry for the
server now names a MAC nobody answers to. The held tap keeps its MAC (and after a
kexec fdboxd recreates it with that MAC), so br0 keeps its own. Only link-local
addresses, only inside the test's namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import linuxguest
import pytest
import qemuguest
from fdboxtest import memfd_with, wait_for
from linuxguest import Server, assert_continues
from nettest import in_ns, ip, link_json

from fdboxd.errors import EXIT_CODES

HOST_ADDR, GUEST_ADDR = "169.254.77.1", "169.254.77.2"
GUEST_MAC = "02:fd:b0:00:00:02"
RAM = "96M"

BZIMAGE = linuxguest.kernel()
_missing = qemuguest.have_tools() or (None if BZIMAGE else "the test kernel (../shared/testkernel/bzImage)")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates a network namespace and taps: needs root"),
    pytest.mark.skipif(bool(_missing) and not os.environ.get("CI"), reason=f"{_missing} not available"),
]


@pytest.fixture(scope="module")
def initrd(tmp_path_factory) -> Path:
    return linuxguest.build_initramfs(tmp_path_factory.mktemp("netguest"))


@pytest.fixture
def netns():
    """A namespace with bridge br0 at 169.254.77.1/24 and nothing else."""
    name = f"fdbq-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    try:
        for args in (("link", "set", "lo", "up"), ("link", "add", "br0", "type", "bridge"),
                     ("addr", "add", f"{HOST_ADDR}/24", "dev", "br0"), ("link", "set", "br0", "up")):
            ip("-n", name, *args)
        yield name
    finally:
        ip("netns", "del", name, check=False)


@pytest.fixture
def server(netns):
    s = Server(in_ns(netns, lambda: _listen(HOST_ADDR)))
    yield s
    s.close()


def _listen(addr: str):  # type: ignore[no-untyped-def]
    import socket

    return socket.create_server((addr, 0))


class NetVM:
    """``fdbox-qemu`` for VM ``vm1``, run inside the test's namespace (nsenter)."""

    def __init__(self, daemon, netns: str, initrd: Path, server: Server, tmp: Path) -> None:
        self.daemon, self.netns, self.initrd, self.server, self.tmp = daemon, netns, initrd, server, tmp
        self.run_dir = str(tmp / "run")
        self.procs: list[subprocess.Popen] = []

    def cmd(self, *args: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--",
                *qemuguest.fdbox_qemu_cmd(self.daemon.socket, self.run_dir, *args)]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(self.cmd(*args), env=qemuguest.env(), capture_output=True, text=True, timeout=60)
        if check:
            assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r

    def start(self, tag: str, *taps: str, queues: int = 1) -> subprocess.Popen:
        serial = self.tmp / f"serial-{tag}"
        qargs = linuxguest.qemu_args(BZIMAGE, self.initrd, serial, addr=f"{GUEST_ADDR}/24",  # type: ignore[arg-type]
                                     server=f"{HOST_ADDR}:{self.server.port}", netdev="net0", mac=GUEST_MAC,
                                     queues=queues)
        log = open(self.tmp / f"qemu-{tag}.log", "wb")
        tap_opts = [x for t in taps for x in ("--tap", t)]
        p = subprocess.Popen(self.cmd("start", "vm1", "--ram", RAM, *tap_opts, "--", *qargs), env=qemuguest.env(),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        self.procs.append(p)
        return p

    def log(self, tag: str) -> str:
        text = (self.tmp / f"qemu-{tag}.log").read_text(errors="replace")
        serial = self.tmp / f"serial-{tag}"
        return text + "\n--- serial ---\n" + (serial.read_text(errors="replace")[-3000:] if serial.exists() else "")

    def suspend(self, proc: subprocess.Popen) -> int:
        """Suspend; the number of counters the server had then."""
        r = self.cli("suspend", "vm1")
        assert "suspended (running before)" in r.stdout, r.stdout
        assert proc.wait(30) == 0, "QEMU should quit cleanly after the suspend"
        got = self.server.snapshot()
        assert len(got) == 1, got
        return len(got[0])

    def box(self) -> dict[str, dict]:
        with self.daemon.client() as c:
            return {e["name"]: e for e in c.list("vm1")["entries"]}

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def netvm(daemon_factory, netns, initrd, server, tmp_path):
    v = NetVM(daemon_factory("--allow-type", "tap"), netns, initrd, server, tmp_path)
    yield v
    v.cleanup()


def _boot(vm: NetVM, tag: str, *taps: str, queues: int = 1) -> subprocess.Popen:
    p = vm.start(tag, *taps, queues=queues)
    got = linuxguest.wait_lines(vm.server, 2, timeout=90)
    assert got and len(got[0]) >= 2, f"the guest never sent its counter:\n{vm.log(tag)}"
    return p


def _code(r: subprocess.CompletedProcess, name: str) -> None:
    assert r.returncode == EXIT_CODES[name], (name, r.returncode, r.stderr)
    assert f"fdbox-qemu: {name}:" in r.stderr, r.stderr


def test_tcp_connection_survives_restart_on_held_tap_control_fresh_ram(netvm):
    vm = netvm
    p = _boot(vm, "boot", "net0,bridge=br0")
    seen = link_json(vm.netns, "net0")
    assert seen.get("master") == "br0" and "UP" in seen["flags"], seen
    bridge_mac = link_json(vm.netns, "br0")["address"]
    before = vm.suspend(p)
    box = vm.box()
    assert set(box) == {"ram0", "devstate", "tap.net0.q0"}, box
    assert box["tap.net0.q0"]["type"] == "tap" and box["tap.net0.q0"]["extra"]["net"]["master"] == "br0"
    assert link_json(vm.netns, "net0")["ifindex"] == seen["ifindex"], "the held tap should outlive QEMU"

    # A --tap that disagrees with the held tap is refused and changes nothing.
    _code(vm.cli("start", "vm1", "--ram", RAM, "--tap", "net0,queues=2,bridge=br0", "--", "-S", check=False),
          "InvalidRequest")
    _code(vm.cli("start", "vm1", "--ram", RAM, "--tap", "net0", "--", "-S", check=False), "InvalidRequest")
    r = vm.cli("start", "vm1", "--ram", RAM, "--", "-S", check=False)
    _code(r, "InvalidRequest")
    assert "holds tap net0" in r.stderr, r.stderr
    assert set(vm.box()) == set(box) and link_json(vm.netns, "net0")["ifindex"] == seen["ifindex"]

    p = vm.start("resume", "net0,bridge=br0")
    assert_continues(vm.server, before)
    assert wait_for(lambda: "devstate" not in vm.box(), 10), vm.log("resume")
    assert linuxguest.tap_fds(p.pid, "net0"), "QEMU should hold the tap's queue"
    assert link_json(vm.netns, "net0")["ifindex"] == seen["ifindex"], "the same tap, not a new one"
    assert link_json(vm.netns, "br0")["address"] == bridge_mac

    # Control: the same device state on fresh RAM loses the connection.
    before = vm.suspend(p)
    fresh = memfd_with(b"")
    os.ftruncate(fresh, int(RAM[:-1]) << 20)
    with vm.daemon.client() as c:
        c.remove("vm1", "ram0")
        c.put("vm1", "ram0", fresh)
    os.close(fresh)
    vm.start("fresh", "net0,bridge=br0")
    with pytest.raises(AssertionError, match="did not go on"):
        assert_continues(vm.server, before, timeout=8)


def test_two_queue_tap_survives_restart_control_other_tap(netvm):
    vm = netvm
    p = _boot(vm, "boot", "net0,queues=2,bridge=br0", queues=2)
    assert len(linuxguest.tap_fds(p.pid, "net0")) == 2
    assert link_json(vm.netns, "net0")["linkinfo"]["info_data"]["multi_queue"] is True
    before = vm.suspend(p)
    assert {n for n in vm.box() if n.startswith("tap.")} == {"tap.net0.q0", "tap.net0.q1"}
    row = json.loads(vm.cli("status", "--json").stdout)[0]  # the VM listing names the tap once, with its queues
    assert (row["vm"], row["state"], row["taps"]) == ("vm1", "suspended", [{"ifname": "net0", "queues": 2}]), row
    p = vm.start("resume", "net0,queues=2,bridge=br0", queues=2)
    assert_continues(vm.server, before)
    assert len(linuxguest.tap_fds(p.pid, "net0")) == 2, vm.log("resume")

    # Control: the same arguments, but not the held tap (its entries removed, so it is
    # gone; start creates a new one on the same bridge, whose MAC br0 then takes).
    bridge_mac = link_json(vm.netns, "br0")["address"]
    before = vm.suspend(p)
    with vm.daemon.client() as c:
        for q in ("tap.net0.q0", "tap.net0.q1"):
            c.remove("vm1", q)
    assert wait_for(lambda: ip("-n", vm.netns, "link", "show", "net0", check=False).returncode != 0, 5)
    p = vm.start("other", "net0,queues=2,bridge=br0", queues=2)
    with pytest.raises(AssertionError, match="did not go on"):
        assert_continues(vm.server, before, timeout=8)
    assert link_json(vm.netns, "net0").get("master") == "br0"
    assert link_json(vm.netns, "br0")["address"] != bridge_mac


def test_bad_taps_are_refused_and_change_nothing(netvm):
    vm = netvm
    for bad in ("9net", "net0,queues=0", "net0,queues=x", "net0,colour=red", "net0,bridge=a/b",
                "net0,queues=2,queues=3", "averyveryverylongname"):
        _code(vm.cli("start", "vm1", "--ram", RAM, "--tap", bad, "--", "-S", check=False), "InvalidRequest")
    _code(vm.cli("start", "vm1", "--ram", RAM, "--tap", "net0", "--tap", "net0", "--", "-S", check=False),
          "InvalidRequest")
    r = vm.cli("start", "vm1", "--ram", RAM, "--tap", "net0,bridge=nobr", "--", "-S", check=False)
    _code(r, "NotFound")
    assert "nobr" in r.stderr
    ip("-n", vm.netns, "link", "add", "taken", "type", "bridge")
    _code(vm.cli("start", "vm1", "--ram", RAM, "--tap", "taken", "--", "-S", check=False), "AlreadyExists")
    with vm.daemon.client() as c:
        assert c.list()["boxes"] == []  # no RAM put, no tap left behind
    assert ip("-n", vm.netns, "link", "show", "net0", check=False).returncode != 0


def test_tcp_connection_survives_upgrade(netvm):
    """Issue 28: ``fdbox-qemu upgrade`` under a guest with a TCP connection through a held
    tap: the new QEMU (another pid) holds the very tap queue, the server sees the same
    connection go on (same token, counter without a gap), the box is unchanged."""
    vm = netvm
    p = _boot(vm, "boot", "net0,bridge=br0")
    ifindex = link_json(vm.netns, "net0")["ifindex"]
    box = {n: (e["type"], e["size"]) for n, e in vm.box().items()}
    before = len(vm.server.snapshot()[0])
    r = vm.cli("upgrade", "vm1", "--json")
    out = json.loads(r.stdout)
    try:
        assert out["old_pid"] == p.pid and out["new_pid"] != p.pid, out
        assert p.wait(30) == 0, "the old QEMU should quit cleanly"
        assert_continues(vm.server, before, more=4)
        assert linuxguest.tap_fds(out["new_pid"], "net0"), "the new QEMU should hold the tap's queue"
        assert link_json(vm.netns, "net0")["ifindex"] == ifindex, "the same tap, not a new one"
        assert {n: (e["type"], e["size"]) for n, e in vm.box().items()} == box
    finally:
        try:
            os.kill(out["new_pid"], 9)
        except ProcessLookupError:
            pass
