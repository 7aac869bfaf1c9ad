"""Backend problems are never silent: each is one line in Status (issue 21, section 4).

The EBUSY path itself (another process holding /dev/liveupdate, the bounded retry)
needs a kernel with LUO and is tested in the VM tier (tests/vm/test_luo.py, stage 3);
here, with real processes and devices of this host: who holds a device is found in
/proc, and ``auto`` falling back from LUO says so in Status.
"""

from __future__ import annotations

import os
import subprocess

from fdboxd.backends import open_backend
from fdboxd.backends.liveupdate import busy_reason, device_holders
from fdboxd.manifest import Manifest
from fdboxd.model import Caller
from fdboxd.store import Store


def test_device_holders_names_the_other_process_not_us():
    mine = os.open("/dev/zero", os.O_RDONLY)
    try:
        with open("/dev/zero", "rb") as dev:
            p = subprocess.Popen(["sleep", "30"], stdin=dev)
        try:
            held = device_holders("/dev/zero")
            assert f"pid {p.pid} (sleep)" in held, held
            assert not any(h.startswith(f"pid {os.getpid()} ") for h in held), held
            assert f"pid {p.pid} (sleep)" in busy_reason("/dev/zero")
        finally:
            p.kill()
            p.wait()
        assert f"pid {p.pid} (sleep)" not in device_holders("/dev/zero")
    finally:
        os.close(mine)


def test_no_visible_holder_still_gives_one_line(tmp_path):
    reason = busy_reason(str(tmp_path / "no-such-device"))
    assert "held by another process" in reason and "\n" not in reason


def test_auto_without_luo_says_why_in_status(tmp_path):
    """A /dev/liveupdate that is not LUO (here /dev/null: every ioctl is ENOTTY): auto
    falls back to the memory backend, and Status carries the reason, for root and users."""
    backend = open_backend("auto", device=str(tmp_path / "no-fdbox"), luo_device="/dev/null")
    store = Store(backend, Manifest(tmp_path / "state"))
    problems = store.status()["problems"]
    assert store.status()["backend"] == "memory"
    assert len(problems) == 1 and problems[0].startswith("LUO not used: "), problems
    assert "\n" not in problems[0]
    assert store.status(Caller(uid=1000, gid=1000, pid=1))["problems"] == problems


def test_a_working_backend_has_no_problems(tmp_path):
    store = Store(open_backend("memory"), Manifest(tmp_path / "state"))
    assert store.status()["problems"] == []
