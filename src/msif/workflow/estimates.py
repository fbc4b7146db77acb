"""Per pipeline node, the estimate of `msif plan`: what a pod holds, writes, computes and how
long it runs, from the inputs of a plan and the model's shape (msif.workflow.costs has the
formulas and the sources of every figure; docs/scale.md explains them).

Memory is modelled as the nodes are written today: where a node holds every shard's partial
at once, or every query's gradient, the estimate says so.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from msif.attribution.precondition import METHOD_INFO, METHODS
from msif.config import (
    CONTRACTIONS,
    DEFAULT_INDEX_RANKS,
    INDEX_DTYPES,
    INDEX_TIERS,
    EigenOptions,
    FitOptions,
    IndexOptions,
    LookupOptions,
    ModelOptions,
    PreconditionOptions,
    ScoreOptions,
)
from msif.core.modules import ModuleSpec
from msif.ekfac.groups import covariance_bytes, lambda_bytes, split_modules
from msif.errors import OptionError
from msif.workflow import costs
from msif.workflow.costs import BYTES, Figure, ModelShape
from msif.workflow.dag import INDEXED_METHODS, Task

CPU = "cpu"
DEVICES = (*costs.GPUS, CPU)
# Requests the plan proposes are the estimate plus this headroom (assumed).
REQUEST_HEADROOM = Figure(1.25, "assumed: requests are the estimate plus 25 %")
# Text read per corpus token (Parquet, compressed): small next to the passes (assumed).
TEXT_BYTES_PER_TOKEN = 4
# BM25 keeps every text and a Python posting list per (term, document): peak bytes per word
# of BM25Index.build and its words/s, measured on Zipf text (docs/scale.md gives the command).
BM25_BYTES_PER_WORD = Figure(
    93.0, "measured: BM25Index.build, 320 k Zipf words, tracemalloc peak 88 B + text 5 B"
)
BM25_WORDS_PER_S = Figure(2.0e5, "measured: BM25Index.build, 1 thread, loaded 2-core machine")
WORDS_PER_TOKEN = Figure(0.75, "assumed: 0.75 words per token (English, a BPE tokenizer)")
SMALL = 64 << 20
# The defaults are msif.config's, so a plan without options plans what the pipeline runs.
_M, _S, _I, _L, _P = (
    ModelOptions(),
    ScoreOptions(),
    IndexOptions(),
    LookupOptions(),
    PreconditionOptions(),
)  # what a node writes that the plan does not size (top-k tables, reports)


@dataclass(frozen=True)
class PlanInputs:
    """What the plan is asked about; option names follow msif.config where they exist."""

    model: str
    corpus_tokens: int
    finetune_tokens: int
    queries: int = 16
    num_shards: int = 4
    methods: tuple[str, ...] = ()  # (): every method the pipelines run
    gpu: str = "H100"
    gpus: int = 0  # GPUs that run at once; 0: one per shard
    via_index: bool = False
    max_length: int = _M.max_length
    finetune_length: int = 0  # 0: max_length
    query_length: int = 128
    batch_size: int = _M.batch_size
    module_groups: int = FitOptions().module_groups
    dtype: str = _M.dtype
    factor_dtype: str = EigenOptions().factor_dtype
    query_rank: int = 0
    refine_steps: int = _P.refine_steps
    refine_lanczos: int = _P.refine_lanczos
    refine_samples: int = _P.refine_samples
    top_k: int = _S.top_k
    explain_k: int = _S.explain_k
    contraction: str = _S.contraction
    index_tier: str = _I.index_tier
    index_rank: int = 0
    index_values: int = _I.index_values
    index_dtype: str = _I.index_dtype
    index_whitening: float = _I.index_whitening
    top_c: int = _L.top_c
    candidates_from: str = _L.candidates_from
    eigendecompose_on: str = CPU
    mfu: float = costs.GPU_MFU.value
    statistics_precision: str = "float32"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    split_heads: bool = False
    split_heads_pattern: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "corpus_tokens",
            "finetune_tokens",
            "queries",
            "num_shards",
            "batch_size",
            "module_groups",
        ):
            _positive(name, getattr(self, name))
        for name in ("max_length", "query_length"):
            _positive(name, getattr(self, name), 2)
        for name in (
            "gpus",
            "finetune_length",
            "query_rank",
            "top_k",
            "explain_k",
            "index_rank",
        ):
            _positive(name, getattr(self, name), 0)
        _positive("index_values", self.index_values)
        _positive("top_c", self.top_c)
        _choice("gpu", self.gpu, DEVICES)
        _choice("dtype", self.dtype, ("float32", "bfloat16", "float16", "float64"))
        _choice("factor_dtype", self.factor_dtype, ("float32", "float64"))
        _choice("contraction", self.contraction, CONTRACTIONS)
        _choice("index_tier", self.index_tier, INDEX_TIERS)
        _choice("index_dtype", self.index_dtype, INDEX_DTYPES)
        _choice("eigendecompose_on", self.eigendecompose_on, ("cpu", "gpu"))
        _choice("statistics_precision", self.statistics_precision, costs.STATISTICS_PRECISIONS)
        LookupOptions(self.top_c, self.candidates_from)  # validates candidates_from
        self.precondition_options()  # validates the refinement options
        for m in self.methods:
            _choice("methods", m, METHODS)
        if self.via_index and not set(self.methods) <= set(INDEXED_METHODS):
            raise OptionError(
                f"--via-index serves {' and '.join(INDEXED_METHODS)} only (single-stage scores "
                "the corpus at θ_ft, which the index does not hold)"
            )
        if not (0 < self.mfu <= 1):  # NaN fails too
            raise OptionError(f"--mfu must be in (0, 1], not {self.mfu!r}")
        if self.eigendecompose_on == "gpu" and self.gpu == CPU:
            raise OptionError("--eigendecompose-on gpu needs a --gpu")

    @property
    def run_methods(self) -> tuple[str, ...]:
        """The methods planned: those asked for, else every one the pipelines run."""
        return self.methods or (INDEXED_METHODS if self.via_index else METHODS)

    @property
    def ft_length(self) -> int:
        """Tokens per fine-tuning sequence."""
        return self.finetune_length or self.max_length

    @property
    def rank(self) -> int:
        """The index rank the tier is built with."""
        return self.index_rank or DEFAULT_INDEX_RANKS[self.index_tier]

    def precondition_options(self) -> PreconditionOptions:
        """The refinement options as precondition-queries gets them."""
        return PreconditionOptions(
            refine_steps=self.refine_steps,
            refine_lanczos=self.refine_lanczos,
            refine_samples=self.refine_samples,
        )

    def model_options(self) -> ModelOptions:
        """The module selection and batch options as a node gets them."""
        return ModelOptions(
            max_length=self.max_length,
            batch_size=self.batch_size,
            include=self.include,
            exclude=self.exclude,
            split_heads=self.split_heads,
            split_heads_pattern=self.split_heads_pattern,
        )

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> PlanInputs:
        """Inverse of to_dict."""
        tuples = {f.name for f in fields(cls) if "tuple" in str(f.type)}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


def _positive(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"--{name.replace('_', '-')} must be an integer, not {value!r}")
    if value < low:
        raise OptionError(f"--{name.replace('_', '-')} must be at least {low}, not {value}")


def _choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise OptionError(
            f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(choices)}"
        )


@dataclass(frozen=True)
class NodeEstimate:
    """One task of the DAG: per pod its memory, disk and transfers; over all pods its FLOPs,
    the storage it writes and its device-hours (GPU-hours on a GPU node, node-hours on a CPU
    node)."""

    task: str
    node: str
    runs_on: str  # "gpu" or "cpu"
    pods: int
    flops: float
    host_memory: float  # bytes per pod in RAM
    storage: float  # bytes written, all pods
    hours_per_pod: float
    time_source: str
    pipeline: str = ""
    positions: float = 0.0  # tokens run through a model, all pods
    gpu_memory: float = 0.0  # bytes per pod on the device (0 on CPU nodes)
    disk: float = 0.0  # bytes per pod on local disk (fetched inputs, staged outputs)
    transfers: float = 0.0  # bytes per pod read from and written to storage
    notes: tuple[str, ...] = ()

    @property
    def device_hours(self) -> float:
        """Hours of the node's device over all its pods."""
        return self.pods * self.hours_per_pod

    @property
    def compute_hours(self) -> float:
        """hours_per_pod without the transfers."""
        return self.hours_per_pod - self.transfers / costs.IO_BANDWIDTH.value / 3600

    def to_dict(self) -> dict:
        """JSON-ready form, with device_hours."""
        d = asdict(self)
        d["notes"] = list(self.notes)
        d["device_hours"] = self.device_hours
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NodeEstimate:
        """Inverse of to_dict."""
        kept = {f.name: d[f.name] for f in fields(cls)}
        kept["notes"] = tuple(kept["notes"])
        return cls(**kept)


