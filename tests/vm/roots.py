"""Debian roots for the VM tier: Debian 13 (trixie) and Debian testing (forky), built with
mmdebstrap from the machine's package mirror and booted over 9p (``run_guest(root=...)``).

Two layers, each cached under ``build/roots/`` by a hash of what makes it:

* :func:`base_root`: ``mmdebstrap --variant=minbase`` of a suite with the packages of
  :data:`RECIPES` (systemd, dbus, python3, kexec-tools, kmod, and what the ``fdbox``
  package depends on or recommends); rebuilt only when its recipe changes.
* :func:`installed_root`: a copy of a base root with this checkout's own ``.deb``
  packages (:func:`build_debs`, ``dpkg-buildpackage`` as ``test_deb.py`` runs it) installed
  by ``apt-get install ./fdbox_*.deb ...`` in a chroot, their dependencies from the root's
  own suite (already in the base), and fdbox.ko built by DKMS from the ``fdbox-dkms``
  package's source against the test kernel's tree (the roots have no headers for the test
  kernel, and no compiler), put where DKMS installs it (``updates/dkms``) with ``depmod``.

``apt`` in the roots keeps ``Acquire::Check-Valid-Until "false"``: the mirror's forky
Release file is past its Valid-Until date. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import vmlib

DEB_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
"""Debian's own tools and python3 for the package build (not a pyenv python earlier on PATH)."""

APT_OPTS = ('Acquire::Check-Valid-Until "false"',)

COMMON_PACKAGES = (
    # PID 1 and the system bus (fdboxd's D-Bus front-end), the stage scripts' tools
    "systemd", "dbus", "kexec-tools", "kmod", "iproute2", "procps",
    # what the fdbox package depends on (python3) and recommends (D-Bus, taps)
    "python3", "python3-dbus-fast", "python3-pyroute2",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What one root is made of; its hash names the cached root."""

    suite: str
    packages: tuple[str, ...] = COMMON_PACKAGES
    variant: str = "minbase"

    def digest(self) -> str:
        text = json.dumps([self.suite, self.variant, sorted(self.packages), APT_OPTS, 1])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


RECIPES = {
    "trixie": Recipe("trixie"),  # Debian 13: systemd 257, Python 3.13, QEMU 10.0
    "forky": Recipe("forky"),  # Debian testing: systemd 262, Python 3.14, QEMU 11.1
}


def roots_dir() -> Path:
    """``$FDBOX_ROOTS_DIR``, else ``<repo>/build/roots`` (gitignored)."""
    d = Path(os.environ.get("FDBOX_ROOTS_DIR", vmlib.repo_root() / "build" / "roots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def mirror() -> str:
    """``$FDBOX_ROOTS_MIRROR``, else the host's own Debian mirror from its apt sources."""
    if os.environ.get("FDBOX_ROOTS_MIRROR"):
        return os.environ["FDBOX_ROOTS_MIRROR"]
    texts = []
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(f.read_text())
        except OSError:
            pass
    for m in re.finditer(r"(?:^URIs:|^deb(?:\s+\[[^\]]*\])?)\s+(\S+/debian)/?\s", "\n".join(texts) + "\n", re.M):
        return m.group(1)
    return "http://deb.debian.org/debian"


def mirror_problem(suite: str, timeout: float = 15.0) -> str | None:
    """Why ``suite`` cannot be fetched from :func:`mirror` (None: its InRelease is served)."""
    url = f"{mirror()}/dists/{suite}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if r.status != 200:
                return f"{url}: HTTP {r.status}"
            r.read(1)
    except OSError as e:
        return f"{url}: {e}"
    return None


def missing_tools() -> list[str]:
    """Host programs the roots need (mmdebstrap, and dpkg-buildpackage/dkms for the packages)."""
    return [t for t in ("mmdebstrap", "dpkg-buildpackage", "dkms", "chroot", "depmod")
            if shutil.which(t, path=DEB_PATH) is None]


def _run(cmd: list[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        raise RuntimeError(f"{what}: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-6000:]}")
    return p


def _timed(record: dict[str, float] | None, name: str, t0: float) -> None:
    if record is not None:
        record[name] = round(time.monotonic() - t0, 1)


def _cached(name: str, build: "callable[[Path], None]", record: dict[str, float] | None = None) -> Path:  # type: ignore[valid-type]
    """``roots_dir()/name``, made by ``build(tmpdir)`` once (a lock; the rename is the commit).

    Older entries of the same kind (``name`` up to its last ``-``) are removed.
    """
    dest = roots_dir() / name
    kind = name.rsplit("-", 1)[0]
    with vmlib._locked(f"root-{kind}"):
        if dest.is_dir():
            return dest
        for old in roots_dir().glob(f"{kind}-*"):
            if old.is_dir() and old.name.rsplit("-", 1)[0] == kind:
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=roots_dir(), prefix=f".{name}."))
        t0 = time.monotonic()
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp's 0700 would be the root's /
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _timed(record, name, t0)
    return dest


def base_root(suite: str, record: dict[str, float] | None = None) -> Path:
    """The minbase root of ``suite`` (:data:`RECIPES`), built by mmdebstrap once per recipe."""
    recipe = RECIPES[suite]

    def build(tmp: Path) -> None:
        cmd = ["mmdebstrap", f"--variant={recipe.variant}", "--mode=root", "--format=directory",
               *(f"--aptopt={o}" for o in APT_OPTS), "--include=" + ",".join(recipe.packages),
               recipe.suite, str(tmp), mirror()]
        _run(cmd, f"the {suite} root", env={**os.environ, "PATH": DEB_PATH}, timeout=1200)

    return _cached(f"{suite}-base-{recipe.digest()}", build, record)


def _source_files() -> list[str]:
    repo = vmlib.repo_root()
    p = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
                       capture_output=True, text=True)
    if p.returncode == 0:
        return sorted(f for f in p.stdout.split("\0") if f and (repo / f).is_file())
    return sorted(str(f.relative_to(repo)) for f in repo.rglob("*") if f.is_file()
                  and not {".git", "build", "__pycache__"} & set(f.relative_to(repo).parts))


