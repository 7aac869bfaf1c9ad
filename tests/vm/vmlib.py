"""The VM test tier: boot the fdbox test kernel in qemu and run stages inside it.

Why a VM: fdbox.ko, KHO and kexec need a real kernel we control. The guest runs
the *host's* userspace: the host root is shared read-only over 9p with a tmpfs
overlay on top, so the guest runs the same ``python3`` and sees this checkout at
the same absolute path. Nothing is installed into an image; a test only writes a
shell "stage script".

A run is one qemu process that boots once per stage:

* stage 1 runs ``stage1``; if it calls ``vm-kexec`` the same kernel and
  initramfs are kexec'd (KHO handover) and stage 2 runs ``stage2``;
* every stage's exit status, output and ``dmesg`` land in the per-run output
  directory, which the guest sees writable at ``/out`` (a second 9p export);
* the guest powers itself off at the end, a watchdog in the initramfs powers it
  off after ``timeout``, and the host kills qemu a little later still;
* with ``systemd=True`` systemd is PID 1 instead of a chroot'd shell, and the
  stage scripts run in a service (see :func:`run_guest`).

Inside a stage (``/bin/sh -e``, cwd = the checkout) the environment has
``FDBOX_VM_STAGE``, ``FDBOX_VM_REPO``, ``FDBOX_VM_KERNEL``, ``FDBOX_VM_INITRD``,
``FDBOX_VM_MODULE`` (if a module was given), ``PYTHON`` (the host's interpreter,
also first on PATH as ``python3``) and ``vm-kexec`` on PATH. The host's tools come
first on PATH; busybox applets (``/run/fdbox-vm/bin``) fill the gaps, e.g.
``insmod``/``rmmod``/``lsmod`` on a host without the kmod package. Guest paths: the
checkout and anything else on the host root except ``/tmp``, ``/var/tmp`` and
``/run`` (fresh tmpfs in the guest); files under the run's output directory are
at ``/out/...`` (see :meth:`GuestRun.guest_path`).

Adding a test
-------------
In-guest pytest tests (run as root in the test kernel): put ``test_*.py`` in
``tests/vm/guest/`` (the host never collects that dir) and add a host test::

    def test_ioctls(vm_with_module):            # vm_with_module: fdbox.ko built
        res = vm_with_module.pytest(["tests/vm/guest/test_ioctls.py"],
                                    setup='insmod "$FDBOX_VM_MODULE"')
        res.check()                             # fails naming each in-guest failure
        vmlib.assert_no_kernel_problems(res.run)   # already part of check()

Shell stages and kexec (``vm`` has no module; ``vm_with_module`` sets
``$FDBOX_VM_MODULE``)::

    run = vm_with_module.run(
        'insmod "$FDBOX_VM_MODULE"; ...; vm-kexec',            # stage 1
        'insmod "$FDBOX_VM_MODULE"; ' + vmlib.pytest_command(  # stage 2
            ["tests/vm/guest/test_after_kexec.py"], junit="/out/junit-2.xml"),
        cmdline_extra=["hugepages=64"], timeout=600)
    run.check()     # every stage ran and passed, no BUG/WARNING/Oops/panic
    results = vmlib.parse_junit(run.out_dir / "junit-2.xml")

Stdlib only: the in-guest side imports this module too (``in_guest()``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
INITRAMFS_SRC = HERE / "initramfs"
GUEST_BIN = INITRAMFS_SRC / "bin"

BASE_CMDLINE = ("console=ttyS0", "kho=on", "liveupdate=on", "panic=-1", "printk.time=1")
"""Kernel command line of every run; ``printk.time=1`` lets :func:`kernel_problems`
tell kernel lines from test output on the console."""

KERNEL_PROBLEM_RE = re.compile(
    r"\bBUG[: ]|\bWARNING:|\bOops\b|Kernel panic|general protection|"
    r"\bUBSAN:|\bKASAN:|kernel BUG at|Call Trace:|"
    # what the debug kernel's checkers print (lockdep, DEBUG_ATOMIC_SLEEP, DEBUG_LIST, RCU)
    r"possible (circular|recursive) locking|inconsistent lock state|"
    r"sleeping function called from invalid context|suspicious RCU usage|"
    r"lock held when returning to user space|DEBUG_LOCKS_WARN_ON|list_(add|del) corruption"
)
_KMSG_TIME_RE = re.compile(r"\[\s*\d+\.\d{6}\]")

GUEST_EXTRA_TIME = 5.0
"""The host kills qemu this many seconds after the in-guest watchdog should have fired."""


# --------------------------------------------------------------------------- locating


def repo_root() -> Path:
    """The checkout this file belongs to (tests/vm/vmlib.py → ../..)."""
    return HERE.parents[1]


def cache_dir() -> Path:
    """Where built artefacts are cached: ``<repo>/build/vm`` (gitignored, ``build/``)."""
    d = Path(os.environ.get("FDBOX_VM_CACHE", repo_root() / "build" / "vm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclasses.dataclass(frozen=True)
class TestKernel:
    """The prebuilt test kernel (see shared/testkernel/README.md)."""

    __test__ = False  # not a pytest test class

    dir: Path
    bzimage: Path
    build_tarball: Path
    release: str


def test_kernel_dir() -> Path:
    """``$FDBOX_TEST_KERNEL_DIR`` (or ``$FDBOX_TEST_KERNEL``), else ``../shared/testkernel``.

    The default is relative to the repository root because CI clones the repo as
    a sibling of ``shared/``.
    """
    for var in ("FDBOX_TEST_KERNEL_DIR", "FDBOX_TEST_KERNEL"):
        if os.environ.get(var):
            return Path(os.environ[var]).resolve()
    return (repo_root().parent / "shared" / "testkernel").resolve()


test_kernel_dir.__test__ = False  # type: ignore[attr-defined]


def find_test_kernel() -> TestKernel | None:
    """The test kernel if its directory has a bzImage, else None."""
    d = test_kernel_dir()
    bz = d / "bzImage"
    if not bz.is_file():
        return None
    rel = d / "kernel.release"
    return TestKernel(
        dir=d,
        bzimage=bz,
        build_tarball=d / "linux-build.tar.xz",
        release=rel.read_text().strip() if rel.is_file() else "unknown",
    )


def debug_kernel_dir() -> Path:
    """``$FDBOX_TEST_KERNEL_DEBUG_DIR``, else ``../shared/testkernel-debug`` (the same kernel
    with KASAN, lockdep, fault injection and KVM with guest_memfd; see its README)."""
    if os.environ.get("FDBOX_TEST_KERNEL_DEBUG_DIR"):
        return Path(os.environ["FDBOX_TEST_KERNEL_DEBUG_DIR"]).resolve()
    return (repo_root().parent / "shared" / "testkernel-debug").resolve()


def find_debug_kernel() -> TestKernel | None:
    """The debug test kernel if its directory has a bzImage, else None."""
    d = debug_kernel_dir()
    if not (d / "bzImage").is_file():
        return None
    rel = d / "kernel.release"
    return TestKernel(dir=d, bzimage=d / "bzImage", build_tarball=d / "linux-build.tar.xz",
                      release=rel.read_text().strip() if rel.is_file() else "unknown")


DEBUG_CMDLINE = ("pci=noacpi", "kho_scratch=50%")
"""What the debug kernel needs on its command line (its README: without ``pci=noacpi``
ACPI's PCI routing runs past its loop limit under KASAN; KHO's default scratch cannot be
reserved beside KASAN's shadow)."""

DEBUG_QEMU = ("-cpu", "max")
"""TCG emulates AMD's SVM with ``-cpu max``, so the debug kernel's kvm_amd loads and
``/dev/kvm`` gives guest_memfd inside the guest."""


def missing_tools() -> list[str]:
    """Host programs the tier needs that are not installed (empty list: all there)."""
    missing = [t for t in ("qemu-system-x86_64", "kexec") if not _which(t)]
    if busybox_path() is None:
        missing.append("busybox (static, Debian busybox-static)")
    return missing


def _which(prog: str) -> str | None:
    return shutil.which(prog, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def busybox_path() -> Path | None:
    """A statically linked busybox (it runs before any host library is reachable)."""
    for cand in (os.environ.get("FDBOX_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox", _which("busybox")):
        if cand and Path(cand).is_file() and _is_static_elf(Path(cand)):
            return Path(cand)
    return None


def _is_static_elf(path: Path) -> bool:
    """True when the ELF file has no PT_INTERP program header (no dynamic loader)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialise cache builds across processes (pytest-xdist, parallel CI jobs)."""
    with open(cache_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- module


def kernel_build_dir(kernel: TestKernel | None = None, *, name: str = "linux-build") -> Path:
    """``linux-build.tar.xz`` extracted once into ``build/vm/<name>``.

    Re-extracted when the tarball changes (its size and mtime are remembered). Each
    kernel its own ``name`` (the debug kernel's tree is ``linux-build-debug``): the two
    share a release string, and a module built against one does not load in the other.
    """
    kernel = kernel or _require_kernel()
    dest = cache_dir() / name
    st = kernel.build_tarball.stat()
    stamp = f"{kernel.build_tarball} {st.st_size} {st.st_mtime_ns}\n"
    marker = cache_dir() / f"{name}.stamp"
    with _locked(name):
        if marker.is_file() and marker.read_text() == stamp and dest.is_dir():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".linux-build."))
        try:
            subprocess.run(["tar", "-xJf", str(kernel.build_tarball), "-C", str(tmp)], check=True)
            entries = list(tmp.iterdir())
            # The tarball holds one top-level directory (linux-build/); accept a flat one too.
            top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
            top.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        marker.write_text(stamp)
    return dest


def build_module(src: Path | None = None, kdir: Path | None = None, *, jobs: int | None = None,
                 name: str | None = None, make_args: Sequence[str] = ()) -> Path:
    """Build an out-of-tree module with ``make -C <copy of src> KDIR=<kdir> MAKE_ARGS``;
    return the .ko.

    ``src`` defaults to the checkout's ``kmod/``. It is copied to
    ``build/vm/<name>-src`` (``name`` defaults to the source directory's name) first so a
    build never writes into the source tree (and never races with a developer's own
    build there). ``kdir`` defaults to :func:`kernel_build_dir`. A copy already built from
    the same sources, tree and arguments is reused, not rebuilt: two test processes
    (scripts/test-lanes) share it, and one never deletes the ``.ko`` a running guest of the
    other is loading. Raises ``RuntimeError`` with make's output on failure.
    """
    src = (src or repo_root() / "kmod").resolve()
    if not (src / "Makefile").is_file():
        raise FileNotFoundError(f"{src}/Makefile: no module source")
    kdir = kdir or kernel_build_dir()
    name = name or src.name
    work = cache_dir() / f"{name}-src"
    junk = ("*.o", "*.ko", "*.mod", "*.mod.c", ".*.cmd", "Module.symvers", "modules.order", ".tmp_versions")
    digest = hashlib.sha256(f"{kdir}\0{list(make_args)}\0".encode())
    for f in sorted(p for p in src.rglob("*") if p.is_file() and not any(p.match(j) for j in junk)):
        digest.update(f"{f.relative_to(src)}\0".encode())
        digest.update(f.read_bytes())
    stamp = cache_dir() / f"{name}-src.stamp"
    with _locked(f"module-{name}"):
        kos = sorted(work.rglob("*.ko"), key=lambda p: p.stat().st_mtime) if work.is_dir() else []
        if kos and stamp.is_file() and stamp.read_text() == digest.hexdigest():
            return kos[-1]
        stamp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work, symlinks=True, ignore=shutil.ignore_patterns(*junk))
        cmd = ["make", "-C", str(work), f"KDIR={kdir}", f"-j{jobs or os.cpu_count() or 1}", *make_args]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stdout}")
        kos = sorted(work.rglob("*.ko"), key=lambda p: p.stat().st_mtime)
        if not kos:
            raise RuntimeError(f"{shlex.join(cmd)} built no .ko:\n{p.stdout}")
        stamp.write_text(digest.hexdigest())
        return kos[-1]


