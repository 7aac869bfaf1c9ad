"""fdbox-seal.service under a real systemd (PID 1): it seals before the kexec, and a
failed seal stops the kexec.

Both tests boot the test kernel with systemd 252 as PID 1 over the host root
(``run_guest(systemd=True)``) and install the project's own units from ``units/``
unchanged. Drop-ins (below) only point ``ExecStart=`` at where ``pip install -e .``
put the console scripts on this host and copy the seal's output to the console; they
change no ordering, dependency or hardening the units ship with, except
``ProtectHome=`` when the interpreter itself lives under /root or /home (pyenv).
fdbox.ko is loaded and fdboxd picks ``--backend auto``: the kernel has LUO, so the memfd
crosses through LUO (``liveupdate+kernel``). That proves the LUO sessions outlive
fdboxd through systemd-shutdown's final kill: their holder, ``@fdboxd-luo-holder``,
is spared by its ``@`` and keeps them open until the kexec.

The journal does not survive a kexec but the serial console does, so the order is
read from the console: systemd's own status lines ("Stopped …", "Finished …"), lines
the seal unit's ExecStartPre=/ExecStartPost= print with the guest uptime, and
systemd-shutdown's "Rebooting with kexec.".

* ``test_seal_runs_before_kexec``: the stand-in VMM puts a memfd, ``systemctl kexec``;
  the VMM's unit is stopped, then fdbox-seal.service starts and finishes, fdboxd is
  not stopped, and only then "Rebooting with kexec."; stage 2 gets the box back
  ``restored`` and the VMM's memory verifies byte for byte.
* ``test_failed_seal_aborts_kexec``: the state directory is a small file system that
  fills up after the put, so the seal unit's preflight (``Seal(preflight: true)``)
  refuses the seal: no room for the sealed snapshot (``BackendUnavailable``, a real
  refusal, not a stubbed ExecStart; the console shows fdbox-call's reply with the
  preflight's line, and nothing was sealed); systemd then never starts
  systemd-kexec.service. A watcher unit of the test (not stopped by the
  shutdown transaction) waits for the kexec job to fail, records the units' states,
  fdboxd's status (the box still open and held) and the VMM's memory, unloads the
  kexec kernel and powers off. The run must have booted exactly once.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import vmlib
from fdboxtest import build_libexec

UNITS = vmlib.repo_root() / "units"
BINDIR = Path(sys.executable).parent
"""Where ``pip install -e .`` put the ``fdboxd``/``fdboxctl`` console scripts."""

SEED = "systemd-kexec"
REGIONS = "--mem ram0=32M"
CMDLINE = ("systemd.status_unit_format=name",)
"""systemd's console status lines name units ("Finished fdbox-seal.service."), not
descriptions that get ellipsized to the console width."""
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def _exec_start(unit: str) -> str:
    """The unit's ExecStart= with its program moved to where this checkout has it
    (arguments kept): console scripts to :data:`BINDIR`, ``/usr/libexec/fdbox/``'s
    C client to the one built from ``libexec/``."""
    m = re.search(r"^ExecStart=(\S+)(.*)$", (UNITS / unit).read_text(), re.MULTILINE)
    assert m, f"units/{unit} has no ExecStart="
    if m.group(1).startswith("/usr/libexec/fdbox/"):
        return f"{build_libexec(Path(m.group(1)).name)}{m.group(2)}"
    return f"{BINDIR / Path(m.group(1)).name}{m.group(2)}"


def _uptime_marker(what: str) -> str:
    """An Exec line printing ``fdbox-vm-test: <what> uptime=<s>`` (no $ or % for systemd)."""
    return f'/bin/sed -e "s/ .*//" -e "s/^/fdbox-vm-test: {what} uptime=/" /proc/uptime'


def _under_tmp() -> bool:
    """Whether the code fdboxd runs (checkout, interpreter) is under a PrivateTmp= dir."""
    paths = (vmlib.repo_root().resolve(), BINDIR.resolve(), Path(sys.prefix).resolve())
    return any(str(p).startswith(t) for p in paths for t in ("/tmp/", "/var/tmp/"))


def guest_units() -> dict[str, str]:
    """The shipped units, unchanged, plus this host's path drop-ins."""
    units = {name: (UNITS / name).read_text() for name in ("fdboxd.service", "fdboxd.socket", "fdbox-seal.service")}
    home = any(str(BINDIR).startswith(p) for p in ("/root/", "/home/"))
    units["fdboxd.service.d/50-vm-test-paths.conf"] = textwrap.dedent(f"""\
        # VM test: the console script is where pip put it on this host; it runs the
        # code of this checkout (pip's editable install may point at another one).
        [Service]
        ExecStart=
        ExecStart={_exec_start("fdboxd.service")}
        Environment=PYTHONPATH={vmlib.repo_root()}
        """) + (
        "# This host's interpreter lives under /root or /home, which ProtectHome=yes hides.\n"
        "ProtectHome=read-only\n" if home else "") + (
        "# This checkout (a CI clone, say) lives under /tmp, which PrivateTmp=yes hides.\n"
        "PrivateTmp=no\n" if _under_tmp() else "")
    units["fdbox-seal.service.d/50-vm-test-paths.conf"] = textwrap.dedent(f"""\
        # VM test: the console script is where pip put it on this host; the seal's
        # output and two uptime markers go to the console, which survives the kexec.
        [Service]
        ExecStartPre={_uptime_marker("seal start")}
        ExecStart=
        ExecStart={_exec_start("fdbox-seal.service")}
        Environment=PYTHONPATH={vmlib.repo_root()}
        ExecStartPost={_uptime_marker("seal done")}
        StandardOutput=journal+console
        StandardError=journal+console
        # The uptime markers read /proc/uptime, which ProcSubset=pid hides.
        ProcSubset=all
        """) + (
        "# This host's interpreter lives under /root or /home, which ProtectHome=yes hides.\n"
        "ProtectHome=read-only\n" if home else "")
    return units


