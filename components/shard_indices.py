"""Pipeline helper task `shard-indices`: the shard indices that `dsl.ParallelFor` fans out."""

from kfp import dsl
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shard_indices(num_shards: int) -> list[int]:
    """The list [0, 1, ..., num_shards - 1].

    Args:
        num_shards: Number of shards (at least 1).

    Returns:
        The shard indices.
    """
    if int(num_shards) < 1:
        raise ValueError(f"num_shards must be at least 1, not {num_shards}")
    return list(range(int(num_shards)))
