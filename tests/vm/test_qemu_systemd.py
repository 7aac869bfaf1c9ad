"""fdbox-qemu@.service under a real systemd (PID 1): `systemctl kexec` suspends the VMs
inside the kexec transaction before fdbox-seal.service seals, and after the kexec the
units resume the guests.

The test boots the test kernel with systemd 252 as PID 1 (see test_systemd_kexec.py
for how, and for the fdboxd/seal drop-ins reused here) and installs the shipped
fdbox-qemu@.service and fdbox-qemu-suspend.service unchanged; drop-ins only point the
commands at this checkout (``python3 -m fdboxd.qemu`` with the units' own arguments, no
console script is installed here) and add uptime markers on the console. The VMs are
the boot-sector guest of tests/qemu-guest/tick.S, configured in
/etc/fdbox/qemu/NAME.conf as an operator would: three of them (issue 22), ``vmq`` and
``vmr`` on memfd RAM, ``vmh`` on 2 MiB hugetlb RAM, through one kexec.

Order asserted from the console: shutdown.target reached, then the suspend unit ran
and finished (one ``fdbox-qemu suspend --all`` for the three), then the seal, then
"Rebooting with kexec."; in stage 2 the same units resume the guests (same token,
counter continues, memory check OK), `systemctl start` returns only once every guest
runs (Type=notify: ``fdbox-qemu status`` right after it says running, devstate gone),
and `systemctl stop` of the three suspends them into fdbox again.
"""

from __future__ import annotations

import json
import re
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
# name -> fdbox-qemu start options: two on memfd RAM, one on hugetlb.
VMS = {"vmq": "--ram 32M", "vmr": "--ram 32M", "vmh": "--ram 32M --hugetlb 2M"}
UNITS_ALL = " ".join(f"fdbox-qemu@{vm}.service" for vm in VMS)


def _checkout_exec(unit: str, key: str) -> str:
    """The unit's ``key=`` line with /usr/bin/fdbox-qemu replaced by this checkout's."""
    m = re.search(rf"^{key}=(.*)$", (REPO / "units" / unit).read_text(), re.MULTILINE)
    assert m and "/usr/bin/fdbox-qemu " in m.group(1), f"units/{unit} has no {key}= running fdbox-qemu"
    return m.group(1).replace("/usr/bin/fdbox-qemu ", f"{PY} ")


def qemu_units() -> dict[str, str]:
    units = guest_units()
    units["fdbox-qemu@.service"] = (REPO / "units" / "fdbox-qemu@.service").read_text()
    units["fdbox-qemu-suspend.service"] = (REPO / "units" / "fdbox-qemu-suspend.service").read_text()
    units["fdbox-qemu@.service.d/50-vm-test-paths.conf"] = textwrap.dedent(f"""\
        # VM test: fdbox-qemu runs from this checkout (no console script installed here).
        [Service]
        Environment=PYTHONPATH={REPO}
        ExecStart=
        ExecStart={_checkout_exec("fdbox-qemu@.service", "ExecStart")}
        ExecStop=
        ExecStop={_checkout_exec("fdbox-qemu@.service", "ExecStop")}
        """)
    units["fdbox-qemu-suspend.service.d/50-vm-test-paths.conf"] = textwrap.dedent(f"""\
        # VM test: fdbox-qemu from this checkout; output and uptime markers on the console.
        [Service]
        Environment=PYTHONPATH={REPO}
        ExecStartPre={_uptime_marker("suspend start")}
        ExecStart=
        ExecStart={_checkout_exec("fdbox-qemu-suspend.service", "ExecStart")}
        ExecStartPost={_uptime_marker("suspend done")}
        StandardOutput=journal+console
        StandardError=journal+console
        """)
    return units


def _conf(tag: str, vms: dict[str, str]) -> str:
    """Configure ``vms``, start their units in one systemctl call, wait for their ticks."""
    sh = "mkdir -p /etc/fdbox/qemu\n[ -f /run/tick.img ] || cp /out/tick.img /run/tick.img\n"
    for vm, opts in vms.items():
        args = " ".join(qemuguest.qemu_args(Path("/run/tick.img"), Path(f"/out/{vm}-{tag}.serial")))
        sh += f"printf '%s\\n' 'FDBOX_QEMU_OPTS={opts}' 'QEMU_ARGS={args}' > /etc/fdbox/qemu/{vm}.conf\n"
    sh += f"systemctl start {' '.join(f'fdbox-qemu@{vm}.service' for vm in vms)}\n"
    # Type=notify: systemctl returned once every guest runs; what fdbox-qemu says then.
    sh += f"fq status --json > /out/status-at-ready-{tag}.json\n"
    for vm in vms:
        sh += f"systemctl show -p MainPID --value fdbox-qemu@{vm}.service > /run/{vm}.pid\n"
    for vm in vms:
        sh += f"wait_ticks {vm} {tag} {3 if tag == '1' else 4}\n"
    return sh


