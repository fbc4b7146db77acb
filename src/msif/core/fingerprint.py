"""Model fingerprints that let artifacts refuse to be used with another model."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from msif.core.modules import ModuleSpec, resolve
from msif.errors import MismatchError


def model_fingerprint(model: nn.Module, specs: dict[str, ModuleSpec]) -> dict:
    """Architecture hash (module names and shapes) and weights hash of the tracked modules."""
    arch = hashlib.sha256()
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    arch.update(str(model_type).encode())
    weights = hashlib.sha256()
    for name, module in resolve(model, specs.values()).items():
        spec = specs[name]
        arch.update(
            repr((name, spec.kind, spec.in_features, spec.out_features, spec.has_bias)).encode()
        )
        for p in (module.weight, getattr(module, "bias", None)):
            if p is not None:
                # float32 bytes: the same checkpoint hashes alike in fp32 and bf16-upcast form
                weights.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"architecture": arch.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


def check_fingerprint(expected: dict, actual: dict, what: str) -> None:
    """Raise MismatchError when an artifact was made with another model."""
    if expected.get("architecture") != actual.get("architecture"):
        raise MismatchError(f"{what} was computed for another model architecture")
    if "not_weights" in expected:  # only known: which model it must not be
        if expected["not_weights"] == actual.get("weights"):
            raise MismatchError(
                f"{what} must be the pre-trained model θ_pt, not the fine-tuned model"
            )
        return
    if expected.get("weights") != actual.get("weights"):
        raise MismatchError(f"{what} was computed with other model weights")
