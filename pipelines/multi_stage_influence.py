"""The multi-stage influence pipeline (docs/design.md §3) as a Kubeflow Pipelines v2 pipeline.

Per stage (pt: pre-training corpus at θ_pt, ft: fine-tuning data at θ_ft): fit covariance on
every shard (GPU, `ParallelFor`) → eigendecompose the reduced sums (CPU, `Collected`) → fit Λ
on every shard (GPU) → build the stage's factors (CPU). Then, for each of multi-stage,
single-stage and gradient-dot, precondition the queries at θ_ft (GPU) and score every corpus
shard (GPU; θ_pt, except θ_ft for single-stage); BM25 scores the text (CPU); `rank` merges
every shard's top-k, evaluates and writes the report (CPU). The tasks and their wiring come
from `msif.workflow.dag`, the one place the DAG is written.

Models, corpus, fine-tuning data and queries are URI *parameters* (gs:// or local), not
input artifacts: open-source KFP downloads an input artifact whole before the step starts,
while msif streams a corpus shard by shard. Everything the pipeline produces (partial sums,
factors, preconditioned queries, scores, ranking, report) is an artifact.

Placement (GPU nodes, CPU nodes, retries) is msif.pipelines.build's, shared with the `index`
and `attribute` pipelines; `build_pipeline()` fixes the accelerator defaults at compile time.
"""

from kfp import dsl
from msif.pipelines.build import (
    CPU_NODES,
    GKE_ACCELERATOR_LABEL,
    GPU_TAINT_KEY,
    PART_OF_LABEL,
    CpuResources,
    PipelineDefaults,
    RetryPolicy,
    run_pipeline_tasks,
)

from msif.config import (
    DataOptions,
    EigenOptions,
    FitOptions,
    ModelOptions,
    PreconditionOptions,
    RankOptions,
    ScoreOptions,
)
from msif.workflow.dag import FULL

PIPELINE_NAME = FULL
# The defaults of the option parameters: msif.config's, written nowhere else.
_M, _E, _P = ModelOptions(), EigenOptions(), PreconditionOptions()
_S, _R, _D = ScoreOptions(), RankOptions(), DataOptions()
_F = FitOptions()
__all__ = [
    "CPU_NODES",
    "GKE_ACCELERATOR_LABEL",
    "GPU_TAINT_KEY",
    "PART_OF_LABEL",
    "PIPELINE_NAME",
    "CpuResources",
    "PipelineDefaults",
    "RetryPolicy",
    "build_pipeline",
    "multi_stage_influence",
]


def build_pipeline(defaults: PipelineDefaults | None = None):
    """The pipeline, with compile-time defaults for its accelerator parameters."""
    d = defaults or PipelineDefaults()
    default_selector = d.node_selector()

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Attribute a fine-tuned LM's answers to pre-training documents with "
        "multi-stage influence functions (EK-FAC), against single-stage, gradient-dot and BM25.",
    )
    def multi_stage_influence(
        pt_model_uri: str,
        ft_model_uri: str,
        corpus_uri: str,
        finetune_data_uri: str,
        queries_uri: str,
        num_shards: int = 4,
        max_length: int = _M.max_length,
        batch_size: int = _M.batch_size,
        seed: int = _M.seed,
        device: str = _M.device,
        dtype: str = _M.dtype,
        include: list = list(_M.include),  # noqa: B006 - KFP reads defaults from the signature
        exclude: list = list(_M.exclude),  # noqa: B006
        split_heads: bool = _M.split_heads,
        split_heads_pattern: list = list(_M.split_heads_pattern),  # noqa: B006
        embeddings: bool = _M.embeddings,
        lm_head: bool = _M.lm_head,
        module_groups: int = _F.module_groups,
        factor_dtype: str = _E.factor_dtype,
        alpha: float = _P.alpha,
        damping_factor: float = _P.damping_factor,
        damping: float = 0.0,
        query_rank: int = _P.query_rank,
        refine_steps: int = _P.refine_steps,
        refine_lanczos: int = _P.refine_lanczos,
        refine_samples: int = _P.refine_samples,
        top_k: int = _S.top_k,
        explain_k: int = _S.explain_k,
        full: bool = _S.full,
        contraction: str = _S.contraction,
        report_k: int = _R.report_k,
        text_column: str = _D.text_column,
        id_column: str = _D.id_column,
        prompt_column: str = _D.prompt_column,
        completion_column: str = _D.completion_column,
        messages_column: str = _D.messages_column,
        split: str = _D.split,
        append_eos: str = _D.append_eos,
        accelerator_type: str = d.accelerator_type,
        accelerator_count: int = d.accelerator_count,
        gpu_node_selector: dict = default_selector,
        gpu_cpu_request: str = d.gpu_cpu_request,
        gpu_memory_request: str = d.gpu_memory_request,
    ):
        """alpha (default 1e-3), damping <= 0: unset (α = damping_factor × mean Λ_ft; λ relative);
        query_rank 0: dense queries; refine_steps 0: EK-FAC alone (else the precondition
        tasks sample the stages' data and θ_pt); split "": a DatasetDict's only split, else
        train. The other options are msif.config's, by the same name (the column options apply
        to every table)."""
        params = dict(locals())  # first: every parameter, by name, for the DAG's tasks
        run_pipeline_tasks(PIPELINE_NAME, params, d)

    return multi_stage_influence


multi_stage_influence = build_pipeline()
