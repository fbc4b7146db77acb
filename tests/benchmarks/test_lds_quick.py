"""The LDS benchmark's --quick mode: a reproducible truth file and an exact evaluate()."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` puts only tests/ on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import counterfactual, lds  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (its truth file, results and printed table), shared by the tests."""
    threads = torch.get_num_threads()
    tmp = tmp_path_factory.mktemp("lds")
    path = tmp / "truth.json"
    out = lds.main(["--quick", "--truth", str(path), "--json", str(tmp / "lds.json")])
    torch.set_num_threads(threads)  # the benchmark pins torch to one thread
    return path, out, json.loads((tmp / "lds.json").read_text())


def oracle_scores(truth: lds.Truth, measured: torch.Tensor) -> torch.Tensor:
    """(queries × documents) scores whose removal sums equal `measured` (subsets × queries)."""
    removal = torch.zeros(len(truth.removed), len(truth.doc_ids), dtype=torch.float64)
    position = {d: i for i, d in enumerate(truth.doc_ids)}
    for j, ids in enumerate(truth.removed):
        removal[j, [position[d] for d in ids]] = 1.0
    # Fewer subsets than documents: the minimum-norm solution reproduces measured exactly.
    return (torch.linalg.pinv(removal) @ measured).T


def test_truth_file_structure_and_bitwise_reproduction(quick):
    path, out, saved = quick
    truth = lds.load_truth(path)
    m, s = lds.QUICK_SUBSETS, 2
    assert out["retrains"] == m * s and out["subsets"] == m
    assert truth.training_seeds == out["seeds"] == [0, lds.SEED_STRIDE]
    # The subsets are the seeded recipe's, halves of the corpus, all different.
    assert truth.removed == lds.make_subsets(truth.doc_ids, m, truth.subset_seed)
    assert all(len(r) == len(truth.doc_ids) // 2 for r in truth.removed)
    assert len({tuple(r) for r in truth.removed}) == m
    assert truth.complete() == list(range(m))
    for row in truth.losses:
        for losses in row:
            assert len(losses) == len(truth.query_ids)
            assert all(math.isfinite(v) and v > 0 for v in losses)
        # The training seed is real noise: the same subset under two seeds gives other losses.
        assert row[0] != row[1]
    assert set(truth.answered_query_ids) <= set(truth.query_ids)
    assert not path.with_name(path.name + ".tmp").exists()
    # Retraining an entry again gives its losses bit for bit (training is deterministic).
    world = counterfactual.open_world("small")
    lds.match_world(truth, world)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark trains: float sums depend on the thread count
    try:
        again = lds.retrain_losses(world, truth.removed[2], truth.training_seeds[1])
    finally:
        torch.set_num_threads(threads)
    assert again == truth.losses[2][1]
    # The file is plain JSON that re-reads to the same truth.
    assert lds.Truth.from_dict(json.loads(path.read_text())) == truth


def test_rerun_reuses_the_truth_and_gives_the_same_table(quick, capsys):
    path, out, saved = quick
    threads = torch.get_num_threads()
    again = lds.main(["--quick", "--truth", str(path)])
    torch.set_num_threads(threads)
    table = capsys.readouterr().out
    assert again["retrains"] == 0
    assert lds.to_json(again["results"]) == {
        k: saved[k] for k in ("methods", "differences", "noise_ceiling")
    }
    for method in lds.METHODS:
        assert f"| {method} |" in table
    assert "| noise ceiling (seed vs seed) |" in table
    for method in lds.METHODS:
        r = saved["methods"][method]["lds"]
        assert len(r["per_query"]) == len(saved["query_ids"])
        assert all(-1 <= v <= 1 for v in r["per_query"].values())
        assert r["low"] <= r["mean"] <= r["high"]


def test_tracking_the_head_changes_the_influence_scores_only(quick, capsys):
    path, out, saved = quick
    threads = torch.get_num_threads()
    blocks = lds.main(["--quick", "--truth", str(path), "--methods", "multi-stage,bm25"])
    with_head = lds.main(
        ["--quick", "--truth", str(path), "--methods", "multi-stage,bm25", "--modules", "head"]
    )
    torch.set_num_threads(threads)
    assert "modules head" in capsys.readouterr().out
    assert (blocks["modules"], with_head["modules"]) == ("blocks", "head")
    assert blocks["retrains"] == with_head["retrains"] == 0
    blocks_lds = blocks["methods"]["multi-stage"]["lds"]
    # msif's default tracking is the run the fixture made; the head moves multi-stage's LDS.
    assert blocks_lds == saved["methods"]["multi-stage"]["lds"]
    assert with_head["methods"]["multi-stage"]["lds"]["per_query"] != blocks_lds["per_query"]
    assert with_head["methods"]["bm25"] == blocks["methods"]["bm25"]


def test_evaluate_is_exact_on_the_measured_ordering(quick):
    truth = lds.load_truth(quick[0])
    qids = truth.query_ids
    mean = lds.measured_losses(truth, qids, range(len(truth.removed)), None)
    scores = oracle_scores(truth, mean)
    best = lds.evaluate(truth, truth.doc_ids, qids, scores)
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in best.per_query.values())
    assert best.mean == pytest.approx(1.0, abs=1e-12) and best.low == pytest.approx(1.0, abs=1e-12)
    worst = lds.evaluate(truth, truth.doc_ids, qids, -scores)
    assert all(v == pytest.approx(-1.0, abs=1e-12) for v in worst.per_query.values())
    # Documents in another order (and one extra, unscored by the truth) change nothing.
    order = torch.randperm(len(truth.doc_ids), generator=torch.Generator().manual_seed(0))
    ids = [truth.doc_ids[i] for i in order] + ["not-in-the-corpus"]
    shuffled = torch.cat([scores[:, order], torch.ones(len(qids), 1)], dim=1)
    assert lds.evaluate(truth, ids, qids, shuffled) == best
    # A predictor exact for one seed's losses scores, against the other seed, exactly the
    # seed-vs-seed agreement that the noise ceiling reports.
    first, second = truth.training_seeds
    one = lds.measured_losses(truth, qids, range(len(truth.removed)), [first])
    seed_one = oracle_scores(truth, one)
    on_first = lds.evaluate(truth, truth.doc_ids, qids, seed_one, seeds=[first])
    assert on_first.mean == pytest.approx(1.0, abs=1e-12)
    on_second = lds.evaluate(truth, truth.doc_ids, qids, seed_one, seeds=[second])
    ceiling = lds.seed_agreement(truth, qids)
    assert on_second.per_query == pytest.approx(ceiling.per_query, abs=1e-12)
    # Constant scores rank nothing: LDS 0 with an interval of width 0.
    flat = lds.evaluate(truth, truth.doc_ids, qids, torch.ones(len(qids), len(truth.doc_ids)))
    assert (flat.mean, flat.low, flat.high) == (0.0, 0.0, 0.0)


