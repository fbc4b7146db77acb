"""Retrieval metrics on hand-made rankings with hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from msif.attribution.topk import SCORE_SCHEMA, TopK, merge_topk
from msif.errors import DataError, MsifError
from msif.evaluation.metrics import (
    MetricsError,
    evaluate_rankings,
    kfp_metric_name,
    kfp_metrics,
    recall_at_k,
    reciprocal_rank,
)


def test_reciprocal_rank_is_one_over_first_relevant_rank():
    assert reciprocal_rank(["a", "b", "c"], {"a"}) == 1.0
    assert reciprocal_rank(["a", "b", "c"], {"c", "b"}) == 0.5
    assert reciprocal_rank(["a", "b", "c", "d"], {"d"}) == 0.25
    assert reciprocal_rank(["a", "b"], {"z"}) == 0.0
    assert reciprocal_rank([], {"a"}) == 0.0


def test_ties_follow_the_given_order():
    # The ranking order is authoritative: the metric never re-sorts.
    assert reciprocal_rank(["x", "rel"], {"rel"}) == 0.5
    assert reciprocal_rank(["rel", "x"], {"rel"}) == 1.0


def test_recall_at_k_counts_relevant_in_top_k():
    ranked = ["a", "b", "c", "d", "e"]
    assert recall_at_k(ranked, {"b", "e"}, 2) == 0.5
    assert recall_at_k(ranked, {"b", "e"}, 5) == 1.0
    assert recall_at_k(ranked, {"b", "e", "z"}, 10) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, {"z"}, 3) == 0.0
    # A repeated id counts once, so recall stays <= 1.
    assert recall_at_k(["a", "a", "b"], {"a"}, 3) == 1.0


def test_recall_refuses_bad_arguments():
    with pytest.raises(MetricsError, match="k must be a positive integer"):
        recall_at_k(["a"], {"a"}, 0)
    with pytest.raises(MetricsError, match="without relevant ids"):
        recall_at_k(["a"], set(), 1)
    assert issubclass(MetricsError, MsifError)


def test_evaluate_rankings_hand_computed():
    rankings = {
        "q1": ["d3", "d1", "d2"],  # first relevant (d1) at rank 2 → RR 1/2; recall@2 = 1/2
        "q2": ["d9", "d8", "d7", "d5"],  # relevant d5 at rank 4 → RR 1/4; recall@2 = 0
        "q3": ["d4"],  # no relevant ids → skipped
    }
    relevant = {"q1": ["d1", "d2"], "q2": {"d5"}, "q3": [], "q4": ["d6"]}  # q4 unranked → 0
    got = evaluate_rankings(rankings, relevant, k=2)
    assert got == {
        "mrr": pytest.approx((0.5 + 0.25 + 0.0) / 3),
        "recall@2": pytest.approx((0.5 + 0.0 + 0.0) / 3),
        "num_queries": 3,
        "num_skipped": 1,
    }
    got10 = evaluate_rankings(rankings, relevant)
    assert got10["recall@10"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert got10["mrr"] == got["mrr"]


def test_evaluate_without_relevant_ids_measures_nothing():
    got = evaluate_rankings({"q1": ["a"], "q2": ["b"]}, {})
    assert got == {"mrr": None, "recall@10": None, "num_queries": 0, "num_skipped": 2}
    json.dumps(got)  # None is valid JSON (null); NaN would not be


def test_kfp_metrics_flattens_with_safe_names():
    metrics = {
        "methods": {
            "multi-stage": {"mrr": 0.75, "recall@10": 1.0, "num_queries": 4, "num_skipped": 0},
            "bm25": {"mrr": None, "recall@10": float("nan"), "num_queries": 0, "num_skipped": 4},
        },
        "top_k": 100,
        "note": "text is left out",
    }
    assert kfp_metrics(metrics) == {
        "multi-stage_mrr": 0.75,
        "multi-stage_recall-at-10": 1.0,
        "multi-stage_num_queries": 4.0,
        "multi-stage_num_skipped": 0.0,
        "bm25_num_queries": 0.0,
        "bm25_num_skipped": 4.0,
        "top_k": 100.0,
    }
    assert kfp_metric_name("a b/c", "recall@5") == "a-b-c_recall-at-5"


def test_kfp_metrics_refuses_name_collisions():
    with pytest.raises(MetricsError, match="same KFP metric name 'm_x-y'"):
        kfp_metrics({"methods": {"m": {"x y": 1.0, "x/y": 2.0}}})


# ----------------------------------------------------------------------------- streaming top-k
# (msif.attribution.topk produces the rankings the metrics read; its tests live here.)


def _random_block(seed: int, q: int, n: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    # Rounded scores make ties common, so the doc-id tie-break is exercised.
    return np.round(rng.normal(size=(q, n)), 1), [f"doc-{i:03d}" for i in range(n)]


def _reference(scores: np.ndarray, ids: list[str], k: int) -> list[list[tuple[str, float]]]:
    return [
        sorted(zip(ids, row.tolist(), strict=True), key=lambda p: (-p[1], p[0]))[:k]
        for row in scores
    ]


@pytest.mark.parametrize("batch", [1, 7, 200])
def test_topk_equals_a_full_sort_whatever_the_batch_size(batch):
    scores, ids = _random_block(0, 3, 200)
    top = TopK(10, 3)
    for i in range(0, 200, batch):
        top.update(scores[:, i : i + batch], ids[i : i + batch])
    want = _reference(scores, ids, 10)
    assert [top.rows(q) for q in range(3)] == want


def test_topk_keeps_extras_only_for_kept_documents():
    top = TopK(1, 2)
    top.update(np.array([[1.0, 0.0], [0.0, 2.0]]), ["a", "b"], extras=["A", "B"])
    assert top.kept_ids() == {"a", "b"} and top.extra("a") == "A"
    top.update(np.array([[3.0], [3.0]]), ["c"], extras=["C"])
    assert top.kept_ids() == {"c"} and top.extra("c") == "C"
    with pytest.raises(KeyError):
        top.extra("a")  # dropped from every list, so its extra is released


def test_topk_refuses_bad_blocks():
    top = TopK(2, 2)
    with pytest.raises(DataError, match=r"shape \(2, 3\), expected \(2, 2\)"):
        top.update(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(DataError, match="NaN"):
        top.update(np.array([[np.nan, 0.0], [0.0, 0.0]]), ["a", "b"])
    with pytest.raises(DataError, match="'a' occurs twice in one batch"):
        top.update(np.zeros((2, 2)), ["a", "a"])
    top.update(np.ones((2, 1)), ["a"])
    with pytest.raises(DataError, match="'a' was scored twice"):
        top.update(np.ones((2, 1)), ["a"])
    with pytest.raises(DataError, match="'a' was scored twice"):
        top.update(np.full((2, 1), 5.0), ["a"])  # would displace its own first copy
    with pytest.raises(DataError, match="k >= 1"):
        TopK(0, 1)


def test_topk_table_has_the_scores_schema_and_token_rows():
    top = TopK(2, 2)
    top.update(np.array([[0.5, 0.25, 0.0], [0.0, 1.0, 2.0]]), ["a", "b", "c"])
    table = top.to_table(
        ["q1", "q2"],
        tokens={"a": ["x", "y"], "c": ["z"]},
        token_scores={("q1", "a"): [0.25, 0.25], ("q2", "c"): [2.0]},
    )
    assert table.schema == SCORE_SCHEMA
    assert table.to_pylist() == [
        {"query_id": "q1", "doc_id": "a", "score": 0.5, "rank": 1, "tokens": ["x", "y"],
         "token_scores": [0.25, 0.25]},
        {"query_id": "q1", "doc_id": "b", "score": 0.25, "rank": 2, "tokens": [],
         "token_scores": []},
        {"query_id": "q2", "doc_id": "c", "score": 2.0, "rank": 1, "tokens": ["z"],
         "token_scores": [2.0]},
        {"query_id": "q2", "doc_id": "b", "score": 1.0, "rank": 2, "tokens": [],
         "token_scores": []},
    ]  # fmt: skip
    with pytest.raises(DataError, match="'a': 2 tokens but 1 token scores"):
        top.to_table(["q1", "q2"], {"a": ["x", "y"]}, {("q1", "a"): [1.0]})


def test_merge_of_shard_topk_equals_global_topk():
    scores, ids = _random_block(1, 4, 90)
    qids = ["q-b", "q-a", "q-d", "q-c"]  # not sorted: the merge keeps first-appearance order
    shards = []
    for lo, hi in ((0, 25), (25, 60), (60, 90)):
        top = TopK(6, 4)
        top.update(scores[:, lo:hi], ids[lo:hi])
        shards.append(top.to_table(qids))
    merged = merge_topk(shards[::-1], 6)
    full = TopK(6, 4)
    full.update(scores, ids)
    want = full.to_table(qids)
    assert merged.schema == SCORE_SCHEMA
    assert merged.column("query_id").to_pylist()[::6] == ["q-b", "q-a", "q-d", "q-c"]
    key = ("query_id", "doc_id", "rank", "score")
    assert merged.select(key).sort_by("query_id") == want.select(key).sort_by("query_id")


def test_merge_conforms_types_and_refuses_bad_tables():
    table = pa.table(
        {
            "query_id": pa.array(["q", "q"], pa.large_string()),
            "doc_id": ["b", "a"],
            "score": pa.array([1.0, 1.0], pa.float64()),
            "rank": [1, 2],
            "tokens": [[], []],
            "token_scores": pa.array([[], []], pa.list_(pa.float64())),
        }
    )
    merged = merge_topk([table], 5)
    assert merged.schema == SCORE_SCHEMA
    assert merged.column("doc_id").to_pylist() == ["a", "b"]  # tie broken by doc id
    assert merged.column("rank").to_pylist() == [1, 2]
    with pytest.raises(DataError, match="document 'a' appears twice for query 'q'"):
        merge_topk([table, table.slice(1)], 5)
    with pytest.raises(DataError, match="score table 0 lacks column"):
        merge_topk([table.drop_columns(["rank"])], 5)
    with pytest.raises(DataError, match="no score tables"):
        merge_topk([], 5)
    bad = table.set_column(5, "token_scores", pa.array([[1.0], []], pa.list_(pa.float32())))
    with pytest.raises(DataError, match="tokens and token_scores differ"):
        merge_topk([bad], 5)
    assert merge_topk([SCORE_SCHEMA.empty_table()], 3).num_rows == 0
