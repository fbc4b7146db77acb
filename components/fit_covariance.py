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
        split_heads: Split every attention q/k/v projection (fused or separate)
            into head-size blocks of G.
        split_heads_pattern: Also split the tracked modules matching these regexes.
        embeddings: Also track the input embedding.
        lm_head: Also track the output head.
        module_groups: Passes over the shard, each fitting one contiguous group of the
            tracked modules (about 1/N of the sums on the device, N× the passes; same sums).
        text_column: Corpus column of the documents' text.
        id_column: Column of row ids; absent (default name): rows are named row-N.
        prompt_column: Column of the prompts (fine-tune data, queries).
        completion_column: Column of the completions, the scored tokens.
        messages_column: Column of chat conversations (lists of {role, content}), rendered
            with the tokenizer's chat template; only assistant turns are scored.
        split: Split of a datasets DatasetDict folder; empty: its only split, else train.
        append_eos: on, off or auto: end documents and completions with EOS (scored).
        base_model: When model is a PEFT (LoRA) adapter folder, the base it is merged into;
            the pipeline passes pt_model_uri. Empty: the adapter's own base_model_name_or_path.
            Unused for a full model.

    Returns:
        covariance: The shard's covariance partial sums (safetensors + JSON).
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    arguments.update(base_model=base_model or None)  # KFP strings cannot be None
    run_subcommand("fit-covariance", out=arguments.pop("covariance"), **arguments)
