"""Which layers of a causal LM msif tracks, and how each one is described in artifacts."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style linear: weight stored as in x out

from msif.errors import MismatchError, MsifError

# Fused attention projections whose output side holds q, k and v for every head.
FUSED_QKV_SUFFIXES = ("query_key_value", "c_attn", "qkv_proj", "Wqkv")
# Separate projections, one per role, each with its heads side by side on the output (k and v
# have num_key_value_heads heads under grouped-query attention, of the same head size).
SEPARATE_QKV_SUFFIXES = ("q_proj", "k_proj", "v_proj")
# What split_heads=True splits: every attention projection whose output holds whole heads.
# Output projections (o_proj, dense, c_proj) hold heads on their input side: not split.
HEAD_SUFFIXES = FUSED_QKV_SUFFIXES + SEPARATE_QKV_SUFFIXES
HEAD_PATTERN = r"(?:^|\.)(?:" + "|".join(map(re.escape, HEAD_SUFFIXES)) + ")$"
# An embedding tracked as a linear map of one-hot tokens needs a vocab x vocab covariance.
MAX_EMBEDDING_VOCAB = 16384
_IN_BLOCK = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class ModuleSpec:
    """Shape facts of one tracked module; gradients are viewed as (out x in') matrices."""

    name: str
    kind: str  # "linear", "conv1d" or "embedding"
    in_features: int
    out_features: int
    has_bias: bool
    block_size: int  # output-side block of G; == out_features when unsplit

    @property
    def in_dim(self) -> int:
        """Input width with the bias column appended."""
        return self.in_features + int(self.has_bias)

    @property
    def num_blocks(self) -> int:
        """Number of diagonal blocks of the output-side covariance G."""
        return self.out_features // self.block_size

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the module's gradient matrix (out, in')."""
        return (self.out_features, self.in_dim)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModuleSpec:
        """Inverse of to_dict."""
        return cls(**d)


@dataclass(frozen=True)
class ModuleSelection:
    """Which modules to track: block linears by default, filtered by name regexes."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    lm_head: bool = False
    # True splits every q/k/v projection (fused or separate, HEAD_SUFFIXES) into head-size
    # blocks of G; a tuple names the modules to split by regex instead.
    split_heads: bool | tuple[str, ...] = False
    extra: tuple[str, ...] = field(default=())  # exact module names to add regardless

    def to_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["include"], d["exclude"], d["extra"] = (
            list(self.include),
            list(self.exclude),
            list(self.extra),
        )
        if isinstance(self.split_heads, tuple):
            d["split_heads"] = list(self.split_heads)
        return d


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _features(module: nn.Module, kind: str) -> tuple[int, int, bool]:
    if kind == "linear":
        return module.in_features, module.out_features, module.bias is not None
    if kind == "conv1d":
        n_in, n_out = module.weight.shape
        return n_in, n_out, module.bias is not None
    return module.num_embeddings, module.embedding_dim, False


def head_size_of(model: nn.Module) -> int | None:
    """Attention head size from the model config, when it has one."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    head_dim = getattr(cfg, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if hidden and heads:
        return hidden // heads
    return None


def _wants_split(name: str, selection: ModuleSelection) -> bool:
    if selection.split_heads is True:
        return re.search(HEAD_PATTERN, name) is not None
    if isinstance(selection.split_heads, tuple):
        return any(re.search(p, name) for p in selection.split_heads)
    return False


def _selected(name: str, module: nn.Module, model: nn.Module, sel: ModuleSelection) -> bool:
    if name in sel.extra:
        return True
    if module is _output_embeddings(model):
        return sel.lm_head
    if module is _input_embeddings(model):
        return sel.embeddings
    # Only linears inside the repeated transformer blocks (a ".<index>." in the name).
    if _kind(module) == "embedding" or not in_block(name):
        return False
    if sel.include and not any(re.search(p, name) for p in sel.include):
        return False
    return not any(re.search(p, name) for p in sel.exclude)


def in_block(name: str) -> bool:
    """Whether a qualified module name lies inside a repeated transformer block."""
    return _IN_BLOCK.search(name + ".") is not None


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def find_modules(
    model: nn.Module, selection: ModuleSelection | None = None
) -> dict[str, ModuleSpec]:
    """Specs of the modules to track, keyed by qualified name, in model order."""
    sel = selection or ModuleSelection()
    head_size = head_size_of(model)
    specs: dict[str, ModuleSpec] = {}
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None or not _selected(name, module, model, sel):
            continue
        n_in, n_out, bias = _features(module, kind)
        if kind == "embedding" and n_in > MAX_EMBEDDING_VOCAB:
            raise MsifError(
                f"cannot track embedding {name!r}: vocabulary {n_in} > {MAX_EMBEDDING_VOCAB} "
                "makes its one-hot covariance too large"
            )
        block = n_out
        if _wants_split(name, sel):
            if not head_size or n_out % head_size:
                raise MsifError(
                    f"cannot split {name!r} into heads: output {n_out} is not a multiple of "
                    f"head size {head_size}"
                )
            block = head_size
        specs[name] = ModuleSpec(name, kind, n_in, n_out, bias, block)
    if not specs:
        raise MsifError("no module matched the selection: check --include/--exclude patterns")
    _check_split(specs, sel)
    _warn_tied(model, specs)
    return specs


def select_group(
    specs: dict[str, ModuleSpec], group: Iterable[str] | None
) -> dict[str, ModuleSpec]:
    """The specs named in group, in specs' (model) order; every spec when group is None."""
    if group is None:
        return dict(specs)
    wanted = set(group)
    unknown = sorted(wanted - set(specs))
    if unknown:
        raise MsifError(f"module {unknown[0]!r} of the group is not a tracked module")
    if not wanted:
        raise MsifError("the module group is empty")
    return {name: spec for name, spec in specs.items() if name in wanted}


