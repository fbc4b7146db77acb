"""Node `fit-covariance` (GPU): covariance partial sums of one shard of a stage's data."""

from __future__ import annotations

from msif.config import DataOptions, FitOptions, ModelOptions, add_options, from_namespace
from msif.nodes import runtime

NAME = "fit-covariance"


def add_parser(sub) -> None:
    """`msif fit-covariance`."""
    p = runtime.subparser(
        sub,
        NAME,
        "covariance partial sums of one data shard",
        "Sum a aᵀ and g gᵀ of every tracked module over one shard of a stage's data, with g\n"
        "from labels sampled from the model. Needs the stage's model: θ_pt with the corpus\n"
        "(--stage pt), θ_ft with the fine-tuning data (--stage ft). Shards add up.",
    )
    p.add_argument("--model", required=True, help="the stage's model: a directory or gs:// prefix")
    p.add_argument(
        "--data",
        required=True,
        help="corpus (id, text | input_ids) or fine-tune (prompt, completion)",
    )
    runtime.add_base_model_argument(p)
    runtime.add_stage_argument(p)
    runtime.add_shard_arguments(p)
    runtime.add_out_argument(p, "where the partial sums go")
    add_options(p, ModelOptions)
    add_options(p, FitOptions)
    add_options(p, DataOptions)
    p.set_defaults(
        run=lambda a: run(
            a.model,
            a.data,
            a.stage,
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
    shard: int,
    num_shards: int,
    out_uri: str,
    options: ModelOptions,
    data: DataOptions | None = None,
    *,
    base_model_uri: str | None = None,
    fit: FitOptions | None = None,
) -> None:
    """Covariance partial sums of one data shard."""
    from msif.ekfac.covariance import fit_covariance

    runtime.check_output(out_uri, model_uri, data_uri, base_model_uri)
    data = data or DataOptions()
    fit = fit or FitOptions()
    model, batches, info = runtime.stage_inputs(
        model_uri, data_uri, stage, shard, num_shards, options, data, base_model_uri
    )
    cov = fit_covariance(
        model,
        batches,
        stage=stage,
        modules=options.selection(),
        seed=options.seed,
        progress=options.progress,
        module_groups=fit.module_groups,
    )
    cov.info = {**info, "model": model_uri, "module_groups": fit.module_groups}
    with runtime.published(out_uri, runtime.shard_meta(NAME, stage, shard, num_shards)) as tmp:
        cov.save(tmp)
