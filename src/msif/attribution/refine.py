"""Iterative refinement toward the exact damped influence: preconditioned conjugate gradients.

EK-FAC replaces each stage's curvature F_s by a per-module Kronecker-factored approximation.
Refinement solves the *exact* damped system of a stage,

    (G_s + D_s) x = b,    G_s = 1/N Σ_n J_nᵀ H_n J_n,    D_s = λ_m I on module m,

by conjugate gradients preconditioned with the EK-FAC damped inverse (F̃_s + D_s)⁻¹, started
from the EK-FAC answer x₀ = (F̃_s + D_s)⁻¹ b. G_s is the Gauss–Newton Hessian of the sequence
loss (a sum over scored tokens) at θ_s on N sequences of stage s's data, over every tracked
module jointly (cross-module blocks included), normalised as EK-FAC is (a mean over
sequences); J_n is the Jacobian of sequence n's logits by the tracked modules' weights (with
the bias as a last input column, msif's (out × in') layout) and H_n = diag(p_t) − p_t p_tᵀ per
scored position. For softmax cross-entropy G_s is the Fisher E_y[∇ℓ ∇ℓᵀ] with the labels y
drawn from the model, taken in closed form: the expectation that EK-FAC's sampled-label Λ
estimates, without its sampling noise. D_s is the damping the EK-FAC inverse uses
(Factors.damping_for; α for the fine-tune stage of multi-stage).

Products G_s v are matrix-free, one forward-mode pass (J v, torch.autograd.forward_ad,
injected at each tracked module's output) and one backward pass (Jᵀ H J v, msif's hooks)
per minibatch. Many right-hand sides (queries) are solved at once, each with its own CG
scalars: a minibatch holds copies of the same sequences, one per query, so that every copy
carries its own direction. Attention runs in PyTorch's math kernel meanwhile: the fused
kernels have no forward-mode derivative.

After K steps the error in the G_s + D_s norm is no larger than EK-FAC's (K = 0 is EK-FAC
itself); in exact arithmetic K = dimension gives the exact solution.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwad
from torch import nn

from msif.attribution.deflation import Deflation, deflated_preconditioner, fit_deflation
from msif.core.device import model_device, to_device, work_dtype
from msif.core.fingerprint import check_fingerprint, model_fingerprint
from msif.core.hooks import capture, frozen, model_attention_mask
from msif.core.loss import scored_positions
from msif.core.modules import ModuleSpec
from msif.data.examples import Example, collate
from msif.ekfac.factors import Factors
from msif.errors import MsifError

log = logging.getLogger("msif")
Vectors = dict[str, torch.Tensor]  # per module (Q, out, in'): one vector per query


@dataclass(frozen=True)
class StageSample:
    """The sequences of one stage's data the exact products run on, at that stage's model.

    record: what identifies the sample in artifacts (data fingerprint, rows, seed).
    """

    model: nn.Module
    examples: Sequence[Example]
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Refinement:
    """K conjugate-gradient steps per stage, on the stages' samples ("ft", "pt").

    rows: sequences per forward pass; a pass holds copies of rows // Q sequences (at least
    one), one copy per query. lanczos: Lanczos steps per stage that correct the EK-FAC
    preconditioner first (msif.attribution.deflation; 0: none), from a start seeded by seed.
    """

    steps: int
    samples: dict[str, StageSample] = field(default_factory=dict)
    rows: int = 64
    lanczos: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise MsifError(f"refinement steps must be an integer >= 0, not {self.steps!r}")
        lanczos = self.lanczos
        if isinstance(lanczos, bool) or not isinstance(lanczos, int) or lanczos < 0:
            raise MsifError(f"refinement Lanczos steps must be an integer >= 0, not {lanczos!r}")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise MsifError(f"refinement rows per pass must be an integer >= 1, not {self.rows!r}")

    @property
    def active(self) -> bool:
        """Whether it changes anything: CG steps, or a corrected preconditioner at K = 0."""
        return self.steps > 0 or self.lanczos > 0

    def sample(self, stage: str) -> StageSample:
        """The sample of a stage, refused when absent or empty."""
        s = self.samples.get(stage)
        if s is None or not s.examples:
            which = {"ft": "fine-tune data at θ_ft", "pt": "pre-training corpus at θ_pt"}[stage]
            raise MsifError(
                f"refining the {stage} stage needs a sample of its data ({which}): none given"
            )
        return s


@dataclass
class Solve:
    """A conjugate-gradient solve: the solution per query and ‖r_k‖ / ‖b‖ per step.

    residuals is (K + 1, Q): step 0 is the starting point's. iterates holds x_k for the
    steps asked for (snapshots).
    """

    solution: Vectors
    residuals: torch.Tensor
    iterates: dict[int, Vectors] = field(default_factory=dict)
    deflation: Deflation | None = None


def dot(x: Vectors, y: Vectors) -> torch.Tensor:
    """Per-query inner products (Q,), summed over modules."""
    return sum((x[k] * y[k]).flatten(1).sum(1) for k in x)


def _combine(x: Vectors, a: torch.Tensor, y: Vectors) -> Vectors:
    """x + a ⊙ y, a (Q,) one scalar per query."""
    return {k: x[k] + a.view(-1, 1, 1) * y[k] for k in x}


def conjugate_gradient(
    apply_a: Callable[[Vectors], Vectors],
    b: Vectors,
    precondition: Callable[[Vectors], Vectors],
    steps: int,
    *,
    snapshots: Sequence[int] = (),
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> Solve:
    """K steps of preconditioned CG on A x = b for every query at once, from x₀ = M⁻¹ b.

    A query whose residual or curvature along its search direction vanishes (it is solved)
    keeps its iterate; the others go on. on_step(k, ‖r_k‖ / ‖b‖ per query) after each step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise MsifError(f"conjugate-gradient steps must be an integer >= 0, not {steps!r}")
    x = precondition(b)
    b_norm = dot(b, b).sqrt()
    scale = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    iterates = {0: x} if 0 in snapshots else {}
    r = _combine(b, -torch.ones_like(b_norm), apply_a(x))
    residuals = [dot(r, r).sqrt() / scale]
    if steps == 0:  # EK-FAC alone, with its residual (one product)
        return Solve(x, torch.stack(residuals).cpu(), iterates)
    z = precondition(r)
    p, rz = z, dot(r, z)
    for k in range(1, steps + 1):
        ap = apply_a(p)
        curvature = dot(p, ap)
        live = (rz > 0) & (curvature > 0)
        alpha = torch.where(live, rz / torch.where(live, curvature, 1.0), 0.0)
        x = _combine(x, alpha, p)
        r = _combine(r, -alpha, ap)
        residuals.append(dot(r, r).sqrt() / scale)
        if k in snapshots:
            iterates[k] = x
        if on_step is not None:
            on_step(k, residuals[-1])
        if k == steps:
            break
        z = precondition(r)
        rz_next = dot(r, z)
        beta = torch.where(live & (rz > 0), rz_next / torch.where(rz > 0, rz, 1.0), 0.0)
        p, rz = _combine(z, beta, p), torch.where(live, rz_next, 0.0)
    return Solve(x, torch.stack(residuals).cpu(), iterates)


