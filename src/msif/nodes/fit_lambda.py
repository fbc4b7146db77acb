"""Node `fit-lambda` (GPU): eigenvalue-correction (Λ) partial sums of one data shard."""

from __future__ import annotations

from msif.config import DataOptions, FitOptions, ModelOptions, add_options, from_namespace
from msif.errors import MismatchError
from msif.nodes import runtime

NAME = "fit-lambda"


def add_parser(sub) -> None:
    """`msif fit-lambda`."""
    p = runtime.subparser(
        sub,
        NAME,
        "eigenvalue-correction (Λ) partial sums of one data shard",
        "Sum (Q_Gᵀ DW_n Q_A)∘² over the sequences of one shard, in the stage's eigenbasis,\n"
        "DW_n from labels sampled from the model. Needs the same model and data as\n"
        "fit-covariance of that stage.",
    )
    p.add_argument("--model", required=True, help="the stage's model: a directory or gs:// prefix")
    p.add_argument("--data", required=True, help="the stage's data, as for fit-covariance")
    runtime.add_base_model_argument(p)
    runtime.add_stage_argument(p)
    p.add_argument("--eigenbasis", required=True, help="the stage's eigendecompose output")
    runtime.add_shard_arguments(p)
    runtime.add_out_argument(p, "where the Λ partial sums go")
    add_options(p, ModelOptions)
    add_options(p, FitOptions)
    add_options(p, DataOptions)
    p.set_defaults(
        run=lambda a: run(
            a.model,
            a.data,
            a.stage,
            a.eigenbasis,
            a.shard,
            a.num_shards,
            a.out,
            from_namespace(ModelOptions, a),
            from_namespace(DataOptions, a),
            base_model_uri=a.base_model,
            fit=from_namespace(FitOptions, a),
        )
    )


@runtime.timed
def run(
    model_uri: str,
    data_uri: str,
    stage: str,
    eigenbasis_uri: str,
    shard: int,
    num_shards: int,
    out_uri: str,
    options: ModelOptions,
    data: DataOptions | None = None,
    *,
    base_model_uri: str | None = None,
    fit: FitOptions | None = None,
) -> None:
    """Λ partial sums of one data shard in a given eigenbasis."""
    from msif.ekfac.eigenbasis import Eigenbasis
    from msif.ekfac.lambdas import fit_lambda

    runtime.check_stage(stage)
    runtime.check_output(out_uri, model_uri, data_uri, eigenbasis_uri, base_model_uri)
    basis = Eigenbasis.load(runtime.input_dir(eigenbasis_uri))
    if basis.stage != stage:
        raise MismatchError(f"{eigenbasis_uri} is a {basis.stage!r} eigenbasis, not {stage!r}")
    data = data or DataOptions()
    fit = fit or FitOptions()
    model, batches, info = runtime.stage_inputs(
        model_uri, data_uri, stage, shard, num_shards, options, data, base_model_uri
    )
    if basis.info.get("tokenizer") not in (None, info["tokenizer"]):
        raise MismatchError(
            f"{eigenbasis_uri} was fitted with a tokenizer of another vocabulary than {model_uri}'s"
        )
    lam = fit_lambda(
        model,
        batches,
        basis,
        seed=options.seed,
        progress=options.progress,
        module_groups=fit.module_groups,
    )
    lam.info.update(info, module_groups=fit.module_groups)
    with runtime.published(out_uri, runtime.shard_meta(NAME, stage, shard, num_shards)) as tmp:
        lam.save(tmp)
