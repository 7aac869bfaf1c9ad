"""The liveupdate backend in a real kernel: memfds cross real kexecs through LUO.

One run, three boots (the VM budget is a few minutes, so the checks share boots):

1. ``--backend auto`` with fdbox.ko loaded (LUO for plain memfds, the module for
   hugetlb): a second agent can open /dev/liveupdate while fdboxd runs; seal→unseal of
   a mixed box loses nothing and unfreezes the memfd; a memfd fdbox.ko holds, and one
   file named twice, are refused at seal (never preserved twice); then the mixed box
   ``vm1`` (memfd on LUO + hugetlb on the module) and ``vm9`` are sealed, fdboxd stops,
   and the ``@`` holder process alone keeps the sessions open into the kexec.
2. auto again, after two starts that fail once the sessions are retrieved (issue 25,
   case a): one stopped by a failpoint just before LUO's FINISH, one by a manifest
   from a newer fdbox (schema 99), each leaving the sessions with the ``@`` holder;
   then a good start: ``vm1`` comes back whole, byte for byte, its memfd through LUO
   and its hugetlb through the module; ``vm9`` is left restored and unclaimed; kexec
   with nothing sealed.
3. ``--backend liveupdate`` without the module: the daemon starts clean — ``vm9`` did not
   cross the second kexec, no LUO session is left over, the device is free. Then a
   second process holds /dev/liveupdate (as luod does): a seal retries for
   ``--liveupdate-wait`` (3 s), fails naming the holder's pid, in the log and Status
   too, and preflight names it while it holds; a holder that lets go within the wait
   does not fail the seal (adds ~10 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vmlib

pytestmark = pytest.mark.vm

STAGE_LIB = ". tests/vm/stagelib.sh\n"
STEP = "python3 tests/vm/guest/luo_stages.py"
HUGEPAGES = "hugepages=24"  # 2 MiB pages: 8 + 4 MiB, the module's restore copy, room
FDBOXD = "python3 -m fdboxd --backend auto --socket /run/fdbox/fdboxd.sock --state-dir /var/lib/fdbox"
#: A start that must fail (the stage goes on only if it did; ``! cmd`` would not stop ``sh -e``).
FAILED_START = "must_fail env"
MUST_FAIL = 'must_fail() { if "$@"; then log "should have failed: $*"; exit 1; fi; }\n'
NEWER_SCHEMA = ("python3 -c 'import json, sys; p = sys.argv[1]; d = json.load(open(p)); d[\"schema\"] = 99; "
                "json.dump(d, open(p, \"w\"))' /var/lib/fdbox/manifest.json")


def _json(out: Path, step: str) -> dict:
    return json.loads((out / f"luo-{step}.json").read_text())


def _all_ok(verified: dict[str, str], n: int) -> bool:
    return len(verified) == n and all(v.startswith("OK ") for v in verified.values())


def test_liveupdate_backend_across_kexecs(vm_with_module: vmlib.Harness) -> None:
    stage1 = STAGE_LIB + f"""
