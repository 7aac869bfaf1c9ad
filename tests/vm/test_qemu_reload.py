"""``systemctl reload fdbox-qemu@VM`` under a real systemd (PID 1): the unit's
``ExecReload=`` runs ``fdbox-qemu upgrade``, the guest goes on under a new QEMU, the unit
stays active and its MainPID is the new QEMU (issue 28). Then ``systemctl stop`` (whose
``ExecStop=`` needs ``$MAINPID``) suspends the VM through the new QEMU.

One stage, no kexec: the tick guest (tests/qemu-guest/tick.S) nested under TCG in the
test VM, its serial port a file chardev with ``append=on`` so the old and the new QEMU
append to one log.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

import vmlib
from test_qemu_systemd import _checkout_exec, qemu_units
from test_systemd_kexec import CMDLINE, SETUP, START_DAEMON

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qemuguest  # noqa: E402

pytestmark = pytest.mark.vm

REPO = vmlib.repo_root()


def _args() -> str:
    args = qemuguest.qemu_args(Path("/run/tick.img"), Path("/out/vmq-1.serial"))
    i = args.index("-serial")
    args = args[:i] + ["-chardev", "file,id=ser0,path=/out/vmq-1.serial,append=on", "-serial", "chardev:ser0"] \
        + args[i + 2:]
    return " ".join(args)


def test_systemctl_reload_upgrades_the_vm(vm_with_module: vmlib.Harness) -> None:
    qemuguest.build(vm_with_module.out_dir)
    units = qemu_units()
    units["fdbox-qemu@.service.d/60-vm-test-reload.conf"] = textwrap.dedent(f"""\
        [Service]
        ExecReload=
        ExecReload={_checkout_exec("fdbox-qemu@.service", "ExecReload")}
        """)
    stage1 = SETUP + ". tests/vm/qemustage.sh\n" + START_DAEMON + textwrap.dedent(f"""\
        mkdir -p /etc/fdbox/qemu
        cp /out/tick.img /run/tick.img
        printf '%s\\n' 'FDBOX_QEMU_OPTS=--ram 32M' 'QEMU_ARGS={_args()}' > /etc/fdbox/qemu/vmq.conf
        systemctl start fdbox-qemu@vmq.service
        systemctl show -p MainPID --value fdbox-qemu@vmq.service > /out/pid-before
        cp /out/pid-before /run/vmq.pid
        wait_ticks vmq 1 3
        systemctl reload fdbox-qemu@vmq.service
        systemctl show -p MainPID --value fdbox-qemu@vmq.service > /out/pid-after
        systemctl show -p ActiveState --value fdbox-qemu@vmq.service > /out/state-after
        cp /out/pid-after /run/vmq.pid
        tr '\\0' ' ' < /proc/$(cat /out/pid-after)/cmdline > /out/cmdline-after
        if kill -0 "$(cat /out/pid-before)" 2>/dev/null; then echo alive; else echo gone; fi > /out/old-after
        n=$(grep -c 'sum=OK' /out/vmq-1.serial)
        echo $n > /out/ticks-at-reload
        wait_ticks vmq 1 $((n + 4))
        journalctl -u fdbox-qemu@vmq.service --no-pager > /out/unit.journal 2>&1 || true
        systemctl stop fdbox-qemu@vmq.service
        ctl --json list vmq > /out/vmq-stopped.json
        """)
    run = vm_with_module.run(stage1, systemd=True, units=units, cmdline_extra=CMDLINE, timeout=600)
    run.check()
    out = run.out_dir
    before, after = int((out / "pid-before").read_text()), int((out / "pid-after").read_text())
    assert after not in (0, before), (before, after)
    assert (out / "state-after").read_text().strip() == "active"
    assert "upgrade/vmq.qmp" in (out / "cmdline-after").read_text()
    assert (out / "old-after").read_text().strip() == "gone"
    ticks = qemuguest.ticks(out / "vmq-1.serial")
    assert len(ticks) >= int((out / "ticks-at-reload").read_text()) + 4
    assert [t.n for t in ticks] == list(range(ticks[0].n, ticks[0].n + len(ticks))), "the counter jumped"
    assert len({t.token for t in ticks}) == 1 and all(t.ok for t in ticks)
    assert "upgraded" in (out / "unit.journal").read_text()
    entries = {e["name"] for e in json.loads((out / "vmq-stopped.json").read_text())["entries"]}
    assert entries == {"ram0", "devstate"}, entries  # the stop suspended it through the new QEMU
