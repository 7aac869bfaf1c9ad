"""fdbox-qemu with a real QEMU (TCG) and a real fdboxd: a guest's RAM and state survive
QEMU going away and fdboxd restarting.

The guest is tests/qemu-guest/tick.S (see tests/qemuguest.py): a token drawn at boot,
512 KiB filled from it, a checksum and a counter, all in guest RAM; ``tick N token=T
sum=OK`` on the serial port. Resumed correctly, N continues with the same T and sum=OK.

fdboxd restarts for real in the main test: the memory backend keeps entries across a
restart only through systemd's fd store, so the test plays systemd's part (the
NOTIFY_SOCKET fd store of test_systemd.py) and passes the fds back on restart. The two
controls show the test can fail: a resume on fresh RAM prints no tick at all (QEMU
7.2 even refuses the device state; the guest's code was in RAM anyway), a resume on a damaged region prints ``sum=BAD``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import qemuguest
from fdboxtest import memfd_with, wait_for
from test_systemd import restart_from_fdstore

from fdboxd.errors import EXIT_CODES

RAM = 32 << 20

missing = qemuguest.have_tools()
if missing and not os.environ.get("CI"):
    pytest.skip(f"{missing} not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return qemuguest.build(tmp_path_factory.mktemp("guest"))


class VM:
    """One fdbox-qemu VM of a test: start (Popen, QEMU's pid), suspend, status."""

    def __init__(self, daemon, image: Path, tmp: Path, name: str = "vm1") -> None:
        self.daemon, self.image, self.tmp, self.name = daemon, image, tmp, name
        self.run_dir = str(tmp / "run")
        self.procs: list[subprocess.Popen] = []
        self.serial: Path | None = None

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(qemuguest.fdbox_qemu_cmd(self.daemon.socket, self.run_dir, *args), env=qemuguest.env(),
                           capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r

    def start(self, tag: str, *extra: str, ram: str = "32M", env: dict[str, str] | None = None) -> subprocess.Popen:
        self.serial = self.tmp / f"{self.name}-serial-{tag}"
        log = open(self.tmp / f"{self.name}-qemu-{tag}.log", "wb")
        cmd = qemuguest.fdbox_qemu_cmd(self.daemon.socket, self.run_dir, "start", self.name, "--ram", ram, *extra,
                                       "--", *qemuguest.qemu_args(self.image, self.serial))
        p = subprocess.Popen(cmd, env=qemuguest.env() | (env or {}), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        self.procs.append(p)
        return p

    @property
    def qmp(self) -> str:
        return os.path.join(self.run_dir, f"{self.name}.qmp")

    def log(self, tag: str) -> str:
        return (self.tmp / f"{self.name}-qemu-{tag}.log").read_text(errors="replace")

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def vm(daemon, image, tmp_path):
    v = VM(daemon, image, tmp_path)
    yield v
    v.cleanup()


def _box(daemon, name: str = "vm1") -> dict[str, dict]:
    with daemon.client() as c:
        return {e["name"]: e for e in c.list(name)["entries"]}


def _suspend(vm: VM, proc: subprocess.Popen) -> list[qemuguest.Tick]:
    # READY=1 means QEMU runs the guest, not that the guest has printed yet: on a loaded
    # host a suspend before its first tick would resume a guest that prints its boot line.
    assert len(qemuguest.wait_ticks(vm.serial, 2, timeout=60)) >= 2, "the guest never ticked before the suspend"
    r = vm.cli("suspend", vm.name)
    assert "suspended (running before)" in r.stdout, r.stdout
    assert proc.wait(30) == 0, "QEMU should quit cleanly after the suspend"
    return qemuguest.ticks(vm.serial)


def _resumed(vm: VM, before: list[qemuguest.Tick], tag: str) -> list[qemuguest.Tick]:
    after = qemuguest.wait_ticks(vm.serial, 5, timeout=60)
    assert len(after) >= 5, f"guest did not tick after resume:\n{vm.log(tag)}"
    assert not qemuguest.boots(vm.serial), "the guest booted again instead of resuming"
    last = before[-1]
    assert last.n < after[0].n <= last.n + 2, (last, after[0])  # one tick may have been cut mid-line
    assert [t.n for t in after] == list(range(after[0].n, after[0].n + len(after)))
    assert all(t.token == last.token and t.ok for t in after), after[:3]
    return after


def test_suspend_restart_fdboxd_resume(daemon_factory, image, tmp_path):
    """Boot, suspend, seal, restart fdboxd (fd store played by the test), unseal, resume."""
    from test_systemd import NotifySocket

    notify = NotifySocket(tmp_path / "notify")
    try:
        d = daemon_factory(env={"NOTIFY_SOCKET": notify.path})
        vm = VM(d, image, tmp_path)
        try:
            p = vm.start("boot")
            before = qemuguest.wait_ticks(vm.serial, 3)
            assert len(before) >= 3 and all(t.ok for t in before), vm.log("boot")
            assert qemuguest.boots(vm.serial) == [before[0].token]
            st = vm.cli("status", vm.name).stdout
            assert "qemu:    running" in st and "ram0 memfd 32768 KiB" in st, st
            before = _suspend(vm, p)
            entries = _box(d)
            assert set(entries) == {"ram0", "devstate"}, entries
            assert entries["ram0"]["size"] == RAM and entries["ram0"]["type"] == "memfd"
            assert 0 < entries["devstate"]["size"] < 4 << 20  # device state only, no RAM in it
            assert entries["devstate"]["metadata"]["runstate"] == "running"
            st = vm.cli("status", vm.name).stdout
            assert "qemu:    not running" in st and "devstate present" in st, st

            with d.client() as c:
                c.seal(vm.name)
            r = vm.cli("start", vm.name, "--ram", "32M", "--", "-S", check=False)
            assert r.returncode == EXIT_CODES["Sealed"], r.stderr

            # fdboxd restarts; only systemd's fd store (the test) holds the files meanwhile.
            assert wait_for(lambda: len(notify.store) == 2, 10), notify.store
            with notify.lock:
                kept = dict(notify.store)
            assert d.stop() == 0
            restart_from_fdstore(d, notify, kept)
            with d.client() as c:
                c.unseal(vm.name)

            vm.start("resume")
            _resumed(vm, before, "resume")
            assert wait_for(lambda: "devstate" not in _box(d), 10), "devstate should go once the guest runs"
            assert "resumed" in vm.log("resume")
            st = vm.cli("status", vm.name).stdout
            assert "qemu:    running" in st, st
        finally:
            vm.cleanup()
    finally:
        notify.close()


def test_resume_on_fresh_ram_fails(vm, daemon):
    """Control: the same device state on a fresh memfd; the guest's code is gone."""
    p = vm.start("boot")
    assert len(qemuguest.wait_ticks(vm.serial, 3)) >= 3, vm.log("boot")
    _suspend(vm, p)
    fresh = memfd_with(b"")
    os.ftruncate(fresh, RAM)
    with daemon.client() as c:
        c.remove(vm.name, "ram0")
        c.put(vm.name, "ram0", fresh)
    os.close(fresh)
    vm.start("fresh")
    time.sleep(3)
    # QEMU 7.2 already refuses the device state (kvm-tpr-opt reads guest RAM); either
    # way the guest must not tick, and a failed resume keeps devstate for another try.
    assert qemuguest.ticks(vm.serial) == [] and not qemuguest.boots(vm.serial), vm.log("fresh")
    assert "devstate" in _box(daemon)


def test_resume_on_damaged_region_reports_bad_sum(vm, daemon):
    """Control: one page of the guest's checked region flipped while it was suspended."""
    p = vm.start("boot")
    assert len(qemuguest.wait_ticks(vm.serial, 3)) >= 3, vm.log("boot")
    before = _suspend(vm, p)
    with daemon.client() as c:
        _, fd = c.get(vm.name, "ram0")
    try:
        page = os.pread(fd, 4096, 0x20000)
        os.pwrite(fd, bytes(b ^ 0xFF for b in page), 0x20000)
    finally:
        os.close(fd)
    vm.start("damaged")
    after = qemuguest.wait_ticks(vm.serial, 3)
    assert len(after) >= 3, vm.log("damaged")
    assert after[0].n > before[-1].n and all(t.token == before[-1].token for t in after)
    assert not any(t.ok for t in after), after


def test_suspend_while_paused_stays_paused(vm, daemon):
    """A guest paused before suspend comes back paused (runstate is kept), then continues."""
    from fdboxd.qemu.qmp import QMPClient

    p = vm.start("boot")
    assert len(qemuguest.wait_ticks(vm.serial, 2)) >= 2, vm.log("boot")
    qmp = os.path.join(vm.run_dir, "vm1.qmp")
    with QMPClient(qmp) as q:
        q.execute("stop")
    r = vm.cli("suspend", vm.name)
    assert "paused before" in r.stdout
    assert p.wait(30) == 0
    assert _box(daemon)["devstate"]["metadata"]["runstate"] == "paused"
    vm.start("resume")
    assert wait_for(lambda: "devstate" not in _box(daemon), 30), vm.log("resume")
    with QMPClient(qmp) as q:
        assert q.execute("query-status")["status"] == "paused"
        q.execute("cont")
    assert len(qemuguest.wait_ticks(vm.serial, 2)) >= 2


def test_wrong_states_get_clear_errors(vm, daemon):
    def code(r: subprocess.CompletedProcess, name: str) -> None:
        assert r.returncode == EXIT_CODES[name], (name, r.returncode, r.stderr)
        assert f"fdbox-qemu: {name}:" in r.stderr, r.stderr

    code(vm.cli("suspend", "vm1", check=False), "NotFound")            # not running
    code(vm.cli("status", "vm1", check=False), "NotFound")             # no box, no QEMU
    code(vm.cli("status", "bad/name", check=False), "InvalidName")
    code(vm.cli("start", "vm1", "--ram", "32M", "--", "-m", "64", check=False), "InvalidRequest")
    code(vm.cli("start", "vm1", "--ram", "0", check=False), "InvalidRequest")
    code(vm.cli("start", "vm1", "--ram", "32M", "--", "-machine", "pc,memory-backend=m", check=False), "InvalidRequest")
    code(vm.cli("start", "vm1", "--ram", "3000", check=False), "InvalidRequest")  # not page-sized
    assert _box_names(daemon) == set()  # refused starts created nothing

    p = vm.start("boot")
    assert len(qemuguest.wait_ticks(vm.serial, 2)) >= 2, vm.log("boot")
    code(vm.cli("start", "vm1", "--ram", "32M", check=False), "AlreadyExists")  # running
    with daemon.client() as c:
        c.seal("vm1")
    code(vm.cli("suspend", "vm1", check=False), "Sealed")
    with daemon.client() as c:
        c.unseal("vm1")
    assert p.poll() is None and len(qemuguest.wait_ticks(vm.serial, 4)) >= 4  # a refused suspend left it running
    _suspend(vm, p)
    code(vm.cli("start", "vm1", "--ram", "64M", check=False), "InvalidRequest")  # size mismatch
    r = vm.cli("start", "vm1", "--ram", "32M", "--hugetlb", "2M", check=False)
    code(r, "InvalidRequest")
    assert "memfd" in r.stderr
    assert set(_box(daemon)) == {"ram0", "devstate"}  # nothing changed


def test_failed_suspend_leaves_the_guest_running(daemon_factory, image, tmp_path):
    """fdboxd refuses the devstate (entry limit): suspend fails, the guest runs on, the box
    is as before."""
    d = daemon_factory("--max-entries-per-box", "1")
    vm = VM(d, image, tmp_path)
    try:
        p = vm.start("boot")
        assert len(qemuguest.wait_ticks(vm.serial, 2)) >= 2, vm.log("boot")
        r = vm.cli("suspend", "vm1", check=False)
        assert r.returncode == EXIT_CODES["LimitExceeded"], r.stderr
        n = len(qemuguest.ticks(vm.serial))
        assert len(qemuguest.wait_ticks(vm.serial, n + 3)) >= n + 3, "the guest should run on"
        assert p.poll() is None and set(_box(d)) == {"ram0"}
        assert "qemu:    running" in vm.cli("status", "vm1").stdout
    finally:
        vm.cleanup()


def _box_names(daemon) -> set[str]:
    with daemon.client() as c:
        return {b["name"] for b in c.list()["boxes"]}



# ---------------------------------------------------------------- several VMs (issue 22 §2)


def _fleet(daemon, image, tmp_path, *names: str) -> list[VM]:
    vms = [VM(daemon, image, tmp_path, n) for n in names]
    for v in vms:
        v.start("boot")
    for v in vms:
        assert len(qemuguest.wait_ticks(v.serial, 3)) >= 3, v.log("boot")
    return vms


def _status(vm: VM) -> dict[str, dict]:
    return {r["vm"]: r for r in json.loads(vm.cli("status", "--json").stdout)}


def test_suspend_several_vms_side_by_side(daemon, image, tmp_path):
    """`suspend vmb vma` with vmb's QMP held by the test (QEMU serves one QMP client at a
    time): vma is suspended while vmb's suspend waits, which one after the other in the
    order given could not do; then vmb follows, and both resume."""
    from fdboxd.qemu.qmp import QMPClient

    a, b = vms = _fleet(daemon, image, tmp_path, "vma", "vmb")
    try:
        before: dict[str, list[qemuguest.Tick]] = {}
        cmd = qemuguest.fdbox_qemu_cmd(daemon.socket, a.run_dir, "suspend", "vmb", "vma", "--json")
        with QMPClient(b.qmp):
            proc = subprocess.Popen(cmd, env=qemuguest.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert wait_for(lambda: a.procs[0].poll() is not None, 30), "vma's QEMU should quit while vmb waits"
            assert "devstate" in _box(daemon, "vma")
            time.sleep(0.5)
            assert proc.poll() is None and b.procs[0].poll() is None, "vmb's suspend should wait for its QMP"
            assert "devstate" not in _box(daemon, "vmb")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [r["vm"] for r in lines] == ["vmb", "vma"] and all(r["was"] == "running" for r in lines), lines
        assert [v.procs[0].wait(30) for v in vms] == [0, 0]
        rows = _status(a)
        assert {n: r["state"] for n, r in rows.items()} == {"vma": "suspended", "vmb": "suspended"}, rows
        for v in vms:
            before[v.name] = qemuguest.ticks(v.serial)
            v.start("resume")
        for v in vms:
            _resumed(v, before[v.name], "resume")
    finally:
        for v in vms:
            v.cleanup()


def test_suspend_all_and_status_of_every_vm(daemon, image, tmp_path):
    """status with no VM lists each VM fdbox holds; suspend --all suspends every running one."""
    vms = _fleet(daemon, image, tmp_path, "vmx", "vmy", "vmz")
    x = vms[0]
    try:
        rows = _status(x)
        assert sorted(rows) == ["vmx", "vmy", "vmz"], rows
        for r in rows.values():
            assert (r["state"], r["qemu"], r["box"], r["ram_bytes"], r["ram"], r["ram_type"], r["taps"],
                    r["devstate_bytes"]) == ("running", "running", "open", RAM, ["ram0"], ["memfd"], [], None), r
            assert r["pid"] == x.procs[0].pid or r["pid"] in {v.procs[0].pid for v in vms}
        text = x.cli("status").stdout.splitlines()
        assert text[0].split() == ["VM", "STATE", "BOX", "RAM", "DEVSTATE", "TAPS"], text
        assert text[1].split() == ["vmx", "running", "open", "32", "MiB", "-", "-"], text

        r = x.cli("suspend", "--all", "--json")
        lines = {json.loads(line)["vm"]: json.loads(line) for line in r.stdout.splitlines()}
        assert sorted(lines) == ["vmx", "vmy", "vmz"] and all(v["was"] == "running" for v in lines.values()), r
        assert [v.procs[0].wait(30) for v in vms] == [0, 0, 0]
        before = {v.name: qemuguest.ticks(v.serial) for v in vms}
        rows = _status(x)
        for name, row in rows.items():
            assert row["state"] == "suspended" and row["qemu"] == "not running", row
            assert row["devstate_bytes"] == lines[name]["devstate_bytes"] > 0, (row, lines[name])
        assert "devstate present" in x.cli("status", "vmy").stdout
        r = x.cli("suspend", "--all")
        assert r.stdout.strip() == "no VM running", r.stdout

        x.start("resume")
        _resumed(x, before["vmx"], "resume")
        assert wait_for(lambda: _status(x)["vmx"]["state"] == "running", 10), _status(x)
        x.procs[-1].kill()  # QEMU gone without a suspend: RAM held, nothing to resume from
        x.procs[-1].wait()
        rows = _status(x)
        assert {n: r["state"] for n, r in rows.items()} == {"vmx": "stopped", "vmy": "suspended", "vmz": "suspended"}
    finally:
        for v in vms:
            v.cleanup()


def test_suspend_all_refuses_a_qemu_it_cannot_reach(daemon, image, tmp_path):
    """A QEMU whose QMP socket is gone is still found (its command line): --all fails for
    it, naming it, instead of skipping a VM a kexec would lose; the others are suspended."""
    p, q = vms = _fleet(daemon, image, tmp_path, "vmp", "vmq")
    try:
        os.unlink(q.qmp)
        r = p.cli("suspend", "--all", check=False)
        assert r.returncode == EXIT_CODES["NotFound"], (r.returncode, r.stderr)
        assert f"VM vmq: its QEMU (pid {q.procs[0].pid}) runs but does not answer" in r.stderr, r.stderr
        assert "vmp: suspended (running before)" in r.stdout, r.stdout
        assert p.procs[0].wait(30) == 0 and "devstate" in _box(daemon, "vmp")
        assert q.procs[0].poll() is None and set(_box(daemon, "vmq")) == {"ram0"}
        n = len(qemuguest.ticks(q.serial))
        assert len(qemuguest.wait_ticks(q.serial, n + 2)) >= n + 2, "vmq should run on"
        assert _status(p)["vmq"]["state"] == "unreachable"
    finally:
        for v in vms:
            v.cleanup()


def test_suspend_many_bad_input_changes_nothing(vm, daemon):
    p = vm.start("boot")
    assert len(qemuguest.wait_ticks(vm.serial, 2)) >= 2, vm.log("boot")
    r = vm.cli("suspend", "vm1", "bad/name", check=False)
    assert r.returncode == EXIT_CODES["InvalidName"], r.stderr
    assert vm.cli("suspend", check=False).returncode == 2  # neither names nor --all
    assert vm.cli("suspend", "--all", "vm1", check=False).returncode == 2
    assert p.poll() is None and set(_box(daemon)) == {"ram0"}


def test_ready_only_once_the_guest_runs(daemon, image, tmp_path):
    """NOTIFY_SOCKET set (Type=notify): READY=1 comes once QMP says running and, on a
    resume, once devstate is gone. Checked while the helper still waits on its BARRIER=1,
    so nothing of fdbox-qemu moves on between READY and the check."""
    from test_systemd import NotifySocket

    from fdboxd.qemu.qmp import QMPClient

    notify = NotifySocket(tmp_path / "notify")
    vm = VM(daemon, image, tmp_path)
    at_ready: list[tuple[str, set[str]]] = []

    def check(msg: dict[str, str]) -> None:
        if msg.get("READY") == "1":
            try:
                with QMPClient(vm.qmp, timeout=10) as q:
                    at_ready.append((q.execute("query-status")["status"], set(_box(daemon))))
            except Exception as e:  # noqa: BLE001 - recorded, so the reader thread goes on
                at_ready.append((repr(e), set()))

    notify.on_message = check
    try:
        p = vm.start("boot", env={"NOTIFY_SOCKET": notify.path})
        assert notify.wait(lambda: notify.seen("READY", "1"), 60), vm.log("boot")
        assert at_ready == [("running", {"ram0"})], at_ready
        assert notify.seen("STATUS")[0]["STATUS"] == "started (running)"
        env = Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"NOTIFY_SOCKET=") for e in env), "QEMU must not inherit NOTIFY_SOCKET"
        before = _suspend(vm, p)

        vm.start("resume", env={"NOTIFY_SOCKET": notify.path})
        assert notify.wait(lambda: len(notify.seen("READY", "1")) == 2, 60), vm.log("resume")
        assert at_ready[1] == ("running", {"ram0"}), at_ready
        assert notify.seen("STATUS")[-1]["STATUS"].startswith("resumed (device state loaded in ")
        _resumed(vm, before, "resume")
        assert len(notify.seen("BARRIER", "1")) == 2
    finally:
        vm.cleanup()
        notify.close()


# ---------------------------------------------------------------- failure paths (issue 25 items 7, 19)


def test_failed_start_removes_only_what_it_created(vm, daemon, image, tmp_path):
    """Issue 25 item 19: a start whose QEMU refuses an argument, or whose QEMU binary is
    missing, removes the RAM box it created and says so (`status` lists no `stopped` VM);
    the control: the same failed start of a suspended VM leaves its box untouched, and a
    good start then resumes it."""
    serial = tmp_path / "serial-bad"
    bad = [*qemuguest.qemu_args(image, serial), "-device", "no-such-device-fdbox"]
    r = vm.cli("start", "vm1", "--ram", "32M", "--", *bad, check=False)
    assert r.returncode != 0, r
    assert "removed ram0 and box vm1 (created by this start)" in r.stderr, r.stderr
    assert _box_names(daemon) == set()
    assert vm.cli("status", "vm1", check=False).returncode == EXIT_CODES["NotFound"]

    r = vm.cli("start", "vm1", "--ram", "32M", "--qemu", str(tmp_path / "no-such-qemu"), "--", *bad, check=False)
    assert r.returncode == EXIT_CODES["BackendUnavailable"], r
    assert "cannot run" in r.stderr and "removed ram0 and box vm1 (created by this start)" in r.stderr, r.stderr
    assert _box_names(daemon) == set()

    p = vm.start("boot")
    before = _suspend(vm, p)
    entries = _box(daemon)
    assert set(entries) == {"ram0", "devstate"}
    r = vm.cli("start", "vm1", "--ram", "32M", "--", *bad, check=False)
    assert r.returncode != 0 and "removed" not in r.stderr, r
    assert "devstate kept in the box" in r.stderr, r.stderr
    assert _box(daemon) == entries, "a failed start must not touch the box of a suspended VM"
    vm.start("resume")
    _resumed(vm, before, "resume")


def test_resume_drops_devstate_before_the_guest_runs(vm, daemon, tmp_path):
    """Issue 25 item 7: the devstate is removed before the guest continues. Here the
    removal fails (the QEMU wrapper moves fdboxd's socket away before it execs QEMU): the
    guest stays paused, not continued, with no READY, and the box keeps its devstate;
    once fdboxd answers again, a new start resumes from it and the ticks continue."""
    p = vm.start("boot")
    before = _suspend(vm, p)
    sock = daemon.socket
    wrapper = tmp_path / "qemu-wrapper"
    wrapper.write_text('#!/bin/sh\nmv "$FDBOX_TEST_SOCK" "$FDBOX_TEST_SOCK.away"\nexec qemu-system-x86_64 "$@"\n')
    wrapper.chmod(0o755)
    try:
        p = vm.start("noremove", "--qemu", str(wrapper), env={"FDBOX_TEST_SOCK": sock})
        assert wait_for(lambda: "devstate" in vm.log("noremove") and "fdbox-qemu: vm1:" in vm.log("noremove"), 60), \
            vm.log("noremove")
        from fdboxd.qemu.qmp import QMPClient

        with QMPClient(vm.qmp) as q:
            status = q.execute("query-status")["status"]
        assert status == "paused", (status, vm.log("noremove"))
        assert "could not be removed" in vm.log("noremove"), vm.log("noremove")
        assert qemuguest.ticks(vm.serial) == [], "the guest ran with devstate still in the box"
    finally:
        if os.path.exists(sock + ".away"):
            os.rename(sock + ".away", sock)
    assert "devstate" in _box(daemon)
    with QMPClient(vm.qmp) as q:
        q.execute("quit")
    p.wait(30)
    vm.start("resume")
    _resumed(vm, before, "resume")
    assert wait_for(lambda: "devstate" not in _box(daemon), 10)


def test_an_error_after_devstate_is_dropped_still_continues_the_guest(vm, daemon):
    """Past the point of no return (devstate removed, the loaded QEMU the only holder of
    the device state), an error (failpoint qemu.resume.before_cont) does not leave the
    guest paused: it is continued, and the error is reported."""
    p = vm.start("boot")
    before = _suspend(vm, p)
    vm.start("resume", env={"FDBOX_FAILPOINTS": "qemu.resume.before_cont=error(EIO)"})
    _resumed(vm, before, "resume")
    assert "continuing the guest anyway" in vm.log("resume")
    assert "devstate" not in _box(daemon)
