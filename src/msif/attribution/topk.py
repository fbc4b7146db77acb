"""Streaming top-k per query, and the merge of shards' top-k tables into a global top-k.

Order everywhere: higher score first, equal scores by ascending doc id (code-point order, which
is also the byte order of UTF-8 that pyarrow sorts by). Because TopK and merge_topk use the
same total order, merging the shards' top-k lists gives exactly the top-k of the whole corpus,
whatever the sharding and the batch sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msif.errors import DataError

SCORE_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("score", pa.float32()),
        ("rank", pa.int32()),
        ("tokens", pa.list_(pa.string())),
        ("token_scores", pa.list_(pa.float32())),
    ]
)


# One row per (method, query, rank) of the merged rankings that `rank` writes and the report reads.
RANKING_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("query_id", pa.string()),
        ("rank", pa.int32()),
        ("doc_id", pa.string()),
        ("score", pa.float32()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.string())),
        ("token_scores", pa.list_(pa.float32())),
        ("relevant", pa.bool_()),
    ]
)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"top-k needs k >= 1, got {k!r}")


def _first_duplicate(ids: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for d in ids:
        if d in seen:
            return d
        seen.add(d)
    return None


@dataclass
class TopK:
    """The k highest scores per query over a stream of (num_queries, batch) score blocks.

    Optional per-document `extras` (e.g. the tokenised example) are kept exactly as long as the
    document is in some query's top-k, so memory stays O(num_queries · k) however long the
    stream. A doc id seen again is refused when the new copy would enter a top-k list that
    holds (or held until this batch) the first; streaming cannot afford to remember every id.
    """

    k: int
    num_queries: int
    _scores: list[np.ndarray] = field(init=False, repr=False)
    _ids: list[np.ndarray] = field(init=False, repr=False)
    _floor: np.ndarray = field(init=False, repr=False)
    _refs: dict[str, int] = field(init=False, repr=False, default_factory=dict)
    _extras: dict[str, Any] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        _check_k(self.k)
        if self.num_queries < 0:
            raise DataError(f"TopK needs num_queries >= 0, got {self.num_queries}")
        self._scores = [np.empty(0, np.float64) for _ in range(self.num_queries)]
        self._ids = [np.empty(0, dtype=str) for _ in range(self.num_queries)]
        # Score a new document must reach to enter a query's list (-inf while not yet full).
        self._floor = np.full(self.num_queries, -np.inf)

    def update(
        self, scores: np.ndarray, doc_ids: Sequence[str], extras: Sequence[Any] | None = None
    ) -> None:
        """Merge a (num_queries, len(doc_ids)) block of scores; extras align with doc_ids."""
        block = np.asarray(scores, dtype=np.float64)
        names = [str(d) for d in doc_ids]
        self._check_block(block, names, extras)
        # Ties with the floor may still win on doc id, hence >=.
        candidates = block >= self._floor[:, None]
        names_arr = np.asarray(names, dtype=str)
        changed = False
        for q in np.flatnonzero(candidates.any(axis=1)):
            mask = candidates[q]
            changed |= self._merge(int(q), block[q, mask], names_arr[mask])
        if extras is not None:
            for name, extra in zip(names, extras, strict=True):
                if name in self._refs:
                    self._extras[name] = extra
        if changed:
            for name in [n for n in self._extras if n not in self._refs]:
                del self._extras[name]

    def _check_block(
        self, block: np.ndarray, names: list[str], extras: Sequence[Any] | None
    ) -> None:
        if block.shape != (self.num_queries, len(names)):
            raise DataError(
                f"score block has shape {block.shape}, expected "
                f"({self.num_queries}, {len(names)}) for {len(names)} doc ids"
            )
        if np.isnan(block).any():
            raise DataError("score block contains NaN; the scores of this batch are unusable")
        if extras is not None and len(extras) != len(names):
            raise DataError(f"got {len(extras)} extras for {len(names)} doc ids")
        dup = _first_duplicate(names)
        if dup is not None:
            raise DataError(f"doc id {dup!r} occurs twice in one batch")

    def _merge(self, q: int, new_scores: np.ndarray, new_ids: np.ndarray) -> bool:
        old_ids = self._ids[q]
        n_old = len(old_ids)
        s = np.concatenate([self._scores[q], new_scores])
        d = np.concatenate([old_ids, new_ids])
        keep = np.lexsort((d, -s))[: self.k]
        entering = d[keep[keep >= n_old]].tolist()
        if not entering:
            return False
        old = set(old_ids.tolist())
        dup = next((name for name in entering if name in old), None)
        if dup is not None:
            raise DataError(f"doc id {dup!r} was scored twice; doc ids must be unique")
        stays = np.zeros(n_old, bool)
        stays[keep[keep < n_old]] = True
        for name in entering:
            self._refs[name] = self._refs.get(name, 0) + 1
        for name in old_ids[~stays].tolist():
            self._refs[name] -= 1
            if not self._refs[name]:
                del self._refs[name]
        self._scores[q], self._ids[q] = s[keep], d[keep]
        if len(keep) == self.k:
            self._floor[q] = s[keep[-1]]
        return True

    def rows(self, q: int) -> list[tuple[str, float]]:
        """(doc_id, score) of query q, best first."""
        return list(zip(self._ids[q].tolist(), self._scores[q].tolist(), strict=True))

    def kept_ids(self) -> set[str]:
        """Doc ids in at least one query's top-k."""
        return set(self._refs)

    def extra(self, doc_id: str) -> Any:
        """The extra given with a kept document; KeyError if it was not kept or had none."""
        return self._extras[doc_id]

    def to_table(
        self,
        query_ids: Sequence[str],
        tokens: Mapping[str, Sequence[str]] | None = None,
        token_scores: Mapping[tuple[str, str], Sequence[float]] | None = None,
    ) -> pa.Table:
        """The `scores.parquet` table; tokens by doc id, token_scores by (query_id, doc_id).

        A row gets its tokens only when it also has token scores (a document is explained per
        query), and both lists must have the same length.
        """
        if len(query_ids) != self.num_queries:
            raise DataError(f"got {len(query_ids)} query ids for {self.num_queries} queries")
        tokens, token_scores = tokens or {}, token_scores or {}
        cols: dict[str, list] = {name: [] for name in SCORE_SCHEMA.names}
        for q, qid in enumerate(query_ids):
            for rank, (doc_id, score) in enumerate(self.rows(q), start=1):
                ts = list(token_scores.get((str(qid), doc_id), []))
                toks = list(tokens.get(doc_id, [])) if ts else []
                if len(toks) != len(ts):
                    raise DataError(
                        f"document {doc_id!r}: {len(toks)} tokens but {len(ts)} token scores"
                    )
                for name, value in zip(
                    SCORE_SCHEMA.names, (str(qid), doc_id, score, rank, toks, ts), strict=True
                ):
                    cols[name].append(value)
        return pa.table(cols, schema=SCORE_SCHEMA)


