"""Every run option of msif, written once: default, help and validation.

The CLI builds its flags from these dataclasses (`add_options`, `from_namespace`), the KFP
components and the pipeline take parameters of the same names with these defaults, and the
main job fills them in. One rule ties the layers together: a field `max_length` is the CLI
flag `--max-length`, the component argument `max_length` and the pipeline parameter
`max_length`, so field names are unique across all option classes.

KFP parameters cannot be None: the pipeline spells "not given" for `alpha` and `damping` as a
value <= 0 (see `none_if_not_positive`).

A value an option cannot take raises OptionError (a usage error, exit code 2) naming its flag:
NaN and infinities are refused for every float, bools for every number.
"""

from __future__ import annotations

import argparse
import math
import numbers
import re
from dataclasses import dataclass, field, fields
from typing import Any

from msif.attribution.precondition import METHODS
from msif.core.modules import HEAD_PATTERN, ModuleSelection
from msif.data.examples import EOS_MODES
from msif.data.models import DTYPES
from msif.data.tables import TableOptions
from msif.ekfac.factors import DEFAULT_ALPHA, DEFAULT_DAMPING_FACTOR
from msif.errors import OptionError

STAGES = {"pt": "pre-training (θ_pt on the corpus)", "ft": "fine-tuning (θ_ft on its data)"}
CONTRACTIONS = ("auto", "materialise", "per-token")


def option(default: Any, help: str, *, choices: tuple | None = None, metavar: str | None = None):
    """A dataclass field carrying its CLI help (and choices) beside its default."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


MAX_SEED = 2**63 - 1  # msif.core.loss hashes the seed as a signed 8-byte integer
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# As α → 0 the proximity term vanishes and so does the score; damping_factor 0 leaves the
# inverse undamped, and near-zero eigenvalues then give ~1e32 scores ranked at random.
# For a plain fine-tune any α far above Λ_ft works alike (RESULTS.md, "Plain fine-tunes").
_ALPHA_ADVICE = (
    "; for a plain fine-tune without a proximity term give a small positive damping such as "
    "--alpha 1e-3 (any value from 1e-4 to 1 ranks alike)"
)
_DAMPING_FACTOR_ADVICE = (
    "; 0 leaves the inverse undamped (near-zero eigenvalues give ~1e32 scores, ranked at random)"
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _integer(name: str, value: Any, low: int, high: int | None = None) -> None:
    """value must be an int (a bool is not one) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{_flag(name)} must be an integer, not {value!r}")
    if value < low:
        raise OptionError(f"{_flag(name)} must be at least {low}, not {value!r}")
    if high is not None and value > high:
        raise OptionError(f"{_flag(name)} must be at most {high}, not {value!r}")


def _finite_positive(name: str, value: Any, advice: str = "") -> None:
    """value must be a finite number > 0 (NaN fails every comparison, so test it first)."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        raise OptionError(f"{_flag(name)} must be a finite number, not {value!r}")
    if value <= 0:
        raise OptionError(f"{_flag(name)} must be > 0, not {value!r}" + advice)


def check_device(value: Any) -> None:
    """--device must be auto, cpu, mps, cuda or cuda:N."""
    if not (isinstance(value, str) and _DEVICE.fullmatch(value)):
        raise OptionError(f"--device {value!r} is not auto, cpu, mps, cuda or cuda:N")


def _one_of(name: str, value: Any, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise OptionError(f"{_flag(name)} {value!r} is not one of {', '.join(choices)}")


def _patterns(name: str, value: Any) -> None:
    """value must be a sequence of regexes (a bare string would be split into characters)."""
    if not isinstance(value, tuple | list) or not all(isinstance(p, str) for p in value):
        raise OptionError(f"{_flag(name)} must be a list of regexes, not {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            raise OptionError(f"{_flag(name)} {pattern!r} is not a regex: {e}") from None


@dataclass(frozen=True)
class ModelOptions:
    """How a model node runs its model over data (fit-*, precondition-queries, score-corpus)."""

    max_length: int = option(
        512, "tokens per sequence: documents keep their first tokens, prompts lose their start"
    )
    batch_size: int = option(8, "sequences per forward and backward pass")
    seed: int = option(0, "seed of the Fisher labels sampled from the model")
    device: str = option("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    dtype: str = option("float32", "dtype the model is loaded in", choices=tuple(DTYPES))
    include: tuple[str, ...] = option(
        (), "track only block modules whose name matches a REGEX", metavar="REGEX"
    )
    exclude: tuple[str, ...] = option((), "do not track modules matching a REGEX", metavar="REGEX")
    split_heads: bool = option(
        False,
        "split every attention q/k/v projection, fused (query_key_value, c_attn, qkv_proj) or "
        "separate (q_proj, k_proj, v_proj; k and v with their key/value heads), into "
        "head-size blocks of G",
    )
    split_heads_pattern: tuple[str, ...] = option(
        (), "split the tracked modules matching a REGEX into head-size blocks of G", metavar="REGEX"
    )
    embeddings: bool = option(
        False, "also track the input embedding (vocabularies up to 16384 tokens)"
    )
    lm_head: bool = option(False, "also track the output head (lm_head)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        _integer("max_length", self.max_length, 2)
        _integer("batch_size", self.batch_size, 1)
        _integer("seed", self.seed, 0, MAX_SEED)
        _one_of("dtype", self.dtype, DTYPES)
        check_device(self.device)
        _patterns("include", self.include)
        _patterns("exclude", self.exclude)
        _patterns("split_heads_pattern", self.split_heads_pattern)

    def selection(self) -> ModuleSelection:
        """The module selection these options describe.

        --split-heads and --split-heads-pattern add up: the attention projections and the
        modules the regexes match.
        """
        split: bool | tuple[str, ...] = bool(self.split_heads)
        if self.split_heads_pattern:
            split = (HEAD_PATTERN,) * split + tuple(self.split_heads_pattern)
        return ModuleSelection(
            tuple(self.include),
            tuple(self.exclude),
            embeddings=self.embeddings,
            lm_head=self.lm_head,
            split_heads=split,
        )

    def table(self) -> TableOptions:
        """Tokenisation options."""
        return TableOptions(max_length=self.max_length)

    def recorded(self) -> dict:
        """The options that change results, as artifacts record them (no device, no bars)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
            if f.name not in ("device", "progress")
        }


