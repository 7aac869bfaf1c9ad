"""units/user/fdboxd.service under a real ``systemd --user``: entries survive restarts.

The manager runs as an unprivileged uid (65534) with its own ``XDG_RUNTIME_DIR`` and
HOME, in a cgroup of its own that the test creates and hands over (delegation, as
user@.service does). Two things a container lacks are provided, and only for it:

- ``systemd --user`` refuses to start unless ``/run/systemd/system`` exists ("Trying
  to run as user instance, but the system has not been booted with systemd."), i.e.
  unless systemd is PID 1; the manager gets a private mount namespace with a tmpfs
  on ``/run/systemd`` holding that directory.
- it must not run in the root cgroup: there a manager moves every process of the
  machine into its ``init.scope`` (seen here, as root); a delegated subtree owned by
  the manager's uid keeps it to itself, and being unprivileged it cannot reach
  further.

Needs root (namespace, cgroup, uid switch) and ``setpriv``/``unshare``; skipped
without them outside CI. The unit file is the shipped one; a drop-in only points
ExecStart= at this checkout (the system ``/usr/bin/python3``: the uid cannot read
/root).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from fdboxtest import REPO, wait_for

UID = 65534
UNIT = REPO / "units" / "user" / "fdboxd.service"
PYTHON = "/usr/bin/python3"


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _cgroup_roots() -> list[Path]:
    """Where a process's cgroup is set: the unified tree, plus name=systemd on hybrid hosts."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base]
    return [p for p in (base / "systemd", base / "unified") if (p / "cgroup.procs").exists()]


def _rmtree_cgroup(d: Path) -> None:
    if not d.exists():
        return
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        os.rmdir(sub)
    os.rmdir(d)


