"""Forward/backward hooks that capture each tracked module's inputs a and output gradients g,
and the one hooked loop over batches (forward, backward, per-module a and g) every stage runs.

The loop never makes the host wait on the GPU per batch: what it checks on the batch (token
ids, labels, the padding pattern, which positions are scored) it reads from the host batch
before moving it, and what it checks on device results (finite a and g) it reads a batch
later through msif.core.device.Deferred.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from msif.core.device import Deferred, model_device, to, to_device, work_dtype
from msif.core.loss import IGNORE, sample_labels, scored_positions, sequence_losses
from msif.core.modules import ModuleSpec, resolve
from msif.core.progress import progress_bar
from msif.errors import MismatchError, MsifError


@dataclass
class Capture:
    """Per-module activations a (B, T, in') and output gradients g (B, T, out) of one batch.

    batch_shape is the (B, T) of the batch in flight: a module that sees the batch flattened
    to (B·T, d) (OPT's fc1 and fc2) gets its a and g viewed back as (B, T, d) with it.
    """

    specs: dict[str, ModuleSpec]
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    batch_shape: tuple[int, int] | None = None

    def clear(self) -> None:
        """Drop the tensors of the previous batch."""
        self.activations.clear()
        self.gradients.clear()

    def per_token(self, name: str, x: torch.Tensor, what: str) -> torch.Tensor:
        """x (B, T, d), or x (B·T, d) viewed as (B, T, d), of the batch in flight."""
        if self.batch_shape is None:
            return x
        b, t = self.batch_shape
        if x.dim() == 2 and x.shape[0] == b * t:
            # Row n·T + t of a row-major flattening is token t of sequence n.
            return x.reshape(b, t, x.shape[-1])
        if x.dim() == 3 and tuple(x.shape[:2]) == (b, t):
            return x
        raise MsifError(
            f"cannot track module {name!r}: its {what} has shape {tuple(x.shape)}, neither "
            f"(batch, tokens, features) nor (batch·tokens, features) for a batch of {b}×{t}"
        )


def embedding_scale(name: str, module: nn.Module) -> torch.Tensor | float:
    """The constant an embedding multiplies its looked-up rows by (1 for nn.Embedding).

    Gemma's and Gemma 2's embeddings return weight[ids] · √hidden (`embed_scale`): the module
    is then a linear map of scaled one-hot vectors, and a must carry the scale for
    Σ_t g_t a_tᵀ to be the weight's gradient. Another forward override is refused.
    """
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale.detach().to(module.weight.dtype)
    if isinstance(scale, int | float) and not isinstance(scale, bool):
        return float(scale)
    raise MsifError(
        f"cannot track embedding {name!r}: {type(module).__name__} overrides the lookup "
        "and has no scalar embed_scale, so its weight gradient is not known"
    )


def _check_lookup(name: str, module: nn.Module, ids, output, scale) -> None:
    # The scale is read from an attribute: check once that the output is what it implies.
    want = torch.nn.functional.embedding(ids, module.weight) * scale
    if not torch.allclose(output.detach(), want.to(output.dtype), rtol=1e-3, atol=0.0):
        raise MsifError(
            f"cannot track embedding {name!r}: its output is not its weight's rows times "
            "embed_scale, so its weight gradient is not known"
        )


def input_matrix(
    cap: Capture, name: str, mod: nn.Module, inputs: tuple, dtype: torch.dtype, scale=1.0
) -> torch.Tensor:
    """A module's input a (B, T, in') in msif's layout: the bias column appended, an
    embedding's ids as (scaled) one-hot rows; dtype is the one-hot's."""
    spec = cap.specs[name]
    x = inputs[0]
    if spec.kind == "embedding":
        # An embedding is a linear map of one-hot token vectors (times its scale).
        x = torch.nn.functional.one_hot(x, spec.in_features).to(dtype)
        if not (isinstance(scale, float) and scale == 1.0):
            x = x * scale
        if mod.padding_idx is not None:
            # nn.Embedding gives its padding row no gradient (OPT pads with a real token id).
            x[..., mod.padding_idx] = 0
    x = cap.per_token(name, x.detach(), "input")
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
    checked: set[str] = set()
    for name, module in modules.items():
        spec = specs[name]
        scale = embedding_scale(name, module) if spec.kind == "embedding" else 1.0

        def forward_hook(mod, inputs, output, name=name, spec=spec, scale=scale):
            if name in cap.activations:
                raise RuntimeError(f"module {name!r} ran twice in one forward pass")
            if spec.kind == "embedding" and name not in checked:
                _check_lookup(name, mod, inputs[0], output, scale)
                checked.add(name)
            cap.activations[name] = input_matrix(cap, name, mod, inputs, output.dtype, scale)
            if output.requires_grad:

                def grad_hook(grad, name=name):
                    cap.gradients[name] = cap.per_token(name, grad.detach(), "output gradient")

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


def model_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """The attention mask the model is run with: all ones when every row is right-padded.

    In a causal model a real token precedes every padding position of its row, so it never
    attends to one: the mask changes nothing for real tokens. It does for the padding rows
    themselves: a sliding window (Gemma 2, Mistral) leaves a padding query with no key to
    attend to, and eager attention that adds float64's most negative value, then casts to a
    float32 softmax, turns that row into NaN, which 0·NaN spreads to every real token of the
    sequence in the next layer. Unmasked, padding rows stay finite; their loss is ignored, so
    their g is exactly 0 and they add nothing to any sum. Other masks (left padding, gaps) are
    passed as given.
    """
    m = mask.bool()
    if m.numel() == 0 or not bool(m[:, 0].all()) or bool((m[:, 1:] & ~m[:, :-1]).any()):
        return mask
    return torch.ones_like(mask)


def run_attention_mask(host_mask: torch.Tensor, moved_mask: torch.Tensor) -> torch.Tensor | None:
    """The mask the model is run with (model_attention_mask), decided on the host mask: None
    where that is all ones, which Hugging Face models read as "no padding" without checking a
    device mask's values (their check, mask.all(), makes the host wait for the GPU)."""
    if model_attention_mask(host_mask) is host_mask:
        return moved_mask
    return None


def _row_name(batch: Mapping, row: int) -> str:
    ids = batch.get("ids")
    if isinstance(ids, Sequence) and not isinstance(ids, str) and row < len(ids):
        return repr(ids[row])
    return f"{row} of its batch"


def check_token_ids(batch: Mapping, input_ids: torch.Tensor, vocab: int) -> None:
    """Refuse input ids outside the embedding, naming the first row that has one."""
    bad = (input_ids < 0) | (input_ids >= vocab)
    if not bool(bad.any()):
        return
    row = int(bad.any(dim=1).nonzero()[0, 0])
    token = int(input_ids[row][bad[row]][0])
    raise MismatchError(
        f"row {_row_name(batch, row)} has token id {token} outside the model's vocabulary "
        f"of {vocab}"
    )


def _check_labels(batch: Mapping, labels: torch.Tensor, vocab: int) -> None:
    bad = (labels != IGNORE) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise MismatchError(
            f"row {_row_name(batch, row)} has label {int(labels[row][bad[row]][0])} outside "
            f"the model's output vocabulary of {vocab}"
        )


def check_finite(cap: Capture, batch: Mapping, deferred: Deferred | None = None) -> None:
    """Refuse a batch whose captured a or g hold NaN or inf, naming the first such row.

    One reduction per tensor and row, on the device; the flags are read on the host through
    deferred (later, without waiting on the batch in flight), or at once without one.
    """
    tensors = [
        (what, name, t)
        for what, d in (("activations", cap.activations), ("gradients", cap.gradients))
        for name, t in d.items()
    ]
    if not tensors:
        return
    # Every captured tensor is (B, T, d) (Capture.per_token): one flag per tensor and row.
    rows = [torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1) for _, _, t in tensors]
    labels = [(what, name, str(t.dtype).removeprefix("torch.")) for what, name, t in tensors]
    ids = batch.get("ids")
    report = _FiniteReport(labels, list(ids) if isinstance(ids, Sequence) else None)
    flags = torch.stack(rows)
    if deferred is None:
        report(flags.cpu())
    else:
        deferred.add(report, flags)


