"""All of one stage's EK-FAC fitting in one call: covariance → eigenbasis → Λ → factors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from msif.core.device import model_device
from msif.core.modules import ModuleSelection, ModuleSpec
from msif.ekfac.covariance import fit_covariance
from msif.ekfac.eigenbasis import eigendecompose
from msif.ekfac.factors import Factors
from msif.ekfac.lambdas import fit_lambda


def fit_factors(
    model: nn.Module,
    batches_fn: Callable[[], Iterable[Mapping[str, torch.Tensor]]],
    *,
    stage: str,
    modules: ModuleSelection | dict[str, ModuleSpec] | None = None,
    seed: int = 0,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    module_groups: int = 1,
) -> Factors:
    """EK-FAC factors of one stage from its data, in memory (no shards, no artifacts).

    batches_fn is called twice, once for the covariance pass and once for the Λ pass, and must
    return a fresh iterable of the same batches each time. dtype is that of the stored
    eigenvectors and Λ (the eigendecomposition itself runs in float64, on the model's GPU
    when it has one). module_groups N > 1 fits each of the two passes in N passes over one
    group of modules each (batches_fn is then called N times per pass; msif.ekfac.groups),
    with the same factors bit for bit.
    """
    if not callable(batches_fn):
        raise TypeError(
            "batches_fn must be a zero-argument callable returning a fresh batch iterable "
            "(the data is passed twice), e.g. lambda: batches(...)"
        )
    groups = {"module_groups": module_groups, "progress": progress}
    cov = fit_covariance(model, batches_fn, stage=stage, modules=modules, seed=seed, **groups)
    basis = eigendecompose(cov, dtype=dtype, device=model_device(model))
    return Factors.build(basis, fit_lambda(model, batches_fn, basis, **groups))
