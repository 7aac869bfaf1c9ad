"""fdboxctl as an operator meets it: fds checked before connecting, files copied in and
streamed out, errors that say what is accepted, timeouts, help that explains itself."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

from fdboxtest import REPO, memfd_with, wait_for

from fdboxd.errors import EXIT_CODES


def ctl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fdboxd.ctl", *args]


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO)}
    e.pop("FDBOX_SOCKET", None)
    return e


def ctl(daemon, *args: str, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(ctl_cmd("--socket", daemon.socket, *args), capture_output=True, text=True,
                          timeout=60, env=env(), **kw)


def test_put_fd_that_is_not_open_is_refused_before_connecting(daemon_factory):
    """fd 3 is free: fdboxctl's own socket would take it. Even a daemon that takes
    "other" fds stores nothing."""
    d = daemon_factory("--allow-type", "other")
    out = ctl(d, "put", "vm1", "x", "--fd", "3", close_fds=True)
    assert out.returncode == 2, out
    assert "--fd 3" in out.stderr and "nothing was passed" in out.stderr
    with d.client() as c:
        assert c.list()["entries"] == []


def test_put_from_file_then_get_out_round_trip(daemon, tmp_path):
    src = tmp_path / "hostname"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one copy chunk, not a multiple of it
    src.write_bytes(data)
    out = ctl(daemon, "--json", "put", "vm1", "blob", "--from-file", str(src), "--meta", "from=test")
    assert out.returncode == 0, out.stderr
    with daemon.client() as c:
        entry = c.list("vm1")["entries"][0]
    assert entry["type"] == "memfd" and entry["size"] == len(data) and entry["metadata"] == {"from": "test"}
    dst = tmp_path / "out"
    out = ctl(daemon, "get", "vm1", "blob", "--out", str(dst))
    assert out.returncode == 0, out.stderr
    assert dst.read_bytes() == data
    assert dst.stat().st_mode & 0o777 == 0o600  # guest memory is nobody else's to read
    out = subprocess.run(ctl_cmd("--socket", daemon.socket, "get", "vm1", "blob", "--out", "-"),
                         capture_output=True, timeout=60, env=env())
    assert out.returncode == 0 and out.stdout == data


def test_put_from_file_that_cannot_be_read(daemon, tmp_path):
    out = ctl(daemon, "put", "vm1", "x", "--from-file", str(tmp_path / "missing"))
    assert out.returncode == 2 and "No such file" in out.stderr


def test_get_out_streams_a_large_entry(daemon):
    """256 MiB out through fdboxctl: its peak RSS stays far below the entry's size."""
    size = 256 << 20
    fd = memfd_with(b"head", flags=0)
    os.ftruncate(fd, size)
    os.pwrite(fd, b"tail", size - 4)
    try:
        with daemon.client() as c:
            c.put("big", "ram0", fd)
    finally:
        os.close(fd)
    # Peak RSS of fdboxctl itself: VmHWM of its own address space (the rusage of a
    # child forked from this big test process would count the fork's pages too).
    probe = ("import sys; from fdboxd import ctl; rc = ctl.main(sys.argv[1:]); "
             "sys.stderr.write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); sys.exit(rc)")
    with open(os.devnull, "wb") as null:
        out = subprocess.run([sys.executable, "-c", probe, "--socket", daemon.socket, "get", "big", "ram0",
                              "--out", "-"], stdout=null, stderr=subprocess.PIPE, text=True, env=env(), timeout=120)
    assert out.returncode == 0, out.stderr
    hwm_kib = int(out.stderr.split("VmHWM:")[1].split()[0])
    assert hwm_kib * 1024 < size // 4, f"peak RSS {hwm_kib} KiB for a {size >> 20} MiB entry"


def test_unsupported_type_lists_what_is_accepted(daemon, tmp_path):
    f = tmp_path / "plain"
    f.write_bytes(b"x")
    out = ctl(daemon, "put", "vm1", "x", "--file", str(f))
    assert out.returncode == EXIT_CODES["UnsupportedType"], out
    msg = out.stderr
    assert "files of type other are not accepted" in msg
    assert "takes guest_memfd, memfd, memfd-hugetlb" in msg and "--allow-type other|tap" in msg, msg


