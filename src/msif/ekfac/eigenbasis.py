"""Eigendecomposition of the mean covariances (float64) into the EK-FAC eigenbasis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from msif.core.artifact import Artifact, module_specs, per_module, reduce_partials
from msif.core.modules import ModuleSpec
from msif.ekfac.covariance import CovarianceSums
from msif.errors import MsifError


@dataclass
class Eigenbasis(Artifact):
    """Per module Q_A (in', in') and block-diagonal Q_G (blocks, bs, bs) with eigenvalues."""

    stem: ClassVar[str] = "eigenbasis"

    stage: str
    specs: dict[str, ModuleSpec] = module_specs()
    activation_eigvecs: dict[str, torch.Tensor] = per_module("Q_A")
    gradient_eigvecs: dict[str, torch.Tensor] = per_module("Q_G")
    activation_eigvals: dict[str, torch.Tensor] = per_module("eig_A")
    gradient_eigvals: dict[str, torch.Tensor] = per_module("eig_G")
    num_tokens: int
    num_sequences: int
    fingerprint: dict
    seed: int
    info: dict = field(default_factory=dict)


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
        stage=cov.stage,
        specs=cov.specs,
        activation_eigvecs=cast(qa),
        gradient_eigvecs=cast(qg),
        activation_eigvals=cast(la),
        gradient_eigvals=cast(lg),
        num_tokens=cov.num_tokens,
        num_sequences=cov.num_sequences,
        fingerprint=cov.fingerprint,
        seed=cov.seed,
        info={"dtype": str(dtype).removeprefix("torch.")},
    )
