"""The Lanczos correction of the EK-FAC preconditioner against dense linear algebra.

M is the dense block-diagonal EK-FAC matrix plus damping, A the dense Gauss–Newton matrix of
the stage's sample plus damping (tests/support/dense.py, reverse-mode Jacobians).
"""

from __future__ import annotations

import pytest
import torch

import msif
from msif.attribution.deflation import deflated_preconditioner, fit_deflation, lanczos
from msif.attribution.refine import GaussNewton, Refinement, refinement_id, solve_stage
from msif.config import PreconditionOptions
from msif.errors import MsifError, OptionError
from tests.attribution.test_refine import precondition, random_vectors, world  # noqa: F401
from tests.support.dense import damping_matrix, dense_ekfac, flatten


def dense_system(w, stage="pt", factor=1.0):
    """(M, A, λ) of a stage as dense (P, P) matrices, λ per module."""
    factors = w.f_pt if stage == "pt" else w.f_ft
    lam = {n: factors.damping_for(n, msif.Damping(factor)) for n in w.specs}
    m = torch.block_diag(*[dense_ekfac(factors, n) for n in w.specs])
    d = damping_matrix(w.specs, lam)
    return m + d, w.dense[stage] + d, lam


def preconditioned_eigenvalues(m, a):
    """Eigenvalues of M⁻¹A, ascending, from the symmetric L⁻¹ A L⁻ᵀ (M = L Lᵀ)."""
    lower = torch.linalg.cholesky(m)
    half = torch.linalg.solve_triangular(lower, a, upper=False)
    c = torch.linalg.solve_triangular(lower, half.T, upper=False)
    return torch.linalg.eigvalsh((c + c.T) / 2)


def operator(w, lam, stage="pt"):
    sample = w.samples[stage]
    return GaussNewton(sample.model, w.specs, sample.examples, lam)


