"""Exact per-token scores of a few documents: the part of the score from predicting each token.

A document's loss is a sum over the tokens it predicts, ℓ(z) = Σ_i ℓ_i with
ℓ_i = −log p(x_i | x_<i), so its score splits exactly into s_i = ⟨W_q, ∇_θ ℓ_i(z)⟩ over the
tracked modules, and Σ_i s_i is the score. All s_i of a sequence are one directional
derivative, d/dε ℓ_i(θ + ε W_q) for every i at once: one forward-mode pass.

The direction is applied where msif measures gradients, at each tracked module's output:
moving a module's weight by ε W_q moves its output at token t by ε W_q a_t, with a_t in msif's
(out × in') layout (bias column appended, an embedding's ids one-hot). Forward hooks add
W_q a_t to the output's tangent, so explaining shares scoring's layout (GPT-2's transposed
Conv1D weight, the bias, OPT's flattened (B·T, d) inputs), a weight used twice (tied
embeddings) is two modules as in scoring, and each row of a batch can carry its own query.

Forward-mode AD needs a forward derivative for every op: attention runs on SDPA's math kernel
(the fused kernels have none), and a model with an op that still lacks one (BLOOM's custom
GELU) falls back to the double-backward trick s = ∂/∂u Σ_m ⟨∂(uᵀℓ)/∂y_m, W_q a⟩, about twice
the cost. The forward pass runs in the model's dtype, W_q a_t in float32 (float64 for a
float64 model), cast to the model's dtype for the tangent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwad
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from msif.attribution.precondition import PreconditionedQueries
from msif.attribution.scoring import scoring_modules
from msif.core.device import model_device, to_device, to_host, work_dtype
from msif.core.hooks import Capture, embedding_scale, frozen, input_matrix, run_attention_mask
from msif.core.loss import token_losses
from msif.core.modules import ModuleSpec, resolve
from msif.data.examples import Example, collate
from msif.errors import MsifError

log = logging.getLogger("msif")
MODES = ("forward", "double-backward")


@dataclass
class _Direction:
    """W_q a_t of every row's own query: the tangent a tracked module's output gets."""

    queries: PreconditionedQueries
    rows: list[int]  # the query index of each row of the batch
    moved: dict = field(default_factory=dict, repr=False)  # queries on the device, shared

    def along(self, name: str, a: torch.Tensor) -> torch.Tensor:
        """(B, T, out) in a's dtype, a (B, T, in')."""
        out = a.new_empty(*a.shape[:-1], self.queries.specs[name].out_features)
        # Rows of one query are contiguous runs (the caller sorts by query): slices, so no
        # index tensor is built and copied to the device per module and batch.
        for q, start, stop in _runs(self.rows):
            out[start:stop] = self._apply(name, q, a[start:stop])
        return out

    def _apply(self, name: str, q: int, a: torch.Tensor) -> torch.Tensor:
        key = (name, a.device, a.dtype)
        if key not in self.moved:  # once per module, not per batch and query
            if name in self.queries.lowrank:
                self.moved[key] = tuple(x.to(a.device, a.dtype) for x in self.queries.lowrank[name])
            else:
                self.moved[key] = self.queries.dense[name].to(a.device, a.dtype)
        if name in self.queries.lowrank:
            u, s, v = (x[q] for x in self.moved[key])
            return ((a @ v) * s) @ u.T
        return a @ self.moved[key][q].T


def _runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """(value, start, stop) of each run of equal consecutive values."""
    runs: list[tuple[int, int, int]] = []
    for j, q in enumerate(rows):
        if runs and runs[-1][0] == q:
            runs[-1] = (q, runs[-1][1], j + 1)
        else:
            runs.append((q, j, j + 1))
    return runs


@contextmanager
def _perturbed(
    model: nn.Module, specs: dict[str, ModuleSpec], cap: Capture, direction: _Direction, mode: str
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Hooks giving each tracked module's output the tangent W_q a_t (forward mode), or
    recording (output, W_q a_t) for the double-backward trick."""
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, module in resolve(model, specs.values()).items():
        scale = embedding_scale(name, module) if specs[name].kind == "embedding" else 1.0

        def hook(mod, inputs, output, name=name, scale=scale):
            x = fwad.unpack_dual(inputs[0]).primal
            work = work_dtype(output.dtype)
            a = input_matrix(cap, name, mod, (x,), work, scale).to(work)
            delta = direction.along(name, a).to(output.dtype).reshape(output.shape)
            if mode == "forward":
                zero = torch.zeros(output.shape, dtype=output.dtype, device=output.device)
                return output + fwad.make_dual(zero, delta)
            if not output.requires_grad:  # frozen weights: nothing upstream needs a gradient
                output.requires_grad_(True)
            recorded.append((output, delta))
            return output

        handles.append(module.register_forward_hook(hook))
    try:
        yield recorded
    finally:
        for h in handles:
            h.remove()


