"""The pipeline's DAG, written once: the KFP pipeline, the in-process runner and the tests all
walk these tasks.

A task runs one node (its component) with three kinds of arguments: URIs taken from pipeline
parameters of another name (`parameters`), fixed values (`constants`) and the outputs of
earlier tasks (`inputs`; a sharded producer's outputs arrive as a list, its fan-in). Every
other argument a component has is the pipeline parameter of the same name (the option rule of
msif.config). A sharded task also gets `shard` and `num_shards` and runs once per shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from msif.attribution.precondition import METHOD_INFO, METHODS
from msif.config import OPTION_CLASSES

# Nodes that run a model ask for an accelerator; reductions, BM25 and ranking run on CPUs.
GPU_NODES = frozenset({"fit-covariance", "fit-lambda", "precondition-queries", "score-corpus"})
# The data each stage's curvature is fitted on, at that stage's model.
STAGE_DATA = {"pt": ("pt_model_uri", "corpus_uri"), "ft": ("ft_model_uri", "finetune_data_uri")}
URI_PARAMETERS = ("pt_model_uri", "ft_model_uri", "corpus_uri", "finetune_data_uri", "queries_uri")
# Every task that loads θ_ft gets θ_pt as `base_model`: a PEFT (LoRA) adapter given as
# ft_model_uri is merged into it (a full fine-tuned model ignores it).
FT_BASE = {"base_model": "pt_model_uri"}


@dataclass(frozen=True)
class Task:
    """One node run: e.g. node `score-corpus`, label `multi-stage`."""

    node: str
    label: str = ""
    sharded: bool = False
    parameters: dict[str, str] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Unique within the DAG: node name and label."""
        return f"{self.node}-{self.label}" if self.label else self.node

    @property
    def display_name(self) -> str:
        """What the Kubeflow UI shows: the node name, then the stage or method."""
        return f"{self.node} ({self.label})" if self.label else self.node

    @property
    def gpu(self) -> bool:
        """Whether the task asks for an accelerator."""
        return self.node in GPU_NODES


def scores_input(method: str) -> str:
    """The rank component's argument that collects one method's shard scores."""
    return method.replace("-", "_") + "_scores"


def _stage_tasks(stage: str) -> list[Task]:
    model, data = STAGE_DATA[stage]
    uris, fixed = {"model": model, "data": data}, {"stage": stage}
    if stage == "ft":
        uris.update(FT_BASE)
    eigen = f"eigendecompose-{stage}"
    return [
        Task("fit-covariance", stage, True, uris, fixed),
        Task("eigendecompose", stage, inputs={"partials": f"fit-covariance-{stage}"}),
        Task("fit-lambda", stage, True, uris, fixed, {"eigenbasis": eigen}),
        Task(
            "build-factors", stage, inputs={"eigenbasis": eigen, "partials": f"fit-lambda-{stage}"}
        ),
    ]


def _method_tasks(method: str) -> list[Task]:
    spec = METHOD_INFO[method]
    # The corpus model's own factors come too: their fingerprint names the model the corpus
    # must be scored with (gradient-dot applies no factors, but needs that check).
    stages = dict.fromkeys((*spec.stages, spec.corpus_model))
    factors = {f"{s}_factors": f"build-factors-{s}" for s in stages}
    queries = {"model": "ft_model_uri", "queries": "queries_uri", **FT_BASE}
    corpus = {"model": f"{spec.corpus_model}_model_uri", "corpus": "corpus_uri"}
    if spec.corpus_model == "ft":
        corpus.update(FT_BASE)
    return [
        Task("precondition-queries", method, False, queries, {"method": method}, factors),
        Task(
            "score-corpus",
            method,
            True,
            corpus,
            inputs={"preconditioned": f"precondition-queries-{method}"},
        ),
    ]


def tasks() -> list[Task]:
    """Every task, each after the tasks it reads."""
    out = _stage_tasks("pt") + _stage_tasks("ft")
    for method in METHODS:
        out += _method_tasks(method)
    out.append(Task("bm25", parameters={"corpus": "corpus_uri", "queries": "queries_uri"}))
    inputs = {scores_input(m): f"score-corpus-{m}" for m in METHODS}
    inputs.update(bm25_scores="bm25", pt_factors="build-factors-pt", ft_factors="build-factors-ft")
    out.append(
        Task("rank", parameters={"corpus": "corpus_uri", "queries": "queries_uri"}, inputs=inputs)
    )
    return out


def arguments(task: Task, accepted, params: dict[str, Any], produced: dict[str, Any]) -> dict:
    """A task's component arguments: same-name pipeline parameters the component accepts,
    its named URIs and constants, and `produced[task id]` for every input."""
    args = {k: v for k, v in params.items() if k in accepted}
    args.update({arg: params[p] for arg, p in task.parameters.items()})
    args.update(task.constants)
    args.update({arg: produced[producer] for arg, producer in task.inputs.items()})
    return args


def option_parameters(*options: Any) -> dict[str, Any]:
    """Pipeline parameter values of option objects: None as 0.0 (KFP floats cannot be None),
    tuples as lists; `progress` and `method` are not pipeline parameters."""
    values: dict[str, Any] = {}
    for obj in options:
        for f in fields(obj):
            if f.name in ("progress", "method"):
                continue
            v = getattr(obj, f.name)
            values[f.name] = 0.0 if v is None else list(v) if isinstance(v, tuple) else v
    return values


def default_option_parameters() -> dict[str, Any]:
    """Every option's pipeline parameter with its msif.config default."""
    return option_parameters(*(cls() for cls in OPTION_CLASSES))
