"""The cost model behind `msif plan`: hardware figures, calibrations and per-pass formulas.

Every figure carries its source: a vendor datasheet, a measurement recorded in
benchmarks/RESULTS.md, or an assumption. FLOPs count a multiply-add as two. Per position
means per token run through the model (every position of a padded batch counts).

Forward ≈ 2·P_mm + 4·n_layers·L·d_attn per position (P_mm: weights of every matmul, the LM
head included; attention over the L × L grid the masked kernels compute); a training step's
backward is twice that (activations and weights). msif's passes freeze the weights, so their
backward reaches the activations only (one forward's worth of matmuls, twice the attention)
and per module they add their own statistics, computed in float32 whatever the model's dtype
(msif.core.hooks upcasts a and g):

- covariance: Σ a aᵀ and Σ g gᵀ per scored position, the halved Gram products of
  msif.core.linalg.gram (leaf 256 on CPU, 1024 on GPU);
- Λ: every position's a and g rotated into the eigenbasis, 2·(in'² + out·bs), and each
  sequence's rotated gradient, 2·out·in' per position, squared and summed per sequence;
- scoring: per module the cheaper path of msif.attribution.scoring.path_costs;
- eigendecomposition: ≈ 4·n³ per block in float64 (LAPACK syevd: 4/3·n³ to tridiagonal form,
  ~2·n³ to apply the reflectors to the eigenvectors, the divide and conquer in between).

Times: FLOPs / (peak × efficiency). On the CPU the efficiency of each pass comes from the
repository's own measurements (CALIBRATIONS); on a GPU it is an assumed model-FLOPs
utilisation until benchmarks/gpu.sh has measured one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from msif.core.modules import ModuleSpec
from msif.errors import MsifError

GIB = 1 << 30
BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
EIGH_FLOPS_PER_N3 = 4.0
# Python, torch and transformers in a node process before any tensor: 836 MiB peak RSS
# (benchmarks/RESULTS.md "Scaling", corpus-size table), rounded up.
BASE_PROCESS_BYTES = GIB
GRAM_LEAF = {"cpu": 256, "gpu": 1024}


class PlanError(MsifError):
    """A model config or plan input the cost model cannot use."""


@dataclass(frozen=True)
class Figure:
    """A number and where it came from."""

    value: float
    source: str

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"value": self.value, "source": self.source}


@dataclass(frozen=True)
class Gpu:
    """Vendor peak figures of one GPU (dense, no sparsity), FLOP/s and bytes."""

    name: str
    bf16: float
    tf32: float
    fp32: float
    fp64: float
    memory_gib: float
    gke_accelerator: str
    source: str

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s of matmuls in dtype: "float32" without TF32 (torch's default for
        matmuls), "tf32" with it, half precision on the tensor cores."""
        peaks = {"float64": self.fp64, "float32": self.fp32, "tf32": self.tf32}
        return peaks.get(dtype, self.bf16)


GPUS = {
    "H100": Gpu(
        "H100",
        989e12,
        495e12,
        67e12,
        67e12,
        80,
        "nvidia-h100-80gb",
        "vendor: NVIDIA H100 SXM datasheet (dense)",
    ),
    "H200": Gpu(
        "H200",
        989e12,
        495e12,
        67e12,
        67e12,
        141,
        "nvidia-h200-141gb",
        "vendor: NVIDIA H200 SXM datasheet (dense)",
    ),
    "A100": Gpu(
        "A100",
        312e12,
        156e12,
        19.5e12,
        19.5e12,
        80,
        "nvidia-a100-80gb",
        "vendor: NVIDIA A100 80GB SXM datasheet (dense)",
    ),
    "L4": Gpu(
        "L4",
        121e12,
        60e12,
        30.3e12,
        0.47e12,
        24,
        "nvidia-l4",
        "vendor: NVIDIA L4 datasheet (dense; fp64 not listed: 1/64 of fp32, as on Ada GPUs)",
    ),
}
# What msif's per-module statistics run in on a GPU: float32 today (msif.core.hooks upcasts
# a and g and torch leaves TF32 off for matmuls).
STATISTICS_PRECISIONS = ("float32", "tf32", "bfloat16")
# The share of a GPU's memory the plan lets a pod use: the CUDA context and the caching
# allocator's fragmentation take the rest (assumed).
GPU_MEMORY_USABLE = Figure(0.95, "assumed: 5 % of GPU memory for the CUDA context and allocator")
GPU_MFU = Figure(0.40, "assumed: 40 % of the dtype's peak on GPU for every pass, not measured")
GPU_EIGH_EFFICIENCY = Figure(
    0.02,
    "assumed: float64 eigh on GPU at 2 % of the fp64 peak (cuSOLVER syevd is bound by its "
    "memory-bound tridiagonal reduction), not measured",
)
IO_BANDWIDTH = Figure(0.5e9, "assumed: 0.5 GB/s per pod to and from GCS, not measured")
CPU_NODE_THREADS_SCALE = Figure(
    1.0, "assumed: a CPU node's cores speed its matmuls and eigh up linearly"
)