def test_lanczos_on_a_dense_matrix_finds_its_extreme_eigenvalues():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.linspace(1, 2, 37), torch.tensor([50.0, 80.0, 120.0])]).double()
    c = q @ torch.diag(values) @ q.T
    start = {"m": torch.randn(1, 5, 8, generator=gen, dtype=torch.float64)}
    t, beta, basis = lanczos(lambda v: {"m": (v["m"].reshape(1, 40) @ c).reshape(1, 5, 8)},
                             start, 12)  # fmt: skip
    ritz = torch.linalg.eigvalsh(t)
    torch.testing.assert_close(ritz[-3:], values[-3:], rtol=1e-8, atol=0)
    v = basis["m"].reshape(12, 40)
    torch.testing.assert_close(v @ v.T, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(v @ c @ v.T, t, atol=1e-10, rtol=0)  # T is C in the basis
    assert beta > 0


def test_ritz_pairs_are_eigenpairs_of_the_dense_preconditioned_system(world):  # noqa: F811
    m, a, lam = dense_system(world)
    exact = preconditioned_eigenvalues(m, a)
    # Outliers: EK-FAC misses curvature of the exact system, most of all across modules.
    assert float(exact.max()) > 2.0
    b = random_vectors(world.specs, 1, seed=3)
    deflation = fit_deflation(world.f_pt, operator(world, lam), lam, b, 30, seed=4)
    assert 0 < deflation.rank <= 30 and deflation.steps == 30
    # Every converged Ritz value is one of M⁻¹A's; the largest is found.
    gaps = (deflation.values.view(-1, 1) - exact.view(1, -1)).abs().min(1).values
    assert float((gaps / deflation.values).max()) < 1e-2
    torch.testing.assert_close(deflation.values.max(), exact.max(), rtol=1e-8, atol=0)
    y = flatten(deflation.vectors, world.specs)  # (r, P)
    # A y = θ M y and Yᵀ M Y = I, to the Ritz tolerance.
    resid = y @ a - deflation.values.view(-1, 1) * (y @ m)
    assert float((resid.norm(dim=1) / (deflation.values * (y @ m).norm(dim=1))).max()) < 1e-2
    gram = y @ m @ y.T
    torch.testing.assert_close(gram, torch.eye(deflation.rank, dtype=gram.dtype), atol=1e-6, rtol=0)


def test_corrected_preconditioner_equals_its_dense_formula(world):  # noqa: F811
    m, a, lam = dense_system(world)
    b = random_vectors(world.specs, 1, seed=3)
    deflation = fit_deflation(world.f_pt, operator(world, lam), lam, b, 20, seed=4)
    y = flatten(deflation.vectors, world.specs)
    dense_p = torch.linalg.inv(m) + y.T @ torch.diag(1 / deflation.values - 1) @ y
    v = random_vectors(world.specs, 3, seed=9)
    got = flatten(deflated_preconditioner(world.f_pt, lam, deflation)(v), world.specs)
    want = flatten(v, world.specs) @ dense_p
    assert float((got - want).norm() / want.norm()) < 1e-10
    # It sends every found eigenvalue of M⁻¹A to 1: P A y = y.
    pay = y @ a @ dense_p
    assert float(((pay - y).norm(dim=1) / y.norm(dim=1)).max()) < 0.05


def test_lanczos_over_the_whole_space_finds_every_distinct_eigenvalue(world):  # noqa: F811
    m, a, lam = dense_system(world)
    exact = preconditioned_eigenvalues(m, a).detach()
    b = random_vectors(world.specs, 2, seed=5)
    solve = solve_stage(
        world.f_pt, world.samples["pt"], world.specs, lam, b, 0, lanczos=world.dim, seed=1
    )
    d = solve.deflation
    # M⁻¹A has repeated eigenvalues (G is of low rank on 6 sequences): Lanczos from one start
    # meets one eigenvector of each and stops early on an invariant subspace.
    assert d.steps == d.rank < world.dim
    gap = (d.values.view(-1, 1) - exact.view(1, -1)).abs() / exact.view(1, -1)
    assert float(gap.min(1).values.max()) < 1e-6  # every Ritz value is an eigenvalue
    assert float(gap.min(0).values.max()) < 1e-6  # every eigenvalue is a Ritz value


def test_deflated_cg_converges_faster_and_to_the_same_solution(world):  # noqa: F811
    _, a, lam = dense_system(world)
    b = random_vectors(world.specs, 4, seed=6)
    exact = torch.linalg.solve(a, flatten(b, world.specs).T).T

    def a_norm_errors(solve):
        out = []
        for k in sorted(solve.iterates):
            e = flatten(solve.iterates[k], world.specs) - exact
            out.append(float(((e @ a) * e).sum(1).sqrt().mean()))
        return out

    common = dict(snapshots=(0, 5, 10, world.dim))
    args = (world.f_pt, world.samples["pt"], world.specs, lam, b, world.dim)
    plain = a_norm_errors(solve_stage(*args, **common))
    deflated = a_norm_errors(solve_stage(*args, lanczos=20, seed=2, **common))
    assert all(d < p for d, p in zip(deflated[:3], plain[:3], strict=True))
    assert deflated[-1] < 1e-6 * deflated[0] and plain[-1] < 1e-6 * plain[0]


def test_deflation_is_seeded(world):  # noqa: F811
    _, _, lam = dense_system(world)
    b = random_vectors(world.specs, 1, seed=3)
    one, two, other = (
        fit_deflation(world.f_pt, operator(world, lam), lam, b, 12, seed=s) for s in (4, 4, 5)
    )
    assert torch.equal(one.values, two.values)
    assert all(torch.equal(one.vectors[k], two.vectors[k]) for k in one.vectors)
    assert not torch.equal(one.values, other.values)


def test_lanczos_only_refinement_moves_queries_and_is_recorded(world):  # noqa: F811
    plain = precondition(world, "multi-stage")
    refined = precondition(world, "multi-stage", Refinement(0, world.samples, lanczos=8, seed=3))
    record = refined.info["refine"]
    assert record["lanczos"] == 8 and record["lanczos_seed"] == 3 and record["steps"] == 0
    for stage in ("ft", "pt"):
        r = record["stages"][stage]
        assert r["lanczos_steps"] == 8 and 0 < r["deflated"] <= 8 and len(r["ritz_range"]) == 2
    moved = flatten(refined.dense, refined.specs) - flatten(plain.dense, refined.specs)
    assert float(moved.norm()) > 1e-3 * float(flatten(plain.dense, refined.specs).norm())
    # Another Lanczos run is another refinement: its scores must not be merged with these.
    again = precondition(world, "multi-stage", Refinement(0, world.samples, lanczos=8, seed=4))
    assert refinement_id(refined.info) != refinement_id(again.info)
    assert refinement_id(refined.info) is not None


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_lanczos_steps_are_refused(world, bad):  # noqa: F811
    with pytest.raises(MsifError, match="Lanczos steps must be an integer >= 0"):
        Refinement(0, world.samples, lanczos=bad)
    with pytest.raises(OptionError, match="--refine-lanczos must be"):
        PreconditionOptions(refine_lanczos=bad)


def test_fit_deflation_refuses_no_steps(world):  # noqa: F811
    _, _, lam = dense_system(world)
    b = random_vectors(world.specs, 1, seed=3)
    with pytest.raises(MsifError, match="Lanczos steps must be an integer >= 1"):
        fit_deflation(world.f_pt, operator(world, lam), lam, b, 0)


@pytest.mark.parametrize("bad", [0, -3, 2.0, False])
def test_bad_rows_per_pass_are_refused(world, bad):  # noqa: F811
    with pytest.raises(MsifError, match="rows per pass must be an integer >= 1"):
        Refinement(1, world.samples, rows=bad)