@dataclass(frozen=True)
class Costs:
    """What every node's estimate needs: the inputs, the model's shape, the device."""

    inputs: PlanInputs
    shape: ModelShape
    rates: dict = field(default_factory=costs.cpu_rates)

    @property
    def on_gpu(self) -> bool:
        """Whether GPU nodes have a GPU (else they run on CPU pods, one thread)."""
        return self.inputs.gpu != CPU

    @property
    def gpu(self) -> costs.Gpu | None:
        """The GPU type of the GPU nodes."""
        return costs.GPUS.get(self.inputs.gpu)

    @property
    def weights(self) -> float:
        """Bytes of the model's weights in its dtype."""
        return self.shape.parameters * BYTES[self.inputs.dtype]

    @property
    def work_bytes(self) -> int:
        """Bytes of msif's per-batch statistics (float32, float64 for a float64 model)."""
        return 8 if self.inputs.dtype == "float64" else 4

    def cov_bytes(self) -> float:
        """A covariance partial: float64 A and G of every module."""
        return 8.0 * self.shape.covariance_entries

    def eigenbasis_bytes(self) -> float:
        """An eigenbasis: eigenvectors and eigenvalues in factor_dtype."""
        fb = BYTES[self.inputs.factor_dtype]
        return fb * (self.shape.covariance_entries + self.shape.eigenvalue_entries)

    def factor_bytes(self) -> float:
        """A stage's factors: Q_A, Q_G and Λ per module in factor_dtype."""
        fb = BYTES[self.inputs.factor_dtype]
        return fb * (self.shape.covariance_entries + self.shape.tracked_parameters)

    def lambda_bytes(self) -> float:
        """A Λ partial: float64 (out × in') per module."""
        return 8.0 * self.shape.tracked_parameters

    def activations(
        self, seq: int, batch: int | None = None, tracked: tuple[ModuleSpec, ...] | None = None
    ) -> float:
        """One batch's forward and backward, with the hooks' copies of the tracked modules
        (a module group's; default every tracked module)."""
        b = batch or self.inputs.batch_size
        return costs.activation_bytes(self.shape, b, seq, self.inputs.dtype, tracked)

    def module_groups(self, weight) -> list[tuple[ModuleSpec, ...]]:
        """The module groups the fit nodes make of the tracked modules (--module-groups),
        cut as msif.ekfac.groups cuts them: contiguous, balanced by weight (bytes)."""
        specs = {s.name: s for s in self.shape.specs}
        groups = split_modules(specs, self.inputs.module_groups, weight)
        return [tuple(g.values()) for g in groups]

    def pass_seconds(self, model_flops: float, stats_flops: float, rate: str) -> float:
        """Seconds of a model pass: on a GPU the model's matmuls in its dtype and msif's
        statistics in statistics_precision, each at the assumed MFU; on the CPU both at the
        measured rate of the pass."""
        if not self.on_gpu:
            return (model_flops + stats_flops) / self.rates[rate].value
        gpu, mfu, dtype = self.gpu, self.inputs.mfu, self.inputs.dtype
        work = "float64" if dtype == "float64" else self.inputs.statistics_precision
        return model_flops / (gpu.peak(dtype) * mfu) + stats_flops / (gpu.peak(work) * mfu)

    def pass_source(self, rate: str) -> str:
        """Where a pass's time comes from."""
        if self.on_gpu:
            mfu = f"assumed: {self.inputs.mfu:.0%} of the peak on GPU for every pass"
            return f"{mfu}, not measured; vendor peaks"
        return self.rates[rate].source


