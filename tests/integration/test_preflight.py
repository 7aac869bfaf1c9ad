"""Preflight (``fdboxctl preflight``, Varlink ``Preflight``, ``Seal(preflight: true)``)
against a real daemon: each refusal reason, and a good pass.

The daemon reads the host through :mod:`fdboxd.hostfacts`; ``FDBOX_TEST_HOST_ROOT``
(test only) points those reads at a directory each test writes: the running and the
loaded kernel's command line, ``kexec_loaded``, ``meminfo``, ``/proc/PID/cgroup``. The
entries are real memfds (hugetlb ones too; no page of them is touched, so an empty pool
is fine), guest_memfds from ``/dev/kvm`` where the host has it, and the state directory
is a real small tmpfs. This host has no fdbox.ko and no LUO, so the daemon runs on the
memory backend, which never crosses a kexec: the good pass is a daemon with nothing to
carry, and every entry is refused for its backend besides its own reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fdboxtest import REPO, build_libexec, memfd_with

from fdboxd.errors import EXIT_CODES, FdboxError
from fdboxd.hostfacts import KEXEC_CMDLINE, ROOT_ENV

GOOD_CMDLINE = "console=ttyS0 kho=on liveupdate=on hugepages=8"
MFD_HUGE_1GB = 30 << 26


def host_root(base: Path, *, cmdline: str | None = GOOD_CMDLINE, kexec_loaded: str | None = "1",
              kexec_cmdline: str | None = GOOD_CMDLINE, meminfo: str | None = None) -> Path:
    """A host description for the daemon: None leaves that file out."""
    root = base / "host"
    for rel, text in (("proc/cmdline", cmdline), ("sys/kernel/kexec_loaded", kexec_loaded),
                      (KEXEC_CMDLINE, kexec_cmdline),
                      ("proc/meminfo", meminfo if meminfo is not None else Path("/proc/meminfo").read_text())):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is not None:
            path.write_text(text + ("" if text.endswith("\n") else "\n"))
    return root


@pytest.fixture
def start(daemon_factory, tmp_path):  # type: ignore[no-untyped-def]
    """``start(**host_root_kwargs, args=(), state_dir=None)`` → a daemon reading that host."""
    def go(*args: str, state_dir: Path | None = None, **kw):  # type: ignore[no-untyped-def]
        root = host_root(tmp_path, **kw)
        return daemon_factory(*args, env={ROOT_ENV: str(root)}, state_dir=state_dir)
    return go


def preflight(d) -> dict:  # type: ignore[no-untyped-def,type-arg]
    with d.client() as c:
        return c.preflight()


def checks(report: dict) -> set[tuple[str, str]]:  # type: ignore[type-arg]
    """(check, where) of every problem."""
    return {(p["check"], f"{p['box']}/{p['name']}" if p.get("name") else p.get("box", "")) for p in report["problems"]}


def ctl(d, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "fdboxd.ctl", "--socket", d.socket, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def put_memfd(d, box: str, name: str, flags: int = os.MFD_ALLOW_SEALING, size: int = 4096) -> dict:  # type: ignore[no-untyped-def,type-arg]
    fd = os.memfd_create(name, os.MFD_CLOEXEC | flags)
    try:
        os.ftruncate(fd, size)
        with d.client() as c:
            return c.put(box, name, fd)
    finally:
        os.close(fd)


def test_a_good_host_with_nothing_to_carry_passes(start):
    d = start()
    r = preflight(d)
    assert r["ok"] is True and r["problems"] == [] and r["warnings"] == [], r
    out = ctl(d, "preflight")
    assert out.returncode == 0, out
    assert out.stdout.strip().splitlines()[-1].startswith("preflight: ok"), out.stdout
    with d.client() as c:
        assert c.seal(None, preflight=True) == []  # nothing to seal, nothing refused


def test_an_entry_the_backend_cannot_carry_is_named_with_its_fix(start):
    d = start()
    put_memfd(d, "vm1", "ram0")
    r = preflight(d)
    assert r["ok"] is False and checks(r) == {("backend", "vm1/ram0")}, r
    (p,) = r["problems"]
    assert "memory backend" in p["message"] and "LUO is absent" in p["message"], p
    assert "fdbox.ko" in p["fix"] and p["error"] == "BackendUnavailable", p
    # fdboxctl: one line per problem naming the entry and the fix, exit 3.
    out = ctl(d, "preflight")
    assert out.returncode == 3, out
    lines = [line for line in out.stdout.splitlines() if line.startswith("problem:")]
    assert len(lines) == 1 and lines[0].startswith("problem: vm1/ram0: ") and "; fix: " in lines[0], out.stdout
    assert json.loads(ctl(d, "--json", "preflight").stdout)["problems"] == r["problems"]
    # A preflighted seal refuses with the problem's error and seals nothing.
    with d.client() as c:
        with pytest.raises(FdboxError) as ei:
            c.seal(None, preflight=True)
        assert ei.value.name == "BackendUnavailable" and "vm1/ram0" in ei.value.message
        assert {b["name"]: b["state"] for b in c.list()["boxes"]} == {"vm1": "open"}
    assert "preflight: vm1/ram0: is held by the memory backend" in d.log()


def test_a_preflighted_seal_of_one_box_checks_that_box(start):
    d = start()
    put_memfd(d, "vm1", "ram0", os.MFD_HUGETLB, 2 << 20)  # F_SEAL_SEAL: refused wherever it goes
    put_memfd(d, "vm2", "notes")
    with d.client() as c:
        with pytest.raises(FdboxError) as ei:
            c.seal("vm2", preflight=True)
        assert "vm1" not in ei.value.message and "vm2/notes" in ei.value.message  # only its own problem
        with pytest.raises(FdboxError) as ei:
            c.seal("vm1", preflight=True)
        # Its first problem names the error: the entry's own (a memfd fdbox.ko cannot seal).
        assert ei.value.name == "UnsupportedType" and "vm1/ram0: is a hugetlb memfd" in ei.value.message
        assert {b["name"]: b["state"] for b in c.list()["boxes"]} == {"vm1": "open", "vm2": "open"}


def test_no_kexec_kernel_loaded(start):
    d = start(kexec_loaded="0")
    r = preflight(d)
    assert checks(r) == {("kexec", "")}, r
    assert "no kexec kernel is loaded" in r["problems"][0]["message"]
    assert "kexec -s -l" in r["problems"][0]["fix"]


def test_a_kernel_that_cannot_kexec(start):
    d = start(kexec_loaded=None)
    assert "cannot read /sys/kernel/kexec_loaded" in preflight(d)["problems"][0]["message"]


def test_running_kernel_without_kho_and_liveupdate(start):
    d = start(cmdline="console=ttyS0 quiet")
    assert preflight(d)["ok"] is True  # nothing to hand over: the options are not needed
    put_memfd(d, "vm1", "ram0")
    r = preflight(d)
    (p,) = [p for p in r["problems"] if p["check"] == "cmdline"]
    assert "booted without kho=on liveupdate=on" in p["message"] and "reboot with" in p["fix"], p


def test_loaded_kernel_command_line_checked_where_recorded(start, tmp_path):
    d = start(kexec_cmdline="console=ttyS0 kho=off liveupdate=on")
    put_memfd(d, "vm1", "ram0")
    r = preflight(d)
    (p,) = [p for p in r["problems"] if p["check"] == "kexec"]
    assert f"recorded in /{KEXEC_CMDLINE}" in p["message"] and "lacks kho=on" in p["message"], p
    # Not recorded: a warning that it cannot be checked, not a problem.
    (tmp_path / "host" / KEXEC_CMDLINE).unlink()
    r = preflight(d)
    assert not [p for p in r["problems"] if p["check"] == "kexec"], r
    assert any("cannot be checked" in w["message"] for w in r["warnings"]), r


def test_hugetlb_memfd_without_allow_sealing_warns_at_put_and_fails_preflight(start):
    d = start()
    entry = put_memfd(d, "vm1", "ram0", os.MFD_HUGETLB, 2 << 20)  # starts with F_SEAL_SEAL
    warning = entry["extra"]["warning"]
    assert "F_SEAL_SEAL" in warning and "MFD_ALLOW_SEALING" in warning and "memory-backend-file" in warning
    assert "put vm1/ram0: it is a hugetlb memfd with F_SEAL_SEAL" in d.log()
    r = preflight(d)
    assert ("entry", "vm1/ram0") in checks(r), r
    (p,) = [p for p in r["problems"] if p["check"] == "entry"]
    assert p["error"] == "UnsupportedType" and "as fdbox-qemu does" in p["fix"], p
    # With MFD_ALLOW_SEALING (what fdbox-qemu creates) there is nothing to say.
    ok = put_memfd(d, "vm2", "ram0", os.MFD_HUGETLB | os.MFD_ALLOW_SEALING, 2 << 20)
    assert "warning" not in ok.get("extra", {}), ok
    assert ("entry", "vm2/ram0") not in checks(preflight(d))


def test_hugetlb_1g_pages(start):
    try:
        fd = os.memfd_create("probe", os.MFD_CLOEXEC | os.MFD_HUGETLB | MFD_HUGE_1GB)
    except OSError as e:
        pytest.skip(f"this kernel has no 1 GiB hugetlb pages: {e}")
    os.close(fd)
    d = start()
    entry = put_memfd(d, "vm1", "ram0", os.MFD_HUGETLB | MFD_HUGE_1GB | os.MFD_ALLOW_SEALING, 1 << 30)
    assert "1 GiB" in entry["extra"]["warning"]
    (p,) = [p for p in preflight(d)["problems"] if p["check"] == "entry"]
    assert "1 GiB hugetlb pages" in p["message"] and "2M" in p["fix"], p


def test_hugetlb_pool_of_the_next_kernel(start, tmp_path):
    d = start(kexec_cmdline="kho=on liveupdate=on hugepages=1")
    put_memfd(d, "vm1", "ram0", os.MFD_HUGETLB | os.MFD_ALLOW_SEALING, 4 << 20)  # 2 pages
    r = preflight(d)
    (p,) = [p for p in r["problems"] if p["check"] == "room"]
    assert "reserves 1 2 MiB huge pages" in p["message"] and "hugepages=2" in p["fix"], p
    (tmp_path / "host" / KEXEC_CMDLINE).write_text("kho=on liveupdate=on hugepagesz=2M hugepages=2\n")
    assert not [p for p in preflight(d)["problems"] if p["check"] == "room"]


def test_state_file_system_without_room_for_the_snapshot(start):
    state = Path(tempfile.mkdtemp(prefix="fdbox-state-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "fdbox-test", str(state)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        d = start(state_dir=state)
        put_memfd(d, "vm1", "ram0")
        assert not [p for p in preflight(d)["problems"] if p["check"] == "room"]
        filler = os.open(state / "filler", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while os.write(filler, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(filler)
        r = preflight(d)
        (p,) = [p for p in r["problems"] if p["check"] == "room"]
        assert str(state) in p["message"] and "bytes free" in p["message"], p
        assert p["error"] == "BackendUnavailable" and "--state-dir" in p["fix"], p
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(state)])
        os.rmdir(state)


def test_unknown_type(start, tmp_path):
    d = start("--allow-type", "other")
    path = tmp_path / "plain"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with d.client() as c:
            c.put("vm1", "file", fd)
    finally:
        os.close(fd)
    (p,) = preflight(d)["problems"]
    assert (p["check"], p["box"], p["name"]) == ("entry", "vm1", "file") and "type other" in p["message"], p


def test_guest_memfd_private_and_room_for_the_copies(start):
    import kvmtest

    kvm = kvmtest.require(shared=True)
    try:
        meminfo = "MemTotal: 1000 kB\nMemAvailable: 4 kB\n"
        d = start(meminfo=meminfo)
        for name, flags in (("private", 0), ("shared", kvmtest.SHARED)):
            fd = kvm.guest_memfd(1 << 20, flags)
            try:
                with d.client() as c:
                    c.put("vm1", name, fd)
            finally:
                os.close(fd)
        r = preflight(d)
        assert ("entry", "vm1/private") in checks(r), r
        (p,) = [p for p in r["problems"] if p["check"] == "entry"]
        assert "private guest_memfd" in p["message"] and "GUEST_MEMFD_FLAG_INIT_SHARED" in p["fix"], p
        (room,) = [p for p in r["problems"] if p["check"] == "room"]
        assert "1.0 MiB of guest_memfd" in room["message"] and "0.0 MiB is available" in room["message"], room
    finally:
        kvm.close()


@pytest.fixture
def mapper() -> Iterator:  # type: ignore[type-arg]
    """``mapper(fd)`` → a real child process that maps ``fd`` shared and waits."""
    procs: list[subprocess.Popen[bytes]] = []

    def go(fd: int) -> subprocess.Popen[bytes]:
        code = ("import mmap, sys\nm = mmap.mmap(int(sys.argv[1]), 4096, mmap.MAP_SHARED)\n"
                "print('mapped', flush=True)\nsys.stdin.read()\n")
        p = subprocess.Popen([sys.executable, "-c", code, str(fd)], pass_fds=(fd,), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline() == b"mapped\n"
        return p

    yield go
    for p in procs:
        p.kill()
        p.wait()


def fake_vm(tmp_path: Path, vm: str, real_pid: int, fake_pid: int = 4242) -> None:
    """Say process ``fake_pid`` runs in fdbox-qemu@VM.service, its maps being ``real_pid``'s."""
    d = tmp_path / "host" / "proc" / str(fake_pid)
    d.mkdir(parents=True)
    unit = vm.replace("-", "\\x2d")
    (d / "cgroup").write_text(f"0::/system.slice/system-fdbox\\x2dqemu.slice/fdbox-qemu@{unit}.service\n")
    (d / "maps").symlink_to(f"/proc/{real_pid}/maps")


