"""Issue 13, local users: no squatting of the user daemon's directory, no fds to a
server that is neither root nor us, no name oracle, own counts only, losses kept for
their owner until acknowledged, stale temp files removed at start."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fdboxtest import memfd_with, run_as_user

# Imported here: a child that dropped to another uid cannot read the interpreter's
# library under /root any more, so everything the daemon and fdboxctl load comes first.
import asyncio.unix_events  # noqa: E402,F401
import contextlib  # noqa: E402
import fnmatch  # noqa: E402,F401
import io  # noqa: E402
import logging  # noqa: E402
import pwd  # noqa: E402,F401
import resource  # noqa: E402,F401
import traceback  # noqa: E402

from fdboxd import ctl, daemon, net, systemd  # noqa: E402,F401
from fdboxd.backends import memory  # noqa: E402,F401
from fdboxd.client import Client  # noqa: E402
from fdboxd.errors import FdboxError  # noqa: E402

OTHER = 65534
THIRD = 65533
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")


def _as(uid: int):  # type: ignore[no-untyped-def]
    def drop() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    return drop


class _UserDaemon:
    """``fdboxd --user`` as another uid, in a forked child (that uid cannot exec the
    interpreter under /root): the child drops to ``uid`` and calls ``daemon.main``."""

    def __init__(self, uid: int, env: dict[str, str], state: str, *args: str) -> None:
        fd, self.log = tempfile.mkstemp(prefix="fdboxd-user-", suffix=".log")
        self.pid = os.fork()
        if self.pid == 0:
            rc = 1
            try:
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = sys.stderr = os.fdopen(2, "w", buffering=1)
                for h in list(logging.getLogger().handlers):  # pytest's capture handler
                    logging.getLogger().removeHandler(h)
                for k in ("XDG_RUNTIME_DIR", "NOTIFY_SOCKET", "LISTEN_FDS", "FDBOX_SOCKET"):
                    os.environ.pop(k, None)
                os.environ.update(env)
                _as(uid)()
                rc = daemon.main(["--user", "--state-dir", state, *args])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(rc)
        os.close(fd)
        self.rc: int | None = None

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.rc is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.rc = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                raise TimeoutError(self.output())
            else:
                time.sleep(0.05)
        return self.rc

    def running(self) -> bool:
        return self.rc is None and os.waitpid(self.pid, os.WNOHANG) == (0, 0)

    def stop(self) -> None:
        if self.rc is None:
            os.kill(self.pid, 15)
            self.wait()

    def output(self) -> bytes:
        return Path(self.log).read_bytes()


def _private_tmp(uid: int) -> str:
    d = tempfile.mkdtemp(prefix="fdbox-hu-")
    os.chown(d, uid, uid)
    return d


def test_user_daemon_refuses_a_runtime_dir_another_user_made(tmp_path):
    squat = Path(f"/tmp/fdbox-{OTHER}")
    if squat.exists() or squat.is_symlink():
        pytest.skip(f"{squat} exists on this host")
    squat.mkdir(mode=0o777)
    os.chown(squat, THIRD, THIRD)  # the attacker made it first
    state = _private_tmp(OTHER)
    try:
        p = _UserDaemon(OTHER, {}, state)
        assert p.wait() != 0
        out = p.output()
        assert b"refusing to use /tmp/fdbox-65534" in out and b"belongs to uid 65533" in out, out
        assert not (squat / "fdboxd.sock").exists()
        squat.rmdir()
        squat.symlink_to(tempfile.gettempdir())  # a symlink is refused too
        p = _UserDaemon(OTHER, {}, state)
        assert p.wait() != 0 and b"symbolic link" in p.output(), p.output()
    finally:
        if squat.is_symlink():
            squat.unlink()
        elif squat.exists():
            shutil.rmtree(squat)
        shutil.rmtree(state, ignore_errors=True)


def test_user_daemon_makes_its_dir_0700_and_socket_0600_and_serves_only_its_user():
    rt, state = _private_tmp(OTHER), _private_tmp(OTHER)
    p = _UserDaemon(OTHER, {"XDG_RUNTIME_DIR": rt}, state)
    sock = Path(rt) / "fdbox" / "fdboxd.sock"
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert p.running() and time.monotonic() < deadline, p.output()
            time.sleep(0.05)
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

        def own() -> str:
            with Client(str(sock)) as c:
                return c.status()["backend"]

        assert run_as_user(OTHER, own)["ok"] == "memory"
        with pytest.raises(FdboxError) as e:  # even root: a user daemon holds one user's files
            with Client(str(sock)) as c:
                c.status()
        assert e.value.name == "PermissionDenied"
    finally:
        p.stop()
        shutil.rmtree(rt, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def test_client_sends_no_fd_to_a_server_that_is_neither_root_nor_itself():
    d = tempfile.mkdtemp(prefix="fdbox-fake-")
    os.chmod(d, 0o777)
    path = os.path.join(d, "fdboxd.sock")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the attacker's fake fdboxd
        try:
            os.close(r)
            _as(THIRD)()
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            os.chmod(path, 0o666)
            srv.listen(1)
            os.write(w, b"L")
            srv.settimeout(10)
            conn, _ = srv.accept()
            conn.settimeout(3)
            got = 0
            try:
                while True:
                    data, anc, _f, _a = conn.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
                    got += sum(len(a[2]) // 4 for a in anc)
                    if not data:
                        break
            except OSError:
                pass
            os.write(w, str(got).encode())
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"L"

    def victim() -> str:
        fd = memfd_with(b"victim's guest memory")
        try:
            with Client(path, timeout=5) as c:
                c.put("vm", "ram0", fd)
            return "sent"
        finally:
            os.close(fd)

    try:
        res = run_as_user(OTHER, victim)
        assert res.get("error") == "PermissionDenied" and "65533" in res["message"], res
        assert os.read(r, 16) == b"0"  # the fake server got not a single fd
    finally:
        os.waitpid(pid, 0)
        os.close(r)
        shutil.rmtree(d, ignore_errors=True)


def test_no_name_oracle_for_other_users(daemon, client):
    fd = memfd_with(b"root")
    client.put("rootvm", "ram0", fd)
    os.close(fd)

    def probe() -> dict:
        out = {}
        with Client(daemon.socket) as c:
            for box in ("rootvm", "novm"):
                for op, fn in (("get", lambda: c.get(box, "ram0")), ("remove", lambda: c.remove(box, "ram0")),
                               ("list", lambda: c.list(box)), ("get_box", lambda: c.get_box(box)),
                               ("delete_box", lambda: c.delete_box(box)), ("seal", lambda: c.seal(box)),
                               ("unseal", lambda: c.unseal(box)), ("finish", lambda: c.finish(box))):
                    try:
                        fn()
                        out[f"{op} {box}"] = "ok"
                    except FdboxError as e:
                        out[f"{op} {box}"] = [e.name, e.message]
            st = c.status()
            out["status"] = [st["boxes"], st["entries"]]
        return out

    res = run_as_user(OTHER, probe)["ok"]
    for op in ("get", "remove", "list", "get_box", "delete_box", "seal", "unseal", "finish"):
        assert res[f"{op} rootvm"] == [x.replace("novm", "rootvm") if isinstance(x, str) else x
                                       for x in res[f"{op} novm"]], (op, res)
        assert res[f"{op} rootvm"][0] == "NotFound", (op, res)
    assert res["status"] == [0, 0]


def test_status_shows_the_callers_usage(daemon, client):
    def mine() -> dict:
        with Client(daemon.socket) as c, Client(daemon.socket) as c2:
            c2.status()
            fd = memfd_with(b"x" * 100)
            c.put("uvm", "ram0", fd)
            os.close(fd)
            return c.status()["usage"]

    u = run_as_user(OTHER, mine)["ok"]
    assert u == {"boxes": 1, "entries": 1, "bytes": 100, "connections": 2, "fds_in_flight": 0}, u
    assert client.status()["limits"]["max_boxes_per_uid"] == 64


def test_lost_entries_are_shown_to_their_owner_until_acknowledged(daemon, client):
    def put() -> None:
        with Client(daemon.socket) as c:
            fd = memfd_with(b"ram")
            c.put("uservm", "ram0", fd)
            os.close(fd)

    run_as_user(OTHER, put)
    daemon.kill()  # SIGKILL: the memory backend's fds die with it
    daemon.start()
    daemon.restart()  # and a second restart does not forget

    def look() -> dict:
        with Client(daemon.socket) as c:
            return {"lost": [(r["box"], r["name"]) for r in c.status()["lost"]],
                    "boxes": [b["name"] for b in c.list()["boxes"]]}

    assert run_as_user(OTHER, look)["ok"] == {"lost": [["uservm", "ram0"]], "boxes": ["uservm"]}
    assert run_as_user(THIRD, look)["ok"] == {"lost": [], "boxes": []}

    def squat() -> None:
        with Client(daemon.socket) as c:
            fd = memfd_with(b"evil")
            c.put("uservm", "ram0", fd)

    assert run_as_user(THIRD, squat)["error"] == "PermissionDenied"  # the VM's name stays its owner's
    def ack() -> str:  # fdboxctl ack-lost, as that user
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert ctl.main(["--socket", daemon.socket, "ack-lost"]) == 0
        return out.getvalue()

    assert "acknowledged 1" in run_as_user(OTHER, ack)["ok"]
    assert run_as_user(OTHER, look)["ok"]["lost"] == []


def test_stale_manifest_temp_files_are_removed_at_start(daemon_factory, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    for name in (".manifest.json.4242.tmp", ".manifest.json.77.compact.tmp"):
        (state / name).write_text("{half")
    daemon_factory(state_dir=state)
    assert sorted(p.name for p in state.iterdir() if p.name.endswith(".tmp")) == []