def test_systemctl_kexec_suspends_before_seal_and_resumes(vm_with_module: vmlib.Harness) -> None:
    qemuguest.build(vm_with_module.out_dir)
    lib = ". tests/vm/qemustage.sh\n"
    stage1 = SETUP + lib + START_DAEMON + textwrap.dedent("""\
        systemctl enable fdbox-qemu-suspend.service
        test -L /etc/systemd/system/systemd-kexec.service.requires/fdbox-qemu-suspend.service
        test -L /etc/systemd/system/fdbox-seal.service.requires/fdbox-qemu-suspend.service
        """) + _conf("1", VMS) + "vm-kexec\n"
    stage2 = textwrap.dedent("""\
        . tests/vm/stagelib.sh
        load_module
        install -m 0644 contrib/dbus/io.fdbox1.conf /etc/dbus-1/system.d/io.fdbox1.conf
        systemctl try-reload-or-restart dbus.service
        """) + lib + START_DAEMON + "ctl --json status > /out/restored-status.json\n" + _conf("2", VMS) + \
        "".join(f"ctl --json list {vm} > /out/{vm}-after.json\n" for vm in VMS) + \
        f"systemctl stop {UNITS_ALL}\n" + \
        "".join(f"ctl --json list {vm} > /out/{vm}-stopped.json\n" for vm in VMS) + \
        RESTART_WHILE_SUSPENDED
    run = vm_with_module.run(stage1, stage2, systemd=True, units=qemu_units(),
                             cmdline_extra=(*CMDLINE, "hugepages=40"), timeout=900)
    run.check()
    out, console = run.out_dir, ANSI_RE.sub("", run.console)
    assert [s.status for s in run.stages] == ["kexec", "ok"]

    # Stage 1's kexec transaction, in console order.
    shutdown = _index(console, "Reached target shutdown.target")
    sus_start = _index(console, "fdbox-vm-test: suspend start", shutdown)
    sus_lines = [_index(console, f"{vm}: suspended (running before)", sus_start) for vm in VMS]
    sus_done = _index(console, "Finished fdbox-qemu-suspend.service", max(sus_lines))
    seal_start = _index(console, "fdbox-vm-test: seal start", sus_done)
    sealed = re.search(r'\{"parameters":\{"sealed":\[[^]]*\]\}\}', console[seal_start:])  # fdbox-call's last reply
    assert sealed, console[seal_start:]
    assert sorted(json.loads(sealed.group(0))["parameters"]["sealed"]) == sorted(VMS), sealed.group(0)
    seal_finished = _index(console, "Finished fdbox-seal.service", seal_start)
    kexec = _index(console, "Rebooting with kexec.", seal_finished)
    for vm in VMS:
        assert f"Stopped fdbox-qemu@{vm}.service" not in console[:shutdown], f"{vm} was stopped before the suspend"
    # No unit failed in the transaction (systemd's own markers; a daemon's log line such
    # as journald's "Failed to send WATCHDOG=1 notification" while PID 1 hands over to
    # systemd-shutdown is not a unit failing).
    for marker in ("[FAILED]", "Failed to start", "Dependency failed", "Failed with result"):
        assert marker not in console[shutdown:kexec], console[shutdown:kexec]

    restored = json.loads((out / "restored-status.json").read_text())
    assert restored["restored"] == len(VMS) and not restored["lost"], restored
    for tag in ("1", "2"):  # READY=1 only once each guest runs (and, resumed, devstate is gone)
        rows = {r["vm"]: r for r in json.loads((out / f"status-at-ready-{tag}.json").read_text())}
        assert {vm: (r["state"], r["devstate_bytes"]) for vm, r in rows.items()} == \
            {vm: ("running", None) for vm in VMS}, rows
        assert rows["vmh"]["ram_type"] == ["memfd-hugetlb"] and rows["vmq"]["ram_type"] == ["memfd"], rows
    for vm in VMS:
        last, first = check_resumed(out, vm)
        assert {e["name"] for e in json.loads((out / f"{vm}-after.json").read_text())["entries"]} == {"ram0"}
        stopped = {e["name"]: e for e in json.loads((out / f"{vm}-stopped.json").read_text())["entries"]}
        assert set(stopped) == {"ram0", "devstate"}, (vm, stopped)  # systemctl stop = suspend into fdbox
        print(f"\n{vm}: last tick before {last.n}, first after {first.n}", end="")
    check_restart_while_suspended(out)
    print(f"\nwall {run.wall_seconds:.0f}s")


