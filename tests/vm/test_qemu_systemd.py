"""fdbox-qemu@.service under a real systemd (PID 1): `systemctl kexec` suspends the VM
inside the kexec transaction before fdbox-seal.service seals, and after the kexec the
unit resumes the guest.

The test boots the test kernel with systemd 252 as PID 1 (see test_systemd_kexec.py
for how, and for the fdboxd/seal drop-ins reused here) and installs the shipped
fdbox-qemu@.service and fdbox-qemu-suspend@.service unchanged; drop-ins only point the
commands at this checkout (``python3 -m fdboxd.qemu``, no console script is installed
here) and add uptime markers on the console. The VM is the boot-sector guest of
tests/qemu-guest/tick.S, configured in /etc/fdbox/qemu/vmq.conf as an operator would.

Order asserted from the console: shutdown.target reached, then the suspend unit ran
and finished, then the seal, then "Rebooting with kexec."; in stage 2 the same unit
resumes the guest (same token, counter continues, memory check OK), and `systemctl
stop` suspends it into fdbox again.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

import vmlib
from test_systemd_kexec import ANSI_RE, CMDLINE, SETUP, START_DAEMON, _index, _uptime_marker, guest_units

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qemuguest  # noqa: E402
from test_qemu_kexec import check_resumed  # noqa: E402

pytestmark = pytest.mark.vm

REPO = vmlib.repo_root()
PY = f"{sys.executable} -m fdboxd.qemu"


def qemu_units() -> dict[str, str]:
    units = guest_units()
    units["fdbox-qemu@.service"] = (REPO / "units" / "fdbox-qemu@.service").read_text()
    units["fdbox-qemu-suspend@.service"] = (REPO / "units" / "fdbox-qemu-suspend@.service").read_text()
    units["fdbox-qemu@.service.d/50-vm-test-paths.conf"] = textwrap.dedent(f"""\
        # VM test: fdbox-qemu runs from this checkout (no console script installed here).
        [Service]
        Environment=PYTHONPATH={REPO}
        ExecStart=
        ExecStart={PY} start %i $FDBOX_QEMU_OPTS -- $QEMU_ARGS
        ExecStop=
        ExecStop=/bin/sh -c '[ -z "$MAINPID" ] || exec {PY} suspend %i'
        """)
    units["fdbox-qemu-suspend@.service.d/50-vm-test-paths.conf"] = textwrap.dedent(f"""\
        # VM test: fdbox-qemu from this checkout; output and uptime markers on the console.
        [Service]
        Environment=PYTHONPATH={REPO}
        ExecStartPre={_uptime_marker("suspend start")}
        ExecStart=
        ExecStart={PY} suspend %i
        ExecStartPost={_uptime_marker("suspend done")}
        StandardOutput=journal+console
        StandardError=journal+console
        """)
    return units


def _conf(tag: str) -> str:
    args = " ".join(qemuguest.qemu_args(Path("/run/tick.img"), Path(f"/out/vmq-{tag}.serial")))
    return textwrap.dedent(f"""\
        mkdir -p /etc/fdbox/qemu
        [ -f /run/tick.img ] || cp /out/tick.img /run/tick.img
        printf '%s\\n' 'FDBOX_QEMU_OPTS=--ram 32M' 'QEMU_ARGS={args}' > /etc/fdbox/qemu/vmq.conf
        systemctl start fdbox-qemu@vmq.service
        systemctl show -p MainPID --value fdbox-qemu@vmq.service > /run/vmq.pid
        wait_ticks vmq {tag} {3 if tag == "1" else 4}
        """)


def test_systemctl_kexec_suspends_before_seal_and_resumes(vm_with_module: vmlib.Harness) -> None:
    qemuguest.build(vm_with_module.out_dir)
    lib = ". tests/vm/qemustage.sh\n"
    stage1 = SETUP + lib + START_DAEMON + textwrap.dedent("""\
        systemctl enable fdbox-qemu-suspend@vmq.service
        test -L /etc/systemd/system/systemd-kexec.service.requires/fdbox-qemu-suspend@vmq.service
        test -L /etc/systemd/system/fdbox-seal.service.requires/fdbox-qemu-suspend@vmq.service
        """) + _conf("1") + "vm-kexec\n"
    stage2 = textwrap.dedent("""\
        . tests/vm/stagelib.sh
        load_module
        install -m 0644 contrib/dbus/io.fdbox1.conf /etc/dbus-1/system.d/io.fdbox1.conf
        systemctl try-reload-or-restart dbus.service
        """) + lib + START_DAEMON + "ctl --json status > /out/restored-status.json\n" + _conf("2") + textwrap.dedent("""\
        ctl --json list vmq > /out/after.json
        systemctl stop fdbox-qemu@vmq.service
        ctl --json list vmq > /out/stopped.json
        """)
    run = vm_with_module.run(stage1, stage2, systemd=True, units=qemu_units(), cmdline_extra=CMDLINE, timeout=900)
    run.check()
    out, console = run.out_dir, ANSI_RE.sub("", run.console)
    assert [s.status for s in run.stages] == ["kexec", "ok"]

    # Stage 1's kexec transaction, in console order.
    shutdown = _index(console, "Reached target shutdown.target")
    sus_start = _index(console, "fdbox-vm-test: suspend start", shutdown)
    sus_line = _index(console, "vmq: suspended (running before)", sus_start)
    sus_done = _index(console, "Finished fdbox-qemu-suspend@vmq.service", sus_line)
    seal_start = _index(console, "fdbox-vm-test: seal start", sus_done)
    _index(console, '{"parameters":{"sealed":["vmq"]}}', seal_start)  # fdbox-call's last reply
    seal_finished = _index(console, "Finished fdbox-seal.service", seal_start)
    kexec = _index(console, "Rebooting with kexec.", seal_finished)
    assert "Stopped fdbox-qemu@vmq.service" not in console[:shutdown], "the VM was stopped before the transaction's suspend"
    # No unit failed in the transaction (systemd's own markers; a daemon's log line such
    # as journald's "Failed to send WATCHDOG=1 notification" while PID 1 hands over to
    # systemd-shutdown is not a unit failing).
    for marker in ("[FAILED]", "Failed to start", "Dependency failed", "Failed with result"):
        assert marker not in console[shutdown:kexec], console[shutdown:kexec]

    restored = json.loads((out / "restored-status.json").read_text())
    assert restored["restored"] == 1 and not restored["lost"], restored
    last, first = check_resumed(out, "vmq")
    assert {e["name"] for e in json.loads((out / "after.json").read_text())["entries"]} == {"ram0"}
    stopped = {e["name"]: e for e in json.loads((out / "stopped.json").read_text())["entries"]}
    assert set(stopped) == {"ram0", "devstate"}, stopped  # systemctl stop = suspend into fdbox
    print(f"\nvmq: last tick before {last.n}, first after {first.n}; wall {run.wall_seconds:.0f}s")


# A refused kexec: the test's watcher (not stopped by the shutdown transaction, as in
# test_systemd_kexec.py) waits for the suspend unit to fail and the job queue to settle,
# records what systemd and fdboxd say and whether the guest still runs, and powers off.
WATCH_UNIT = textwrap.dedent("""\
    [Unit]
    Description=fdbox VM test: record a refused kexec, then power off
    DefaultDependencies=no

    [Service]
    Type=simple
    ExecStart=/bin/sh /run/fdbox-vm/qemu-abort-watch.sh
    StandardOutput=journal+console
    StandardError=journal+console
    """)

WATCH_SCRIPT = textwrap.dedent("""\
    . /run/fdbox-vm/env
    cd "$FDBOX_VM_CWD"
    rc=1
    i=0
    while [ $i -lt 480 ]; do
        if [ "$(systemctl show -p ActiveState --value fdbox-qemu-suspend@vmq.service)" = failed ] &&
           [ -z "$(systemctl list-jobs --no-legend)" ]; then
            rc=0
            break
        fi
        i=$((i + 1))
        sleep 0.5
    done
    mountpoint -q /out || mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /out
    for u in fdbox-qemu-suspend@vmq.service fdbox-seal.service systemd-kexec.service kexec.target \\
             fdbox-qemu@vmq.service fdboxd.service; do
        echo "$u $(systemctl show -p ActiveState --value $u) $(systemctl show -p Result --value $u)"
    done > /out/abort-units.txt
    $PYTHON -m fdboxd.ctl --json list vmq > /out/abort-list.json 2>&1 || true
    n0=$(grep -c 'sum=OK' /out/vmq-1.serial)
    sleep 2
    n1=$(grep -c 'sum=OK' /out/vmq-1.serial)
    echo "$n0 $n1" > /out/abort-ticks.txt
    journalctl -b --no-pager > /out/stage1.journal 2>&1 || true
    dmesg > /out/stage1.dmesg
    cut -d' ' -f1 /proc/uptime > /out/stage1.end
    echo $rc > /out/stage1.rc
    sync
    kexec -u
    echo "fdbox-vm-test: kexec refused; powering off"
    systemctl --no-block poweroff
    """)


def test_failed_suspend_stops_kexec(vm_with_module: vmlib.Harness) -> None:
    """The suspend cannot reach QEMU (its QMP socket is gone): no seal, no kexec, the guest runs on."""
    qemuguest.build(vm_with_module.out_dir)
    (vm_with_module.out_dir / "qemu-abort-watch.sh").write_text(WATCH_SCRIPT)
    stage1 = SETUP + ". tests/vm/qemustage.sh\n" + START_DAEMON + textwrap.dedent("""\
        systemctl enable fdbox-qemu-suspend@vmq.service
        """) + _conf("1") + textwrap.dedent("""\
        rm /run/fdbox/qemu/vmq.qmp        # fdbox-qemu suspend can no longer reach this QEMU
        cp /out/qemu-abort-watch.sh /out/.vm/env /run/fdbox-vm/
        systemctl start fdbox-vm-qemu-abort-watch.service
        vm-kexec
        """)
    units = qemu_units() | {"fdbox-vm-qemu-abort-watch.service": WATCH_UNIT}
    run = vm_with_module.run(stage1, systemd=True, units=units, cmdline_extra=CMDLINE, timeout=600)
    out, console = run.out_dir, ANSI_RE.sub("", run.console)
    assert "Rebooting with kexec." not in console, run.report()
    assert len((out / ".vm" / "boots").read_text().splitlines()) == 1, "the guest booted twice: it kexec'd"
    run.check()
    fail = _index(console, "Failed to start fdbox-qemu-suspend@vmq.service")
    assert "NotFound" in console[:fail], "fdbox-qemu's error is not on the console"
    _index(console, "Dependency failed for fdbox-seal.service", fail)
    _index(console, "Dependency failed for systemd-kexec.service", fail)
    assert "fdbox-vm-test: seal start" not in console  # the seal never ran
    units = {line.split()[0]: line.split()[1:] for line in (out / "abort-units.txt").read_text().splitlines()}
    assert units["fdbox-qemu-suspend@vmq.service"] == ["failed", "exit-code"], units
    assert units["systemd-kexec.service"][0] == "inactive" and units["kexec.target"][0] == "inactive", units
    assert units["fdbox-seal.service"][0] == "inactive", units
    assert units["fdbox-qemu@vmq.service"][0] == "active", units  # the VM is still there
    entries = {e["name"] for e in json.loads((out / "abort-list.json").read_text())["entries"]}
    boxes = {b["name"]: b["state"] for b in json.loads((out / "abort-list.json").read_text())["boxes"]}
    assert entries == {"ram0"} and boxes["vmq"] == "open", (entries, boxes)
    n0, n1 = map(int, (out / "abort-ticks.txt").read_text().split())
    assert n1 > n0, "the guest stopped ticking after the refused kexec"
