"""The `index` pipeline: the pre-train side of msif, run once per pre-trained model and corpus.

Fit the pre-train factors (fit-covariance (pt) on every corpus shard → eigendecompose (pt) →
fit-lambda (pt) on every shard → build-factors (pt)), then `index` every corpus shard at θ_pt
(GPU, `ParallelFor`): per document and tracked module the top-r singular triplets of its
gradient (exact at full rank). The `attribute` pipeline takes the outputs of a run as URIs:
the build-factors (pt) output `factors` as `pt_factors_uri` and every index shard's output
`index` as `index_uris`, and then serves any fine-tune of this model and any queries without
fitting pre-train curvature or scanning the corpus again (docs/cluster.md, "Index once,
attribute many times"). The tasks come from `msif.workflow.dag`; placement is
msif.pipelines.build's, as for the full pipeline.
"""

from kfp import dsl
from msif.pipelines.build import PipelineDefaults, run_pipeline_tasks

from msif.config import DataOptions, EigenOptions, FitOptions, IndexOptions, ModelOptions
from msif.workflow.dag import INDEX

PIPELINE_NAME = INDEX
_M, _E, _I, _D = ModelOptions(), EigenOptions(), IndexOptions(), DataOptions()
_F = FitOptions()


def build_pipeline(defaults: PipelineDefaults | None = None):
    """The pipeline, with compile-time defaults for its accelerator parameters."""
    d = defaults or PipelineDefaults()
    default_selector = d.node_selector()

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Fit a pre-trained LM's EK-FAC factors on its corpus and index every "
        "document's gradient, once, for the attribute pipeline's lookups.",
    )
    def index(
        pt_model_uri: str,
        corpus_uri: str,
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
        index_tier: str = _I.index_tier,
        index_rank: int = _I.index_rank,
        index_whitening: float = _I.index_whitening,
        index_values: int = _I.index_values,
        index_dtype: str = _I.index_dtype,
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
        """index_rank at or above a document's token count keeps its gradient exactly;
        split "": a DatasetDict's only split, else train. The other options are
        msif.config's, by the same name."""
        params = dict(locals())  # first: every parameter, by name, for the DAG's tasks
        run_pipeline_tasks(PIPELINE_NAME, params, d)

    return index


index = build_pipeline()