class SilentServer:
    """A socket that accepts and never answers: a daemon stuck in a long call."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_timeout_gives_up_with_exit_1(tmp_path):
    srv = SilentServer(str(tmp_path / "s"))
    try:
        out = subprocess.run(ctl_cmd("--socket", str(tmp_path / "s"), "--timeout", "0.5", "status"),
                             capture_output=True, text=True, timeout=60, env=env())
        assert out.returncode == 1 and "no reply from fdboxd within 0.5 s" in out.stderr, out
        # The option also goes after the subcommand.
        out = subprocess.run(ctl_cmd("--socket", str(tmp_path / "s"), "list", "--timeout", "0.3"),
                             capture_output=True, text=True, timeout=60, env=env())
        assert out.returncode == 1 and "0.3 s" in out.stderr, out
    finally:
        srv.close()


def test_seal_waits_without_a_client_timeout(tmp_path, monkeypatch):
    """The default: seal has no timeout (the unit's TimeoutStartSec= is the limit)."""
    from fdboxd import ctl as ctlmod

    seen = {}

    class Probe:
        def __init__(self, path: str, timeout: float | None = 60.0) -> None:
            seen["timeout"] = timeout

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def seal(self, box, progress=None):  # type: ignore[no-untyped-def]
            return []

        def status(self):  # type: ignore[no-untyped-def]
            return {"backend": "memory", "survives_kexec": False, "state": "open", "boxes": 0, "sealed": 0,
                    "restored": 0, "entries": 0}

    monkeypatch.setattr(ctlmod, "Client", Probe)
    assert ctlmod.main(["--socket", "x", "seal", "--all"]) == 0 and seen["timeout"] is None
    assert ctlmod.main(["--socket", "x", "status"]) == 0 and seen["timeout"] == ctlmod.DEFAULT_TIMEOUT
    assert ctlmod.main(["--socket", "x", "seal", "--all", "--timeout", "5"]) == 0 and seen["timeout"] == 5
    assert ctlmod.main(["--socket", "x", "--timeout", "0", "status"]) == 0 and seen["timeout"] is None


def test_seal_that_outlives_its_caller_is_logged(daemon):
    size = 512 << 20  # a few hundred ms of SHA-256: the caller is long gone
    fd = memfd_with(b"x", flags=0)
    os.ftruncate(fd, size)
    with daemon.client() as c:
        c.put("slow", "ram0", fd)
    os.close(fd)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket)
    s.sendall(b'{"method":"io.fdbox.Store.Seal","parameters":{"box":"slow"}}\0')
    s.close()
    assert wait_for(lambda: "Seal slow finished after its caller" in daemon.log(), 60), daemon.log()[-2000:]
    assert "left: done" in daemon.log()
    with daemon.client() as c:
        assert {b["name"]: b["state"] for b in c.list()["boxes"]}["slow"] == "sealed"


def test_help_explains_box_name_and_defaults():
    for sub in ("put", "get", "seal", "rm", "list"):
        out = subprocess.run(ctl_cmd(sub, "--help"), capture_output=True, text=True, env=env(), timeout=30)
        assert out.returncode == 0
        assert "BOX is a named group of entries" in out.stdout and "example:\n  fdboxctl " in out.stdout, sub
    top = subprocess.run(ctl_cmd("--help"), capture_output=True, text=True, env=env(), timeout=30).stdout
    assert "1 unexpected" in top and "2 bad command line" in top
    d = subprocess.run([sys.executable, "-m", "fdboxd", "--help"], capture_output=True, text=True,
                       env={**env(), "COLUMNS": "250"}, timeout=30).stdout  # one line per option
    # One block per option: its line and the help lines indented under it.
    blocks = {b.split()[0]: " ".join(b.split()) for b in re.split(r"\n  (?=-)", d.split("options:", 1)[1]) if b.strip()}
    for opt in ("--max-entries-per-box", "--max-entries", "--max-boxes", "--max-fds-per-message"):
        assert "(default: " in blocks[opt], (opt, d)
    assert "exit codes:" in d


def test_socket_file_removed_on_exit(daemon_factory):
    d = daemon_factory()
    assert os.path.exists(d.socket)
    d.stop()
    assert wait_for(lambda: not os.path.exists(d.socket), 10)


def test_socket_file_of_someone_else_is_left_alone(daemon_factory):
    """A socket file that replaced ours (another daemon's) is not removed by our exit."""
    d = daemon_factory()
    os.unlink(d.socket)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(d.socket)
    try:
        d.stop()
        time.sleep(0.2)
        assert os.path.exists(d.socket)
    finally:
        other.close()
        os.unlink(d.socket)


# ---------------------------------------------------------------- put --from-file (issue 25 §17, §18)


