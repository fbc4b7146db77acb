"""Node `score-corpus` (GPU): score one corpus shard against preconditioned queries."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from msif.config import DataOptions, ModelOptions, ScoreOptions, add_options, from_namespace
from msif.data.examples import Example
from msif.nodes import runtime

NAME = "score-corpus"
log = logging.getLogger("msif")
# What an entry of token_scores is: the part of the score from predicting that token (the
# split by predicted token, msif.attribution.explain), recorded in scores.json.
TOKEN_SCORES = "predicted-token"
FULL_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float32())]
)


def add_parser(sub) -> None:
    """`msif score-corpus`."""
    p = runtime.subparser(
        sub,
        NAME,
        "score one corpus shard against preconditioned queries",
        "One forward and backward pass per batch at the corpus model, no stored per-example\n"
        "gradient; keeps the top-k documents per query, with per-token scores for the best.\n"
        "Needs θ_pt for multi-stage and gradient-dot queries, θ_ft for single-stage.",
    )
    p.add_argument(
        "--model", required=True, help="θ_pt (multi-stage, gradient-dot), θ_ft (single-stage)"
    )
    runtime.add_base_model_argument(p)
    p.add_argument(
        "--corpus",
        required=True,
        help="id and text or input_ids (Parquet, datasets folder, JSON Lines)",
    )
    p.add_argument("--preconditioned", required=True, help="the precondition-queries output")
    p.add_argument(
        "--candidates",
        help="score only these documents: a lookup output (the index's candidates) or a bm25 "
        "output (its top-k), for an exact rerank",
    )
    runtime.add_shard_arguments(p)
    runtime.add_out_argument(p, "where the shard's scores go")
    add_options(p, ScoreOptions)
    add_options(p, ModelOptions)
    add_options(p, DataOptions)
    p.set_defaults(
        run=lambda a: run(
            a.model,
            a.corpus,
            a.preconditioned,
            a.shard,
            a.num_shards,
            a.out,
            from_namespace(ModelOptions, a),
            from_namespace(ScoreOptions, a),
            from_namespace(DataOptions, a),
            base_model_uri=a.base_model,
            candidates_uri=a.candidates,
        )
    )


@runtime.timed
def run(
    model_uri: str,
    corpus_uri: str,
    preconditioned_uri: str,
    shard: int,
    num_shards: int,
    out_uri: str,
    options: ModelOptions,
    scoring: ScoreOptions,
    data: DataOptions | None = None,
    *,
    base_model_uri: str | None = None,
    candidates_uri: str | None = None,
) -> None:
    """Score one corpus shard against the preconditioned queries; keep the top-k per query.

    candidates_uri: score only the documents a lookup (or bm25) output names.
    """
    import pyarrow.parquet as pq

    from msif.attribution.precondition import PreconditionedQueries
    from msif.attribution.refine import refinement_id
    from msif.attribution.scoring import iter_scores
    from msif.attribution.topk import TopK
    from msif.data.examples import batches, pad_id_of

    runtime.check_output(
        out_uri, model_uri, corpus_uri, preconditioned_uri, base_model_uri, candidates_uri
    )
    data = data or DataOptions()
    corpus = runtime.open_table(corpus_uri, data)
    wanted = candidate_ids(candidates_uri, corpus.fingerprint()) if candidates_uri else None
    # A rerun after a lost pod skips a shard whose complete output came from the same inputs:
    # the same contents, not only the same names.
    key = runtime.inputs_key(
        model=runtime.model_key(model_uri, base_model_uri),
        corpus=corpus.fingerprint(),
        queries=runtime.artifact_digest(preconditioned_uri),
        shard=shard,
        num_shards=num_shards,
        scoring=vars(scoring),
        options=options.recorded(),
        data=data.recorded(),
        candidates=runtime.artifact_digest(candidates_uri) if candidates_uri else None,
        token_scores=TOKEN_SCORES,
    )
    if runtime.already_complete(out_uri, key):
        return
    queries = PreconditionedQueries.load(runtime.input_dir(preconditioned_uri))
    if candidates_uri:
        check_candidate_refinement(candidates_uri, queries)
    model, tokenizer, options = runtime.load_stage_model(model_uri, options, base_model_uri)
    runtime.check_tokenizer(
        queries.info.get("corpus_tokenizer"), tokenizer, f"the queries of {preconditioned_uri}"
    )
    examples, source, rows = runtime.shard_examples(
        model, tokenizer, corpus_uri, shard, num_shards, options, data, corpus=True, source=corpus
    )
    if wanted is not None:
        examples = (e for e in examples if e.id in wanted)
    pending: list[Example] = []
    topk = TopK(scoring.top_k, queries.num_queries)
    paths: dict[str, str] = {}
    num_docs = 0
    meta = {
        "node": NAME,
        "method": queries.method,
        "shard": shard,
        "num_shards": num_shards,
        "inputs": key,
    }
    with runtime.published(out_uri, meta) as tmp:
        writer = (
            pq.ParquetWriter(tmp / "full_scores.parquet", FULL_SCHEMA) if scoring.full else None
        )
        stream = batches(_tracked(examples, pending), options.batch_size, pad_id_of(tokenizer))
        for bs in iter_scores(
            model,
            stream,
            queries,
            path=scoring.contraction,
            progress=options.progress,
            paths_used=paths,
            to_host=True,
        ):
            values = bs.scores.double().numpy()
            # The examples are kept only while they are in some query's top-k.
            topk.update(values, bs.ids, extras=pending[: len(bs.ids)])
            del pending[: len(bs.ids)]
            num_docs += len(bs.ids)
            if writer is not None:
                writer.write_table(_full_rows(queries.query_ids, bs.ids, values))
        if writer is not None:
            writer.close()
        explained = _explain(model, tokenizer, queries, topk, scoring.explain_k, options)
        table = topk.to_table(queries.query_ids, explained.tokens, explained.scores)
        pq.write_table(table, tmp / "scores.parquet")
        info = {
            **meta,
            "corpus": corpus_uri,
            "corpus_fingerprint": source.fingerprint(),
            "queries_fingerprint": queries.info.get("queries_fingerprint"),
            "refinement": refinement_id(queries.info),
            "num_docs": num_docs,
            "rows": list(rows),
            "top_k": scoring.top_k,
            "token_scores": TOKEN_SCORES,
            "modules": sorted(paths),
            "paths": paths,
            "left_out": queries.left_out,
            "damping": queries.damping,
            "alpha": queries.info.get("alpha"),
            "rank": queries.rank,
            "model": model_uri,
            "data_options": data.recorded(),
            "candidates": candidates_uri,
            "num_candidates": None if wanted is None else len(wanted),
        }
        runtime.write_json(tmp / "scores.json", info)
    log.info("scored %d documents of shard %d/%d (%s)", num_docs, shard, num_shards, queries.method)


def candidate_ids(uri: str, corpus_fingerprint: str) -> set[str]:
    """Document ids a lookup output (candidates.parquet) or bm25 output (scores.parquet)
    names; refused when it was made for another corpus."""
    import json

    import pyarrow.parquet as pq

    from msif.errors import MismatchError, MsifError

    folder = runtime.input_dir(uri)
    for table, info in (
        ("candidates.parquet", "candidates.json"),
        ("scores.parquet", "scores.json"),
    ):
        if (folder / table).exists():
            recorded = json.loads((folder / info).read_text()).get("corpus_fingerprint")
            if recorded is not None and recorded != corpus_fingerprint:
                raise MismatchError(f"the candidates of {uri} are documents of another corpus")
            return set(pq.read_table(folder / table, columns=["doc_id"])["doc_id"].to_pylist())
    raise MsifError(f"{uri} holds no candidates.parquet (lookup) or scores.parquet (bm25)")


def check_candidate_refinement(uri: str, queries) -> None:
    """Refuse a lookup's candidates found by queries refined otherwise (K, sample, seed)
    than the queries that rerank them; bm25 candidates involve no queries' refinement."""
    import json

    from msif.attribution.refine import refinement_id
    from msif.errors import MismatchError

    sidecar = runtime.input_dir(uri) / "candidates.json"
    if not sidecar.exists():
        return
    found = json.loads(sidecar.read_text()).get("refinement")
    ours = refinement_id(queries.info)
    if found != ours:
        raise MismatchError(
            f"the candidates of {uri} were looked up with queries refined otherwise "
            f"({found or 'EK-FAC alone'}) than these ({ours or 'EK-FAC alone'}): "
            "look up with the queries you rerank with"
        )


