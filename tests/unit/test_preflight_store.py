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


# ------------------------------------------------------------ the next kernel's fdbox.ko


class ModuleKexecBackend(KexecBackend):
    """The stand-in next kernel, declaring what fdbox.ko's backend declares: its
    handover needs fdbox.ko in the next kernel."""

    next_kernel_module = "fdbox"


def bzimage(path: Path, version: str) -> Path:
    """An x86 boot image header as the kernel's build writes it: "HdrS" at 0x202 and the
    version string at 0x200 + the ``kernel_version`` field (0x20E)."""
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    text = version.encode() + b"\0"
    head[0x400:0x400 + len(text)] = text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(head))
    return path


def test_a_loaded_kernel_without_fdbox_ko_is_refused(tmp_path):
    facts = host(tmp_path)
    root = tmp_path / "host"
    bzimage(root / "boot/vmlinuz-7.9.1-next", "7.9.1-next (builder@host) #1 SMP PREEMPT_DYNAMIC")
    (root / "run/fdbox/kexec-kernel").write_text("/boot/vmlinuz-7.9.1-next\n")
    (root / "lib/modules/7.9.1-next/kernel").mkdir(parents=True)
    store = Store(ModuleKexecBackend(), Manifest(tmp_path / "state"))
    fd = memfd(b"x" * 4096)
    store.put(ALICE, "vm1", "ram0", fd)
    os.close(fd)

    r = Preflighter("kernel", facts).run(store, ROOT)
    (p,) = [p for p in r.problems if p.check == "kexec"]
    assert "7.9.1-next" in p.message and "has no fdbox.ko" in p.message, p
    assert "dkms install fdbox -k 7.9.1-next" in p.fix

    (root / "lib/modules/7.9.1-next/updates/dkms").mkdir(parents=True)
    (root / "lib/modules/7.9.1-next/updates/dkms/fdbox.ko.xz").write_bytes(b"")
    r = Preflighter("kernel", facts).run(store, ROOT)
    assert r.ok and r.warnings == [], r.to_dict()

    # Not recorded: said, never refused. A backend needing no module: not asked at all.
    (root / "run/fdbox/kexec-kernel").unlink()
    r = Preflighter("kernel", facts).run(store, ROOT)
    assert r.ok and any("kexec-kernel" in w.fix for w in r.warnings), r.to_dict()
    plain = Store(KexecBackend(), Manifest(tmp_path / "plain"))
    fd = memfd(b"x" * 4096)
    plain.put(ALICE, "vm1", "ram0", fd)
    os.close(fd)
    r = Preflighter("liveupdate", facts).run(plain, ROOT)
    assert r.ok and r.warnings == [], r.to_dict()


def test_the_release_of_the_real_test_kernel_image_is_read():
    kernel = Path(__file__).resolve().parents[3] / "shared" / "testkernel"
    if not (kernel / "bzImage").is_file():
        import pytest
        pytest.skip(f"no test kernel at {kernel}")
    facts = HostFacts("/")
    assert facts.kernel_release(str(kernel / "bzImage")) == (kernel / "kernel.release").read_text().strip()
    assert facts.kernel_release(__file__) is None
