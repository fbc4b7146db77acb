"""Node `lookup` (CPU or GPU): preconditioned queries against the corpus index, top-C candidates.

No model and no pass over the corpus: matmuls with the stored factors. The candidates are
approximate where the index rank is below the documents' gradient rank; `score-corpus
--candidates` rescores exactly the union of them, so the final top-k is exact wherever the
candidates hold it.
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
        ("index_score", pa.float64()),
        ("index_rank", pa.int32()),
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
    p.add_argument("--index", nargs="+", required=True, help="every shard's index output")
    p.add_argument("--preconditioned", required=True, help="the precondition-queries output")
    p.add_argument(
        "--pt-factors", help="the pre-train factors the index was built with (projected tier)"
    )
    runtime.add_out_argument(p, "where the candidates go")
    add_options(p, LookupOptions)
    p.set_defaults(
        run=lambda a: run(
            a.index,
            a.preconditioned,
            a.out,
            from_namespace(LookupOptions, a),
            pt_factors_uri=a.pt_factors,
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
    index_uris: Sequence[str],
    preconditioned_uri: str,
    out_uri: str,
    lookup: LookupOptions,
    *,
    pt_factors_uri: str | None = None,
) -> None:
    """Top-C candidates per query over every index shard (a projected index also needs the
    pre-train factors it was built in)."""
    import pyarrow.parquet as pq

    from msif.attribution.precondition import PreconditionedQueries
    from msif.ekfac.factors import Factors
    from msif.ekfac.lambdas import eigenbasis_id
    from msif.index.lookup import check_pairing, load_index, top_candidates
    from msif.index.projected import ProjectedIndex, check_factors

    runtime.check_output(out_uri, index_uris, preconditioned_uri, pt_factors_uri)
    queries = PreconditionedQueries.load(runtime.input_dir(preconditioned_uri))
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
    candidates = top_candidates(queries, shards, lookup.top_c, factors)
    rows = [
        (qid, doc, score, rank)
        for qid, found in candidates.items()
        for rank, (doc, score) in enumerate(found, start=1)
    ]
    table = pa.Table.from_pylist(
        [dict(zip(SCHEMA.names, r, strict=True)) for r in rows], schema=SCHEMA
    )
    first = shards[0][1]
    info = {
        "node": NAME,
        "method": queries.method,
        "top_c": lookup.top_c,
        "num_docs": sum(ix.num_docs for _, ix in shards),
        "num_candidates": len({r[1] for r in rows}),
        "index": list(index_uris),
        "tier": first.info.get("tier"),
        "index_rank": first.info.get("rank"),
        "values_per_document": first.values_per_document(),
        "corpus_fingerprint": first.info.get("corpus_fingerprint"),
        "queries_fingerprint": queries.info.get("queries_fingerprint"),
    }
    with runtime.published(out_uri, {"node": NAME, "method": queries.method}) as tmp:
        pq.write_table(table, tmp / CANDIDATES_FILE)
        runtime.write_json(tmp / "candidates.json", info)
    log.info(
        "%d candidates (top %d per query) of %d indexed documents",
        info["num_candidates"],
        lookup.top_c,
        info["num_docs"],
    )
