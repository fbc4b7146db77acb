"""Covariance fitting: additive sums of a aᵀ and g gᵀ under labels sampled from the model."""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from msif.core.fingerprint import model_fingerprint
from msif.core.hooks import activations_and_gradients, capture, frozen
from msif.core.loss import scored_positions
from msif.core.modules import ModuleSelection, ModuleSpec, find_modules
from msif.core.passes import gradient_pass, sums_device, work_dtype
from msif.core.progress import progress_bar
from msif.errors import MismatchError, MsifError

STEM = "covariance"


@dataclass
class CovarianceSums:
    """Partial sums of the EK-FAC covariances; shards add with +."""

    stage: str
    specs: dict[str, ModuleSpec]
    activation: dict[str, torch.Tensor]  # (in', in') float64 sums of a aᵀ
    gradient: dict[str, torch.Tensor]  # (blocks, bs, bs) float64 sums of g gᵀ
    num_tokens: int
    num_sequences: int
    fingerprint: dict
    seed: int
    info: dict = field(default_factory=dict)

    def __add__(self, other: CovarianceSums) -> CovarianceSums:
        check_compatible(self, other, "covariance partial sums")
        return CovarianceSums(
            self.stage,
            self.specs,
            {k: v + other.activation[k] for k, v in self.activation.items()},
            {k: v + other.gradient[k] for k, v in self.gradient.items()},
            self.num_tokens + other.num_tokens,
            self.num_sequences + other.num_sequences,
            self.fingerprint,
            self.seed,
        )

    def save(self, directory: str | Path) -> None:
        """Write covariance.safetensors + covariance.json."""
        from msif.core.tensorfile import save_tensors

        tensors = {f"{k}.activation": v for k, v in self.activation.items()}
        tensors.update({f"{k}.gradient": v for k, v in self.gradient.items()})
        save_tensors(directory, STEM, tensors, header(self))

    @classmethod
    def load(cls, directory: str | Path) -> CovarianceSums:
        """Read a partial sum written by save."""
        from msif.core.tensorfile import load_tensors

        tensors, meta = load_tensors(directory, STEM)
        specs = specs_from_meta(meta)
        return cls(
            meta["stage"],
            specs,
            {k: tensors[f"{k}.activation"] for k in specs},
            {k: tensors[f"{k}.gradient"] for k in specs},
            meta["num_tokens"],
            meta["num_sequences"],
            meta["fingerprint"],
            meta["seed"],
            meta.get("info", {}),
        )


def header(obj) -> dict:
    """The metadata every factor-like artifact shares."""
    return {
        "stage": obj.stage,
        "modules": [s.to_dict() for s in obj.specs.values()],
        "num_tokens": obj.num_tokens,
        "num_sequences": obj.num_sequences,
        "fingerprint": obj.fingerprint,
        "seed": obj.seed,
        "info": getattr(obj, "info", {}),
    }


def specs_from_meta(meta: dict) -> dict[str, ModuleSpec]:
    """Module specs recorded in an artifact's metadata, in order."""
    return {d["name"]: ModuleSpec.from_dict(d) for d in meta["modules"]}


def reduce_partials(parts: Sequence, what: str):
    """Sum shard partials (CovarianceSums or LambdaSums) with their own +."""
    if not parts:
        raise MsifError(f"no {what} given")
    return functools.reduce(operator.add, parts)


def check_compatible(a, b, what: str) -> None:
    """Refuse to combine artifacts fitted with other modules, models, stages or seeds."""
    if a.specs != b.specs:
        raise MismatchError(f"cannot combine {what}: they track different modules")
    if a.fingerprint != b.fingerprint:
        raise MismatchError(f"cannot combine {what}: they come from different models")
    if a.stage != b.stage or a.seed != b.seed:
        raise MismatchError(f"cannot combine {what}: stage or seed differs")


def gram(x: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """xᵀx for x (..., n, d), with each off-diagonal block computed once.

    A general matmul computes both triangles of the symmetric result; halving d recursively
    until `leaf` does about 3/4 of the work per level (1.3–1.4× faster at d = 384–513 on CPU).
    """
    d = x.shape[-1]
    if d <= leaf:
        return x.mT @ x
    h = d // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = x.new_empty(*x.shape[:-2], d, d)
    out[..., :h, :h] = gram(x1, leaf)
    out[..., h:, h:] = gram(x2, leaf)
    cross = x1.mT @ x2
    out[..., :h, h:] = cross
    out[..., h:, :h] = cross.mT
    return out


def _accumulate(cov: CovarianceSums, spec: ModuleSpec, a, g, mask) -> None:
    work = work_dtype(a.dtype)
    # Small blocks pay off on CPU; a GPU's matmuls want larger ones.
    leaf = 256 if a.device.type == "cpu" else 1024
    a_t = a[mask].to(work)
    g_t = g[mask].to(work).view(-1, spec.num_blocks, spec.block_size)
    act, grad = cov.activation[spec.name], cov.gradient[spec.name]
    act += gram(a_t, leaf).to(act.device)
    blocks = g_t.transpose(0, 1)  # (k, n, bs): one matmul per block
    grad += gram(blocks, leaf).to(grad.device)


def empty_sums(
    stage: str,
    specs: dict[str, ModuleSpec],
    fingerprint: dict,
    seed: int,
    device: torch.device | str = "cpu",
) -> CovarianceSums:
    """Zero float64 sums for the given modules."""
    f64 = {"dtype": torch.float64, "device": device}
    return CovarianceSums(
        stage,
        specs,
        {k: torch.zeros(s.in_dim, s.in_dim, **f64) for k, s in specs.items()},
        {k: torch.zeros(s.num_blocks, s.block_size, s.block_size, **f64) for k, s in specs.items()},
        0,
        0,
        fingerprint,
        seed,
    )


def fit_covariance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    stage: str = "pt",
    modules: ModuleSelection | dict[str, ModuleSpec] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> CovarianceSums:
    """Sum a aᵀ and g gᵀ over scored tokens, with g from labels sampled from the model."""
    specs = modules if isinstance(modules, dict) else find_modules(model, modules)
    cov = empty_sums(stage, specs, model_fingerprint(model, specs), seed, sums_device(model))
    with frozen(model), capture(model, specs) as cap:
        for batch in progress_bar(batches, progress, f"covariance ({stage})"):
            labels = gradient_pass(model, batch, cap, sample=True, seed=seed)
            mask = scored_positions(labels)
            for name, spec in specs.items():
                a, g = activations_and_gradients(cap, name)
                _accumulate(cov, spec, a, g, mask)
            cov.num_tokens += int(mask.sum())
            cov.num_sequences += int(batch["input_ids"].shape[0])
        cap.clear()
    cov.activation = {k: v.cpu() for k, v in cov.activation.items()}
    cov.gradient = {k: v.cpu() for k, v in cov.gradient.items()}
    return cov
