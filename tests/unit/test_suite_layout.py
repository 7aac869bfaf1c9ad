"""The suite itself: no two test modules share a file name.

The tiers have no ``__init__.py`` (pytest's default "prepend" import mode), so two
``test_x.py`` in different directories make collection of the *whole* suite fail
("import file mismatch") — on a fresh clone that is every test lost, not one.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for p in TESTS.rglob("test_*.py"):
        if "guest" in p.relative_to(TESTS).parts:  # run in the VM, never collected on the host
            continue
        seen[p.name].append(str(p.relative_to(TESTS)))
    twins = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not twins, f"test modules sharing a name (rename one): {twins}"
