"""``fdbox-qemu upgrade`` with a real QEMU (TCG) and a real fdboxd (issue 28): the new
QEMU starts beside the running one on the same fdbox-held RAM, only device state moves,
and the guest's tick counter goes on under another QEMU pid.

The guest is tests/qemu-guest/tick.S (see test_qemu.py). Its serial port is a file
chardev with ``append=on``, so the old and the new QEMU both append to one log. The
controls: a new QEMU that refuses its arguments, and one killed before the switch (while
the upgrade waits at the ``qemu.upgrade.before_migrate`` failpoint): the old QEMU runs
the guest on, untouched, and the box is as it was. An upgrade itself killed between the
load and the switch (``qemu.upgrade.before_switch=kill``) leaves the guest paused in the
new QEMU; the next upgrade finishes that switch and then upgrades.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import qemuguest
from fdboxtest import wait_for

from fdboxd.errors import EXIT_CODES

missing = qemuguest.have_tools()
if missing and not os.environ.get("CI"):
    pytest.skip(f"{missing} not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return qemuguest.build(tmp_path_factory.mktemp("guest"))


def guest_args(image: Path, serial: Path) -> list[str]:
    args = qemuguest.qemu_args(image, serial)
    i = args.index("-serial")
    return args[:i] + ["-chardev", f"file,id=ser0,path={serial},append=on", "-serial", "chardev:ser0"] + args[i + 2:]


class UVM:
    def __init__(self, daemon, image: Path, tmp: Path, name: str = "vm1") -> None:
        self.daemon, self.image, self.tmp, self.name = daemon, image, tmp, name
        self.run_dir = str(tmp / "run")
        self.serial = tmp / f"{name}-serial"
        self.logfile = tmp / f"{name}-qemu.log"
        self.proc: subprocess.Popen | None = None
        self.pids: set[int] = set()

    def cli(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(qemuguest.fdbox_qemu_cmd(self.daemon.socket, self.run_dir, *args),
                           env=qemuguest.env() | (env or {}), capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r

    def boot(self) -> subprocess.Popen:
        log = open(self.logfile, "ab")
        cmd = qemuguest.fdbox_qemu_cmd(self.daemon.socket, self.run_dir, "start", self.name, "--ram", "32M", "--",
                                       *guest_args(self.image, self.serial))
        self.proc = subprocess.Popen(cmd, env=qemuguest.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        self.pids.add(self.proc.pid)
        assert len(qemuguest.wait_ticks(self.serial, 3)) >= 3, self.log()
        return self.proc

    @property
    def qmp(self) -> str:
        return os.path.join(self.run_dir, f"{self.name}.qmp")

    def qmp_pid(self) -> int:
        """The pid of the QEMU answering on the VM's QMP socket."""
        from fdboxd.qemu.qmp import QMPClient

        with QMPClient(self.qmp, timeout=10) as q:
            pid, _, _ = struct.unpack("3i", q.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return int(pid)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def box(self) -> dict[str, dict]:
        with self.daemon.client() as c:
            return {e["name"]: e for e in c.list(self.name)["entries"]}

    def cleanup(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait()


@pytest.fixture
def uvm(daemon, image, tmp_path):
    v = UVM(daemon, image, tmp_path)
    yield v
    v.cleanup()


def _runs_on(vm: UVM, extra: int = 5) -> list[qemuguest.Tick]:
    """The guest keeps ticking: ``extra`` more ticks, consecutive, same token, sum OK."""
    n = len(qemuguest.ticks(vm.serial))
    got = qemuguest.wait_ticks(vm.serial, n + extra, timeout=60)
    assert len(got) >= n + extra, f"the guest stopped ticking:\n{vm.log()}"
    assert [t.n for t in got] == list(range(got[0].n, got[0].n + len(got))), "the counter jumped or went back"
    assert len({t.token for t in got}) == 1 and all(t.ok for t in got), got[-3:]
    assert len(qemuguest.boots(vm.serial)) == 1, "the guest booted again"
    return got


def _stable(entries: dict[str, dict]) -> dict[str, tuple]:
    return {n: (e["type"], e["size"], e.get("metadata")) for n, e in entries.items()}


def test_upgrade_moves_the_guest_to_a_new_qemu(uvm):
    """The guest runs on under a new QEMU pid: its counter continues with the same token
    and checksum, the old QEMU quit (exit 0), the box is unchanged, status says running.
    QEMU-ARGS come from the start's record (ram0's metadata)."""
    p = uvm.boot()
    box = uvm.box()
    assert json.loads(box["ram0"]["metadata"]["qemu_args"]) == guest_args(uvm.image, uvm.serial)
    before = qemuguest.ticks(uvm.serial)
    r = uvm.cli("upgrade", uvm.name, "--json")
    out = json.loads(r.stdout)
    print("upgrade:", out)
    uvm.pids.add(out["new_pid"])
    assert out["old_pid"] == p.pid and out["new_pid"] != p.pid, out
    assert out["was"] == "running" and out["blackout_ms"] > 0, out
    assert p.wait(30) == 0, "the old QEMU should quit cleanly"
    assert uvm.qmp_pid() == out["new_pid"]
    after = _runs_on(uvm)
    assert after[-1].n > before[-1].n + 3
    assert _stable(uvm.box()) == _stable(box)
    st = json.loads(uvm.cli("status", uvm.name, "--json").stdout)
    assert st["state"] == "running", st
    from fdboxd.qemu import fleet

    assert fleet.qemu_processes(uvm.run_dir) == {uvm.name: out["new_pid"]}

    # and again, from the upgraded QEMU (its argv names the upgrade dir), then a suspend
    r = uvm.cli("upgrade", uvm.name, "--json")
    again = json.loads(r.stdout)
    uvm.pids.add(again["new_pid"])
    assert again["old_pid"] == out["new_pid"] and wait_for(lambda: not os.path.exists(f"/proc/{out['new_pid']}"), 30)
    _runs_on(uvm)
    r = uvm.cli("suspend", uvm.name)
    assert "suspended (running before)" in r.stdout
    assert set(uvm.box()) == {"ram0", "devstate"}


def test_upgrade_with_refused_arguments_leaves_the_old_qemu(uvm):
    """Control: the new QEMU refuses its arguments (an unknown device): the upgrade fails
    naming it, the new QEMU is gone, the old one runs the guest on, the box is as it was."""
    p = uvm.boot()
    box = uvm.box()
    r = uvm.cli("upgrade", uvm.name, "--", *guest_args(uvm.image, uvm.serial), "-device", "no-such-device-fdbox",
                check=False)
    assert r.returncode == EXIT_CODES["InvalidRequest"], (r.returncode, r.stderr)
    assert "the new QEMU exited" in r.stderr and "the old one runs on" in r.stderr, r.stderr
    assert "no-such-device-fdbox" in uvm.log()
    assert p.poll() is None and uvm.qmp_pid() == p.pid
    _runs_on(uvm)
    assert _stable(uvm.box()) == _stable(box)
    r = uvm.cli("upgrade", uvm.name, "--qemu", "/nonexistent/qemu", check=False)
    assert r.returncode == EXIT_CODES["BackendUnavailable"] and "cannot run" in r.stderr, r.stderr
    assert p.poll() is None
    _runs_on(uvm, 2)


def test_upgrade_whose_new_qemu_dies_before_the_switch(uvm):
    """Control: the new QEMU is killed while the upgrade waits before the migration (a
    delay failpoint gives the test that moment): the migration fails, the old QEMU runs
    on with the guest, the box is as it was."""
    p = uvm.boot()
    box = uvm.box()
    mig = Path(uvm.run_dir) / "upgrade" / f"{uvm.name}.mig"
    cmd = qemuguest.fdbox_qemu_cmd(uvm.daemon.socket, uvm.run_dir, "upgrade", uvm.name)
    up = subprocess.Popen(cmd, env=qemuguest.env() | {"FDBOX_FAILPOINTS": "qemu.upgrade.before_migrate=delay(5000)"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(mig.exists, 60), "the new QEMU never listened for the device state"
        from fdboxd.qemu import fleet

        _kill_the_new_qemu(str(mig.parent), p.pid)
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode != 0 and "the old one runs on" in err, (up.returncode, err)
    assert p.poll() is None and uvm.qmp_pid() == p.pid
    _runs_on(uvm)
    assert _stable(uvm.box()) == _stable(box)
    assert fleet.qemu_processes(uvm.run_dir) == {uvm.name: p.pid}


@pytest.fixture
def two(daemon, image, tmp_path):
    vms = [UVM(daemon, image, tmp_path, name) for name in ("vm1", "vm2")]
    yield vms
    for v in vms:
        v.cleanup()


def test_upgrade_all_moves_every_guest(two):
    """``upgrade --all`` with two VMs: each guest runs on (its counter, token, one boot)
    under a new QEMU pid, each old QEMU quit cleanly, each keeps its own recorded QEMU-ARGS
    (its own serial log), and the fleet finds exactly the two new QEMUs."""
    procs = [v.boot() for v in two]
    r = two[0].cli("upgrade", "--all", "--json")
    outs = {o["vm"]: o for o in map(json.loads, r.stdout.splitlines())}
    assert set(outs) == {"vm1", "vm2"}, r.stdout
    for v, p in zip(two, procs):
        out = outs[v.name]
        v.pids.add(out["new_pid"])
        assert out["old_pid"] == p.pid and out["new_pid"] != p.pid, out
        assert p.wait(30) == 0, f"{v.name}: the old QEMU should quit cleanly"
        assert v.qmp_pid() == out["new_pid"]
    for v in two:
        _runs_on(v)
    from fdboxd.qemu import fleet

    assert fleet.qemu_processes(two[0].run_dir) == {o["vm"]: o["new_pid"] for o in outs.values()}


def test_upgrade_of_two_where_one_new_qemu_dies(two):
    """``upgrade vm1 vm2``: vm1's new QEMU is killed before the switch (both upgrades wait
    at ``qemu.upgrade.before_migrate``). vm1's old QEMU runs its guest on, its box as it
    was; vm2 is upgraded all the same. The exit status is vm1's error, its stderr line names vm1,
    and stdout has vm2's outcome line only."""
    procs = [v.boot() for v in two]
    boxes = [v.box() for v in two]
    udir = Path(two[0].run_dir) / "upgrade"
    cmd = qemuguest.fdbox_qemu_cmd(two[0].daemon.socket, two[0].run_dir, "upgrade", "vm1", "vm2")
    up = subprocess.Popen(cmd, env=qemuguest.env() | {"FDBOX_FAILPOINTS": "qemu.upgrade.before_migrate=delay(5000)"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: all((udir / f"{v.name}.mig").exists() for v in two), 60), \
            "the new QEMUs never listened for the device state"
        _kill_the_new_qemu(str(udir / "vm1.qmp"), procs[0].pid)
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    print(out, err)
    m = re.fullmatch(r"fdbox-qemu: (\w+): VM vm1: .*; the new QEMU was killed, the old one runs on\n", err)
    assert m and up.returncode == EXIT_CODES[m.group(1)], (up.returncode, err)
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vm2: upgraded (running)"), out
    new2 = int(lines[0].split(" -> ")[1].split()[0])
    two[1].pids.add(new2)
    assert procs[0].poll() is None and two[0].qmp_pid() == procs[0].pid
    assert procs[1].wait(30) == 0 and two[1].qmp_pid() == new2
    for v in two:
        _runs_on(v)
    assert [_stable(v.box()) for v in two] == [_stable(b) for b in boxes]
    from fdboxd.qemu import fleet

    assert fleet.qemu_processes(two[0].run_dir) == {"vm1": procs[0].pid, "vm2": new2}


@pytest.mark.parametrize("point", ["before_switch", "after_switch"])
def test_upgrade_killed_midway_is_finished_by_the_next(uvm, point):
    """fdbox-qemu upgrade itself is SIGKILLed after the load, before the switch (the guest
    paused in both QEMUs: the old one postmigrate, the new one loaded) or just after it
    (the new one runs the guest, the old one is postmigrate). The next upgrade finishes
    that switch (the loaded QEMU runs the guest, the old one quits), then does its own:
    the guest ticks on."""
    p = uvm.boot()
    r = uvm.cli("upgrade", uvm.name, env={"FDBOX_FAILPOINTS": f"qemu.upgrade.{point}=kill"}, check=False)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    from fdboxd.qemu.qmp import QMPClient

    with QMPClient(uvm.qmp) as q:
        assert q.execute("query-status")["status"] == "postmigrate"
    stranded = [pid for pid in _pids_with(os.path.join(uvm.run_dir, "upgrade")) if pid != p.pid]
    uvm.pids.update(stranded)
    r = uvm.cli("upgrade", uvm.name, "--json")
    assert "finished an interrupted upgrade" in r.stderr, r.stderr
    out = json.loads(r.stdout)
    uvm.pids.add(out["new_pid"])
    assert stranded == [out["old_pid"]], (stranded, out)
    assert p.wait(30) == 0
    _runs_on(uvm)


def _kill_the_new_qemu(text: str, old_pid: int) -> None:
    """SIGKILL the one process besides ``old_pid`` whose command line holds ``text``: the
    new QEMU an upgrade started, before its switch."""
    new = [pid for pid in _pids_with(text) if pid != old_pid]
    assert len(new) == 1, new
    os.kill(new[0], signal.SIGKILL)


def _pids_with(text: str) -> list[int]:
    """Processes whose command line contains ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


TAP_PROBE = r'''
import fcntl, json, os, socket, struct, subprocess, sys, time
from fdboxd.qemu.qmp import QMPClient
for conf in ("all", "default"):
    with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
        f.write("1")  # no router solicitations or MLD reports in the counts
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH", b"fdbxp0", 0x0002 | 0x1000 | 0x4000))  # TUNSETIFF TAP|NO_PI|VNET_HDR
subprocess.run(["ip", "link", "set", "fdbxp0", "up"], check=True)
ps = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
ps.bind(("fdbxp0", 0))
os.set_blocking(fd, False)

def drain():
    n = 0
    while True:
        try:
            os.read(fd, 65536)
            n += 1
        except BlockingIOError:
            return n

def send(k):  # k frames out of the host side of the tap: each one readable on the queue fd
    for i in range(k):
        ps.send(b"\x02\xfd\x00\x00\x00\x09\x02\xfd\x00\x00\x00\x01\x88\xb5" + bytes([i]) * 60)
    time.sleep(0.3)  # let a reader that wants them take them (proving a reader does not needs a window)

out = {}
time.sleep(0.3)
drain()
send(5)
out["alone"] = drain()
qmp = sys.argv[1]
q = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-nodefaults", "-m", "32",
                      "-netdev", f"tap,id=n0,fd={fd}", "-device", "virtio-net-pci,netdev=n0",
                      "-qmp", f"unix:{qmp},server=on,wait=off", "-incoming", "defer"],
                     pass_fds=[fd], stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 60
while True:
    try:
        with QMPClient(qmp, timeout=10) as c:
            out["status"] = c.execute("query-status")["status"]
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.02)
out["rounds"] = []
for _ in range(3):
    send(5)
    out["rounds"].append(drain())
q.kill()
q.wait()
print(json.dumps(out))
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a tap in a network namespace of its own: needs root")
def test_incoming_qemu_takes_at_most_one_frame_per_tap_queue(tmp_path):
    """What a QEMU waiting with ``-incoming defer`` does with a tap queue the running
    guest's QEMU also reads (issue 28; docs/integrating.md): it reads one frame, queues
    it (the VM does not run) and stops reading, so of the frames that come after it
    started, we (here in the old QEMU's place) get all but the first."""
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", TAP_PROBE, str(tmp_path / "probe.qmp")],
                       env=qemuguest.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["alone"] == 5 and out["status"] == "inmigrate", out
    assert out["rounds"] == [4, 5, 5], out


def test_upgrade_under_systemd_hands_mainpid_to_the_new_qemu(uvm, tmp_path):
    """``systemctl reload`` (ExecReload= runs ``upgrade VM`` with NOTIFY_SOCKET): the unit
    hears ``MAINPID=`` the new QEMU, with ``READY=1``, while the old QEMU still lives (so
    its exit is never the main process's), and the new QEMU does not inherit the socket.
    Checked in the reader thread while the upgrade waits on its BARRIER=1."""
    from test_systemd import NotifySocket

    p = uvm.boot()
    notify = NotifySocket(tmp_path / "notify")
    at_mainpid: list[tuple[str, bool]] = []
    notify.on_message = lambda m: at_mainpid.append((m["MAINPID"], p.poll() is None)) if "MAINPID" in m else None
    try:
        r = uvm.cli("upgrade", uvm.name, "--json", env={"NOTIFY_SOCKET": notify.path})
        out = json.loads(r.stdout)
        uvm.pids.add(out["new_pid"])
        assert at_mainpid == [(str(out["new_pid"]), True)], at_mainpid
        assert notify.seen("MAINPID")[0].get("READY") == "1"
        assert notify.seen("BARRIER", "1")
        env = Path(f"/proc/{out['new_pid']}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"NOTIFY_SOCKET=") for e in env), "QEMU must not inherit NOTIFY_SOCKET"
        assert p.wait(30) == 0
        _runs_on(uvm)
    finally:
        notify.close()
