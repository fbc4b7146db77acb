"""Where tensors live and in which precision per-batch statistics are computed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    """Move the tensor fields of a batch to device."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision per-batch statistics are computed in: float64 for float64 models, else
    float32 (half-precision activations are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sums_device(model: nn.Module) -> torch.device:
    """Where float64 running sums live: beside the model, so a GPU pass never syncs per batch.

    MPS has no float64, so its sums stay on the CPU.
    """
    device = model_device(model)
    return torch.device("cpu") if device.type == "mps" else device
