"""Pipeline node `eigendecompose` (CPU): reduce covariance shards, eigendecompose in float64."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def eigendecompose(partials: Input[list[Artifact]], eigenbasis: Output[Artifact]):
    """`msif eigendecompose` over every shard's covariance partial sums."""
    from msif.cli import main

    argv = ["eigendecompose", "--partials", *[p.path for p in partials]]
    rc = main([*argv, "--out", eigenbasis.path])
    if rc != 0:
        raise RuntimeError(f"msif eigendecompose failed with exit code {rc}")