# Issue 25 (b): a package upgrade restarts fdboxd while VMs are suspended into it. On
# --backend auto the plain-memfd RAM and every devstate live in the daemon (LUO's side of
# the mixed backend) and hugetlb RAM in fdbox.ko: the restart must keep all of them (the
# daemon's fd store), and each guest then resumes where it stopped.
RESTART_WHILE_SUSPENDED = "systemctl restart fdboxd.service\n" + \
    "ctl --json status > /out/restart-status.json\n" + \
    "".join(f"ctl --json list {vm} > /out/{vm}-restarted.json\n" for vm in VMS) + \
    _conf("3", VMS)


def check_restart_while_suspended(out: Path) -> None:
    st = json.loads((out / "restart-status.json").read_text())
    assert st["backend"] == "liveupdate+kernel" and not st["lost"], st
    for vm in VMS:
        held = {e["name"]: e for e in json.loads((out / f"{vm}-restarted.json").read_text())["entries"]}
        assert set(held) == {"ram0", "devstate"}, (vm, held)  # nothing lost across the restart
        before, after = qemuguest.ticks(out / f"{vm}-2.serial"), qemuguest.ticks(out / f"{vm}-3.serial")
        assert qemuguest.boots(out / f"{vm}-3.serial") == [], f"{vm} booted again after fdboxd's restart"
        assert len(after) >= 4 and before, (vm, after[:3])
        assert before[-1].n < after[0].n <= before[-1].n + 2, (vm, before[-1], after[0])
        assert all(t.token == before[-1].token and t.ok for t in after), (vm, after[:3])


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
        if [ "$(systemctl show -p ActiveState --value fdbox-qemu-suspend.service)" = failed ] &&
           [ -z "$(systemctl list-jobs --no-legend)" ]; then
            rc=0
            break
        fi
        i=$((i + 1))
        sleep 0.5
    done
    mountpoint -q /out || mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /out
    for u in fdbox-qemu-suspend.service fdbox-seal.service systemd-kexec.service kexec.target \\
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
    """The suspend cannot reach QEMU (its QMP socket is gone; --all still finds the QEMU by
    its command line): no seal, no kexec, the guest runs on."""
    qemuguest.build(vm_with_module.out_dir)
    (vm_with_module.out_dir / "qemu-abort-watch.sh").write_text(WATCH_SCRIPT)
    stage1 = SETUP + ". tests/vm/qemustage.sh\n" + START_DAEMON + textwrap.dedent("""\
        systemctl enable fdbox-qemu-suspend.service
        """) + _conf("1", {"vmq": VMS["vmq"]}) + textwrap.dedent("""\
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
    fail = _index(console, "Failed to start fdbox-qemu-suspend.service")
    assert "NotFound: VM vmq: its QEMU (pid" in console[:fail], "fdbox-qemu's error is not on the console"
    _index(console, "Dependency failed for fdbox-seal.service", fail)
    _index(console, "Dependency failed for systemd-kexec.service", fail)
    assert "fdbox-vm-test: seal start" not in console  # the seal never ran
    units = {line.split()[0]: line.split()[1:] for line in (out / "abort-units.txt").read_text().splitlines()}
    assert units["fdbox-qemu-suspend.service"] == ["failed", "exit-code"], units
    assert units["systemd-kexec.service"][0] == "inactive" and units["kexec.target"][0] == "inactive", units
    assert units["fdbox-seal.service"][0] == "inactive", units
    assert units["fdbox-qemu@vmq.service"][0] == "active", units  # the VM is still there
    entries = {e["name"] for e in json.loads((out / "abort-list.json").read_text())["entries"]}
    boxes = {b["name"]: b["state"] for b in json.loads((out / "abort-list.json").read_text())["boxes"]}
    assert entries == {"ram0"} and boxes["vmq"] == "open", (entries, boxes)
    n0, n1 = map(int, (out / "abort-ticks.txt").read_text().split())
    assert n1 > n0, "the guest stopped ticking after the refused kexec"
