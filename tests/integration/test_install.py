"""``scripts/install-host`` into a temporary root, as an operator installs a host.

One real install (pip, units, tmpfiles.d, D-Bus files, DKMS source, README) into a
``DESTDIR`` with Debian's own ``/usr/bin/python3`` (the python a newcomer on Debian 12 or
13 has); the installed units are checked with ``systemd-analyze verify --root=``
against the distribution's own units copied into the same root (verify resolves
``sysinit.target`` & co. and checks that ExecStart= binaries exist, all inside the
root); then ``--uninstall`` must leave exactly what was there before.

Round trips besides: Debian's python with ``PREFIX=/usr`` and a non-Debian python (the
one running the tests) into a ``DESTDIR``; Debian's python into the real ``/usr/local``
inside a private mount namespace whose ``/usr`` and ``/etc`` are overlays (the host's
tree is the lower layer, so the upper layers hold exactly what the install changed:
nothing may be left in them); and two installs made to fail midway by a read-only
directory (EROFS, as root) that ``--uninstall`` must still undo.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fdboxtest import REPO

from fdboxd import __version__

SCRIPT = REPO / "scripts" / "install-host"
PREFIX = "/usr/local"
SYSTEM_UNITS = Path("/lib/systemd/system")
DEBIAN_PYTHON = "/usr/bin/python3"  # Debian's own: PEP 668, the posix_local scheme, dist-packages


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed")
    return path


def debian_python() -> str:
    """Debian's python3, with its pip (python3-pip: scripts/install-deps installs it)."""
    ok = os.path.exists(DEBIAN_PYTHON) and subprocess.run(
        [DEBIAN_PYTHON, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{DEBIAN_PYTHON} -m pip does not run (apt-get install python3-pip)", pytrace=False)
        pytest.skip(f"no {DEBIAN_PYTHON} with pip")
    return DEBIAN_PYTHON


def run_install(root: Path | None, *args: str, python: str = sys.executable, prefix: str = PREFIX,
                **env: str) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, DESTDIR=str(root or ""), PREFIX=prefix, PYTHON=python, **env)
    return subprocess.run([str(SCRIPT), *args], env=e, capture_output=True, text=True, timeout=600)


def python_paths(python: str) -> tuple[list[str], str]:
    """(sys.path, X.Y) of PYTHON run as a console script runs it (no PYTHONPATH, not from the checkout)."""
    out = subprocess.run([python, "-c", "import sys; print(sys.version_info[0], sys.version_info[1]); "
                          "print(*sys.path, sep='\\n')"], env={"PATH": "/usr/bin:/bin"}, cwd="/",
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return out[1:], out[0].replace(" ", ".")


def run_scripts(root: Path, prefix: str, package_dir: Path | None) -> None:
    """PREFIX/bin/fdboxd and fdboxctl --version, from the root, importing the installed package."""
    env = {"PATH": "/usr/bin:/bin"} | ({"PYTHONPATH": str(package_dir)} if package_dir else {})
    for prog in ("fdboxctl", "fdboxd"):
        out = subprocess.run([str(root / prefix.lstrip("/") / "bin" / prog), "--version"], env=env, cwd="/",
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.split() == [prog, __version__], out


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(root, files before the install): one install shared by the checks below."""
    need("systemd-analyze")
    root = tmp_path_factory.mktemp("host-root")
    # The distribution's units, so that verify finds sysinit.target, dbus.socket, ...
    (root / "lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "lib/systemd/system", symlinks=True)
    # ... and the system programs units run besides ours (/bin/sh, systemctl): a host has them.
    for f in (REPO / "units").glob("*.service"):
        for prog in re.findall(r"^Exec\w*=[-@:+!]*(/\S+)", f.read_text(), re.MULTILINE):
            if not Path(prog).name.startswith("fdbox") and os.path.exists(prog):
                (root / prog.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(prog, root / prog.lstrip("/"))
    before = tree(root)
    out = run_install(root, python=debian_python())
    assert out.returncode == 0, out.stderr
    return root, before


def installed_units(root: Path) -> list[str]:
    d = root / PREFIX.lstrip("/") / "lib/systemd/system"
    return sorted(p.name for p in d.iterdir() if p.is_file())


def test_every_unit_in_the_tree_is_installed(installed):
    root, _ = installed
    shipped = sorted(p.name for p in (REPO / "units").iterdir() if p.suffix in (".service", ".socket"))
    assert installed_units(root) == shipped
    user = root / PREFIX.lstrip("/") / "lib/systemd/user"
    assert sorted(p.name for p in user.iterdir()) == sorted(p.name for p in (REPO / "units/user").iterdir())


def test_installed_units_verify_clean_in_the_root(installed):
    root, _ = installed
    units = [f"{PREFIX}/lib/systemd/system/{u}" for u in installed_units(root) if "@" not in u]
    units += [f"{PREFIX}/lib/systemd/system/{u.replace('@', '@test')}" for u in installed_units(root) if "@" in u]
    out = subprocess.run([need("systemd-analyze"), "verify", "--man=no", f"--root={root}", *units],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr


def test_verify_in_the_root_notices_a_missing_program(installed, tmp_path):
    """The check above can fail: a unit whose ExecStart= program is not in the root."""
    root, _ = installed
    unit = root / PREFIX.lstrip("/") / "lib/systemd/system/fdbox-seal.service"
    broken = unit.with_name("fdbox-broken.service")
    program = f"{PREFIX}/libexec/fdbox/fdbox-call"
    assert program in unit.read_text()
    broken.write_text(unit.read_text().replace(program, f"{program}-missing"))
    try:
        out = subprocess.run([need("systemd-analyze"), "verify", "--man=no", f"--root={root}",
                              f"{PREFIX}/lib/systemd/system/fdbox-broken.service"],
                             capture_output=True, text=True, timeout=120)
    finally:
        broken.unlink()
    assert out.returncode != 0 and "fdbox-call-missing" in out.stderr, out.stderr


def test_exec_and_documentation_paths_point_into_the_install(installed):
    root, _ = installed
    for name in installed_units(root):
        text = (root / PREFIX.lstrip("/") / "lib/systemd/system" / name).read_text()
        for prog in re.findall(r"^Exec\w*=[-@:+!]*(\S+)", text, re.MULTILINE):
            if Path(prog).name.startswith("fdbox"):  # ours: where the installer put it
                assert prog.startswith((f"{PREFIX}/bin/", f"{PREFIX}/libexec/fdbox/")), (name, prog)
                assert os.access(root / prog.lstrip("/"), os.X_OK), (name, prog)
        for doc in re.findall(r"^Documentation=(.*)$", text, re.MULTILINE):
            for url in doc.split():
                assert url.startswith("file://"), url
                assert (root / url.removeprefix("file://").lstrip("/")).is_file(), (name, url)


def test_installed_console_scripts_run(installed):
    """Where Debian's python3 imports from (/usr/local/lib/python3.X/dist-packages, not
    the usr/local/local/ or site-packages of the scheme pip picks by itself), run from there."""
    root, _ = installed
    path, version = python_paths(DEBIAN_PYTHON)
    site = root / f"usr/local/lib/python{version}/dist-packages"
    assert f"/usr/local/lib/python{version}/dist-packages" in path, path
    assert (site / "fdboxd/__init__.py").is_file() and not (root / "usr/local/local").exists()
    assert (root / "usr/local/bin/fdboxd").read_text().startswith(f"#!{DEBIAN_PYTHON}\n")
    run_scripts(root, PREFIX, site)
    # The seal unit's C client answers without a daemon: a usage line and exit 2.
    call = subprocess.run([str(root / PREFIX.lstrip("/") / "libexec/fdbox/fdbox-call")],
                          capture_output=True, text=True, timeout=60)
    assert call.returncode == 2 and "usage: fdbox-call" in call.stderr, call
    # The interface description (package data) came along.
    assert (site / "fdboxd/varlink/io.fdbox.Store.varlink").is_file()


def test_completions_and_man_pages_installed(installed):
    root, _ = installed
    share = root / PREFIX.lstrip("/") / "share"
    assert sorted(p.name for p in (share / "bash-completion/completions").iterdir()) == \
        ["fdbox-qemu", "fdboxctl", "fdboxd"]
    if shutil.which("scdoc") is None:
        pytest.skip("scdoc not installed: no man pages")
    for page in (REPO / "man").glob("*.scd"):
        section = page.stem.rsplit(".", 1)[1]
        assert (share / f"man/man{section}/{page.stem}").is_file(), page.name


def test_dbus_tmpfiles_and_dkms_where_their_tools_look(installed):
    root, _ = installed
    assert (root / "etc/dbus-1/system.d/io.fdbox1.conf").is_file()  # dbus reads no policy under /usr/local
    assert (root / PREFIX.lstrip("/") / "share/dbus-1/system-services/io.fdbox1.service").is_file()
    assert (root / PREFIX.lstrip("/") / "lib/tmpfiles.d/fdbox.conf").is_file()
    dkms = root / f"usr/src/fdbox-{__version__}"
    assert f'PACKAGE_VERSION="{__version__}"' in (dkms / "dkms.conf").read_text()
    for f in ("Kbuild", "Makefile", "fdbox_main.c", "include/uapi/linux/fdbox.h"):
        assert (dkms / f).is_file(), f


def test_fdstore_preserve_drop_in_only_on_systemd_254_and_later(installed, tmp_path):
    """systemd here is 252: the drop-in is left out; told 257, the installer adds it.

    (systemd 254 and 257 are not installed here, so the unit with the drop-in is not
    verified by a 254+ systemd-analyze; that it is rejected by 252 is tested in
    test_units.py.)
    """
    root, _ = installed
    dropin = f"{PREFIX.lstrip('/')}/lib/systemd/system/fdboxd.service.d/10-fdstore-preserve.conf"
    version = int(re.match(r"systemd (\d+)", subprocess.run(["systemctl", "--version"], capture_output=True,
                                                            text=True).stdout).group(1))
    assert (root / dropin).exists() == (version >= 254)
    other = tmp_path / "root257"
    out = run_install(other, "--no-python", SYSTEMD_VERSION="257")  # the units are what is checked here
    assert out.returncode == 0, out.stderr
    assert "FileDescriptorStorePreserve=yes" in (other / dropin).read_text()
    assert run_install(other, "--uninstall").returncode == 0
    assert tree(other) == set(), tree(other)


def test_uninstall_removes_everything_it_installed(installed):
    root, before = installed
    added = tree(root) - before
    assert len(added) > 30, added
    out = run_install(root, "--uninstall")
    assert out.returncode == 0, out.stderr
    assert tree(root) == before, sorted(tree(root) - before)
    again = run_install(root, "--uninstall")
    assert again.returncode != 0 and "nothing to uninstall" in again.stderr


@pytest.mark.parametrize("which,prefix,package", [
    ("debian", "/usr", "lib/python3/dist-packages"),  # Debian's own layout, on its sys.path
    ("this", "/usr/local", "lib/python{version}/site-packages"),  # a non-Debian python: posix_prefix
])
def test_round_trip_in_a_destdir(which: str, prefix: str, package: str, tmp_path: Path):
    python = debian_python() if which == "debian" else sys.executable
    path, version = python_paths(python)
    package = f"{prefix}/{package.format(version=version)}"
    root = tmp_path / "root"
    out = run_install(root, python=python, prefix=prefix)
    assert out.returncode == 0, out.stderr
    assert (root / package.lstrip("/") / "fdboxd/__init__.py").is_file(), sorted(tree(root))
    assert not (root / prefix.lstrip("/") / "local").exists()
    if which == "debian":
        assert package in path, path
    run_scripts(root, prefix, root / package.lstrip("/"))
    out = run_install(root, "--uninstall", python=python, prefix=prefix)
    assert out.returncode == 0, out.stderr
    assert tree(root) == set(), sorted(tree(root))


# Inside a private mount namespace: /usr and /etc become overlays of the host's own, so
# the install writes into the real /usr/local (and /etc/dbus-1, /usr/src) as on a host,
# and each upper layer ends up holding exactly what the install changed.
IN_OVERLAY = """set -eu
mount --make-rprivate /
for d in usr etc; do
    mkdir "$T/$d.upper" "$T/$d.work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$d.upper,workdir=$T/$d.work" "/$d"
done
scripts/install-host
cd /
for prog in fdboxctl fdboxd; do env -i PATH=/usr/local/bin:/usr/bin:/bin "$prog" --version; done
env -i PATH=/usr/bin:/bin python3 -c 'import fdboxd; print(fdboxd.__file__)'
cd "$OLDPWD"
ls -R "$T/usr.upper" "$T/etc.upper" > "$T/installed"
scripts/install-host --uninstall
"""


def test_round_trip_in_the_real_prefix(tmp_path: Path):
    """Install into /usr/local as a newcomer does (no DESTDIR, no PYTHONPATH), run, remove."""
    python = debian_python()
    if os.geteuid() != 0:
        pytest.skip("needs root (a mount namespace with overlays)")
    env = dict(os.environ, T=str(tmp_path), PYTHON=python)
    env.pop("DESTDIR", None)
    env.pop("PREFIX", None)
    p = subprocess.run([need("unshare"), "--mount", "sh", "-c", IN_OVERLAY], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    _, version = python_paths(python)
    assert p.stdout.split("\n")[:3] == [f"fdboxctl {__version__}", f"fdboxd {__version__}",
                                         f"/usr/local/lib/python{version}/dist-packages/fdboxd/__init__.py"], p.stdout
    assert "does not import fdboxd" not in p.stderr, p.stderr
    assert "fdbox-call" in (tmp_path / "installed").read_text()  # the install went through the overlay
    # What is left in the upper layers: only directories the host already had (copied
    # up when something was written in them), no file, no whiteout.
    for d in ("usr", "etc"):
        upper = tmp_path / f"{d}.upper"
        left = [str(q.relative_to(upper)) for q in upper.rglob("*") if not q.is_dir() or q.is_symlink()
                or not (Path("/", d) / q.relative_to(upper)).is_dir()]
        assert left == [], (d, left)


@pytest.mark.parametrize("readonly", [
    "usr/src",  # step 4 (the DKMS source) fails: the package, units and D-Bus files are in
    "usr/local/bin",  # inside step 1: the package is in, its console scripts are not
])
def test_uninstall_undoes_an_install_that_failed_midway(readonly: str, tmp_path: Path):
    """A directory mounted read-only (EROFS even for root) stops the install midway;
    --uninstall then removes every file and directory the install made before it stopped."""
    python = debian_python()
    if os.geteuid() != 0:
        pytest.skip("needs root (a read-only bind mount in a mount namespace)")
    root = tmp_path / "root"
    (root / readonly).mkdir(parents=True)
    before = tree(root)
    ro = root / readonly
    script = f'mount --make-rprivate / && mount --bind -o ro "{ro}" "{ro}" && exec "{SCRIPT}"'
    env = dict(os.environ, DESTDIR=str(root), PREFIX=PREFIX, PYTHON=python)
    p = subprocess.run([need("unshare"), "--mount", "sh", "-c", script], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "Read-only file system" in p.stderr, p.stderr
    record = (root / PREFIX.lstrip("/") / "share/fdbox/installed-files").read_text().split()
    _, version = python_paths(python)
    assert (root / f"usr/local/lib/python{version}/dist-packages/fdboxd/__init__.py").is_file()
    assert len(tree(root) - before) > 50 and f"/usr/local/lib/python{version}/dist-packages/fdboxd/store.py" in record
    out = run_install(root, "--uninstall")
    assert out.returncode == 0, out.stderr
    assert tree(root) == before, sorted(tree(root) - before)
