"""Pipeline node `index` (GPU): one corpus shard's gradients at θ_pt, factored, for lookups."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def index(
    model: str,
    corpus: str,
    pt_factors: Input[Artifact],
    shard: int,
    num_shards: int,
    index: Output[Artifact],
    index_tier: str,
    index_rank: int,
    index_whitening: float,
    index_values: int,
    index_dtype: str,
    max_length: int,
    batch_size: int,
    seed: int,
    device: str,
    dtype: str,
    include: list,
    exclude: list,
    split_heads: bool,
    split_heads_pattern: list,
    embeddings: bool,
    lm_head: bool,
    text_column: str,
    id_column: str,
    prompt_column: str,
    completion_column: str,
    messages_column: str,
    split: str,
    append_eos: str,
    base_model: str = "",
):
    """Indexes one corpus shard's document gradients at θ_pt: `msif index`.

    Args:
        model: The pre-trained model θ_pt.
        corpus: The corpus: id and text (or input_ids), in any input format, streamed.
        pt_factors: The pre-train factors: their modules are indexed.
        shard: Index of this shard.
        num_shards: Number of shards.
        index_tier: factored (top-r singular triplets per document and module) or projected
            (a fixed number of eigenbasis coordinates per document).
        index_rank: Singular triplets kept per document and module (exact at full rank).
        index_whitening: Power p of the pre-train curvature in the norm the truncation
            minimises (0: plain SVD); the projected tier ranks coordinates by it.
        index_values: Values per document of the projected tier (value + index each).
        index_dtype: dtype the index is stored in.
        max_length: Tokens per document.
        batch_size: Documents per forward and backward pass.
        seed: Unused by indexing; recorded with the options.
        device: auto, cpu, cuda or cuda:N.
        dtype: dtype the model is loaded in.
        include: Must match the factors' modules (recorded only).
        exclude: As include.
        split_heads: As include.
        split_heads_pattern: As include.
        embeddings: As include.
        lm_head: As include.
        text_column: As for fit-covariance.
        id_column: As for fit-covariance.
        prompt_column: As for fit-covariance.
        completion_column: As for fit-covariance.
        messages_column: As for fit-covariance.
        split: As for fit-covariance.
        append_eos: As for fit-covariance.
        base_model: As for fit-covariance.

    Returns:
        index: The shard's per-document factored gradients (safetensors + JSON).
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    arguments.update(base_model=base_model or None)  # KFP strings cannot be None
    run_subcommand("index", out=arguments.pop("index"), **arguments)
