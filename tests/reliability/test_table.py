"""docs/reliability.md is what tests/reliability/table.py prints, and each fault it lists
names a test that exists."""

from __future__ import annotations

import importlib
from pathlib import Path

from tests.reliability.faults import FAULTS
from tests.reliability.table import render

ROOT = Path(__file__).resolve().parents[2]


def test_committed_table_is_current():
    committed = (ROOT / "docs" / "reliability.md").read_text()
    assert committed == render(), "run: python -m tests.reliability.table > docs/reliability.md"


def test_every_fault_names_a_test_that_exists():
    for fault in FAULTS:
        path, name = fault.test.split("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name, None)), fault.test