def _check_split(specs: dict[str, ModuleSpec], sel: ModuleSelection) -> None:
    # A split that splits nothing is refused (a pattern) or logged (the default set), so that
    # asking for heads never silently fits unsplit factors.
    if isinstance(sel.split_heads, tuple):
        for pattern in sel.split_heads:
            if pattern != HEAD_PATTERN and not any(re.search(pattern, n) for n in specs):
                raise MsifError(
                    f"--split-heads-pattern {pattern!r} matches no tracked module: the tracked "
                    f"ones are named like {next(iter(specs))!r}"
                )
    if sel.split_heads and not any(s.num_blocks > 1 for s in specs.values()):
        logging.getLogger("msif").warning(
            "split heads: no tracked module holds more than one head, nothing was split"
        )


def _warn_tied(model: nn.Module, specs: dict[str, ModuleSpec]) -> None:
    head, emb = _output_embeddings(model), _input_embeddings(model)
    names = {id(m): n for n, m in model.named_modules()}
    if head is not None and emb is not None and head.weight is emb.weight:
        if names.get(id(head)) in specs and names.get(id(emb)) in specs:
            logging.getLogger("msif").warning(
                "%s and %s share one weight; msif tracks each use as its own module",
                names[id(head)],
                names[id(emb)],
            )


def _lookup(
    named: dict[str, nn.Module], spec: ModuleSpec
) -> tuple[nn.Module | None, tuple[int, int] | None]:
    """The model's module for spec and, when its kind or shape differs, the (out, in) it has.

    (None, None) when the model has no trackable module of that name.
    """
    module = named.get(spec.name)
    kind = _kind(module) if module is not None else None
    if kind is None:
        return None, None
    n_in, n_out, bias = _features(module, kind)
    same = (kind, n_in, n_out, bias) == (
        spec.kind,
        spec.in_features,
        spec.out_features,
        spec.has_bias,
    )
    return module, None if same else (n_out, n_in)


def resolve(model: nn.Module, specs: Iterable[ModuleSpec]) -> dict[str, nn.Module]:
    """Map specs to the model's modules, refusing any whose name or shape differs."""
    named = dict(model.named_modules())
    out = {}
    for spec in specs:
        module, other = _lookup(named, spec)
        if module is None:
            raise MismatchError(f"module {spec.name!r} of the artifact is not in this model")
        if other is not None:
            raise MismatchError(
                f"module {spec.name!r} has shape {other} here but "
                f"{(spec.out_features, spec.in_features)} in the artifact"
            )
        out[spec.name] = module
    return out


def matching_specs(
    model: nn.Module, specs: dict[str, ModuleSpec]
) -> tuple[dict[str, ModuleSpec], dict[str, str]]:
    """Split specs into those the model has with equal shape and those left out (with why)."""
    named = dict(model.named_modules())
    kept, left_out = {}, {}
    for name, spec in specs.items():
        module, other = _lookup(named, spec)
        if module is None:
            left_out[name] = "absent from the model"
        elif other is not None:
            left_out[name] = f"shape {other} differs from {spec.shape}"
        else:
            kept[name] = spec
    return kept, left_out


def weight_gradient(module: nn.Module, spec: ModuleSpec):
    """The module's autograd gradient in msif's (out x in') layout (used by tests and checks)."""
    import torch

    grad = module.weight.grad
    if spec.kind in ("conv1d", "embedding"):
        grad = grad.t()
    if spec.has_bias:
        grad = torch.cat([grad, module.bias.grad[:, None]], dim=1)
    return grad
