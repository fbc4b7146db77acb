"""The world-fairness benchmark: what each condition removes; a run on the small world."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` puts only tests/ on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import world_fairness  # noqa: E402
from msif.world import WorldConfig, build_world, generate_facts  # noqa: E402


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmark pins torch to one thread; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_conditions_remove_exactly_the_held_out_statements_and_distractors():
    config = WorldConfig.preset("distractor")
    facts = generate_facts(config)
    held = {q.qa.fact for q in facts.queries}
    by_id = {d.id: d for d in facts.documents}
    full, statements, distractors, both = (
        set(world_fairness.removed_ids(facts, c)) for c in world_fairness.CONDITIONS
    )
    n_held = len(held)
    assert full == set()
    assert len(statements) == n_held * config.docs_per_fact
    assert len(distractors) == n_held * config.distractors_per_fact
    assert both == statements | distractors and not statements & distractors
    assert all(by_id[i].fact in held for i in statements)
    assert all(by_id[i].distractor in held and by_id[i].fact is None for i in distractors)
    # The fine-tuning entities' documents stay in every condition.
    finetune = {qa.fact for qa in facts.finetune}
    assert not any(by_id[i].fact in finetune or by_id[i].distractor in finetune for i in both)


@pytest.mark.e2e
def test_small_world_run_reuses_the_cached_model_and_loses_the_held_out_facts(capsys, tmp_path):
    rows = world_fairness.main(["--preset", "small", "--json", str(tmp_path / "f.json")])
    out = capsys.readouterr().out
    paths = build_world(WorldConfig.preset("small"))
    full, statements, distractors, both = rows
    # (a) is the cached world's fine-tuned model itself.
    assert full.accuracy == paths.accuracy["queries"] and full.removed == 0
    assert full.finetune_accuracy == paths.accuracy["finetune"]
    # The small world has no distractors: (c) is (a) and (d) is (b), each trained once.
    assert distractors.removed == 0 and both.removed == statements.removed == 36
    assert (distractors.heldout_correct, distractors.heldout_nll) == (
        full.heldout_correct,
        full.heldout_nll,
    )
    assert (both.heldout_correct, both.heldout_nll) == (
        statements.heldout_correct,
        statements.heldout_nll,
    )
    # Two corpora evaluated: the cached full one and one retrain without the statements.
    assert len(re.findall(r"^\(\w\) [^|\n]*: [\d.]+% \(\d+s\)$", out, re.M)) == 2
    # Without their statements the held-out answers are far less likely, and fine-tuning
    # still learned its own pairs.
    assert statements.heldout_nll > full.heldout_nll + 1.0
    assert statements.accuracy < full.accuracy
    assert statements.finetune_accuracy >= 0.75
    assert "| (b) held-out statements removed | 44 |" in out
    record = json.loads((tmp_path / "f.json").read_text())
    assert [r["condition"] for r in record["rows"]] == [c.name for c in world_fairness.CONDITIONS]