def _hours(seconds: float, transfers: float) -> float:
    return (seconds + transfers / costs.IO_BANDWIDTH.value) / 3600


def _stage_data(c: Costs, stage: str) -> tuple[float, int]:
    """(positions, tokens per sequence) a stage's factors are fitted on."""
    if stage == "pt":
        return float(c.inputs.corpus_tokens), c.inputs.max_length
    return float(c.inputs.finetune_tokens), c.inputs.ft_length


def fit_covariance(c: Costs, task: Task) -> NodeEstimate:
    """GPU, ×N: Σ a aᵀ, Σ g gᵀ in float64 on the device; the partial written per shard. With
    module groups the shard is read and run once per group, the device holding the largest
    group's sums (and its hooks' copies); the statistics are computed once all the same."""
    n, (tokens, seq) = c.inputs.num_shards, _stage_data(c, task.label)
    where = "gpu" if c.on_gpu else "cpu"
    groups = c.module_groups(covariance_bytes)
    runs = len(groups)
    model = costs.frozen_pass_flops(c.shape, seq) * tokens * runs
    stats = costs.covariance_flops(c.shape, where) * tokens
    part = c.cov_bytes()
    held = max(sum(map(covariance_bytes, g)) + c.activations(seq, tracked=g) for g in groups)
    return _gpu_node(
        c,
        task,
        tokens * runs,
        model,
        stats,
        "covariance",
        c.weights + part + runs * TEXT_BYTES_PER_TOKEN * tokens / n,
        gpu=c.weights + held,
        host=c.weights + 2 * part,
        disk=c.weights + part,
        storage=n * part,
        notes=_group_notes(groups, covariance_bytes, "covariance sums"),
    )


