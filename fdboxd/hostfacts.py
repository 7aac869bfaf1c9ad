"""What the running host says about the next kexec: every file the preflight reads.

:mod:`fdboxd.preflight` decides; this module only reads, so the places it reads are in
one list and nowhere else:

- ``/proc/cmdline`` (the running kernel's options: ``kho=on``, ``liveupdate=on``,
  ``hugepages=``);
- ``/sys/kernel/kexec_loaded`` (``1`` once ``kexec -l``/``-s -l`` loaded a kernel);
- ``/run/fdbox/kexec-cmdline``: the loaded kernel's command line, as whoever loaded it
  recorded it. The kernel does not expose a loaded image's command line (neither sysfs
  nor KHO's debugfs has it), so this file is the only way to check it; without it the
  preflight says it cannot be checked;
- ``/run/fdbox/kexec-kernel``: the path of the loaded kernel image, recorded the same way
  (the kernel keeps no name of it either); the release in that bzImage's header, and
  whether ``/lib/modules/RELEASE`` has an ``fdbox.ko`` for it;
- ``/proc/meminfo`` (``MemAvailable`` for guest_memfd copies, the hugetlb pool);
- ``/sys/module/fdbox`` (fdbox.ko loaded) and ``/dev/liveupdate`` (LUO present);
- ``/proc/PID/cgroup`` and ``/proc/PID/maps`` of every process: which of them run in an
  ``fdbox-qemu@VM.service`` unit, and the memfds they map;
- ``statvfs()`` of the state directory (the daemon's own ``--state-dir``).

**Test only:** ``FDBOX_TEST_HOST_ROOT=DIR`` in fdboxd's environment makes every path
above except the state directory relative to DIR (``DIR/proc/cmdline``, ...), so host
tests run a real daemon against a kernel of their own description; the state directory
is pointed elsewhere the ordinary way (``--state-dir`` on a small file system). It is
not an operator setting: a daemon started with it checks a host that does not exist.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

#: The test-only override of the root every host path is read under (see above).
ROOT_ENV = "FDBOX_TEST_HOST_ROOT"
#: Where the loaded kernel's command line is recorded (the kernel does not keep it readable).
KEXEC_CMDLINE = "run/fdbox/kexec-cmdline"
#: Where the loaded kernel image's path is recorded (the same reason).
KEXEC_KERNEL = "run/fdbox/kexec-kernel"

_UNIT_RE = re.compile(r"(?:^|/)fdbox-qemu@([^/]+)\.service(?:/|$)")


@dataclass(frozen=True)
class VmProcess:
    """A process running in an ``fdbox-qemu@VM.service`` unit."""

    pid: int
    vm: str
    #: (st_dev, st_ino) of every shared memfd it maps (from /proc/PID/maps), None if unreadable.
    memfds: frozenset[tuple[int, int]] | None


def unescape_unit(instance: str) -> str:
    r"""A unit instance name back to what was escaped into it (``\x2d`` → ``-``)."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), instance)


