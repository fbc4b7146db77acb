"""docs/architectures.md is what `python -m benchmarks.architectures` computes.

Generating the whole table takes about 20 s, so the fast suite recomputes two rows (OPT, with
its flattened MLP inputs and padding row, and Gemma, with its scaled embedding) and checks
every cell of theirs against the committed file; `-m e2e` recomputes every row.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from benchmarks import architectures as table
from tests.support.tiny import ARCHITECTURES

DOC = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"
RECOMPUTED = ("opt", "gemma")
ERRORS = {"per-sequence ∇", "covariance", "Λ", "scores", "embedding + head ∇", "split exact"}
_NUMBER = re.compile(r"\d(?:\.\d+)?e[-+]\d+|(?<![\w.])0(?![\w.])")


def cells_agree(column: str, committed: str, fresh: str) -> bool:
    """Equal cells, except that float64 errors may move within a decade (BLAS kernels differ
    between machines) and Spearman coefficients by 0.005, as long as neither crosses its
    tolerance (a ✗)."""
    if column == "bf16 Spearman":
        return abs(float(committed) - float(fresh)) <= 0.005
    if column not in ERRORS:
        return committed == fresh
    a, b = _NUMBER.findall(committed), _NUMBER.findall(fresh)
    if len(a) != len(b) or _NUMBER.sub("#", committed) != _NUMBER.sub("#", fresh):
        return False
    floor = 1e-16  # at and below one ulp, 0 and 1e-16 are the same answer
    return all(
        abs(math.log10(max(float(x), floor)) - math.log10(max(float(y), floor))) <= 1
        for x, y in zip(a, b, strict=True)
    )


def committed_rows() -> dict[str, dict[str, str]]:
    return table.parse_table(DOC.read_text())


def test_the_committed_file_has_every_architecture_and_current_prose():
    rows = committed_rows()
    assert list(rows) == list(ARCHITECTURES)
    # Everything but the measured cells is regenerated from the committed rows.
    assert table.document(list(rows.values())) == DOC.read_text()
    assert all(r["LoRA¹"].endswith("names kept") for r in rows.values())
    assert "tests/data/test_lora.py" in DOC.read_text()


@pytest.mark.parametrize("arch", RECOMPUTED)
def test_committed_rows_are_what_the_generator_measures(arch):
    committed, fresh = committed_rows()[arch], table.measure(arch)
    for column in table.COLUMNS:
        assert cells_agree(column, committed[column], fresh[column]), (
            column,
            committed[column],
            fresh[column],
        )


def test_cells_that_moved_or_crossed_their_tolerance_do_not_agree():
    assert cells_agree("Λ", "2e-15", "9e-16") and cells_agree("scores", "0", "1e-16")
    assert not cells_agree("Λ", "2e-15", "2e-13")
    assert not cells_agree("Λ", "2e-15", "2e-15 ✗")
    assert not cells_agree("split exact", "Λ 2e-15, scores 9e-15", "Λ 2e-15")
    assert not cells_agree("split heads", "self_attn.q_proj 2", "self_attn.q_proj 4")
    assert not cells_agree("bf16 Spearman", "0.999", "0.990")


@pytest.mark.e2e
def test_every_committed_row_is_what_the_generator_measures():
    committed = committed_rows()
    for arch in ARCHITECTURES:
        fresh = table.measure(arch)
        for column in table.COLUMNS:
            assert cells_agree(column, committed[arch][column], fresh[column]), (arch, column)