@dataclass(frozen=True)
class FitOptions:
    """How fit-covariance and fit-lambda hold their sums on the device."""

    module_groups: int = option(
        1,
        "fit the tracked modules in N passes over the shard, each holding one contiguous "
        "group of them (balanced by bytes) on the device: about 1/N of the device memory "
        "for the sums (and Λ's eigenvectors) at N times the forward and backward passes; "
        "the same sums bit for bit",
        metavar="N",
    )

    def __post_init__(self) -> None:
        _integer("module_groups", self.module_groups, 1)


@dataclass(frozen=True)
class EigenOptions:
    """How eigendecompose stores the eigenbasis."""

    factor_dtype: str = option(
        "float32",
        "dtype eigenvectors and Λ are stored in (computed in float64)",
        choices=("float32", "float64"),
    )

    def __post_init__(self) -> None:
        _one_of("factor_dtype", self.factor_dtype, ("float32", "float64"))


@dataclass(frozen=True)
class PreconditionOptions:
    """How query gradients are preconditioned (precondition-queries)."""

    method: str = option(
        "multi-stage",
        "multi-stage needs ft and pt factors, its corpus is scored at θ_pt; single-stage needs "
        "ft factors, corpus at θ_ft; gradient-dot needs none, corpus at θ_pt",
        choices=tuple(METHODS),
    )
    alpha: float | None = option(
        DEFAULT_ALPHA,
        "the fine-tune stage's damping: its proximity coefficient α where it has one; the "
        "default 1e-3 suits a plain fine-tune too (any α from 1e-4 to 1 ranked alike on every "
        "fact world, far above Λ_ft; a damping relative to mean Λ_ft lost on all of them)",
    )
    damping_factor: float = option(
        DEFAULT_DAMPING_FACTOR,
        "λ = damping_factor × mean(Λ) per module (0.01: best on held-out fact worlds, "
        "benchmarks/RESULTS.md 'Damping defaults')",
    )
    damping: float | None = option(None, "an absolute λ for every module instead")
    query_rank: int = option(0, "store rank-r queries (truncated SVD); 0 keeps them dense")
    refine_steps: int = option(
        0,
        "conjugate-gradient steps per stage toward the exact damped Gauss–Newton system, "
        "preconditioned by EK-FAC (needs each stage's model and data: --pt-model, --corpus, "
        "--finetune-data); 0 is EK-FAC alone",
    )
    refine_lanczos: int = option(
        0,
        "Lanczos steps per stage (one single-direction product each, shared by all queries) "
        "that correct the EK-FAC preconditioner of --refine-steps where it misses the exact "
        "curvature most; acts even at --refine-steps 0; 0 is none",
    )
    refine_samples: int = option(
        128,
        "sequences of each stage's data (seeded by --seed) the exact products of "
        "--refine-steps run on; a step costs about 4 × queries × samples sequence passes",
    )

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        if self.alpha is not None:
            _finite_positive("alpha", self.alpha, _ALPHA_ADVICE)
        _finite_positive("damping_factor", self.damping_factor, _DAMPING_FACTOR_ADVICE)
        if self.damping is not None:
            _finite_positive("damping", self.damping, "; leave it unset for --damping-factor")
        _integer("query_rank", self.query_rank, 0)
        _integer("refine_steps", self.refine_steps, 0)
        _integer("refine_lanczos", self.refine_lanczos, 0)
        _integer("refine_samples", self.refine_samples, 1)

    @property
    def refinement_flag(self) -> str | None:
        """The flag and value that ask for refinement, for messages; None: EK-FAC alone."""
        if self.refine_steps:
            return f"--refine-steps {self.refine_steps}"
        if self.refine_lanczos:
            return f"--refine-lanczos {self.refine_lanczos}"
        return None


