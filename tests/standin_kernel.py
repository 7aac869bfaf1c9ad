"""A stand-in kexec-capable backend for a real fdboxd process on the host.

Run as ``python3 tests/standin_kernel.py IMAGE_DIR FDBOXD-ARGS...``: the real daemon
(:func:`fdboxd.daemon.main`, real sockets, real manifest, real failpoints) on an
:class:`ImageBackend` in place of fdbox.ko or LUO. What the kernel would keep lives in
IMAGE_DIR, so it outlives the daemon process:

- a **sealed** box is written there at :meth:`~ImageBackend.seal` (each entry's bytes, a
  file per entry) and removed at unseal, finish or delete: like fdbox.ko, a sealed box
  survives a daemon restart (SIGTERM or SIGKILL) in the same kernel and comes back
  ``sealed``;
- with ``FDBOX_TEST_KEXEC=1`` in the environment the daemon starts "in the next kernel":
  each sealed box comes back ``restored``, its files copied into new memfds (what
  RESTORE_FD does). As fdbox.ko keeps a restored box until FINISH or DELETE_BOX, the
  image keeps it too (``IMAGE/.restored/BOX``) until :meth:`~ImageBackend.finish` or
  :meth:`~ImageBackend.delete_box`: a daemon that dies before it has finished a restored
  box finds it again, restored, at its next start (a restored box nobody finished is
  dropped at the next kexec, as it does not cross);
- open boxes live in the daemon process only (they die with it, as open boxes die with
  the old kernel); guest_memfd and tap are not accepted (the side backend holds them, as
  beside fdbox.ko), so a guest_memfd's carried copy is what crosses;
- with ``FDBOX_TEST_STANDIN_GMEM=1`` memfds named ``standin-gmem-*`` are detected as
  guest_memfd (tests/vm/gmemstage.py:standin_detect, the VM tier's stand-in: this host's
  /dev/kvm may lack KVM_CAP_GUEST_MEMFD). Only detection is stood in: the seal's copy,
  its carrying, RestoreInto are the real code.

Where it is not fdbox.ko (so it proves the store's half, never backends/kernel.py's): the
daemon's KernelBackend and uapi.py do not run; an entry of a restored box that was taken
back and written to comes back with the image's bytes after a daemon restart (fdbox.ko
keeps the restored memfd itself); open boxes die with the daemon (fdbox.ko keeps them).

It proves the store's half of a live update (tests/unit/test_store_liveupdate.py's
KexecBackend does the same in-process); the kernel's half is proven in tests/vm.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from fdboxd.backends.base import Backend, BackendBox
from fdboxd.backends.memory import MemoryBackend
from fdboxd.fdtypes import FdInfo, FdType
from fdboxd.model import BoxState

KEXEC_ENV = "FDBOX_TEST_KEXEC"
#: Where restored boxes stay until finished or deleted (a dot: never a box name).
RESTORED = ".restored"


class ImageBackend(Backend):
    """See the module docstring. Held fds live in a wrapped MemoryBackend (not a subclass:
    the store would then make it its own side backend and hand it guest_memfds)."""

    name = "standin-kernel"
    survives_kexec = True

    def __init__(self, image: Path, after_kexec: bool) -> None:
        self.image = image
        self.held = MemoryBackend()
        image.mkdir(parents=True, exist_ok=True)
        restored = image / RESTORED
        if after_kexec:  # the kexec: sealed boxes cross, restored ones nobody finished do not
            shutil.rmtree(restored, ignore_errors=True)
            restored.mkdir()
            for bdir in self._boxdirs(image):
                os.rename(bdir, restored / bdir.name)
        for bdir, state in [*((d, BoxState.SEALED) for d in self._boxdirs(image)),
                            *((d, BoxState.RESTORED) for d in self._boxdirs(restored))]:
            box = bdir.name
            self.held.create_box(box)
            for f in sorted(bdir.iterdir()):
                fd = os.memfd_create(f.name[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                try:
                    os.write(fd, f.read_bytes())
                    self.held.adopt(box, f.name, fd)
                except BaseException:
                    os.close(fd)
                    raise
            self.held._boxes[box].state = state

    @staticmethod
    def _boxdirs(where: Path) -> list[Path]:
        if not where.is_dir():
            return []
        return sorted(p for p in where.iterdir() if p.is_dir() and not p.name.startswith("."))

    def accepts(self, fd_type: FdType) -> bool:
        return fd_type in (FdType.MEMFD, FdType.MEMFD_HUGETLB)

    def create_box(self, box: str) -> None:
        self.held.create_box(box)

    def delete_box(self, box: str) -> None:
        self.held.delete_box(box)
        self._forget(box)

    def put(self, box: str, name: str, fd: int, info: FdInfo, uid: int = 0, gid: int = 0) -> None:
        self.held.put(box, name, fd, info, uid, gid)

    def get(self, box: str, name: str) -> int:
        return self.held.get(box, name)

    def remove(self, box: str, name: str) -> None:
        self.held.remove(box, name)
        (self.image / RESTORED / box / name).unlink(missing_ok=True)  # a restored entry released

    def seal(self, box: str) -> None:
        tmp = self.image / f".{box}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in self.held.inventory()[box].entries:
            fd = self.held.peek(box, name)
            size = os.fstat(fd).st_size
            (tmp / name).write_bytes(os.pread(fd, size, 0) if size else b"")
        self._forget(box)
        os.rename(tmp, self.image / box)
        self.held.seal(box)

    def unseal(self, box: str) -> None:
        self.held.unseal(box)
        self._forget(box)

    def finish(self, box: str) -> None:
        self.held.finish(box)
        self._forget(box)

    def inventory(self) -> dict[str, BackendBox]:
        return self.held.inventory()

    def close(self) -> None:
        self.held.close()

    def _forget(self, box: str) -> None:
        shutil.rmtree(self.image / box, ignore_errors=True)
        shutil.rmtree(self.image / RESTORED / box, ignore_errors=True)


def main() -> int:
    image, argv = Path(sys.argv[1]), sys.argv[2:]
    from fdboxd import daemon

    after_kexec = os.environ.get(KEXEC_ENV) == "1"
    if os.environ.get("FDBOX_TEST_STANDIN_GMEM") == "1":
        sys.path.insert(0, str(Path(__file__).resolve().parent / "vm"))
        from gmemstage import standin_detect

        standin_detect()
    daemon.open_backend = lambda *a, **k: ImageBackend(image, after_kexec)  # type: ignore[assignment]
    return daemon.main(argv)


if __name__ == "__main__":
    sys.exit(main())