@dataclass
class _FiniteReport:
    """Raises for the first non-finite (tensor, row) of a batch's host-side flags."""

    labels: list[tuple[str, str, str]]
    ids: list | None

    def __call__(self, flags: torch.Tensor) -> None:
        if bool(flags.all()):
            return
        bad = (~flags).nonzero()[0].tolist()
        what, name, dtype = self.labels[bad[0]]
        where = _row_name({"ids": self.ids}, bad[1])
        raise MsifError(
            f"non-finite {what} (NaN or inf) of module {name!r} on row {where} in {dtype}: "
            "the model overflows or is undefined there; try another --dtype"
        )


def gradient_pass(
    model: nn.Module,
    batch: Mapping,
    cap: Capture,
    *,
    sample: bool = False,
    seed: int = 0,
    deferred: Deferred | None = None,
) -> torch.Tensor:
    """Fill cap with a and g for the batch; return the labels the loss used (true or sampled).

    Refuses token ids outside the embedding (MismatchError) and non-finite a or g (MsifError),
    each naming the row; with deferred, the second is checked when deferred runs its work.
    """
    return _gradient_pass(model, batch, cap, sample, seed, deferred)[0]


def _gradient_pass(model, batch, cap, sample, seed, deferred) -> tuple[torch.Tensor, dict]:
    cap.clear()
    # Every check of the batch itself reads the host batch: no device value is read back.
    check_token_ids(batch, batch["input_ids"], model.get_input_embeddings().num_embeddings)
    moved = to_device(batch, model_device(model))
    cap.batch_shape = tuple(batch["input_ids"].shape)
    out = model(
        input_ids=moved["input_ids"],
        attention_mask=run_attention_mask(batch["attention_mask"], moved["attention_mask"]),
        use_cache=False,
    )
    _check_labels(batch, batch["labels"], out.logits.shape[-1])
    labels = moved["labels"]
    if sample:
        labels = sample_labels(
            out.logits.detach(),
            batch["input_ids"],
            batch["labels"],
            batch["attention_mask"],
            seed,
        )
    losses = sequence_losses(out.logits, labels)
    if losses.requires_grad:
        losses.sum().backward()
    check_finite(cap, batch, deferred)
    return labels, moved