def _top_k():
    return option(100, "documents kept per query")


@dataclass(frozen=True)
class ScoreOptions:
    """How score-corpus scores a shard and what it keeps."""

    top_k: int = _top_k()
    explain_k: int = option(10, "documents per query that get per-token scores")
    full: bool = option(False, "also write every document's score (full_scores.parquet)")
    contraction: str = option(
        "auto",
        "per module: materialise DW_z, contract per token, or auto (fewer FLOPs)",
        choices=CONTRACTIONS,
    )

    def __post_init__(self) -> None:
        _integer("top_k", self.top_k, 1)
        _integer("explain_k", self.explain_k, 0)
        _one_of("contraction", self.contraction, CONTRACTIONS)


INDEX_DTYPES = ("float32", "bfloat16", "float16")
INDEX_TIERS = ("factored", "projected")
# Measured on the fact world (benchmarks/RESULTS.md, issue 13): the factored tier needs r = 8 for
# the exact top-10 to survive a 5 % rerank; the projected tier spreads a fixed budget over r
# triplets, so fewer, longer triplets agree better (r = 8 at 4096 values: Spearman 0.60 vs 0.78).
DEFAULT_INDEX_RANKS = {"factored": 8, "projected": 4}


@dataclass(frozen=True)
class IndexOptions:
    """How the corpus index stores each document's gradient."""

    index_tier: str = option(
        "factored",
        "factored: top-r singular triplets per module (near-exact); projected: a fixed number "
        "of values per document, sparse triplets in the pre-train eigenbasis (internet scale)",
        choices=INDEX_TIERS,
    )
    index_rank: int = option(
        0,
        "singular triplets kept per document and module (projected tier: at most); 0: the "
        "tier's default, 8 factored (exact top-10 inside a 5 % rerank for 98 % of the fact "
        "world's queries; 4: 73 %), 4 projected (Spearman 0.78 at 4096 values; 8: 0.60)",
    )
    index_whitening: float = option(
        0.5,
        "power p of the pre-train curvature in the norm the truncation minimises, "
        "‖D^-p Q_Gᵀ(DW − DW_r)Q_A‖ (0: plain SVD; 0.5 was best for multi-stage and gradient-dot "
        "queries together on the fact world)",
    )
    index_values: int = option(
        4096, "values per document of the projected tier (a value and an index per kept entry)"
    )
    index_dtype: str = option("float32", "dtype the index is stored in", choices=INDEX_DTYPES)

    @property
    def rank(self) -> int:
        """The rank the tier is built with: index_rank, or the tier's default where it is 0."""
        return self.index_rank or DEFAULT_INDEX_RANKS[self.index_tier]

    def __post_init__(self) -> None:
        _one_of("index_tier", self.index_tier, INDEX_TIERS)
        _integer("index_rank", self.index_rank, 0)
        if not 0.0 <= self.index_whitening <= 2.0:  # NaN fails too
            raise OptionError(f"--index-whitening must be in [0, 2], not {self.index_whitening!r}")
        _integer("index_values", self.index_values, 1)
        _one_of("index_dtype", self.index_dtype, INDEX_DTYPES)


CANDIDATE_SOURCES = ("index", "bm25", "both")


@dataclass(frozen=True)
class LookupOptions:
    """Which candidates, and how many, the exact rerank rescores."""

    top_c: int = option(100, "candidate documents kept per query (from each source)")
    candidates_from: str = option(
        "index",
        "index: the index lookup's top-C; bm25: BM25's top-C (the paper's pre-filter, no index "
        "read); both: their union",
        choices=CANDIDATE_SOURCES,
    )

    def __post_init__(self) -> None:
        _integer("top_c", self.top_c, 1)
        _one_of("candidates_from", self.candidates_from, CANDIDATE_SOURCES)


@dataclass(frozen=True)
class Bm25Options:
    """What the bm25 baseline keeps."""

    top_k: int = _top_k()

    def __post_init__(self) -> None:
        _integer("top_k", self.top_k, 1)


