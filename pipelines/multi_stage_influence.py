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

GPU nodes ask for `accelerator_count` × `accelerator_type` (the Kubernetes extended resource,
`nvidia.com/gpu` on GKE; Vertex AI Pipelines names the accelerator instead, e.g. NVIDIA_L4),
CPU and memory, tolerate the `nvidia.com/gpu` taint, select nodes through
`gpu_node_selector` (on GKE the GPU model: `cloud.google.com/gke-accelerator`) and are retried,
because GPU node pools are often pre-emptible. All of these are run-time parameters (kfp 2.17
compiles them into `resourceAccelerator`/`resourceCpuRequest` placeholders and a
`nodeSelectorJson` parameter); `accelerator_count=0` with `gpu_node_selector={}` runs the GPU
nodes on plain CPU nodes. `build_pipeline()` fixes the defaults at compile time.
"""

from dataclasses import dataclass, field
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_channel import PipelineParameterChannel
from msif.components import COMPONENTS

from msif.config import (
    DataOptions,
    EigenOptions,
    ModelOptions,
    PreconditionOptions,
    RankOptions,
    ScoreOptions,
)
from msif.workflow.dag import Task, arguments, tasks

PIPELINE_NAME = "multi-stage-influence"
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GPU_TAINT_KEY = "nvidia.com/gpu"
PART_OF_LABEL = ("app.kubernetes.io/part-of", "msif")
# The defaults of the option parameters: msif.config's, written nowhere else.
_M, _E, _P = ModelOptions(), EigenOptions(), PreconditionOptions()
_S, _R, _D = ScoreOptions(), RankOptions(), DataOptions()


@dataclass(frozen=True)
class CpuResources:
    """Requests of a CPU node (constants: these nodes are light and rarely need tuning)."""

    cpu: str
    memory: str


# Eigendecomposition holds every module's float64 A and G at once; the others stream.
CPU_NODES = {
    "shard-indices": CpuResources("100m", "256Mi"),
    "eigendecompose": CpuResources("4", "16Gi"),
    "build-factors": CpuResources("2", "8Gi"),
    "bm25": CpuResources("4", "16Gi"),
    "rank": CpuResources("2", "8Gi"),
}


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of GPU nodes: pre-empted spot/pre-emptible nodes kill pods mid-step."""

    num_retries: int = 3
    backoff_duration: str = "60s"
    backoff_factor: float = 2.0
    backoff_max_duration: str = "3600s"


@dataclass(frozen=True)
class PipelineDefaults:
    """Compile-time defaults of the pipeline's accelerator parameters."""

    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = 1
    gke_accelerator: str = "nvidia-l4"
    gpu_cpu_request: str = "8"
    gpu_memory_request: str = "48Gi"
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def node_selector(self) -> dict[str, str]:
        """The default `gpu_node_selector` (empty when no GKE accelerator is named)."""
        return {GKE_ACCELERATOR_LABEL: self.gke_accelerator} if self.gke_accelerator else {}


@dataclass(frozen=True)
class _Gpu:
    """The pipeline parameters that place a GPU node."""

    accelerator_type: PipelineParameterChannel
    accelerator_count: PipelineParameterChannel
    node_selector: PipelineParameterChannel
    cpu: PipelineParameterChannel
    memory: PipelineParameterChannel
    retry: RetryPolicy


def _on_gpu(task: PipelineTask, gpu: _Gpu, name: str) -> PipelineTask:
    task.set_display_name(name)
    task.set_accelerator_type(gpu.accelerator_type)
    task.set_accelerator_limit(gpu.accelerator_count)
    task.set_cpu_request(gpu.cpu)
    task.set_memory_request(gpu.memory)
    # kfp 2.17.3 does not thread parameters used only in resource settings into the DAG of
    # an enclosing ParallelFor: the loop's task would name an input its DAG never declares
    # (kfp.local stops with "Parent pipeline input argument ... not found"). Registering
    # them as channels of the task threads them through like any other input.
    task.register_pipeline_channels(
        [gpu.accelerator_type, gpu.accelerator_count, gpu.cpu, gpu.memory]
    )
    r = gpu.retry
    task.set_retry(r.num_retries, r.backoff_duration, r.backoff_factor, r.backoff_max_duration)
    # tqdm writes a line per update when stdout is not a terminal: once a minute is enough.
    task.set_env_variable("TQDM_MININTERVAL", "60")
    kubernetes.add_toleration(task, key=GPU_TAINT_KEY, operator="Exists", effect="NoSchedule")
    kubernetes.add_node_selector_json(task, gpu.node_selector)
    kubernetes.add_pod_label(task, *PART_OF_LABEL)
    return task


def _on_cpu(task: PipelineTask, node: str, name: str) -> PipelineTask:
    res = CPU_NODES[node]
    task.set_display_name(name)
    task.set_cpu_request(res.cpu)
    task.set_memory_request(res.memory)
    kubernetes.add_pod_label(task, *PART_OF_LABEL)
    return task


def _add_tasks(params: dict, gpu: _Gpu) -> None:
    """Every task of msif.workflow.dag, fanned out over shards where the DAG says so."""
    shards = _on_cpu(
        COMPONENTS["shard-indices"](num_shards=params["num_shards"]), "shard-indices", "shards"
    )
    produced: dict[str, Any] = {}
    for task in tasks():
        component = COMPONENTS[task.node]
        args = arguments(task, component.component_spec.inputs or {}, params, produced)
        if task.sharded:
            with dsl.ParallelFor(shards.output) as shard:
                kfp_task = component(**args, shard=shard)
                _place(kfp_task, task, gpu)
        else:
            kfp_task = component(**args)
            _place(kfp_task, task, gpu)
        # Later tasks read the first output; a sharded task's arrive collected (fan-in).
        first = kfp_task.outputs[next(iter(component.component_spec.outputs))]
        produced[task.id] = dsl.Collected(first) if task.sharded else first


def _place(kfp_task: PipelineTask, task: Task, gpu: _Gpu) -> None:
    if task.gpu:
        _on_gpu(kfp_task, gpu, task.display_name)
    else:
        _on_cpu(kfp_task, task.node, task.display_name)


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
        factor_dtype: str = _E.factor_dtype,
        alpha: float = 0.0,
        damping_factor: float = _P.damping_factor,
        damping: float = 0.0,
        query_rank: int = _P.query_rank,
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
        """alpha, damping <= 0: unset (α = damping_factor × mean Λ_ft; λ relative);
        query_rank 0: dense queries; split "": a DatasetDict's only split, else train. The other
        options are msif.config's, by the same name (the column options apply to every table)."""
        params = dict(locals())  # first: every parameter, by name, for the DAG's tasks
        gpu = _Gpu(
            accelerator_type,
            accelerator_count,
            gpu_node_selector,
            gpu_cpu_request,
            gpu_memory_request,
            d.retry,
        )
        _add_tasks(params, gpu)

    return multi_stage_influence


multi_stage_influence = build_pipeline()
