"""The fd-store keeper (systemd >= 261) with real LUO sessions, PID 1 played by a stand-in.

The machines have systemd 252, so PID 1 is played by ``tests/vm/guest/pid1_261.py``:
its io.systemd.Manager socket says 261, its notify socket keeps an fd store, it keeps
the store's session fds open into the kexec and, after it, retrieves each session by
name and hands it back in LISTEN_FDS — what systemd 261 does (src/core/luo.c,
src/shared/luo-util.c). fdboxd itself is the real one, on ``--backend liveupdate``.
One run, two boots:

1. fdboxd chooses the fd store (no ``@`` holder is started); sealing ``vm1`` and ``vm2``
   puts their sessions, the index's and the carried manifest's in the store; a restart
   from the store gets them back still preserved (the boxes are sealed again); unseal
   ``vm2`` closes its session and sealing it again at once makes a new one.
2. After the kexec fdboxd takes the retrieved sessions from LISTEN_FDS (a session is
   retrieved once: by name it could not), every byte is back, and the store's copies
   of the sessions are removed.

What this cannot show: systemd 261 itself doing its part.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vmlib

pytestmark = pytest.mark.vm

STAGE_LIB = ". tests/vm/stagelib.sh\n"
PID1 = "python3 tests/vm/guest/pid1_261.py"


def _json(out: Path, name: str) -> dict:
    return json.loads((out / f"pid1-261-{name}.json").read_text())


def _sessions(store: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in store.items() if k.startswith("luo#")}


SEALED = {f"luo#{n.replace(':', '#')}": f"anon_inode:[luo_session] {n}"
          for n in ("fdboxd.manifest", "fdboxd:index", "vm1", "vm2")}


def test_sessions_in_the_fd_store_across_a_restart_and_a_kexec(vm: vmlib.Harness) -> None:
    stage1 = STAGE_LIB + f"""
{PID1} boot1 > /out/pid1-261-boot1.log 2>&1 &
p=$!
i=0
until [ -e /out/pid1-261-boot1.json ]; do
    i=$((i + 1))
    [ $i -lt 1200 ] && kill -0 $p 2>/dev/null || {{ log "PID 1 stand-in failed"; cat /out/pid1-261-boot1.log; exit 1; }}
    sleep 0.5
done
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + f"""
{PID1} boot2
"""
    run = vm.run(stage1, stages=[stage1, stage2], timeout=900)
    run.check()
    out = run.out_dir

    b1 = _json(out, "boot1")
    assert _sessions(b1["sealed"]) == SEALED, b1["sealed"]
    assert b1["holders_sealed"] == [] and b1["holders"] == [], b1  # no '@' holder on this path
    st = b1["status_restarted"]
    assert st["sealed"] == 2 and st["lost"] == [], st  # the restart got them back preserved
    assert _sessions(b1["unsealed"]) == {k: v for k, v in SEALED.items() if k != "luo#vm2"}, b1["unsealed"]
    assert _sessions(b1["resealed"]) == SEALED, b1["resealed"]

    b2 = _json(out, "boot2")
    assert b2["passed"] == sorted(SEALED), b2
    assert b2["status"]["restored"] == 2 and b2["status"]["lost"] == [], b2["status"]
    assert b2["verified"] == {"vm1/ram0": "OK", "vm1/ram1": "OK", "vm2/ram0": "OK"}, b2["verified"]
    assert _sessions(b2["store"]) == {} and set(SEALED) <= set(b2["removed"]), b2
    assert b2["holders"] == [], b2
