"""The multi-stage influence pipeline (DESIGN.md §3) as a Kubeflow Pipelines v2 pipeline.

Per stage (pt: pre-training corpus at θ_pt, ft: fine-tuning data at θ_ft): fit covariance on
every shard (GPU, `ParallelFor`) → eigendecompose the reduced sums (CPU, `Collected`) → fit Λ
on every shard (GPU) → build the stage's factors (CPU). Then, for each of multi-stage,
single-stage and gradient-dot, precondition the queries at θ_ft (GPU) and score every corpus
shard (GPU; θ_pt, except θ_ft for single-stage); BM25 scores the text (CPU); `rank` merges
every shard's top-k, evaluates and writes the report (CPU).

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

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_channel import PipelineParameterChannel
from msif.components import (
    bm25_scores,
    build_factors,
    eigendecompose,
    fit_covariance,
    fit_lambda,
    query_gradients,
    rank,
    score_shard,
    shard_indices,
)

PIPELINE_NAME = "multi-stage-influence"
METHODS = ("multi-stage", "single-stage", "gradient-dot")
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GPU_TAINT_KEY = "nvidia.com/gpu"
PART_OF_LABEL = ("app.kubernetes.io/part-of", "msif")


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


def _on_cpu(task: PipelineTask, kind: str, name: str) -> PipelineTask:
    res = CPU_NODES[kind]
    task.set_display_name(name)
    task.set_cpu_request(res.cpu)
    task.set_memory_request(res.memory)
    kubernetes.add_pod_label(task, *PART_OF_LABEL)
    return task


@dataclass(frozen=True)
class _Run:
    """Pipeline parameters every model node shares."""

    shards: PipelineParameterChannel
    num_shards: PipelineParameterChannel
    max_length: PipelineParameterChannel
    batch_size: PipelineParameterChannel
    seed: PipelineParameterChannel
    gpu: _Gpu


def _stage_factors(stage: str, model_uri, data_uri, run: _Run) -> PipelineTask:
    """Fit covariance ×N → eigendecompose → fit Λ ×N → build factors, for one stage."""
    common = dict(model_uri=model_uri, data_uri=data_uri, stage=stage)
    sizes = dict(max_length=run.max_length, batch_size=run.batch_size, seed=run.seed)
    with dsl.ParallelFor(run.shards) as shard:
        cov = fit_covariance(**common, shard=shard, num_shards=run.num_shards, **sizes)
        _on_gpu(cov, run.gpu, f"fit covariance ({stage})")
    eig = eigendecompose(partials=dsl.Collected(cov.outputs["covariance"]))
    _on_cpu(eig, "eigendecompose", f"eigendecompose ({stage})")
    with dsl.ParallelFor(run.shards) as shard:
        lam = fit_lambda(
            **common,
            eigenbasis=eig.outputs["eigenbasis"],
            shard=shard,
            num_shards=run.num_shards,
            **sizes,
        )
        _on_gpu(lam, run.gpu, f"fit lambda ({stage})")
    factors = build_factors(
        eigenbasis=eig.outputs["eigenbasis"], partials=dsl.Collected(lam.outputs["lambda_sums"])
    )
    return _on_cpu(factors, "build-factors", f"build factors ({stage})")


def _method_scores(method: str, queries_task: PipelineTask, model_uri, corpus_uri, top_k, run):
    """Score every corpus shard against one method's preconditioned queries."""
    with dsl.ParallelFor(run.shards) as shard:
        task = score_shard(
            model_uri=model_uri,
            corpus_uri=corpus_uri,
            preconditioned=queries_task.outputs["preconditioned"],
            shard=shard,
            num_shards=run.num_shards,
            top_k=top_k,
            max_length=run.max_length,
            batch_size=run.batch_size,
        )
        _on_gpu(task, run.gpu, f"score corpus ({method})")
    return dsl.Collected(task.outputs["scores"])


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
        max_length: int = 512,
        batch_size: int = 8,
        damping_factor: float = 0.1,
        alpha: float = 0.0,
        query_rank: int = 0,
        top_k: int = 100,
        accelerator_type: str = d.accelerator_type,
        accelerator_count: int = d.accelerator_count,
        gpu_node_selector: dict = default_selector,
        gpu_cpu_request: str = d.gpu_cpu_request,
        gpu_memory_request: str = d.gpu_memory_request,
        seed: int = 0,
    ):
        """alpha <= 0: α = damping_factor × mean Λ_ft; query_rank 0: full-rank queries."""
        shards = _on_cpu(shard_indices(num_shards=num_shards), "shard-indices", "shards")
        gpu = _Gpu(
            accelerator_type,
            accelerator_count,
            gpu_node_selector,
            gpu_cpu_request,
            gpu_memory_request,
            d.retry,
        )
        run = _Run(shards.output, num_shards, max_length, batch_size, seed, gpu)
        factors = {
            "pt": _stage_factors("pt", pt_model_uri, corpus_uri, run),
            "ft": _stage_factors("ft", ft_model_uri, finetune_data_uri, run),
        }
        # Each method gets exactly the factors it applies, so gradient-dot need not wait.
        needs = {"multi-stage": ("ft", "pt"), "single-stage": ("ft",), "gradient-dot": ()}
        scores = {}
        for method in METHODS:
            q = query_gradients(
                ft_model_uri=ft_model_uri,
                queries_uri=queries_uri,
                method=method,
                alpha=alpha,
                damping_factor=damping_factor,
                query_rank=query_rank,
                max_length=max_length,
                batch_size=batch_size,
                **{f"{s}_factors": factors[s].outputs["factors"] for s in needs[method]},
            )
            _on_gpu(q, gpu, f"query gradients ({method})")
            model = ft_model_uri if method == "single-stage" else pt_model_uri
            scores[method] = _method_scores(method, q, model, corpus_uri, top_k, run)
        bm25 = bm25_scores(corpus_uri=corpus_uri, queries_uri=queries_uri, top_k=top_k)
        _on_cpu(bm25, "bm25", "bm25")
        ranked = rank(
            corpus_uri=corpus_uri,
            queries_uri=queries_uri,
            top_k=top_k,
            multi_stage_scores=scores["multi-stage"],
            single_stage_scores=scores["single-stage"],
            gradient_dot_scores=scores["gradient-dot"],
            bm25_scores=bm25.outputs["scores"],
            pt_factors=factors["pt"].outputs["factors"],
            ft_factors=factors["ft"].outputs["factors"],
        )
        _on_cpu(ranked, "rank", "rank")

    return multi_stage_influence


multi_stage_influence = build_pipeline()
