"""Nothing lost when something fails (issue 25, the store's items), through a real fdboxd.

Each test makes one step fail on purpose (a failpoint, ``FDBOX_FAILPOINTS``, or the exact
on-disk state a crash leaves) and checks what an operator relies on: a transient error
never deletes, a failed journal write changes nothing, a crash between two writes of the
manifest replays nothing stale.

Live-update cases run the real daemon on a stand-in kexec-capable backend
(tests/standin_kernel.py: sealed boxes kept in a directory, "the next kernel" with
``FDBOX_TEST_KEXEC=1``), since this host has neither fdbox.ko nor /dev/liveupdate.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fdboxtest import REPO, DaemonProcess, make_runtime_dir, memfd_with, pattern, sha256_of_fd, wait_for

from fdboxd.errors import FdboxError
from fdboxd.manifest import FILENAME, JOURNAL


class StandinDaemon(DaemonProcess):
    """fdboxd on tests/standin_kernel.py's ImageBackend; the image outlives the process."""

    def __init__(self, runtime_dir: Path, image: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(runtime_dir, (), env)
        self.image = image

    def command(self) -> list[str]:
        return [sys.executable, str(REPO / "tests" / "standin_kernel.py"), str(self.image),
                "--socket", self.socket, "--state-dir", self.state_dir, "--log-level", "debug"]

    def with_env(self, **env: str) -> StandinDaemon:
        """The next start's environment: these variables only (FDBOX_FAILPOINTS, FDBOX_TEST_KEXEC)."""
        self.env = dict(env)
        return self


@pytest.fixture
def standin() -> Iterator[StandinDaemon]:
    rt = make_runtime_dir()
    d = StandinDaemon(rt, rt / "image")
    yield d
    d.stop(timeout=5)
    shutil.rmtree(rt, ignore_errors=True)


def error_name(fn) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(FdboxError) as err:
        fn()
    return err.value.name


def put_and_seal(d: StandinDaemon, data: dict[str, bytes], box: str = "vm1") -> None:
    with d.client() as c:
        for name, payload in data.items():
            fd = memfd_with(payload)
            try:
                c.put(box, name, fd)
            finally:
                os.close(fd)
        assert c.seal(box) == [box]


def entries(c) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {f"{e['box']}/{e['name']}": e for e in c.list()["entries"]}


# ---------------------------------------------------------------------- item 4


def test_a_transient_error_restoring_an_entry_keeps_it_and_get_retries(standin):
    """ENOMEM making the restore memfd (a hugetlb pool not reserved yet) must not delete
    the VM's RAM: the entry stays restored, says why it is unchecked, and Get retries."""
    ram = pattern(1 << 20, seed=4)
    standin.start()
    put_and_seal(standin, {"ram0": ram, "devstate": b"dev" * 100})
    standin.stop()
    standin.with_env(FDBOX_TEST_KEXEC="1", FDBOX_FAILPOINTS="restore.verify_get=1*error(ENOMEM)").start()
    with standin.client() as c:
        st = c.status()
        assert st["lost"] == [], st["lost"]
        assert st["restored"] == 1
        listed = entries(c)
        assert set(listed) == {"vm1/ram0", "vm1/devstate"}
        unverified = [k for k, e in listed.items() if "unverified" in (e.get("extra") or {})]
        assert len(unverified) == 1, listed  # the one whose get failed, by name
        assert "Cannot allocate memory" in listed[unverified[0]]["extra"]["unverified"]
        assert any(unverified[0] in p for p in st["problems"]), st["problems"]
        box, name = unverified[0].split("/")
        entry, fd = c.get(box, name)  # the retry checks it, then hands it back
        try:
            assert sha256_of_fd(fd) == __import__("hashlib").sha256(ram if name == "ram0" else b"dev" * 100).hexdigest()
        finally:
            os.close(fd)
        assert "unverified" not in (entry.get("extra") or {})
        assert c.status()["lost"] == []
    assert "kept, not checked" in standin.log()


def test_a_checksum_mismatch_still_drops_the_entry(standin):
    """Only a proven mismatch drops: the image's bytes changed under the seal."""
    standin.start()
    put_and_seal(standin, {"ram0": pattern(1 << 16), "ram1": pattern(1 << 16, seed=1)})
    standin.stop()
    f = standin.image / "vm1" / "ram1"
    raw = bytearray(f.read_bytes())
    raw[100] ^= 0xFF
    f.write_bytes(bytes(raw))
    standin.with_env(FDBOX_TEST_KEXEC="1").start()
    with standin.client() as c:
        lost = c.status()["lost"]
        assert [(r["box"], r["name"]) for r in lost] == [("vm1", "ram1")]
        assert "mismatch" in lost[0]["reason"]
        assert set(entries(c)) == {"vm1/ram0"}


def test_a_transient_error_again_at_get_keeps_the_entry(standin):
    """A retry that fails the same way answers BackendUnavailable and still deletes nothing."""
    standin.start()
    put_and_seal(standin, {"ram0": pattern(1 << 16)})
    standin.stop()
    standin.with_env(FDBOX_TEST_KEXEC="1", FDBOX_FAILPOINTS="restore.verify_get=2*error(EAGAIN)").start()
    with standin.client() as c:
        assert error_name(lambda: c.get("vm1", "ram0")) == "BackendUnavailable"
        assert c.status()["lost"] == []
        entry, fd = c.get("vm1", "ram0")
        os.close(fd)
        assert "unverified" not in (entry.get("extra") or {})