# --------------------------------------------------------------------------- initramfs


def cpio_newc(entries: Sequence[tuple[str, int, bytes, int, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev_major, rdev_minor) entries.

    Written here rather than with cpio(1) so device nodes (/dev/console) need no root
    and the archive is byte-for-byte reproducible (all mtimes 0).
    """
    out = io.BytesIO()

    def put(ino: int, name: str, mode: int, data: bytes, rmaj: int, rmin: int) -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmaj, rmin, len(nb), 0)
        )
        out.write(hdr.encode() + nb)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data, rmaj, rmin) in enumerate(entries, start=1):
        put(ino, name, mode, data, rmaj, rmin)
    put(0, "TRAILER!!!", 0, b"", 0, 0)
    return out.getvalue()


def build_initramfs() -> Path:
    """The gzip'd initramfs (static busybox + tests/vm/initramfs/init), cached by content.

    The path is inside the checkout's build/ dir, so the guest can read it too, which
    ``vm-kexec`` needs (``kexec -s --initrd=`` wants a file).
    """
    bb = busybox_path()
    if bb is None:
        raise FileNotFoundError("no static busybox (apt install busybox-static)")
    init = (INITRAMFS_SRC / "init").read_bytes()
    d, f, c = 0o040755, 0o100755, 0o020600
    entries = [
        (name, d, b"", 0, 0)
        for name in ("bin", "dev", "proc", "sys", "tmp", "host", "ovl", "root")
    ] + [
        ("dev/console", c, b"", 5, 1),
        ("bin/busybox", f, bb.read_bytes(), 0, 0),
        ("init", f, init, 0, 0),
    ]
    raw = cpio_newc(entries)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    path = cache_dir() / f"initramfs-{digest}.cpio.gz"
    with _locked("initramfs"):
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
            tmp.rename(path)
    return path


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass
class StageResult:
    """What one boot of a run left in the output dir."""

    stage: int
    status: str
    """``"ok"`` (exit 0), ``"kexec"`` (left by vm-kexec), ``"failed"`` (nonzero exit)
    or ``"missing"`` (never finished: crash, timeout, or a kexec that never booted)."""
    rc: int | None
    log: str
    dmesg: str
    journal: str
    """``journalctl -b`` of the stage (systemd runs only)."""
    boot_seconds: float | None
    """Guest uptime when the stage script started (kernel + init + mounts)."""
    script_seconds: float | None
    """How long the stage script ran (guest clock)."""


class VMTestFailure(AssertionError):
    """A run or an in-guest test failed; the message is meant to be read as is."""


@dataclasses.dataclass
class GuestRun:
    """Result of :func:`run_guest`."""

    out_dir: Path
    console: str
    stages: list[StageResult]
    expected_stages: int
    qemu_returncode: int | None
    timed_out: bool
    wall_seconds: float
    cmdline: str

    def stage(self, n: int) -> StageResult:
        """Stage ``n`` (1-based)."""
        return self.stages[n - 1]

    def guest_path(self, host_path: Path | str) -> str:
        """The guest's path for a file under :attr:`out_dir` (``/out/...``)."""
        return guest_path(host_path, self.out_dir)

    def problems(self) -> list[str]:
        """Everything wrong with the run, one readable line each (empty: it went fine)."""
        errs: list[str] = []
        if self.timed_out:
            errs.append(f"host timeout: qemu killed after {self.wall_seconds:.0f}s")
        if "fdbox-vm: TIMEOUT" in self.console:
            errs.append("guest watchdog fired (fdbox.deadline, the run's timeout)")
        for line in self.console.splitlines():
            if line.startswith("fdbox-vm: FATAL"):
                errs.append(line)
        for s in self.stages:
            last = s.stage == self.expected_stages
            if s.status == "failed" or (s.status == "missing"):
                errs.append(f"stage {s.stage}: {s.status} (rc={s.rc})")
            elif s.status == "kexec" and last:
                errs.append(f"stage {s.stage}: kexec'd but no stage {s.stage + 1} was expected")
            elif s.status == "ok" and not last:
                errs.append(f"stage {s.stage}: exited 0 without kexec, stage {s.stage + 1} never ran")
        errs += [f"kernel: {p}" for p in kernel_problems(self.console, console=True)]
        for s in self.stages:
            errs += [f"kernel (stage {s.stage} dmesg): {p}" for p in kernel_problems(s.dmesg)]
        return errs

    @property
    def ok(self) -> bool:
        return not self.problems()

    def check(self) -> None:
        """Raise :class:`VMTestFailure` with stage logs and console tail unless :attr:`ok`."""
        errs = self.problems()
        if errs:
            raise VMTestFailure(self.report(errs))

    def report(self, errs: Sequence[str] | None = None) -> str:
        """A readable summary: problems, each stage's log tail, the console tail."""
        errs = self.problems() if errs is None else errs
        parts = [f"VM run in {self.out_dir}: " + ("OK" if not errs else "FAILED")]
        parts += [f"  - {e}" for e in errs]
        for s in self.stages:
            parts.append(f"--- stage {s.stage} ({s.status}, rc={s.rc}) log tail ---")
            parts.append(_tail(s.log, 40))
        parts.append("--- console tail ---")
        parts.append(_tail(self.console, 40))
        return "\n".join(parts)


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def guest_path(host_path: Path | str, out_dir: Path | str) -> str:
    """Map a host path under ``out_dir`` to the guest's ``/out/...``; others unchanged.

    Other host paths are the same in the guest except under /tmp, /var/tmp and /run,
    which the guest replaces with tmpfs: put in-guest test files in the checkout or
    in the run's output directory.
    """
    p = Path(host_path).resolve()
    o = Path(out_dir).resolve()
    if p == o or o in p.parents:
        return str(Path("/out") / p.relative_to(o))
    return str(p)


def kernel_problems(text: str, *, console: bool = False) -> list[str]:
    """Lines that show a kernel problem: BUG, WARNING, Oops, panic, GPF, a call trace.

    ``console=True`` only considers lines carrying a printk timestamp (``[ 1.234567]``),
    i.e. the kernel's own lines, so test output that says "WARNING:" does not count.
    """
    found = []
    for line in text.splitlines():
        if console and not _KMSG_TIME_RE.search(line):
            continue
        if KERNEL_PROBLEM_RE.search(line):
            found.append(line.strip())
    return found


def assert_no_kernel_problems(run: GuestRun) -> None:
    """Fail (``VMTestFailure``) if the console or any stage's dmesg shows a kernel problem."""
    probs = kernel_problems(run.console, console=True)
    for s in run.stages:
        probs += kernel_problems(s.dmesg)
    if probs:
        raise VMTestFailure("kernel problems in the guest:\n  " + "\n  ".join(probs) + "\n" + run.report())


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _float(path: Path) -> float | None:
    try:
        return float(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _collect_stage(out: Path, n: int) -> StageResult:
    rc_text = _read(out / f"stage{n}.rc").strip()
    rc: int | None = None
    if rc_text == "kexec":
        status = "kexec"
    elif rc_text.lstrip("-").isdigit():
        rc = int(rc_text)
        status = "ok" if rc == 0 else "failed"
    else:
        status = "missing"
    start, end = _float(out / f"stage{n}.start"), _float(out / f"stage{n}.end")
    return StageResult(
        stage=n,
        status=status,
        rc=rc,
        log=_read(out / f"stage{n}.log"),
        dmesg=_read(out / f"stage{n}.dmesg"),
        journal=_read(out / f"stage{n}.journal"),
        boot_seconds=start,
        script_seconds=(end - start) if start is not None and end is not None else None,
    )


def compile_checkout() -> None:
    """Byte-compile the checkout's Python on the host, as installing the package does.

    The guest sees the host root read-only under a tmpfs overlay, so a ``.pyc`` it writes
    is gone at the next boot or kexec: without this every fdboxd start in a stage compiled
    the whole package from source under TCG, and the bench's start floors measured that
    (issue 18, Restore). ``py3compile`` does the same for the Debian package.
    """
    import compileall

    root = repo_root()
    for sub in ("fdboxd", "bench", "libexec", "contrib", "tests"):
        if (root / sub).is_dir():
            compileall.compile_dir(root / sub, quiet=1, workers=1)


def guest_env(extra: Mapping[str, str] | None = None, *, root: Path | None = None) -> dict[str, str]:
    """The environment every stage script starts with (see the module docstring).

    With ``root`` (another root than the host's, :mod:`roots`) the stage gets that root's
    own ``/usr/bin/python3`` and no ``PYTHONPATH``: what runs is what is installed there
    (a stage that wants the checkout's code sets ``PYTHONPATH=$FDBOX_VM_REPO`` itself).
    """
    py = sys.executable if root is None else "/usr/bin/python3"
    pydir = f"{Path(py).parent}:" if root is None else ""
    env = {
        "PATH": f"{GUEST_BIN}:{pydir}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        ":/run/fdbox-vm/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHON": py,
        **({"PYTHONPATH": str(repo_root())} if root is None else {}),
        "PYTHONUNBUFFERED": "1",
        "FDBOX_VM_GUEST": "1",
        "FDBOX_VM_REPO": str(repo_root()),
        "FDBOX_VM_CWD": str(repo_root()),
    }
    env.update(extra or {})
    return env


#: Directories the guest gets as fresh tmpfs (see the initramfs's init).
GUEST_TMPFS = ("/tmp", "/var/tmp", "/run")


def _kept_paths(kernel: TestKernel, initramfs: Path, module: Path | None, root: Path | None = None) -> list[str]:
    """Host paths a run needs that would be hidden under the guest's fresh tmpfs dirs.

    A CI checkout cloned under /tmp (with ../shared beside it) must still be the guest's
    checkout; init overlays each of these back in from the host's copy. With ``root``
    (another root) every one of them is kept, wherever it is: that root has none of them,
    and its python is its own (the host's interpreter is not one of them).
    """
    wanted = [repo_root(), kernel.dir, initramfs.parent]
    if root is None:
        wanted += [Path(sys.executable).parent, Path(sys.prefix)]
    if module is not None:
        wanted.append(Path(module).parent)
    out: list[str] = []
    for p in wanted:
        p = p.resolve()
        under = root is not None or any(str(p).startswith(t + "/") for t in GUEST_TMPFS)
        if under and not any(str(p).startswith(k + "/") or str(p) == k for k in out):
            out = [k for k in out if not k.startswith(str(p) + "/")] + [str(p)]
    return out


def run_guest(
    stage1: str,
    stage2: str | None = None,
    *,
    stages: Sequence[str] | None = None,
    out_dir: Path | None = None,
    cmdline_extra: Sequence[str] = (),
    memory_mb: int = 2048,
    smp: int = 2,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    module: Path | None = None,
    systemd: bool = False,
    systemd_unit: str = "fdbox-vm.target",
    units: Mapping[str, str] | None = None,
    kernel: TestKernel | None = None,
    initramfs: Path | None = None,
    qemu_extra: Sequence[str] = (),
    root: Path | None = None,
    check: bool = False,
) -> GuestRun:
    """Boot the test kernel and run ``stage1`` (then ``stage2`` after a kexec).

    ``stage1``/``stage2`` are shell scripts run with ``/bin/sh -e`` in the guest, cwd
    the checkout; stage 1 must end with ``vm-kexec`` for stage 2 to run. ``stages``
    gives any number of stages instead. ``out_dir`` (default: a new temp dir) is the
    guest's ``/out``. ``cmdline_extra`` is appended to the kernel command line (e.g.
    ``["hugepages=64"]``). ``timeout`` bounds the whole run: every boot's in-guest
    watchdog powers off at start + ``timeout`` (``fdbox.deadline=``, wall clock), the
    host kills qemu :data:`GUEST_EXTRA_TIME` seconds later.
    ``module`` is exported as ``$FDBOX_VM_MODULE`` (the guest sees the host path).
    ``systemd=True`` boots systemd 252 as PID 1 over the same root (about 25 s
    more per boot) with ``systemd.unit=<systemd_unit>``; the default
    ``fdbox-vm.target`` runs each stage script in ``fdbox-vm-stage.service`` and
    powers off with ``systemctl poweroff``, and ``vm-kexec`` uses ``systemctl kexec``
    (so kexec.target orders the real shutdown). ``units`` (name → text) are
    installed into the guest's /etc/systemd/system first (a name may be a drop-in,
    ``"fdboxd.service.d/50-x.conf"``; enable units with
    ``systemctl`` in the stage, or with ``[Install]``-less ``Wants=`` from your own
    target). Each stage's ``journalctl -b`` lands in ``/out/stage<N>.journal``.
    ``qemu_extra`` is appended to qemu's arguments (e.g. ``["-cpu", "max"]``).
    ``root`` boots another root than the host's (a directory on the host, e.g. a Debian
    root from :mod:`roots`), still over the same 9p export with a tmpfs overlay, with the
    checkout, the kernel and the initramfs laid over it at their host paths; the stage's
    ``python3`` and ``$PYTHON`` are that root's, with no ``PYTHONPATH`` (see :func:`guest_env`).
    ``check=True`` raises :class:`VMTestFailure` unless the run is ``ok``.
    """
    kernel = kernel or _require_kernel()
    scripts = list(stages) if stages is not None else [stage1] + ([stage2] if stage2 is not None else [])
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="fdbox-vm-"))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    ctl = out / ".vm"
    if ctl.exists():
        shutil.rmtree(ctl)
    ctl.mkdir()
    # A second run into the same dir must not read the first one's results.
    for old in [*out.glob("stage[0-9]*.*"), out / "console.log"]:
        if old.suffix in (".rc", ".log", ".dmesg", ".start", ".end", ".journal"):
            old.unlink(missing_ok=True)
    for i, text in enumerate(scripts, start=1):
        (ctl / f"stage{i}.sh").write_text(text if text.endswith("\n") else text + "\n")
    initramfs = initramfs or build_initramfs()
    compile_checkout()
    root = Path(root).resolve() if root is not None else None
    e = guest_env(env, root=root)
    e["FDBOX_VM_KERNEL"] = str(kernel.bzimage)
    e["FDBOX_VM_INITRD"] = str(initramfs)
    if module is not None:
        e["FDBOX_VM_MODULE"] = str(Path(module).resolve())
    (ctl / "env").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in e.items()))
    (ctl / "keep").write_text("".join(f"{p}\n" for p in _kept_paths(kernel, initramfs, module, root)))
    if systemd:
        (ctl / "units").mkdir()
        for unit in (INITRAMFS_SRC / "systemd").iterdir():
            (ctl / "units" / unit.name).write_text(unit.read_text().replace("@GUEST_BIN@", str(GUEST_BIN)))
        for name, text in (units or {}).items():
            # A name may be a drop-in ("fdboxd.service.d/50-paths.conf"): make its directory.
            dest = ctl / "units" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
    elif units:
        raise ValueError("units= needs systemd=True")

    cmdline = " ".join(
        [*BASE_CMDLINE, f"fdbox.deadline={int(time.time() + timeout)}"]
        + (["fdbox.init=systemd", f"systemd.unit={systemd_unit}"] if systemd else [])
        + ([f"fdbox.root={root}"] if root is not None else [])
        + list(cmdline_extra)
    )
    console_path = out / "console.log"
    qemu = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-smp", str(smp),
        "-nographic", "-no-reboot", "-nodefaults",
        "-serial", f"file:{console_path}",
        "-kernel", str(kernel.bzimage), "-initrd", str(initramfs), "-append", cmdline,
        "-device", "virtio-rng-pci",
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={out},mount_tag=out,security_model=none,multidevs=remap",
        *qemu_extra,
    ]  # fmt: skip
    (ctl / "qemu.cmd").write_text(shlex.join(qemu) + "\n")
    t0 = time.monotonic()
    timed_out = False
    with open(ctl / "qemu.stderr", "w") as err:
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
        try:
            rc: int | None = proc.wait(timeout=timeout + GUEST_EXTRA_TIME)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
            rc = None
        finally:
            if proc.poll() is None:  # KeyboardInterrupt etc.: never leave qemu behind
                proc.kill()
                proc.wait()
    wall = time.monotonic() - t0
    console = _read(console_path).replace("\r", "")
    qerr = _read(ctl / "qemu.stderr")
    if qerr.strip():
        console += "\n[qemu] " + qerr
    boots = len(_read(ctl / "boots").splitlines())
    n = max(len(scripts), boots, 1)
    run = GuestRun(
        out_dir=out,
        console=console,
        stages=[_collect_stage(out, i) for i in range(1, n + 1)],
        expected_stages=len(scripts),
        qemu_returncode=rc,
        timed_out=timed_out,
        wall_seconds=wall,
        cmdline=cmdline,
    )
    if check:
        run.check()
    return run


