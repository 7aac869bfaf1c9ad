"""fdboxd/uapi.py must say exactly what kmod/include/uapi/linux/fdbox.h says.

A C program generated from the Python side is compiled against the real header and
prints every number, every struct size and every field offset; the test compares them
with the Python values. The header is also scanned so that an ioctl, a struct or a
field added in C but not in Python fails here too.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fdboxd import uapi

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "kmod" / "include" / "uapi" / "linux" / "fdbox.h"

#: Integer constants (macros and enumerators) the Python side mirrors by the same name.
CONSTANTS = [
    "FDBOX_IOCTL_TYPE",
    "FDBOX_API_VERSION",
    "FDBOX_BOX_NAME_LEN",
    "FDBOX_ENTRY_NAME_LEN",
    "FDBOX_FEATURE_KHO",
    "FDBOX_FEATURE_KHO_ON",
    "FDBOX_FEATURE_KHO_BOOT",
    "FDBOX_FEATURE_RESTORED",
    "FDBOX_FEATURE_SHMEM_LUO",
    "FDBOX_FEATURE_HANDOVER_HELD",
    "FDBOX_FEATURE_RESTORE_PENDING",
    "FDBOX_ENTRY_PRESERVED",
    "FDBOX_ENTRY_RESTORE_PENDING",
] + [n for n in dir(uapi) if n.startswith("FDBOX_CMD_")]

ENUMS = {
    "FDBOX_TYPE_": uapi.EntryType,
    "FDBOX_STATE_": uapi.BoxState,
}


def _python_values() -> dict[str, int]:
    values = {name: int(getattr(uapi, name)) for name in CONSTANTS}
    values.update(uapi.IOCTLS)
    for prefix, enum_cls in ENUMS.items():
        for member in enum_cls:
            values[prefix + member.name] = int(member)
    for cname, cls in uapi.STRUCTS.items():
        values[f"sizeof {cname}"] = ctypes.sizeof(cls)
        for fname, *_ in cls._fields_:
            values[f"offsetof {cname}.{fname}"] = getattr(cls, fname).offset
    return values


def _c_program(keys: list[str]) -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{HEADER}"', "int main(void) {"]
    for key in keys:
        if key.startswith("sizeof "):
            expr = f"sizeof(struct {key[7:]})"
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
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler: the header check cannot run")
    keys = sorted(_python_values())
    d = tmp_path_factory.mktemp("uapi")
    src, exe = d / "probe.c", d / "probe"
    src.write_text(_c_program(keys))
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split("=", 1) for line in out.splitlines())}


def test_every_value_agrees(c_values: dict[str, int]) -> None:
    py = _python_values()
    wrong = {k: (py[k], c_values[k]) for k in py if py[k] != c_values[k]}
    assert not wrong, f"python != C header: {wrong}"


def test_header_has_nothing_python_lacks() -> None:
    text = HEADER.read_text()
    ioctls = set(re.findall(r"#define\s+(FDBOX_IOC_\w+)\s", text))
    assert ioctls == set(uapi.IOCTLS), "ioctl set differs"
    structs = set(re.findall(r"^struct\s+(fdbox_\w+)\s*\{", text, re.M))
    assert structs == set(uapi.STRUCTS), "struct set differs"
    for cname, cls in uapi.STRUCTS.items():
        body = re.search(rf"^struct\s+{cname}\s*\{{(.*?)^\}};", text, re.M | re.S)
        assert body is not None
        c_fields = re.findall(r"(\w+)(?:\[[^\]]*\])?;", body.group(1))
        assert c_fields == [f for f, *_ in cls._fields_], f"fields of {cname} differ"
    for prefix, enum_cls in ENUMS.items():
        c_names = set(re.findall(rf"\b{prefix}(\w+)\s*=", text))
        assert c_names == {m.name for m in enum_cls}, f"{prefix}* differ"
    cmds = set(re.findall(r"\b(FDBOX_CMD_\w+)\s*=", text))
    assert cmds == {n for n in CONSTANTS if n.startswith("FDBOX_CMD_")}


def test_every_struct_starts_with_size() -> None:
    for cname, cls in uapi.STRUCTS.items():
        if cname.endswith("_info"):  # list elements, not ioctl arguments
            continue
        assert cls._fields_[0][0] == "size" and cls._fields_[0][1] is ctypes.c_uint32, cname


def test_the_check_can_fail(c_values: dict[str, int]) -> None:
    """A changed Python value is caught (so the comparison above is not vacuous)."""
    py = _python_values()
    py["FDBOX_IOC_PUT_FD"] += 1
    assert any(py[k] != c_values[k] for k in py)


def test_errno_table_matches_the_documented_errnos() -> None:
    """Every errno the header documents has a meaning in uapi.py, and nothing more."""
    import errno

    documented = {getattr(errno, n) for n in re.findall(r"^ \*  - (E[A-Z0-9]+):", HEADER.read_text(), re.M)}
    assert len(documented) >= 19
    assert documented == set(uapi.ERRNO_MEANINGS)