@dataclass
class HookedBatch:
    """One batch after its forward and backward pass of the summed sequence loss.

    batch is the batch as given (on the host); labels are the ones the loss used (true or
    sampled), on the model's device, and moved the batch's tensors there. The captured a and
    g are dropped when the next batch is drawn. defer(fn, *tensors) hands device results to
    the host without waiting on this batch (see msif.core.device.Deferred).
    """

    batch: Mapping[str, Any]
    labels: torch.Tensor
    capture: Capture
    moved: Mapping[str, Any] = field(default_factory=dict)
    deferred: Deferred | None = None
    _host_scored: torch.Tensor | None = field(default=None, repr=False)
    _scored_rows: torch.Tensor | None = field(default=None, repr=False)

    def tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """a (B, T, in') and g (B, T, out) of one module, in the work dtype."""
        a, g = activations_and_gradients(self.capture, name)
        work = work_dtype(a.dtype)
        return a.to(work), g.to(work)

    def modules(self) -> Iterator[tuple[ModuleSpec, torch.Tensor, torch.Tensor]]:
        """(spec, a, g) of every tracked module in order, cast one module at a time."""
        for name, spec in self.capture.specs.items():
            yield (spec, *self.tensors(name))

    def host_scored(self) -> torch.Tensor:
        """Bool (B, T) on the host: the positions whose output predicts a scored token (the
        same under sampled labels, which are drawn exactly there)."""
        if self._host_scored is None:
            self._host_scored = scored_positions(self.batch["labels"].cpu())
        return self._host_scored

    @property
    def num_scored(self) -> int:
        """Number of scored positions, counted on the host."""
        return int(self.host_scored().sum())

    def scored_rows(self) -> torch.Tensor:
        """Flat (B·T) indices of the scored positions, on the model's device."""
        if self._scored_rows is None:
            flat = self.host_scored().reshape(-1).nonzero().squeeze(1)
            self._scored_rows = to(flat, self.labels.device)
        return self._scored_rows

    def defer(self, fn, *tensors: torch.Tensor) -> None:
        """fn(*host copies of tensors), run later (at once when the loop defers nothing)."""
        if self.deferred is None:
            fn(*(t.detach().cpu() for t in tensors))
        else:
            self.deferred.add(fn, *tensors)


def hooked_batches(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    specs: dict[str, ModuleSpec],
    *,
    sample: bool = False,
    seed: int = 0,
    progress: bool = False,
    desc: str = "batches",
    lag: int = 1,
) -> Iterator[HookedBatch]:
    """Run every batch forward and backward through the frozen, hooked model.

    The one loop every stage shares: weights get no gradients, the model is restored and
    the hooks removed when the iteration ends (or is abandoned). With sample=True the loss
    uses labels sampled from the model (seeded per sequence), else the batch's labels.

    Device results are read on the host `lag` batches late (HookedBatch.defer), so that the
    host queues batch k + 1 while the GPU runs batch k; a non-finite batch is refused that
    much later, always before the iteration ends. lag=0 checks each batch before it is
    yielded (for passes that synchronise per batch anyway).
    """
    deferred = Deferred(lag)
    with frozen(model), capture(model, specs) as cap:
        try:
            for batch in progress_bar(batches, progress, desc):
                labels, moved = _gradient_pass(model, batch, cap, sample, seed, deferred)
                deferred.run()
                yield HookedBatch(batch, labels, cap, moved, deferred)
                cap.clear()  # before the next batch is drawn
                deferred.advance()
            deferred.flush()
        finally:
            deferred.discard()
            cap.clear()
