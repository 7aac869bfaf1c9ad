#!/usr/bin/env python3
"""In-guest steps of tests/vm/test_luo.py: one process per step, since every Python
start costs seconds under TCG. Each step writes ``/out/luo-<step>.json``; the host test
judges. fdboxd must be running on /run/fdbox/fdboxd.sock unless the step says not.

Memory is filled with a pattern derived from (seed, box, name, MiB index), sized with
F_SEAL_SHRINK|F_SEAL_GROW like a VMM's guest RAM, and verified byte for byte by the same
pattern after the kexec.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import subprocess
import sys
import time

sys.path.insert(0, os.getcwd())

from fdboxd import uapi, uapi_luo  # noqa: E402
from fdboxd.client import Client  # noqa: E402
from fdboxd.errors import FdboxError  # noqa: E402

SOCK = "/run/fdbox/fdboxd.sock"
MiB = 1 << 20
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
SIZE_SEALS = 0x2 | 0x4  # F_SEAL_SHRINK | F_SEAL_GROW
MFD_HUGETLB = 0x4


def _chunk(seed: str, box: str, name: str, i: int) -> bytes:
    return hashlib.sha256(f"{seed}/{box}/{name}/{i}".encode()).digest() * (MiB // 32)


def make(box: str, name: str, mib: int, seed: str, huge: bool = False) -> int:
    flags = os.MFD_ALLOW_SEALING | (MFD_HUGETLB if huge else 0)
    fd = os.memfd_create(name, flags)
    os.ftruncate(fd, mib * MiB)
    with mmap.mmap(fd, mib * MiB) as m:
        for i in range(mib):
            m[i * MiB:(i + 1) * MiB] = _chunk(seed, box, name, i)
    fcntl.fcntl(fd, F_ADD_SEALS, SIZE_SEALS)
    return fd


def check(fd: int, box: str, name: str, mib: int, seed: str) -> str:
    """"OK" or what is wrong with a file got back from fdbox."""
    size = os.fstat(fd).st_size
    if size != mib * MiB:
        return f"size {size}"
    seals = fcntl.fcntl(fd, F_GET_SEALS)
    if seals & SIZE_SEALS != SIZE_SEALS:
        return f"seals {seals:#x}"
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
        for i in range(mib):
            if m[i * MiB:(i + 1) * MiB] != _chunk(seed, box, name, i):
                return f"content differs in MiB {i}"
    return "OK"


def put_box(c: Client, box: str, regions: list[tuple[str, int, bool]], seed: str) -> None:
    fds = [make(box, n, mib, seed, huge) for n, mib, huge in regions]
    try:
        c.put_many(box, [(n, fd) for (n, _, _), fd in zip(regions, fds)])
    finally:
        for fd in fds:
            os.close(fd)


def verify_box(c: Client, box: str, regions: list[tuple[str, int, bool]], seed: str) -> dict[str, str]:
    got = {e["name"]: (e, fd) for e, fd in c.get_box(box)}
    out = {}
    for n, mib, _huge in regions:
        if n not in got:
            out[n] = "missing"
            continue
        entry, fd = got.pop(n)
        out[n] = check(fd, box, n, mib, seed) + f" type={entry['type']}"
        os.close(fd)
    for _e, fd in got.values():
        os.close(fd)
    return out


def second_agent() -> str:
    """Can another process open /dev/liveupdate right now? "" if so, else the error."""
    try:
        with uapi_luo.LuoDevice():
            return ""
    except OSError as e:
        return str(e) or "error"


def holders() -> list[dict]:
    """Processes systemd-shutdown would spare (argv[0] starts with '@'), with the LUO
    sessions each keeps open."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
            if not argv0.startswith("@"):
                continue
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        sessions = sorted(link.split("] ", 1)[-1] for link in links if "[luo_session]" in link)
        out.append({"pid": int(pid), "argv0": argv0, "sessions": sessions})
    return out


def _error_name(fn) -> str:  # type: ignore[no-untyped-def]
    try:
        fn()
    except FdboxError as e:
        return e.name
    return "ok"


VM1 = [("ram0", 32, False), ("ram1", 8, True)]
VM9 = [("r", 4, False)]
SCRATCH = [("s0", 8, False), ("s1", 4, True)]


