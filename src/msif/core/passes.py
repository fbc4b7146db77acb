"""One forward and backward pass of the summed sequence loss with module hooks attached."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from msif.core.hooks import Capture
from msif.core.loss import sample_labels, sequence_losses


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


def gradient_pass(
    model: nn.Module, batch: Mapping, cap: Capture, *, sample: bool = False, seed: int = 0
) -> torch.Tensor:
    """Fill cap with a and g for the batch; return the labels the loss used (true or sampled)."""
    cap.clear()
    batch = to_device(batch, model_device(model))
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    labels = batch["labels"]
    if sample:
        labels = sample_labels(
            out.logits.detach(), batch["input_ids"], labels, batch["attention_mask"], seed
        )
    losses = sequence_losses(out.logits, labels)
    if losses.requires_grad:
        losses.sum().backward()
    return labels
