"""A guest_memfd's carried copy crosses a real kexec and is restored into a new one.

SIMULATED guest_memfd: the test guest has no KVM, so tests/vm/gmemstage.py makes
fdboxd's type detection see memfds named ``standin-gmem-*`` as guest_memfd and nothing
else; the rest is the real daemon on the real kernel backend (see gmemstage.py's
docstring). Stage 1: fdboxd (kernel backend, ``--verify full``) holds a 16 MiB stand-in
"guest_memfd" with holes (like guest RAM) and a device-state memfd; ``Seal`` of every
box copies the former (its pages only) into a memfd that the module preserves with KHO;
kexec. Stage 2: the carried copy is there, a
``Get`` of the entry says to use RestoreInto, the "restarted VMM" passes a new, zeroed
stand-in to ``RestoreInto`` and gets the bytes back, checked against the seal's SHA-256;
the entry then holds the new file and the box reopens once devstate is taken too.
"""

from __future__ import annotations

import json

import pytest

import vmlib

pytestmark = pytest.mark.vm

STAGE_LIB = ". tests/vm/stagelib.sh\n"
GMEM = "python3 tests/vm/gmemstage.py"
SIZE = 16 << 20

# start_fdboxd from stagelib.sh, but through gmemstage.py's stand-in detection. auto: the
# carried copy and the device state are plain memfds, which LUO carries on this kernel
# (fdbox.ko seals hugetlb only beside LUO's memfd handler, issue 20).
START = f"""
mkdir -p /run/fdbox /var/lib/fdbox
{GMEM} daemon --backend auto --verify full --socket /run/fdbox/fdboxd.sock --state-dir /var/lib/fdbox \
    > /out/fdboxd-stage$FDBOX_VM_STAGE.log 2>&1 &
echo $! > /run/fdboxd.pid
i=0
until [ -S /run/fdbox/fdboxd.sock ]; do
    i=$((i + 1)); [ $i -lt 600 ] || {{ log "fdboxd did not come up"; exit 1; }}
    kill -0 "$(cat /run/fdboxd.pid)" 2>/dev/null || {{ log "fdboxd died"; exit 1; }}
    sleep 0.5
done
"""


def test_guest_memfd_copy_crosses_kexec_and_restores_into_a_new_one(vm_with_module: vmlib.Harness) -> None:
    stage1 = STAGE_LIB + "load_module\n" + START + f"""
{GMEM} put --size {SIZE} --seed 5 > /out/put.json
stop_fdboxd
vm-kexec --reuse-cmdline
"""
    stage2 = STAGE_LIB + "load_module\n" + START + f"""
{GMEM} restore --size {SIZE} --seed 5 > /out/restore.json
"""
    run = vm_with_module.run(stage1, stage2, timeout=300)
    run.check()
    out = run.out_dir
    put = json.loads((out / "put.json").read_text())
    assert put["ram0"]["type"] == "guest_memfd", put  # the stand-in, as the daemon saw it
    assert put["ram0"]["extra"]["guest_memfd"] == {"shared": True}
    assert put["sealed"] == ["vm1"], put
    sealed = {e["name"]: e for e in put["list"]["entries"]}
    assert sealed["ram0"]["sha256"] == put["sha256"]  # checksummed from the copy
    assert sealed["ram0"]["extra"]["guest_memfd"] == {"shared": True, "carried": True}
    assert set(sealed) == {"ram0", "devstate"}  # the copy is no entry of its own
    r = json.loads((out / "restore.json").read_text())
    restored = r["restored_status"]
    assert restored["backend"] == "liveupdate+kernel" and restored["restored"] == 1, restored
    assert restored["lost"] == [] and restored["adopted"] == [], restored
    assert r["get_error"] == "InvalidRequest" and "RestoreInto" in r["get_message"], r
    assert r["bytes_ok"] and r["sha256"] == put["sha256"], r
    assert r["same_file"], r  # the entry now holds the restarted VMM's new file
    assert r["entry"]["claimed"] is True and r["entry"]["extra"]["guest_memfd"] == {"shared": True}
    assert r["devstate"] == "device state 5"
    assert r["list"]["boxes"][0]["state"] == "open", r["list"]  # every entry claimed
    assert r["status"]["lost"] == [], r["status"]
    log2 = (out / "fdboxd-stage2.log").read_text()
    assert "verified restored entries: 0 failed" in log2, log2