def _conform(table: pa.Table, i: int) -> pa.Table:
    missing = [n for n in SCORE_SCHEMA.names if n not in table.column_names]
    if missing:
        raise DataError(f"score table {i} lacks column(s) {', '.join(missing)}")
    try:
        return table.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise DataError(f"score table {i} does not fit the scores schema: {exc}") from exc


def _check_table(table: pa.Table) -> None:
    for name in ("query_id", "doc_id", "score"):
        if table.column(name).null_count:
            raise DataError(f"score tables hold a null {name}")
    if pc.any(pc.is_nan(table.column("score"))).as_py():
        raise DataError("score tables hold a NaN score")
    n_tok = pc.fill_null(pc.list_value_length(table.column("tokens")), 0)
    n_ts = pc.fill_null(pc.list_value_length(table.column("token_scores")), 0)
    if pc.any(pc.not_equal(n_tok, n_ts)).as_py():
        raise DataError("score tables hold a row whose tokens and token_scores differ in length")


def merge_topk(tables: Sequence[pa.Table], k: int) -> pa.Table:
    """Merge shards' top-k score tables into the global top-k per query, ranks renumbered 1..k.

    Queries keep the order of their first appearance; a (query, doc) pair found in two tables
    means overlapping shards and is refused.
    """
    _check_k(k)
    if not tables:
        raise DataError("no score tables to merge")
    table = pa.concat_tables([_conform(t, i) for i, t in enumerate(tables)]).combine_chunks()
    _check_table(table)
    _check_unique_pairs(table)
    if table.num_rows == 0:
        return table
    # Dictionary indices number the queries by first appearance.
    qpos = pc.dictionary_encode(table.column("query_id")).combine_chunks().indices
    keyed = table.append_column("_qpos", qpos)
    order = pc.sort_indices(
        keyed,
        sort_keys=[("_qpos", "ascending"), ("score", "descending"), ("doc_id", "ascending")],
    )
    q = qpos.to_numpy()[order.to_numpy()]
    new_group = np.r_[True, q[1:] != q[:-1]]
    starts = np.flatnonzero(new_group)
    rank = np.arange(len(q)) - np.repeat(starts, np.diff(np.r_[starts, len(q)])) + 1
    keep = rank <= k
    out = table.take(pa.array(order.to_numpy()[keep]))
    return out.set_column(
        SCORE_SCHEMA.get_field_index("rank"), "rank", pa.array(rank[keep], pa.int32())
    )


def _check_unique_pairs(table: pa.Table) -> None:
    counts = table.group_by(["query_id", "doc_id"]).aggregate([("score", "count")])
    twice = counts.filter(pc.greater(counts.column("score_count"), 1))
    if twice.num_rows:
        doc, query = twice.column("doc_id")[0].as_py(), twice.column("query_id")[0].as_py()
        raise DataError(f"document {doc!r} appears twice for query {query!r} (overlapping shards?)")