load_module
start_fdboxd --backend auto
{STEP} 1
stop_fdboxd
{STEP} 1-stopped
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + MUST_FAIL + f"""
load_module
mkdir -p /run/fdbox /var/lib/fdbox
{FAILED_START} FDBOX_FAILPOINTS='start.before_finish=error(EIO)' {FDBOXD} > /out/fdboxd-stage2-failpoint.log 2>&1
cp /var/lib/fdbox/manifest.json /run/manifest.json.keep
{NEWER_SCHEMA}
{FAILED_START} {FDBOXD} > /out/fdboxd-stage2-schema.log 2>&1
mv /run/manifest.json.keep /var/lib/fdbox/manifest.json
start_fdboxd --backend auto
{STEP} 2
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage3 = STAGE_LIB + f"""
start_fdboxd --backend liveupdate --liveupdate-wait 3
{STEP} 3
stop_fdboxd
"""
    run = vm_with_module.run(stage1, stages=[stage1, stage2, stage3],
                             cmdline_extra=(HUGEPAGES,), timeout=600)
    run.check()
    out = run.out_dir

    # stage 1: the device is free while fdboxd runs, before and after a seal
    s1 = _json(out, "1")
    assert s1["agent_running"] == "" and s1["agent_sealed"] == "", s1
    held = s1["holders_scratch"]
    assert len(held) == 1 and held[0]["argv0"] == "@fdboxd-luo-holder", held
    # the sealed box, the manifest carried inside the sealed set, the index
    assert held[0]["sessions"] == ["fdboxd.manifest", "fdboxd:index", "scratch"], held
    assert _all_ok(s1["scratch"], 2), s1["scratch"]  # seal -> unseal lost nothing
    assert s1["module_held"] == "AlreadyExists" and s1["module_held_sealed"] == 0, s1
    assert s1["twice"] == "AlreadyExists" and s1["twice_sealed"] == 0, s1
    assert sorted(s1["sealed"]) == ["vm1", "vm9"]
    assert s1["status"]["backend"] == "liveupdate+kernel", s1["status"]
    stopped = _json(out, "1-stopped")
    # fdboxd is gone: the '@' holder alone keeps the sessions open into the kexec
    assert [h["sessions"] for h in stopped["holders"]] == [["fdboxd.manifest", "fdboxd:index", "vm1", "vm9"]]
    assert stopped["agent"] == ""

    # stage 2: two starts failed after retrieving the sessions (a failpoint just before
    # FINISH, a manifest from a newer fdbox); each left them with the holder, and the
    # good start took them back from it
    failed = (out / "fdboxd-stage2-failpoint.log").read_text()
    assert "failpoint start.before_finish" in failed, failed[-3000:]
    newer = (out / "fdboxd-stage2-schema.log").read_text()
    assert "schema" in newer and "reclaimed" in newer, newer[-3000:]
    good = (out / "fdboxd-stage2.log").read_text()
    assert "LUO sessions from the previous fdboxd's holder (4 incoming)" in good, good[-3000:]
    # the mixed box is back whole; LUO is done with the device after restore
    s2 = _json(out, "2")
    assert s2["status"]["restored"] == 2 and s2["status"]["lost"] == [], s2["status"]
    assert s2["agent"] == ""
    assert _all_ok(s2["vm1"], 2) and "memfd-hugetlb" in s2["vm1"]["ram1"], s2["vm1"]
    assert s2["status_after"]["restored"] == 1 and s2["status_after"]["sealed"] == 0

    # stage 3, --backend liveupdate: vm9, restored but never claimed nor finished in
    # stage 2, did not cross the second kexec, and a kexec with nothing sealed starts
    # clean: no box, no LUO session left over, the device free
    s3 = _json(out, "3")
    st = s3["status"]
    assert st["backend"] == "liveupdate", st
    assert (st["boxes"], st["entries"], st["restored"]) == (0, 0, 0), st
    assert st["lost"] == [] and st["adopted"] == [], st
    assert s3["agent"] == "" and s3["leftover"] == [], s3

    # stage 3, another process holds /dev/liveupdate: bounded retry, then one line
    # naming the holder in the error, Status and the log; never silent, never stuck
    pid = s3["busy_pid"]
    name, message = s3["busy_error"]
    assert name == "BackendUnavailable" and f"pid {pid} (" in message and "gave up after" in message, message
    assert "\n" not in message
    assert 3 <= s3["busy_seconds"] < 15, s3["busy_seconds"]
    assert s3["busy_state"] == 0  # nothing half-sealed
    assert len(s3["busy_problems"]) == 1 and f"pid {pid} (" in s3["busy_problems"][0], s3["busy_problems"]
    log = (out / "fdboxd-stage3.log").read_text()
    assert f"/dev/liveupdate is held by pid {pid} (" in log and "retrying for up to 3 s" in log, log
    assert "gave up after" in log and "became free after" in log, log
    # released within the wait: the seal went through, and Status has nothing to say
    assert s3["released"] == ["busy"] and s3["released_seconds"] >= 0.5, s3
    assert s3["released_problems"] == [], s3
    # preflight names the holder while it holds the device, and is quiet once it is free
    assert any(f"pid {pid} (" in m for m in s3["busy_preflight"]), s3["busy_preflight"]
    assert s3["released_preflight"] == [], s3["released_preflight"]
