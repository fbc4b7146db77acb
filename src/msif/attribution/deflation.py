"""A low-rank correction of the EK-FAC preconditioner, from Lanczos on the exact curvature.

With M = F̃ + D (EK-FAC, damped) and A = G + D (the exact damped Gauss–Newton system of a
stage), conjugate gradients preconditioned by M⁻¹ takes about one step per outlying eigenvalue
of M⁻¹A. On the fact world at pre-train factor 1 hundreds of them lie between 10 and 280:
curvature EK-FAC misses (cross-module blocks, correlations its eigenbasis spreads out), which
is why refinement needed 100–150 steps there.

Those outliers are the same for every query, so they are found once per stage: Lanczos, with
full reorthogonalisation, on the symmetric C = M^{-1/2} A M^{-1/2} from a seeded random start,
each step one single-direction product (1/Q of a CG step over Q queries). Its converged Ritz
pairs (θ_i, s_i) give y_i = M^{-1/2} s_i, with A y_i = θ_i M y_i and y_iᵀ M y_j = δ_ij, and

    P = M⁻¹ + Σ_i (1/θ_i − 1) y_i y_iᵀ

maps each of them to eigenvalue 1 while leaving the directions M-orthogonal to them alone.
P is symmetric positive definite (θ_i > 0), so CG with P converges to the same exact solution;
K = 0 with P is already a better approximate inverse than EK-FAC alone.

The r Ritz vectors cost r dense vectors over the tracked modules, as r extra queries would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from msif.ekfac.factors import Factors
from msif.errors import MsifError

log = logging.getLogger("msif")
Vectors = dict[str, torch.Tensor]  # per module (rows, out, in')

RITZ_TOLERANCE = 1e-2  # a Ritz pair is kept when ‖C s − θ s‖ < tolerance × θ


@dataclass(frozen=True)
class Deflation:
    """Converged Ritz pairs of M⁻¹A: values θ (r,) and M-orthonormal vectors y per module
    (r, out, in'), from `steps` Lanczos steps."""

    values: torch.Tensor
    vectors: Vectors
    steps: int

    @property
    def rank(self) -> int:
        """How many eigenvalues the correction moves to 1."""
        return int(self.values.numel())


def damped_power(
    factors: Factors, name: str, v: torch.Tensor, lambda_: float, power: float
) -> torch.Tensor:
    """(F̃ + λI)^power v for one module, in its Kronecker eigenbasis (power −1 is EK-FAC)."""
    r = factors.to_eigenbasis(name, v)
    scale = (factors.lambdas[name].to(r.device, r.dtype) + lambda_) ** power
    return factors.from_eigenbasis(name, r * scale)


def _dots(basis: Vectors, w: Vectors) -> torch.Tensor:
    """basis_j · w for every row j of the basis (rows,), summed over modules; w is one row."""
    return sum(torch.einsum("jab,ab->j", basis[k], w[k][0]) for k in w)


def lanczos(
    apply_c: Callable[[Vectors], Vectors], start: Vectors, steps: int
) -> tuple[torch.Tensor, float, Vectors]:
    """`steps` Lanczos steps on a symmetric operator from `start` (one row per module).

    Returns the tridiagonal T (n × n; n < steps when an invariant subspace is found), the
    last β (the Ritz residuals' scale), and the orthonormal basis, (n, out, in') per module.
    """
    norm = _dots(start, start).sqrt()
    if not float(norm) > 0:
        raise MsifError("the Lanczos start vector is zero")
    basis = {
        k: torch.empty(steps, *t.shape[1:], dtype=t.dtype, device=t.device)
        for k, t in start.items()
    }
    row = {k: t / norm for k, t in start.items()}
    alphas, betas = [], []
    for j in range(steps):
        for k in basis:
            basis[k][j] = row[k][0]
        w = apply_c(row)
        earlier = {k: b[: j + 1] for k, b in basis.items()}
        alpha = 0.0
        for _ in range(2):  # twice is enough (Kahan): the basis stays orthonormal to round-off
            c = _dots(earlier, w)
            alpha += float(c[j])
            w = {k: w[k] - torch.einsum("j,jab->ab", c, earlier[k]) for k in w}
        alphas.append(alpha)
        betas.append(float(_dots(w, w).sqrt()))
        if betas[-1] <= 1e-12 * max(abs(a) for a in alphas):  # an invariant subspace
            break
        row = {k: t / betas[-1] for k, t in w.items()}
    n = len(alphas)
    off = torch.tensor(betas[: n - 1], dtype=torch.float64)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1)
    return t + torch.diag(off, -1), betas[-1], {k: b[:n] for k, b in basis.items()}


def fit_deflation(
    factors: Factors,
    apply_a: Callable[[Vectors], Vectors],
    damping: dict[str, float],
    like: Vectors,
    steps: int,
    *,
    seed: int = 0,
    tolerance: float = RITZ_TOLERANCE,
) -> Deflation:
    """Lanczos on M^{-1/2} A M^{-1/2} for `steps` steps; the converged Ritz pairs.

    like gives the modules, shapes and dtype (one row or more per module); the start vector
    is standard normal, seeded.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MsifError(f"Lanczos steps must be an integer >= 1, not {steps!r}")
    generator = torch.Generator().manual_seed(seed)
    start = {
        # Drawn on the CPU, so a seed gives the same start on every device.
        k: torch.randn(1, *t.shape[1:], generator=generator, dtype=torch.float64).to(
            t.device, t.dtype
        )
        for k, t in like.items()
    }

    def half(v: Vectors) -> Vectors:
        return {k: damped_power(factors, k, t, damping[k], -0.5) for k, t in v.items()}

    t_matrix, beta, basis = lanczos(lambda v: half(apply_a(half(v))), start, steps)
    theta, s = torch.linalg.eigh(t_matrix)
    residual = beta * s[-1].abs()  # ‖C Y_i − θ_i Y_i‖ of each Ritz pair
    keep = (theta > 0) & (residual < tolerance * theta)
    first = next(iter(basis.values()))
    coefficients = s[:, keep].to(first.device, first.dtype)
    vectors = {
        k: damped_power(factors, k, torch.einsum("ji,jab->iab", coefficients, b), damping[k], -0.5)
        for k, b in basis.items()
    }
    values = theta[keep]
    log.info(
        "deflation %s: %d Lanczos steps, %d converged Ritz values in [%.3g, %.3g]",
        factors.stage, t_matrix.shape[0], values.numel(),
        float(values.min()) if values.numel() else float("nan"),
        float(values.max()) if values.numel() else float("nan"),
    )  # fmt: skip
    return Deflation(values, vectors, t_matrix.shape[0])


def deflated_preconditioner(
    factors: Factors, damping: dict[str, float], deflation: Deflation | None
) -> Callable[[Vectors], Vectors]:
    """v ↦ M⁻¹ v + Σ_i (1/θ_i − 1)(y_i · v) y_i for every query's v (EK-FAC when None)."""

    def precondition(v: Vectors) -> Vectors:
        out = {k: factors.inverse_apply(k, t, damping[k]) for k, t in v.items()}
        if deflation is None or deflation.rank == 0:
            return out
        ys = deflation.vectors
        like = next(iter(v.values()))
        weight = (1.0 / deflation.values - 1.0).to(like.device, like.dtype)
        y = {k: ys[k].to(t.device, t.dtype) for k, t in v.items()}
        c = sum(torch.einsum("qab,iab->qi", v[k], y[k]) for k in v) * weight
        return {k: out[k] + torch.einsum("qi,iab->qab", c, y[k]) for k in v}

    return precondition