def _fd3(daemon, box: str, name: str, script: str) -> str:  # type: ignore[no-untyped-def]
    """What ``get BOX NAME -- python3 -c SCRIPT`` prints: the program sees the entry as fd 3."""
    out = ctl(daemon, "get", box, name, "--", sys.executable, "-c", script)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_put_from_file_hands_fd_3_over_at_offset_0(daemon, tmp_path):
    """The README's own `get … -- sh -c 'cat <&3'`: the copy left the memfd's shared offset
    at its end, so a reader of fd 3 saw nothing."""
    src = tmp_path / "notes"
    src.write_bytes(b"first line\nsecond line\n")
    assert ctl(daemon, "put", "vm1", "notes", "--from-file", str(src)).returncode == 0
    out = ctl(daemon, "get", "vm1", "notes", "--", "sh", "-c", "cat <&3")
    assert out.returncode == 0 and out.stdout == "first line\nsecond line\n", out


def test_put_from_file_of_a_pipe_reads_to_its_end(daemon):
    """A pipe's st_size is 0: the copy trusted it and stored nothing, with exit 0."""
    data = os.urandom(3 * (1 << 20) + 5)  # more than a pipe's buffer and a copy chunk
    out = subprocess.run(ctl_cmd("--socket", daemon.socket, "--json", "put", "vm1", "piped", "--from-file",
                                 "/dev/stdin"), input=data, capture_output=True, env=env(), timeout=60)
    assert out.returncode == 0, out.stderr
    with daemon.client() as c:
        assert c.list("vm1")["entries"][0]["size"] == len(data)
    got = subprocess.run(ctl_cmd("--socket", daemon.socket, "get", "vm1", "piped", "--out", "-"),
                         capture_output=True, env=env(), timeout=60)
    assert got.returncode == 0 and got.stdout == data


