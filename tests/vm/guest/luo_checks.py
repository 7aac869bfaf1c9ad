#!/usr/bin/env python3
"""In-guest checks for the liveupdate backend (run by tests/vm/test_luo.py stages).

Each subcommand prints one JSON object on stdout and exits 0 (the host test judges):

- ``second-agent``: can another process open /dev/liveupdate right now (while fdboxd
  runs)? ``{"opened": bool, "error": str}``
- ``holder``: processes whose argv[0] starts with '@' (systemd-shutdown spares them) and
  how many session fds each has open. ``{"holders": [{"pid", "argv0", "sessions"}]}``
- ``double``: a memfd the module holds, and a memfd named twice in fdbox, are both
  refused when the liveupdate backend seals them; nothing is left half-sealed.
- ``grow BOX NAME``: after unseal the entry's file can be resized again (LUO froze it
  while sealed). ``{"before": size, "grown": bool}``
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.getcwd())

from fdboxd import uapi, uapi_luo  # noqa: E402
from fdboxd.client import Client  # noqa: E402
from fdboxd.errors import FdboxError  # noqa: E402

SOCK = "/run/fdbox/fdboxd.sock"


def second_agent() -> dict:
    try:
        with uapi_luo.LuoDevice():
            return {"opened": True, "error": ""}
    except OSError as e:
        return {"opened": False, "error": str(e)}


def holders() -> dict:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
            if not argv0.startswith("@"):
                continue
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        out.append({"pid": int(pid), "argv0": argv0,
                    "sessions": sum("[luo_session]" in link or "luo_session" in link for link in links)})
    return {"holders": out}


def _refusal(c: Client, box: str) -> str:
    try:
        c.seal(box)
    except FdboxError as e:
        return e.name
    return "sealed"


def double() -> dict:
    res: dict = {}
    with Client(SOCK) as c:
        # 1. held by fdbox.ko (sealed there), then put into fdbox on LUO: refused at seal
        fd = os.memfd_create("ko-held", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 1 << 20)
        with uapi.FdboxDevice() as dev:
            dev.create_box("ko")
            dev.put_fd("ko", "m", fd)
            dev.seal("ko")
            c.put("dup-ko", "m", fd)
            res["module_held"] = _refusal(c, "dup-ko")
            res["module_held_sealed"] = c.status()["sealed"]
            c.delete_box("dup-ko")
            dev.unseal("ko")
            dev.remove_entry("ko", "m")
            dev.delete_box("ko")
        os.close(fd)
        # 2. the same file under two names in fdbox: refused, nothing half-sealed
        fd = os.memfd_create("twice", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 1 << 20)
        c.put("dup-twice", "a", fd)
        c.put("dup-twice", "b", fd)
        res["twice"] = _refusal(c, "dup-twice")
        res["after"] = c.status()["sealed"]
        c.delete_box("dup-twice")
        os.close(fd)
    return res


def grow(box: str, name: str) -> dict:
    with Client(SOCK) as c:
        _entry, fd = c.get(box, name)
    try:
        import fcntl

        seals = fcntl.fcntl(fd, 1034)  # F_GET_SEALS
        before = os.fstat(fd).st_size
        if seals & 0x6:  # the VMM sealed its size itself; only check the file is not frozen by LUO
            return {"before": before, "grown": None, "seals": seals}
        try:
            os.ftruncate(fd, before + 4096)
            os.ftruncate(fd, before)
            return {"before": before, "grown": True, "seals": seals}
        except OSError as e:
            return {"before": before, "grown": False, "error": str(e), "seals": seals}
    finally:
        os.close(fd)


def main() -> int:
    cmd = sys.argv[1]
    if cmd == "second-agent":
        out = second_agent()
    elif cmd == "holder":
        out = holders()
    elif cmd == "double":
        out = double()
    elif cmd == "grow":
        out = grow(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown check {cmd}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
