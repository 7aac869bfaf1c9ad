"""fdboxd.failpoints: the syntax, the actions, and that the declared list is the code's."""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdboxd import failpoints

REPO = Path(__file__).resolve().parents[2]


def hits_in_code() -> dict[str, list[str]]:
    """Every ``failpoints.hit("NAME")`` in fdboxd/ and libexec/, name → where."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "fdboxd").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "hit" and isinstance(f.value, ast.Name) \
                    and f.value.id == "failpoints":
                arg = node.args[0] if node.args else None
                assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), \
                    f"{path}:{node.lineno}: failpoints.hit takes a literal name"
                found.setdefault(arg.value, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_declared_failpoint_is_hit_and_none_is_undeclared() -> None:
    found = hits_in_code()
    declared = set(failpoints.FAILPOINTS) - {"failpoints.selftest"}
    assert not declared - set(found), f"declared but never hit: {sorted(declared - set(found))}"
    assert not set(found) - set(failpoints.FAILPOINTS), f"hit but not declared: {sorted(set(found) - declared)}"
    assert list(failpoints.FAILPOINTS) == sorted(failpoints.FAILPOINTS), "keep FAILPOINTS sorted by name"


def test_error_action_raises_oserror_with_the_errno_and_the_name() -> None:
    failpoints.configure("failpoints.selftest=error(ENOMEM)")
    try:
        for _ in range(2):  # without COUNT* every hit fires
            with pytest.raises(OSError) as e:
                failpoints.hit("failpoints.selftest")
            assert e.value.errno == errno.ENOMEM and "failpoints.selftest" in str(e.value)
    finally:
        failpoints.configure(None)
    failpoints.hit("failpoints.selftest")  # unset: nothing


def test_count_fires_only_the_first_hits() -> None:
    failpoints.configure("failpoints.selftest=1*error(11)")
    try:
        with pytest.raises(OSError) as e:
            failpoints.hit("failpoints.selftest")
        assert e.value.errno == errno.EAGAIN
        failpoints.hit("failpoints.selftest")  # the second hit passes
        assert failpoints.active() == {"failpoints.selftest": "0*error(11)"}
    finally:
        failpoints.configure(None)


@pytest.mark.parametrize("spec", [
    "nosuch.point=kill",
    "failpoints.selftest",
    "failpoints.selftest=error(ENOSUCH)",
    "failpoints.selftest=error",
    "failpoints.selftest=kill(9)",
    "failpoints.selftest=delay(soon)",
    "failpoints.selftest=explode",
])
def test_a_malformed_spec_is_refused_not_ignored(spec: str) -> None:
    with pytest.raises(ValueError):
        failpoints.parse(spec)
    assert failpoints.active() == {}


def test_kill_and_delay_in_a_real_process() -> None:
    code = "from fdboxd import failpoints; print('before', flush=True); failpoints.hit('failpoints.selftest'); print('after')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code], env={**env, failpoints.ENV: "failpoints.selftest=kill"},
                       capture_output=True, text=True)
    assert p.returncode == -9 and p.stdout == "before\n", p
    p = subprocess.run([sys.executable, "-c", code], env={**env, failpoints.ENV: "failpoints.selftest=delay(1)"},
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "before\nafter\n", p
    p = subprocess.run([sys.executable, "-c", code], env={**env, failpoints.ENV: "failpoints.selftest=bogus"},
                       capture_output=True, text=True)
    assert p.returncode == 1 and "bad action" in p.stderr, p
