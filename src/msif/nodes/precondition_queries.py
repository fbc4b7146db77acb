"""Node `precondition-queries` (GPU): the queries' gradients at θ_ft, preconditioned per method."""

from __future__ import annotations

from dataclasses import dataclass

from msif.config import (
    DataOptions,
    ModelOptions,
    PreconditionOptions,
    add_options,
    from_namespace,
)
from msif.errors import MsifError
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
        "(gradient-dot). Needs the fine-tuned model, and the factors --method names.\n"
        "--refine-steps K > 0 refines each stage's inverse by K conjugate-gradient steps on\n"
        "the exact damped Gauss–Newton system (EK-FAC as preconditioner), on a seeded sample of\n"
        "that stage's data: --finetune-data (at --model), and for multi-stage --corpus at\n"
        "--pt-model too.",
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
    p.add_argument("--pt-model", help="the pre-trained model θ_pt (--refine-steps, multi-stage)")
    p.add_argument(
        "--corpus", help="the pre-training corpus, sampled by --refine-steps (multi-stage)"
    )
    p.add_argument(
        "--finetune-data",
        help="the fine-tuning data, sampled by --refine-steps (multi-stage, single-stage)",
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
            refine_data=RefineData(a.pt_model, a.corpus, a.finetune_data),
        )
    )


@dataclass(frozen=True)
class RefineData:
    """Where --refine-steps samples each stage's data: θ_pt with its corpus, and the
    fine-tuning data (at θ_ft, the node's own model). Unread when K = 0."""

    pt_model: str | None = None
    corpus: str | None = None
    finetune_data: str | None = None

    def uris(self) -> list[str | None]:
        """The inputs, for the output-placement checks."""
        return [self.pt_model, self.corpus, self.finetune_data]


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
    refine_data: RefineData | None = None,
) -> None:
    """Precondition the queries' gradients at θ_ft for one method (refined when asked)."""
    from msif.attribution.precondition import precondition_queries
    from msif.data.examples import batches, pad_id_of
    from msif.data.models import tokenizer_identity
    from msif.ekfac.factors import Damping, Factors

    method = precondition.method
    refine_data = refine_data or RefineData()
    runtime.check_output(
        out_uri,
        model_uri,
        queries_uri,
        ft_factors_uri,
        pt_factors_uri,
        base_model_uri,
        refine_data.uris(),
    )
    data = data or DataOptions()
    asked = precondition.refinement_flag
    refining = asked is not None and method != "gradient-dot"
    if refining:
        _check_refine_data(method, asked, refine_data)
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
    refine = (
        _refinement(model, tokenizer, options, precondition, data, refine_data, pt, method)
        if refining
        else None
    )
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
        refine=refine,
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


def _check_refine_data(method: str, asked: str, given: RefineData) -> None:
    """Refuse --refine-steps (or --refine-lanczos, the asked flag and value) without a stage's
    data, before any model is loaded."""
    need = [("--finetune-data", given.finetune_data, "the fine-tuning data")]
    if method == "multi-stage":
        need += [
            ("--pt-model", given.pt_model, "the pre-trained model θ_pt"),
            ("--corpus", given.corpus, "the pre-training corpus"),
        ]
    for flag, value, what in need:
        if not value:
            raise MsifError(
                f"{asked} with --method {method} needs {flag} ({what}): "
                "refinement takes exact curvature products on each stage's data"
            )


def _refinement(model, tokenizer, options, precondition, data, given: RefineData, pt, method):
    """Each refined stage's model and seeded sample of its data."""
    from msif.attribution.refine import Refinement, StageSample

    n, seed = precondition.refine_samples, options.seed
    examples, record = runtime.sample_examples(
        model, tokenizer, given.finetune_data, n, seed, options, data
    )
    samples = {"ft": StageSample(model, examples, record)}
    if method == "multi-stage":
        pt_model, pt_tokenizer, pt_options = runtime.load_stage_model(given.pt_model, options)
        if pt is not None:  # else precondition_queries refuses the missing factors
            runtime.check_tokenizer(pt.info.get("tokenizer"), pt_tokenizer, given.pt_model)
        examples, record = runtime.sample_examples(
            pt_model, pt_tokenizer, given.corpus, n, seed, pt_options, data, corpus=True
        )
        samples["pt"] = StageSample(pt_model, examples, {**record, "model": given.pt_model})
    return Refinement(
        precondition.refine_steps, samples, rows=options.batch_size,
        lanczos=precondition.refine_lanczos, seed=seed,
    )  # fmt: skip
