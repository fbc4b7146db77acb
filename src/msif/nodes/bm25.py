"""Node `bm25` (CPU): the BM25 text baseline, written like one shard of score-corpus."""

from __future__ import annotations

import numpy as np

from msif.config import Bm25Options, DataOptions, add_options, from_namespace
from msif.nodes import runtime

NAME = "bm25"
# Text nodes tokenise nothing: --append-eos does not apply.
TEXT_ONLY = ("append_eos",)


def add_parser(sub) -> None:
    """`msif bm25`."""
    p = runtime.subparser(
        sub,
        NAME,
        "BM25 baseline scores (text only)",
        "Score the corpus text against each query's prompt and completion with BM25; the\n"
        "output has the score-corpus format (shard 0 of 1). Needs no model and no factors.",
    )
    p.add_argument("--corpus", required=True, help="the corpus: id and text")
    p.add_argument("--queries", required=True, help="queries: id, prompt, completion or messages")
    runtime.add_out_argument(p, "where the scores go")
    add_options(p, Bm25Options)
    add_options(p, DataOptions, skip=TEXT_ONLY)
    p.set_defaults(
        run=lambda a: run(
            a.corpus,
            a.queries,
            a.out,
            from_namespace(Bm25Options, a),
            from_namespace(DataOptions, a),
        )
    )


@runtime.timed
def run(
    corpus_uri: str,
    queries_uri: str,
    out_uri: str,
    options: Bm25Options,
    data: DataOptions | None = None,
) -> None:
    """BM25 baseline over the corpus text, written in the shard-scores format (shard 0 of 1)."""
    import pyarrow.parquet as pq

    from msif.attribution.topk import TopK
    from msif.data.tables import iter_texts
    from msif.evaluation.bm25 import BM25Index

    runtime.check_output(out_uri, corpus_uri, queries_uri)
    data = data or DataOptions()
    source = runtime.open_table(corpus_uri, data)
    ids, texts = [], []
    for batch_ids, batch_texts in iter_texts(source, opts=data.table(512)):
        ids += batch_ids
        texts += batch_texts
    table = runtime.read_queries(queries_uri, data)
    index = BM25Index.build(ids, texts)
    qids = table.ids
    # The query text is the prompt and the completion (a chat query: its whole conversation).
    prompts, completions = table.texts()
    texts_q = [f"{p} {c}" for p, c in zip(prompts, completions, strict=True)]
    topk = TopK(options.top_k, len(qids))
    topk.update(np.stack([index.score(t) for t in texts_q]), ids)
    meta = {"node": NAME, "method": "bm25", "shard": 0, "num_shards": 1}
    with runtime.published(out_uri, meta) as tmp:
        pq.write_table(topk.to_table(qids), tmp / "scores.parquet")
        info = {
            **meta,
            "corpus": corpus_uri,
            "corpus_fingerprint": source.fingerprint(),
            "queries_fingerprint": runtime.table_fingerprint(table.canonical()),
            "num_docs": len(ids),
            "top_k": options.top_k,
            "modules": [],
            "left_out": {},
        }
        runtime.write_json(tmp / "scores.json", info)