class GaussNewton:
    """(G + D) v over the tracked modules on a sample of sequences, matrix-free.

    G = 1/N Σ_n J_nᵀ H_n J_n (module | damping λ per module in D). Directions v are per module
    (Q, out, in'); products come back in float64 (float32 on MPS), in the directions' layout.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: dict[str, ModuleSpec],
        examples: Sequence[Example],
        damping: dict[str, float],
        *,
        rows: int = 64,
        pad_id: int = 0,
    ) -> None:
        if not examples:
            raise MsifError("the Gauss–Newton product needs at least one sequence")
        missing = [k for k in specs if k not in damping]
        if missing:
            raise MsifError(f"no damping given for module {missing[0]!r}")
        self.model, self.specs, self.damping = model, specs, damping
        self.rows, self.pad_id = rows, pad_id
        # Sorted by length, minibatches pad little; the sum does not depend on the order.
        self.examples = sorted(examples, key=lambda e: len(e.input_ids))
        self.num_sequences = len(examples)

    def __call__(self, v: Vectors) -> Vectors:
        """(G + D) v for every query's direction."""
        out = self.gauss_newton(v)
        return {k: out[k] + self.damping[k] * v[k] for k in v}

    def gauss_newton(self, v: Vectors) -> Vectors:
        """G v, without the damping."""
        queries = next(iter(v.values())).shape[0]
        per_pass = max(1, self.rows // queries)
        chunk = min(queries, self.rows)
        total = {k: torch.zeros_like(t) for k, t in v.items()}
        with _forward_mode_ready(self.model), capture(self.model, self.specs) as cap:
            for start in range(0, len(self.examples), per_pass):
                batch = collate(self.examples[start : start + per_pass], self.pad_id)
                for q0 in range(0, queries, chunk):
                    part = {k: t[q0 : q0 + chunk] for k, t in v.items()}
                    for k, t in _product_pass(self.model, cap, batch, part).items():
                        total[k][q0 : q0 + chunk] += t.to(total[k].device, total[k].dtype)
        return {k: t / self.num_sequences for k, t in total.items()}


@contextlib.contextmanager
def _forward_mode_ready(model: nn.Module) -> Iterator[None]:
    """Frozen weights, eval mode, attention in the math kernel (it has forward-mode rules)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with frozen(model), sdpa_kernel([SDPBackend.MATH]):
        yield


def _product_pass(model: nn.Module, cap, batch: dict, v: Vectors) -> Vectors:
    """Σ over the batch of Jᵀ H J v, one copy of the batch per direction (Q of them)."""
    copies = next(iter(v.values())).shape[0]
    device = model_device(model)
    batch = to_device(batch, device)
    ids = batch["input_ids"].repeat(copies, 1)
    mask = model_attention_mask(batch["attention_mask"]).repeat(copies, 1)
    scored = scored_positions(batch["labels"]).repeat(copies, 1)
    rows, tokens = ids.shape
    cap.clear()
    cap.batch_shape = (rows, tokens)
    dtype = next(model.parameters()).dtype
    directions = {k: t.to(device, dtype) for k, t in v.items()}
    handles = [
        module.register_forward_hook(_tangent_hook(cap, name, directions[name], copies))
        for name, module in _tracked(model, cap.specs).items()
    ]
    try:
        with fwad.dual_level():
            logits = _dual_forward(model, ids, mask)
            primal, tangent = fwad.unpack_dual(logits)
            if tangent is None:  # no tracked module reaches the logits
                return {k: torch.zeros_like(t) for k, t in v.items()}
            cotangent = _loss_hessian_times(primal.detach(), tangent, scored)
        primal.backward(cotangent)
        return {k: _per_copy_gradient(cap, k, copies) for k in v}
    finally:
        for h in handles:
            h.remove()
        cap.clear()


def _dual_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    try:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    except NotImplementedError as e:  # an operation without a forward-mode derivative
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MsifError(
            f"cannot refine through {type(model).__name__}: forward-mode autodiff is not "
            f"implemented for one of its operations ({first})"
        ) from None


def _tracked(model: nn.Module, specs: dict[str, ModuleSpec]) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    return {k: named[k] for k in specs}


def _tangent_hook(cap, name: str, direction: torch.Tensor, copies: int):
    """A forward hook adding the module's share of J v: a′ vᵀ, copy by copy (primal 0)."""

    def hook(module, inputs, output):
        a = cap.activations[name]  # (rows, T, in'), already without a tangent
        shaped = a.reshape(copies, -1, a.shape[-1])
        delta = torch.bmm(shaped, direction.mT).reshape(output.shape).to(output.dtype)
        primal, tangent = fwad.unpack_dual(output)
        return fwad.make_dual(primal, delta if tangent is None else tangent + delta)

    return hook


def _loss_hessian_times(logits: torch.Tensor, t: torch.Tensor, scored: torch.Tensor):
    """H t per position: (diag p − p pᵀ) t where scored, 0 elsewhere (softmax cross-entropy)."""
    p = torch.softmax(logits.double(), dim=-1)
    t64 = t.double()
    u = p * (t64 - (p * t64).sum(-1, keepdim=True))
    return (u * scored.unsqueeze(-1)).to(logits.dtype)


def _per_copy_gradient(cap, name: str, copies: int) -> torch.Tensor:
    """Σ_t g_t a′_tᵀ summed over each copy's sequences: (copies, out, in')."""
    a = cap.activations[name]
    g = cap.gradients.get(name)
    spec = cap.specs[name]
    if g is None:
        return a.new_zeros(copies, spec.out_features, spec.in_dim)
    work = work_dtype(a.dtype)
    a = a.reshape(copies, -1, a.shape[-1]).to(work)
    g = g.reshape(copies, -1, g.shape[-1]).to(work)
    return torch.bmm(g.mT, a)


def solve_stage(
    factors: Factors,
    sample: StageSample,
    specs: dict[str, ModuleSpec],
    damping: dict[str, float],
    b: Vectors,
    steps: int,
    *,
    rows: int = 64,
    snapshots: Sequence[int] = (),
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    lanczos: int = 0,
    seed: int = 0,
    deflation: Deflation | None = None,
) -> Solve:
    """(G_s + D_s)⁻¹ b by K steps of CG preconditioned with the stage's EK-FAC inverse.

    b is per module (Q, out, in') in weight coordinates; the sample's model must be the one
    the factors were fitted at (θ_s). Every step is logged with its mean relative residual.
    lanczos > 0 first corrects the preconditioner by that many Lanczos steps (seeded) on the
    preconditioned exact curvature (msif.attribution.deflation); it acts even at K = 0. A
    deflation fitted before on the same stage, sample and damping may be passed instead.
    """
    _check_stage_model(factors, sample, specs)
    dtype = solve_dtype(sample.model)
    b = {k: t.to(dtype) for k, t in b.items()}
    operator = GaussNewton(sample.model, specs, sample.examples, damping, rows=rows)
    if lanczos and deflation is None:
        deflation = fit_deflation(factors, operator, damping, b, lanczos, seed=seed)
    precondition = deflated_preconditioner(factors, damping, deflation)

    def logged(k: int, residual: torch.Tensor) -> None:
        log.info(
            "refine %s: step %d/%d, relative residual mean %.3g, max %.3g",
            factors.stage, k, steps, float(residual.mean()), float(residual.max()),
        )  # fmt: skip
        if on_step is not None:
            on_step(k, residual)

    solve = conjugate_gradient(
        operator, b, precondition, steps, snapshots=snapshots, on_step=logged
    )
    solve.deflation = deflation
    return solve


def sample_rows(num_rows: int, samples: int, seed: int) -> list[int]:
    """Row indices of a seeded uniform sample without replacement, in table order (every row
    when samples >= num_rows)."""
    if num_rows <= samples:
        return list(range(num_rows))
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:samples].tolist())