def fit_lambda(c: Costs, task: Task) -> NodeEstimate:
    """GPU, ×N: (Q_Gᵀ DW_n Q_A)∘² summed per sequence, float64 on the device; with module
    groups one pass per group, holding that group's Λ sums and eigenvectors."""
    n, (tokens, seq) = c.inputs.num_shards, _stage_data(c, task.label)
    weight = functools.partial(lambda_bytes, vector_bytes=c.work_bytes)
    groups = c.module_groups(weight)
    runs = len(groups)
    model = costs.frozen_pass_flops(c.shape, seq) * tokens * runs
    stats = costs.lambda_flops(c.shape, seq) * tokens
    part, basis = c.lambda_bytes(), c.eigenbasis_bytes()
    # Per group: its Λ sums and every Q_A, Q_G of it, cast once to the work dtype.
    held = max(sum(map(weight, g)) + c.activations(seq, tracked=g) for g in groups)
    chunk = 4.0 * (1 << 26)  # msif.ekfac.lambdas.CHUNK_ELEMENTS of rotated gradients
    return _gpu_node(
        c,
        task,
        tokens * runs,
        model,
        stats,
        "lambda",
        c.weights + basis + part + runs * TEXT_BYTES_PER_TOKEN * tokens / n,
        gpu=c.weights + held + chunk,
        host=c.weights + basis + 2 * part,
        disk=c.weights + basis + part,
        storage=n * part,
        notes=_group_notes(groups, weight, "Λ sums and eigenvectors"),
    )


