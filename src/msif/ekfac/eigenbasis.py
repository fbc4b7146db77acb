"""Eigendecomposition of the mean covariances (float64) into the EK-FAC eigenbasis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from msif.core.modules import ModuleSpec
from msif.ekfac.covariance import CovarianceSums, header, reduce_partials, specs_from_meta
from msif.errors import MsifError

STEM = "eigenbasis"


@dataclass
class Eigenbasis:
    """Per module Q_A (in', in') and block-diagonal Q_G (blocks, bs, bs) with eigenvalues."""

    stage: str
    specs: dict[str, ModuleSpec]
    activation_eigvecs: dict[str, torch.Tensor]
    gradient_eigvecs: dict[str, torch.Tensor]
    activation_eigvals: dict[str, torch.Tensor]
    gradient_eigvals: dict[str, torch.Tensor]
    num_tokens: int
    num_sequences: int
    fingerprint: dict
    seed: int
    info: dict = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        """Write eigenbasis.safetensors + eigenbasis.json."""
        from msif.core.tensorfile import save_tensors

        tensors = {}
        for k in self.specs:
            tensors[f"{k}.Q_A"] = self.activation_eigvecs[k]
            tensors[f"{k}.Q_G"] = self.gradient_eigvecs[k]
            tensors[f"{k}.eig_A"] = self.activation_eigvals[k]
            tensors[f"{k}.eig_G"] = self.gradient_eigvals[k]
        save_tensors(directory, STEM, tensors, header(self))

    @classmethod
    def load(cls, directory: str | Path) -> Eigenbasis:
        """Read an eigenbasis written by save."""
        from msif.core.tensorfile import load_tensors

        t, meta = load_tensors(directory, STEM)
        specs = specs_from_meta(meta)
        return cls(
            meta["stage"],
            specs,
            {k: t[f"{k}.Q_A"] for k in specs},
            {k: t[f"{k}.Q_G"] for k in specs},
            {k: t[f"{k}.eig_A"] for k in specs},
            {k: t[f"{k}.eig_G"] for k in specs},
            meta["num_tokens"],
            meta["num_sequences"],
            meta["fingerprint"],
            meta["seed"],
            meta.get("info", {}),
        )


def reduce_sums(parts: Sequence[CovarianceSums]) -> CovarianceSums:
    """Add partial sums from shards (refusing mismatched ones)."""
    return reduce_partials(parts, "covariance partial sums")


def eigendecompose(
    covariance: CovarianceSums | Sequence[CovarianceSums], dtype: torch.dtype = torch.float32
) -> Eigenbasis:
    """Eigenvectors of A = Σaaᵀ/tokens and each block of G = Σggᵀ/tokens, computed in float64."""
    cov = covariance if isinstance(covariance, CovarianceSums) else reduce_sums(covariance)
    if cov.num_tokens == 0:
        raise MsifError("covariance sums hold no scored tokens: the data had nothing to fit")
    qa, qg, la, lg = {}, {}, {}, {}
    for name in cov.specs:
        a = cov.activation[name].double() / cov.num_tokens
        g = cov.gradient[name].double() / cov.num_tokens
        la[name], qa[name] = torch.linalg.eigh(a)
        lg[name], qg[name] = torch.linalg.eigh(g)
    cast = lambda d: {k: v.to(dtype) for k, v in d.items()}  # noqa: E731
    return Eigenbasis(
        cov.stage,
        cov.specs,
        cast(qa),
        cast(qg),
        cast(la),
        cast(lg),
        cov.num_tokens,
        cov.num_sequences,
        cov.fingerprint,
        cov.seed,
        {"dtype": str(dtype).removeprefix("torch.")},
    )
