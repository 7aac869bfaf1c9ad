"""fdbox installed from its own packages on Debian 13 (trixie) and Debian testing (forky),
through a real ``systemctl kexec`` with the distribution's systemd as PID 1.

The roots are built by mmdebstrap from the machine's mirror (tests/vm/roots.py, cached
under build/roots/ by recipe) and booted over 9p (``run_guest(root=...)``); in each,
``apt-get install`` put this checkout's ``fdbox`` and ``fdbox-call`` packages (built by
``dpkg-buildpackage`` once per source content) and fdbox.ko comes from ``fdbox-dkms``'s
source built by DKMS against the test kernel. Nothing of the checkout runs as fdboxd: the
units, the daemon, fdboxctl and fdbox-call are the packaged ones, with the root's own
python3 (3.13, 3.14). The stand-in VMM (contrib/vmm) is the checkout's.

One boot and its kexec per root:

* stage 1: fdbox.ko loaded (``modprobe``: depmod found it under ``updates/dkms``), the
  package's units as installed (fdbox-seal.service enabled by its postinst, required by
  systemd-kexec.service), plus the optional drop-in ``units/optional/.../
  10-fdstore-preserve.conf`` as ``scripts/install-host`` adds it on systemd >= 254;
  fdboxd started by systemd, a VMM's 32 MiB memfd put; ``varlinkctl`` (a real outside
  client) introspects ``io.fdbox.Store`` and calls ``Status`` and ``List``; the preflight
  is clean; then ``systemctl kexec``: the seal runs, "Rebooting with kexec.".
* stage 2: the box is back ``restored``, the memory byte for byte; ``fdboxctl report``
  has every phase.

Who keeps fdboxd's sealed LUO sessions until the kexec:

* forky, systemd 262: PID 1, in fdboxd's fd store (``FileDescriptorStorePreserve=yes``):
  fdboxd logs the choice, no ``@fdboxd-luo-holder`` runs, and after the kexec PID 1 has
  them back in the unit's fd store (``NFileDescriptorStore`` before fdboxd starts) and
  hands them over in ``LISTEN_FDS``. A second, plain unit
  (``tests/vm/guest/plain_fdstore.py``) with ``FileDescriptorStorePreserve=yes`` keeps a
  4 MiB memfd in its own fd store; it crosses the same kexec (systemd's LUO session
  ``systemd``) beside fdboxd and comes back intact. The fd store, not ``LUOSession=``:
  a session fd cannot be preserved inside another session, and PID 1 carries it by name
  and hands it back to the unit that pushed it (docs/internals.md).
* trixie, systemd 257: ``@fdboxd-luo-holder`` (PID 1 has no LUO).

The roots are skipped (with the reason) when the mirror is unreachable and no root is
cached; under ``$CI`` a missing mmdebstrap or package-build tool fails (scripts/install-deps
installs them).
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest
import roots
import vmlib

SEED = "debian-roots"
REGIONS = "--mem ram0=32M"
CMDLINE = ("systemd.status_unit_format=name", "no_timer_check")
"""Unit names on the console; ``no_timer_check``: a kexec'd kernel under TCG on a busy
host panicked once in its IO-APIC timer check ("IO-APIC + timer doesn't work!")."""
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
PLAIN_UNIT = "fdbox-vm-plain-fdstore.service"
TIMES: dict[str, float] = {}
"""What each part took (printed by the tests, for the CI budget)."""

EXPECT = {
    # suite: (systemd major, Python "3.x", LUO sessions kept by PID 1's fd store)
    "forky": (262, "3.14", True),
    "trixie": (257, "3.13", False),
}


def _installed_root(suite: str, kbuild: Path) -> Path:
    """The suite's root with this checkout's packages (each layer built once, cached);
    skips when the base root is not cached and the mirror cannot serve the suite."""
    cached = any(roots.roots_dir().glob(f"{suite}-base-{roots.RECIPES[suite].digest()}"))
    if not cached:
        problem = roots.mirror_problem(suite)
        if problem:
            pytest.skip(f"no {suite} root cached and the Debian mirror cannot serve it: {problem}")
    return roots.installed_root(suite, roots.build_debs(TIMES), kbuild, TIMES)


def plain_unit() -> str:
    return textwrap.dedent(f"""\
        [Unit]
        Description=fdbox VM test: a plain memfd in systemd's fd store, preserved across kexec

        [Service]
        Type=notify
        NotifyAccess=main
        ExecStart=/usr/bin/python3 {vmlib.repo_root()}/tests/vm/guest/plain_fdstore.py
        FileDescriptorStoreMax=4
        FileDescriptorStorePreserve=yes
        StandardOutput=journal+console
        """)


def guest_units() -> dict[str, str]:
    optional = vmlib.repo_root() / "units/optional/fdboxd.service.d/10-fdstore-preserve.conf"
    return {"fdboxd.service.d/10-fdstore-preserve.conf": optional.read_text(), PLAIN_UNIT: plain_unit()}


STAGE1 = textwrap.dedent(f"""\
    . /etc/os-release; echo "$VERSION_CODENAME" > /out/codename.txt
    systemctl --version | head -n 1 > /out/systemd-version.txt
    python3 --version > /out/python-version.txt
    dpkg-query -W -f '${{Package}} ${{Version}} ${{Status}}\\n' fdbox fdbox-call > /out/dpkg.txt
    modprobe fdbox
    test -c /dev/fdbox
    test -L /etc/systemd/system/systemd-kexec.service.requires/fdbox-seal.service
    systemctl start fdboxd.service
    fdboxctl --json status > /out/before-status.json
    python3 contrib/vmm/standin-vmm --socket /run/fdbox/fdboxd.sock store --box vm1 {REGIONS} --seed {SEED}
    varlinkctl introspect unix:/run/fdbox/fdboxd.sock io.fdbox.Store > /out/varlink-introspect.txt
    varlinkctl call unix:/run/fdbox/fdboxd.sock io.fdbox.Store.Status '{{}}' > /out/varlink-status.json
    varlinkctl call unix:/run/fdbox/fdboxd.sock io.fdbox.Store.List '{{}}' > /out/varlink-list.json
    systemctl start {PLAIN_UNIT}
    vm-kexec --load-only
    fdboxctl preflight > /out/preflight.txt 2>&1
    vm-kexec
    """)

STAGE2 = textwrap.dedent(f"""\
    systemctl show -p NFileDescriptorStore fdboxd.service {PLAIN_UNIT} > /out/fdstore-stage2.txt
    modprobe fdbox
    systemctl start fdboxd.service
    fdboxctl --json status > /out/restored-status.json
    python3 contrib/vmm/standin-vmm --socket /run/fdbox/fdboxd.sock verify --box vm1 {REGIONS} --seed {SEED} \\
        > /out/verify.txt
    fdboxctl --json report > /out/report.json
    systemctl start {PLAIN_UNIT}
    systemctl show -p NFileDescriptorStore fdboxd.service > /out/fdstore-after-restore.txt
    """)


def _json(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


def _store_counts(path: Path) -> list[int]:
    return [int(v) for v in re.findall(r"^NFileDescriptorStore=(\d+)$", path.read_text(), re.M)]


@pytest.mark.parametrize("suite", ["forky", "trixie"])
def test_packaged_fdbox_through_systemctl_kexec(suite: str, vm: vmlib.Harness, vm_kbuild: Path,
                                                vm_roots_tools: None) -> None:
    t0 = time.monotonic()
    root = _installed_root(suite, vm_kbuild)
    TIMES[f"{suite}: roots (cached or built)"] = round(time.monotonic() - t0, 1)
    run = vm.run(STAGE1, STAGE2, root=root, systemd=True, units=guest_units(),
                 cmdline_extra=CMDLINE, timeout=900)
    TIMES[f"{suite}: boot + kexec"] = round(run.wall_seconds, 1)
    print(f"\n{suite}: " + ", ".join(f"{k} {v}s" for k, v in TIMES.items()))
    check_run(suite, run)


def check_run(suite: str, run: vmlib.GuestRun) -> None:
    """Everything the test asserts of a finished run (apart, so a kept output dir can be re-read)."""
    systemd_version, python_version, by_pid1 = EXPECT[suite]
    run.check()
    out, console = run.out_dir, ANSI_RE.sub("", run.console)
    assert [s.status for s in run.stages] == ["kexec", "ok"]

    # The root is the suite's, with its own systemd and python, and the packages apt installed.
    assert (out / "codename.txt").read_text().strip() == suite
    assert f"systemd {systemd_version} " in (out / "systemd-version.txt").read_text()
    assert (out / "python-version.txt").read_text().startswith(f"Python {python_version}.")
    dpkg = (out / "dpkg.txt").read_text()
    assert dpkg.count("install ok installed") == 2, dpkg

    before = _json(out / "before-status.json")
    assert before["backend"] == "liveupdate+kernel", before
    introspect = (out / "varlink-introspect.txt").read_text()
    assert "interface io.fdbox.Store" in introspect and "method Status(" in introspect, introspect
    assert _json(out / "varlink-status.json")["backend"] == "liveupdate+kernel"
    assert [b["name"] for b in _json(out / "varlink-list.json")["boxes"]] == ["vm1"]
    assert (out / "preflight.txt").read_text().startswith("preflight: ok:"), (out / "preflight.txt").read_text()

    # The kexec: the packaged seal unit (fdbox-call) finished, then systemd-shutdown's jump
    # (the seal's own reply goes to the journal, which /out no longer takes by then: stage
    # 2's restored box is its proof).
    sealed = console.find("Finished fdbox-seal.service")
    kexec = console.find("Rebooting with kexec.")
    assert 0 <= sealed < kexec and console.count("Rebooting with kexec.") == 1, console[-4000:]
    if by_pid1:
        # systemd-shutdown put the fd stores (fdboxd's sessions, the plain memfd) in its session.
        assert "Preserved fd stores in LUO session 'systemd' for kexec." in console[sealed:kexec], console[-4000:]
    journal1 = run.stage(1).journal
    keeper = re.search(r"LUO sessions are kept by ([^:]+): (.*)", journal1)
    assert keeper, journal1[-3000:]
    if by_pid1:
        assert keeper.group(1) == "systemd's fd store", keeper.group(0)
        assert "@fdboxd-luo-holder" not in journal1
    else:
        assert keeper.group(1) == "the holder process", keeper.group(0)

    # Stage 2: the box is back, byte for byte, with the whole report.
    restored = _json(out / "restored-status.json")
    assert restored["backend"] == "liveupdate+kernel" and restored["restored"] == 1 and restored["lost"] == [], restored
    assert (out / "verify.txt").read_text().count("OK vm1/ram0") == 1, (out / "verify.txt").read_text()
    [report] = _json(out / "report.json")["boxes"]
    assert report["box"] == "vm1" and report["complete"], report
    assert "KHO: exec from" in run.stage(2).dmesg

    fdstore, plain = _store_counts(out / "fdstore-stage2.txt")
    plain_lines = (out / "plain.txt").read_text().splitlines()
    if by_pid1:
        # PID 1 came back up holding fdboxd's session(s) in its fd store, before fdboxd ran,
        # and the plain unit's memfd crossed the same kexec beside them.
        assert fdstore >= 1, (out / "fdstore-stage2.txt").read_text()
        assert plain == 1, (out / "fdstore-stage2.txt").read_text()
        assert [line.split()[1] for line in plain_lines] == ["stored", "back"], plain_lines
        assert plain_lines[0].split()[2] == plain_lines[1].split()[2], plain_lines
        # Once fdboxd restored its boxes it dropped the sessions' copies from the store.
        after = _store_counts(out / "fdstore-after-restore.txt")
        print(f"PID 1's fd stores after the kexec: fdboxd {fdstore} before its start, {after[0]} after the "
              f"restore; the plain unit {plain}")
    else:
        assert fdstore == 0 and plain == 0
        assert [line.split()[1] for line in plain_lines] == ["stored", "missing"], plain_lines
    assert os.path.exists(out / "stage2.journal")
