"""What the msif pipelines share: node placement (GPU and CPU), retries, and the walk of a
pipeline of msif.workflow.dag into KFP tasks, ParallelFor fan-outs, Collected fan-ins and
importers for the outputs of another run.

GPU nodes ask for `accelerator_count` × `accelerator_type` (the Kubernetes extended resource,
`nvidia.com/gpu` on GKE; Vertex AI Pipelines names the accelerator instead, e.g. NVIDIA_L4),
CPU and memory, tolerate the `nvidia.com/gpu` taint, select nodes through
`gpu_node_selector` (on GKE the GPU model: `cloud.google.com/gke-accelerator`) and are retried,
because GPU node pools are often pre-emptible. All of these are run-time parameters (kfp 2.17
compiles them into `resourceAccelerator`/`resourceCpuRequest` placeholders and a
`nodeSelectorJson` parameter); `accelerator_count=0` with `gpu_node_selector={}` runs the GPU
nodes on plain CPU nodes.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, PipelineTask
from kfp.dsl.pipeline_channel import PipelineParameterChannel
from msif.components import COMPONENTS

from msif.workflow.dag import Task, arguments, pipeline

GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GPU_TAINT_KEY = "nvidia.com/gpu"
PART_OF_LABEL = ("app.kubernetes.io/part-of", "msif")


@dataclass(frozen=True)
class CpuResources:
    """Requests of a CPU node (constants: these nodes are light and rarely need tuning)."""

    cpu: str
    memory: str


# Eigendecomposition holds every module's float64 A and G at once, lookup every index shard
# (its matmuls are the whole of its work); the others stream.
CPU_NODES = {
    "shard-indices": CpuResources("100m", "256Mi"),
    "eigendecompose": CpuResources("4", "16Gi"),
    "build-factors": CpuResources("2", "8Gi"),
    "lookup": CpuResources("4", "32Gi"),
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
    """Compile-time defaults of the pipeline's accelerator parameters, and the fixed requests
    of its CPU nodes (`msif pipeline compile --plan` takes both from `msif plan`)."""

    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = 1
    gke_accelerator: str = "nvidia-l4"
    gpu_cpu_request: str = "8"
    gpu_memory_request: str = "48Gi"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cpu_nodes: Mapping[str, CpuResources] = field(default_factory=lambda: dict(CPU_NODES))

    def node_selector(self) -> dict[str, str]:
        """The default `gpu_node_selector` (empty when no GKE accelerator is named)."""
        return {GKE_ACCELERATOR_LABEL: self.gke_accelerator} if self.gke_accelerator else {}


@dataclass(frozen=True)
class Gpu:
    """The pipeline parameters that place a GPU node."""

    accelerator_type: PipelineParameterChannel
    accelerator_count: PipelineParameterChannel
    node_selector: PipelineParameterChannel
    cpu: PipelineParameterChannel
    memory: PipelineParameterChannel
    retry: RetryPolicy


def on_gpu(task: PipelineTask, gpu: Gpu, name: str) -> PipelineTask:
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


def on_cpu(
    task: PipelineTask, node: str, name: str, cpu_nodes: Mapping[str, CpuResources] = CPU_NODES
) -> PipelineTask:
    res = cpu_nodes[node]
    task.set_display_name(name)
    task.set_cpu_request(res.cpu)
    task.set_memory_request(res.memory)
    kubernetes.add_pod_label(task, *PART_OF_LABEL)
    return task


def add_tasks(
    name: str, params: dict, gpu: Gpu, cpu_nodes: Mapping[str, CpuResources] = CPU_NODES
) -> None:
    """Every task of pipeline name (msif.workflow.dag), fanned out over shards where the DAG
    says so; what it imports from another run enters through dsl.importer."""
    shards = on_cpu(
        COMPONENTS["shard-indices"](num_shards=params["num_shards"]),
        "shard-indices",
        "shards",
        cpu_nodes,
    )
    spec = pipeline(name)
    # Task id → (first output, whether sharded). Each consumer gets its own dsl.Collected:
    # kfp 2.17.3 rewrites a Collected in place when it compiles the first consumer's fan-in,
    # and a second consumer of the same object then names a loop that is not a task.
    produced: dict[str, tuple[Any, bool]] = {}
    for imported in spec.imported:
        uris = params[imported.parameter]
        if imported.sharded:
            with dsl.ParallelFor(uris) as uri:
                task = _importer(uri, imported.parameter)
            produced[imported.task_id] = (task.output, True)
        else:
            produced[imported.task_id] = (_importer(uris, imported.parameter).output, False)
    for task in spec.tasks:
        component = COMPONENTS[task.node]
        inputs = {
            producer: dsl.Collected(output) if sharded else output
            for producer, (output, sharded) in produced.items()
            if producer in task.inputs.values()
        }
        args = arguments(task, component.component_spec.inputs or {}, params, inputs)
        if task.sharded:
            with dsl.ParallelFor(shards.output) as shard:
                kfp_task = component(**args, shard=shard)
                _place(kfp_task, task, gpu, cpu_nodes)
        else:
            kfp_task = component(**args)
            _place(kfp_task, task, gpu, cpu_nodes)
        # Later tasks read the first output; a sharded task's arrive collected (fan-in).
        first = kfp_task.outputs[next(iter(component.component_spec.outputs))]
        produced[task.id] = (first, task.sharded)


def _importer(uri: Any, parameter: str) -> PipelineTask:
    # An artifact of another run, linked in KFP's lineage; reimport=False lets runs that name
    # the same URI share one artifact.
    task = dsl.importer(artifact_uri=uri, artifact_class=Artifact, reimport=False)
    task.set_display_name(f"import {parameter}")
    return task


def _place(kfp_task: PipelineTask, task: Task, gpu: Gpu, cpu_nodes) -> None:
    if task.gpu:
        on_gpu(kfp_task, gpu, task.display_name)
    else:
        on_cpu(kfp_task, task.node, task.display_name, cpu_nodes)


def run_pipeline_tasks(name: str, params: dict, defaults: PipelineDefaults) -> None:
    """Add pipeline name's tasks, placed by its parameters (called in the pipeline's body)."""
    gpu = Gpu(
        params["accelerator_type"],
        params["accelerator_count"],
        params["gpu_node_selector"],
        params["gpu_cpu_request"],
        params["gpu_memory_request"],
        defaults.retry,
    )
    add_tasks(name, params, gpu, defaults.cpu_nodes)
