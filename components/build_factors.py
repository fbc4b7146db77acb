"""Pipeline node `build-factors` (CPU): reduce Λ shards into one stage's EK-FAC factors."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def build_factors(
    eigenbasis: Input[Artifact],
    partials: Input[list[Artifact]],
    factors: Output[Artifact],
):
    """Adds every shard's Λ sums into the stage's factors: `msif build-factors`.

    Args:
        eigenbasis: The stage's eigendecompose output.
        partials: Every fit-lambda shard output of the stage.

    Returns:
        factors: Q_A, Q_G and Λ per module of one stage (safetensors + JSON).
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    run_subcommand("build-factors", out=arguments.pop("factors"), **arguments)
