"""EK-FAC factors of one training stage and their damped inverse."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from msif.core.artifact import Artifact, module_specs, per_module
from msif.core.fingerprint import check_fingerprint, model_fingerprint, same_model
from msif.core.linalg import rotate_rows
from msif.core.modules import ModuleSpec
from msif.ekfac.eigenbasis import Eigenbasis
from msif.ekfac.lambdas import LambdaSums, eigenbasis_id, reduce_lambda
from msif.errors import MismatchError, MsifError
from msif.version import __version__

# Chosen in issue 14 by MRR on fact worlds the choice was not tuned on (benchmarks/RESULTS.md,
# "Damping defaults"): a pre-train factor of 0.01 beat 0.1 on 4 of 5 held-out worlds, and an
# absolute fine-tune damping beat one relative to mean(Λ_ft) on all of them, because Λ_ft of a
# confident fine-tune is tiny (1e-9 to 1e-7) and a relative λ then amplifies noise directions.
DEFAULT_DAMPING_FACTOR = 0.01
DEFAULT_ALPHA = 1e-3


@dataclass(frozen=True)
class Damping:
    """λ = factor × mean(Λ) per module, unless an absolute value is given."""

    factor: float = DEFAULT_DAMPING_FACTOR
    absolute: float | None = None

    def value(self, lambdas: torch.Tensor) -> float:
        """The damping for a module with eigenvalues lambdas."""
        if self.absolute is not None:
            return float(self.absolute)
        return float(self.factor * lambdas.double().mean())


@dataclass
class Factors(Artifact):
    """Per module Q_A, block-diagonal Q_G and corrected eigenvalues Λ (out, in') of one stage."""

    stem: ClassVar[str] = "factors"

    stage: str
    specs: dict[str, ModuleSpec] = module_specs()
    activation_eigvecs: dict[str, torch.Tensor] = per_module("Q_A")
    gradient_eigvecs: dict[str, torch.Tensor] = per_module("Q_G")
    lambdas: dict[str, torch.Tensor] = per_module("lambda")
    num_tokens: int
    num_sequences: int
    fingerprint: dict
    seed: int
    info: dict = field(default_factory=dict)

    @classmethod
    def build(cls, eigenbasis: Eigenbasis, lambda_sums: LambdaSums | list[LambdaSums]) -> Factors:
        """Combine an eigenbasis with (shards of) Λ sums fitted in it."""
        lam = lambda_sums if isinstance(lambda_sums, LambdaSums) else reduce_lambda(lambda_sums)
        if lam.info.get("eigenbasis") != eigenbasis_id(eigenbasis):
            raise MismatchError("Λ sums were fitted in another eigenbasis")
        if lam.specs != eigenbasis.specs or not same_model(lam.fingerprint, eigenbasis.fingerprint):
            raise MismatchError("Λ sums and eigenbasis track different modules or models")
        if lam.num_sequences == 0:
            raise MsifError("Λ sums hold no sequences: the data had nothing to fit")
        dtype = next(iter(eigenbasis.activation_eigvecs.values())).dtype
        lambdas = {k: (v / lam.num_sequences).to(dtype) for k, v in lam.sums.items()}
        info = {
            "dtype": str(dtype).removeprefix("torch."),
            "msif_version": __version__,
            "covariance_tokens": eigenbasis.num_tokens,
        }
        return cls(
            stage=eigenbasis.stage,
            specs=eigenbasis.specs,
            activation_eigvecs=dict(eigenbasis.activation_eigvecs),
            gradient_eigvecs=dict(eigenbasis.gradient_eigvecs),
            lambdas=lambdas,
            num_tokens=lam.num_tokens,
            num_sequences=lam.num_sequences,
            fingerprint=eigenbasis.fingerprint,
            seed=eigenbasis.seed,
            info=info,
        )

    @classmethod
    def load(
        cls, directory: str | Path, *, model: nn.Module | None = None, stage: str | None = None
    ) -> Factors:
        """Read factors; with model, refuse factors fitted for another model or modules."""
        f = super().load(directory)
        if stage is not None and f.stage != stage:
            raise MismatchError(f"{directory} holds {f.stage!r} factors, expected {stage!r}")
        if model is not None:
            check_fingerprint(
                f.fingerprint,
                model_fingerprint(model, f.specs),
                f"the {f.stage} factors in {directory}",
            )
        return f

    def moved(self, device: torch.device, dtype: torch.dtype) -> Factors:
        """These factors with every Q_A, Q_G and Λ on device in dtype, moved once for a pass
        (eigenvectors() then copies nothing per batch); the stored factors are untouched."""

        def move(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device, dtype) for k, v in tensors.items()}

        return dataclasses.replace(
            self,
            activation_eigvecs=move(self.activation_eigvecs),
            gradient_eigvecs=move(self.gradient_eigvecs),
            lambdas=move(self.lambdas),
        )

    def damping_for(self, name: str, damping: Damping) -> float:
        """The λ this module gets under a damping rule."""
        return damping.value(self.lambdas[name])

    def to_eigenbasis(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """Q_Gᵀ v Q_A for v (..., out, in'): v in the module's Kronecker eigenbasis."""
        q_a, q_g = self.eigenvectors(name, v)
        return rotate_rows(q_g.mT, v @ q_a)

    def from_eigenbasis(self, name: str, r: torch.Tensor) -> torch.Tensor:
        """Q_G r Q_Aᵀ: back from eigenbasis coordinates to weight coordinates."""
        q_a, q_g = self.eigenvectors(name, r)
        return rotate_rows(q_g, r) @ q_a.T

    def divide(self, name: str, r: torch.Tensor, lambda_: float) -> torch.Tensor:
        """r / (Λ + λ): the damped inverse in eigenbasis coordinates."""
        return r / (self.lambdas[name].to(r.device, r.dtype) + lambda_)

    def inverse_apply(self, name: str, v: torch.Tensor, lambda_: float) -> torch.Tensor:
        """(F + λI)⁻¹ v for a module; v is (..., out, in'); the factors are left untouched."""
        return self.from_eigenbasis(name, self.divide(name, self.to_eigenbasis(name, v), lambda_))

    def eigenvectors(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Q_A (in', in') and block-diagonal Q_G (k, bs, bs) on like's device and dtype."""
        q_a = self.activation_eigvecs[name].to(like.device, like.dtype)
        return q_a, self.gradient_eigvecs[name].to(like.device, like.dtype)


def change_of_basis(src: Factors, dst: Factors, name: str, r: torch.Tensor) -> torch.Tensor:
    """dst's eigenbasis coordinates of what is r in src's: (Q_G'ᵀ Q_G) r (Q_Aᵀ Q_A').

    Equal to dst.to_eigenbasis(src.from_eigenbasis(r)) at the cost of one rotation, not two.
    """
    q_a, q_g = src.eigenvectors(name, r)
    q_a2, q_g2 = dst.eigenvectors(name, r)
    return rotate_rows(q_g2.mT @ q_g, r) @ (q_a.T @ q_a2)
