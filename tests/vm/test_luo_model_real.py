"""The LUO model against the real device: tests/unit/test_luo_model.py in the guest.

The host runs that file against tests/luomodel.py; here the same file runs against the
test kernel's /dev/liveupdate (``FDBOX_LUO_REAL=1``), split around one real kexec:
stage 1 runs every one-kernel test and the first half of the carry check (its keeper
process holds the sessions into the kexec), stage 2 the second half. A rule the model
gets wrong fails here, naming the assertion, instead of passing on the host.
"""

from __future__ import annotations

import pytest

import vmlib

pytestmark = pytest.mark.vm

CONTRACT = "tests/unit/test_luo_model.py"
ENV = "export FDBOX_LUO_REAL=1 FDBOX_LUO_STATE=/out/luo-contract.json\n"


def test_model_matches_the_real_device(vm: vmlib.Harness) -> None:
    stage1 = ENV + "export FDBOX_LUO_PHASE=before\n" + vmlib.pytest_command(
        [CONTRACT], junit="/out/junit-1.xml") + "\nvm-kexec --reuse-cmdline\n"
    stage2 = ENV + "export FDBOX_LUO_PHASE=after\n" + vmlib.pytest_command(
        [CONTRACT], junit="/out/junit-2.xml", args=["-k", "test_carry_across_kexec"])
    run = vm.run(stage1, stage2, timeout=420)
    run.check()
    results = {n: vmlib.parse_junit(run.out_dir / f"junit-{n}.xml") for n in (1, 2)}
    bad = [f"stage {n}: {r.nodeid} {r.outcome}: {r.message}\n{r.text}"
           for n, rs in results.items() for r in rs if r.outcome in ("failed", "error")]
    assert not bad, "\n".join(bad)
    ran1 = {r.nodeid.rsplit("::", 1)[-1] for r in results[1] if r.outcome == "passed"}
    assert {"test_one_opener", "test_session_names", "test_preserve_errors",
            "test_a_session_lives_while_any_fd_is_open", "test_carry_across_kexec"} <= ran1, results[1]
    ran2 = [r.nodeid for r in results[2] if r.outcome == "passed"]
    assert len(ran2) == 1 and ran2[0].endswith("test_carry_across_kexec"), results[2]
