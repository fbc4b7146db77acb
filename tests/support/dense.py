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


def _layout(spec, jac_weight, jac_bias):
    """A parameter Jacobian (..., *weight shape) in msif's (out, in') layout, bias last."""
    if spec.kind == "conv1d":  # GPT-2's Conv1D stores its weight as in × out
        jac_weight = jac_weight.transpose(-1, -2)
    if spec.kind == "embedding":  # (vocab, dim) weights: the gradient matrix is dim × vocab
        jac_weight = jac_weight.transpose(-1, -2)
    parts = [jac_weight] + ([jac_bias.unsqueeze(-1)] if spec.has_bias else [])
    return torch.cat(parts, dim=-1)


def logit_jacobian(model, example, specs):
    """(T, V, P) Jacobian of one sequence's logits by the tracked modules' weights and biases
    (columns: every module's row-major (out, in') in specs order), by reverse mode over the
    model's own parameters, and the logits (T, V)."""
    from torch.func import functional_call, jacrev

    batch = collate([example], 0)
    names = [f"{n}.{p}" for n, s in specs.items() for p in ("weight", "bias")[: 1 + s.has_bias]]
    params = dict(model.named_parameters())
    chosen = {k: params[k].detach() for k in names}

    def logits(p):
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return functional_call(model, p, (), kwargs).logits[0]

    jac = jacrev(logits)(chosen)
    cols = []
    for n, s in specs.items():
        full = _layout(s, jac[f"{n}.weight"], jac.get(f"{n}.bias"))
        cols.append(full.reshape(*full.shape[:2], -1))
    return torch.cat(cols, dim=-1), logits(chosen).detach()


def dense_gauss_newton(model, examples, specs) -> torch.Tensor:
    """G = 1/N Σ_n Σ_t J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt over the scored positions, (P, P)."""
    from msif.core.loss import scored_positions

    total = None
    for e in examples:
        jac, logits = logit_jacobian(model, e, specs)
        scored = scored_positions(collate([e], 0)["labels"])[0]
        for t in scored.nonzero().squeeze(1).tolist():
            p = torch.softmax(logits[t], dim=-1)
            h = torch.diag(p) - torch.outer(p, p)
            term = jac[t].T @ h @ jac[t]
            total = term if total is None else total + term
    return total / len(examples)


def flatten(vectors, specs) -> torch.Tensor:
    """Per-module (Q, out, in') → (Q, P) in specs order."""
    return torch.cat([vectors[n].reshape(vectors[n].shape[0], -1) for n in specs], dim=1)


def unflatten(flat, specs) -> dict:
    """(Q, P) → per-module (Q, out, in')."""
    out, i = {}, 0
    for n, s in specs.items():
        size = s.out_features * s.in_dim
        out[n] = flat[:, i : i + size].reshape(-1, s.out_features, s.in_dim)
        i += size
    return out


def damping_matrix(specs, lambdas) -> torch.Tensor:
    """diag(λ_m on module m's coordinates), (P, P), float64."""
    diag = [torch.full((s.out_features * s.in_dim,), lambdas[n], dtype=torch.float64)
            for n, s in specs.items()]  # fmt: skip
    return torch.diag(torch.cat(diag))