def _batch_scores(model, batch, direction, specs, mode: str) -> torch.Tensor:
    """s (B, T − 1): entry i − 1 of a row is token i's s_i."""
    moved = to_device(batch, model_device(model))
    cap = Capture(specs, batch_shape=tuple(batch["input_ids"].shape))
    labels = moved["labels"]
    run = {
        "input_ids": moved["input_ids"],
        "attention_mask": run_attention_mask(batch["attention_mask"], moved["attention_mask"]),
        "use_cache": False,
    }
    if mode == "forward":
        with torch.no_grad(), fwad.dual_level(), _perturbed(model, specs, cap, direction, mode):
            losses = token_losses(model(**run).logits, labels)
            tangent = fwad.unpack_dual(losses).tangent
        return torch.zeros_like(losses) if tangent is None else tangent
    with torch.enable_grad(), _perturbed(model, specs, cap, direction, mode) as recorded:
        losses = token_losses(model(**run).logits, labels)
        u = torch.zeros_like(losses, requires_grad=True)
        outputs, deltas = zip(*recorded, strict=True)
        # g_m(u) = ∂(uᵀℓ)/∂y_m is linear in u, so ∂/∂u Σ_m ⟨g_m(u), W_q a⟩ is s at any u.
        grads = torch.autograd.grad(
            (u * losses).sum(), outputs, create_graph=True, allow_unused=True
        )
        pairs = [(g, d) for g, d in zip(grads, deltas, strict=True) if g is not None]
        h = sum((g.to(losses.dtype) * d.to(losses.dtype)).sum() for g, d in pairs)
        if not isinstance(h, torch.Tensor) or not h.requires_grad:
            return torch.zeros_like(losses)  # no loss reaches a tracked module
        (s,) = torch.autograd.grad(h, u, allow_unused=True)
    return torch.zeros_like(losses) if s is None else s.detach()


def _scores(model, batch, direction, specs, mode: str) -> tuple[torch.Tensor, str]:
    """s of one batch and the mode that gave it: forward mode falls back, for the rest of
    the documents, where an op has no forward derivative. Nothing is read back here (a
    non-finite forward tangent is found, and redone, once all batches are queued)."""
    if mode == "forward":
        try:
            return _batch_scores(model, batch, direction, specs, mode), mode
        except NotImplementedError as exc:
            log.info(
                "per-token scores by double backward (forward-mode AD: %s)",
                str(exc).splitlines()[0],
            )
            mode = "double-backward"
    return _batch_scores(model, batch, direction, specs, mode), mode


def _check_finite(s: torch.Tensor, batch, direction) -> None:
    if bool(torch.isfinite(s).all()):
        return
    row = int((~torch.isfinite(s)).any(dim=1).nonzero()[0, 0])
    raise MsifError(
        f"non-finite per-token score (NaN or inf) of document {batch['ids'][row]!r} on "
        f"query {direction.queries.query_ids[direction.rows[row]]!r}: the model overflows"
    )


def predicted_token_scores(
    model: nn.Module,
    pairs: Sequence[tuple[int, Example]],
    queries: PreconditionedQueries,
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    mode: str = "forward",
) -> list[list[float]]:
    """s_i = ⟨W_q, ∇_θ ℓ_i(z)⟩ of every token i of each (query index, document) pair.

    Entry i belongs to token i, ℓ_i being the loss of predicting it from the tokens before
    it; entry 0 is 0 (the first token is predicted from nothing), as is every unscored token.
    A pair's entries sum to its score. model is the queries' corpus model; mode "forward"
    (forward-mode AD, falling back to "double-backward" where it cannot be used) or
    "double-backward". Non-finite scores are refused (MsifError), naming the document.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    specs, _ = scoring_modules(model, queries)
    # Rows of one query side by side: a batch then applies one or two queries' W_q.
    order = sorted(range(len(pairs)), key=lambda k: pairs[k][0])
    out: list[list[float]] = [[] for _ in pairs]
    done, moved = [], {}
    with frozen(model), sdpa_kernel(SDPBackend.MATH):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([pairs[k][1] for k in chunk], pad_id)
            direction = _Direction(queries, [pairs[k][0] for k in chunk], moved)
            s, used = _scores(model, batch, direction, specs, mode)
            mode = used
            done.append((chunk, batch, direction, s, used))
        # One host read for every batch: forward tangents that came out non-finite (float16
        # layer norm on the CPU) are redone by double backward.
        finite = (
            torch.stack([torch.isfinite(s).all() for *_, s, _ in done]).tolist() if done else []
        )
        for j, ok in enumerate(finite):
            chunk, batch, direction, s, used = done[j]
            if not ok and used == "forward":
                log.info(
                    "per-token scores by double backward (forward-mode AD: %s)",
                    "a non-finite tangent",
                )
                s = _batch_scores(model, batch, direction, specs, "double-backward")
                done[j] = (chunk, batch, direction, s, "double-backward")
            if not ok:
                _check_finite(done[j][3], batch, direction)
    copies = [(chunk, to_host(s.double())) for chunk, _, _, s, _ in done]  # all at once
    for chunk, copy in copies:
        values = copy.get()
        for j, k in enumerate(chunk):
            n = len(pairs[k][1].input_ids)
            out[k] = [0.0, *values[j, : n - 1].tolist()] if n else []
    return out