def _require_kernel() -> TestKernel:
    k = find_test_kernel()
    if k is None:
        raise FileNotFoundError(f"no test kernel in {test_kernel_dir()} (set FDBOX_TEST_KERNEL_DIR)")
    return k


# --------------------------------------------------------------------------- pytest in the guest


@dataclasses.dataclass
class GuestTestResult:
    """One in-guest test case from the JUnit XML."""

    __test__ = False

    nodeid: str
    outcome: str
    """``passed``, ``failed``, ``error`` or ``skipped``."""
    message: str
    text: str
    seconds: float


def pytest_command(
    paths: Sequence[str | Path], *, junit: str = "/out/junit.xml", args: Sequence[str] = ()
) -> str:
    """Shell line for a stage script that runs pytest in the guest on ``paths``.

    The line does not fail the stage on test failures (``|| true``): the JUnit file
    carries the verdict, so a two-stage script goes on to its kexec. Paths are guest
    paths (see :func:`guest_path`).

    Plugin autoloading is off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``): under TCG the
    host's installed plugins cost 20+ s per run (measured: hypothesis + benchmark
    took a 1-test run from 9 s to 32 s). Pass ``-p NAME`` in ``args`` to load one.
    """
    cmd = [
        "$PYTHON", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE",
        f"--junitxml={junit}", "-o", "junit_family=xunit1", *map(str, args), *map(str, paths),
    ]  # fmt: skip
    line = " ".join(c if c == "$PYTHON" else shlex.quote(c) for c in cmd)
    return f"PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {line} || true"


