"""Pipeline node `fit Λ` (GPU): eigenvalue-correction partial sums of one data shard."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fit_lambda(
    model_uri: str,
    data_uri: str,
    stage: str,
    eigenbasis: Input[Artifact],
    shard: int,
    num_shards: int,
    max_length: int,
    batch_size: int,
    seed: int,
    lambda_sums: Output[Artifact],
):
    """`msif fit-lambda` on shard `shard` of `num_shards` in the stage's eigenbasis."""
    from msif.cli import main

    # Local runs deliver ParallelFor items of a List[int] as floats (0.0, 1.0, ...).
    argv = ["fit-lambda", "--model", model_uri, "--data", data_uri, "--stage", stage]
    argv += ["--eigenbasis", eigenbasis.path]
    argv += ["--shard", str(int(shard)), "--num-shards", str(int(num_shards))]
    argv += ["--max-length", str(max_length), "--batch-size", str(batch_size)]
    argv += ["--seed", str(seed), "--out", lambda_sums.path]
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"msif fit-lambda failed with exit code {rc}")