def _group_notes(groups: list[tuple[ModuleSpec, ...]], weight, what: str) -> tuple[str, ...]:
    if len(groups) == 1:
        return ()
    sizes = [sum(map(weight, g)) for g in groups]
    return (
        f"{len(groups)} module groups: the shard is read and run {len(groups)} times; the "
        f"largest group holds {costs.size_text(max(sizes))} of {what} "
        f"({len(groups[sizes.index(max(sizes))])} modules)",
    )


def eigendecompose(c: Costs, task: Task) -> NodeEstimate:
    """CPU (or GPU with --eigendecompose-on gpu), once per stage: the shards' partials are
    added one at a time (msif.nodes.runtime.sum_partials), then eigh in float64."""
    n, part, out = c.inputs.num_shards, c.cov_bytes(), c.eigenbasis_bytes()
    flops = costs.eigh_flops(c.shape)
    on_gpu = c.inputs.eigendecompose_on == "gpu"
    if on_gpu:
        rate = c.gpu.fp64 * costs.GPU_EIGH_EFFICIENCY.value
        source = f"{costs.GPU_EIGH_EFFICIENCY.source}; vendor fp64 peak"
    else:
        rate = c.rates["eigh"].value * _cpu_cores("eigendecompose")
        source = f"{c.rates['eigh'].source}; {_CORES_NOTE}"
    largest = max(max(s.in_dim, s.block_size) for s in c.shape.specs)
    transfers = n * part + out
    return NodeEstimate(
        task=task.display_name,
        node=task.node,
        runs_on="gpu" if on_gpu else "cpu",
        pods=1,
        flops=flops,
        # The running sum and one partial, every float64 eigenvector, the cast copy to save.
        host_memory=costs.BASE_PROCESS_BYTES + HELD_PARTIALS * part + 2 * out,
        storage=out,
        hours_per_pod=_hours(flops / rate, transfers),
        time_source=source,
        gpu_memory=8.0 * 2 * largest**2 if on_gpu else 0.0,
        disk=part + out,  # a downloaded partial is dropped once added
        transfers=transfers,
        notes=(f"adds one covariance partial at a time; the largest block is {largest}²",),
    )


# What a reducer holds at its peak (msif.nodes.runtime.sum_partials): the running sum and the
# partial being added into it, for any shard count.
HELD_PARTIALS = 2
_CORES_NOTE = "× the node's CPU request (" + costs.CPU_NODE_THREADS_SCALE.source + ")"


def build_factors(c: Costs, task: Task) -> NodeEstimate:
    """CPU, once per stage: the Λ partials added one at a time; factors written."""
    n, part = c.inputs.num_shards, c.lambda_bytes()
    basis, out = c.eigenbasis_bytes(), c.factor_bytes()
    transfers = n * part + basis + out
    return NodeEstimate(
        task=task.display_name,
        node=task.node,
        runs_on="cpu",
        pods=1,
        flops=float(n * c.shape.tracked_parameters),
        host_memory=costs.BASE_PROCESS_BYTES + HELD_PARTIALS * part + basis + 2 * out,
        storage=out,
        hours_per_pod=_hours(0.0, transfers),
        time_source=f"transfers only: {costs.IO_BANDWIDTH.source} (the sums are cheap adds)",
        disk=part + basis + out,  # a downloaded partial is dropped once added
        transfers=transfers,
        notes=("adds one Λ partial at a time",),
    )