class UserManager:
    def __init__(self, top: Path, proc: subprocess.Popen[str], cgroups: list[Path]) -> None:
        self.top, self.proc, self.cgroups = top, proc, cgroups
        self.runtime = top / "run"
        self.home = top / "home"
        self.env = {"XDG_RUNTIME_DIR": str(self.runtime), "HOME": str(self.home), "PATH": "/usr/bin:/bin"}

    def as_user(self, argv: list[str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
        cmd = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *argv]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, **kw)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.as_user(["systemctl", "--user", *args])

    def show(self, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", "fdboxd.service").stdout.strip()


@pytest.fixture
def user_manager():
    if os.geteuid() != 0:
        _skip_or_fail("needs root to give systemd --user a mount namespace and a delegated cgroup")
    for tool in ("setpriv", "unshare", "systemctl"):
        if shutil.which(tool) is None:
            _skip_or_fail(f"{tool} not installed")
    systemd = next((p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd") if os.access(p, os.X_OK)), None)
    if systemd is None:
        _skip_or_fail("systemd not installed")
    if not os.access(PYTHON, os.X_OK):
        _skip_or_fail(f"{PYTHON} not installed")
    roots = _cgroup_roots()
    if not roots:
        _skip_or_fail("no writable cgroup hierarchy")
    top = Path(tempfile.mkdtemp(prefix="fdbox-user-", dir="/tmp"))
    top.chmod(0o755)
    for d in ("run", "home"):
        (top / d).mkdir(mode=0o700)
        os.chown(top / d, UID, UID)
    name = f"fdbox-user-test-{os.getpid()}"
    cgroups = [r / name for r in roots]
    for cg in cgroups:
        cg.mkdir()
        for f in [cg, *cg.iterdir()]:
            os.chown(f, UID, UID)  # delegation: the subtree and its files are the manager's
    enter = "; ".join(f"echo $$ > {cg}/cgroup.procs" for cg in cgroups)
    script = textwrap.dedent(f"""\
        set -e
        {enter}
        mkdir -p /run/systemd
        mount -t tmpfs -o mode=0755 tmpfs /run/systemd
        mkdir /run/systemd/system
        exec setpriv --reuid={UID} --regid={UID} --clear-groups {systemd} --user
        """)
    log = open(top / "manager.log", "w")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            env={"XDG_RUNTIME_DIR": str(top / "run"), "HOME": str(top / "home"),
                                 "PATH": "/usr/bin:/bin", "SYSTEMD_LOG_LEVEL": "info"},
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    m = UserManager(top, proc, cgroups)
    try:
        # Not `is-system-running`: that asks sd_booted() in systemctl's own namespace.
        up = wait_for(lambda: proc.poll() is not None or m.systemctl("show", "-p", "SystemState", "--value")
                      .stdout.strip() in ("running", "degraded"), 30, interval=0.2)
        if proc.poll() is not None or not up:
            _skip_or_fail(f"systemd --user did not start: {(top / 'manager.log').read_text()[-2000:]}")
        yield m
    finally:
        if proc.poll() is None:
            m.systemctl("stop", "fdboxd.service")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
        for cg in cgroups:
            # Anything still in the subtree (nothing should be) goes back where we are.
            for procs in cg.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            wait_for(lambda cg=cg: all(not p.read_text().strip() for p in cg.rglob("cgroup.procs")), 10)
            _rmtree_cgroup(cg)
        shutil.rmtree(top, ignore_errors=True)


def _install_unit(m: UserManager) -> None:
    d = m.home / ".config/systemd/user"
    (d / "fdboxd.service.d").mkdir(parents=True)
    shutil.copy(UNIT, d / "fdboxd.service")
    (d / "fdboxd.service.d/50-checkout.conf").write_text(textwrap.dedent(f"""\
        # Test: run this checkout's fdboxd with the system python.
        [Service]
        Environment=PYTHONPATH={REPO}
        ExecStart=
        ExecStart={PYTHON} -m fdboxd --user
        """))
    for p in [m.home / ".config", *(m.home / ".config").rglob("*")]:
        os.chown(p, UID, UID)


CLIENT = textwrap.dedent("""\
    import os, sys
    from fdboxd.client import Client
    cmd = sys.argv[1]
    with Client() as c:
        if cmd == "put":
            fd = os.memfd_create("ram", os.MFD_ALLOW_SEALING)
            os.write(fd, b"kept across restarts")
            c.put("vm1", "ram0", fd, {"slot": "0"})
        else:
            entry, fd = c.get("vm1", "ram0")
            print(os.pread(fd, 100, 0).decode(), entry["metadata"]["slot"])
    """)


def _client(m: UserManager, cmd: str) -> subprocess.CompletedProcess[str]:
    env = dict(m.env, PYTHONPATH=str(REPO))
    return subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                           PYTHON, "-c", CLIENT, cmd], env=env, capture_output=True, text=True, timeout=60)


def test_user_unit_keeps_entries_across_restart_and_crash(user_manager):
    m = user_manager
    _install_unit(m)
    assert m.systemctl("daemon-reload").returncode == 0
    out = m.systemctl("start", "fdboxd.service")  # Type=notify: returns once READY=1
    assert out.returncode == 0, out.stderr + m.systemctl("status", "fdboxd.service").stdout
    assert m.show("ActiveState") == "active"
    pid = int(m.show("MainPID"))
    status = Path(f"/proc/{pid}/status").read_text()
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status  # MemoryDenyWriteExecute= & co. applied

    out = _client(m, "put")
    assert out.returncode == 0, out.stderr
    assert m.show("NFileDescriptorStore") == "1"

    assert m.systemctl("restart", "fdboxd.service").returncode == 0
    assert int(m.show("MainPID")) != pid
    out = _client(m, "get")
    assert out.returncode == 0 and out.stdout.split() == ["kept", "across", "restarts", "0"], out

    # A crash: Restart=on-failure brings it back with the fd store.
    pid = int(m.show("MainPID"))
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: m.show("MainPID") not in ("0", str(pid)) and m.show("ActiveState") == "active", 30), \
        m.systemctl("status", "fdboxd.service").stdout
    out = _client(m, "get")
    assert out.returncode == 0 and out.stdout.split()[0] == "kept", out

    sock = m.runtime / "fdbox" / "fdboxd.sock"
    assert sock.exists()
    assert m.systemctl("stop", "fdboxd.service").returncode == 0
    assert not sock.exists()  # removed on exit


def test_the_harness_sees_a_failing_unit(user_manager):
    """The check can fail: a daemon that cannot start fails `systemctl --user start`."""
    m = user_manager
    _install_unit(m)
    conf = m.home / ".config/systemd/user/fdboxd.service.d/50-checkout.conf"
    conf.write_text(conf.read_text().replace("--user", "--user --backend kernel"))  # no /dev/fdbox for it
    assert m.systemctl("daemon-reload").returncode == 0
    out = m.systemctl("start", "fdboxd.service")
    assert out.returncode != 0
    time.sleep(0.5)
    assert m.show("ActiveState") in ("failed", "activating", "inactive")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