# Shell for both tests' stage 1: the module, the D-Bus policy, the units as an operator
# installs them, fdboxd started by systemd, and the stand-in VMM's memory put.
SETUP = textwrap.dedent("""\
    . tests/vm/stagelib.sh
    load_module
    install -m 0644 contrib/dbus/io.fdbox1.conf /etc/dbus-1/system.d/io.fdbox1.conf
    systemctl try-reload-or-restart dbus.service
    systemd-tmpfiles --create "$PWD/units/tmpfiles.d/fdbox.conf"
    systemctl enable fdbox-seal.service
    test -L /etc/systemd/system/systemd-kexec.service.requires/fdbox-seal.service
    systemctl show -p Requires -p After systemd-kexec.service > /out/kexec-deps.txt
    """)

START_DAEMON = textwrap.dedent("""\
    systemctl start fdboxd.service
    systemctl show -p ActiveState -p MainPID -p ExecMainStartTimestampMonotonic fdboxd.service \\
        > /out/fdboxd-stage$FDBOX_VM_STAGE.show
    """)

PUT = textwrap.dedent(f"""\
    vmm store --box vm1 {REGIONS} --seed {SEED}
    ctl --json status > /out/before-status.json
    """)


def _json(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


def _index(console: str, needle: str, after: int = 0) -> int:
    i = console.find(needle, after)
    assert i >= 0, f"{needle!r} not on the console (after offset {after})\n--- console tail ---\n" + console[-4000:]
    return i


def _marker_uptime(console: str, what: str) -> float:
    m = re.search(rf"fdbox-vm-test: {what} uptime=([0-9.]+)", console)
    assert m, f"no '{what}' marker on the console"
    return float(m.group(1))


def _check_before(out: Path) -> None:
    before = _json(out / "before-status.json")
    assert before["backend"] == "liveupdate+kernel", before
    assert (before["boxes"], before["entries"], before["sealed"]) == (1, 1, 0), before
    deps = (out / "kexec-deps.txt").read_text()
    assert "fdbox-seal.service" in deps.split("Requires=", 1)[1].splitlines()[0], deps


def test_seal_runs_before_kexec(vm_with_module: vmlib.Harness) -> None:
    stage1 = SETUP + START_DAEMON + PUT + "vm-kexec\n"
    stage2 = textwrap.dedent("""\
        . tests/vm/stagelib.sh
        load_module
        install -m 0644 contrib/dbus/io.fdbox1.conf /etc/dbus-1/system.d/io.fdbox1.conf
        systemctl try-reload-or-restart dbus.service
        """) + START_DAEMON + textwrap.dedent(f"""\
        ctl --json status > /out/restored-status.json
        ctl --json list vm1 > /out/restored-list.json
        vmm verify --box vm1 {REGIONS} --seed {SEED} | tee /out/verify.txt
        ctl --json status > /out/final-status.json
        ctl --json report > /out/report.json
        journalctl -o export FDBOX_PHASE=restore_end > /out/phase-restore-end.txt
        """)
    run = vm_with_module.run(stage1, stage2, systemd=True, units=guest_units(), cmdline_extra=CMDLINE, timeout=600)
    run.check()
    out, console = run.out_dir, ANSI_RE.sub("", run.console)
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    _check_before(out)

    # Stage 1's shutdown, in console order: the VMM's unit stopped (shutdown.target),
    # then the seal started and finished, then systemd-shutdown kexec'd.
    vmm_stopped = _index(console, "Stopped fdbox-vm-stage.service")
    shutdown = _index(console, "Reached target shutdown.target", vmm_stopped)  # After=shutdown.target
    seal_start = _index(console, "fdbox-vm-test: seal start", shutdown)
    sealed_line = _index(console, '{"parameters":{"sealed":["vm1"]}}', seal_start)  # fdbox-call's last reply
    seal_done = _index(console, "fdbox-vm-test: seal done", sealed_line)
    seal_finished = _index(console, "Finished fdbox-seal.service", seal_done)
    _index(console, "Reached target umount.target", seal_finished)  # Before=umount.target
    kexec = _index(console, "Rebooting with kexec.", seal_finished)
    assert "Reached target umount.target" not in console[vmm_stopped:seal_finished]
    assert "Failed to start fdbox-seal.service" not in console
    # fdboxd is not part of the kexec transaction: never stopped before the jump.
    assert "Stopped fdboxd.service" not in console[:kexec], "fdboxd.service was stopped before the kexec"
    assert console.count("Rebooting with kexec.") == 1

    # Stage 2: the box crossed the kexec sealed and came back restored, intact.
    restored = _json(out / "restored-status.json")
    assert restored["backend"] == "liveupdate+kernel" and restored["restored"] == 1, restored
    assert restored["lost"] == [], restored
    assert (out / "verify.txt").read_text().count("OK vm1/ram0") == 1, (out / "verify.txt").read_text()
    assert _json(out / "final-status.json")["state"] == "open"
    assert "KHO: exec from" in run.stage(2).dmesg

    # The timeline of that live update (fdboxctl report): every phase, in order, the
    # seal's half carried across the kexec in the sealed manifest.
    [report] = _json(out / "report.json")["boxes"]
    phases = {p["phase"]: p for p in report["phases"]}
    assert list(phases) == ["put", "seal_begin", "seal_end", "kernel_up", "restore_begin", "restore_end",
                            "first_get", "reopened"], report
    assert report["box"] == "vm1" and report["complete"] and report["sealed_to_restored_usec"] > 0
    times = [p["time"] for p in report["phases"][3:]]  # one clock from kernel_up on: the new kernel's
    assert times == sorted(times), report
    journal = (out / "phase-restore-end.txt").read_text()
    assert "FDBOX_BOX=vm1" in journal and "FDBOX_DURATION_USEC=" in journal, journal
    took = {p: phases[p].get("duration_usec", 0) / 1e6 for p in phases}

    t0, t1 = _marker_uptime(console, "seal start"), _marker_uptime(console, "seal done")
    s1, s2 = run.stage(1), run.stage(2)
    print(f"\nseal: started at uptime {t0:.2f}s, done at {t1:.2f}s ({t1 - t0:.2f}s for 32 MiB);"
          f" stage 1 script started at {s1.boot_seconds}s, ran {s1.script_seconds}s;"
          f" stage 2 script started at {s2.boot_seconds}s; wall {run.wall_seconds:.1f}s")
    print("report: " + ", ".join(f"{p} {t:.3f}s" for p, t in took.items() if t))


# The test's watcher for a refused kexec. DefaultDependencies=no and no Conflicts=, so
# the shutdown transaction leaves it running (like fdboxd). Started by stage 1 before
# `systemctl kexec`; it takes over the harness's part (rc, journal, dmesg, power off)
# because the stage's own unit is stopped by the transaction.
WATCH_UNIT = textwrap.dedent("""\
    [Unit]
    Description=fdbox VM test: record a refused kexec, then power off
    DefaultDependencies=no

    [Service]
    Type=simple
    ExecStart=/bin/sh /run/fdbox-vm/abort-watch.sh
    StandardOutput=journal+console
    StandardError=journal+console
    """)

WATCH_SCRIPT = textwrap.dedent(f"""\
    . /run/fdbox-vm/env
    cd "$FDBOX_VM_CWD"
    say() {{ echo "fdbox-vm-test: $*"; }}
    # Wait for the kexec to be asked for and to settle: the seal failed, no jobs left.
    rc=1
    i=0
    while [ $i -lt 480 ]; do
        if [ "$(systemctl show -p ActiveState --value fdbox-seal.service)" = failed ] &&
           [ -z "$(systemctl list-jobs --no-legend)" ]; then
            rc=0
            break
        fi
        i=$((i + 1))
        sleep 0.5
    done
    say "kexec settled (rc=$rc) at uptime $(cut -d' ' -f1 /proc/uptime)"
    # umount.target may have unmounted /out while the kexec was being refused.
    mountpoint -q /out || mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /out
    for u in fdbox-seal.service systemd-kexec.service kexec.target fdboxd.service shutdown.target; do
        echo "$u $(systemctl show -p ActiveState --value $u) $(systemctl show -p Result --value $u)"
    done > /out/abort-units.txt
    cat /sys/kernel/kexec_loaded > /out/abort-kexec-loaded.txt
    $PYTHON -m fdboxd.ctl --json status > /out/abort-status.json 2>&1 || true
    $PYTHON contrib/vmm/standin-vmm --socket /run/fdbox/fdboxd.sock verify --box vm1 {REGIONS} \\
        --seed {SEED} > /out/abort-verify.txt 2>&1 || true
    journalctl -b --no-pager > /out/stage1.journal 2>&1 || true
    dmesg > /out/stage1.dmesg
    cut -d' ' -f1 /proc/uptime > /out/stage1.end
    # The stage ends here, without the kexec it asked for (vm-kexec wrote "kexec").
    echo $rc > /out/stage1.rc
    sync
    kexec -u
    say "kexec refused; powering off"
    systemctl --no-block poweroff
    """)


def test_failed_seal_aborts_kexec(vm_with_module: vmlib.Harness) -> None:
    (vm_with_module.out_dir).mkdir(parents=True, exist_ok=True)
    (vm_with_module.out_dir / "abort-watch.sh").write_text(WATCH_SCRIPT)
    stage1 = SETUP + textwrap.dedent("""\
        # The state directory is its own small file system (as /var often is).
        mkdir -p /var/lib/fdbox
        mount -t tmpfs -o size=256k,mode=0700 fdbox-state /var/lib/fdbox
        """) + START_DAEMON + PUT + textwrap.dedent("""\
        # ... and it fills up after the put: fdboxd cannot write the sealed manifest.
        dd if=/dev/zero of=/var/lib/fdbox/filler bs=4k 2>/dev/null || true
        df -k /var/lib/fdbox > /out/state-df.txt
        cp /out/abort-watch.sh /out/.vm/env /run/fdbox-vm/
        systemctl start fdbox-vm-abort-watch.service
        vm-kexec
        """)
    units = guest_units() | {"fdbox-vm-abort-watch.service": WATCH_UNIT}
    run = vm_with_module.run(stage1, systemd=True, units=units, cmdline_extra=CMDLINE, timeout=420)
    out, console = run.out_dir, ANSI_RE.sub("", run.console)
    assert "Rebooting with kexec." not in console, run.report()
    assert len((out / ".vm" / "boots").read_text().splitlines()) == 1, "the guest booted twice: it kexec'd"
    run.check()  # rc 0 from the watcher: it saw the seal fail and the job queue settle
    _check_before(out)

    # The seal was refused by fdboxd's preflight for its real reason (no room for the
    # sealed snapshot), before anything was sealed, and systemd stopped the kexec.
    seal_fail = _index(console, "Failed to start fdbox-seal.service")
    assert "io.fdbox.Store.BackendUnavailable" in console[:seal_fail], "fdbox-call's error is not on the console"
    why = _index(console, "preflight: 1 problem(s): room: the state file system (/var/lib/fdbox) has")
    assert why < seal_fail and "the seal writes a snapshot of about" in console[why:seal_fail], console[why:seal_fail]
    _index(console, "Dependency failed for systemd-kexec.service", seal_fail)
    _index(console, "Dependency failed for kexec.target", seal_fail)
    assert "fdbox-vm-test: seal done" not in console  # ExecStartPost= runs only on success
    units = {line.split()[0]: line.split()[1:] for line in (out / "abort-units.txt").read_text().splitlines()}
    assert units["fdbox-seal.service"] == ["failed", "exit-code"], units
    assert units["systemd-kexec.service"][0] == "inactive", units
    assert units["kexec.target"][0] == "inactive", units
    assert units["fdboxd.service"][0] == "active", units
    assert (out / "abort-kexec-loaded.txt").read_text().strip() == "1"  # loaded, never executed
    journal = run.stage(1).journal
    assert "preflight: room: the state file system (/var/lib/fdbox) has" in journal, journal[-3000:]
    assert "Seal * by uid 0" in journal and "refused: BackendUnavailable: preflight:" in journal, journal[-3000:]

    # Nothing half-sealed: the box is open, still held, its memory intact.
    after = _json(out / "abort-status.json")
    assert (after["state"], after["boxes"], after["entries"], after["sealed"]) == ("open", 1, 1, 0), after
    assert (out / "abort-verify.txt").read_text().count("OK vm1/ram0") == 1, (out / "abort-verify.txt").read_text()

    s1 = run.stage(1)
    print(f"\nkexec refused; stage 1 script started at {s1.boot_seconds}s, watcher done at "
          f"{s1.boot_seconds + (s1.script_seconds or 0):.1f}s uptime; wall {run.wall_seconds:.1f}s")