def test_extending_keeps_every_entry_and_bad_input_is_refused(quick):
    truth = lds.load_truth(quick[0])
    m = len(truth.removed)
    grown = copy.deepcopy(truth)
    lds.extend(grown, m + 2, 3)
    assert grown.removed[:m] == truth.removed and len(grown.removed) == m + 2
    assert grown.training_seeds == [0, lds.SEED_STRIDE, 2 * lds.SEED_STRIDE]
    assert [row[:2] for row in grown.losses[:m]] == truth.losses
    assert all(row[2] is None for row in grown.losses) and grown.losses[m] == [None] * 3
    assert grown.complete() == [] and grown.complete([0, lds.SEED_STRIDE]) == list(range(m))
    grown.check()

    tampered = copy.deepcopy(truth)
    tampered.removed[0] = tampered.removed[1]
    with pytest.raises(lds.LdsError, match="do not follow its own seeded recipe"):
        lds.extend(tampered, m + 1, 2)
    qids, docs = truth.query_ids, truth.doc_ids
    scores = torch.zeros(len(qids), len(docs))
    with pytest.raises(lds.LdsError, match="has no score"):
        lds.evaluate(truth, docs[1:], qids, scores[:, 1:])
    with pytest.raises(lds.LdsError, match="not 12 queries"):
        lds.evaluate(truth, docs, qids, scores[:, 1:])
    with pytest.raises(lds.LdsError, match="not in the truth file"):
        lds.evaluate(truth, docs, ["q-nope"], scores[:1])
    with pytest.raises(lds.LdsError, match="NaN or inf"):
        lds.evaluate(truth, docs, qids, scores + float("nan"))
    with pytest.raises(lds.LdsError, match=r"not in the truth \(\[0, 1000\]\)"):
        lds.evaluate(truth, docs, qids, scores, seeds=[7])
    with pytest.raises(lds.LdsError, match="at least 3 retrained subsets"):
        lds.evaluate(truth, docs, qids, scores, subsets=[0, 1])
    with pytest.raises(lds.LdsError, match="not retrained under every seed"):
        lds.evaluate(grown, docs, qids, scores, subsets=[0, 1, m])
    other = copy.deepcopy(truth)
    other.world_fingerprint = "000000000000"
    world = counterfactual.open_world("small")
    with pytest.raises(lds.LdsError, match="measured on world 000000000000"):
        lds.match_world(other, world)
    bad = quick[0].with_name("bad.json")
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(lds.LdsError, match="not an LDS truth file"):
        lds.load_truth(bad)
    broken = truth.to_dict()
    broken["losses"] = broken["losses"][:-1]
    with pytest.raises(lds.LdsError, match="not 6 subsets × 2 seeds"):
        lds.Truth.from_dict(broken)