# ----------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a causal LM, read from its config (no weights)."""

    model_type: str
    parameters: int  # unique parameters (tied weights once)
    matmul_parameters: int  # weights of every Linear/Conv1D, the LM head included
    layers: int
    attention_width: int  # heads × head size: the width of Q·Kᵀ and attention × V
    vocab: int
    hidden: int
    block_linear_io: int  # Σ in + out over every linear of the blocks, tracked or not
    specs: tuple[ModuleSpec, ...]  # the tracked modules, msif's own selection

    @property
    def tracked_parameters(self) -> int:
        """Σ out·in' over tracked modules: entries of a gradient, of Λ, of a dense query."""
        return sum(s.out_features * s.in_dim for s in self.specs)

    @property
    def covariance_entries(self) -> int:
        """Σ in'² + blocks·bs²: the entries of every A and G."""
        return sum(s.in_dim**2 + s.num_blocks * s.block_size**2 for s in self.specs)

    @property
    def eigenvalue_entries(self) -> int:
        """Σ in' + out: eigenvalues of every A and G."""
        return sum(s.in_dim + s.out_features for s in self.specs)

    def to_dict(self) -> dict:
        """JSON-ready form; modules of equal shape are counted together."""
        shapes: dict[tuple, int] = {}
        for s in self.specs:
            key = (s.out_features, s.in_dim, s.block_size)
            shapes[key] = shapes.get(key, 0) + 1
        return {
            "model_type": self.model_type,
            "parameters": self.parameters,
            "matmul_parameters": self.matmul_parameters,
            "layers": self.layers,
            "attention_width": self.attention_width,
            "vocab": self.vocab,
            "hidden": self.hidden,
            "block_linear_io": self.block_linear_io,
            "tracked_modules": len(self.specs),
            "tracked_parameters": self.tracked_parameters,
            "module_shapes": [
                {"out": o, "in": i, "block_size": b, "count": n} for (o, i, b), n in shapes.items()
            ],
            "modules": [s.to_dict() for s in self.specs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        """Inverse of to_dict."""
        return cls(
            d["model_type"],
            d["parameters"],
            d["matmul_parameters"],
            d["layers"],
            d["attention_width"],
            d["vocab"],
            d["hidden"],
            d["block_linear_io"],
            tuple(ModuleSpec.from_dict(m) for m in d["modules"]),
        )


def shape_of(model, specs: Iterable[ModuleSpec]) -> ModelShape:
    """The shape facts of a model (real or on the meta device) and its tracked modules."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from msif.core.modules import head_size_of, in_block

    cfg = model.config
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)}
    matmul = sum(m.weight.numel() for m in linears.values())
    io = sum(sum(m.weight.shape) for n, m in linears.items() if in_block(n))
    unique = {id(p): p.numel() for p in model.parameters()}
    layers = _config_int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _config_int(cfg, "num_attention_heads", "n_head")
    hidden = _config_int(cfg, "hidden_size", "n_embd", "d_model")
    return ModelShape(
        model_type=cfg.model_type,
        parameters=sum(unique.values()),
        matmul_parameters=matmul,
        layers=layers,
        attention_width=heads * (head_size_of(model) or hidden // heads),
        vocab=_config_int(cfg, "vocab_size"),
        hidden=hidden,
        block_linear_io=io,
        specs=tuple(specs),
    )


def _config_int(cfg, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise PlanError(f"the model config has none of {', '.join(names)}: cannot size the model")


# ----------------------------------------------------------------------------- per position


def forward_flops(shape: ModelShape, seq: int) -> float:
    """FLOPs of one forward pass per position."""
    return 2.0 * shape.matmul_parameters + 4.0 * shape.layers * seq * shape.attention_width


def training_step_flops(shape: ModelShape, seq: int) -> float:
    """Forward + backward with weight gradients, per position: the reference pass."""
    attention = 4.0 * shape.layers * seq * shape.attention_width
    return 6.0 * shape.matmul_parameters + 3.0 * attention


def frozen_pass_flops(shape: ModelShape, seq: int) -> float:
    """Forward + backward to the activations only (msif's passes), per position."""
    attention = 4.0 * shape.layers * seq * shape.attention_width
    return 4.0 * shape.matmul_parameters + 3.0 * attention


@functools.cache
def gram_macs(d: int, leaf: int) -> int:
    """Multiply-adds per row of msif.core.linalg.gram on width d (off-diagonal blocks once)."""
    if d <= leaf:
        return d * d
    h = d // 2
    return gram_macs(h, leaf) + gram_macs(d - h, leaf) + h * (d - h)


def covariance_flops(shape: ModelShape, where: str) -> float:
    """Statistics of the covariance pass per scored position: Σ a aᵀ and Σ g gᵀ."""
    leaf = GRAM_LEAF[where]
    return 2.0 * sum(
        gram_macs(s.in_dim, leaf) + s.num_blocks * gram_macs(s.block_size, leaf)
        for s in shape.specs
    )


def lambda_flops(shape: ModelShape, seq: int) -> float:
    """Statistics of the Λ pass per position: rotations, per-sequence gradients, squares."""
    total = 0.0
    for s in shape.specs:
        o, i, bs = s.out_features, s.in_dim, s.block_size
        total += 2.0 * (i * i + o * bs) + 2.0 * o * i + 2.0 * o * i / seq
    return total


def scoring_path(spec: ModuleSpec, queries: int, rank: int, batch: int, seq: int) -> str:
    """The path msif.attribution.scoring.choose_path takes for a module ("auto")."""
    costs = scoring_macs(spec, queries, rank, batch, seq)
    return min(costs, key=costs.get)


def scoring_macs(spec: ModuleSpec, queries: int, rank: int, batch: int, seq: int) -> dict:
    """Multiply-adds per batch of each path (msif.attribution.scoring.path_costs)."""
    q, o, i, b, t = queries, spec.out_features, spec.in_dim, batch, seq
    per_token = b * t * q * rank * (i + o + 1) if rank else q * b * t * (o * i + min(o, i))
    return {"materialise": b * t * o * i + q * b * o * i, "per-token": per_token}


def scoring_flops(
    shape: ModelShape, queries: int, rank: int, batch: int, seq: int, contraction: str = "auto"
) -> float:
    """Statistics of the scoring pass per position: each module's contraction path."""
    total = 0.0
    for s in shape.specs:
        macs = scoring_macs(s, queries, rank, batch, seq)
        path = scoring_path(s, queries, rank, batch, seq) if contraction == "auto" else contraction
        total += 2.0 * macs[path] / (batch * seq)
    return total


def query_bytes_on_device(
    shape: ModelShape, queries: int, rank: int, batch: int, seq: int, contraction: str = "auto"
) -> float:
    """The preconditioned queries score-corpus holds on its device, in float32: the
    materialising path caches each module's dense W_q (rebuilt from U S Vᵀ when low-rank)."""
    total = 0.0
    for s in shape.specs:
        path = scoring_path(s, queries, rank, batch, seq) if contraction == "auto" else contraction
        dense = path == "materialise" or not rank
        width = s.out_features * s.in_dim if dense else rank * (s.out_features + s.in_dim + 1)
        total += 4.0 * queries * width
    return total


def stored_query_bytes(shape: ModelShape, queries: int, rank: int) -> float:
    """The preconditioned queries artifact (float32): dense W_q or U, S, V per module."""
    if not rank:
        return 4.0 * queries * shape.tracked_parameters
    return 4.0 * queries * rank * sum(s.out_features + s.in_dim + 1 for s in shape.specs)


ROTATIONS = {"multi-stage": 3, "single-stage": 2, "gradient-dot": 0}


def rotation_flops(spec: ModuleSpec) -> float:
    """One two-sided rotation of one query's (out, in') matrix into or out of a module's
    Kronecker eigenbasis: Q_Gᵀ W Q_A, block by block on the output side."""
    return 2.0 * spec.out_features * spec.in_dim * (spec.block_size + spec.in_dim)


def product_pass_flops(shape: ModelShape, seq: int) -> float:
    """One exact Gauss–Newton product per position and direction (msif.attribution.refine):
    the forward with its forward-mode tangent (twice the forward), the backward to the
    activations, the tangent injected at every tracked module (a′ vᵀ) and its per-copy
    weight gradient (Σ g a′ᵀ), 2·out·in' each."""
    backward = frozen_pass_flops(shape, seq) - forward_flops(shape, seq)
    return 2.0 * forward_flops(shape, seq) + backward + 4.0 * shape.tracked_parameters


def refinement_work(
    shape: ModelShape, queries: int, steps: int, lanczos: int, sequences: float
) -> tuple[float, float]:
    """(sequence-directions through the model, vector FLOPs) of one refined stage: K CG
    steps and the starting residual, each a product of every query's direction over the
    stage's sampled sequences, and M Lanczos steps of one direction each. Vector work: CG's
    preconditioner per query and step (EK-FAC's 2 two-sided rotations, the ≤ M Ritz
    directions' 4·M·P); Lanczos's two M^{-1/2} applications per step, its full
    reorthogonalisation (twice, 4·j·P at step j) and the Ritz vectors (2·M²·P, M more
    M^{-1/2} applications). P: tracked parameters."""
    p = shape.tracked_parameters
    passes = sequences * (queries * (steps + 1) + lanczos)
    rotate = sum(rotation_flops(s) for s in shape.specs)
    applications = queries * (steps + 1)
    vectors = 2.0 * rotate * (applications + 3.0 * lanczos) + 4.0 * lanczos * p * applications
    vectors += 6.0 * lanczos**2 * p
    return passes, vectors


def refinement_bytes(shape: ModelShape, queries: int, lanczos: int) -> float:
    """What a refined stage holds beside a product pass, float64: CG's right-hand side,
    iterate, residual, preconditioned residual, direction and product per query, and the
    Lanczos basis with the Ritz vectors it yields (at most M of each)."""
    return 8.0 * shape.tracked_parameters * (6 * queries + 2 * lanczos)


def precondition_flops(shape: ModelShape, method: str, queries: int, rank: int) -> float:
    """Per-module work of precondition-queries beyond the queries' forward and backward:
    two-sided rotations per query (into the fine-tune eigenbasis, the composed change of
    basis, back; msif.attribution.precondition), the composed bases once per module, and
    the truncated SVD of rank-r queries (≈ 4·out·in'·min(out, in'))."""
    total = 0.0
    for s in shape.specs:
        o, i, bs, k = s.out_features, s.in_dim, s.block_size, s.num_blocks
        total += queries * ROTATIONS[method] * rotation_flops(s)
        if method == "multi-stage":
            total += 2.0 * (k * bs**3 + i**3)
        if rank:
            total += queries * 4.0 * o * i * min(o, i)
    return total


def index_document_flops(shape: ModelShape, seq: int, rank: int, rotate: bool) -> float:
    """Per document, the top-r triplets of every module's gradient (msif.index.factored):
    QR of g and a (2·width·L²), the L × L core and its eigendecomposition when L is below
    both widths, else the materialised gradient and its SVD; rotate: the triplets carried
    into the pre-train eigenbasis (whitening or the projected tier)."""
    total = 0.0
    t, r = seq, rank
    for s in shape.specs:
        o, i, bs = s.out_features, s.in_dim, s.block_size
        if t < min(o, i):
            total += 2.0 * (o + i) * t * t + 2.0 * t**3 + EIGH_FLOPS_PER_N3 * t**3
            total += 2.0 * (o + i) * t * r
        else:
            m = min(o, i)
            total += 2.0 * t * o * i + 2.0 * o * i * m + EIGH_FLOPS_PER_N3 * m**3
        if rotate:
            total += 2.0 * r * (o * bs + i * i)
    return total


def eigh_flops(shape: ModelShape) -> float:
    """float64 eigendecompositions of every A and every block of G."""
    return EIGH_FLOPS_PER_N3 * sum(
        s.in_dim**3 + s.num_blocks * s.block_size**3 for s in shape.specs
    )


def factored_index_bytes(shape: ModelShape, rank: int, dtype: str) -> float:
    """Bytes per document of the factored tier: r·(out + in' + 1) values per module."""
    return BYTES[dtype] * rank * sum(s.out_features + s.in_dim + 1 for s in shape.specs)


def projected_index_bytes(values: int, dtype: str) -> float:
    """Bytes per document of the projected tier: values/2 (value, int32 index) pairs."""
    return (values // 2) * (BYTES[dtype] + 4)


def projected_cells(shape: ModelShape, values: int, rank: int) -> float:
    """Eigenbasis cells a projected lookup reads per document and query: Σ r·k_out·k_in.

    The budget of values/2 pairs is split over modules by Σ Λ/(Λ+λ)^2p, which needs the
    factors; the plan splits it by out·in' instead (an assumption, stated in the plan).
    """
    from msif.index.projected import module_layout

    pairs = max(1, values // 2)
    weights = {s.name: s.out_features * s.in_dim for s in shape.specs}
    whole = sum(weights.values())
    cells = 0.0
    for s in shape.specs:
        share = max(2, int(pairs * weights[s.name] / whole))
        lay = module_layout(s, share, rank)
        cells += lay.rank * lay.k_out * lay.k_in
    return cells


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    dtype: str,
    tracked: Iterable[ModuleSpec] | None = None,
) -> float:
    """Peak memory of one batch's forward and backward, rough (±50 %), per position: what
    autograd saves, about the inputs and outputs of every block linear (17·hidden per layer
    for a GPT block, as Korthikanti et al. 2022 count with fused attention); the output
    gradients the hooks keep for every tracked module (their inputs are autograd's); one
    module's float32 copies of a and g; the float32 logits three times (logits,
    log-softmax, their gradient). tracked: the modules hooked in this pass (a module group),
    by default every tracked module."""
    b = BYTES[dtype]
    hooked = tuple(shape.specs if tracked is None else tracked)
    saved = shape.block_linear_io * b
    hooks = sum(s.out_features for s in hooked) * b
    cast = 4 * max(s.in_dim + s.out_features for s in hooked)
    logits = 3 * 4 * shape.vocab
    return batch * seq * (saved + hooks + cast + logits)


def largest_gradient_bytes(shape: ModelShape, batch: int) -> float:
    """The largest per-sequence gradient batch DW (B, out, in') a pass materialises, float32."""
    return 4.0 * batch * max(s.out_features * s.in_dim for s in shape.specs)


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """A measured run of a pass: the model it ran, its tokens/s, and where it is recorded."""

    hidden: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int
    tokens_per_s: float
    source: str


SPEED_SOURCE = (
    "measured: CPU, 1 thread, benchmarks/RESULTS.md 'Speed against the training step' "
    "(2026-11-29, GPT-NeoX hidden 128, 4 layers, batch 8 × 128; mean of runs 1 and 2)"
)
# benchmarks/RESULTS.md, "Speed against the training step": tokens/s, runs 1 and 2.
SPEED_RUNS = {
    "training": (8652, 8899),
    "covariance": (6059, 6298),
    "lambda": (4759, 5010),
    "scoring-1": (8913, 9206),
    "scoring-16": (7866, 8342),
}
EIGH_SOURCE = (
    "measured: CPU, 1 thread, benchmarks/RESULTS.md 'Scaling' (hidden table, row 256: "
    "GPT-NeoX hidden 256, 2 layers, eigendecomposition 1.111 s)"
)
INDEX_SOURCE = (
    "measured: CPU, 1 thread, benchmarks/RESULTS.md 'Projected tier, sparse factors' "
    "(speed table, 512 tokens, 32 documents: factored build 1.440 s against a scan of 1.124 s)"
)
LOOKUP_SOURCE = (
    "measured: CPU, 1 thread, benchmarks/RESULTS.md 'After the CSR rows' (256 documents, "
    "64 queries: factored lookup 0.5438 s; projected 0.65 ms per document at ~30 k cells)"
)


def speed_calibration(pass_name: str) -> Calibration:
    """The speed benchmark's run of one pass (benchmarks/speed.py defaults)."""
    runs = SPEED_RUNS[pass_name]
    return Calibration(128, 4, 4, 2048, 128, 8, sum(runs) / len(runs), SPEED_SOURCE)


def neox_shape(hidden: int, layers: int, heads: int, vocab: int) -> ModelShape:
    """The shape of a benchmarks.common.neox model, without building it."""
    specs = []
    for n in range(layers):
        p = f"gpt_neox.layers.{n}."
        specs += [
            ModuleSpec(
                p + "attention.query_key_value", "linear", hidden, 3 * hidden, True, 3 * hidden
            ),
            ModuleSpec(p + "attention.dense", "linear", hidden, hidden, True, hidden),
            ModuleSpec(p + "mlp.dense_h_to_4h", "linear", hidden, 4 * hidden, True, 4 * hidden),
            ModuleSpec(p + "mlp.dense_4h_to_h", "linear", 4 * hidden, hidden, True, hidden),
        ]
    block = sum(s.out_features * s.in_features for s in specs)
    matmul = block + vocab * hidden  # the untied embed_out
    norms = layers * 4 * hidden + 2 * hidden
    biases = sum(s.out_features for s in specs)
    return ModelShape(
        "gpt_neox",
        block + biases + 2 * vocab * hidden + norms,
        matmul,
        layers,
        hidden,
        vocab,
        hidden,
        sum(s.in_features + s.out_features for s in specs),
        tuple(specs),
    )


def _shape(c: Calibration) -> ModelShape:
    return neox_shape(c.hidden, c.layers, c.heads, c.vocab)


@functools.cache
def cpu_rates() -> dict[str, Figure]:
    """Achieved FLOP/s of each pass on one CPU thread, from the recorded benchmarks.

    The training step's rate is its FLOPs per position × tokens/s; a pass's rate is its own
    FLOPs per position × its tokens/s, measured side by side with the training step.
    """
    rates: dict[str, Figure] = {}
    train = speed_calibration("training")
    shape, seq, b = _shape(train), train.seq, train.batch
    rates["training"] = Figure(training_step_flops(shape, seq) * train.tokens_per_s, SPEED_SOURCE)
    base = frozen_pass_flops(shape, seq)
    per_pass = {
        "covariance": base + covariance_flops(shape, "cpu"),
        "lambda": base + lambda_flops(shape, seq),
        "scoring-1": base + scoring_flops(shape, 1, 0, b, seq),
        "scoring-16": base + scoring_flops(shape, 16, 0, b, seq),
    }
    for name, flops in per_pass.items():
        rates[name] = Figure(flops * speed_calibration(name).tokens_per_s, SPEED_SOURCE)
    rates["scoring"] = Figure(
        (rates["scoring-1"].value + rates["scoring-16"].value) / 2, SPEED_SOURCE
    )
    rates["eigh"] = Figure(eigh_flops(neox_shape(256, 2, 4, 512)) / 1.111, EIGH_SOURCE)
    rates["index"] = _index_rate(rates["scoring-1"].value)
    rates.update(_lookup_rates())
    return rates


def _index_rate(scan_rate: float) -> Figure:
    # The index benchmark ran while the machine was shared: only its ratio to the scan it
    # ran beside is used, applied to the speed benchmark's scan rate.
    shape, seq, docs = neox_shape(128, 2, 4, 512), 512, 32
    scan = (frozen_pass_flops(shape, seq) + scoring_flops(shape, 1, 0, 4, seq)) * seq * docs
    build = frozen_pass_flops(shape, seq) * seq * docs
    build += docs * index_document_flops(shape, seq, 4, rotate=False)
    return Figure(scan_rate * (build / scan) * (1.124 / 1.440), INDEX_SOURCE)


def _lookup_rates() -> dict[str, Figure]:
    shape = neox_shape(128, 2, 4, 512)
    factored = 2.0 * 4 * shape.tracked_parameters * 256 * 64 / 0.5438
    projected = 2.0 * 30_000 * 64 / 0.65e-3
    return {
        "lookup-factored": Figure(factored, LOOKUP_SOURCE),
        "lookup-projected": Figure(projected, LOOKUP_SOURCE),
    }


def size_text(n: float) -> str:
    """Bytes as the plan prints them: 1.5 GiB, 640.1 MiB, 12 B."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def ceil_gib(nbytes: float) -> int:
    """Whole GiB at or above nbytes (Kubernetes requests)."""
    return max(1, math.ceil(nbytes / GIB))