class HostFacts:
    """Reads the host's facts; every method answers None (or empty) when it cannot read."""

    def __init__(self, root: str | None = None) -> None:
        self.root = Path(root if root is not None else os.environ.get(ROOT_ENV) or "/")

    @property
    def is_test_root(self) -> bool:
        return str(self.root) != "/"

    def _path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def _read(self, rel: str) -> str | None:
        try:
            return self._path(rel).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def cmdline(self) -> str | None:
        """The running kernel's command line."""
        text = self._read("proc/cmdline")
        return None if text is None else text.strip()

    def kexec_loaded(self) -> bool | None:
        text = self._read("sys/kernel/kexec_loaded")
        return None if text is None else text.strip() == "1"

    def kexec_cmdline(self) -> str | None:
        """The loaded kernel's command line as recorded in :data:`KEXEC_CMDLINE`, if it was."""
        text = self._read(KEXEC_CMDLINE)
        return None if text is None else text.strip()

    def kexec_kernel(self) -> str | None:
        """The loaded kernel image's path as recorded in :data:`KEXEC_KERNEL`, if it was."""
        text = self._read(KEXEC_KERNEL)
        return None if text is None or not text.strip() else text.strip()

    def kernel_release(self, image: str) -> str | None:
        """The release (``uname -r``) an x86 bzImage says it is, from its setup header's
        ``kernel_version`` string; None when ``image`` is no bzImage or cannot be read."""
        try:
            with open(self._path(image), "rb") as f:
                head = f.read(0x4000)
        except OSError:
            return None
        if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
            return None
        at = 0x200 + int.from_bytes(head[0x20E:0x210], "little")
        text = head[at:at + 256].split(b"\0", 1)[0].decode("ascii", "replace").split()
        return text[0] if text else None

    def module_built_for(self, release: str, name: str = "fdbox") -> bool | None:
        """Whether ``/lib/modules/RELEASE`` holds ``NAME.ko`` (any compression); None when
        that kernel has no module directory here at all."""
        top = self._path(f"lib/modules/{release}")
        if "/" in release or not top.is_dir():
            return None
        return any(top.rglob(f"{name}.ko*"))

    def meminfo(self) -> dict[str, int]:
        """``/proc/meminfo`` in bytes (``kB`` values multiplied out; counts as they are)."""
        out: dict[str, int] = {}
        for line in (self._read("proc/meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        return out

    def module_loaded(self, name: str = "fdbox") -> bool:
        return self._path(f"sys/module/{name}").exists()

    def luo_present(self) -> bool:
        return self._path("dev/liveupdate").exists()

    def free_bytes(self, path: str | os.PathLike[str]) -> int | None:
        """Bytes an unprivileged writer may still use on ``path``'s file system (statvfs)."""
        try:
            st = os.statvfs(path)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def vm_processes(self) -> list[VmProcess]:
        """Every process in an ``fdbox-qemu@VM.service`` unit (cgroup v2 or v1 name=systemd)."""
        out = []
        try:
            pids = [int(p) for p in os.listdir(self._path("proc")) if p.isdigit()]
        except OSError:
            return []
        for pid in sorted(pids):
            vm = None
            for line in (self._read(f"proc/{pid}/cgroup") or "").splitlines():
                m = _UNIT_RE.search(line.split(":", 2)[-1])
                if m:
                    vm = unescape_unit(m.group(1))
                    break
            if vm is not None:
                out.append(VmProcess(pid, vm, self._mapped_memfds(pid)))
        return out

    def _mapped_memfds(self, pid: int) -> frozenset[tuple[int, int]] | None:
        text = self._read(f"proc/{pid}/maps")
        if text is None:
            return None
        found = set()
        for line in text.splitlines():
            parts = line.split(None, 5)
            # address perms offset dev inode path: shared ("s") mappings of a memfd
            if len(parts) == 6 and parts[1].endswith("s") and parts[5].startswith("/memfd:"):
                major, _, minor = parts[3].partition(":")
                found.add((os.makedev(int(major, 16), int(minor, 16)), int(parts[4])))
        return frozenset(found)


def cmdline_options(cmdline: str | None) -> dict[str, str]:
    """``key=value`` options of a kernel command line (the last one wins, as the kernel's
    early_param does); a bare ``key`` maps to ``""``. Stops at ``--`` (init's arguments)."""
    out: dict[str, str] = {}
    for tok in (cmdline or "").split():
        if tok == "--":
            break
        key, _, value = tok.partition("=")
        out[key] = value
    return out


def option_on(options: dict[str, str], key: str) -> bool:
    """Whether a boolean kernel option is on, as kstrtobool reads it (on, 1, y, Y, ...)."""
    value = options.get(key)
    return value is not None and value.lower() in ("on", "1", "y", "yes", "true")


def hugepages_reserved(cmdline: str | None, page_size: int) -> int | None:
    """How many pages of ``page_size`` a command line reserves (``hugepagesz=``/``hugepages=``
    pairs; a ``hugepages=`` before any ``hugepagesz=`` is the default size's, 2 MiB on
    x86), or None when it reserves none of that size."""
    size = _parse_size(cmdline_options(cmdline).get("default_hugepagesz", "")) or (2 << 20)
    found: int | None = None
    for tok in (cmdline or "").split():
        if tok == "--":
            break
        key, _, value = tok.partition("=")
        if key == "hugepagesz":
            size = _parse_size(value) or size
        elif key == "hugepages" and value.isdigit() and size == page_size:
            found = int(value)
    return found


def _parse_size(text: str) -> int | None:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip(), re.IGNORECASE)
    if not m:
        return None
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]
