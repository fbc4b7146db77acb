"""Pipeline node `build factors` (CPU): reduce Λ shards into one stage's EK-FAC factors."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def build_factors(
    eigenbasis: Input[Artifact],
    partials: Input[list[Artifact]],
    factors: Output[Artifact],
):
    """`msif build-factors` from the eigenbasis and every shard's Λ partial sums."""
    from msif.cli import main

    argv = ["build-factors", "--eigenbasis", eigenbasis.path]
    argv += ["--partials", *[p.path for p in partials]]
    rc = main([*argv, "--out", factors.path])
    if rc != 0:
        raise RuntimeError(f"msif build-factors failed with exit code {rc}")
