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
