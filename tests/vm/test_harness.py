"""Proofs that the VM tier itself works: each of these can fail if the harness breaks.

Timings are printed (run with ``-s``) and kept in the output dir, never asserted.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import vmlib


def test_guest_runs_host_python_on_this_checkout(vm: vmlib.Harness, vm_kernel: vmlib.TestKernel) -> None:
    repo = vmlib.repo_root()
    probe = repo / "build" / "vm" / "guest-write-probe"
    probe.unlink(missing_ok=True)
    run = vm.run(
        textwrap.dedent(
            f"""
        uname -r > /out/uname
        $PYTHON - <<'PY'
        import json, os, sys
        sys.path.insert(0, "tests/vm")
        import vmlib, fdboxd
        json.dump({{
            "vmlib": vmlib.__file__, "fdboxd": fdboxd.__file__, "cwd": os.getcwd(),
            "in_guest": vmlib.in_guest(), "stage": vmlib.current_stage(),
            "executable": sys.executable,
        }}, open("/out/probe.json", "w"))
        PY
        # The host root is read-only underneath: writes land in the guest's tmpfs overlay.
        touch {probe}
        test -f {probe}
        """
        )
    )
    run.check()
    assert (vm.out_dir / "uname").read_text().strip() == vm_kernel.release
    info = json.loads((vm.out_dir / "probe.json").read_text())
    assert info["vmlib"] == str(repo / "tests" / "vm" / "vmlib.py")
    assert info["fdboxd"] == str(repo / "fdboxd" / "__init__.py")
    assert info["cwd"] == str(repo)
    assert info["in_guest"] is True and info["stage"] == 1
    assert not probe.exists(), "a guest write reached the host's checkout"
    s = run.stage(1)
    print(f"\nboot to stage script {s.boot_seconds}s, python stage {s.script_seconds:.2f}s, wall {run.wall_seconds:.1f}s")


def test_in_guest_pytest_failure_is_reported_by_name(vm: vmlib.Harness) -> None:
    tests = vm.out_dir / "guest_tests"
    tests.mkdir(parents=True)
    (tests / "test_tiny.py").write_text(
        textwrap.dedent(
            """
            def test_passes():
                assert 1 + 1 == 2

            def test_fails_on_purpose():
                value = 41
                assert value == 42, "deliberate in-guest failure"
            """
        )
    )
    res = vm.pytest([tests / "test_tiny.py"])
    outcomes = {r.nodeid.rsplit("::", 1)[-1]: r for r in res.results}
    assert set(outcomes) == {"test_passes", "test_fails_on_purpose"}, res.run.report()
    assert outcomes["test_passes"].outcome == "passed"
    failed = outcomes["test_fails_on_purpose"]
    assert failed.outcome == "failed"
    assert "deliberate in-guest failure" in failed.message + failed.text
    with pytest.raises(vmlib.VMTestFailure) as exc:
        res.check()
    msg = str(exc.value)
    assert "test_fails_on_purpose" in msg and "assert 41 == 42" in msg
    assert "test_passes" not in msg
    assert res.run.ok, res.run.report()  # the VM itself was fine
    s = res.run.stage(1)
    print(f"\nboot {s.boot_seconds}s, guest pytest (2 tests) {s.script_seconds:.2f}s, wall {res.run.wall_seconds:.1f}s")


def test_failed_stage_and_kernel_warning_fail_the_run(vm: vmlib.Harness) -> None:
    # A kernel-log line from userspace goes through the same dmesg/console scan as a real WARN().
    run = vm.run("echo '<4>WARNING: fdbox-vm harness self-test' > /dev/kmsg\necho 'WARNING: plain output is fine'\nexit 3")
    assert not run.ok
    assert run.stage(1).status == "failed" and run.stage(1).rc == 3
    probs = run.problems()
    assert any("stage 1: failed (rc=3)" in p for p in probs), probs
    assert any("WARNING: fdbox-vm harness self-test" in p for p in probs), probs
    assert not any("plain output is fine" in p for p in probs), probs
    with pytest.raises(vmlib.VMTestFailure, match="harness self-test"):
        vmlib.assert_no_kernel_problems(run)


def test_hung_guest_is_stopped(vm: vmlib.Harness) -> None:
    run = vm.run("sleep 600", timeout=20)
    assert not run.ok
    assert run.stage(1).status == "missing"
    assert "guest watchdog fired" in " ".join(run.problems())
    assert run.wall_seconds < 20 + vmlib.GUEST_EXTRA_TIME + 5


def test_two_stage_kexec(vm: vmlib.Harness) -> None:
    stage1 = """
        test -d /sys/kernel/debug/kho
        echo "written in stage $FDBOX_VM_STAGE" > /out/marker
        cut -d' ' -f1 /proc/uptime > /out/kexec-at
        vm-kexec
        echo "not reached" > /out/after-kexec
    """
    stage2 = """
        test "$FDBOX_VM_STAGE" = 2
        test -d /sys/kernel/debug/kho
        cat /out/marker > /out/marker-seen-in-stage2
        cat /proc/cmdline > /out/cmdline2
        cut -d' ' -f1 /proc/uptime > /out/stage2-start
    """
    run = vm.run(textwrap.dedent(stage1), textwrap.dedent(stage2))
    run.check()
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    assert (vm.out_dir / "marker-seen-in-stage2").read_text() == "written in stage 1\n"
    assert not (vm.out_dir / "after-kexec").exists()
    assert "fdbox.stage=2" in (vm.out_dir / "cmdline2").read_text()
    # The second kernel found the KHO data the first one handed over.
    assert "KHO: found kexec handover data" in run.console
    assert "KHO: exec from" in run.stage(2).dmesg
    s1, s2 = run.stage(1), run.stage(2)
    kexec_at = float((vm.out_dir / "kexec-at").read_text())
    stage2_start = float((vm.out_dir / "stage2-start").read_text())
    print(
        f"\nstage 1 boot {s1.boot_seconds}s; kexec load+exec from t={kexec_at}s;"
        f" stage 2 script at t={stage2_start}s of the new kernel; whole run {run.wall_seconds:.1f}s wall"
    )


def test_kernel_problem_scan_ignores_untimed_console_lines() -> None:
    console = "\n".join(
        [
            "[    1.000000] ok line",
            "WARNING: from a test program, not the kernel",
            "[    2.123456] WARNING: CPU: 0 PID: 1 at mm/foo.c:1 bar+0x1/0x2",
            "[    3.000000] BUG: kernel NULL pointer dereference, address: 0000000000000000",
            "[    4.000000] DEBUG something",
        ]
    )
    assert vmlib.kernel_problems(console, console=True) == [
        "[    2.123456] WARNING: CPU: 0 PID: 1 at mm/foo.c:1 bar+0x1/0x2",
        "[    3.000000] BUG: kernel NULL pointer dereference, address: 0000000000000000",
    ]
    assert vmlib.kernel_problems("general protection fault, probably for non-canonical address")
    # the debug kernel's checkers, whatever line their report starts on
    for line in ("[    5.000000] inconsistent lock state", "[    5.000000] suspicious RCU usage.",
                 "[    5.000000] list_add corruption. prev->next should be next"):
        assert vmlib.kernel_problems(line, console=True) == [line], line


def test_guest_path_maps_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert vmlib.guest_path(out / "a" / "t.py", out) == "/out/a/t.py"
    repo_file = vmlib.repo_root() / "tests" / "vm" / "vmlib.py"
    assert vmlib.guest_path(repo_file, out) == str(repo_file)


PRE_KEXEC_UNIT = """\
[Unit]
Description=harness self-test: runs when kexec.target is reached, before systemd-kexec.service
DefaultDependencies=no
Before=systemd-kexec.service

