"""Pipeline node `eigendecompose` (CPU): reduce covariance shards and eigendecompose them."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def eigendecompose(
    partials: Input[list[Artifact]],
    eigenbasis: Output[Artifact],
    factor_dtype: str,
):
    """Adds every shard's covariance sums and eigendecomposes them: `msif eigendecompose`.

    Args:
        partials: Every fit-covariance shard output of one stage.
        factor_dtype: dtype eigenvectors are stored in (computed in float64).

    Returns:
        eigenbasis: Q_A and block-diagonal Q_G per module (safetensors + JSON).
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    run_subcommand("eigendecompose", out=arguments.pop("eigenbasis"), **arguments)
