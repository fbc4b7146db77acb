"""The counterfactual retraining benchmark's --quick mode: exact reproduction, finite Δloss."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` puts only tests/ on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import counterfactual  # noqa: E402
from msif.world import WorldConfig, build_world  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmark pins torch to one thread; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_counterfactual_quick_reproduces_training_and_measures_removals(capsys, tmp_path):
    report = counterfactual.main(["--quick", "--json", str(tmp_path / "cf.json")])
    out = capsys.readouterr().out
    # Retraining the full corpus by the benchmark's code is the cached world, bit for bit,
    # so every Δloss is the removal's effect and not training noise.
    assert report.weights_bitwise
    assert report.reproduction_max_abs_diff == 0.0
    assert report.reproduced_loss == report.original_loss
    assert report.methods == ["multi-stage", "random"] and len(report.query_ids) == 2
    assert len(report.trials) == 4
    corpus = set(pq.read_table(build_world(WorldConfig.preset("small")).corpus)["id"].to_pylist())
    for t in report.trials:
        assert math.isfinite(t.delta_loss) and math.isfinite(t.others_delta)
        assert len(t.removed) == 5 and len(set(t.removed)) == 5 and set(t.removed) <= corpus
        assert 0 <= t.relevant_removed <= 3
    # Every query is one the fine-tuned model answers, with a positive summed NLL.
    assert all(v > 0 for v in report.original_loss.values())
    assert "| multi-stage |" in out and "| random |" in out
    assert not (tmp_path / "cf.json.tmp").exists()
    # The saved report re-reads to the same values (tables can be reprinted without training).
    assert counterfactual.load_report(str(tmp_path / "cf.json")) == report
    # Proponents: highest positive scores only, ties in corpus order.
    ids = ["a", "b", "c", "d"]
    assert counterfactual.top_proponents([0.5, 2.0, 0.5, -1.0], ids, 3) == ("b", "a", "c")
    assert counterfactual.top_proponents([0.0, 1.0, -2.0, -1.0], ids, 3) == ("b",)