def precondition_queries(c: Costs, task: Task) -> NodeEstimate:
    """GPU, once per method: every query's dense gradient of every module at once (and its
    preconditioned copy) on the device; the stages' factors in RAM."""
    q, seq, method, rank = c.inputs.queries, c.inputs.query_length, task.label, c.inputs.query_rank
    positions = float(q * seq)
    model = costs.frozen_pass_flops(c.shape, seq) * positions
    stats = 2.0 * c.shape.tracked_parameters * positions  # Σ_t g_t a_tᵀ per query
    stats += costs.precondition_flops(c.shape, method, q, rank)
    info = METHOD_INFO[method]
    factors = len(dict.fromkeys((*info.stages, info.corpus_model))) * c.factor_bytes()
    dense = 4.0 * q * c.shape.tracked_parameters
    stored = costs.stored_query_bytes(c.shape, q, rank)
    acts = c.activations(seq, min(q, c.inputs.batch_size))
    refined = _refinement(c, info.stages)
    return _gpu_node(
        c,
        task,
        positions + refined["positions"],
        model + refined["model"],
        stats + refined["vectors"],
        "training",
        c.weights + factors + stored + refined["weights"],
        # The gradients stay while the preconditioned copies are made; low-rank ones are small.
        gpu=c.weights
        + refined["weights"]
        + dense
        + (stored if rank else dense)
        + max(acts, refined["gpu"]),
        host=c.weights + factors + 2 * stored + refined["weights"],
        disk=c.weights + factors + stored + refined["weights"],
        storage=stored,
        pods=1,
        source_note="precondition-queries is not benchmarked: the training step's CPU rate",
        notes=refined["notes"],
    )


def _refinement(c: Costs, stages: tuple[str, ...]) -> dict:
    """What --refine-steps / --refine-lanczos add to precondition-queries: per refined stage
    the exact products over its sample (msif.attribution.refine), the CG and Lanczos vectors
    on the device, and the pre-trained model beside the fine-tuned one for multi-stage."""
    i = c.inputs
    out = {"positions": 0.0, "model": 0.0, "vectors": 0.0, "gpu": 0.0, "weights": 0.0}
    if i.precondition_options().refinement_flag is None or not stages:
        return out | {"notes": ()}
    lengths = {"ft": i.ft_length, "pt": i.max_length}
    tokens = {"ft": i.finetune_tokens, "pt": i.corpus_tokens}
    for stage in stages:
        seq = lengths[stage]
        # The sample is at most the stage's whole data.
        sampled = min(float(i.refine_samples), max(1.0, tokens[stage] / seq))
        passes, vectors = costs.refinement_work(
            c.shape, i.queries, i.refine_steps, i.refine_lanczos, sampled
        )
        out["positions"] += passes * seq
        out["model"] += passes * seq * costs.product_pass_flops(c.shape, seq)
        out["vectors"] += vectors
        # A pass holds about batch-size sequences (copies, one per query), with tangents.
        held = costs.refinement_bytes(c.shape, i.queries, i.refine_lanczos)
        out["gpu"] = max(out["gpu"], held + 2 * c.activations(seq))
    if "pt" in stages:
        out["weights"] = c.weights
    note = (
        f"refinement: {i.refine_steps} CG steps (+1 residual) × {i.queries} queries and "
        f"{i.refine_lanczos} Lanczos steps, each a pass over at most {i.refine_samples} sampled "
        f"sequences, per stage ({', '.join(stages)})",
    )
    return out | {"notes": note}


def _candidate_docs(c: Costs) -> float:
    """Documents an exact rerank scores per method: the candidates, at most the corpus."""
    sources = 2 if c.inputs.candidates_from == "both" else 1
    docs = c.inputs.corpus_tokens / c.inputs.max_length
    return min(docs, float(sources * c.inputs.queries * c.inputs.top_c))