def test_put_from_file_of_a_fifo_reads_to_its_end(daemon, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = b"through a fifo\n" * 10000
    proc = subprocess.Popen(ctl_cmd("--socket", daemon.socket, "put", "vm1", "fifo", "--from-file", str(fifo)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    with open(fifo, "wb") as w:  # opens once fdboxctl has opened its end
        w.write(data)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"vm1/fifo: memfd, {len(data) / 1024:.1f}KiB" in stdout
    assert _fd3(daemon, "vm1", "fifo", "import os; print(os.fstat(3).st_size)").strip() == str(len(data))


def test_put_from_file_of_a_proc_file_reads_what_it_holds(daemon):
    """/proc's files are regular with st_size 0; sysfs's say 4096 whatever they hold."""
    for name, path in (("version", "/proc/version"), ("lo-address", "/sys/class/net/lo/address")):
        want = open(path, "rb").read()
        assert ctl(daemon, "put", "host", name, "--from-file", path).returncode == 0
        got = subprocess.run(ctl_cmd("--socket", daemon.socket, "get", "host", name, "--out", "-"),
                             capture_output=True, env=env(), timeout=60)
        assert got.returncode == 0 and got.stdout == want, (path, got.stdout[:200])


def test_put_from_file_keeps_a_sparse_files_holes(daemon, tmp_path):
    """A 64 MiB file with 8 KiB of data: its copy in the memfd holds 8 KiB of pages, not 64 MiB."""
    size = 64 << 20
    src = tmp_path / "sparse"
    with open(src, "wb") as f:
        f.truncate(size)
        f.write(b"head" * 1024)
        f.seek(size - 4096)
        f.write(b"tail" * 1024)
    assert os.stat(src).st_blocks * 512 < 1 << 20  # the file system made it sparse
    assert ctl(daemon, "put", "vm1", "sparse", "--from-file", str(src)).returncode == 0
    script = ("import hashlib, os; st = os.fstat(3); h = hashlib.sha256()\n"
              "for off in range(0, st.st_size, 1 << 20): h.update(os.pread(3, 1 << 20, off))\n"
              "print(st.st_size, st.st_blocks * 512, h.hexdigest())")
    size_s, resident, digest = _fd3(daemon, "vm1", "sparse", script).split()
    want = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            want.update(chunk)
    assert int(size_s) == size and digest == want.hexdigest()
    assert int(resident) <= 64 << 10, f"{int(resident) >> 10} KiB resident for 8 KiB of data"


def test_put_from_file_of_a_directory_is_refused(daemon, tmp_path):
    out = ctl(daemon, "put", "vm1", "x", "--from-file", str(tmp_path))
    assert out.returncode == 2 and "Is a directory" in out.stderr, out
    with daemon.client() as c:
        assert c.list()["entries"] == []


# ---------------------------------------------------------------- read-only fds at put (issue 25 §22)


def _put_help_example(line_start: str) -> str:
    """The line of ``fdboxctl put --help``'s examples that starts with ``line_start``."""
    out = subprocess.run(ctl_cmd("put", "--help"), capture_output=True, text=True, env=env(), timeout=30)
    (line,) = [ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith(line_start)]
    return line.split("  #")[0].strip()


WRITABLE = ("import fcntl, os, mmap; flags = fcntl.fcntl(3, fcntl.F_GETFL) & os.O_ACCMODE\n"
            "m = mmap.mmap(3, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if flags == os.O_RDWR else None\n"
            "print('rw' if m is not None else 'ro')")


def test_put_help_example_stores_a_writable_fd(daemon):
    """`put --help`'s `--fd 3 3<…/proc/PID/fd/N` as written: a VMM given the entry back must
    be able to map it writable (a shell's `3<` opens read-only)."""
    example = _put_help_example("fdboxctl put vm1 ram0 --fd 3 ")
    mem = memfd_with(b"\0" * 8192, flags=0)
    try:
        cmd = (example.replace("fdboxctl", f"{sys.executable} -m fdboxd.ctl --socket {daemon.socket}", 1)
               .replace("$QEMU_PID", str(os.getpid())).replace("/fd/17", f"/fd/{mem}"))
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env(), timeout=60,
                             pass_fds=(mem,))
    finally:
        os.close(mem)
    assert out.returncode == 0, out
    assert "warning" not in out.stderr, out.stderr
    assert _fd3(daemon, "vm1", "ram0", WRITABLE).strip() == "rw"


def test_put_of_a_read_only_memfd_warns(daemon):
    """Held all the same (it is the caller's file), but said at once: in the entry's
    extra.warning and on fdboxctl's stderr."""
    mem = memfd_with(b"\0" * 8192, flags=0)
    ro = os.open(f"/proc/self/fd/{mem}", os.O_RDONLY)
    try:
        out = ctl(daemon, "put", "vm1", "ram0", "--fd", str(ro), pass_fds=(ro,))
        out_json = ctl(daemon, "--json", "put", "vm1", "ram1", "--fd", str(ro), pass_fds=(ro,))
    finally:
        os.close(ro)
        os.close(mem)
    assert out.returncode == 0 and out.stdout.startswith("vm1/ram0: memfd"), out
    assert out.stderr.startswith("fdboxctl: warning: vm1/ram0 is a read-only file description"), out.stderr
    assert "3<>" in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert out_json.returncode == 0 and "read-only" in json.loads(out_json.stdout)["extra"]["warning"]
    with daemon.client() as c:
        entries = {e["name"]: e for e in c.list("vm1")["entries"]}
    assert "read-only" in entries["ram0"]["extra"]["warning"]
    assert _fd3(daemon, "vm1", "ram0", WRITABLE).strip() == "ro"  # what the warning is about
    assert "put vm1/ram0: it is a read-only file description" in daemon.log()


def test_documented_fd_redirections_open_read_write():
    """The docs and man pages pass fds as `3<>`, never `3<` (read-only: a VMM cannot map it)."""
    sources = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "man").glob("*.scd")]
    help_text = subprocess.run(ctl_cmd("put", "--help"), capture_output=True, text=True, env=env(),
                               timeout=30).stdout
    bad = [f"{src.name}: {line.strip()}" for src in sources for line in src.read_text().splitlines()
           if re.search(r"\b\d<(?![>&(])\S*/proc/", line)]
    bad += [f"put --help: {line.strip()}" for line in help_text.splitlines() if re.search(r"\b\d<(?![>&(])", line)]
    assert not bad, bad


# ---------------------------------------------------------------- get --out and Ctrl-C (issue 25 §20)


