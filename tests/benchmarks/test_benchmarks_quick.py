"""The benchmarks' --quick modes still run and their outputs keep their defining properties."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` puts only tests/ on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    exactness,
    index,
    kronfluence_compare,
    rank_tracking,
    reduce,
    scaling,
    sensitivity,
    speed,
)
from benchmarks.stats import pearson, ranks, spearman  # noqa: E402

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmarks pin torch to one thread; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_rank_statistics_on_hand_made_values():
    assert torch.equal(
        ranks(torch.tensor([3.0, 1.0, 2.0, 1.0])),
        torch.tensor([3.0, 0.5, 2.0, 0.5], dtype=torch.float64),
    )
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot correlate 4 values with 3"):
        pearson(a, a[:3])


def test_exactness_quick_ekfac_tracks_the_exact_fisher(capsys):
    rows = exactness.main(["--quick"])
    out = capsys.readouterr().out
    assert "| Fisher sequences | damping factor | multi-stage (both inverses)" in out
    by = {(r["fisher_sequences"], r["damping_factor"]): r for r in rows}
    assert set(by) == {(64, 0.1), (512, 1.0), (512, 0.1)}
    multi, single, floor = exactness.METHODS[0], exactness.METHODS[3], exactness.METHODS[4]
    # Well sampled and well damped, single-stage EK-FAC scores follow the exact ones closely.
    assert by[512, 1.0][single][0] > 0.9
    # More Fisher data brings EK-FAC closer to the exact block Fisher ...
    assert by[512, 0.1][multi][0] > by[64, 0.1][multi][0] + 0.1
    # ... and the curvature matters: EK-FAC is far closer than the plain gradient dot.
    assert by[512, 0.1][multi][0] > by[512, 0.1][floor][0] + 0.3


def test_kronfluence_quick_matches_msif_and_detects_a_convention_change(capsys):
    if importlib.util.find_spec("kronfluence") is None:
        pytest.skip(f"kronfluence is not installed ({kronfluence_compare.INSTALL_HINT})")
    result = kronfluence_compare.main(["--quick"])
    out = capsys.readouterr().out
    assert "| stage | msif s | kronfluence s | kronfluence / msif |" in out
    timing = result["timing"]
    assert math.isfinite(timing["spearman"]) and timing["spearman"] > 0.999
    for side in ("msif", "kronfluence"):
        assert all(t > 0 for t in timing[side].values())
    matched, changed = result["conventions"]
    assert matched["convention"].startswith("matched")
    # Same conventions in float64: the two libraries agree to rounding, factors included.
    assert matched["spearman"] > 0.999999
    assert matched["score_rel_err"] < 1e-8
    assert matched["A_rel_err"] < 1e-10 and matched["lambda_rel_err"] < 1e-10
    # kronfluence's default A (every position) is a different estimate, and it shows.
    assert changed["A_rel_err"] > 1e-3
    assert changed["score_rel_err"] > 1e-3


def test_scaling_quick_writes_plots_and_streams_in_flat_memory(tmp_path, capsys):
    result = scaling.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("queries", "corpus", "hidden", "seqlen"):
        png = tmp_path / f"scaling_{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    assert "### Corpus size" in out
    corpus = result["corpus"]
    assert [r["docs"] for r in corpus] == [8, 32]
    assert all(r["seconds"] > 0 for r in corpus)
    # Four times the documents must not need more memory (allocator noise aside).
    assert corpus[1]["peak_rss_mib"] - corpus[0]["peak_rss_mib"] < 32
    assert [r["queries"] for r in result["queries"]] == [1, 4]


def test_streamed_top_k_equals_top_k_of_all_scores():
    torch.manual_seed(0)
    model = scaling.neox(16, 1, vocab=64)
    data = scaling.token_batches(8, 16, 64, 0, 4)
    factors = scaling.fitted_factors(model, data)
    pre = scaling.preconditioned(model, factors, 3, 16, 64, rank=None)
    docs = list(scaling.stream(10, 16, 64, 4, seed=5))
    assert [len(b["ids"]) for b in docs] == [4, 4, 2]
    full = scaling.msif.score(model, docs, pre).values
    streamed = scaling.stream_top_k(model, pre, iter(docs), k=4)
    torch.testing.assert_close(streamed, full.float().topk(4, dim=1).values)


def test_speed_quick_times_every_pass(capsys):
    rows = speed.main(["--quick"])
    names = [name for name, _ in rows]
    assert names[0] == "training step (fwd+bwd)"
    assert names[1:3] == ["covariance fit", "Λ fit"]
    for q in ("1 query", "4 queries"):
        assert f"scoring, {q}, full" in names and f"scoring, {q}, rank 32" in names
    assert all(math.isfinite(t) and t > 0 for _, t in rows)
    assert "| pass | tokens/s | ÷ training step |" in capsys.readouterr().out


def test_rank_tracking_quick_is_exact_once_the_rank_covers_every_module():
    rows = {r["rank"]: r for r in rank_tracking.main(["--quick"])}
    assert sorted(rows) == [1, 2, 4, 8, 16, 32]
    # hidden 16: no module is wider than 65 × 17, so rank 32 keeps every singular value.
    assert rows[32]["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert rows[32]["top10_overlap"] == 1.0
    assert rows[1]["pearson"] < rows[8]["pearson"] < 1.0


def test_sensitivity_quick_covers_the_grid_and_multi_stage_beats_the_gradient_dot():
    rows = sensitivity.main(["--quick"])
    grid = {(r["method"], r["factor"], r["alpha"]) for r in rows}
    assert ("gradient-dot", None, None) in grid
    assert len(grid) == len(rows) == 1 + 2 * 2 * 2  # factors {0.1, 1} × α {relative, world's}
    assert all(0.0 <= r["mrr"] <= 1.0 and 0.0 <= r["recall@10"] <= 1.0 for r in rows)
    dot = next(r["mrr"] for r in rows if r["method"] == "gradient-dot")
    multi = [r for r in rows if r["method"] == "multi-stage" and r["alpha"] is not None]
    assert all(r["mrr"] > dot for r in multi)


def test_index_quick_agreement_grows_with_rank_and_speed_beats_the_scan(capsys):
    argv = ["--quick", "--ranks", "1", "8", "--powers", "0", "0.5", "--values", "256", "10000000"]
    rows = index.main([*argv, "--projected-ranks", "2", "64"])
    assert "| method | index | values/doc | Spearman mean |" in capsys.readouterr().out
    by = {(r["method"], int(r["size"][2:]), r["power"]): r for r in rows if r["tier"] == "factored"}
    projected = {(r["method"], r["size"], r["power"]): r for r in rows if r["tier"] == "projected"}
    for method in ("multi-stage", "gradient-dot"):
        # Every triplet and entry kept (values beyond the model's size are capped): exact.
        assert projected[(method, "k=10000000 r=64", 0.5)]["spearman_min"] > 0.999
        assert projected[(method, "k=256 r=2", 0.0)]["spearman_mean"] < 0.999
    for method in ("multi-stage", "gradient-dot"):
        for power in (0.0, 0.5):
            low, high = by[(method, 1, power)], by[(method, 8, power)]
            assert low["spearman_mean"] < high["spearman_mean"]
            assert high["spearman_mean"] > 0.97
            assert high["values_per_doc"] == 8 * low["values_per_doc"]
    # Whitening serves the queries that see F_pt⁻¹: multi-stage gains at a tight rank.
    assert (
        by[("multi-stage", 1, 0.5)]["spearman_mean"] > by[("multi-stage", 1, 0.0)]["spearman_mean"]
    )
    fast = index.main(["--speed", "--lengths", "128", "--docs", "8", "--repeat", "1"])
    assert fast[0]["scan"] > 5 * fast[0]["lookup"]


def test_reduce_quick_streaming_memory_does_not_grow_with_the_shards(capsys):
    two, four = reduce.main(["--quick"])  # exits if the two ways' sums differ
    part = two["partial_mib"]
    assert four["all_at_once_mib"] - two["all_at_once_mib"] > 1.5 * part  # two more held
    assert four["streaming_mib"] - two["streaming_mib"] < 0.5 * part
