"""Node `lookup` (CPU or GPU): preconditioned queries against the corpus index, top-C candidates.

No model and no pass over the corpus: matmuls with the stored factors. The candidates are
approximate where the index rank is below the documents' gradient rank; `score-corpus
--candidates` rescores exactly the union of them, so the final top-k is exact wherever the
candidates hold it. BM25's top-C (the paper's pre-filter) can stand in for the index's, or
join them: lexical matches the index ranks low still get their exact score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pyarrow as pa

from msif.config import LookupOptions, add_options, from_namespace
from msif.errors import MismatchError, MsifError
from msif.nodes import runtime

NAME = "lookup"
log = logging.getLogger("msif")
CANDIDATES_FILE = "candidates.parquet"
SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("index_score", pa.float64()),  # null: a BM25 candidate the index did not propose
        ("index_rank", pa.int32()),
        ("bm25_rank", pa.int32()),  # null: not among BM25's top-C
    ]
)


def add_parser(sub) -> None:
    """`msif lookup`."""
    p = runtime.subparser(
        sub,
        NAME,
        "score queries against the corpus index; keep the top-C candidates",
        "Multi-stage and gradient-dot queries (their corpus side is θ_pt) against every\n"
        "shard of `msif index`; writes candidates.parquet for `score-corpus --candidates`.",
    )
    p.add_argument("--index", nargs="+", help="every shard's index output")
    p.add_argument("--preconditioned", required=True, help="the precondition-queries output")
    p.add_argument(
        "--pt-factors", help="the pre-train factors the index was built with (projected tier)"
    )
    p.add_argument("--bm25", help="the bm25 output, for --candidates-from bm25 or both")
    runtime.add_out_argument(p, "where the candidates go")
    add_options(p, LookupOptions)
    p.set_defaults(
        run=lambda a: run(
            a.index,
            a.preconditioned,
            a.out,
            from_namespace(LookupOptions, a),
            pt_factors_uri=a.pt_factors,
            bm25_uri=a.bm25,
        )
    )


def check_shards(infos: Sequence[dict]) -> None:
    """Refuse index shards of different corpora or shardings, and an incomplete set."""
    if len({i.get("corpus_fingerprint") for i in infos}) != 1:
        raise MismatchError("the index shards come from different corpora")
    if len({i.get("num_shards") for i in infos}) != 1:
        raise MismatchError("the index shards come from different shardings")
    settings = ("tier", "rank", "values_per_document", "index_whitening", "index_dtype")
    if len({tuple(i.get(k) for k in settings) for i in infos}) != 1:
        raise MismatchError("the index shards were built with different compression settings")
    total, seen = infos[0]["num_shards"], sorted(i.get("shard") for i in infos)
    if len(seen) != len(set(seen)):
        raise MsifError(f"index shard {next(s for s in seen if seen.count(s) > 1)} given twice")
    missing = sorted(set(range(total)) - set(seen))
    if missing:
        raise MsifError(f"index shard {missing[0]} of {total} is missing")


@runtime.timed
def run(
    index_uris: Sequence[str] | None,
    preconditioned_uri: str,
    out_uri: str,
    lookup: LookupOptions,
    *,
    pt_factors_uri: str | None = None,
    bm25_uri: str | None = None,
) -> None:
    """Top-C candidates per query from the index shards (a projected index also needs the
    pre-train factors it was built in), from BM25's output, or both."""
    import pyarrow.parquet as pq

    from msif.attribution.precondition import PreconditionedQueries
    from msif.attribution.refine import refinement_id

    source = lookup.candidates_from
    if source != "bm25" and not index_uris:
        raise MsifError(f"--candidates-from {source} needs --index: every shard of msif index")
    if source != "index" and bm25_uri is None:
        raise MsifError(f"--candidates-from {source} needs --bm25: the bm25 node's output")
    index_uris = list(index_uris or []) if source != "bm25" else []
    bm25_uri = bm25_uri if source != "index" else None
    runtime.check_output(out_uri, *index_uris, preconditioned_uri, pt_factors_uri, bm25_uri)
    queries = PreconditionedQueries.load(runtime.input_dir(preconditioned_uri))
    found, info = {}, {"index": index_uris, "bm25": bm25_uri}
    if index_uris:
        found, index_info = _index_candidates(index_uris, queries, lookup.top_c, pt_factors_uri)
        info.update(index_info)
    bm25 = _bm25_candidates(bm25_uri, queries, lookup.top_c, info) if bm25_uri else {}
    rows = []
    for qid in queries.query_ids:
        listed = {doc: (score, rank) for rank, (doc, score) in enumerate(found.get(qid, []), 1)}
        ranks = bm25.get(qid, {})
        for doc in [*listed, *(d for d in ranks if d not in listed)]:
            score, rank = listed.get(doc, (None, None))
            rows.append((qid, doc, score, rank, ranks.get(doc)))
    table = pa.Table.from_pylist(
        [dict(zip(SCHEMA.names, r, strict=True)) for r in rows], schema=SCHEMA
    )
    info.update(
        {
            "node": NAME,
            "method": queries.method,
            "top_c": lookup.top_c,
            "candidates_from": source,
            "num_candidates": len({r[1] for r in rows}),
            "queries_fingerprint": queries.info.get("queries_fingerprint"),
            "refinement": refinement_id(queries.info),
        }
    )
    with runtime.published(out_uri, {"node": NAME, "method": queries.method}) as tmp:
        pq.write_table(table, tmp / CANDIDATES_FILE)
        runtime.write_json(tmp / "candidates.json", info)
    log.info(
        "%d candidates (top %d per query from %s) of %s documents",
        info["num_candidates"],
        lookup.top_c,
        source,
        info.get("num_docs", "the corpus's"),
    )


