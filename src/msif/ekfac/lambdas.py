"""Eigenvalue correction: Λ = mean over sequences of (Q_Gᵀ DW_n Q_A)∘², additive over shards."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from msif.core.artifact import (
    PartialSums,
    check_finite_sums,
    module_specs,
    per_module,
    reduce_partials,
)
from msif.core.device import model_device, sums_device, work_dtype
from msif.core.fingerprint import check_fingerprint, model_fingerprint
from msif.core.hooks import hooked_batches
from msif.core.linalg import rotate_output
from msif.core.modules import ModuleSpec, select_group
from msif.ekfac.eigenbasis import Eigenbasis
from msif.ekfac.groups import fit_groups, lambda_bytes, split_modules
from msif.errors import MsifError

# Per-sequence rotated gradients are built in chunks of at most this many elements.
CHUNK_ELEMENTS = 1 << 26


@dataclass
class LambdaSums(PartialSums):
    """Partial sums of squared rotated per-sequence gradients, (out, in') float64 per module."""

    stem: ClassVar[str] = "lambda"
    what: ClassVar[str] = "Λ partial sums"

    stage: str
    specs: dict[str, ModuleSpec] = module_specs()
    sums: dict[str, torch.Tensor] = per_module("lambda")
    num_tokens: int
    num_sequences: int
    fingerprint: dict
    seed: int
    info: dict = field(default_factory=dict)

    def check_addable(self, other: LambdaSums) -> None:
        """Also refuse sums fitted in different eigenbases."""
        super().check_addable(other)
        if self.info.get("eigenbasis") != other.info.get("eigenbasis"):
            raise MsifError("cannot combine Λ partial sums fitted in different eigenbases")


def eigenbasis_id(basis: Eigenbasis) -> str:
    """A short hash of the eigenvectors, so Λ sums from different bases are never mixed."""
    h = hashlib.sha256()
    for k in basis.specs:
        h.update(basis.activation_eigvecs[k].double().numpy().tobytes())
        h.update(basis.gradient_eigvecs[k].double().numpy().tobytes())
    return h.hexdigest()[:16]


def _accumulate(total: torch.Tensor, spec: ModuleSpec, a, g, q_a, q_g) -> None:
    a_rot = a @ q_a.to(a.device, a.dtype)
    g_rot = rotate_output(g, q_g.to(a.device, a.dtype))
    per_seq = spec.out_features * spec.in_dim
    step = max(1, CHUNK_ELEMENTS // per_seq)
    for i in range(0, a.shape[0], step):
        rotated = torch.bmm(g_rot[i : i + step].mT, a_rot[i : i + step])
        total += rotated.square().sum(0).to(total.device)


def fit_lambda(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]] | Callable[[], Iterable[Mapping]],
    eigenbasis: Eigenbasis,
    *,
    seed: int | None = None,
    progress: bool = False,
    module_groups: int = 1,
    group: Collection[str] | None = None,
) -> LambdaSums:
    """Sum (Q_Gᵀ DW_n Q_A)∘² over sequences, DW_n from labels sampled from the model.

    module_groups N > 1 fits the modules in N passes over the data, each tracking one
    contiguous group (msif.ekfac.groups, balanced by the bytes of its Λ sums and
    eigenvectors) with only that group's eigenvectors on the device; the result is the
    one-pass sums bit for bit. batches must then be readable N times (a list, or a
    zero-argument callable returning fresh batches).

    group: the names of the eigenbasis's modules to fit; the sums keep the eigenbasis's
    fingerprint and id, so disjoint groups merge (msif.core.artifact.merge_modules).
    """
    specs = eigenbasis.specs
    check_fingerprint(eigenbasis.fingerprint, model_fingerprint(model, specs), "the eigenbasis")
    seed = eigenbasis.seed if seed is None else seed
    basis_id = eigenbasis_id(eigenbasis)
    work = work_dtype(next(model.parameters()).dtype)
    vector_bytes = torch.empty((), dtype=work).element_size()
    weight = functools.partial(lambda_bytes, vector_bytes=vector_bytes)
    groups = split_modules(select_group(specs, group), module_groups, weight)
    return fit_groups(
        groups,
        batches,
        f"lambda ({eigenbasis.stage})",
        lambda data, part, desc: _lambda_pass(
            model, data, eigenbasis, part, seed, basis_id, progress, desc
        ),
    )


def _lambda_pass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    eigenbasis: Eigenbasis,
    specs: dict[str, ModuleSpec],
    seed: int,
    basis_id: str,
    progress: bool,
    desc: str,
) -> LambdaSums:
    """One pass over the data tracking specs (with their eigenvectors on the device)."""
    device = sums_device(model)
    result = LambdaSums(
        stage=eigenbasis.stage,
        specs=specs,
        sums={
            k: torch.zeros(s.shape, dtype=torch.float64, device=device) for k, s in specs.items()
        },
        num_tokens=0,
        num_sequences=0,
        fingerprint=eigenbasis.fingerprint,
        seed=seed,
        info={"eigenbasis": basis_id},
    )
    # Moved and cast once per pass: a per-batch copy of every basis would dominate a GPU pass.
    dev = model_device(model)
    work = work_dtype(next(model.parameters()).dtype)
    q_a = {k: eigenbasis.activation_eigvecs[k].to(dev, work) for k in specs}
    q_g = {k: eigenbasis.gradient_eigvecs[k].to(dev, work) for k in specs}
    for hb in hooked_batches(
        model, batches, specs, sample=True, seed=seed, progress=progress, desc=desc
    ):
        real = hb.moved["attention_mask"].bool()
        for spec, a, g in hb.modules():
            a = a * real[..., None].to(a.dtype)
            _accumulate(result.sums[spec.name], spec, a, g, q_a[spec.name], q_g[spec.name])
        result.num_tokens += hb.num_scored  # = sampled labels != IGNORE, counted on the host
        result.num_sequences += int(hb.batch["input_ids"].shape[0])
    result.sums = {k: v.cpu() for k, v in result.sums.items()}
    check_finite_sums({"Λ": result.sums}, "Λ sums")
    return result


def reduce_lambda(parts: Sequence[LambdaSums]) -> LambdaSums:
    """Add Λ partial sums from shards."""
    return reduce_partials(parts, "Λ partial sums")
