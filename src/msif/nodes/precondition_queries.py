"""Node `precondition-queries` (GPU): the queries' gradients at θ_ft, preconditioned per method."""

from __future__ import annotations

from msif.config import (
    DataOptions,
    ModelOptions,
    PreconditionOptions,
    add_options,
    from_namespace,
)
from msif.nodes import runtime

NAME = "precondition-queries"


def add_parser(sub) -> None:
    """`msif precondition-queries`."""
    p = runtime.subparser(
        sub,
        NAME,
        "precondition query gradients (fine-tuned model)",
        "Gradients of the queries' completion loss at θ_ft, preconditioned by\n"
        "(F_pt+λI)⁻¹(F_ft+αI)⁻¹ (multi-stage), (F_ft+λI)⁻¹ (single-stage) or nothing\n"
        "(gradient-dot). Needs the fine-tuned model, and the factors --method names.",
    )
    p.add_argument("--model", required=True, help="the fine-tuned model θ_ft")
    runtime.add_base_model_argument(p)
    p.add_argument(
        "--queries",
        required=True,
        help="queries: id, prompt, completion or messages (Parquet, datasets folder, JSON Lines)",
    )
    p.add_argument("--ft-factors", help="fine-tune factors (multi-stage, single-stage)")
    p.add_argument(
        "--pt-factors",
        help="pre-train factors (multi-stage; gradient-dot: only to check the corpus model)",
    )
    runtime.add_out_argument(p, "where the preconditioned queries go")
    add_options(p, PreconditionOptions)
    add_options(p, ModelOptions)
    add_options(p, DataOptions)
    p.set_defaults(
        run=lambda a: run(
            a.model,
            a.queries,
            a.out,
            from_namespace(ModelOptions, a),
            from_namespace(PreconditionOptions, a),
            ft_factors_uri=a.ft_factors,
            pt_factors_uri=a.pt_factors,
            data=from_namespace(DataOptions, a),
            base_model_uri=a.base_model,
        )
    )


@runtime.timed
def run(
    model_uri: str,
    queries_uri: str,
    out_uri: str,
    options: ModelOptions,
    precondition: PreconditionOptions,
    *,
    ft_factors_uri: str | None = None,
    pt_factors_uri: str | None = None,
    data: DataOptions | None = None,
    base_model_uri: str | None = None,
) -> None:
    """Precondition the queries' gradients at θ_ft for one method."""
    from msif.attribution.precondition import precondition_queries
    from msif.data.examples import batches, pad_id_of
    from msif.data.models import tokenizer_identity
    from msif.ekfac.factors import Damping, Factors

    method = precondition.method
    runtime.check_output(
        out_uri, model_uri, queries_uri, ft_factors_uri, pt_factors_uri, base_model_uri
    )
    data = data or DataOptions()
    model, tokenizer, options = runtime.load_stage_model(model_uri, options, base_model_uri)
    table = runtime.read_queries(queries_uri, data, options.max_length)
    ids = table.ids
    examples = table.examples(tokenizer, options.max_length)
    ft = (
        Factors.load(runtime.input_dir(ft_factors_uri), model=model, stage="ft")
        if ft_factors_uri and method != "gradient-dot"
        else None
    )
    # Gradient-dot applies no pre-train factors, but their fingerprint names θ_pt for scoring.
    pt = (
        Factors.load(runtime.input_dir(pt_factors_uri), stage="pt")
        if pt_factors_uri and method != "single-stage"
        else None
    )
    if ft is not None:
        runtime.check_tokenizer(ft.info.get("tokenizer"), tokenizer, ft_factors_uri)
    if pt is not None:  # θ_ft's tokenizer may append tokens to θ_pt's, no more
        runtime.check_tokenizer(pt.info.get("tokenizer"), tokenizer, pt_factors_uri, extends=True)
    queries = precondition_queries(
        model,
        batches(examples, options.batch_size, pad_id_of(tokenizer)),
        ids,
        method=method,
        ft_factors=ft,
        pt_factors=pt,
        alpha=precondition.alpha,
        damping=Damping(precondition.damping_factor, precondition.damping),
        rank=precondition.query_rank or None,
        modules=options.selection(),
        progress=options.progress,
    )
    queries.info.update(
        {
            "queries": queries_uri,
            "queries_fingerprint": runtime.table_fingerprint(table.canonical()),
            "data_options": data.recorded(),
            "model": model_uri,
            "tokenizer": tokenizer_identity(tokenizer),
            # what the corpus side must be tokenised with: θ_pt's when known
            "corpus_tokenizer": (pt.info.get("tokenizer") if pt is not None else None)
            or tokenizer_identity(tokenizer),
            "max_length": options.max_length,
        }
    )
    with runtime.published(out_uri, {"node": NAME, "method": method}) as tmp:
        queries.save(tmp)
