"""Pipeline node `precondition-queries` (GPU): precondition the queries' gradients at θ_ft."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def precondition_queries(
    model: str,
    queries: str,
    method: str,
    preconditioned: Output[Artifact],
    alpha: float,
    damping_factor: float,
    damping: float,
    query_rank: int,
    refine_steps: int,
    refine_lanczos: int,
    refine_samples: int,
    pt_model: str,
    corpus: str,
    finetune_data: str,
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
    ft_factors: Input[Artifact] = None,
    pt_factors: Input[Artifact] = None,
    base_model: str = "",
):
    """Query gradients at θ_ft, preconditioned for one method: `msif precondition-queries`.

    Args:
        model: The fine-tuned model θ_ft.
        queries: The queries: id, prompt + completion or messages (any input format).
        method: multi-stage (needs both factors), single-stage (ft factors) or gradient-dot.
        ft_factors: The fine-tune factors; leave unconnected for gradient-dot.
        pt_factors: The pre-train factors: multi-stage; gradient-dot checks θ_pt by them.
        alpha: Proximity coefficient α, the fine-tune damping; <= 0: damping_factor × mean Λ_ft.
        damping_factor: λ = damping_factor × mean(Λ) per module.
        damping: An absolute λ instead; <= 0: use damping_factor.
        query_rank: Store rank-r queries; 0 keeps them dense.
        refine_steps: Conjugate-gradient steps per stage toward the exact damped Gauss–Newton
            system, EK-FAC as preconditioner; 0: EK-FAC alone (the stage data is not read).
        refine_lanczos: Lanczos steps per stage correcting the EK-FAC preconditioner where it
            misses the exact curvature most (acts even at refine_steps 0); 0: none.
        refine_samples: Sequences of each stage's data the refinement's exact products use.
        pt_model: θ_pt, for refining the pre-train stage (multi-stage).
        corpus: The pre-training corpus, sampled to refine the pre-train stage.
        finetune_data: The fine-tuning data, sampled to refine the fine-tune stage.
        max_length: Tokens per sequence.
        batch_size: Queries per forward and backward pass (refinement: sequences per pass).
        seed: Seed of the refinement's data samples; recorded with the options.
        device: auto, cpu, cuda or cuda:N.
        dtype: dtype the model is loaded in.
        include: Module regexes, as for fit-covariance (without factors).
        exclude: Module regexes, as for fit-covariance.
        split_heads: As for fit-covariance.
        split_heads_pattern: As for fit-covariance.
        embeddings: As for fit-covariance.
        lm_head: As for fit-covariance.
        text_column: As for fit-covariance.
        id_column: As for fit-covariance.
        prompt_column: As for fit-covariance.
        completion_column: As for fit-covariance.
        messages_column: As for fit-covariance.
        split: As for fit-covariance.
        append_eos: As for fit-covariance.
        base_model: As for fit-covariance.

    Returns:
        preconditioned: Per module W_q (dense or U, S, V), query ids and the damping used.
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand
    from msif.config import none_if_not_positive

    arguments.update(alpha=none_if_not_positive(alpha), damping=none_if_not_positive(damping))
    # KFP strings cannot be None: "" is "not given".
    for name in ("base_model", "pt_model", "corpus", "finetune_data"):
        arguments[name] = arguments[name] or None
    run_subcommand("precondition-queries", out=arguments.pop("preconditioned"), **arguments)
