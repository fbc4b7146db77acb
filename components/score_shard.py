"""Pipeline node `score corpus` (GPU): score one corpus shard against preconditioned queries."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def score_shard(
    model_uri: str,
    corpus_uri: str,
    preconditioned: Input[Artifact],
    shard: int,
    num_shards: int,
    top_k: int,
    max_length: int,
    batch_size: int,
    scores: Output[Dataset],
):
    """`msif score` on shard `shard` of `num_shards`; keeps the shard's top-k per query."""
    from msif.cli import main

    # Local runs deliver ParallelFor items of a List[int] as floats (0.0, 1.0, ...).
    argv = ["score", "--model", model_uri, "--corpus", corpus_uri]
    argv += ["--preconditioned", preconditioned.path]
    argv += ["--shard", str(int(shard)), "--num-shards", str(int(num_shards))]
    argv += ["--top-k", str(top_k), "--max-length", str(max_length)]
    argv += ["--batch-size", str(batch_size)]
    rc = main([*argv, "--out", scores.path])
    if rc != 0:
        raise RuntimeError(f"msif score failed with exit code {rc}")
