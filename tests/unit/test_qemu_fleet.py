"""fdbox-qemu's several-VM parts without QEMU: VM states, status rows, the command line,
finding QEMUs by their command line (real processes whose argv looks like QEMU's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from fdboxtest import wait_for

from fdboxd.errors import FdboxError
from fdboxd.qemu import cli, fleet
from fdboxd.qemu.vm import vm_state


def test_vm_state():
    assert vm_state(None, False) == "stopped"
    assert vm_state("not running", True) == "suspended"
    assert vm_state("running", False) == "running"
    assert vm_state("running", True) == "resuming"  # the helper has not dropped devstate yet
    assert vm_state("inmigrate", True) == "resuming"
    assert vm_state("paused", False) == "paused"
    assert vm_state("unreachable (no QMP)", False) == "unreachable"


def test_describe_counts_ram_devstate_and_tap_queues():
    entries = [
        {"name": "ram0", "type": "memfd-hugetlb", "size": 2 << 20},
        {"name": "ram1", "type": "memfd-hugetlb", "size": 4 << 20},
        {"name": "devstate", "type": "memfd", "size": 300 << 10},
        {"name": "tap0.0", "type": "tap", "size": 0, "extra": {"net": {"ifname": "tap0"}}},
        {"name": "tap0.1", "type": "tap", "size": 0, "extra": {"net": {"ifname": "tap0"}}},
        {"name": "other", "type": "tap", "size": 0},
        {"name": "notes", "type": "memfd", "size": 1},
    ]
    r = fleet.describe("vm1", "sealed", entries, None)
    assert r == {"vm": "vm1", "state": "suspended", "qemu": "not running", "pid": None, "box": "sealed",
                 "ram_bytes": 6 << 20, "ram": ["ram0", "ram1"], "ram_type": ["memfd-hugetlb"],
                 "taps": [{"ifname": "other", "queues": 1}, {"ifname": "tap0", "queues": 2}],
                 "devstate_bytes": 300 << 10}


def test_qemu_processes_found_by_their_qmp_argument(tmp_path):
    run = tmp_path / "run"
    other = tmp_path / "elsewhere"
    script = "import time; time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", script, "-qmp", f"unix:{d}/{n}.qmp,server=on,wait=off"])
             for d, n in ((run, "vm1"), (run, "vm2"), (other, "vm3"))]
    try:
        found = fleet.qemu_processes(str(run))
        assert found == {"vm1": procs[0].pid, "vm2": procs[1].pid}
        assert fleet.running_vms(str(run)) == found  # no sockets: found by command line alone
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_suspend_many_checks_every_name_first(tmp_path):
    with pytest.raises(FdboxError) as e:
        fleet.suspend_many(["vm1", "no/slash"], socket_path=str(tmp_path / "none.sock"), run_dir=str(tmp_path))
    assert e.value.name == "InvalidName"
    assert fleet.suspend_many([], socket_path=None, run_dir=str(tmp_path)) == []


def test_suspend_all_with_nothing_running(tmp_path, capsys):
    (tmp_path / "stale.qmp").write_text("")  # not a socket anyone listens on
    assert cli.main(["--run-dir", str(tmp_path), "--socket", str(tmp_path / "x.sock"), "suspend", "--all"]) == 0
    assert capsys.readouterr().out == "no VM running\n"


@pytest.mark.parametrize("argv", [["suspend"], ["suspend", "--all", "vm1"]])
def test_suspend_wants_names_or_all(argv, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["--run-dir", str(tmp_path), *argv])
    assert e.value.code == 2


def test_qemu_processes_of_another_user_do_not_count(tmp_path):
    """Issue 25 item 8: anyone can put ``-qmp unix:RUN_DIR/X.qmp`` on a command line. A
    process of another uid faking it is no VM of this run dir (else any local user could
    fail every ``suspend --all``, and so every kexec); the run dir owner's own does count."""
    from fdboxtest import run_as_user

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    fake = ["/bin/sh", "-c", "sleep 60; exit 0", "qemu", "-qmp", f"unix:{run}/victim.qmp,server=on,wait=off"]
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another uid")
    got = run_as_user(65534, lambda: subprocess.Popen(fake, stdin=subprocess.DEVNULL).pid)
    assert "ok" in got, got
    other = int(got["ok"])
    mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-qmp",
                             f"unix:{run}/mine.qmp,server=on,wait=off"])
    try:
        assert wait_for(lambda: os.path.exists(f"/proc/{other}") and b"-qmp" in open(f"/proc/{other}/cmdline", "rb").read(), 10)
        assert os.stat(f"/proc/{other}").st_uid == 65534
        # Until its exec, /proc/PID/cmdline of ``mine`` is still pytest's: wait for it too
        # (the other's is in already, so an answer counting it never equals this).
        assert wait_for(lambda: fleet.qemu_processes(str(run)) == {"mine": mine.pid}, 10), \
            fleet.qemu_processes(str(run))
        assert fleet.running_vms(str(run)) == {"mine": mine.pid}
    finally:
        mine.kill()
        mine.wait()
        try:
            os.kill(other, signal.SIGKILL)
        except ProcessLookupError:
            pass
