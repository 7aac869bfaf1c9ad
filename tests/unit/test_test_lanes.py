"""scripts/test-lanes deals every VM test file to exactly one lane, and its weights name
only files that exist (a renamed file would otherwise fall back to the default weight
unnoticed)."""

from __future__ import annotations

import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _lanes() -> ModuleType:
    loader = SourceFileLoader("test_lanes_script", str(ROOT / "scripts" / "test-lanes"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_every_vm_file_runs_in_exactly_one_lane() -> None:
    lanes = _lanes()
    files = lanes.vm_files()
    assert files, "no tests/vm/test_*.py found"
    one, two = lanes.deal(files)
    assert sorted(one + two) == sorted(files)
    assert not set(one) & set(two)
    assert one and two


def test_weights_name_existing_files() -> None:
    lanes = _lanes()
    assert set(lanes.WEIGHTS) <= set(lanes.vm_files())


def test_a_new_file_gets_a_lane() -> None:
    lanes = _lanes()
    one, two = lanes.deal([*lanes.vm_files(), "tests/vm/test_brand_new.py"])
    assert "tests/vm/test_brand_new.py" in one + two