def parse_junit(path: Path) -> list[GuestTestResult]:
    """Per-test results from a pytest ``--junitxml`` file."""
    root = ET.parse(path).getroot()
    results = []
    for tc in root.iter("testcase"):
        cls, name = tc.get("classname", ""), tc.get("name", "")
        f = tc.get("file")
        nodeid = f"{f}::{name}" if f else (f"{cls}::{name}" if cls else name)
        outcome, message, text = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = el.get("message", "")
                text = el.text or ""
                break
        results.append(GuestTestResult(nodeid, outcome, message, text, float(tc.get("time", 0) or 0)))
    return results


@dataclasses.dataclass
class GuestPytestRun:
    """Result of :func:`run_guest_pytest`: the VM run plus the in-guest test results."""

    run: GuestRun
    results: list[GuestTestResult]
    junit: Path

    def failed(self) -> list[GuestTestResult]:
        return [r for r in self.results if r.outcome in ("failed", "error")]

    def check(self) -> None:
        """Raise :class:`VMTestFailure` naming each failed in-guest test with its failure text."""
        parts: list[str] = []
        if not self.junit.is_file():
            parts.append(f"no JUnit XML at {self.junit}: pytest did not run to the end in the guest")
        elif not self.results:
            parts.append("pytest collected no tests in the guest")
        for r in self.failed():
            parts.append(f"in-guest test {r.outcome.upper()}: {r.nodeid}\n    {r.message}\n{_indent(r.text)}")
        probs = self.run.problems()
        # The stage exit status is pytest's own (|| true hides it); the VM problems are the rest.
        if parts or probs:
            msg = "\n".join(parts)
            if probs:
                msg += "\n" + self.run.report(probs)
            else:
                msg += "\n--- guest pytest output (tail) ---\n" + _tail(self.run.stage(1).log, 60)
            raise VMTestFailure(msg)