def stage1(c: Client) -> dict:
    res: dict = {"agent_running": second_agent()}
    # seal -> unseal of a mixed box loses nothing, and LUO lets go of the memfd
    put_box(c, "scratch", SCRATCH, "scratch")
    c.seal("scratch")
    res["holders_scratch"] = holders()
    c.unseal("scratch")
    res["scratch"] = verify_box(c, "scratch", SCRATCH, "scratch")
    c.delete_box("scratch")
    # never preserved twice: a memfd fdbox.ko holds, and one file under two names
    fd = os.memfd_create("ko-held", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MiB)
    with uapi.FdboxDevice() as dev:
        dev.create_box("ko")
        dev.put_fd("ko", "m", fd)  # held, not sealed: beside LUO the module seals no shmem (issue 20)
        c.put("dup-ko", "m", fd)
        res["module_held"] = _error_name(lambda: c.seal("dup-ko"))
        res["module_held_sealed"] = c.status()["sealed"]
        c.delete_box("dup-ko")
        dev.remove_entry("ko", "m")
        dev.delete_box("ko")
    c.put("dup-twice", "a", fd)
    c.put("dup-twice", "b", fd)
    res["twice"] = _error_name(lambda: c.seal("dup-twice"))
    res["twice_sealed"] = c.status()["sealed"]
    c.delete_box("dup-twice")
    os.close(fd)
    # the boxes that cross: vm1 mixed (memfd on LUO, hugetlb on the module), vm9 memfd
    put_box(c, "vm1", VM1, "luo-1")
    put_box(c, "vm9", VM9, "luo-9")
    res["sealed"] = c.seal(None)
    res["status"] = c.status()
    res["agent_sealed"] = second_agent()
    return res


def stage1_after_stop(_c: None) -> dict:
    return {"holders": holders(), "agent": second_agent()}


def stage2(c: Client) -> dict:
    res: dict = {"status": c.status(), "agent": second_agent()}
    res["vm1"] = verify_box(c, "vm1", VM1, "luo-1")
    res["status_after"] = c.status()  # vm9 stays restored and unclaimed
    return res


def stage3(c: Client) -> dict:
    """Nothing may be left: try the session names the last kernels used."""
    leftover = []
    with uapi_luo.LuoDevice() as dev:
        for name in ("fdboxd:index", "fdboxd.manifest", "vm1", "vm9"):
            try:
                dev.retrieve_session(name).close()
                leftover.append(name)
            except OSError:
                pass
    res = {"status": c.status(), "leftover": leftover}
    res.update(busy_device(c))
    res["agent"] = second_agent()
    return res


#: A second agent (luod, systemd at shutdown): holds /dev/liveupdate for argv[1] seconds.
HOLD = ("import sys, time\nfrom fdboxd import uapi_luo\nd = uapi_luo.LuoDevice()\n"
        "print('held', flush=True)\ntime.sleep(float(sys.argv[1]))\n")


def _hold_device(seconds: float) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(seconds)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    return p


def busy_device(c: Client) -> dict:
    """Another process holds /dev/liveupdate (fdboxd runs with --liveupdate-wait 3): a
    seal retries, then fails naming the holder, and Status says so; a holder that lets
    go during the wait does not fail the seal, and the problem is gone from Status."""
    res: dict = {}
    put_box(c, "busy", [("m", 1, False)], "busy")
    holder = _hold_device(120)
    res["busy_pid"] = holder.pid
    t0 = time.monotonic()
    try:
        c.seal("busy")
        res["busy_error"] = ["ok", ""]
    except FdboxError as e:
        res["busy_error"] = [e.name, e.message]
    res["busy_seconds"] = time.monotonic() - t0
    res["busy_preflight"] = [p["message"] for p in c.preflight()["problems"] if p["check"] == "backend"]
    res["busy_problems"] = c.status()["problems"]
    res["busy_state"] = c.status()["sealed"]
    holder.kill()
    holder.wait()
    holder = _hold_device(1)  # lets go after 1 s, inside the 3 s the seal retries
    t0 = time.monotonic()
    res["released"] = c.seal("busy")
    res["released_seconds"] = time.monotonic() - t0
    holder.wait()
    res["released_problems"] = c.status()["problems"]
    res["released_preflight"] = [p["message"] for p in c.preflight()["problems"] if p["check"] == "backend"]
    c.unseal("busy")
    c.delete_box("busy")
    return res


STEPS = {"1": stage1, "1-stopped": stage1_after_stop, "2": stage2, "3": stage3}


def main() -> int:
    step = sys.argv[1]
    fn = STEPS[step]
    if step.endswith("stopped"):
        res = fn(None)
    else:
        with Client(SOCK) as c:
            res = fn(c)
    with open(f"/out/luo-{step}.json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
