"""The durability promise (README, "What a crash costs"), proven with SIGKILL.

Every change the daemon acknowledged is in the manifest's journal before the reply is
sent, with one ``write()`` and no fsync: a daemon killed right after a reply loses
nothing the promise covers. The memory backend's fds die with the daemon, so the
restarted daemon reports exactly the acknowledged entries as lost, with the owners and
metadata the journal kept; a torn last journal line is ignored, not fatal.
"""

from __future__ import annotations

import json
import os

from fdboxtest import memfd_with

from fdboxd.manifest import FILENAME, JOURNAL, Manifest


def _changes(c) -> None:  # type: ignore[no-untyped-def]
    fd = memfd_with(b"guest ram")
    try:
        c.put("vm1", "ram0", fd, {"slot": "0"})
        c.put("vm1", "ram1", fd, {"slot": "1"})
        c.put_many("vm2", [("a", fd), ("b", fd, {"k": "v"})])
        c.put("vm3", "gone", fd)
        c.remove("vm1", "ram1")
        c.delete_box("vm3")
        c.put("vm1", "last", fd, {"acked": "yes"})  # the daemon is killed right after this reply
    finally:
        os.close(fd)


def test_sigkill_right_after_a_reply_loses_no_acknowledged_change(daemon):
    with daemon.client() as c:
        _changes(c)
        daemon.kill()  # SIGKILL: no shutdown code runs
    data = Manifest(daemon.state_dir).load()
    assert {b: set(box.entries) for b, box in data.boxes.items()} == {"vm1": {"ram0", "last"}, "vm2": {"a", "b"}}
    assert data.boxes["vm1"].entries["last"].metadata == {"acked": "yes"}
    assert data.boxes["vm2"].entries["b"].metadata == {"k": "v"}
    assert data.boxes["vm1"].entries["ram0"].uid == os.getuid()
    # The journal, not a rewritten snapshot, holds them: nothing was compacted or fsynced.
    assert os.path.getsize(os.path.join(daemon.state_dir, JOURNAL)) > 0

    daemon.start()
    with daemon.client() as c:
        st = c.status()
    # The memory backend's fds died with the process: the journal knew every one of them.
    assert sorted((x["box"], x["name"]) for x in st["lost"]) == [
        ("vm1", "last"), ("vm1", "ram0"), ("vm2", "a"), ("vm2", "b")]
    # Start-up folded the journal into a fresh snapshot: the emptied boxes stay their
    # owner's and the losses are recorded until acknowledged.
    snap = json.loads(open(os.path.join(daemon.state_dir, FILENAME)).read())
    assert {n: b["entries"] for n, b in snap["boxes"].items()} == {"vm1": {}, "vm2": {}}
    assert len(snap["lost"]) == 4


def test_a_torn_last_journal_line_is_ignored_not_fatal(daemon):
    with daemon.client() as c:
        _changes(c)
        daemon.kill()
    journal = os.path.join(daemon.state_dir, JOURNAL)
    with open(journal, "ab") as f:
        f.write(b'{"g": 99, "ops": [["rm", "vm1", "ram0"')  # a write cut short
    daemon.start()
    with daemon.client() as c:
        st = c.status()
    assert ("vm1", "ram0") in {(x["box"], x["name"]) for x in st["lost"]}  # the torn rm did not apply
    assert "torn last line" in daemon.log()


def _mount_tmpfs(path: str, size: str) -> bool:
    import subprocess
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "fdbox-test", path],
                          capture_output=True).returncode == 0


def test_seal_on_a_full_state_file_system_is_refused_and_changes_nothing(daemon_factory, tmp_path):
    """A seal writes the whole snapshot: a state file system that cannot take it refuses
    the seal (and so, under systemd, the kexec), even when a journal line would still fit
    in the journal's last page. The VM test test_failed_seal_aborts_kexec is the same
    rule under systemd; this is it on the host, with a real full tmpfs."""
    import subprocess

    import pytest

    from fdboxd.client import FdboxError

    state = str(tmp_path / "state")
    if not _mount_tmpfs(state, "256k"):
        if os.environ.get("CI"):
            pytest.fail("cannot mount a tmpfs (CI runs as root)")
        pytest.skip("cannot mount a tmpfs (not root?)")
    try:
        d = daemon_factory(state_dir=state)
        fd = memfd_with(b"guest ram")
        try:
            with d.client() as c:
                c.put("vm1", "ram0", fd, {"slot": "0"})
                filler = os.open(os.path.join(state, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
                try:  # fill it up, to the last block
                    while os.write(filler, b"\0" * 4096):
                        pass
                except OSError:
                    pass
                finally:
                    os.close(filler)
                with pytest.raises(FdboxError) as ei:
                    c.seal("vm1")
                assert ei.value.name == "BackendUnavailable"
                assert "manifest" in str(ei.value)
                assert c.list("vm1")["boxes"][0]["state"] == "open"
                _, got = c.get("vm1", "ram0")
                assert os.pread(got, 9, 0) == b"guest ram"
                os.close(got)
                os.unlink(os.path.join(state, "filler"))
                c.seal("vm1")  # room again: the same seal goes through
        finally:
            os.close(fd)
            d.stop(timeout=5)
    finally:
        subprocess.run(["umount", "-l", state], check=False)