def score_corpus(c: Costs, task: Task, rerank: bool = False) -> NodeEstimate:
    """GPU, ×N per method: one forward and backward per document at the corpus model, each
    module contracted with the stacked queries; the explained documents once more."""
    i, n, seq, rank = c.inputs, c.inputs.num_shards, c.inputs.max_length, c.inputs.query_rank
    docs = _candidate_docs(c) if rerank else i.corpus_tokens / seq
    positions = docs * seq
    explained = min(docs, float(n * i.queries * i.explain_k)) * seq
    model = costs.frozen_pass_flops(c.shape, seq) * (positions + explained)
    stats = positions * costs.scoring_flops(
        c.shape, i.queries, rank, i.batch_size, seq, i.contraction
    )
    stats += explained * costs.scoring_flops(c.shape, i.queries, rank, 1, seq, "per-token")
    stored = costs.stored_query_bytes(c.shape, i.queries, rank)
    held = costs.query_bytes_on_device(c.shape, i.queries, rank, i.batch_size, seq, i.contraction)
    transient = costs.largest_gradient_bytes(c.shape, i.batch_size)
    text = TEXT_BYTES_PER_TOKEN * i.corpus_tokens / n  # a rerank still reads its whole shard
    notes = ("an exact rerank of the candidates; it still reads its whole shard",) * rerank
    return _gpu_node(
        c,
        task,
        positions + explained,
        model,
        stats,
        "scoring",
        c.weights + stored + text,
        gpu=c.weights + held + transient + c.activations(seq),
        host=c.weights + stored,
        disk=c.weights + stored,
        storage=n * (i.queries * i.explain_k * seq * 4.0) + SMALL,
        notes=notes,
    )


def index(c: Costs, task: Task) -> NodeEstimate:
    """GPU, ×N: every document's top-r triplets per module (factored), or its sparse
    eigenbasis triplets (projected); the shard's index is held in RAM until it is written."""
    i, n, seq = c.inputs, c.inputs.num_shards, c.inputs.max_length
    docs = i.corpus_tokens / seq
    rotate = i.index_tier == "projected" or i.index_whitening > 0
    model = costs.frozen_pass_flops(c.shape, seq) * docs * seq
    stats = docs * costs.index_document_flops(c.shape, seq, i.rank, rotate)
    per_doc = index_bytes_per_doc(c)
    shard, factors = docs / n * per_doc, c.factor_bytes()
    vectors = c.work_bytes * c.shape.covariance_entries if rotate else 0.0
    transient = costs.largest_gradient_bytes(c.shape, i.batch_size)
    return _gpu_node(
        c,
        task,
        docs * seq,
        model,
        stats,
        "index",
        c.weights + factors + shard + TEXT_BYTES_PER_TOKEN * i.corpus_tokens / n,
        gpu=c.weights + vectors + c.activations(seq) + transient,
        host=c.weights + factors + 2 * shard,
        disk=c.weights + factors + shard,
        storage=docs * per_doc,
        notes=(f"{i.index_tier} tier, rank {i.rank}, {per_doc:,.0f} bytes per document",),
    )


def index_bytes_per_doc(c: Costs) -> float:
    """Bytes one document takes in the index tier asked for."""
    i = c.inputs
    if i.index_tier == "factored":
        return costs.factored_index_bytes(c.shape, i.rank, i.index_dtype)
    return costs.projected_index_bytes(i.index_values, i.index_dtype)


def lookup(c: Costs, task: Task) -> NodeEstimate:
    """CPU, once per method: every index shard loaded at once, scored against every query."""
    i = c.inputs
    docs = i.corpus_tokens / i.max_length
    whole = docs * index_bytes_per_doc(c)
    stored = costs.stored_query_bytes(c.shape, i.queries, i.query_rank)
    cores = _cpu_cores("lookup")
    if i.index_tier == "factored":
        flops = 2.0 * i.rank * c.shape.tracked_parameters * docs * i.queries
        rate, factors, rotations = "lookup-factored", 0.0, 0.0
    else:
        cells = costs.projected_cells(c.shape, i.index_values, i.rank)
        flops = 2.0 * cells * docs * i.queries
        rate, factors = "lookup-projected", c.factor_bytes()
        # The queries rotated into the eigenbasis: dense matmuls, at the training step's rate.
        rotations = costs.precondition_flops(c.shape, "single-stage", i.queries, 0)
    seconds = flops / (c.rates[rate].value * cores)
    seconds += rotations / (c.rates["training"].value * cores)
    flops += rotations
    transfers = whole + stored + factors
    return NodeEstimate(
        task=task.display_name,
        node=task.node,
        runs_on="cpu",
        pods=1,
        flops=flops,
        # The index, the queries, the factors and the float64 (Q, documents) scores, twice.
        host_memory=costs.BASE_PROCESS_BYTES + whole + stored + factors + 16.0 * i.queries * docs,
        storage=SMALL,
        hours_per_pod=_hours(seconds, transfers),
        time_source=f"{c.rates[rate].source}; {_CORES_NOTE}",
        disk=transfers,
        transfers=transfers,
        notes=("holds every index shard at once",),
    )


