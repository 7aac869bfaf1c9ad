#!/usr/bin/env python3
"""The VM side of tests/vm/test_guest_memfd_kexec.py: a guest_memfd carried across kexec.

SIMULATED: the test guest has no KVM, so no real guest_memfd exists in it. A memfd named
``standin-gmem-*`` stands in for one: ``daemon`` runs the real fdboxd with one change,
its type detection classifies such memfds as ``guest_memfd`` (nothing else is patched).
Everything after detection is the real code on the real kernel: the seal's copy out of
the "guest_memfd" through a mapping (fdboxd.gmem.copy_out), that copy put into the
kernel box and preserved with KHO, the carried manifest, and after kexec
``RestoreInto`` over the Varlink socket — the copy checked against the seal's SHA-256
and copied into the restarted VMM's new "guest_memfd". The guest_memfd half (a real
KVM file) is tested on the host: tests/integration/test_guest_memfd.py.

    gmemstage.py daemon FDBOXD-ARGS...        fdboxd with the stand-in detection
    gmemstage.py put --size N --seed S        the VMM before: puts ram0 (stand-in) + devstate (memfd);
                                              then, as the host would, Seal of every box
    gmemstage.py restore --size N --seed S    the VMM after: RestoreInto a new stand-in, checks bytes

One Python process per step: each start costs seconds under TCG.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

from fdboxtest import pattern  # noqa: E402

from fdboxd.client import Client, read_all  # noqa: E402
from fdboxd.errors import FdboxError  # noqa: E402

SOCKET = "/run/fdbox/fdboxd.sock"
STANDIN = "standin-gmem-"


def standin_detect() -> None:
    """Make fdboxd see memfds named ``standin-gmem-*`` as guest_memfd (see the module doc)."""
    from fdboxd import fdtypes, store
    from fdboxd.kinds import guest_memfd

    real = fdtypes.detect

    def detect(fd: int) -> fdtypes.FdInfo:
        info = real(fd)
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return info
        if info.type == fdtypes.FdType.MEMFD and link.startswith("/memfd:" + STANDIN):
            return fdtypes.FdInfo(fdtypes.FdType.GUEST_MEMFD, info.size)
        return info

    fdtypes.detect = detect  # detect_or_refuse: what Put and RestoreInto check
    store.detect = detect
    guest_memfd.detect = detect


def content(size: int, seed: int) -> bytes:
    """Guest RAM with holes, as a VM's usually is: the first half and the last page written."""
    half, page = size // 2, 4096
    return pattern(half, seed) + bytes(size - half - page) + pattern(page, seed + 1)


def standin(name: str, size: int, data: bytes | None = None) -> int:
    fd = os.memfd_create(STANDIN + name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if data:  # only the non-zero parts: the rest stays holes
        half, page = size // 2, 4096
        os.pwrite(fd, data[:half], 0)
        os.pwrite(fd, data[-page:], size - page)
    return fd


def main() -> int:
    if sys.argv[1:2] == ["daemon"]:
        standin_detect()
        from fdboxd.daemon import main as fdboxd_main

        return fdboxd_main(sys.argv[2:])
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["put", "restore"])
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    data = content(a.size, a.seed)
    out: dict[str, object] = {}
    with Client(SOCKET) as c:
        if a.what == "put":
            gm = standin("ram0", a.size, data)
            mem = os.memfd_create("devstate", os.MFD_CLOEXEC)
            os.write(mem, b"device state %d" % a.seed)
            out["ram0"] = c.put("vm1", "ram0", gm, {"slot": "0"})
            out["devstate"] = c.put("vm1", "devstate", mem)
            out["sha256"] = hashlib.sha256(data).hexdigest()
            os.close(gm)  # the VMM is gone: fdboxd holds the only reference
            os.close(mem)
            out["sealed"] = c.seal()
            out["list"] = c.list("vm1")
            return _done(out)
        out["restored_status"] = c.status()
        try:
            c.get("vm1", "ram0")
            out["get_error"] = None
        except FdboxError as e:
            out["get_error"] = e.name
            out["get_message"] = e.message
        target = standin("new-ram0", a.size)  # the restarted VMM's new "guest_memfd": zeros
        out["entry"] = c.restore_into("vm1", "ram0", target)
        got = read_all(target)
        out["bytes_ok"] = got == data
        out["sha256"] = hashlib.sha256(got).hexdigest()
        entry, fd = c.get("vm1", "ram0")
        out["same_file"] = os.fstat(fd).st_ino == os.fstat(target).st_ino
        os.close(fd)
        _, fd = c.get("vm1", "devstate")
        out["devstate"] = read_all(fd).decode()
        os.close(fd)
        out["list"] = c.list("vm1")
        out["status"] = c.status()
    return _done(out)


def _done(out: dict[str, object]) -> int:
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
