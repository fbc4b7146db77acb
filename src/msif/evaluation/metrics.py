"""Retrieval metrics of attribution rankings: reciprocal rank and recall@k against relevant ids.

Conventions:
- A ranking is taken in the order given, rank 1 first. Ties in score are resolved before this
  module sees them (msif.attribution.topk orders equal scores by ascending doc id), so a
  metric never looks at scores and two runs with the same scores give the same value.
- A doc id that occurs twice in a ranking keeps its first (best) rank; later copies are ignored
  for recall, so recall never exceeds 1.
- Queries whose relevant set is empty (or absent) are skipped: they count in `num_skipped`, not
  in the means. A query that has relevant ids but no ranking at all scores 0 for both metrics.
- With no evaluable query at all, `mrr` and `recall@k` are None (JSON null), not 0: "nothing was
  measured" must not read as "the method failed".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from msif.errors import MsifError


class MetricsError(MsifError):
    """Metric arguments that cannot be evaluated (k < 1, empty relevant set)."""


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MetricsError(f"k must be a positive integer, not {k!r}")


def reciprocal_rank(ranked_ids: Sequence[str], relevant: set[str]) -> float:
    """1 / (1-based rank of the first relevant id), or 0.0 when none is ranked."""
    for position, doc_id in enumerate(ranked_ids, start=1):
        if doc_id in relevant:
            return 1.0 / position
    return 0.0


def recall_at_k(ranked_ids: Sequence[str], relevant: set[str], k: int) -> float:
    """Fraction of the relevant ids that appear among the first k ranked ids."""
    _check_k(k)
    if not relevant:
        raise MetricsError("recall is undefined for a query without relevant ids")
    found = set(ranked_ids[:k]) & set(relevant)
    return len(found) / len(set(relevant))


def recall_key(k: int) -> str:
    """The metrics-dict key of recall at k, e.g. `recall@10`."""
    return f"recall@{k}"


def evaluate_rankings(
    rankings: Mapping[str, Sequence[str]],
    relevant: Mapping[str, Iterable[str]],
    k: int = 10,
) -> dict[str, Any]:
    """Mean reciprocal rank and mean recall@k over the queries that have relevant ids.

    Returns `{"mrr", "recall@K", "num_queries", "num_skipped"}`; see the module docstring for
    skipped queries and ties.
    """
    _check_k(k)
    relevant_sets = {str(q): {str(d) for d in ids} for q, ids in relevant.items()}
    relevant_sets = {q: ids for q, ids in relevant_sets.items() if ids}
    all_queries = {str(q) for q in rankings} | {str(q) for q in relevant}
    ranked = {str(q): [str(d) for d in ids] for q, ids in rankings.items()}
    rr, recall = [], []
    for q in sorted(relevant_sets):
        ids = ranked.get(q, [])
        rr.append(reciprocal_rank(ids, relevant_sets[q]))
        recall.append(recall_at_k(ids, relevant_sets[q], k))
    n = len(rr)
    return {
        "mrr": math.fsum(rr) / n if n else None,
        recall_key(k): math.fsum(recall) / n if n else None,
        "num_queries": n,
        "num_skipped": len(all_queries) - n,
    }


_KFP_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def kfp_metric_name(*parts: str) -> str:
    """A KFP metric name from name parts: joined by `_`, `@` → `-at-`, other odd chars → `-`."""
    return "_".join(_KFP_UNSAFE.sub("-", p.replace("@", "-at-")) for p in parts)


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def kfp_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json flattened for a KFP Metrics artifact: `multi-stage_mrr`, `bm25_recall-at-10`.

    Per-method numbers become `METHOD_NAME`, top-level numbers keep their (sanitised) name;
    None, NaN, infinities, booleans and strings are left out because KFP logs floats only.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "methods":
            if not isinstance(value, Mapping):
                raise MetricsError("metrics['methods'] must map method names to metric dicts")
            for method, per_method in value.items():
                for name, number in per_method.items():
                    _put(flat, kfp_metric_name(str(method), str(name)), number)
            continue
        _put(flat, kfp_metric_name(str(key)), value)
    return flat


def _put(flat: dict[str, float], name: str, value: Any) -> None:
    scalar = _scalar(value)
    if scalar is None:
        return
    if name in flat:
        raise MetricsError(f"two metrics map to the same KFP metric name {name!r}")
    flat[name] = scalar