def _indent(text: str, prefix: str = "    | ") -> str:
    return "\n".join(prefix + line for line in _tail(text, 60).splitlines())


def run_guest_pytest(
    paths: Sequence[str | Path],
    *,
    pytest_args: Sequence[str] = (),
    setup: str = "",
    out_dir: Path | None = None,
    check: bool = False,
    **kwargs: object,
) -> GuestPytestRun:
    """Run pytest on ``paths`` in a one-stage guest; return its per-test results.

    ``paths`` are host paths (in the checkout, or under ``out_dir``, mapped to
    ``/out``). ``setup`` is shell run first (e.g. ``insmod "$FDBOX_VM_MODULE"``).
    Other keyword arguments go to :func:`run_guest`. ``check=True`` raises
    :class:`VMTestFailure` naming each failed in-guest test.
    """
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="fdbox-vm-"))
    out.mkdir(parents=True, exist_ok=True)
    gpaths = [guest_path(p, out) for p in paths]
    (out / "junit.xml").unlink(missing_ok=True)
    script = f"{setup}\n{pytest_command(gpaths, junit='/out/junit.xml', args=pytest_args)}\n"
    run = run_guest(script, out_dir=out, **kwargs)  # type: ignore[arg-type]
    junit = run.out_dir / "junit.xml"
    results = parse_junit(junit) if junit.is_file() else []
    res = GuestPytestRun(run=run, results=results, junit=junit)
    if check:
        res.check()
    return res


