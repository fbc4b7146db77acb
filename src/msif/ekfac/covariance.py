"""Covariance fitting: additive sums of a aᵀ and g gᵀ under labels sampled from the model."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from msif.core.artifact import (
    PartialSums,
    check_finite_sums,
    module_specs,
    per_module,
)
from msif.core.device import sums_device
from msif.core.fingerprint import model_fingerprint
from msif.core.hooks import hooked_batches
from msif.core.linalg import gram
from msif.core.modules import ModuleSelection, ModuleSpec, find_modules, select_group
from msif.ekfac.groups import covariance_bytes, fit_groups, split_modules


@dataclass
class CovarianceSums(PartialSums):
    """Partial sums of the EK-FAC covariances; shards add with +."""

    stem: ClassVar[str] = "covariance"
    what: ClassVar[str] = "covariance partial sums"

    stage: str
    specs: dict[str, ModuleSpec] = module_specs()
    activation: dict[str, torch.Tensor] = per_module("activation")  # (in', in') Σ a aᵀ, float64
    gradient: dict[str, torch.Tensor] = per_module("gradient")  # (blocks, bs, bs) Σ g gᵀ
    num_tokens: int
    num_sequences: int
    fingerprint: dict
    seed: int
    info: dict = field(default_factory=dict)


def _accumulate(cov: CovarianceSums, spec: ModuleSpec, a, g, rows) -> None:
    # Small blocks pay off on CPU; a GPU's matmuls want larger ones.
    leaf = 256 if a.device.type == "cpu" else 1024
    # The scored tokens by index (found on the host), not by a device mask: a[mask] sizes its
    # output by device data, which makes the host wait for the GPU.
    a_t = a.reshape(-1, a.shape[-1]).index_select(0, rows)
    g_t = g.reshape(-1, g.shape[-1]).index_select(0, rows)
    g_t = g_t.view(-1, spec.num_blocks, spec.block_size)
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
        stage=stage,
        specs=specs,
        activation={k: torch.zeros(s.in_dim, s.in_dim, **f64) for k, s in specs.items()},
        gradient={
            k: torch.zeros(s.num_blocks, s.block_size, s.block_size, **f64)
            for k, s in specs.items()
        },
        num_tokens=0,
        num_sequences=0,
        fingerprint=fingerprint,
        seed=seed,
    )


def fit_covariance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]] | Callable[[], Iterable[Mapping]],
    *,
    stage: str = "pt",
    modules: ModuleSelection | dict[str, ModuleSpec] | None = None,
    seed: int = 0,
    progress: bool = False,
    module_groups: int = 1,
    group: Collection[str] | None = None,
) -> CovarianceSums:
    """Sum a aᵀ and g gᵀ over scored tokens, with g from labels sampled from the model.

    module_groups N > 1 fits the modules in N passes over the data, each tracking one
    contiguous group of them (msif.ekfac.groups, balanced by their sums' bytes): the device
    holds about 1/N of the sums, for N forward and backward passes, and the result is the
    one-pass sums bit for bit. batches must then be readable N times: a list of batches, or
    a zero-argument callable that returns fresh ones.

    group: the names of the selected modules to fit (the others are not tracked). The sums
    keep the whole selection's fingerprint, so that disjoint groups fitted on the same data
    merge into the whole (msif.core.artifact.merge_modules).
    """
    specs = modules if isinstance(modules, dict) else find_modules(model, modules)
    fingerprint = model_fingerprint(model, specs)  # of the whole selection, once
    groups = split_modules(select_group(specs, group), module_groups, covariance_bytes)
    return fit_groups(
        groups,
        batches,
        f"covariance ({stage})",
        lambda data, part, desc: _covariance_pass(
            model, data, stage, part, fingerprint, seed, progress, desc
        ),
    )


def _covariance_pass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    stage: str,
    specs: dict[str, ModuleSpec],
    fingerprint: dict,
    seed: int,
    progress: bool,
    desc: str,
) -> CovarianceSums:
    """One pass over the data tracking specs: their sums, on the host."""
    cov = empty_sums(stage, specs, fingerprint, seed, sums_device(model))
    for hb in hooked_batches(
        model, batches, specs, sample=True, seed=seed, progress=progress, desc=desc
    ):
        rows = hb.scored_rows()
        for spec, a, g in hb.modules():
            _accumulate(cov, spec, a, g, rows)
        cov.num_tokens += hb.num_scored
        cov.num_sequences += int(hb.batch["input_ids"].shape[0])
    cov.activation = {k: v.cpu() for k, v in cov.activation.items()}
    cov.gradient = {k: v.cpu() for k, v in cov.gradient.items()}
    check_finite_sums({"A": cov.activation, "G": cov.gradient}, "covariance sums")
    return cov
