"""Model fingerprints that let artifacts refuse to be used with another model.

A fingerprint hashes the architecture (model type, tracked module names and shapes) and the
tracked weights' values, and records the dtype they were loaded in. The weights hash is taken
of the values as loaded (as float32 bytes, so float32 and float64 loads of a float32
checkpoint agree), so it is not dtype-independent: a bfloat16 load rounds every weight, and
factors fitted with it describe another function than the float32 model. Rounding the hash
to a common precision instead would make models that differ only below it (a short
fine-tune) fingerprint alike. The dtype is recorded so that a refusal can say what differs.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from msif.core.modules import ModuleSpec, resolve
from msif.errors import MismatchError


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_fingerprint(model: nn.Module, specs: dict[str, ModuleSpec]) -> dict:
    """Architecture hash (module names and shapes), weights hash of the tracked modules and
    the dtype those weights are loaded in."""
    arch = hashlib.sha256()
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    arch.update(str(model_type).encode())
    weights = hashlib.sha256()
    dtypes = set()
    for name, module in resolve(model, specs.values()).items():
        spec = specs[name]
        arch.update(
            repr((name, spec.kind, spec.in_features, spec.out_features, spec.has_bias)).encode()
        )
        for p in (module.weight, getattr(module, "bias", None)):
            if p is not None:
                dtypes.add(_dtype_name(p.dtype))
                # float32 bytes: the same checkpoint hashes alike in fp32 and bf16-upcast form
                weights.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {
        "architecture": arch.hexdigest()[:16],
        "weights": weights.hexdigest()[:16],
        "dtype": "+".join(sorted(dtypes)),
    }


def same_model(a: dict, b: dict) -> bool:
    """Whether two fingerprints name the same architecture and weights (dtype aside)."""
    return a.get("architecture") == b.get("architecture") and a.get("weights") == b.get("weights")


def dtype_advice(expected: dict, actual: dict, what: str) -> str | None:
    """'… fitted with the model in X, this model is Y …' when the loaded dtypes differ."""
    fitted, here = expected.get("dtype"), actual.get("dtype")
    if not fitted or not here or fitted == here:
        return None
    return (
        f"{what} was computed with the model in {fitted}, this model is {here}: "
        "use the same --dtype"
    )


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
        advice = dtype_advice(expected, actual, what)
        raise MismatchError(advice or f"{what} was computed with other model weights")
