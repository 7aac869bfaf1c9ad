"""The Debian packages (debian/), built as a Debian host builds them and checked as one
installs them.

One real ``dpkg-buildpackage -us -uc -b`` of a copy of this checkout (tests/vm/roots.py's
``build_debs``, cached under build/roots/ by the source's content; debian/rules
generates the man pages and completions, builds fdbox-call, runs pybuild); then:
lintian reports no error, and no warning that debian/README.source does not list and
justify; the ``fdbox`` package (with ``fdbox-call``) unpacked into a throwaway root
passes ``systemd-analyze verify --root`` with the distribution's units beside it, and
its ``fdboxctl --version`` runs from there; ``dkms build`` of the source that
``fdbox-dkms`` ships builds fdbox.ko against the test kernel tree.

The build takes about 10 s and lintian about 5 s on this machine (2 cores).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fdboxtest import REPO

from fdboxd import __version__

sys.path.insert(0, str(REPO / "tests" / "vm"))
import roots  # noqa: E402
import vmlib  # noqa: E402

SYSTEM_UNITS = Path("/lib/systemd/system")
# Debian's own tools and python3, not a python from elsewhere earlier on PATH (pybuild
# builds for the interpreters Debian has, with Debian's build and installer modules).
DEB_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def need(tool: str) -> str:
    path = shutil.which(tool, path=DEB_PATH)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} missing (scripts/install-deps installs it)", pytrace=False)
        pytest.skip(f"{tool} not installed")
    return path


@pytest.fixture(scope="module")
def built() -> Path:
    """The directory holding the built .deb files and the .changes."""
    need("dpkg-buildpackage")
    p = subprocess.run([need("dpkg-checkbuilddeps")], cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"build dependencies missing: {p.stderr.strip()}", pytrace=False)
        pytest.skip(p.stderr.strip())
    t0 = time.monotonic()
    out = roots.build_debs()  # cached by source content: the VM tier's Debian roots install the same
    print(f"\ndpkg-buildpackage (or its cache): {time.monotonic() - t0:.1f} s")
    return out


def deb(built: Path, package: str) -> Path:
    found = [d for d in built.glob(f"{package}_*.deb")]
    assert len(found) == 1, sorted(p.name for p in built.iterdir())
    return found[0]


def field(path: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(path), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def contents(path: Path) -> set[str]:
    out = subprocess.run(["dpkg-deb", "-c", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[5].removeprefix(".") for line in out.splitlines()}


@pytest.fixture(scope="module")
def root(built, tmp_path_factory) -> Path:
    """fdbox and fdbox-call unpacked over a copy of the distribution's units."""
    r = tmp_path_factory.mktemp("deb-root")
    (r / "lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, r / "lib/systemd/system", symlinks=True)
    for f in (REPO / "units").glob("*.service"):  # the system programs the units run (a host has them)
        for prog in re.findall(r"^Exec\w*=[-@:+!]*(/\S+)", f.read_text(), re.MULTILINE):
            if not Path(prog).name.startswith("fdbox") and os.path.exists(prog):
                (r / prog.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(prog, r / prog.lstrip("/"))
    for package in ("fdbox", "fdbox-call"):
        subprocess.run(["dpkg-deb", "-x", str(deb(built, package)), str(r)], check=True)
    return r


def test_three_packages_with_their_architectures(built):
    assert field(deb(built, "fdbox"), "Architecture") == "all"
    assert field(deb(built, "fdbox-dkms"), "Architecture") == "all"
    assert field(deb(built, "fdbox-call"), "Architecture") not in ("", "all")
    for package in ("fdbox", "fdbox-dkms", "fdbox-call"):
        assert field(deb(built, package), "Version") == __version__


def test_fdbox_relations(built):
    fdbox = deb(built, "fdbox")
    assert re.search(r"\bfdbox-call \(>= ", field(fdbox, "Depends")), field(fdbox, "Depends")
    assert "python3" in field(fdbox, "Depends")
    assert {"python3-dbus-fast", "python3-pyroute2"} <= set(re.split(r",\s*", field(fdbox, "Recommends")))
    assert "qemu-system-x86" in field(fdbox, "Suggests")
    assert "dkms" in field(deb(built, "fdbox-dkms"), "Depends")


def test_fdbox_ships_everything_install_host_does_and_the_docs(built):
    files = contents(deb(built, "fdbox"))
    units = {p.name for p in (REPO / "units").iterdir() if p.suffix in (".service", ".socket")}
    unitdir = next(d for d in ("/usr/lib/systemd/system/", "/lib/systemd/system/") if f"{d}fdboxd.service" in files)
    assert {f"{unitdir}{u}" for u in units} <= files
    for prog in ("fdboxd", "fdboxctl", "fdbox-qemu"):
        assert f"/usr/bin/{prog}" in files
        assert f"/usr/share/bash-completion/completions/{prog}" in files
    for page in (REPO / "man").glob("*.scd"):
        name, section = page.stem.rsplit(".", 1)
        assert f"/usr/share/man/man{section}/{name}.{section}.gz" in files, page.name
    assert {"/usr/lib/systemd/user/fdboxd.service", "/usr/lib/tmpfiles.d/fdbox.conf",
            "/usr/share/dbus-1/system.d/io.fdbox1.conf", "/usr/share/dbus-1/system-services/io.fdbox1.service",
            "/usr/share/doc/fdbox/README.md",  # uncompressed: the units' Documentation= names it
            *(f"/usr/share/doc/fdbox/docs/{d.name}" for d in (REPO / "docs").glob("*.md")),  # README's links
            "/usr/lib/python3/dist-packages/fdboxd/varlink/io.fdbox.Store.varlink"} <= files
    assert "/usr/libexec/fdbox/fdbox-call" in contents(deb(built, "fdbox-call"))


def test_units_are_enabled_the_debian_way(built, tmp_path):
    subprocess.run(["dpkg-deb", "-e", str(deb(built, "fdbox")), str(tmp_path / "ctl")], check=True)
    postinst = (tmp_path / "ctl/postinst").read_text()
    enabled = set(re.findall(r"deb-systemd-helper enable '([^']+)'", postinst))
    # The seal, and the suspend of every fdbox-qemu VM before it (RequiredBy= the seal and
    # systemd-kexec.service): a live update keeps the VMs from the first `systemctl kexec`.
    assert enabled == {"fdboxd.service", "fdboxd.socket", "fdbox-seal.service", "fdbox-qemu-suspend.service"}, enabled
    started = re.findall(r"deb-systemd-invoke \$_dh_action (.*) >", postinst)
    assert started == ["'fdboxd.service' 'fdboxd.socket'"], started  # never the seal
    # The user unit is each user's to enable: --no-enable's snippet only keeps an
    # enablement that already exists (debian-installed), it never enables on install.
    user = postinst.split("dh_installsystemduser", 1)[1].split("# End automatically added section", 1)[0]
    assert "--user enable" not in user or "--user debian-installed 'fdboxd.service'" in user, user
    assert "systemd-tmpfiles" in postinst


def test_lintian_reports_no_errors_and_only_documented_warnings(built):
    changes = next(built.glob("*.changes"))
    p = subprocess.run([need("lintian"), "--allow-root", str(changes)], capture_output=True, text=True, timeout=600)
    tags = re.findall(r"^([EW]): (\S+): (\S+)", p.stdout, re.M)
    errors = [t for t in tags if t[0] == "E"]
    assert not errors, p.stdout
    kept = (REPO / "debian/README.source").read_text()
    undocumented = {t[2] for t in tags if t[0] == "W" and t[2] not in kept}
    assert not undocumented, p.stdout


def test_unpacked_units_verify_clean(root):
    unitdir = next(d for d in ("usr/lib/systemd/system", "lib/systemd/system") if (root / d / "fdbox-seal.service").is_file())
    ours = sorted(p.name for p in (root / unitdir).iterdir() if p.name.startswith("fdbox") and p.is_file())
    assert len(ours) == 5, ours
    units = [f"/{unitdir}/{u.replace('@', '@test')}" for u in ours]
    p = subprocess.run([need("systemd-analyze"), "verify", "--man=no", f"--root={root}", *units],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


def test_unpacked_fdboxctl_runs(root):
    env = dict(os.environ, PYTHONPATH=str(root / "usr/lib/python3/dist-packages"), PATH=DEB_PATH)
    for prog in ("fdboxctl", "fdboxd", "fdbox-qemu"):
        script = root / "usr/bin" / prog
        assert script.read_text().startswith("#!/usr/bin/python3"), prog  # Debian's python
        p = subprocess.run([str(script), "--version"], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.split() == [prog, __version__], p
    p = subprocess.run([str(root / "usr/libexec/fdbox/fdbox-call")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "usage: fdbox-call" in p.stderr, p


def test_dkms_builds_the_packaged_source(built, tmp_path):
    """The source fdbox-dkms installs in /usr/src, built by DKMS against the test kernel;
    a kernel outside BUILD_EXCLUSIVE_KERNEL (Debian 12's 6.1) is skipped (exit 77)."""
    kernel = vmlib.find_test_kernel()
    if kernel is None or not kernel.build_tarball.is_file():
        if os.environ.get("CI") and vmlib.test_kernel_dir().is_dir():
            pytest.fail("test kernel build tree missing", pytrace=False)
        pytest.skip(f"no test kernel build tree at {vmlib.test_kernel_dir()}")
    kbuild = vmlib.kernel_build_dir(kernel)
    unpacked = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb(built, "fdbox-dkms")), str(unpacked)], check=True)
    src = unpacked / "usr/src"
    assert (src / f"fdbox-{__version__}/dkms.conf").is_file()
    tree = tmp_path / "dkms"
    tree.mkdir()
    trees = ["--sourcetree", str(src), "--dkmstree", str(tree)]
    release = (kbuild / "include/config/kernel.release").read_text().strip()

    def dkms(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([need("dkms"), *args, "-m", "fdbox", "-v", __version__, *trees],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)

    p = dkms("add")
    assert p.returncode == 0, p.stdout
    p = dkms("build", "-k", release, "--kernelsourcedir", str(kbuild))
    assert p.returncode == 0, p.stdout
    assert list(tree.rglob(f"{release}/*/module/fdbox.ko*")), p.stdout
    p = dkms("build", "-k", "6.1.0-28-amd64", "--kernelsourcedir", str(kbuild))
    assert p.returncode == 77 and "BUILD_EXCLUSIVE" in p.stdout, p.stdout