[Service]
Type=oneshot
ExecStart=/bin/echo "fdbox-vm-test: pre-kexec unit ran"
StandardOutput=journal+console

[Install]
WantedBy=kexec.target
"""


def test_systemd_pid1_two_stage_kexec(vm: vmlib.Harness) -> None:
    """systemd 252 as PID 1; `systemctl kexec` must really kexec (not fall back to a reboot)."""
    stage1 = """
        test "$(cat /proc/1/comm)" = systemd
        systemd-detect-virt --container > /out/detect-container || true
        systemctl enable harness-pre-kexec.service
        vm-kexec
    """
    stage2 = """
        test "$(cat /proc/1/comm)" = systemd
        test -d /sys/kernel/debug/kho
        systemctl is-active fdbox-vm-stage.service > /out/stage-unit-state || true
    """
    run = vm.run(
        textwrap.dedent(stage1),
        textwrap.dedent(stage2),
        systemd=True,
        units={"harness-pre-kexec.service": PRE_KEXEC_UNIT},
        timeout=420,
    )
    run.check()
    assert [s.status for s in run.stages] == ["kexec", "ok"]
    # The guest must not take itself for a container (a docker host's /.dockerenv).
    assert (vm.out_dir / "detect-container").read_text().strip() == "none"
    assert "Rebooting with kexec." in run.console
    assert run.console.index("fdbox-vm-test: pre-kexec unit ran") < run.console.index("Rebooting with kexec.")
    assert "KHO: exec from" in run.stage(2).dmesg
    assert "fdbox-vm-stage.service" in run.stage(2).journal
    s1, s2 = run.stage(1), run.stage(2)
    print(f"\nsystemd boot to stage script: {s1.boot_seconds}s, after kexec {s2.boot_seconds}s; wall {run.wall_seconds:.1f}s")