def test_ctrl_c_during_get_out_leaves_the_file_as_it_was(daemon, tmp_path):
    """A real SIGINT while fdboxctl writes a 1 GiB entry out: FILE keeps its old contents,
    no partial file is left beside it, one line on stderr, exit 130 (no traceback)."""
    size = 1 << 30  # holes: the daemon's memfd costs no RAM, the copy still writes 1 GiB
    fd = memfd_with(b"head", flags=0)
    os.ftruncate(fd, size)
    try:
        with daemon.client() as c:
            c.put("big", "ram0", fd)
    finally:
        os.close(fd)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "copy"
    dst.write_bytes(b"old contents\n")
    # A user's Ctrl-C reaches a process whose SIGINT is the default; a test run started in
    # the background of a non-interactive shell (as CI may be) ignores SIGINT, and Python
    # keeps an ignored SIGINT ignored: give fdboxctl the default back.
    proc = subprocess.Popen(ctl_cmd("--socket", daemon.socket, "get", "big", "ram0", "--out", str(dst)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def writing() -> bool:
            return proc.poll() is not None or any(
                p.name != "copy" and p.stat().st_size > 0 for p in out_dir.iterdir())

        assert wait_for(writing, 60)
        others = [p.name for p in out_dir.iterdir() if p.name != "copy"]
        assert proc.poll() is None and others, f"no temporary file beside {dst} while writing: {others}"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert stderr.startswith("fdboxctl: interrupted") and len(stderr.splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["copy"]
    assert dst.read_bytes() == b"old contents\n"


def test_get_out_replaces_a_file_whole_and_writes_into_a_fifo(daemon, tmp_path):
    """The temporary file is renamed over FILE (keeping its mode); a FILE that is not a
    regular file (a FIFO, /dev/null) is written in place, never replaced."""
    fd = memfd_with(b"entry bytes\n", flags=0)
    try:
        with daemon.client() as c:
            c.put("vm1", "notes", fd)
    finally:
        os.close(fd)
    dst = tmp_path / "existing"
    dst.write_bytes(b"a longer old content that must not survive\n")
    dst.chmod(0o640)
    assert ctl(daemon, "get", "vm1", "notes", "--out", str(dst)).returncode == 0
    assert dst.read_bytes() == b"entry bytes\n" and dst.stat().st_mode & 0o777 == 0o640
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    out = ctl(daemon, "get", "vm1", "notes", "--out", str(fifo))
    reader.join(30)
    assert out.returncode == 0, out
    assert got == [b"entry bytes\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "fifo"]


# ---------------------------------------------------------------- stopping a memory daemon (issue 25 §21)


def test_stopping_a_memory_daemon_says_what_it_drops(daemon_factory, tmp_path):
    """`--backend memory` outside systemd holds entries in the process only: its stop
    drops them, and says so (boxes, entries, sizes, why, what would keep them), not just
    "stopped"."""
    d = daemon_factory("--backend", "memory")
    for box, name, size in (("vm1", "ram0", 2 << 20), ("vm1", "notes", 10), ("vm2", "disk", 4096)):
        src = tmp_path / f"{box}-{name}"
        src.write_bytes(b"x" * size)
        assert ctl(d, "put", box, name, "--from-file", str(src)).returncode == 0
    assert d.stop() == 0
    lines = [ln for ln in d.log().splitlines() if "WARNING" in ln and "stopping" in ln]
    summary = [ln for ln in lines if "3 entries in 2 boxes" in ln]
    assert len(summary) == 1, lines
    assert "dropped" in summary[0] and "--backend memory" in summary[0], summary
    assert "fd store" in summary[0] and "--backend kernel" in summary[0], summary
    vm1 = [ln for ln in lines if "vm1:" in ln]
    assert len(vm1) == 1 and "2 entries, 2.0MiB" in vm1[0] and "notes (10B)" in vm1[0] and "ram0 (2.0MiB)" in vm1[0], lines
    assert any("vm2: 1 entry, 4.0KiB" in ln for ln in lines), lines


def test_stopping_says_nothing_is_dropped_when_nothing_is_held_or_systemd_keeps_it(daemon_factory, tmp_path):
    from test_systemd import NotifySocket

    d = daemon_factory("--backend", "memory")
    assert d.stop() == 0
    assert "stopping" not in d.log() or "WARNING" not in d.log(), d.log()
    notify = NotifySocket(tmp_path / "notify")
    try:
        d = daemon_factory("--backend", "memory", env={"NOTIFY_SOCKET": notify.path})
        fd = memfd_with(b"x" * 100, flags=0)
        try:
            with d.client() as c:
                c.put("vm1", "ram0", fd)
        finally:
            os.close(fd)
        assert notify.wait(lambda: "vm1/ram0" in notify.store)
        assert d.stop() == 0
    finally:
        notify.close()
    assert not [ln for ln in d.log().splitlines() if "WARNING" in ln], d.log()
    assert "1 entry in 1 box stays in systemd's fd store" in d.log(), d.log()
