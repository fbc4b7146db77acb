"""Every run option of msif, written once: default, help and validation.

The CLI builds its flags from these dataclasses (`add_options`, `from_namespace`), the KFP
components and the pipeline take parameters of the same names with these defaults, and the
main job fills them in. One rule ties the layers together: a field `max_length` is the CLI
flag `--max-length`, the component argument `max_length` and the pipeline parameter
`max_length`, so field names are unique across all option classes.

KFP parameters cannot be None: the pipeline spells "not given" for `alpha` and `damping` as a
value <= 0 (see `none_if_not_positive`).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields
from typing import Any

from msif.attribution.precondition import METHODS
from msif.core.modules import ModuleSelection
from msif.data.models import DTYPES
from msif.data.tables import TableOptions
from msif.errors import MsifError

STAGES = {"pt": "pre-training (θ_pt on the corpus)", "ft": "fine-tuning (θ_ft on its data)"}
CONTRACTIONS = ("auto", "materialise", "per-token")


def option(default: Any, help: str, *, choices: tuple | None = None, metavar: str | None = None):
    """A dataclass field carrying its CLI help (and choices) beside its default."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


def _at_least(name: str, value: float, low: float) -> None:
    if isinstance(value, bool) or value < low:
        raise MsifError(f"--{name.replace('_', '-')} must be at least {low}, not {value!r}")


def _one_of(name: str, value: str, choices) -> None:
    if value not in choices:
        flag = name.replace("_", "-")
        raise MsifError(f"--{flag} {value!r} is not one of {', '.join(choices)}")


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
    split_heads: bool = option(False, "split fused QKV projections into head-size blocks of G")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        _at_least("max_length", self.max_length, 2)
        _at_least("batch_size", self.batch_size, 1)
        _one_of("dtype", self.dtype, DTYPES)
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise MsifError(f"--device {self.device!r} is not auto, cpu, mps, cuda or cuda:N")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as e:
                raise MsifError(f"module pattern {pattern!r} is not a regex: {e}") from None

    def selection(self) -> ModuleSelection:
        """The module selection these options describe."""
        return ModuleSelection(
            tuple(self.include), tuple(self.exclude), split_heads=self.split_heads
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
        None,
        "proximity coefficient α of the fine-tune, used as its damping; unset: "
        "damping_factor × mean(Λ_ft), which amplifies noise when Λ_ft is tiny",
    )
    damping_factor: float = option(0.1, "λ = damping_factor × mean(Λ) per module")
    damping: float | None = option(None, "an absolute λ for every module instead")
    query_rank: int = option(0, "store rank-r queries (truncated SVD); 0 keeps them dense")

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        if self.alpha is not None and not self.alpha > 0:
            raise MsifError(f"--alpha must be > 0 (as α → 0 the score vanishes), not {self.alpha}")
        if self.damping is not None and not self.damping > 0:
            raise MsifError(f"--damping must be > 0, not {self.damping}")
        _at_least("damping_factor", self.damping_factor, 0)
        _at_least("query_rank", self.query_rank, 0)


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
        _at_least("top_k", self.top_k, 1)
        _at_least("explain_k", self.explain_k, 0)
        _one_of("contraction", self.contraction, CONTRACTIONS)


@dataclass(frozen=True)
class Bm25Options:
    """What the bm25 baseline keeps."""

    top_k: int = _top_k()

    def __post_init__(self) -> None:
        _at_least("top_k", self.top_k, 1)


@dataclass(frozen=True)
class RankOptions:
    """How rank merges shards and what the report shows."""

    top_k: int = _top_k()
    report_k: int = option(5, "documents per query in the report")

    def __post_init__(self) -> None:
        _at_least("top_k", self.top_k, 1)
        _at_least("report_k", self.report_k, 1)


OPTION_CLASSES = (
    ModelOptions,
    EigenOptions,
    PreconditionOptions,
    ScoreOptions,
    Bm25Options,
    RankOptions,
)


def none_if_not_positive(value: float) -> float | None:
    """KFP's spelling of an unset float (<= 0) back to None."""
    return value if value > 0 else None


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of cls, with its help, choices and default."""
    group = parser.add_argument_group(cls.__doc__.strip().rstrip("."))
    for f in fields(cls):
        if f.name in skip:
            continue
        default, flag, meta = f.default, "--" + f.name.replace("_", "-"), f.metadata
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
