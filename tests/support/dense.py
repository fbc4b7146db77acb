"""Dense reference computations: per-example autograd gradients and explicit EK-FAC matrices."""

from __future__ import annotations

import torch

from msif.core.loss import IGNORE, sample_labels, sequence_losses
from msif.core.modules import resolve, weight_gradient
from msif.data.examples import Example, collate


def per_example_gradients(model, examples, specs, *, sample=False, seed=0):
    """{module: (N, out, in')} from one autograd backward per example.

    Each example is right-padded to the longest one, as in a batch of all of them: BLOOM takes
    its attention softmax in float32, whose rounding depends on the row length on some CPUs.
    """
    length = max(len(e.input_ids) for e in examples)
    modules = resolve(model, specs.values())
    grads = {k: [] for k in specs}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for e in examples:
            pad = length - len(e.input_ids)
            padded = Example(e.id, e.input_ids + [0] * pad, e.labels + [IGNORE] * pad)
            batch = collate([padded], 0)
            batch["attention_mask"][0, len(e.input_ids) :] = 0
            model.zero_grad(set_to_none=True)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            labels = batch["labels"]
            if sample:
                labels = sample_labels(
                    out.logits.detach(), batch["input_ids"], labels, batch["attention_mask"], seed
                )
            sequence_losses(out.logits, labels).sum().backward()
            for name, module in modules.items():
                grads[name].append(weight_gradient(module, specs[name]).detach().clone())
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in grads.items()}


def block_diag(q_g: torch.Tensor) -> torch.Tensor:
    """(blocks, bs, bs) → dense block-diagonal matrix."""
    return torch.block_diag(*q_g)


def kron_basis(factors, name):
    """Q = Q_G ⊗ Q_A, the eigenbasis of row-major vec(out x in') gradients."""
    return torch.kron(
        block_diag(factors.gradient_eigvecs[name]).contiguous(),
        factors.activation_eigvecs[name].contiguous(),
    )


def dense_ekfac(factors, name) -> torch.Tensor:
    """The EK-FAC curvature Q diag(vec Λ) Qᵀ as a dense matrix."""
    q = kron_basis(factors, name)
    return q @ torch.diag(factors.lambdas[name].reshape(-1)) @ q.T


def dense_solve(factors, name, v: torch.Tensor, lambda_: float) -> torch.Tensor:
    """(F + λI)⁻¹ v with the dense EK-FAC matrix; v is (N, out, in')."""
    f = dense_ekfac(factors, name)
    eye = torch.eye(f.shape[0], dtype=f.dtype)
    flat = v.reshape(v.shape[0], -1).T
    return torch.linalg.solve(f + lambda_ * eye, flat).T.reshape(v.shape)
