"""Node `eigendecompose` (CPU): reduce a stage's covariance shards and eigendecompose them."""

from __future__ import annotations

from collections.abc import Sequence

from msif.config import EigenOptions, add_options, from_namespace
from msif.nodes import runtime

NAME = "eigendecompose"


def add_parser(sub) -> None:
    """`msif eigendecompose`."""
    p = runtime.subparser(
        sub,
        NAME,
        "reduce covariance shards and eigendecompose them",
        "Add the covariance partial sums of every shard of one stage (all shards must be\n"
        "there) and compute the EK-FAC eigenbasis Q_A, Q_G in float64. Needs no model.",
    )
    p.add_argument("--partials", nargs="+", required=True, help="every shard's covariance output")
    runtime.add_out_argument(p, "where the eigenbasis goes")
    add_options(p, EigenOptions)
    p.set_defaults(run=lambda a: run(a.partials, a.out, from_namespace(EigenOptions, a)))


@runtime.timed
def run(partial_uris: Sequence[str], out_uri: str, options: EigenOptions | None = None) -> None:
    """Reduce covariance partial sums and eigendecompose them."""
    from msif.data.models import DTYPES
    from msif.ekfac.covariance import CovarianceSums
    from msif.ekfac.eigenbasis import eigendecompose

    options = options or EigenOptions()
    runtime.check_output(out_uri, partial_uris)
    parts = runtime.load_partials(partial_uris, CovarianceSums.load)
    runtime.check_shard_set([p.info for p in parts], "covariance partial sums")
    basis = eigendecompose(parts, dtype=DTYPES[options.factor_dtype])
    basis.info.update(
        {k: parts[0].info.get(k) for k in ("data", "data_fingerprint", "model", "tokenizer")}
    )
    with runtime.published(out_uri, {"node": NAME, "stage": basis.stage}) as tmp:
        basis.save(tmp)
