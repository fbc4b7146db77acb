"""`msif plan`: what a run costs before it starts — per pipeline node the memory of a pod, the
storage it writes, its FLOPs and its GPU-hours, from a model config alone (no weights).

The plan walks the same DAG the pipelines compile from (msif.workflow.dag): the
`multi-stage-influence` pipeline, or with `--via-index` the `index` pipeline followed by the
`attribute` pipeline. Each node's estimate is msif.workflow.estimates'; the formulas and the
source of every figure are msif.workflow.costs'. The tracked modules come from msif's own
module selection (msif.core.modules.find_modules) on the model built on the meta device.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from msif.attribution.precondition import METHODS
from msif.config import CONTRACTIONS, INDEX_DTYPES, INDEX_TIERS
from msif.workflow import costs
from msif.workflow.costs import GIB, Figure, ModelShape, PlanError
from msif.workflow.dag import ATTRIBUTE, FULL, INDEX, INDEXED_METHODS, Task, pipeline
from msif.workflow.estimates import (
    BM25_BYTES_PER_WORD,
    BM25_WORDS_PER_S,
    CPU,
    DEVICES,
    ESTIMATORS,
    REQUEST_HEADROOM,
    WORDS_PER_TOKEN,
    Costs,
    NodeEstimate,
    PlanInputs,
    score_corpus,
)


@dataclass(frozen=True)
class Plan:
    """The estimate of every task, with the inputs, the model's shape and the assumptions."""

    inputs: PlanInputs
    shape: ModelShape
    nodes: tuple[NodeEstimate, ...]
    assumptions: tuple[tuple[str, Figure], ...]
    reference_hours: float  # one training step over the corpus tokens on this device

    @property
    def gpu_hours(self) -> float:
        """GPU-hours of every GPU node."""
        return sum(n.device_hours for n in self.nodes if n.runs_on == "gpu")

    @property
    def cpu_node_hours(self) -> float:
        """Hours of every CPU node."""
        return sum(n.device_hours for n in self.nodes if n.runs_on == "cpu")

    @property
    def storage(self) -> float:
        """Bytes written by every node."""
        return sum(n.storage for n in self.nodes)

    def by_pipeline(self) -> dict[str, dict[str, float]]:
        """GPU-hours, CPU-node-hours and bytes written per pipeline: an index run is paid
        once per pre-trained model and corpus, an attribute run once per fine-tune."""
        out: dict[str, dict[str, float]] = {}
        for n in self.nodes:
            sums = out.setdefault(n.pipeline, {"gpu_hours": 0.0, "cpu_node_hours": 0.0})
            sums["gpu_hours" if n.runs_on == "gpu" else "cpu_node_hours"] += n.device_hours
            sums["storage_bytes"] = sums.get("storage_bytes", 0.0) + n.storage
        return out

    def wall_hours(self) -> float:
        """Hours with every node after the one before (an upper bound: KFP runs the two
        stages' chains and the methods side by side), `gpus` pods of a node at once."""
        gpus = self.inputs.gpus or self.inputs.num_shards
        return sum(
            math.ceil(n.pods / (gpus if n.runs_on == "gpu" else n.pods)) * n.hours_per_pod
            for n in self.nodes
        )

    def largest(self, what: str) -> NodeEstimate:
        """The node with the most gpu_memory or host_memory per pod."""
        return max(self.nodes, key=lambda n: getattr(n, what))

    def problems(self) -> list[str]:
        """What does not fit the chosen GPU, one line each."""
        if self.inputs.gpu == CPU:
            return []
        gpu = costs.GPUS[self.inputs.gpu]
        usable = gpu.memory_gib * GIB * costs.GPU_MEMORY_USABLE.value
        return [
            f"{n.task} needs {_size(n.gpu_memory)} of GPU memory; one {gpu.name} offers "
            f"{_size(usable)} ({costs.GPU_MEMORY_USABLE.value:.0%} of {gpu.memory_gib:g} GiB)"
            for n in self.nodes
            if n.gpu_memory > usable
        ]

    def requests(self) -> dict:
        """Pod requests the pipeline compile takes (`msif pipeline compile --plan`): one
        memory request for every GPU node (the pipeline has one), one per CPU node."""
        from msif.pipelines.build import CPU_NODES, PipelineDefaults

        head = REQUEST_HEADROOM.value
        max_host = max((n.host_memory for n in self.nodes if n.runs_on == "gpu"), default=0)
        gpu = costs.GPUS.get(self.inputs.gpu)
        defaults = PipelineDefaults()
        out: dict[str, Any] = {
            "gke_accelerator": gpu.gke_accelerator if gpu else "",
            "accelerator_count": 1 if gpu else 0,
            "gpu_cpu_request": defaults.gpu_cpu_request,
            "gpu_memory_request": f"{costs.ceil_gib(head * max_host)}Gi",
            "cpu_nodes": {},
        }
        for n in self.nodes:
            if n.runs_on == "cpu" and n.node in CPU_NODES:
                gib = costs.ceil_gib(head * n.host_memory)
                have = out["cpu_nodes"].get(n.node)
                if have is None or int(have["memory"][:-2]) < gib:
                    out["cpu_nodes"][n.node] = {"cpu": CPU_NODES[n.node].cpu, "memory": f"{gib}Gi"}
        return out

    def to_dict(self) -> dict:
        """JSON-ready form; totals, largest nodes, problems and requests are derived."""
        gpu = costs.GPUS.get(self.inputs.gpu)
        return {
            "inputs": self.inputs.to_dict(),
            "model": self.shape.to_dict(),
            "device": asdict(gpu) if gpu else {"name": CPU},
            "nodes": [n.to_dict() for n in self.nodes],
            "assumptions": [{"what": w, **f.to_dict()} for w, f in self.assumptions],
            "reference_training_hours": self.reference_hours,
            "total": {
                "gpu_hours": self.gpu_hours,
                "cpu_node_hours": self.cpu_node_hours,
                "storage_bytes": self.storage,
                "wall_hours": self.wall_hours(),
                "by_pipeline": self.by_pipeline(),
                "largest_gpu_memory": _largest(self, "gpu_memory"),
                "largest_host_memory": _largest(self, "host_memory"),
            },
            "problems": self.problems(),
            "requests": self.requests(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """Inverse of to_dict (derived entries are recomputed, not read)."""
        return cls(
            PlanInputs.from_dict(d["inputs"]),
            ModelShape.from_dict(d["model"]),
            tuple(NodeEstimate.from_dict(n) for n in d["nodes"]),
            tuple((a["what"], Figure(a["value"], a["source"])) for a in d["assumptions"]),
            d["reference_training_hours"],
        )


def _largest(plan: Plan, what: str) -> dict:
    n = plan.largest(what)
    return {"task": n.task, "bytes": getattr(n, what)}


# ----------------------------------------------------------------------------- the model


def model_shape(uri: str, inputs: PlanInputs) -> ModelShape:
    """The shape of the model whose config.json is at uri (a folder, a file or a gs:// prefix),
    with the modules msif tracks under inputs' selection."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from msif.core.modules import find_modules

    raw = _read_config(uri)
    model_type = raw.pop("model_type", None)
    if not isinstance(model_type, str):
        raise PlanError(f"{uri}: config.json names no model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **raw)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(f"{uri}: cannot build a causal LM from config.json: {first}") from None
    specs = find_modules(model, inputs.model_options().selection())
    return costs.shape_of(model, specs.values())


def _read_config(uri: str) -> dict:
    from pathlib import Path

    from msif.storage import gcs
    from msif.storage.uri import NotFoundError, is_remote, join

    if is_remote(uri):
        where = uri if uri.endswith("config.json") else join(uri, "config.json")
        try:
            data = gcs.read_bytes(where)
        except NotFoundError:
            raise PlanError(
                f"{uri}: no config.json there (the plan needs the model's config)"
            ) from None
    else:
        path = Path(uri)
        path = path if path.is_file() else path / "config.json"
        if not path.is_file():
            raise PlanError(f"{uri}: no config.json there (the plan needs the model's config)")
        data = path.read_bytes()
        where = str(path)
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlanError(f"{where} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{where} holds a JSON {type(raw).__name__}, not a config object")
    return raw


def pipelines_of(inputs: PlanInputs) -> tuple[str, ...]:
    """The pipelines a run goes through: the full one, or the index and attribute ones."""
    return (INDEX, ATTRIBUTE) if inputs.via_index else (FULL,)


def _wanted(task: Task, methods: tuple[str, ...]) -> bool:
    return task.node not in ("precondition-queries", "score-corpus", "lookup") or (
        task.label in methods
    )


def estimate(inputs: PlanInputs, shape: ModelShape) -> Plan:
    """The plan of inputs on a model of this shape (no I/O: tests give shapes directly)."""
    c = Costs(inputs, shape)
    nodes = []
    for name in pipelines_of(inputs):
        for task in pipeline(name).tasks:
            if not _wanted(task, inputs.run_methods):
                continue
            if task.node == "score-corpus":
                est = score_corpus(c, task, rerank=name == ATTRIBUTE)
            else:
                est = ESTIMATORS[task.node](c, task)
            nodes.append(replace(est, pipeline=name))
    return Plan(inputs, shape, tuple(nodes), _assumptions(c), _reference_hours(c))


def make_plan(inputs: PlanInputs) -> Plan:
    """The plan of inputs, the model's shape read from its config."""
    return estimate(inputs, model_shape(inputs.model, inputs))


def _reference_hours(c: Costs) -> float:
    seq = c.inputs.max_length
    flops = costs.training_step_flops(c.shape, seq) * c.inputs.corpus_tokens
    if c.on_gpu:
        return flops / (c.gpu.peak(c.inputs.dtype) * c.inputs.mfu) / 3600
    return flops / c.rates["training"].value / 3600


def _assumptions(c: Costs) -> tuple[tuple[str, Figure], ...]:
    out: list[tuple[str, Figure]] = []
    if c.on_gpu:
        gpu = c.gpu
        out += [
            (f"{gpu.name} peak {c.inputs.dtype}", Figure(gpu.peak(c.inputs.dtype), gpu.source)),
            (f"{gpu.name} peak float32", Figure(gpu.fp32, gpu.source)),
            (f"{gpu.name} peak float64", Figure(gpu.fp64, gpu.source)),
            (f"{gpu.name} memory GiB", Figure(gpu.memory_gib, gpu.source)),
            ("GPU MFU", Figure(c.inputs.mfu, costs.GPU_MFU.source)),
            ("usable GPU memory", costs.GPU_MEMORY_USABLE),
            ("GPU eigh efficiency", costs.GPU_EIGH_EFFICIENCY),
        ]
    for name in ("training", "covariance", "lambda", "scoring", "eigh", "index"):
        out.append((f"CPU FLOP/s, {name}", c.rates[name]))
    out += [
        ("CPU FLOP/s, factored lookup", c.rates["lookup-factored"]),
        ("CPU FLOP/s, projected lookup", c.rates["lookup-projected"]),
        ("GCS bytes/s per pod", costs.IO_BANDWIDTH),
        ("CPU node cores", costs.CPU_NODE_THREADS_SCALE),
        ("BM25 bytes per word", BM25_BYTES_PER_WORD),
        ("BM25 words/s", BM25_WORDS_PER_S),
        ("words per token", WORDS_PER_TOKEN),
        ("request headroom", REQUEST_HEADROOM),
    ]
    return tuple(out)


# ----------------------------------------------------------------------------- output


_size = costs.size_text


def _hours(h: float) -> str:
    if h == 0:
        return "—"
    return f"{h:,.1f} h" if h >= 1 else f"{h * 60:,.1f} min" if h * 60 >= 1 else f"{h * 3600:.0f} s"


def _flops(f: float) -> str:
    return "—" if f == 0 else f"{f:.2e}"


def _refinement_text(i: PlanInputs) -> str:
    if i.precondition_options().refinement_flag is None:
        return ""
    return (
        f", refined queries ({i.refine_steps} CG steps, {i.refine_lanczos} Lanczos steps, "
        f"{i.refine_samples} sampled sequences per stage)"
    )


def format_plan(plan: Plan) -> str:
    """The plan as Markdown: the model, a row per node, the total, what does not fit."""
    i, s = plan.inputs, plan.shape
    device = i.gpu if i.gpu == CPU else f"1 × {i.gpu} per GPU pod"
    lines = [
        f"model: {i.model} ({s.model_type}, {s.parameters / 1e9:.3g} B parameters; "
        f"{len(s.specs)} tracked modules, {s.tracked_parameters / 1e9:.3g} B tracked weights)",
        f"run: {i.corpus_tokens:.3g} corpus tokens, {i.finetune_tokens:.3g} fine-tune tokens, "
        f"{i.queries} queries, {i.num_shards} shards, {i.dtype}, {device}"
        f"{f', {i.module_groups} module groups' if i.module_groups > 1 else ''}"
        f"{_refinement_text(i)}; pipelines: {', '.join(pipelines_of(i))}",
        "",
        "| node | on | pods | GPU memory/pod | RAM/pod | disk/pod | writes | FLOPs | time/pod | "
        "device-hours |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in plan.nodes:
        gpu_mem = _size(n.gpu_memory) if n.gpu_memory else "—"
        lines.append(
            f"| {n.task} | {n.runs_on} | {n.pods} | {gpu_mem} | {_size(n.host_memory)} | "
            f"{_size(n.disk)} | {_size(n.storage)} | {_flops(n.flops)} | "
            f"{_hours(n.hours_per_pod)} | {_hours(n.device_hours)} |"
        )
    big_gpu, big_host = plan.largest("gpu_memory"), plan.largest("host_memory")
    lines += [
        "",
        f"total: {plan.gpu_hours:,.1f} GPU-hours, {plan.cpu_node_hours:,.1f} CPU-node-hours, "
        f"{_size(plan.storage)} written; wall ≤ {plan.wall_hours():,.1f} h with "
        f"{i.gpus or i.num_shards} GPUs (nodes one after another)",
        *(
            f"- {name}: {t['gpu_hours']:,.1f} GPU-hours, {t['cpu_node_hours']:,.1f} "
            f"CPU-node-hours, {_size(t['storage_bytes'])} written"
            for name, t in plan.by_pipeline().items()
            if len(plan.by_pipeline()) > 1
        ),
        f"largest GPU memory: {big_gpu.task} ({_size(big_gpu.gpu_memory)}); largest RAM: "
        f"{big_host.task} ({_size(big_host.host_memory)})",
        f"reference: one training step over the corpus tokens ≈ {_hours(plan.reference_hours)} "
        "on one device",
    ]
    lines += [f"does not fit: {p}" for p in plan.problems()]
    lines += ["", "time sources:"]
    lines += [f"- {src}" for src in dict.fromkeys(n.time_source for n in plan.nodes)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


DEFAULTS = {f.name: f.default for f in fields(PlanInputs)}


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """`msif plan`."""
    p = subparsers.add_parser(
        "plan",
        help="estimate memory, storage, FLOPs and GPU-hours per pipeline node",
        description="Estimate, from a model's config.json alone, what every node of the "
        "pipeline needs: memory per pod (GPU and RAM), local disk, storage written, FLOPs and "
        "device-hours, the total and the largest-memory node. The formulas and the source of "
        "every figure are in msif.workflow.costs and docs/scale.md.",
    )
    p.add_argument(
        "--model", required=True, help="folder, config.json or gs:// prefix of the model"
    )
    p.add_argument("--corpus-tokens", type=_count, required=True, help="pre-training sample tokens")
    p.add_argument("--finetune-tokens", type=_count, required=True, help="fine-tuning data tokens")
    p.add_argument("--queries", default=DEFAULTS["queries"], type=int, help="queries (16)")
    p.add_argument(
        "--num-shards", default=DEFAULTS["num_shards"], type=int, help="shards per fan-out (4)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help=f"methods (default: all; with --via-index: {', '.join(INDEXED_METHODS)})",
    )
    p.add_argument(
        "--gpu", default=DEFAULTS["gpu"], choices=DEVICES, help="GPU of the GPU nodes, or cpu"
    )
    p.add_argument(
        "--gpus", default=DEFAULTS["gpus"], type=int, help="GPUs at once (default: one per shard)"
    )
    p.add_argument("--via-index", action="store_true", help="the index and attribute pipelines")
    p.add_argument(
        "--max-length", default=DEFAULTS["max_length"], type=int, help="tokens per document (512)"
    )
    p.add_argument(
        "--finetune-length",
        default=DEFAULTS["finetune_length"],
        type=int,
        help="tokens per fine-tune row",
    )
    p.add_argument(
        "--query-length", default=DEFAULTS["query_length"], type=int, help="tokens per query (128)"
    )
    p.add_argument(
        "--batch-size", default=DEFAULTS["batch_size"], type=int, help="sequences per batch (8)"
    )
    p.add_argument(
        "--module-groups",
        default=DEFAULTS["module_groups"],
        type=int,
        metavar="N",
        help="fit-covariance and fit-lambda in N passes, each holding one group of modules on "
        "the device (1)",
    )
    same = "as the node option of that name, with its default"
    p.add_argument(
        "--dtype",
        default=DEFAULTS["dtype"],
        choices=("float32", "bfloat16", "float16", "float64"),
        help=same,
    )
    p.add_argument(
        "--factor-dtype",
        default=DEFAULTS["factor_dtype"],
        choices=("float32", "float64"),
        help=same,
    )
    p.add_argument(
        "--query-rank", default=DEFAULTS["query_rank"], type=int, help="rank-r queries (0: dense)"
    )
    for flag in ("--refine-steps", "--refine-lanczos", "--refine-samples"):
        key = flag.removeprefix("--").replace("-", "_")
        p.add_argument(flag, default=DEFAULTS[key], type=int, help=same)
    p.add_argument("--top-k", default=DEFAULTS["top_k"], type=int, help=same)
    p.add_argument("--explain-k", default=DEFAULTS["explain_k"], type=int, help=same)
    p.add_argument(
        "--contraction", default=DEFAULTS["contraction"], choices=CONTRACTIONS, help=same
    )
    p.add_argument("--index-tier", default=DEFAULTS["index_tier"], choices=INDEX_TIERS, help=same)
    p.add_argument(
        "--index-rank", default=DEFAULTS["index_rank"], type=int, help="0: the tier's default"
    )
    p.add_argument("--index-values", default=DEFAULTS["index_values"], type=int, help=same)
    p.add_argument(
        "--index-dtype", default=DEFAULTS["index_dtype"], choices=INDEX_DTYPES, help=same
    )
    p.add_argument("--index-whitening", default=DEFAULTS["index_whitening"], type=float, help=same)
    p.add_argument("--top-c", default=DEFAULTS["top_c"], type=int, help=same)
    p.add_argument(
        "--candidates-from",
        default=DEFAULTS["candidates_from"],
        choices=("index", "bm25", "both"),
        help=same,
    )
    p.add_argument(
        "--eigendecompose-on",
        default=DEFAULTS["eigendecompose_on"],
        choices=("cpu", "gpu"),
        help="cpu: the pipeline's CPU node (today); gpu: float64 eigh on the GPU",
    )
    p.add_argument("--mfu", default=DEFAULTS["mfu"], type=float, help="assumed GPU MFU (0.4)")
    p.add_argument(
        "--statistics-precision",
        default=DEFAULTS["statistics_precision"],
        choices=costs.STATISTICS_PRECISIONS,
        help="what msif's per-module matmuls run in on a GPU (float32: today's code)",
    )
    for flag in ("--include", "--exclude", "--split-heads-pattern"):
        p.add_argument(flag, nargs="+", action="extend", default=[], metavar="REGEX", help=same)
    p.add_argument("--split-heads", action="store_true", help=same)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_plan_command)
    return p


def _count(text: str) -> int:
    """A token count: an integer, or a float such as 1e10 or 10e9 that is a whole number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens")
    return int(value)


def inputs_from_namespace(args: argparse.Namespace) -> PlanInputs:
    """PlanInputs from `msif plan`'s parsed flags."""
    names = {f.name for f in fields(PlanInputs)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for k in ("include", "exclude", "split_heads_pattern"):
        values[k] = tuple(values.get(k, ()))
    values["methods"] = tuple(dict.fromkeys(args.methods or ()))
    return PlanInputs(**values)


def _plan_command(args: argparse.Namespace) -> int:
    plan = make_plan(inputs_from_namespace(args))
    if args.json:
        json.dump(plan.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_plan(plan))
    return 0
