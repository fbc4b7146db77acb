"""Pipeline node `score-corpus` (GPU): score one corpus shard against preconditioned queries."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def score_corpus(
    model: str,
    corpus: str,
    preconditioned: Input[Artifact],
    shard: int,
    num_shards: int,
    scores: Output[Dataset],
    top_k: int,
    explain_k: int,
    full: bool,
    contraction: str,
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
    candidates: Input[Artifact] = None,
    base_model: str = "",
):
    """Scores one corpus shard and keeps its top-k per query: `msif score-corpus`.

    Args:
        model: θ_pt for multi-stage and gradient-dot queries, θ_ft for single-stage.
        corpus: The corpus: id and text (or input_ids), in any input format, streamed.
        preconditioned: The precondition-queries output.
        shard: Index of this shard.
        num_shards: Number of shards.
        top_k: Documents kept per query.
        explain_k: Documents per query that get per-token scores.
        full: Also write every document's score.
        contraction: auto, materialise or per-token (per module).
        max_length: Tokens per document.
        batch_size: Documents per forward and backward pass.
        seed: Unused by scoring; recorded with the options.
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
        candidates: Score only the documents a lookup (or bm25) output names: the exact
            rerank of the index's candidates. Unconnected: every document of the shard.
        base_model: As for fit-covariance.

    Returns:
        scores: scores.parquet (top-k with per-token scores) and scores.json of the shard.
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    arguments.update(base_model=base_model or None)  # KFP strings cannot be None
    run_subcommand("score-corpus", out=arguments.pop("scores"), **arguments)
