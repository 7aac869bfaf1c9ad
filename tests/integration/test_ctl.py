"""fdboxctl end to end: a real daemon, the real command line, fds passed by inheritance."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from fdboxtest import REPO, memfd_with, pattern

from fdboxd.errors import EXIT_CODES

# Run by the child that fdboxctl execs into: checks the systemd fd-passing variables.
CHECK_FDS = """
import hashlib, json, os, sys
n = int(os.environ["LISTEN_FDS"])
out = {"pid_ok": os.environ["LISTEN_PID"] == str(os.getpid()), "n": n,
       "names": os.environ["LISTEN_FDNAMES"].split(":"), "sha": []}
for fd in range(3, 3 + n):
    size = os.fstat(fd).st_size
    out["sha"].append(hashlib.sha256(os.pread(fd, size, 0)).hexdigest())
try:
    os.fstat(3 + n)
    out["extra_fd"] = True
except OSError:
    out["extra_fd"] = False
print(json.dumps(out))
"""


def ctl(daemon, *args: str, pass_fds: tuple[int, ...] = (), check: bool = False,
        socket: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FDBOX_SOCKET", None)
    p = subprocess.run(
        [sys.executable, "-m", "fdboxd.ctl", "--socket", socket or daemon.socket, *args],
        capture_output=True, text=True, timeout=30, pass_fds=pass_fds, env=env,
    )
    if check:
        assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
    return p


def put_memfd(daemon, box: str, name: str, data: bytes, *meta: str) -> subprocess.CompletedProcess[str]:
    fd = memfd_with(data, flags=0)
    try:
        extra = [a for m in meta for a in ("--meta", m)]
        return ctl(daemon, "put", box, name, "--fd", str(fd), *extra, pass_fds=(fd,), check=True)
    finally:
        os.close(fd)


def test_put_list_get_cmd(daemon):
    data = pattern(10000, seed=3)
    out = put_memfd(daemon, "vm1", "ram0", data, "slot=0", "node=1")
    assert "vm1/ram0: memfd" in out.stdout
    listing = json.loads(ctl(daemon, "list", "--json", check=True).stdout)
    (e,) = listing["entries"]
    assert (e["box"], e["name"], e["type"], e["size"]) == ("vm1", "ram0", "memfd", 10000)
    assert e["metadata"] == {"slot": "0", "node": "1"}
    assert json.loads(ctl(daemon, "--json", "list", "vm1", check=True).stdout) == listing
    table = ctl(daemon, "list", check=True).stdout.splitlines()
    assert table[0].split()[:4] == ["BOX", "NAME", "TYPE", "SIZE"]
    assert table[1].split()[:3] == ["vm1", "ram0", "memfd"]

    got = ctl(daemon, "get", "vm1", "ram0", "--", sys.executable, "-c", CHECK_FDS, check=True)
    res = json.loads(got.stdout)
    assert res == {"pid_ok": True, "n": 1, "names": ["ram0"], "extra_fd": False,
                   "sha": [hashlib.sha256(data).hexdigest()]}


def test_get_out_file_and_stdout(daemon, tmp_path):
    put_memfd(daemon, "vm1", "ram0", b"contents\n")
    ctl(daemon, "get", "vm1", "ram0", "--out", str(tmp_path / "copy"), check=True)
    assert (tmp_path / "copy").read_bytes() == b"contents\n"
    assert ctl(daemon, "get", "vm1", "ram0", "--out", "-", check=True).stdout == "contents\n"


def test_get_box_cmd_gets_all_fds_in_order(daemon):
    datas = {f"slot{i}": pattern(4096 + i, seed=i) for i in range(5)}
    for name, data in datas.items():
        put_memfd(daemon, "vm2", name, data)
    res = json.loads(ctl(daemon, "get-box", "vm2", "--", sys.executable, "-c", CHECK_FDS, check=True).stdout)
    assert res["pid_ok"] and res["n"] == 5 and not res["extra_fd"]
    assert res["names"] == sorted(datas)
    assert res["sha"] == [hashlib.sha256(datas[n]).hexdigest() for n in res["names"]]


def test_put_from_file(daemon):
    fd = memfd_with(b"by path", flags=0)
    try:
        # /proc/PID/fd/N of a memfd opens the memfd itself: still a memfd.
        ctl(daemon, "put", "vm1", "bypath", "--file", f"/proc/{os.getpid()}/fd/{fd}", check=True)
    finally:
        os.close(fd)
    assert ctl(daemon, "get", "vm1", "bypath", "--out", "-", check=True).stdout == "by path"


def test_status_seal_unseal_finish_rm_delete(daemon):
    put_memfd(daemon, "vm1", "ram0", b"x")
    st = json.loads(ctl(daemon, "status", "--json", check=True).stdout)
    assert (st["backend"], st["entries"], st["state"]) == ("memory", 1, "open")
    assert "backend memory" in ctl(daemon, "status", check=True).stdout
    assert ctl(daemon, "seal", "vm1", check=True).stdout.strip() == "sealed vm1"
    assert json.loads(ctl(daemon, "status", "--json", check=True).stdout)["state"] == "sealed"
    assert ctl(daemon, "rm", "vm1", "ram0").returncode == EXIT_CODES["Sealed"]
    ctl(daemon, "unseal", "vm1", check=True)
    assert ctl(daemon, "unseal", "vm1").returncode == EXIT_CODES["NotSealed"]
    assert json.loads(ctl(daemon, "seal", "--all", "--json", check=True).stdout) == {"sealed": ["vm1"]}
    ctl(daemon, "unseal", "vm1", check=True)
    assert ctl(daemon, "finish", "vm1").returncode == EXIT_CODES["InvalidRequest"]  # not restored
    assert json.loads(ctl(daemon, "finish", "--json", check=True).stdout) == {"finished": []}
    ctl(daemon, "rm", "vm1", "ram0", check=True)
    ctl(daemon, "delete-box", "vm1", check=True)
    assert json.loads(ctl(daemon, "list", "--json", check=True).stdout) == {"entries": [], "boxes": []}


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("get", "nobox", "x", "--", "true"), EXIT_CODES["NotFound"]),
        (("rm", "nobox", "x"), EXIT_CODES["NotFound"]),
        (("list", "bad/box"), EXIT_CODES["InvalidName"]),
        (("delete-box", "nobox"), EXIT_CODES["NotFound"]),
        (("put", "vm", "x", "--fd", "0"), EXIT_CODES["UnsupportedType"]),  # stdin: /dev/null
        # A bad command line found after parsing is a bad command line too (2, nothing sent).
        (("put", "vm", "x", "--fd", "999"), 2),
        (("put", "vm", "x", "--meta", "novalue", "--fd", "0"), 2),
        (("get", "vm", "x"), 2),
        (("seal",), 2),
        (("bogus",), 2),
    ],
)
def test_exit_codes(shared_daemon, args, code):
    p = ctl(shared_daemon, *args)
    assert p.returncode == code, (p.stdout, p.stderr)
    assert p.stderr


def test_exit_code_when_daemon_is_absent(daemon, tmp_path):
    p = ctl(daemon, "status", socket=str(tmp_path / "none.sock"))
    assert p.returncode == EXIT_CODES["BackendUnavailable"]
    assert "BackendUnavailable" in p.stderr


def test_get_cmd_exit_status_is_the_commands(daemon):
    put_memfd(daemon, "vm1", "ram0", b"x")
    assert ctl(daemon, "get", "vm1", "ram0", "--", "sh", "-c", "exit 7").returncode == 7
    assert ctl(daemon, "get", "vm1", "ram0", "--", "/nonexistent/cmd").returncode == 127


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="console_scripts")}
    if "fdboxctl" not in eps:
        pytest.skip("fdboxd is not installed (running from a checkout)")
    assert eps["fdboxctl"] == "fdboxd.ctl:main"


@pytest.mark.skipif(shutil.which("varlinkctl") is None, reason="varlinkctl not installed (systemd < 255)")
def test_varlinkctl_introspects(daemon):
    out = subprocess.run(["varlinkctl", "introspect", f"unix:{daemon.socket}", "io.fdbox.Store"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "method Put(" in out.stdout
    info = subprocess.run(["varlinkctl", "info", f"unix:{daemon.socket}"], capture_output=True, text=True, timeout=30)
    assert info.returncode == 0 and "io.fdbox.Store" in info.stdout


def test_seal_shows_progress_and_records_checksums(daemon):
    datas = [pattern(3 << 20, seed=i) for i in range(3)]
    for i, data in enumerate(datas):
        put_memfd(daemon, "big", f"ram{i}", data)
    p = ctl(daemon, "seal", "big", check=True)
    assert p.stdout.strip() == "sealed big"
    lines = [line for line in p.stderr.splitlines() if line.startswith("sealing big/")]
    # entries are hashed in parallel threads: each shows up, in any order
    assert sorted({line.split(":")[0] for line in lines}) == ["sealing big/ram0", "sealing big/ram1", "sealing big/ram2"]
    assert lines[-1].endswith("9.0/9.0 MiB checksummed (100%)")
    listed = json.loads(ctl(daemon, "--json", "list", "big", check=True).stdout)["entries"]
    assert [e["sha256"] for e in listed] == [hashlib.sha256(d).hexdigest() for d in datas]
    # --json: no progress chatter, for scripts
    ctl(daemon, "unseal", "big", check=True)
    p = ctl(daemon, "--json", "seal", "big", check=True)
    assert json.loads(p.stdout) == {"sealed": ["big"]} and p.stderr == ""
