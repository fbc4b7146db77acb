"""Eigenvalue correction: Λ = mean over sequences of (Q_Gᵀ DW_n Q_A)∘², additive over shards."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from msif.core.fingerprint import check_fingerprint, model_fingerprint
from msif.core.hooks import activations_and_gradients, capture, frozen
from msif.core.modules import ModuleSpec
from msif.core.passes import gradient_pass, model_device, sums_device, work_dtype
from msif.core.progress import progress_bar
from msif.ekfac.covariance import check_compatible, header, reduce_partials, specs_from_meta
from msif.ekfac.eigenbasis import Eigenbasis
from msif.errors import MsifError

STEM = "lambda"
# Per-sequence rotated gradients are built in chunks of at most this many elements.
CHUNK_ELEMENTS = 1 << 26


@dataclass
class LambdaSums:
    """Partial sums of squared rotated per-sequence gradients, (out, in') float64 per module."""

    stage: str
    specs: dict[str, ModuleSpec]
    sums: dict[str, torch.Tensor]
    num_tokens: int
    num_sequences: int
    fingerprint: dict
    seed: int
    info: dict = field(default_factory=dict)

    def __add__(self, other: LambdaSums) -> LambdaSums:
        check_compatible(self, other, "Λ partial sums")
        if self.info.get("eigenbasis") != other.info.get("eigenbasis"):
            raise MsifError("cannot combine Λ partial sums fitted in different eigenbases")
        return LambdaSums(
            self.stage,
            self.specs,
            {k: v + other.sums[k] for k, v in self.sums.items()},
            self.num_tokens + other.num_tokens,
            self.num_sequences + other.num_sequences,
            self.fingerprint,
            self.seed,
            self.info,
        )

    def save(self, directory: str | Path) -> None:
        """Write lambda.safetensors + lambda.json."""
        from msif.core.tensorfile import save_tensors

        save_tensors(
            directory, STEM, {f"{k}.lambda": v for k, v in self.sums.items()}, header(self)
        )

    @classmethod
    def load(cls, directory: str | Path) -> LambdaSums:
        """Read a partial sum written by save."""
        from msif.core.tensorfile import load_tensors

        t, meta = load_tensors(directory, STEM)
        specs = specs_from_meta(meta)
        return cls(
            meta["stage"],
            specs,
            {k: t[f"{k}.lambda"] for k in specs},
            meta["num_tokens"],
            meta["num_sequences"],
            meta["fingerprint"],
            meta["seed"],
            meta.get("info", {}),
        )


def eigenbasis_id(basis: Eigenbasis) -> str:
    """A short hash of the eigenvectors, so Λ sums from different bases are never mixed."""
    import hashlib

    h = hashlib.sha256()
    for k in basis.specs:
        h.update(basis.activation_eigvecs[k].double().numpy().tobytes())
        h.update(basis.gradient_eigvecs[k].double().numpy().tobytes())
    return h.hexdigest()[:16]


def rotate_output(g: torch.Tensor, q_g: torch.Tensor) -> torch.Tensor:
    """Apply the block-diagonal Q_Gᵀ to the last (output) axis of g."""
    blocks, bs, _ = q_g.shape
    gb = g.reshape(*g.shape[:-1], blocks, bs)
    return torch.einsum("...kb,kbc->...kc", gb, q_g).reshape(g.shape)


def rotate_rows(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Block-diagonal matrix (k, bs, bs) times x (..., k·bs, in'), as batched matmuls."""
    k, bs, _ = blocks.shape
    rows = x.reshape(*x.shape[:-2], k, bs, x.shape[-1])
    return torch.matmul(blocks, rows).reshape(x.shape)


def _accumulate(total: torch.Tensor, spec: ModuleSpec, a, g, q_a, q_g) -> None:
    work = work_dtype(a.dtype)
    a_rot = a.to(work) @ q_a.to(a.device, work)
    g_rot = rotate_output(g.to(work), q_g.to(a.device, work))
    per_seq = spec.out_features * spec.in_dim
    step = max(1, CHUNK_ELEMENTS // per_seq)
    for i in range(0, a.shape[0], step):
        rotated = torch.bmm(g_rot[i : i + step].mT, a_rot[i : i + step])
        total += rotated.square().sum(0).to(total.device)


def fit_lambda(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    eigenbasis: Eigenbasis,
    *,
    seed: int | None = None,
    progress: bool = False,
) -> LambdaSums:
    """Sum (Q_Gᵀ DW_n Q_A)∘² over sequences, DW_n from labels sampled from the model."""
    specs = eigenbasis.specs
    check_fingerprint(eigenbasis.fingerprint, model_fingerprint(model, specs), "the eigenbasis")
    seed = eigenbasis.seed if seed is None else seed
    device = sums_device(model)
    sums = {k: torch.zeros(s.shape, dtype=torch.float64, device=device) for k, s in specs.items()}
    result = LambdaSums(
        eigenbasis.stage,
        specs,
        sums,
        0,
        0,
        eigenbasis.fingerprint,
        seed,
        {"eigenbasis": eigenbasis_id(eigenbasis)},
    )
    # Moved and cast once: a per-batch copy of every basis would dominate a GPU pass.
    dev = model_device(model)
    work = work_dtype(next(model.parameters()).dtype)
    q_a = {k: v.to(dev, work) for k, v in eigenbasis.activation_eigvecs.items() if k in specs}
    q_g = {k: v.to(dev, work) for k, v in eigenbasis.gradient_eigvecs.items() if k in specs}
    with frozen(model), capture(model, specs) as cap:
        for batch in progress_bar(batches, progress, f"lambda ({eigenbasis.stage})"):
            labels = gradient_pass(model, batch, cap, sample=True, seed=seed)
            real = batch["attention_mask"].to(labels.device).bool()
            for name, spec in specs.items():
                a, g = activations_and_gradients(cap, name)
                a = a * real[..., None].to(a.dtype)
                _accumulate(sums[name], spec, a, g, q_a[name], q_g[name])
            result.num_tokens += int((labels != -100).sum())
            result.num_sequences += int(batch["input_ids"].shape[0])
        cap.clear()
    result.sums = {k: v.cpu() for k, v in sums.items()}
    return result


def reduce_lambda(parts: Sequence[LambdaSums]) -> LambdaSums:
    """Add Λ partial sums from shards."""
    return reduce_partials(parts, "Λ partial sums")
