"""fdboxd/uapi_luo.py must say exactly what Linux's include/uapi/linux/liveupdate.h says.

Like test_uapi_header.py for fdbox.h: a C program generated from the Python side is
compiled against the real header (the 7.2 reference tree beside the checkout, or
``$FDBOX_LINUX_SRC``) and prints every number, struct size and field offset; the header
is also scanned so an ioctl, struct or field added in C but not in Python fails here.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fdboxd import uapi_luo

ROOT = Path(__file__).resolve().parents[2]


def _header() -> Path:
    src = os.environ.get("FDBOX_LINUX_SRC") or str(ROOT.parent / "shared" / "reference" / "linux-7.2")
    path = Path(src) / "include" / "uapi" / "linux" / "liveupdate.h"
    if not path.exists():
        msg = f"{path} missing: the LUO uAPI check cannot run"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


CONSTANTS = ["LIVEUPDATE_IOCTL_TYPE", "LIVEUPDATE_SESSION_NAME_LENGTH"] + [
    n for n in dir(uapi_luo) if n.startswith("LIVEUPDATE_CMD_")
]


def _python_values() -> dict[str, int]:
    values = {name: int(getattr(uapi_luo, name)) for name in CONSTANTS}
    values.update(uapi_luo.IOCTLS)
    for cname, cls in uapi_luo.STRUCTS.items():
        values[f"sizeof {cname}"] = ctypes.sizeof(cls)
        values[f"alignof {cname}"] = ctypes.alignment(cls)
        for fname, *_ in cls._fields_:
            values[f"offsetof {cname}.{fname}"] = getattr(cls, fname).offset
    return values


def _c_program(header: Path, keys: list[str]) -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{header}"', "int main(void) {"]
    for key in keys:
        if key.startswith("sizeof "):
            expr = f"sizeof(struct {key[7:]})"
        elif key.startswith("alignof "):
            expr = f"_Alignof(struct {key[8:]})"
        elif key.startswith("offsetof "):
            struct, field = key[9:].split(".")
            expr = f"offsetof(struct {struct}, {field})"
        else:
            expr = key
        lines.append(f'\tprintf("%s=%llu\\n", "{key}", (unsigned long long)({expr}));')
    lines += ["\treturn 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    header = _header()
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler: the header check cannot run")
    keys = sorted(_python_values())
    d = tmp_path_factory.mktemp("uapi_luo")
    src, exe = d / "probe.c", d / "probe"
    src.write_text(_c_program(header, keys))
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split("=", 1) for line in out.splitlines())}


def test_every_value_agrees(c_values: dict[str, int]) -> None:
    py = _python_values()
    wrong = {k: (py[k], c_values[k]) for k in py if py[k] != c_values[k]}
    assert not wrong, f"python != C header: {wrong}"


def test_header_has_nothing_python_lacks() -> None:
    text = _header().read_text()
    ioctls = set(re.findall(r"#define\s+(LIVEUPDATE_(?:IOCTL|SESSION)_\w+)\s", text))
    ioctls -= {"LIVEUPDATE_IOCTL_TYPE", "LIVEUPDATE_SESSION_NAME_LENGTH"}
    assert ioctls == set(uapi_luo.IOCTLS), "ioctl set differs"
    structs = set(re.findall(r"^struct\s+(liveupdate_\w+)\s*\{", text, re.M))
    assert structs == set(uapi_luo.STRUCTS), "struct set differs"
    for cname, cls in uapi_luo.STRUCTS.items():
        body = re.search(rf"^struct\s+{cname}\s*\{{(.*?)^\}};", text, re.M | re.S)
        assert body is not None
        c_fields = re.findall(r"(\w+)(?:\[[^\]]*\])?;", body.group(1))
        assert c_fields == [f for f, *_ in cls._fields_], f"fields of {cname} differ"
    cmds = set(re.findall(r"\b(LIVEUPDATE_CMD_\w+)\s*=", text))
    assert cmds == {n for n in CONSTANTS if n.startswith("LIVEUPDATE_CMD_")}


def test_every_struct_starts_with_size() -> None:
    for cname, cls in uapi_luo.STRUCTS.items():
        assert cls._fields_[0][0] == "size" and cls._fields_[0][1] is ctypes.c_uint32, cname
        assert cls().size == ctypes.sizeof(cls), cname


def test_the_check_can_fail(c_values: dict[str, int]) -> None:
    """A changed Python value is caught (so the comparison above is not vacuous)."""
    py = _python_values()
    py["LIVEUPDATE_SESSION_PRESERVE_FD"] += 1
    assert any(py[k] != c_values[k] for k in py)


def test_session_names_are_checked_before_the_kernel() -> None:
    assert uapi_luo.session_name("x" * 63) == b"x" * 63
    for bad in ("", "x" * 64, "a\0b"):
        with pytest.raises(uapi_luo.LuoOSError) as ei:
            uapi_luo.session_name(bad)
        assert ei.value.error_name == "InvalidRequest"


def test_opening_a_missing_device_is_backend_unavailable(tmp_path: Path) -> None:
    with pytest.raises(uapi_luo.LuoOSError) as ei:
        uapi_luo.LuoDevice(str(tmp_path / "liveupdate"))
    assert ei.value.error_name == "BackendUnavailable"