def build_debs(record: dict[str, float] | None = None) -> Path:
    """This checkout's packages, built by ``dpkg-buildpackage -us -uc -b`` of a copy of it.

    Every source file (tracked and new) is copied; the cache key is the content of all
    but the tests (nothing of tests/ goes into a package, and a test edited must not cost
    a rebuild). Returns a directory holding the ``.deb`` files and the ``.changes``.
    """
    repo = vmlib.repo_root()
    files = _source_files()
    h = hashlib.sha256()
    for f in files:
        if not f.startswith("tests/"):
            h.update(f.encode() + b"\0" + (repo / f).read_bytes() + b"\0")

    def build(tmp: Path) -> None:
        src = tmp / "fdbox"
        for f in files:
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, src / f)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DEB_", "VIRTUAL_ENV"))}
        env["PATH"] = DEB_PATH
        _run(["dpkg-buildpackage", "-us", "-uc", "-b"], "the packages", cwd=src, env=env, timeout=900)
        shutil.rmtree(src)

    return _cached(f"debs-{h.hexdigest()[:12]}", build, record)


def deb(debs: Path, package: str) -> Path:
    """The one ``package_*.deb`` in ``debs``."""
    found = list(debs.glob(f"{package}_*.deb"))
    if len(found) != 1:
        raise FileNotFoundError(f"{package}_*.deb in {debs}: {sorted(p.name for p in debs.iterdir())}")
    return found[0]


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def dkms_module(debs: Path, kbuild: Path, record: dict[str, float] | None = None) -> Path:
    """fdbox.ko built by DKMS from the source ``fdbox-dkms`` ships, against ``kbuild`` (as
    ``test_deb.py`` checks it builds); cached by the package and the kernel tree's release."""
    pkg = deb(debs, "fdbox-dkms")
    version = pkg.name.split("_")[1]
    release = (kbuild / "include/config/kernel.release").read_text().strip()

    def build(tmp: Path) -> None:
        unpacked = tmp / "deb"
        unpacked.mkdir()
        _run(["dpkg-deb", "-x", str(pkg), str(unpacked)], "fdbox-dkms unpack")
        tree = tmp / "dkms"
        tree.mkdir()
        trees = ["-m", "fdbox", "-v", version, "--sourcetree", str(unpacked / "usr/src"), "--dkmstree", str(tree)]
        env = {**os.environ, "PATH": DEB_PATH}
        _run(["dkms", "add", *trees], "dkms add", env=env)
        _run(["dkms", "build", *trees, "-k", release, "--kernelsourcedir", str(kbuild)], "dkms build",
             env=env, timeout=900)
        [ko] = list(tree.rglob(f"{release}/*/module/fdbox.ko*"))
        shutil.copy2(ko, tmp / ko.name)
        shutil.rmtree(unpacked)
        shutil.rmtree(tree)

    h = hashlib.sha256(pkg.read_bytes() + release.encode()).hexdigest()[:12]
    [ko] = list(_cached(f"fdbox-ko-{h}", build, record).glob("fdbox.ko*"))
    return ko


