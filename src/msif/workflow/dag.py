"""The pipelines' DAG, written once: the KFP pipelines, the in-process runner and the tests all
walk these tasks.

Three pipelines select and wire the same tasks (`PIPELINES`): `multi-stage-influence` runs
everything; `index` fits the pre-train factors and indexes the corpus at θ_pt, once per
pre-trained model and corpus; `attribute` takes those outputs as URIs (`Imported`) and runs
the fine-tune side, the index lookup and the exact rerank of its candidates, per fine-tune.

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
GPU_NODES = frozenset(
    {"fit-covariance", "fit-lambda", "precondition-queries", "index", "score-corpus"}
)
# The pipelines, by name; each compiles to pipelines/<name with underscores>.yaml.
FULL, INDEX, ATTRIBUTE = "multi-stage-influence", "index", "attribute"
PIPELINES = (FULL, INDEX, ATTRIBUTE)
# The index holds θ_pt's document gradients: it serves the methods whose corpus side is θ_pt.
INDEXED_METHODS = tuple(m for m in METHODS if METHOD_INFO[m].corpus_model == "pt")
# The data each stage's curvature is fitted on, at that stage's model.
STAGE_DATA = {"pt": ("pt_model_uri", "corpus_uri"), "ft": ("ft_model_uri", "finetune_data_uri")}
URI_PARAMETERS = ("pt_model_uri", "ft_model_uri", "corpus_uri", "finetune_data_uri", "queries_uri")
# Every task that loads θ_ft gets θ_pt as `base_model`: a PEFT (LoRA) adapter given as
# ft_model_uri is merged into it (a full fine-tuned model ignores it).
FT_BASE = {"base_model": "pt_model_uri"}
# What precondition-queries samples when refine_steps > 0 (unread otherwise): each stage's data
# and θ_pt (θ_ft is its own model).
REFINE_DATA = {
    "pt_model": "pt_model_uri",
    "corpus": "corpus_uri",
    "finetune_data": "finetune_data_uri",
}


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


@dataclass(frozen=True)
class Imported:
    """A producer a pipeline does not run: its output is a URI parameter, from another run.

    sharded: the parameter is a list of URIs, every shard's output (what a fan-in collects).
    """

    task_id: str
    parameter: str
    sharded: bool = False


@dataclass(frozen=True)
class Pipeline:
    """A selection and wiring of tasks, each after the tasks (or imports) it reads."""

    name: str
    tasks: tuple[Task, ...]
    imported: tuple[Imported, ...] = ()

    @property
    def module(self) -> str:
        """Its module in msif.pipelines (and the stem of its compiled YAML)."""
        return self.name.replace("-", "_")


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


def _method_tasks(method: str, *, indexed: bool = False) -> list[Task]:
    """indexed: score only the candidates an index lookup found (exact rerank)."""
    spec = METHOD_INFO[method]
    # The corpus model's own factors come too: their fingerprint names the model the corpus
    # must be scored with (gradient-dot applies no factors, but needs that check).
    stages = dict.fromkeys((*spec.stages, spec.corpus_model))
    factors = {f"{s}_factors": f"build-factors-{s}" for s in stages}
    queries = {"model": "ft_model_uri", "queries": "queries_uri", **FT_BASE, **REFINE_DATA}
    corpus = {"model": f"{spec.corpus_model}_model_uri", "corpus": "corpus_uri"}
    if spec.corpus_model == "ft":
        corpus.update(FT_BASE)
    preconditioned = f"precondition-queries-{method}"
    out = [Task("precondition-queries", method, False, queries, {"method": method}, factors)]
    scoring = {"preconditioned": preconditioned}
    if indexed:
        lookup = {"index": "index", "preconditioned": preconditioned}
        lookup["pt_factors"] = "build-factors-pt"  # a projected index needs its eigenbasis
        lookup["bm25"] = "bm25"  # for candidates_from bm25 or both
        out.append(Task("lookup", method, inputs=lookup))
        scoring["candidates"] = f"lookup-{method}"
    out.append(Task("score-corpus", method, True, corpus, inputs=scoring))
    return out


def _bm25_and_rank(methods: tuple[str, ...]) -> list[Task]:
    tables = {"corpus": "corpus_uri", "queries": "queries_uri"}
    inputs = {scores_input(m): f"score-corpus-{m}" for m in methods}
    inputs.update(bm25_scores="bm25", pt_factors="build-factors-pt", ft_factors="build-factors-ft")
    return [Task("bm25", parameters=tables), Task("rank", parameters=tables, inputs=inputs)]


def _full() -> Pipeline:
    out = _stage_tasks("pt") + _stage_tasks("ft")
    for method in METHODS:
        out += _method_tasks(method)
    return Pipeline(FULL, tuple(out + _bm25_and_rank(METHODS)))


def _index() -> Pipeline:
    corpus = {"model": "pt_model_uri", "corpus": "corpus_uri"}
    indexing = Task(
        "index", sharded=True, parameters=corpus, inputs={"pt_factors": "build-factors-pt"}
    )
    return Pipeline(INDEX, (*_stage_tasks("pt"), indexing))


def _attribute() -> Pipeline:
    bm25, rank = _bm25_and_rank(INDEXED_METHODS)
    out = [*_stage_tasks("ft"), bm25]  # bm25 first: a lookup may take its candidates
    for method in INDEXED_METHODS:
        out += _method_tasks(method, indexed=True)
    imported = (
        Imported("build-factors-pt", "pt_factors_uri"),
        Imported("index", "index_uris", True),
    )
    return Pipeline(ATTRIBUTE, (*out, rank), imported)


def pipeline(name: str = FULL) -> Pipeline:
    """The pipeline called name (one of PIPELINES)."""
    builders = {FULL: _full, INDEX: _index, ATTRIBUTE: _attribute}
    if name not in builders:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    return builders[name]()


def tasks(name: str = FULL) -> list[Task]:
    """Every task of pipeline name, each after the tasks it reads."""
    return list(pipeline(name).tasks)


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
