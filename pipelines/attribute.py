"""The `attribute` pipeline: one fine-tune's queries against an `index` run's outputs.

Inputs from the index run are URI parameters: `pt_factors_uri`, its build-factors (pt)
output, and `index_uris`, the list of every index shard's output (all shards, any order; a
list rather than one prefix, because KFP names each output folder after its task and run,
and `lookup` refuses a missing or repeated shard). They enter through `dsl.importer`, so KFP's
lineage links this run to the index run's artifacts. The run fits the fine-tune factors
(fit-covariance (ft) ×N → eigendecompose (ft) → fit-lambda (ft) ×N → build-factors (ft)),
preconditions the queries for multi-stage (both factors) and gradient-dot (θ_pt checked by
the pre-train factors), looks each method's queries up in the index (`lookup`, CPU: top_c
candidates per query; candidates_from bm25 takes BM25's top_c instead, both the union),
reranks the candidates exactly (`score-corpus` with `candidates`, every corpus shard, at
θ_pt), runs BM25 and ranks the three methods.

Single-stage is left out: its corpus side is θ_ft, whose gradients the index (θ_pt's) does
not hold; run the full pipeline for it. With index_rank at or above the documents' token
count and top_c at or above the corpus size, the rankings equal the full pipeline's.
"""

from kfp import dsl
from msif.pipelines.build import PipelineDefaults, run_pipeline_tasks

from msif.config import (
    DataOptions,
    EigenOptions,
    FitOptions,
    LookupOptions,
    ModelOptions,
    PreconditionOptions,
    RankOptions,
    ScoreOptions,
)
from msif.workflow.dag import ATTRIBUTE

PIPELINE_NAME = ATTRIBUTE
_M, _E, _P, _L = ModelOptions(), EigenOptions(), PreconditionOptions(), LookupOptions()
_S, _R, _D = ScoreOptions(), RankOptions(), DataOptions()
_F = FitOptions()


def build_pipeline(defaults: PipelineDefaults | None = None):
    """The pipeline, with compile-time defaults for its accelerator parameters."""
    d = defaults or PipelineDefaults()
    default_selector = d.node_selector()

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Attribute a fine-tuned LM's answers to pre-training documents through "
        "an index run's corpus index: multi-stage and gradient-dot candidates, reranked "
        "exactly, against BM25.",
    )
    def attribute(
        pt_model_uri: str,
        ft_model_uri: str,
        corpus_uri: str,
        finetune_data_uri: str,
        queries_uri: str,
        pt_factors_uri: str,
        index_uris: list,
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
        top_c: int = _L.top_c,
        candidates_from: str = _L.candidates_from,
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
        """pt_factors_uri, index_uris: an index run's build-factors (pt) output and every
        index shard's output; num_shards: this run's corpus and fine-tune shards (any number,
        not the index's); alpha, damping <= 0: unset; query_rank 0: dense queries;
        refine_steps 0: EK-FAC alone; the other options are msif.config's, by the same name."""
        params = dict(locals())  # first: every parameter, by name, for the DAG's tasks
        run_pipeline_tasks(PIPELINE_NAME, params, d)

    return attribute


attribute = build_pipeline()