# --------------------------------------------------------------------------- in the guest


def in_guest() -> bool:
    """True inside a VM-tier stage (for in-guest tests and helpers)."""
    return os.environ.get("FDBOX_VM_GUEST") == "1"


def current_stage() -> int:
    """The stage number inside the guest (0 on the host)."""
    return int(os.environ.get("FDBOX_VM_STAGE", "0"))


# --------------------------------------------------------------------------- session object


@dataclasses.dataclass
class Harness:
    """A test kernel plus built artefacts, so tests call ``vm.run(...)`` without repeating them.

    The ``vm`` fixture in tests/vm/conftest.py hands one out per test, with
    ``out_dir`` a fresh directory under the test's ``tmp_path``.
    """

    kernel: TestKernel
    initramfs: Path
    out_dir: Path
    module: Path | None = None

    def run(self, stage1: str, stage2: str | None = None, **kwargs: object) -> GuestRun:
        """:func:`run_guest` with this harness's kernel, initramfs, module and out dir."""
        kwargs.setdefault("out_dir", self.out_dir)
        kwargs.setdefault("module", self.module)
        return run_guest(stage1, stage2, kernel=self.kernel, initramfs=self.initramfs, **kwargs)  # type: ignore[arg-type]

    def pytest(self, paths: Sequence[str | Path], **kwargs: object) -> GuestPytestRun:
        """:func:`run_guest_pytest` with this harness's kernel, initramfs, module and out dir."""
        kwargs.setdefault("out_dir", self.out_dir)
        kwargs.setdefault("module", self.module)
        return run_guest_pytest(paths, kernel=self.kernel, initramfs=self.initramfs, **kwargs)
