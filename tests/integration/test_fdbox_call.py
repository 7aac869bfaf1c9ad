"""libexec/fdbox-call, the seal unit's C client, against a real fdboxd.

It replaces ``fdboxctl seal --all`` on the blackout path (no interpreter start), so it
must keep fdboxctl's contract: the same exit codes per error name, the server's
credentials checked before anything is sent, a clear exit for every bad command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from fdboxtest import REPO, build_libexec, memfd_with

from fdboxd.errors import ERROR_NAMES, EXIT_CODES


@pytest.fixture(scope="module")
def fdbox_call() -> Path:
    return build_libexec("fdbox-call")


def call(prog: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(prog), *args], capture_output=True, text=True, timeout=timeout)


def test_error_table_is_errors_py(fdbox_call):
    """The C table of error names is fdboxd/errors.py's, in order (exit code = 10 + index)."""
    src = (REPO / "libexec" / "fdbox-call.c").read_text()
    table = re.search(r"FDBOX_ERRORS\[\] = \{(.*?)\};", src, re.DOTALL)
    assert table, "no FDBOX_ERRORS table in fdbox-call.c"
    assert tuple(re.findall(r'"(\w+)"', table.group(1))) == ERROR_NAMES
    usage = call(fdbox_call, "--help").stdout
    for name, code in EXIT_CODES.items():
        assert f"{code} {name}" in usage


def test_seal_every_box_with_progress(fdbox_call, daemon):
    with daemon.client() as c:
        for box in ("vm1", "vm2"):
            fd = memfd_with(b"x" * 8192)
            c.put(box, "ram0", fd)
            os.close(fd)
        out = call(fdbox_call, "--socket", daemon.socket, "--more", "io.fdbox.Store.Seal")
        assert out.returncode == 0, out
        replies = [json.loads(line) for line in out.stdout.splitlines()]
        assert all(r.get("continues") is True for r in replies[:-1]) and "continues" not in replies[-1]
        assert {p["parameters"]["progress"]["box"] for p in replies[:-1]} == {"vm1", "vm2"}
        assert sorted(replies[-1]["parameters"]["sealed"]) == ["vm1", "vm2"]
        assert {b["name"]: b["state"] for b in c.list()["boxes"]} == {"vm1": "sealed", "vm2": "sealed"}


@pytest.mark.parametrize("method, params, error", [
    ("io.fdbox.Store.Seal", '{"box":"nope"}', "NotFound"),
    ("io.fdbox.Store.Unseal", '{"box":"vm1"}', "NotSealed"),
    ("io.fdbox.Store.Seal", '{"box":"bad name"}', "InvalidName"),
    ("io.fdbox.Store.Seal", '{"box":7}', "InvalidRequest"),
])
def test_error_replies_exit_like_fdboxctl(fdbox_call, daemon, method, params, error):
    with daemon.client() as c:
        fd = memfd_with(b"y")
        c.put("vm1", "a", fd)
        os.close(fd)
    out = call(fdbox_call, "--socket", daemon.socket, method, params)
    assert out.returncode == EXIT_CODES[error], out
    assert json.loads(out.stdout)["error"] == f"io.fdbox.Store.{error}"


def test_unknown_method_is_unexpected(fdbox_call, daemon):
    out = call(fdbox_call, "--socket", daemon.socket, "io.fdbox.Store.NoSuchMethod")
    assert out.returncode == 1 and "org.varlink.service.MethodNotFound" in out.stdout, out


@pytest.mark.parametrize("args", [
    [], ["--bogus", "io.fdbox.Store.Status"], ["io.fdbox.Store.Status", "{", ],
    ["io.fdbox.Store.Status", "[]"], ["io.fdbox.Store.Status", "{} x"], ['io"x', "{}"],
    ["io.fdbox.Store.Status", "{}", "extra"],
])
def test_bad_command_line_exits_2_and_sends_nothing(fdbox_call, tmp_path, args):
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    srv.settimeout(0.2)
    out = call(fdbox_call, "--socket", path, *args)
    assert out.returncode == 2, out
    with pytest.raises(TimeoutError):
        srv.accept()  # it never connected
    srv.close()


def _serve_once(srv: socket.socket, reply: bytes | None, got: list[bytes]) -> None:
    conn, _ = srv.accept()
    conn.settimeout(5)
    try:
        got.append(conn.recv(65536))
        if reply is not None:
            conn.sendall(reply)
    except OSError:
        pass
    conn.close()


@pytest.mark.parametrize("reply", [None, b'{"parameters":{', b"[1]\0", b'{"error":7}\0'])
def test_lost_connection_or_malformed_reply_exits_1(fdbox_call, tmp_path, reply):
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    got: list[bytes] = []
    t = threading.Thread(target=_serve_once, args=(srv, reply, got))
    t.start()
    out = call(fdbox_call, "--socket", path, "io.fdbox.Store.Status")
    t.join()
    srv.close()
    assert out.returncode == 1, out
    assert got and got[0] == b'{"method":"io.fdbox.Store.Status","parameters":{}}\0'


def test_server_of_another_uid_gets_nothing(fdbox_call):
    """A socket served by neither root nor the caller (a squatter) is refused before sending."""
    if os.getuid() != 0:
        pytest.skip("needs root to serve as another uid")
    d = Path(tempfile.mkdtemp(prefix="fdbox-squat-", dir="/tmp"))  # reachable by uid 65534
    os.chmod(d, 0o777)
    path = str(d / "s.sock")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the squatter: uid 65534, reports what it received
        try:
            os.close(r)
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            os.chmod(path, 0o777)
            srv.listen()
            os.write(w, b"ready\n")
            conn, _ = srv.accept()
            conn.settimeout(2)
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            os.write(w, b"got:" + data)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 6) == b"ready\n"
    out = call(fdbox_call, "--socket", path, "--more", "io.fdbox.Store.Seal")
    rest = b""
    while chunk := os.read(r, 65536):
        rest += chunk
    os.close(r)
    os.waitpid(pid, 0)
    shutil.rmtree(d, ignore_errors=True)
    assert out.returncode == 1 and "uid 65534" in out.stderr, out
    assert rest == b"got:", rest
