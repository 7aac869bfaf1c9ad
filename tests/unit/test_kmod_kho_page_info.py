"""fdbox.ko's copy of KHO's page mark must match the kernel it is built for (issue 20, item 5).

KHO marks the head page of every preserved folio with ``union kho_page_info`` and
``KHO_PAGE_MAGIC`` in kernel/liveupdate/kexec_handover.c; neither is in a header or
exported, so kmod/fdbox_kho.c keeps a copy (``union fdbox_kho_page_info``,
``FDBOX_KHO_PAGE_MAGIC``) to refuse a corrupt handover without KHO's WARN. The C side
asserts the size at build time; this compares the layout and the magic with the 7.2
reference tree beside the checkout (or ``$FDBOX_LINUX_SRC``), so a kernel that changes
them shows up here before a handover is misread.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "kmod" / "fdbox_kho.c"


def _kho_source() -> str:
    src = os.environ.get("FDBOX_LINUX_SRC") or str(ROOT.parent / "shared" / "reference" / "linux-7.2")
    path = Path(src) / "kernel" / "liveupdate" / "kexec_handover.c"
    if not path.exists():
        msg = f"{path} missing: the KHO page mark check cannot run"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path.read_text()


def _union_fields(text: str, name: str) -> list[str]:
    """The member declarations of ``union <name> { ... };``, whitespace-normalised."""
    m = re.search(r"union\s+" + name + r"\s*\{(.*?)\n\};", text, re.S)
    assert m, f"union {name} not found"
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return [" ".join(d.split()) for d in body.replace("{", ";").replace("}", ";").split(";") if d.strip()]


def _magic(text: str, name: str) -> int:
    m = re.search(r"#define\s+" + name + r"\s+(0x[0-9a-fA-F]+)U?", text)
    assert m, f"{name} not found"
    return int(m.group(1), 16)


def test_page_info_layout_matches_kho() -> None:
    kho = _kho_source()
    ours = MODULE.read_text()
    assert _union_fields(ours, "fdbox_kho_page_info") == _union_fields(kho, "kho_page_info")
    assert _magic(ours, "FDBOX_KHO_PAGE_MAGIC") == _magic(kho, "KHO_PAGE_MAGIC")


def test_page_info_is_read_in_one_place() -> None:
    """Only fdbox_kho_page_info() reads page->private (the one dependency on KHO internals),
    and fdbox_kho_mark_order() and the load-time self-check read the mark through it."""
    ours = MODULE.read_text()
    assert ours.count("->private") == 1, "page->private read outside fdbox_kho_page_info()"
    fn = ours[ours.index("static union fdbox_kho_page_info fdbox_kho_page_info("):]
    fn = fn[: fn.index("\n}\n")]
    assert "->private" in fn
    for caller in ("static int fdbox_kho_mark_order(", "static int fdbox_kho_page_info_check("):
        body = ours[ours.index(caller):]
        assert "fdbox_kho_page_info(page)" in body[: body.index("\n}\n")], caller
