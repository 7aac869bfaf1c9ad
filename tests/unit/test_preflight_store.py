"""fdboxd.preflight over a Store whose backend carries across a kexec (the stand-in next
kernel of test_store_liveupdate): what a host with only the memory backend cannot show,
a good pass with entries and a restored box nobody took back."""

from __future__ import annotations

import os
from pathlib import Path

from test_store_liveupdate import ALICE, ROOT, KexecBackend, memfd

from fdboxd.hostfacts import HostFacts
from fdboxd.manifest import Manifest
from fdboxd.preflight import Preflighter
from fdboxd.store import Store


def host(tmp_path: Path) -> HostFacts:
    for rel, text in (("proc/cmdline", "kho=on liveupdate=on"), ("sys/kernel/kexec_loaded", "1"),
                      ("run/fdbox/kexec-cmdline", "kho=on liveupdate=on")):
        (tmp_path / "host" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "host" / rel).write_text(text + "\n")
    return HostFacts(str(tmp_path / "host"))


def test_entries_a_kexec_carries_pass(tmp_path):
    store = Store(KexecBackend(), Manifest(tmp_path / "state"))
    fd = memfd(b"x" * 4096)
    store.put(ALICE, "vm1", "ram0", fd)
    os.close(fd)
    r = Preflighter("liveupdate", host(tmp_path)).run(store, ROOT)
    assert r.ok and r.entries == 1 and r.warnings == [], r.to_dict()


def test_a_restored_box_nobody_took_back_is_a_problem(tmp_path):
    old = Store(KexecBackend(), Manifest(tmp_path / "old"))
    for name in ("ram0", "ram1"):
        fd = memfd(b"y" * 4096)
        old.put(ALICE, "vm1", name, fd)
        os.close(fd)
    old.seal(ALICE, "vm1")
    new = Store(old.backend.kexec(), Manifest(tmp_path / "new"))
    _, fd = new.get(ALICE, "vm1", "ram0")  # one of two taken back
    os.close(fd)
    r = Preflighter("liveupdate", host(tmp_path)).run(new, ROOT)
    (p,) = r.problems
    assert (p.check, p.box) == ("entry", "vm1") and "1 of its entries (ram1)" in p.message, p
    assert "fdboxctl finish vm1" in p.fix
