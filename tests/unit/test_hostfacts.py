"""fdboxd.hostfacts: the kernel command line as the kernel reads it, and the preflight's
hugetlb seal rule as fdbox.ko applies it (kmod/fdbox_kho.c:fdbox_kho_seals_to_add)."""

from __future__ import annotations

import os

import pytest

from fdboxd.hostfacts import HostFacts, cmdline_options, hugepages_reserved, option_on, unescape_unit
from fdboxd.kinds.memfd import (F_SEAL_FUTURE_WRITE, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_WRITE,
                                hugetlb_problem)

M2, G1 = 2 << 20, 1 << 30


@pytest.mark.parametrize(("cmdline", "kho", "luo"), [
    ("console=ttyS0 kho=on liveupdate=on", True, True),
    ("kho=1 liveupdate=y", True, True),
    ("kho=on kho=off liveupdate", False, False),  # the last one wins; a bare key is not on
    ("init=/bin/sh -- kho=on liveupdate=on", False, False),  # after --: init's arguments
    ("", False, False),
])
def test_boolean_options_as_kstrtobool_reads_them(cmdline, kho, luo):
    opts = cmdline_options(cmdline)
    assert (option_on(opts, "kho"), option_on(opts, "liveupdate")) == (kho, luo)


@pytest.mark.parametrize(("cmdline", "size", "want"), [
    ("hugepages=48", M2, 48),
    ("hugepagesz=1G hugepages=2 hugepagesz=2M hugepages=16", M2, 16),
    ("hugepagesz=1G hugepages=2 hugepagesz=2M hugepages=16", G1, 2),
    ("default_hugepagesz=1G hugepages=3", M2, None),
    ("default_hugepagesz=1G hugepages=3", G1, 3),
    ("console=ttyS0", M2, None),
])
def test_hugepages_per_page_size(cmdline, size, want):
    assert hugepages_reserved(cmdline, size) == want


def test_unit_instance_names_are_unescaped():
    assert unescape_unit(r"vm\x2da") == "vm-a"


@pytest.mark.parametrize(("seals", "page", "refused"), [
    (F_SEAL_SEAL, M2, True),  # MFD_HUGETLB without MFD_ALLOW_SEALING
    (F_SEAL_SEAL | F_SEAL_GROW | F_SEAL_SHRINK, M2, True),  # QEMU's seal=on: no write seal
    (F_SEAL_SEAL | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE, M2, False),
    (F_SEAL_SEAL | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_WRITE, M2, False),
    (0, M2, False),  # MFD_ALLOW_SEALING: fdbox.ko adds what it needs
    (0, G1, True),
])
def test_hugetlb_seal_rule_is_the_modules(seals, page, refused):
    assert (hugetlb_problem(seals, page) is not None) == refused


def test_facts_read_under_a_root_and_say_none_when_missing(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemAvailable:    2048 kB\nHugePages_Total:       4\n")
    f = HostFacts(str(tmp_path))
    assert f.meminfo() == {"MemAvailable": 2 << 20, "HugePages_Total": 4}
    assert f.cmdline() is None and f.kexec_loaded() is None and f.kexec_cmdline() is None
    assert f.vm_processes() == [] and not f.luo_present() and not f.module_loaded()
    assert HostFacts("/").free_bytes(os.getcwd()) is not None