@dataclass
class _Explained:
    """Token strings and per-token scores of the documents shown in reports."""

    tokens: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[tuple[str, str], list[float]] = field(default_factory=dict)


def _explain(model, tokenizer, queries, topk, explain_k: int, options: ModelOptions) -> _Explained:
    from msif.attribution.explain import predicted_token_scores
    from msif.data.examples import pad_id_of

    # One forward-mode pass over only the documents the report will show, each query's own.
    shown = [(q, d, s) for q in range(topk.num_queries) for d, s in topk.rows(q)[:explain_k]]
    pairs = [(q, topk.extra(d)) for q, d, _ in shown]
    values = predicted_token_scores(
        model, pairs, queries, batch_size=options.batch_size, pad_id=pad_id_of(tokenizer)
    )
    out = _Explained()
    tolerance = sum_tolerance(next(model.parameters()).dtype)
    for (q, doc_id, score), (_, example), token_scores in zip(shown, pairs, values, strict=True):
        qid = queries.query_ids[q]
        check_token_sum(token_scores, score, tolerance, f"document {doc_id!r} on query {qid!r}")
        out.tokens[doc_id] = tokenizer.convert_ids_to_tokens(example.input_ids)
        out.scores[(qid, doc_id)] = token_scores
    return out


def sum_tolerance(dtype) -> float:
    """How far, relative to the document's scale, per-token scores may sum from its score:
    the two passes round differently, by ~1e-6 in float32 and ~1e-2 in half precision."""
    import torch

    return 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def check_token_sum(token_scores: list[float], score: float, tolerance: float, what: str) -> None:
    """Refuse per-token scores that do not sum to the document's score (a wrong direction).

    The scale is max(|score|, Σ|s_i|): a score near 0 may be the sum of large terms.
    """
    import math

    from msif.errors import MsifError

    total = math.fsum(token_scores)
    scale = max(abs(score), math.fsum(abs(v) for v in token_scores), 1e-30)
    if not math.isfinite(total) or abs(total - score) > tolerance * scale:
        raise MsifError(
            f"per-token scores of {what} sum to {total:+.6e}, not to its score {score:+.6e} "
            f"(tolerance {tolerance:g} of {scale:.3e}): they are not the split of its score"
        )


def _tracked(stream: Iterator[Example], seen: list[Example]) -> Iterator[Example]:
    for e in stream:
        seen.append(e)
        yield e


def _full_rows(query_ids, doc_ids, values: np.ndarray) -> pa.Table:
    q = np.repeat(np.asarray(query_ids, dtype=object), len(doc_ids))
    d = np.tile(np.asarray(doc_ids, dtype=object), len(query_ids))
    return pa.table(
        [
            pa.array(q, pa.string()),
            pa.array(d, pa.string()),
            pa.array(values.reshape(-1), pa.float32()),
        ],
        schema=FULL_SCHEMA,
    )