def test_the_relevant_row_counts_the_removed_statements(quick):
    path, out, saved = quick
    truth = lds.load_truth(path)
    world = counterfactual.open_world("small")
    key = lds.method_scores(world, ["relevant"], damping_factor=0.01, alpha=None)["relevant"]
    relevant = world.queries.column("relevant_ids").to_pylist()
    assert key.shape == (len(truth.query_ids), len(truth.doc_ids))
    # One on exactly the documents stating each query's fact, as the world lists them.
    for row, docs in zip(key, relevant, strict=True):
        assert {truth.doc_ids[j] for j in row.nonzero().flatten().tolist()} == set(docs)
        assert float(row.sum()) == len(docs) == world.config.docs_per_fact
    # Its LDS is Spearman between the number of statements a subset removes and the loss.
    q = 0
    counts = torch.tensor(
        [float(sum(d in set(relevant[q]) for d in removed)) for removed in truth.removed]
    )
    measured = lds.measured_losses(truth, truth.query_ids, range(len(truth.removed)), None)
    expected = lds.rank_correlation(counts, measured[:, q])
    got = saved["methods"]["relevant"]["lds"]["per_query"][truth.query_ids[q]]
    assert got == pytest.approx(expected, abs=1e-12)


def test_statement_share_is_the_covariance_share_of_the_predicted_change(quick):
    path, out, saved = quick
    truth = lds.load_truth(path)
    world = counterfactual.open_world("small")
    key = lds.relevant_scores(world, truth.doc_ids)
    subsets = list(range(len(truth.removed)))
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(key.shape, generator=g, dtype=torch.float64).abs()
    # Dense reference, one query at a time: S over the subsets and its statements part.
    expected = []
    for q in range(key.shape[0]):
        total = torch.tensor(
            [sum(scores[q, truth.doc_ids.index(d)] for d in r) for r in truth.removed]
        )
        part = torch.tensor(
            [
                sum(scores[q, truth.doc_ids.index(d)] * key[q, truth.doc_ids.index(d)] for d in r)
                for r in truth.removed
            ]
        )
        cov = ((part - part.mean()) * (total - total.mean())).sum()
        expected.append(float(cov / ((total - total.mean()) ** 2).sum()))
    counts = key @ lds.removal_matrix(truth, truth.doc_ids, subsets).T
    assert bool((counts.std(dim=1) == 0).any())  # a query no subset tells apart: left out
    got = lds.statement_share(truth, truth.doc_ids, scores, key, subsets)
    assert got == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    # The answer key's prediction is all statements; scores off the statements have none.
    assert lds.statement_share(truth, truth.doc_ids, key, key, subsets) == pytest.approx(1.0)
    assert lds.statement_share(truth, truth.doc_ids, scores * (1 - key), key, subsets) == 0.0
    # The run reports it for every method, the answer key at one.
    shares = {m: r["statement_share"] for m, r in saved["methods"].items()}
    assert set(shares) == set(lds.METHODS) and shares["relevant"] == pytest.approx(1.0)