def _check_stage_model(factors: Factors, sample: StageSample, specs) -> None:
    # Exact products at another model than the factors' would refine toward another curvature.
    check_fingerprint(
        factors.fingerprint,
        model_fingerprint(sample.model, specs),
        f"the {factors.stage} stage's refinement model",
    )


def solve_dtype(model: nn.Module) -> torch.dtype:
    """The precision CG vectors and scalars live in: float64, but float32 on MPS (no float64)."""
    return torch.float32 if model_device(model).type == "mps" else torch.float64


def refine_queries(
    grads: Vectors,
    specs: dict[str, ModuleSpec],
    stages: Sequence[str],
    factors: dict[str, Factors | None],
    damping: dict[str, dict[str, float]],
    refine: Refinement,
) -> tuple[Vectors, dict]:
    """Query gradients (weight coordinates) through each stage's refined solve, in order.

    Returns the preconditioned queries in the gradients' dtype and what the artifact records
    of the refinement: K, rows per pass, Lanczos steps and seed, and per stage its sample,
    the mean (over queries) relative residual ‖r_k‖ / ‖b‖ after every step and how many
    eigenvalues the Lanczos correction moved (with their range).
    """
    for stage in stages:  # every stage's sample and model, before the first long solve
        _check_stage_model(factors[stage], refine.sample(stage), specs)
    b = grads
    record: dict = {"steps": refine.steps, "rows": refine.rows, "stages": {}}
    if refine.lanczos:
        record.update(lanczos=refine.lanczos, lanczos_seed=refine.seed)
    for stage in stages:
        sample = refine.sample(stage)
        solve = solve_stage(
            factors[stage], sample, specs, damping[stage], b, refine.steps, rows=refine.rows,
            lanczos=refine.lanczos, seed=refine.seed,
        )  # fmt: skip
        b = solve.solution
        record["stages"][stage] = {
            **sample.record,
            "sequences": len(sample.examples),
            "residuals": [float(x) for x in solve.residuals.mean(1)],
            "max_final_residual": float(solve.residuals[-1].max()),
            **_deflation_record(solve.deflation),
        }
    return {k: b[k].to(grads[k].dtype) for k in grads}, record


def _deflation_record(deflation: Deflation | None) -> dict:
    if deflation is None:
        return {}
    values = [float(v) for v in deflation.values]
    span = [min(values), max(values)] if values else []
    return {"deflated": deflation.rank, "lanczos_steps": deflation.steps, "ritz_range": span}


def refinement_id(info: dict) -> str | None:
    """What identifies preconditioned queries' refinement (K, each stage's data and sample,
    its seed), from their info; None for EK-FAC alone. Scores or candidates of queries with
    other ids must not be merged or reranked together."""
    import hashlib
    import json

    record = info.get("refine")
    if not record:
        return None
    keys = ("data_fingerprint", "rows", "seed", "max_length", "data_options")
    identity = {
        "steps": record.get("steps"),
        **{k: record[k] for k in ("lanczos", "lanczos_seed") if k in record},
        "stages": {s: {k: r.get(k) for k in keys} for s, r in record["stages"].items()},
    }
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return f"K{record.get('steps')}-" + hashlib.sha256(blob).hexdigest()[:16]
