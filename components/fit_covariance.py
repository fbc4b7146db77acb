"""Pipeline node `fit-covariance` (GPU): covariance partial sums of one data shard."""

from kfp import dsl
from kfp.dsl import Artifact, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fit_covariance(
    model: str,
    data: str,
    stage: str,
    shard: int,
    num_shards: int,
    covariance: Output[Artifact],
    max_length: int,
    batch_size: int,
    seed: int,
    device: str,
    dtype: str,
    include: list,
    exclude: list,
    split_heads: bool,
    text_column: str,
    id_column: str,
    prompt_column: str,
    completion_column: str,
    messages_column: str,
    split: str,
    append_eos: str,
):
    """Sums a aᵀ and g gᵀ (labels sampled from the model) over one shard: `msif fit-covariance`.

    Args:
        model: The stage's model (θ_pt for stage pt, θ_ft for ft): a save_pretrained directory
            or gs:// prefix.
        data: The stage's data: the corpus (pt) or the fine-tuning data (ft): Parquet, a
            datasets save_to_disk folder or JSON Lines.
        stage: pt or ft.
        shard: Index of this shard.
        num_shards: Number of shards the data is split into.
        max_length: Tokens per sequence.
        batch_size: Sequences per forward and backward pass.
        seed: Seed of the sampled Fisher labels.
        device: auto, cpu, cuda or cuda:N.
        dtype: dtype the model is loaded in.
        include: Track only block modules whose name matches one of these regexes.
        exclude: Do not track modules matching these regexes.
        split_heads: Split fused QKV projections into head-size blocks of G.
        text_column: Corpus column of the documents' text.
        id_column: Column of row ids; absent (default name): rows are named row-N.
        prompt_column: Column of the prompts (fine-tune data, queries).
        completion_column: Column of the completions, the scored tokens.
        messages_column: Column of chat conversations (lists of {role, content}), rendered
            with the tokenizer's chat template; only assistant turns are scored.
        split: Split of a datasets DatasetDict folder; empty: its only split, else train.
        append_eos: on, off or auto: end documents and completions with EOS (scored).

    Returns:
        covariance: The shard's covariance partial sums (safetensors + JSON).
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    run_subcommand("fit-covariance", out=arguments.pop("covariance"), **arguments)