@dataclass(frozen=True)
class RankOptions:
    """How rank merges shards and what the report shows."""

    top_k: int = _top_k()
    report_k: int = option(5, "documents per query in the report")

    def __post_init__(self) -> None:
        _integer("top_k", self.top_k, 1)
        _integer("report_k", self.report_k, 1)


_COLUMN_FIELDS = (
    "id_column",
    "text_column",
    "prompt_column",
    "completion_column",
    "messages_column",
)
_SPLIT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class DataOptions:
    """Which columns of the input tables msif reads, which split, and how rows end."""

    text_column: str = option("text", "corpus column of the documents' text")
    id_column: str = option(
        "id",
        "column of row ids (corpus, queries); when the default is absent, rows are named "
        "row-N by their 0-based index in the table",
    )
    prompt_column: str = option("prompt", "column of the prompts (fine-tune data, queries)")
    completion_column: str = option(
        "completion", "column of the completions, the scored tokens (fine-tune data, queries)"
    )
    messages_column: str = option(
        "messages",
        "column of chat conversations, lists of {role, content}: rendered with the "
        "tokenizer's chat template, only assistant turns scored (a query's last one)",
    )
    split: str = option(
        "",
        "split of a datasets DatasetDict folder (save_to_disk); empty: its only split, else "
        "train. Other inputs ignore it",
        metavar="NAME",
    )
    append_eos: str = option(
        "auto",
        "end documents and completions msif tokenises with the EOS token, which is scored: "
        "on, off, or auto (when the tokenizer appends EOS itself)",
        choices=EOS_MODES,
    )

    def __post_init__(self) -> None:
        for name in _COLUMN_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise OptionError(f"{_flag(name)} must be a column name, not {value!r}")
        seen: dict[str, str] = {}
        for name in _COLUMN_FIELDS:
            column = getattr(self, name)
            if column in seen:
                raise OptionError(f"{_flag(seen[column])} and {_flag(name)} both name {column!r}")
            seen[column] = name
        if not isinstance(self.split, str) or (self.split and not _SPLIT.fullmatch(self.split)):
            raise OptionError(f"--split {self.split!r} is not a split name")
        _one_of("append_eos", self.append_eos, EOS_MODES)

    def table(self, max_length: int) -> TableOptions:
        """Tokenisation options with these columns."""
        return TableOptions(
            max_length=max_length,
            **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "split"},
        )

    def recorded(self) -> dict:
        """The options artifacts record (all of them change what is read)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


OPTION_CLASSES = (
    ModelOptions,
    FitOptions,
    EigenOptions,
    PreconditionOptions,
    ScoreOptions,
    Bm25Options,
    RankOptions,
    DataOptions,
)


def none_if_not_positive(value: float) -> float | None:
    """KFP's spelling of an unset float (<= 0) back to None; NaN stays, to be refused."""
    return None if value <= 0 else value


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of cls, with its help, choices and default."""
    group = parser.add_argument_group(cls.__doc__.strip().rstrip("."))
    for f in fields(cls):
        if f.name in skip:
            continue
        default, flag = f.default, "--" + f.name.replace("_", "-")
        meta = {**f.metadata, "help": f.metadata["help"].replace("%", "%%")}  # argparse formats it
        if isinstance(default, bool) and default:
            group.add_argument(
                "--no-" + flag[2:], dest=f.name, action="store_false", help=f"do not {meta['help']}"
            )
            continue
        if isinstance(default, bool):
            group.add_argument(flag, action="store_true", help=f"{meta['help']} (off)")
            continue
        kwargs: dict[str, Any] = {"choices": meta["choices"], "metavar": meta["metavar"]}
        if isinstance(default, tuple):
            kwargs.update(action="extend", nargs="+", default=[])
        else:
            kwargs.update(type=_type_of(f.type), default=default)
        group.add_argument(flag, help=f"{meta['help']} (default: %(default)s)", **kwargs)


def _type_of(annotation: str) -> type:
    return {"int": int, "str": str}.get(annotation, float)


def from_namespace(cls: type, args: argparse.Namespace, **overrides: Any):
    """An option object from parsed flags (validated by its __post_init__)."""
    values = {}
    for f in fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(args, f.name):  # a flag left out of this parser keeps its default
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def check_options(args: argparse.Namespace) -> None:
    """Build every option class whose flags args holds, so that a bad value fails at once.

    Nodes build their options before any work, but `msif run` builds the world first.
    """
    names = vars(args)
    for cls in OPTION_CLASSES:
        if any(f.name in names for f in fields(cls)):
            from_namespace(cls, args)