def installed_root(suite: str, debs: Path, kbuild: Path, record: dict[str, float] | None = None) -> Path:
    """A copy of :func:`base_root` with ``fdbox`` and ``fdbox-call`` installed by apt and
    :func:`dkms_module` for the test kernel (``updates/dkms``, ``depmod``); cached by the
    base root and the packages."""
    base = base_root(suite, record)
    pkgs = [deb(debs, p) for p in ("fdbox", "fdbox-call", "fdbox-dkms")]
    ko = dkms_module(debs, kbuild, record)
    release = (kbuild / "include/config/kernel.release").read_text().strip()

    def build(tmp: Path) -> None:
        t0 = time.monotonic()
        _run(["cp", "-a", "--reflink=auto", f"{base}/.", str(tmp)], "copy the base root")
        _timed(record, f"{suite}: copy base", t0)
        t0 = time.monotonic()
        (tmp / "tmp/fdbox-debs").mkdir(parents=True)
        for p in pkgs[:2]:
            shutil.copy2(p, tmp / "tmp/fdbox-debs" / p.name)
        env = {"PATH": DEB_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
        # The dependencies are in the base root already: apt fetches nothing.
        _run(["chroot", str(tmp), "apt-get", "install", "-y", "-oDpkg::Use-Pty=0",
              *(f"-o{o.replace(' ', '=').replace(chr(34), '')}" for o in APT_OPTS),
              *(f"/tmp/fdbox-debs/{p.name}" for p in pkgs[:2])], f"apt-get install in the {suite} root", env=env,
             timeout=600)
        shutil.rmtree(tmp / "tmp/fdbox-debs")
        mod_dir = tmp / "usr/lib/modules" / release / "updates/dkms"
        mod_dir.mkdir(parents=True)
        shutil.copy2(ko, mod_dir / ko.name)
        _run(["depmod", "-b", str(tmp), release], "depmod")
        # Nothing for systemd's first-boot updates to do (ConditionNeedsUpdate=: ldconfig,
        # the journal catalog, ~10 s of every boot under TCG): the root is up to date.
        for f in ("etc/.updated", "var/.updated"):
            (tmp / f).write_text("# written by tests/vm/roots.py\n")
        _timed(record, f"{suite}: apt install + module", t0)

    return _cached(f"{suite}-fdbox-{base.name.rsplit('-', 1)[1]}{_digest(*pkgs, ko)}", build, record)


def package_versions(root: Path, *packages: str) -> dict[str, str]:
    """``dpkg-query``'s version of each package installed in ``root``."""
    p = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\n",
                        *packages], capture_output=True, text=True)
    return dict(line.split(" ", 1) for line in p.stdout.splitlines() if " " in line)


def pytest_root(suite: str, record: dict[str, float] | None = None) -> Path:
    """A copy of :func:`base_root` with the suite's ``python3-pytest`` (apt, from the
    mirror), for the unit tier on the suite's python; cached by the base root."""
    base = base_root(suite, record)

    def build(tmp: Path) -> None:
        _run(["cp", "-a", "--reflink=auto", f"{base}/.", str(tmp)], "copy the base root")
        env = {"PATH": DEB_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
        opts = [f"-o{o.replace(' ', '=').replace(chr(34), '')}" for o in APT_OPTS]
        _run(["chroot", str(tmp), "apt-get", "update", "-q", *opts], f"apt-get update in the {suite} root",
             env=env, timeout=600)
        _run(["chroot", str(tmp), "apt-get", "install", "-y", "-q", "-oDpkg::Use-Pty=0", *opts, "python3-pytest"],
             f"apt-get install python3-pytest in the {suite} root", env=env, timeout=600)

    return _cached(f"{suite}-pytest-{base.name.rsplit('-', 1)[1]}", build, record)


def run_in_root(root: Path, script: str, *, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``sh -c script`` chroot'ed in ``root`` without changing it: in a private mount
    namespace, on a tmpfs overlay of it, with /proc, a fresh /tmp and this checkout at its
    host path (cwd). Needs root (unshare, mount, chroot)."""
    repo = vmlib.repo_root()
    work = Path(tempfile.mkdtemp(prefix="fdbox-root-"))
    inner = f"""set -e
mount -t tmpfs tmpfs {work}
mkdir {work}/u {work}/w {work}/m
mount -t overlay overlay -o lowerdir={root},upperdir={work}/u,workdir={work}/w {work}/m
mkdir -p {work}/m{repo}
mount --bind {repo} {work}/m{repo}
mount -t proc proc {work}/m/proc
mount -t tmpfs tmpfs {work}/m/tmp
exec chroot {work}/m /bin/sh -c 'cd {repo} && exec /bin/sh -ec "$1"' sh "$1"
"""
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", inner, "sh", script],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env={"PATH": DEB_PATH, "LANG": "C.UTF-8", "HOME": "/root"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
