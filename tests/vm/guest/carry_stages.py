#!/usr/bin/env python3
"""In-guest steps of tests/vm/test_carried_manifest.py: the manifest fdboxd carries in the
sealed set (box ``fdboxd.manifest``), judged by a daemon that starts after the kexec
with its state directory gone, so owners, metadata and checksums can only come from
the carried copy. Each step writes ``/out/carry-<step>.json``; the host test judges.

- ``ko-1``/``ko-2``: ``--backend kernel`` (fdbox.ko alone) on the LUO kernel.
- ``luo-1``: ``--backend liveupdate`` under a PID 1 stand-in of systemd 252 (fd store
  for the memfds, the ``@`` holder for the sessions): seal ``vm1``, restart fdboxd,
  seal ``vm2``. ``luo-2``: both back; then ``vm1`` sealed again and fdboxd restarted
  with nothing sealed after it. ``luo-3``: ``vm1`` crossed that kexec too.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "tests/vm/guest"))

from luo_stages import make, verify_box  # noqa: E402

from fdboxd.client import Client  # noqa: E402
from fdboxd.errors import FdboxError  # noqa: E402

SOCK = "/run/fdbox/fdboxd.sock"
META = {"vm": "kept"}
KO_VM1 = [("ram0", 8, True)]
KO_VM2 = [("ram0", 4, False)]
LUO_VM1 = [("ram0", 4, False)]
LUO_VM2 = [("ram0", 2, False), ("ram1", 2, False)]


def _error(fn) -> dict[str, str]:  # type: ignore[no-untyped-def]
    try:
        fn()
    except FdboxError as e:
        return {"name": e.name, "message": e.message}
    return {"name": "ok"}


def _entries(c: Client, box: str) -> dict[str, dict]:
    return {e["name"]: {k: e.get(k) for k in ("type", "size", "uid", "metadata", "sha256")}
            for e in c.list(box)["entries"]}


def put_box(c: Client, box: str, regions: list[tuple[str, int, bool]], seed: str) -> None:
    """luo_stages' put_box, with :data:`META` on every entry (only a manifest knows it)."""
    fds = [make(box, n, mib, seed, huge) for n, mib, huge in regions]
    try:
        c.put_many(box, [(n, fd, META) for (n, _, _), fd in zip(regions, fds)])
    finally:
        for fd in fds:
            os.close(fd)


def ko_1(c: Client) -> dict:
    res: dict = {}
    put_box(c, "vm1", KO_VM1, "ko")
    put_box(c, "vm2", KO_VM2, "ko")
    res["seal_shmem"] = _error(lambda: c.seal("vm2"))
    res["seal_all"] = _error(lambda: c.seal(None))
    res["after_refusals"] = {"sealed": c.status()["sealed"],
                             "states": {b: c.list(b)["boxes"][0]["state"] for b in ("vm1", "vm2")}}
    res["preflight"] = [p for p in c.preflight()["problems"] if p["check"] in ("backend", "room")]
    c.delete_box("vm2")
    res["sealed"] = c.seal("vm1")
    res["vm1"] = _entries(c, "vm1")
    return res


def ko_2(c: Client) -> dict:
    st = c.status()
    res: dict = {"restored": st["restored"], "adopted": st["adopted"], "lost": st["lost"],
                 "vm1": _entries(c, "vm1")}
    res["verified"] = verify_box(c, "vm1", KO_VM1, "ko")
    return res


def luo_1(_c: None) -> dict:
    from pid1_261 import Pid1

    os.makedirs("/run/fdbox", exist_ok=True)
    os.makedirs("/var/lib/fdbox", exist_ok=True)
    pid1 = Pid1(version="252.39-1~deb12u1", preserve=False)
    pid1.start([], "/out/fdboxd-carry-a.log")
    res: dict = {}
    with Client(SOCK) as c:
        put_box(c, "vm1", LUO_VM1, "luo")
        c.seal("vm1")
    pid1.stop()
    with pid1.lock:
        kept = sorted(pid1.store.items())
    pid1.start(kept, "/out/fdboxd-carry-b.log")  # a restart, not a kexec: the memfds come back
    with Client(SOCK) as c:
        st = c.status()
        res["restarted"] = {"sealed": st["sealed"], "lost": st["lost"]}
        put_box(c, "vm2", LUO_VM2, "luo")
        res["sealed"] = c.seal("vm2")  # the sealed set changed once after the restart
        res["vm2"] = _entries(c, "vm2")
    pid1.stop()  # the holder keeps the sessions into the kexec
    return res


def luo_2(c: Client) -> dict:
    st = c.status()
    res: dict = {"restored": st["restored"], "adopted": st["adopted"], "lost": st["lost"],
                 "vm2": _entries(c, "vm2")}
    res["verified"] = {**{f"vm1/{k}": v for k, v in verify_box(c, "vm1", LUO_VM1, "luo").items()},
                       **{f"vm2/{k}": v for k, v in verify_box(c, "vm2", LUO_VM2, "luo").items()}}
    res["sealed"] = c.seal("vm1")  # then a restart, and the kexec with nothing sealed after it
    return res


def luo_3(c: Client) -> dict:
    st = c.status()
    return {"restored": st["restored"], "verified": verify_box(c, "vm1", LUO_VM1, "luo")}


STEPS = {"ko-1": ko_1, "ko-2": ko_2, "luo-1": luo_1, "luo-2": luo_2, "luo-3": luo_3}


def main() -> int:
    step = sys.argv[1]
    if step == "luo-1":
        res = luo_1(None)
    else:
        with Client(SOCK) as c:
            res = STEPS[step](c)
    with open(f"/out/carry-{step}.json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
