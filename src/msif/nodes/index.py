"""Node `index` (GPU): one corpus shard's gradients at θ_pt, factored, for lookups without a scan.

Built once per pre-trained model and corpus; it serves every later fine-tune of that model
and every query (multi-stage and gradient-dot score against θ_pt's corpus gradients).
"""

from __future__ import annotations

import logging

from msif.config import DataOptions, IndexOptions, ModelOptions, add_options, from_namespace
from msif.nodes import runtime

NAME = "index"
log = logging.getLogger("msif")
# λ of the whitening metric, relative to each module's mean Λ: the queries' default damping.
WHITENING_DAMPING = 0.1


def add_parser(sub) -> None:
    """`msif index`."""
    p = runtime.subparser(
        sub,
        NAME,
        "index one corpus shard: each document's gradient at θ_pt, factored",
        "One forward and backward pass per batch at θ_pt. Factored tier: per document and\n"
        "module the top-r singular triplets of its gradient (exact at full rank); projected\n"
        "tier: a fixed number of values, its top triplets in the pre-train eigenbasis cut to\n"
        "their largest entries. `msif lookup` scores queries against it;\n"
        "`score-corpus --candidates` reranks what it found, exactly.",
    )
    p.add_argument("--model", required=True, help="the pre-trained model θ_pt")
    runtime.add_base_model_argument(p)
    p.add_argument("--corpus", required=True, help="id and text (Parquet, datasets, JSON Lines)")
    p.add_argument(
        "--pt-factors", required=True, help="pre-train factors: their modules are indexed"
    )
    runtime.add_shard_arguments(p)
    runtime.add_out_argument(p, "where the shard's index goes")
    add_options(p, IndexOptions)
    add_options(p, ModelOptions)
    add_options(p, DataOptions)
    p.set_defaults(
        run=lambda a: run(
            a.model,
            a.corpus,
            a.pt_factors,
            a.shard,
            a.num_shards,
            a.out,
            from_namespace(ModelOptions, a),
            from_namespace(IndexOptions, a),
            from_namespace(DataOptions, a),
            base_model_uri=a.base_model,
        )
    )


@runtime.timed
def run(
    model_uri: str,
    corpus_uri: str,
    pt_factors_uri: str,
    shard: int,
    num_shards: int,
    out_uri: str,
    options: ModelOptions,
    indexing: IndexOptions,
    data: DataOptions | None = None,
    *,
    base_model_uri: str | None = None,
) -> None:
    """Index one corpus shard at θ_pt over the pre-train factors' modules."""
    import torch

    from msif.data.examples import batches, pad_id_of
    from msif.data.models import tokenizer_identity
    from msif.ekfac.factors import Damping, Factors
    from msif.index.factored import build_index, whitening_metrics
    from msif.index.projected import build_projected_index

    runtime.check_output(out_uri, model_uri, corpus_uri, pt_factors_uri, base_model_uri)
    data = data or DataOptions()
    corpus = runtime.open_table(corpus_uri, data)
    key = runtime.inputs_key(
        model=runtime.model_key(model_uri, base_model_uri),
        corpus=corpus.fingerprint(),
        factors=runtime.artifact_digest(pt_factors_uri),
        shard=shard,
        num_shards=num_shards,
        indexing=vars(indexing),
        options=options.recorded(),
        data=data.recorded(),
    )
    if runtime.already_complete(out_uri, key):
        return
    model, tokenizer, options = runtime.load_stage_model(model_uri, options, base_model_uri)
    # Factors.load with the model refuses a θ_pt that is not the one they were fitted at.
    factors = Factors.load(runtime.input_dir(pt_factors_uri), model=model, stage="pt")
    runtime.check_tokenizer(factors.info.get("tokenizer"), tokenizer, pt_factors_uri)
    examples, source, rows = runtime.shard_examples(
        model, tokenizer, corpus_uri, shard, num_shards, options, data, corpus=True, source=corpus
    )
    stream = batches(examples, options.batch_size, pad_id_of(tokenizer))
    dtype = getattr(torch, indexing.index_dtype)
    if indexing.index_tier == "projected":
        rule = Damping(WHITENING_DAMPING)
        index = build_projected_index(
            model,
            stream,
            factors,
            indexing.index_values,
            indexing.index_whitening,
            {n: factors.damping_for(n, rule) for n in factors.specs},
            rank=indexing.rank,
            dtype=dtype,
            progress=options.progress,
        )
    else:
        index = build_index(
            model,
            stream,
            factors.specs,
            indexing.rank,
            dtype=dtype,
            progress=options.progress,
            metrics=whitening_metrics(factors, indexing.index_whitening, WHITENING_DAMPING),
        )
    meta = {"node": NAME, "shard": shard, "num_shards": num_shards, "inputs": key}
    index.info.update(
        {
            **meta,
            "corpus": corpus_uri,
            "corpus_fingerprint": source.fingerprint(),
            "rows": list(rows),
            "model": model_uri,
            "tokenizer": tokenizer_identity(tokenizer),
            "max_length": options.max_length,
            "tier": indexing.index_tier,
            "rank": indexing.rank,
            "index_dtype": indexing.index_dtype,
            "index_whitening": indexing.index_whitening,
            "whitening_damping_factor": WHITENING_DAMPING,
            "values_per_document": index.values_per_document(),
            "data_options": data.recorded(),
        }
    )
    with runtime.published(out_uri, meta) as tmp:
        index.save(tmp)
    log.info(
        "indexed %d documents of shard %d/%d, %s tier (%d values each)",
        index.num_docs,
        shard,
        num_shards,
        indexing.index_tier,
        index.values_per_document(),
    )
