"""Pipeline node `fit covariance` (GPU): covariance partial sums of one data shard."""

from kfp import dsl
from kfp.dsl import Artifact, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fit_covariance(
    model_uri: str,
    data_uri: str,
    stage: str,
    shard: int,
    num_shards: int,
    max_length: int,
    batch_size: int,
    seed: int,
    covariance: Output[Artifact],
):
    """`msif fit-covariance` on shard `shard` of `num_shards` of the stage's data."""
    from msif.cli import main

    # Local runs deliver ParallelFor items of a List[int] as floats (0.0, 1.0, ...).
    argv = ["fit-covariance", "--model", model_uri, "--data", data_uri, "--stage", stage]
    argv += ["--shard", str(int(shard)), "--num-shards", str(int(num_shards))]
    argv += ["--max-length", str(max_length), "--batch-size", str(batch_size)]
    argv += ["--seed", str(seed), "--out", covariance.path]
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"msif fit-covariance failed with exit code {rc}")
