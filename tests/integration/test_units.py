"""The shipped systemd units, tmpfiles.d and D-Bus files, checked by the real tools.

``systemd-analyze verify`` runs without systemd as PID 1; the units' ExecStart
binaries are pointed at ones that exist here (verify insists they do), nothing else
is changed. The D-Bus policy is loaded into a real dbus-daemon with a system-bus-like
default policy and exercised by root and by a second uid.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from fdboxtest import REPO, memfd_with, wait_for

UNITS = REPO / "units"
CONTRIB = REPO / "contrib" / "dbus"
OTHER_UID = 65534


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed")
    return path


def systemd_version() -> int:
    out = subprocess.run([need("systemd-analyze"), "--version"], capture_output=True, text=True).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / name)
    return cp


def values(name: str, section: str, key: str) -> list[str]:
    """Every value of a (possibly repeated) key, split on whitespace like systemd lists."""
    out = []
    for line in (UNITS / name).read_text().splitlines():
        m = re.match(rf"\s*{re.escape(key)}=(.*)", line)
        if m:
            out.extend(m.group(1).split())
    return out


@pytest.fixture
def verify_dir(tmp_path):
    """The units with ExecStart pointing at binaries that exist on this machine."""
    true = shutil.which("true")
    for f in ("fdboxd.service", "fdboxd.socket", "fdbox-seal.service"):
        text = (UNITS / f).read_text()
        text = text.replace("/usr/bin/fdboxd ", f"{true} ").replace("/usr/bin/fdboxctl ", f"{true} ")
        text = text.replace("/usr/libexec/fdbox/fdbox-call ", f"{true} ")
        (tmp_path / f).write_text(text)
    return tmp_path


def test_systemd_analyze_verify_is_clean(verify_dir):
    tool = need("systemd-analyze")
    out = subprocess.run([tool, "verify", "--man=no", "fdboxd.service", "fdboxd.socket", "fdbox-seal.service"],
                         cwd=verify_dir, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # not even a warning


def test_verify_catches_a_broken_unit(verify_dir):
    """The check above can fail: a typo in a key is reported."""
    broken = verify_dir / "fdboxd.service"
    broken.write_text(broken.read_text().replace("Type=notify", "Type=notfy"))
    out = subprocess.run([need("systemd-analyze"), "verify", "--man=no", "fdboxd.service"], cwd=verify_dir,
                         capture_output=True, text=True, timeout=60)
    assert "notfy" in out.stderr


def test_fdstore_preserve_drop_in_matches_systemd_version(tmp_path):
    """FileDescriptorStorePreserve= exists from systemd 254; 252 warns, so it is a drop-in."""
    svc = unit("fdboxd.service")
    assert "FileDescriptorStorePreserve" not in svc["Service"]
    drop = tmp_path / "fdboxd.service.d"
    drop.mkdir()
    shutil.copy(UNITS / "optional" / "fdboxd.service.d" / "10-fdstore-preserve.conf", drop)
    (tmp_path / "fdboxd.service").write_text((UNITS / "fdboxd.service").read_text()
                                             .replace("/usr/bin/fdboxd ", f"{shutil.which('true')} "))
    shutil.copy(UNITS / "fdboxd.socket", tmp_path)
    out = subprocess.run([need("systemd-analyze"), "verify", "--man=no", "fdboxd.service"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    unknown = "Unknown key 'FileDescriptorStorePreserve'" in out.stderr or \
              "Unknown key name 'FileDescriptorStorePreserve'" in out.stderr
    assert unknown == (systemd_version() < 254), out.stderr


def test_shipped_tree_has_no_drop_in_next_to_a_unit():
    """A .d directory in units/ would be picked up by `systemd-analyze verify units/...`
    on every systemd; the >= 254 drop-in lives in units/optional/ and the installer
    adds it only where it is understood."""
    units = [p for p in UNITS.glob("*.d") if p.name.endswith((".service.d", ".socket.d"))]
    assert not units, units


def _security(verify_dir: Path, name: str) -> float:
    out = subprocess.run([need("systemd-analyze"), "security", "--offline=true", "--no-pager", f"./{name}"],
                         cwd=verify_dir, capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m, out.stdout + out.stderr
    return float(m.group(1))


@pytest.mark.parametrize("name", ["fdboxd.service", "fdbox-seal.service"])
def test_systemd_analyze_security_at_most_4(verify_dir, name):
    score = _security(verify_dir, name)
    print(f"systemd-analyze security {name}: {score}")
    assert score <= 4.0, f"{name}: exposure {score}"


def test_security_check_can_fail(verify_dir):
    """The check above can fail: the seal unit without its hardening scores high."""
    seal = verify_dir / "fdbox-seal.service"
    text = seal.read_text()
    seal.write_text(text[:text.index("# Hardening:")] + "\n[Install]\nRequiredBy=systemd-kexec.service\n")
    assert _security(verify_dir, "fdbox-seal.service") > 4.0


def test_hardening_the_issue_asks_for():
    s = unit("fdboxd.service")["Service"]
    # ProcSubset=pid would hide /proc/cmdline and /proc/meminfo from the preflight.
    assert s["ProtectProc"] == "invisible" and "ProcSubset" not in s
    assert s["MemoryDenyWriteExecute"] == "yes" and int(s["OOMScoreAdjust"]) <= -500
    seal = unit("fdbox-seal.service")["Service"]
    assert seal["CapabilityBoundingSet"] == "" and seal["PrivateNetwork"] == "yes"
    assert "PrivateTmp" not in seal  # would pull tmp.mount into the kexec transaction


def test_user_unit_verifies_clean(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    text = (UNITS / "user" / "fdboxd.service").read_text().replace("/usr/bin/fdboxd ", f"{shutil.which('true')} ")
    (tmp_path / "fdboxd.service").write_text(text)
    out = subprocess.run([need("systemd-analyze"), "verify", "--user", "--man=no", "fdboxd.service"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)})
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    s = unit("user/fdboxd.service")["Service"]
    assert s["Type"] == "notify" and int(s["FileDescriptorStoreMax"]) >= 1024
    assert s["ExecStart"].split()[1:] == ["--user"]


def test_service_unit_contents():
    svc = unit("fdboxd.service")
    s, u = svc["Service"], svc["Unit"]
    assert s["Type"] == "notify" and s["Restart"] == "on-failure"
    assert s["WatchdogSec"] and int(s["FileDescriptorStoreMax"]) >= 16384
    assert s["ExecStart"].split()[1:] == ["--bus", "system"]
    assert u["DefaultDependencies"] == "no"
    assert "shutdown.target" not in u.get("Conflicts", "")  # must outlive shutdown.target for the seal
    assert "Requires" not in u  # a required unit stopping at shutdown would stop fdboxd
    devices = values("fdboxd.service", "Service", "DeviceAllow")
    assert "/dev/fdbox" in devices and "/dev/net/tun" in devices
    assert s["StateDirectory"] == "fdbox" and s["RuntimeDirectory"] == "fdbox"
    assert s["RuntimeDirectoryPreserve"] == "yes"  # the socket unit's socket lives there
    assert s["ProtectSystem"] == "strict"


def test_socket_unit_is_what_the_daemon_expects():
    from fdboxd.paths import SYSTEM_SOCKET
    from fdboxd.systemd import parse_fdname

    sock = unit("fdboxd.socket")["Socket"]
    assert sock["ListenStream"] == SYSTEM_SOCKET
    assert parse_fdname(sock["FileDescriptorName"]) is None  # never mistaken for a stored entry


def test_seal_unit_orders_before_kexec_and_blocks_it():
    seal = unit("fdbox-seal.service")
    u, s, i = seal["Unit"], seal["Service"], seal["Install"]
    assert s["Type"] == "oneshot" and u["DefaultDependencies"] == "no"
    # No interpreter start on the blackout path: the C client asks the running daemon.
    # ... and refuses the seal (so the kexec) when the preflight finds a problem.
    assert shlex.split(s["ExecStart"]) == ["/usr/libexec/fdbox/fdbox-call", "--more", "io.fdbox.Store.Seal",
                                           '{"preflight":true}']
    assert "systemd-kexec.service" in u["Before"].split()
    assert "umount.target" in u["Before"].split()
    assert "shutdown.target" in u["After"].split() and "fdboxd.service" in u["After"].split()
    # Abort: systemd-kexec.service requires (and is ordered after) the seal.
    assert i["RequiredBy"] == "systemd-kexec.service"
    kexec = Path("/lib/systemd/system/systemd-kexec.service")
    if kexec.exists():  # the unit we hook into really is the one kexec.target pulls in
        assert "systemd-kexec.service" in Path("/lib/systemd/system/kexec.target").read_text()


def test_tmpfiles_creates_the_directories(tmp_path):
    tool = need("systemd-tmpfiles")
    out = subprocess.run([tool, "--create", f"--root={tmp_path}", str(UNITS / "tmpfiles.d" / "fdbox.conf")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run/fdbox").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "var/lib/fdbox").stat().st_mode & 0o7777 == 0o700


def test_dbus_activation_file():
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(CONTRIB / "io.fdbox1.service")
    sect = cp["D-BUS Service"]
    assert sect["Name"] == "io.fdbox1" and sect["SystemdService"] == "fdboxd.service" and sect["User"] == "root"


# ---------------------------------------------------------------------------- policy

SYSTEM_LIKE = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <!-- the default policy of Debian's /usr/share/dbus-1/system.conf -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


def demote(uid: int):  # type: ignore[no-untyped-def]
    def fn() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    return fn


@pytest.fixture
def system_like_bus():
    need("dbus-daemon")
    d = Path(tempfile.mkdtemp(prefix="fdbox-sysbus-", dir="/tmp"))
    d.chmod(0o755)
    conf = d / "system.conf"
    conf.write_text(SYSTEM_LIKE.format(path=d / "bus", policy=CONTRIB / "io.fdbox1.conf"))
    proc = subprocess.Popen(["dbus-daemon", "--nofork", f"--config-file={conf}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if not wait_for(lambda: (d / "bus").exists() or proc.poll() is not None, 10) or proc.poll() is not None:
        raise AssertionError(f"dbus-daemon refused the policy: {proc.stderr.read() if proc.stderr else ''}")
    yield f"unix:path={d / 'bus'}"
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(d, ignore_errors=True)


def test_policy_root_owns_users_call_signals_stay_private(daemon_factory, system_like_bus):
    need("gdbus")
    bus = system_like_bus
    # Not root: may not own the name.
    out = subprocess.run(["gdbus", "call", "-a", bus, "-d", "org.freedesktop.DBus", "-o", "/org/freedesktop/DBus",
                          "-m", "org.freedesktop.DBus.RequestName", "io.fdbox1", "4"],
                         capture_output=True, text=True, preexec_fn=demote(OTHER_UID), timeout=30)
    assert out.returncode != 0 and "AccessDenied" in out.stderr, out
    d = daemon_factory("--bus", bus)  # root: owns it
    owned = ["gdbus", "call", "-a", bus, "-d", "org.freedesktop.DBus", "-o", "/org/freedesktop/DBus",
             "-m", "org.freedesktop.DBus.NameHasOwner", "io.fdbox1"]
    assert wait_for(lambda: "true" in subprocess.run(owned, capture_output=True, text=True).stdout, 10), d.log()

    monitors = {}
    for who, uid in (("root", None), ("other", OTHER_UID)):
        monitors[who] = subprocess.Popen(["gdbus", "monitor", "-a", bus, "-d", "io.fdbox1"], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True,
                                         preexec_fn=demote(uid) if uid is not None else None)
    time.sleep(1.0)
    fd = memfd_with(b"policy")
    with d.client() as c:
        c.put("pbox", "secret-name", fd)
    os.close(fd)
    # Any user may call (the daemon decides what they see: nothing of root's here).
    out = subprocess.run(["gdbus", "call", "-a", bus, "-d", "io.fdbox1", "-o", "/io/fdbox1",
                          "-m", "io.fdbox1.Manager.List"], capture_output=True, text=True,
                         preexec_fn=demote(OTHER_UID), timeout=30)
    assert out.returncode == 0, out.stderr
    assert "secret-name" not in out.stdout
    time.sleep(1.0)
    texts = {}
    for who, proc in monitors.items():
        proc.send_signal(signal.SIGTERM)  # not SIGINT: a background CI run ignores it
        try:
            texts[who] = proc.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            texts[who] = proc.communicate()[0]
    assert "EntryAdded ('pbox', 'secret-name'" in texts["root"], texts
    assert "secret-name" not in texts["other"], texts["other"]
    assert "PropertiesChanged" in texts["other"], texts["other"]  # counts are public


# ---------------------------------------------------------------- fdbox-qemu@ (issue 9)


def test_qemu_units_verify_clean(tmp_path):
    """fdbox-qemu@ as an instance and fdbox-qemu-suspend, next to the units they order against."""
    tool = need("systemd-analyze")
    true = shutil.which("true")
    names = ("fdboxd.service", "fdboxd.socket", "fdbox-seal.service", "fdbox-qemu@.service", "fdbox-qemu-suspend.service")
    for f in names:
        text = (UNITS / f).read_text()
        for prog in ("fdboxd", "fdboxctl", "fdbox-qemu"):
            text = text.replace(f"/usr/bin/{prog} ", f"{true} ")
        text = text.replace("/usr/libexec/fdbox/fdbox-call ", f"{true} ")
        (tmp_path / f).write_text(text)
    (tmp_path / "fdbox-qemu@vm1.service").symlink_to("fdbox-qemu@.service")
    out = subprocess.run([tool, "verify", "--man=no", "fdbox-qemu@vm1.service", "fdbox-qemu-suspend.service",
                          "fdbox-seal.service"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", (out.stdout, out.stderr)


def test_qemu_suspend_unit_blocks_kexec_and_seal():
    vm, sus = unit("fdbox-qemu@.service"), unit("fdbox-qemu-suspend.service")
    # The VM is not stopped by shutdown.target (it runs until the suspend unit), but is by reboot/poweroff.
    assert vm["Unit"]["DefaultDependencies"] == "no" and "shutdown.target" not in vm["Unit"].get("Conflicts", "")
    assert "fdboxd.service" in vm["Unit"]["After"].split()
    assert vm["Service"]["ExecStart"].startswith("/usr/bin/fdbox-qemu start %i ")
    assert "fdbox-qemu suspend %i" in vm["Service"]["ExecStop"]
    # Ready once the guest runs: the helper fdbox-qemu forks (not the main pid) notifies.
    assert (vm["Service"]["Type"], vm["Service"]["NotifyAccess"]) == ("notify", "all")
    u, s = sus["Unit"], sus["Service"]
    assert s["Type"] == "oneshot" and u["DefaultDependencies"] == "no"
    assert s["ExecStart"] == "/usr/bin/fdbox-qemu suspend --all"  # one process for every VM
    assert "shutdown.target" in u["After"].split()
    assert {"fdbox-seal.service", "systemd-kexec.service", "umount.target"} <= set(u["Before"].split())
    # A failed suspend fails the seal's and the kexec's jobs ("dependency failed").
    assert set(sus["Install"]["RequiredBy"].split()) == {"systemd-kexec.service", "fdbox-seal.service"}
    # Template instances get a per-template slice that conflicts with shutdown.target.
    assert vm["Service"]["Slice"] == sus["Service"]["Slice"] == "system.slice"


def test_bus_policy_missing_is_logged_and_varlink_goes_on(daemon_factory, tmp_path):
    """No io.fdbox1.conf on a system bus: the name is refused; fdboxd says why and
    serves Varlink, instead of dying with a traceback."""
    need("dbus-daemon")
    d = Path(tempfile.mkdtemp(prefix="fdbox-sysbus-", dir="/tmp"))
    conf = d / "system.conf"
    empty = d / "empty.conf"
    empty.write_text("<busconfig/>\n")
    conf.write_text(SYSTEM_LIKE.format(path=d / "bus", policy=empty))
    proc = subprocess.Popen(["dbus-daemon", "--nofork", f"--config-file={conf}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (d / "bus").exists(), 10)
        daemon = daemon_factory("--bus", f"unix:path={d / 'bus'}")
        fd = memfd_with(b"still served")
        with daemon.client() as c:
            c.put("v", "x", fd)
        os.close(fd)
        assert wait_for(lambda: "serving Varlink only" in daemon.log(), 20), daemon.log()
        log = daemon.log()
        assert "cannot own io.fdbox1" in log, log
        assert "Traceback" not in log
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)
