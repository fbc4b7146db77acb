"""Forward/backward hooks that capture each tracked module's inputs a and output gradients g,
and the one hooked loop over batches (forward, backward, per-module a and g) every stage runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from msif.core.device import model_device, to_device, work_dtype
from msif.core.loss import sample_labels, sequence_losses
from msif.core.modules import ModuleSpec, resolve
from msif.core.progress import progress_bar


@dataclass
class Capture:
    """Per-module activations a (B, T, in') and output gradients g (B, T, out) of one batch."""

    specs: dict[str, ModuleSpec]
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        """Drop the tensors of the previous batch."""
        self.activations.clear()
        self.gradients.clear()


def _input_matrix(spec: ModuleSpec, inputs: tuple, dtype: torch.dtype) -> torch.Tensor:
    x = inputs[0]
    if spec.kind == "embedding":
        # An embedding is a linear map of one-hot token vectors.
        x = torch.nn.functional.one_hot(x, spec.in_features).to(dtype)
    x = x.detach()
    if spec.has_bias:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    return x


@contextmanager
def capture(model: nn.Module, specs: dict[str, ModuleSpec]) -> Iterator[Capture]:
    """Hook the tracked modules; inputs get gradients so weights need none (requires_grad off)."""
    modules = resolve(model, specs.values())
    cap = Capture(specs)
    # Registered first so a tracked embedding sees an output that already needs a gradient.
    handles = [_make_inputs_require_grad(model)]
    for name, module in modules.items():
        spec = specs[name]

        def forward_hook(mod, inputs, output, name=name, spec=spec):
            if name in cap.activations:
                raise RuntimeError(f"module {name!r} ran twice in one forward pass")
            cap.activations[name] = _input_matrix(spec, inputs, output.dtype)
            if output.requires_grad:

                def grad_hook(grad, name=name):
                    cap.gradients[name] = grad.detach()

                output.register_hook(grad_hook)

        handles.append(module.register_forward_hook(forward_hook))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def _make_inputs_require_grad(model: nn.Module):
    # With frozen weights nothing downstream of the embedding would need a gradient;
    # marking the embedding output restores the backward pass without weight gradients.
    emb = model.get_input_embeddings()

    def hook(mod, inputs, output):
        if not output.requires_grad:
            output.requires_grad_(True)
        return output

    return emb.register_forward_hook(hook)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off weight gradients and dropout for the duration, restoring both after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def activations_and_gradients(cap: Capture, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """a (B, T, in') and g (B, T, out) of a module; g is zero when no loss reached it."""
    a = cap.activations[name]
    g = cap.gradients.get(name)
    if g is None:
        spec = cap.specs[name]
        g = a.new_zeros(*a.shape[:-1], spec.out_features)
    return a, g


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


@dataclass
class HookedBatch:
    """One batch after its forward and backward pass of the summed sequence loss.

    batch is the batch as given; labels are the ones the loss used (true or sampled), on the
    model's device. The captured a and g are dropped when the next batch is drawn.
    """

    batch: Mapping[str, Any]
    labels: torch.Tensor
    capture: Capture

    def tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """a (B, T, in') and g (B, T, out) of one module, in the work dtype."""
        a, g = activations_and_gradients(self.capture, name)
        work = work_dtype(a.dtype)
        return a.to(work), g.to(work)

    def modules(self) -> Iterator[tuple[ModuleSpec, torch.Tensor, torch.Tensor]]:
        """(spec, a, g) of every tracked module in order, cast one module at a time."""
        for name, spec in self.capture.specs.items():
            yield (spec, *self.tensors(name))


def hooked_batches(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    specs: dict[str, ModuleSpec],
    *,
    sample: bool = False,
    seed: int = 0,
    progress: bool = False,
    desc: str = "batches",
) -> Iterator[HookedBatch]:
    """Run every batch forward and backward through the frozen, hooked model.

    The one loop every stage shares: weights get no gradients, the model is restored and
    the hooks removed when the iteration ends (or is abandoned). With sample=True the loss
    uses labels sampled from the model (seeded per sequence), else the batch's labels.
    """
    with frozen(model), capture(model, specs) as cap:
        try:
            for batch in progress_bar(batches, progress, desc):
                labels = gradient_pass(model, batch, cap, sample=sample, seed=seed)
                yield HookedBatch(batch, labels, cap)
                cap.clear()  # before the next batch is drawn
        finally:
            cap.clear()
