"""Eigendecomposition of the mean covariances (float64) into the EK-FAC eigenbasis.

On a CUDA device each matrix (a module's A, or all head blocks of its G at once) goes to the
GPU in turn and its eigenvectors come straight back, so device memory stays at what the
largest one needs. A CUDA eigh that fails (cuSOLVER error, out of memory) is logged once and
that matrix is done on the CPU. Eigenvectors agree with the CPU's up to sign, and up to a
rotation within a repeated eigenvalue: compare reconstructions, never raw Q.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from msif.core.artifact import Artifact, module_specs, per_module, reduce_partials
from msif.core.device import resolve_device
from msif.core.modules import ModuleSpec
from msif.ekfac.covariance import CovarianceSums
from msif.errors import MsifError

log = logging.getLogger("msif")


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


def eigh_device(device: str | torch.device = "auto") -> torch.device:
    """Where float64 eigendecompositions run: CUDA when asked for (or available under auto),
    else the CPU (MPS has no float64)."""
    resolved = resolve_device(device)
    return resolved if resolved.type == "cuda" else torch.device("cpu")


@dataclass
class EighRunner:
    """float64 eigh of one symmetric matrix (or batch of blocks) at a time on device, results
    on the CPU; falls back to the CPU for a matrix whose CUDA eigh fails, logging the first."""

    device: torch.device
    fallbacks: int = 0

    def __call__(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues ascending, eigenvectors), float64 on the CPU."""
        matrix = matrix.double()
        if self.device.type == "cuda":
            try:
                return _cuda_eigh(matrix, self.device)
            except RuntimeError as exc:  # torch.OutOfMemoryError and cuSOLVER errors alike
                self._fell_back(matrix, exc)
        return torch.linalg.eigh(matrix.cpu())

    def _fell_back(self, matrix: torch.Tensor, exc: RuntimeError) -> None:
        self.fallbacks += 1
        torch.cuda.empty_cache()  # what the failed attempt reserved, for the next matrix
        if self.fallbacks == 1:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning(
                "eigh of a %s float64 matrix on %s failed (%s): computing it on the CPU; "
                "later failures fall back silently",
                "×".join(str(n) for n in matrix.shape),
                self.device,
                reason,
            )


def _cuda_eigh(matrix: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    on_device = matrix.to(device)
    vals, vecs = torch.linalg.eigh(on_device)
    del on_device  # before the copies back: the next matrix reuses this memory
    return vals.cpu(), vecs.cpu()


def eigendecompose(
    covariance: CovarianceSums | Sequence[CovarianceSums],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
) -> Eigenbasis:
    """Eigenvectors of A = Σaaᵀ/tokens and each block of G = Σggᵀ/tokens, computed in float64.

    device: auto (CUDA when available), cpu, cuda or cuda:N; on CUDA one matrix at a time
    is on the GPU, and a matrix whose CUDA eigh fails is done on the CPU.
    """
    cov = covariance if isinstance(covariance, CovarianceSums) else reduce_sums(covariance)
    if cov.num_tokens == 0:
        raise MsifError("covariance sums hold no scored tokens: the data had nothing to fit")
    eigh = EighRunner(eigh_device(device))
    qa, qg, la, lg = {}, {}, {}, {}
    for name in cov.specs:
        la[name], qa[name] = eigh(cov.activation[name].double() / cov.num_tokens)
        lg[name], qg[name] = eigh(cov.gradient[name].double() / cov.num_tokens)
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
        info={
            "dtype": str(dtype).removeprefix("torch."),
            "eigh_device": str(eigh.device),
            "eigh_cpu_fallbacks": eigh.fallbacks,
        },
    )