def bm25(c: Costs, task: Task) -> NodeEstimate:
    """CPU, once: the whole corpus text and its inverted index in one process."""
    words = c.inputs.corpus_tokens * WORDS_PER_TOKEN.value
    text = TEXT_BYTES_PER_TOKEN * c.inputs.corpus_tokens
    return NodeEstimate(
        task=task.display_name,
        node=task.node,
        runs_on="cpu",
        pods=1,
        flops=0.0,
        host_memory=costs.BASE_PROCESS_BYTES + words * BM25_BYTES_PER_WORD.value,
        storage=SMALL,
        hours_per_pod=_hours(words / BM25_WORDS_PER_S.value, text),
        time_source=f"{BM25_WORDS_PER_S.source}; {WORDS_PER_TOKEN.source}",
        transfers=text,
        notes=("pure Python on one core: more CPUs do not make it faster",),
    )


def rank(c: Costs, task: Task) -> NodeEstimate:
    """CPU, once: merges every shard's top-k; small."""
    return NodeEstimate(
        task=task.display_name,
        node=task.node,
        runs_on="cpu",
        pods=1,
        flops=0.0,
        host_memory=float(costs.BASE_PROCESS_BYTES),
        storage=SMALL,
        hours_per_pod=0.0,
        time_source="not modelled: top-k merges and a report, seconds",
    )


def _cpu_cores(node: str) -> float:
    from msif.pipelines.build import CPU_NODES

    return float(CPU_NODES[node].cpu) * costs.CPU_NODE_THREADS_SCALE.value


def _gpu_node(
    c: Costs,
    task: Task,
    positions: float,
    model: float,
    stats: float,
    rate: str,
    transfers: float,
    *,
    gpu: float,
    host: float,
    disk: float,
    storage: float,
    pods: int | None = None,
    source_note: str = "",
    notes: tuple[str, ...] = (),
) -> NodeEstimate:
    """A node that runs a model: its pods split the positions (and FLOPs) evenly. On CPU
    pods the device's bytes are RAM."""
    pods = pods or c.inputs.num_shards
    source = c.pass_source(rate)
    if source_note and not c.on_gpu:
        source = f"{source_note}: {source}"
    return NodeEstimate(
        task=task.display_name,
        node=task.node,
        runs_on="gpu",
        pods=pods,
        flops=model + stats,
        host_memory=costs.BASE_PROCESS_BYTES + host + (0.0 if c.on_gpu else gpu),
        storage=storage,
        hours_per_pod=_hours(c.pass_seconds(model / pods, stats / pods, rate), transfers),
        time_source=source,
        positions=positions,
        gpu_memory=gpu if c.on_gpu else 0.0,
        disk=disk,
        transfers=transfers,
        notes=notes,
    )


ESTIMATORS = {
    "fit-covariance": fit_covariance,
    "eigendecompose": eigendecompose,
    "fit-lambda": fit_lambda,
    "build-factors": build_factors,
    "precondition-queries": precondition_queries,
    "score-corpus": score_corpus,
    "index": index,
    "lookup": lookup,
    "bm25": bm25,
    "rank": rank,
}
