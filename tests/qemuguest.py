"""The tiny QEMU guest of the fdbox-qemu tests (tests/qemu-guest/tick.S), shared by the
host tests, the VM tier and the blackout bench: build it, run ``fdbox-qemu`` on it, read
its serial output.

The guest prints ``boot token=T`` once and then ``tick N token=T sum=OK|BAD`` about 18
times a second (see tick.S). Stdlib only: the VM tier runs this inside the test VM too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SOURCE = HERE / "qemu-guest" / "tick.S"
TICK_RE = re.compile(r"^tick ([0-9a-f]{8}) token=([0-9a-f]{8}) sum=(OK|BAD)\r?$", re.MULTILINE)
BOOT_RE = re.compile(r"^boot token=([0-9a-f]{8})\r?$", re.MULTILINE)


def build(out_dir: Path) -> Path:
    """Assemble tick.S into a 512-byte boot sector with GNU as/ld; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    obj, img = out_dir / "tick.o", out_dir / "tick.img"
    subprocess.run(["as", "--32", "-o", str(obj), str(SOURCE)], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", str(img), str(obj)],
                   check=True, capture_output=True)
    assert img.stat().st_size == 512, "the boot sector must be exactly 512 bytes"
    return img


def qemu_args(image: Path, serial: Path) -> list[str]:
    """QEMU-ARGS for the guest: TCG, no display, the boot sector as a floppy, COM1 to a file."""
    return ["-accel", "tcg", "-display", "none", "-vga", "none", "-nodefaults", "-no-user-config",
            "-drive", f"file={image},format=raw,if=floppy,readonly=on",
            "-serial", f"file:{serial}", "-monitor", "none"]


def fdbox_qemu_cmd(socket: str, run_dir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "fdboxd.qemu", "--socket", socket, "--run-dir", run_dir, *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    return e


@dataclass
class Tick:
    n: int
    token: str
    ok: bool


def ticks(serial: Path) -> list[Tick]:
    try:
        text = serial.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [Tick(int(m.group(1), 16), m.group(2), m.group(3) == "OK") for m in TICK_RE.finditer(text)]


def boots(serial: Path) -> list[str]:
    try:
        return BOOT_RE.findall(serial.read_text(errors="replace"))
    except FileNotFoundError:
        return []


def wait_ticks(serial: Path, count: int, timeout: float = 60.0) -> list[Tick]:
    deadline = time.monotonic() + timeout
    while True:
        got = ticks(serial)
        if len(got) >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def have_tools() -> str | None:
    """None if QEMU and binutils are here, else what is missing."""
    for tool in ("qemu-system-x86_64", "as", "ld"):
        if shutil.which(tool) is None:
            return tool
    return None