def _index_candidates(index_uris, queries, top_c: int, pt_factors_uri: str | None):
    """The index's top-C per query over every shard, and what the candidates' JSON says of it."""
    from msif.ekfac.factors import Factors
    from msif.ekfac.lambdas import eigenbasis_id
    from msif.index.lookup import check_pairing, load_index, top_candidates
    from msif.index.projected import ProjectedIndex, check_factors

    shards = [(uri, load_index(runtime.input_dir(uri))) for uri in index_uris]
    check_shards([ix.info for _, ix in shards])
    factors = None
    if any(isinstance(ix, ProjectedIndex) for _, ix in shards):
        if pt_factors_uri is None:
            raise MsifError("a projected index needs --pt-factors: those it was built with")
        factors = Factors.load(runtime.input_dir(pt_factors_uri), stage="pt")
    basis = eigenbasis_id(factors) if factors is not None else None
    for uri, ix in shards:  # every refusal before any work
        check_pairing(queries, ix, uri)
        if isinstance(ix, ProjectedIndex):
            check_factors(ix, factors, uri, basis)
    first = shards[0][1]
    return top_candidates(queries, shards, top_c, factors), {
        "num_docs": sum(ix.num_docs for _, ix in shards),
        "tier": first.info.get("tier"),
        "index_rank": first.info.get("rank"),
        "values_per_document": first.values_per_document(),
        "corpus_fingerprint": first.info.get("corpus_fingerprint"),
    }


def _bm25_candidates(uri: str, queries, top_c: int, info: dict) -> dict[str, dict[str, int]]:
    """BM25's top-C per query: query id → {doc id: BM25 rank}; refused when it ranks another
    corpus than the index's or lacks some of the queries."""
    import json

    import pyarrow.parquet as pq

    folder = runtime.input_dir(uri)
    if not (folder / "scores.parquet").exists():
        raise MsifError(f"{uri} holds no scores.parquet: give the bm25 node's output")
    meta = json.loads((folder / "scores.json").read_text())
    corpus = meta.get("corpus_fingerprint")
    if info.get("corpus_fingerprint") not in (None, corpus):
        raise MismatchError(f"{uri} ranks another corpus than the index holds")
    table = pq.read_table(folder / "scores.parquet", columns=["query_id", "doc_id", "rank"])
    out: dict[str, dict[str, int]] = {}
    for qid, doc, rank in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
        if rank <= top_c:
            out.setdefault(qid, {})[doc] = rank
    missing = [q for q in queries.query_ids if q not in out]
    if missing:
        raise MismatchError(f"{uri} ranks other queries: it lacks {missing[0]!r}")
    if meta.get("top_k", top_c) < top_c:
        log.warning("bm25 kept its top %d per query, fewer than --top-c %d", meta["top_k"], top_c)
    info.update({"corpus_fingerprint": corpus, "bm25_top_k": meta.get("top_k")})
    return out
