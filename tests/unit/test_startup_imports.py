"""The daemon imports only what its backend and front-ends need (issue 18: the restore
after a kexec waits for fdboxd's start, and every import is on that path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from fdboxd.client import Client
from fdboxd.errors import FdboxError

REPO = Path(__file__).resolve().parents[2]

NOT_AT_START = ("importlib.metadata", "dbus_fast", "pyroute2", "email", "zipfile", "csv")
"""Modules a start without --bus or taps must not load: the optional front-ends'
packages, and importlib.metadata (with email/zipfile/csv behind it), which only the
--bus/--allow-type tap version checks read."""


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_importing_the_daemon_loads_no_optional_dependency():
    baseline = _modules_after("pass")  # site's own imports (an editable install's finder...)
    loaded = _modules_after("import fdboxd.daemon") - baseline
    assert "fdboxd.daemon" in loaded
    bad = sorted(m for m in loaded if m.split(".")[0] in NOT_AT_START or m in NOT_AT_START)
    assert not bad, f"imported at start: {bad}"


def test_fdbox_qemu_loads_neither_the_store_nor_net():
    """fdbox-qemu suspend/start run on the blackout path: the client and QMP only (taps
    load fdboxd.net when a start creates one)."""
    baseline = _modules_after("pass")
    loaded = _modules_after("import fdboxd.qemu.cli, fdboxd.qemu.fleet") - baseline
    assert {"fdboxd.qemu.fleet", "fdboxd.qemu.qmp", "fdboxd.client"} <= loaded
    bad = sorted(m for m in loaded if m in ("fdboxd.net", "fdboxd.store", "fdboxd.daemon", "asyncio")
                 or m.split(".")[0] in NOT_AT_START)
    assert not bad, f"fdbox-qemu imports: {bad}"


def test_fdbox_qemu_start_imports_only_what_comes_before_the_exec():
    """`start` runs once per VM on the resume path and then execs QEMU: before the exec it
    needs the client, not fleet's threads (suspend/status of many VMs), nor the QMP client
    and sd_notify (the helper imports those after its fork, while QEMU starts), nor the
    standard modules of START_NEVER."""
    baseline = _modules_after("pass")
    loaded = _modules_after("import fdboxd.qemu.cli") - baseline
    assert {"fdboxd.qemu.vm", "fdboxd.client"} <= loaded
    late = sorted(m for m in loaded if m in ("fdboxd.qemu.fleet", "fdboxd.qemu.qmp", "fdboxd.sdnotify")
                  or m.startswith("concurrent") or m in START_NEVER)
    assert not late, f"imported before QEMU's exec: {late}"


START_NEVER = ("dataclasses", "inspect", "logging", "traceback")
"""Standard modules `start` does without (bench/vmm_start.py, docs/internals.md): dataclasses
(with inspect, ast, dis behind it) and logging were a third of its imports' time."""


def test_the_version_check_still_reads_metadata_when_asked():
    from fdboxd import deps
    # dbus-fast is a test dependency here, so its version is read for real.
    assert deps.DBUS.problem() is None


BACKENDS_NOT_CHOSEN = ("fdboxd.backends.liveupdate", "fdboxd.backends.luo_holder", "fdboxd.backends.kernel",
                       "fdboxd.uapi", "fdboxd.uapi_luo", "ctypes", "fdboxd.dbus", "fdboxd.net")
"""What a daemon on the memory backend without --bus or taps never needs: the other
backends (with ctypes behind their uAPI mirrors) and the optional front-ends."""

_RECORD_AT_EXIT = """
import atexit, runpy, sys
record = sys.argv.pop(1)
atexit.register(lambda: open(record, "w").write("\\n".join(sorted(sys.modules))))
sys.argv[0] = "fdboxd"
runpy.run_module("fdboxd", run_name="__main__")
"""


def test_a_daemon_on_the_memory_backend_loads_no_other_backend(tmp_path):
    """A real start, through the first answer and SIGTERM, not just the import: what
    main() imports on the way (backend choice, front-ends) is on the restore path too."""
    sock, record = tmp_path / "fdboxd.sock", tmp_path / "modules"
    proc = subprocess.Popen([sys.executable, "-c", _RECORD_AT_EXIT, str(record), "--backend", "memory",
                             "--socket", str(sock), "--state-dir", str(tmp_path / "state")],
                            cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(str(sock)) as c:
                    c.call("io.fdbox.Store.Status")
                break
            except FdboxError:  # not listening yet
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.02)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    loaded = set(record.read_text().split()) - _modules_after("import runpy")
    assert "fdboxd.backends.memory" in loaded, err
    bad = sorted(m for m in loaded if m in BACKENDS_NOT_CHOSEN or m.split(".")[0] in NOT_AT_START)
    assert not bad, f"a memory-backend daemon imported: {bad}"
