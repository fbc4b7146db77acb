"""Pipeline node `fit-lambda` (GPU): eigenvalue-correction (Λ) partial sums of one shard."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fit_lambda(
    model: str,
    data: str,
    stage: str,
    eigenbasis: Input[Artifact],
    shard: int,
    num_shards: int,
    lambda_sums: Output[Artifact],
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
    module_groups: int,
    text_column: str,
    id_column: str,
    prompt_column: str,
    completion_column: str,
    messages_column: str,
    split: str,
    append_eos: str,
    base_model: str = "",
):
    """Sums (Q_Gᵀ DW_n Q_A)∘² over one shard's sequences: `msif fit-lambda`.

    Args:
        model: The stage's model, as for fit-covariance.
        data: The stage's data, as for fit-covariance.
        stage: pt or ft.
        eigenbasis: The stage's eigendecompose output.
        shard: Index of this shard.
        num_shards: Number of shards.
        max_length: Tokens per sequence (as for fit-covariance).
        batch_size: Sequences per forward and backward pass.
        seed: Seed of the sampled Fisher labels.
        device: auto, cpu, cuda or cuda:N.
        dtype: dtype the model is loaded in.
        include: Module regexes, as for fit-covariance.
        exclude: Module regexes, as for fit-covariance.
        split_heads: As for fit-covariance.
        split_heads_pattern: As for fit-covariance.
        embeddings: As for fit-covariance.
        lm_head: As for fit-covariance.
        module_groups: As for fit-covariance (only the group's eigenvectors on the device).
        text_column: As for fit-covariance.
        id_column: As for fit-covariance.
        prompt_column: As for fit-covariance.
        completion_column: As for fit-covariance.
        messages_column: As for fit-covariance.
        split: As for fit-covariance.
        append_eos: As for fit-covariance.
        base_model: As for fit-covariance.

    Returns:
        lambda_sums: The shard's Λ partial sums (safetensors + JSON).
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    arguments.update(base_model=base_model or None)  # KFP strings cannot be None
    run_subcommand("fit-lambda", out=arguments.pop("lambda_sums"), **arguments)