def test_running_vm_without_its_ram_in_fdbox(start, tmp_path, mapper):
    d = start()
    ram = memfd_with(b"r" * 4096, "guest-ram")
    try:
        child = mapper(ram)
        fake_vm(tmp_path, "vm-a", child.pid)
        r = preflight(d)
        assert checks(r) == {("vm", "vm-a")}, r
        assert "VM vm-a runs (fdbox-qemu@vm-a.service, pid 4242) but fdbox holds no RAM" in r["problems"][0]["message"]
        # Its RAM put into box vm-a: only the backend's own problem is left.
        with d.client() as c:
            c.put("vm-a", "ram0", ram)
        assert checks(preflight(d)) == {("backend", "vm-a/ram0")}
    finally:
        os.close(ram)


def test_running_vm_mapping_memory_fdbox_does_not_hold(start, tmp_path, mapper):
    d = start()
    held, stray = memfd_with(b"h" * 4096, "guest-ram"), memfd_with(b"s" * 4096, "other-ram")
    try:
        with d.client() as c:
            c.put("vm-b", "ram0", held)
        child = mapper(stray)
        fake_vm(tmp_path, "vm-b", child.pid)
        r = preflight(d)
        assert ("vm", "vm-b") in checks(r), r
        assert "maps 1 memfd(s) that fdbox does not hold" in [p for p in r["problems"] if p["check"] == "vm"][0]["message"]
    finally:
        os.close(held)
        os.close(stray)


def test_preflight_takes_no_parameters_and_seal_checks_its_flag(start):
    d = start()
    with d.client() as c:
        with pytest.raises(FdboxError) as ei:
            c.call("Preflight", {"box": "vm1"})
        assert ei.value.name == "InvalidRequest"
        with pytest.raises(FdboxError) as ei:
            c.call("Seal", {"preflight": 1})
        assert ei.value.name == "InvalidRequest" and "boolean" in ei.value.message


def test_fdbox_call_seal_with_preflight_exits_with_the_problems_error(start):
    prog = build_libexec("fdbox-call")
    d = start()
    put_memfd(d, "vm1", "ram0")
    out = subprocess.run([str(prog), "--socket", d.socket, "--more", "io.fdbox.Store.Seal", '{"preflight":true}'],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == EXIT_CODES["BackendUnavailable"], out
    reply = json.loads(out.stdout.splitlines()[-1])
    assert reply["error"] == "io.fdbox.Store.BackendUnavailable" and "preflight: 1 problem(s): vm1/ram0" in \
        reply["parameters"]["message"], reply

