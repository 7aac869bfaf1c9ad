"""One fdboxd per state directory (issue 25, item 16).

A second daemon started by hand on the state directory of a running one must refuse
before it reads or writes anything: before the lock it reconciled the manifest against
its own empty backend, recorded every entry as lost, emptied the journal and only then
found the socket taken, so Puts acknowledged afterwards vanished at the next restart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from fdboxtest import REPO, DaemonProcess, make_runtime_dir, memfd_with



def _state_files(state_dir: str) -> dict[str, bytes]:
    """Every file of the state directory but the lock, with its bytes."""
    out = {}
    for p in sorted(Path(state_dir).iterdir()):
        if p.is_file() and p.name != "fdboxd.lock":
            out[p.name] = p.read_bytes()
    return out


def test_a_second_daemon_on_the_same_state_dir_refuses_and_changes_nothing(daemon_factory):
    first = daemon_factory()
    with first.client() as c:
        for name in ("ram0", "devstate"):
            fd = memfd_with(name.encode() * 100)
            c.put("vm1", name, fd)
            os.close(fd)
    before = _state_files(first.state_dir)
    assert before, "the first daemon wrote its manifest"

    rt = make_runtime_dir()  # its own socket: only the state directory is shared
    second = DaemonProcess(rt, state_dir=Path(first.state_dir))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(second.command(), env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _out, raw = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, raw = proc.communicate()
    finally:
        shutil.rmtree(rt, ignore_errors=True)
    err = raw.decode()
    assert proc.returncode == 1, f"the second daemon did not refuse (exit {proc.returncode}):\n{err}"
    assert f"another fdboxd (pid {first.pid}) is running on the state directory {first.state_dir}" in err, err
    assert "nothing changed" in err
    assert not os.path.exists(second.socket)
    assert _state_files(first.state_dir) == before

    # The first keeps working, and what it acknowledges now survives its restart.
    with first.client() as c:
        fd = memfd_with(b"after the second one tried")
        c.put("vm1", "ram1", fd)
        os.close(fd)
    first.restart()
    with first.client() as c:
        st = c.status()
    # The memory backend's fds die with the process (no systemd here): every entry is
    # reported lost by name, the one put after the second daemon tried included: its
    # journal line went to the live journal, not to one the second daemon had deleted.
    assert sorted(r["name"] for r in st["lost"] if r["box"] == "vm1") == ["devstate", "ram0", "ram1"], st
