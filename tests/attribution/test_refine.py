"""Iterative refinement against dense linear algebra on tiny float64 models.

The dense Gauss–Newton matrix is built from explicit Jacobians of the logits by the tracked
modules' own parameters (reverse mode, torch.func), independent of the matrix-free product
(forward mode injected at the modules' outputs).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf

import msif
from msif.attribution.refine import (
    GaussNewton,
    Refinement,
    StageSample,
    conjugate_gradient,
    sample_rows,
    solve_stage,
)
from msif.config import PreconditionOptions
from msif.core.modules import ModuleSelection
from msif.errors import MismatchError, MsifError, OptionError
from tests.support.dense import damping_matrix, dense_gauss_newton, flatten, unflatten
from tests.support.tiny import (
    ARCHITECTURES,
    VOCAB,
    make_batches,
    perturbed,
    random_examples,
    tiny_config,
    tiny_model,
)


def fit_factors(model, data, stage, selection):
    return msif.fit_factors(
        model, lambda: make_batches(data, 4), stage=stage, modules=selection, dtype=torch.float64
    )


def random_vectors(specs, queries, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(queries, s.out_features, s.in_dim, generator=gen, dtype=torch.float64)
        for n, s in specs.items()
    }


@pytest.mark.parametrize(
    ("arch", "include", "tol"),
    [
        ("gpt_neox", r"layers\.1\.", 1e-10),
        ("gpt2", r"h\.1\.", 1e-10),  # Conv1D: weights stored in × out
        # Llama's RMSNorm computes in float32 even in a float64 model: float32 agreement only.
        ("llama", r"layers\.1\.", 1e-6),
    ],
)
@pytest.mark.parametrize("rows", [2, 64])  # query chunks of 2 copies; all queries in one pass
def test_gauss_newton_product_equals_dense_gauss_newton(arch, include, tol, rows):
    model = tiny_model(arch)
    specs = msif.find_modules(model, ModuleSelection(include=(include,)))
    assert len(specs) >= 4  # attention and MLP modules: cross-module blocks are in play
    examples = random_examples(5, seed=3, prompt=True)
    dense = dense_gauss_newton(model, examples, specs)
    v = random_vectors(specs, 3, seed=1)
    lam = {n: 0.01 * (i + 1) for i, n in enumerate(specs)}
    got = GaussNewton(model, specs, examples, lam, rows=rows)(v)
    want = flatten(v, specs) @ (dense + damping_matrix(specs, lam))
    err = (flatten(got, specs) - want).norm() / want.norm()
    assert err < tol
    # Cross-module blocks matter: G is not block-diagonal over modules.
    first = next(iter(specs.values()))
    size = first.out_features * first.in_dim
    assert dense[:size, size:].abs().max() > 1e-3 * dense.abs().max()


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_gauss_newton_product_with_embeddings_and_head_equals_dense(arch):
    # The input embedding (one-hot inputs) and the output head are tracked like any linear:
    # the product over them and a block is the dense G, cross-module blocks included.
    config = tiny_config(arch)
    config.tie_word_embeddings = False  # a tied weight has no Jacobian of its own per use
    torch.manual_seed(0)
    model = getattr(tf, ARCHITECTURES[arch][1])(config).double().eval()
    selection = ModuleSelection(embeddings=True, lm_head=True, include=(r"\.1\.",))
    specs = msif.find_modules(model, selection)
    kinds = [s.kind for s in specs.values()]
    assert kinds[0] == "embedding" and list(specs)[-1] == "lm_head"
    examples = random_examples(5, seed=3, prompt=True)
    dense = dense_gauss_newton(model, examples, specs)
    v = random_vectors(specs, 3, seed=1)
    lam = {n: 0.01 * (i + 1) for i, n in enumerate(specs)}
    got = GaussNewton(model, specs, examples, lam, rows=64)(v)
    want = flatten(v, specs) @ (dense + damping_matrix(specs, lam))
    assert (flatten(got, specs) - want).norm() / want.norm() < 1e-10
    embedding = specs[list(specs)[0]]
    size = embedding.out_features * embedding.in_dim
    assert dense[:size, -size:].abs().max() > 1e-3 * dense.abs().max()


def small_neox(seed: int):
    """GPT-NeoX with hidden 8: its two attention output projections are 2 × 72 coordinates."""
    config = tf.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return tf.GPTNeoXForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def world():
    pt = small_neox(0)
    ft = perturbed(pt, scale=0.1, seed=5)
    selection = ModuleSelection(include=(r"attention\.dense$",))
    corpus = random_examples(10, seed=20)
    ft_data = random_examples(8, seed=21, prompt=True)
    queries = random_examples(3, seed=22, prompt=True)
    f_pt, f_ft = fit_factors(pt, corpus, "pt", selection), fit_factors(ft, ft_data, "ft", selection)
    specs = f_pt.specs
    samples = {
        "pt": StageSample(pt, corpus[:6], {"rows": list(range(6))}),
        "ft": StageSample(ft, ft_data[:5], {"rows": list(range(5))}),
    }
    dense = {s: dense_gauss_newton(samples[s].model, samples[s].examples, specs) for s in samples}
    return SimpleNamespace(
        pt=pt, ft=ft, queries=queries, f_pt=f_pt, f_ft=f_ft, specs=specs, samples=samples,
        dense=dense, dim=sum(s.out_features * s.in_dim for s in specs.values()),
    )  # fmt: skip


def precondition(w, method, refine=None, **kw):
    return msif.precondition_queries(
        w.ft,
        make_batches(w.queries, 3),
        [q.id for q in w.queries],
        method=method,
        ft_factors=w.f_ft,
        pt_factors=w.f_pt,
        alpha=0.05,
        refine=refine,
        **kw,
    )


@pytest.mark.parametrize("method", ["multi-stage", "single-stage", "gradient-dot"])
def test_zero_steps_is_ekfac_bitwise(world, method):
    plain = precondition(world, method)
    for steps in (0, 5) if method == "gradient-dot" else (0,):
        refined = precondition(world, method, Refinement(steps, world.samples))
        assert refined.dense.keys() == plain.dense.keys()
        for k in plain.dense:
            assert torch.equal(refined.dense[k], plain.dense[k])
        assert "refine" not in refined.info and refined.damping == plain.damping


@pytest.mark.parametrize("method", ["multi-stage", "single-stage"])
def test_dimension_many_steps_solve_the_dense_damped_systems(world, method):
    refined = precondition(world, method, Refinement(world.dim, world.samples))
    plain = precondition(world, "gradient-dot")
    specs = refined.specs
    x = flatten(plain.dense, specs).T
    stages = ("ft", "pt") if method == "multi-stage" else ("ft",)
    for stage in stages:
        system = world.dense[stage] + damping_matrix(specs, refined.damping[stage])
        x = torch.linalg.solve(system, x)
    want = unflatten(x.T, specs)
    got = flatten(refined.dense, specs)
    assert (got - flatten(want, specs)).norm() / got.norm() < 1e-6
    record = refined.info["refine"]
    assert record["steps"] == world.dim and list(record["stages"]) == list(stages)
    for stage in stages:
        r = record["stages"][stage]
        assert len(r["residuals"]) == world.dim + 1 and r["residuals"][-1] < 1e-6
        assert r["sequences"] == len(world.samples[stage].examples)
    # EK-FAC is not the exact answer on this model: refinement moved the queries.
    ekfac = flatten(precondition(world, method).dense, specs)
    assert (ekfac - got).norm() / got.norm() > 1e-3


def test_error_in_the_system_norm_never_grows(world):
    specs, stage = world.specs, "pt"
    lam = {n: world.f_pt.damping_for(n, msif.Damping(0.1)) for n in specs}
    system = world.dense[stage] + damping_matrix(specs, lam)
    b = random_vectors(specs, 4, seed=7)
    steps = 30
    solve = solve_stage(
        world.f_pt, world.samples[stage], specs, lam, b, steps, snapshots=range(steps + 1)
    )
    exact = torch.linalg.solve(system, flatten(b, specs).T).T

    def a_norm_error(x):
        e = flatten(x, specs) - exact
        return ((e @ system) * e).sum(1).sqrt()

    errors = torch.stack([a_norm_error(solve.iterates[k]) for k in range(steps + 1)])
    assert bool((errors[1:] <= errors[:-1] * (1 + 1e-9)).all())
    assert bool((errors[-1] < 0.1 * errors[0]).all())
    assert solve.residuals.shape == (steps + 1, 4)


def test_conjugate_gradient_on_a_dense_system_and_solved_queries():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = m @ m.T + 0.1 * torch.eye(6, dtype=torch.float64)
    b = {"m": torch.randn(3, 2, 3, generator=gen, dtype=torch.float64)}
    b["m"][2] = 0.0  # a zero right-hand side is solved by x = 0 and stays there

    def apply_a(v):
        return {"m": (v["m"].reshape(3, 6) @ a).reshape(3, 2, 3)}

    def precondition_identity(v):
        return {"m": v["m"].clone()}

    solve = conjugate_gradient(apply_a, b, precondition_identity, 12)
    want = torch.linalg.solve(a, b["m"].reshape(3, 6).T).T.reshape(3, 2, 3)
    torch.testing.assert_close(solve.solution["m"], want, rtol=1e-9, atol=1e-9)
    assert torch.isfinite(solve.residuals).all() and float(solve.residuals[-1].max()) < 1e-9


def test_samples_are_seeded_and_in_table_order():
    first = sample_rows(100, 10, seed=3)
    assert first == sample_rows(100, 10, seed=3) == sorted(first) and len(set(first)) == 10
    assert sample_rows(100, 10, seed=4) != first
    assert sample_rows(7, 10, seed=3) == list(range(7))


def test_bad_refinement_input_is_refused(world):
    with pytest.raises(MsifError, match="refinement steps must be an integer >= 0, not -1"):
        Refinement(-1)
    with pytest.raises(OptionError, match="--refine-steps must be at least 0"):
        PreconditionOptions(refine_steps=-1)
    with pytest.raises(OptionError, match="--refine-samples must be at least 1"):
        PreconditionOptions(refine_samples=0)
    only_ft = {"ft": world.samples["ft"]}
    with pytest.raises(MsifError, match="refining the pt stage needs a sample of its data"):
        precondition(world, "multi-stage", Refinement(2, only_ft))
    with pytest.raises(MsifError, match="refining the ft stage needs a sample of its data"):
        precondition(world, "single-stage", Refinement(2, {}))
    # The pre-train sample at θ_ft: the exact products would be of the wrong model.
    swapped = {"ft": world.samples["ft"], "pt": StageSample(world.ft, world.samples["pt"].examples)}
    with pytest.raises(MismatchError, match="pt stage's refinement model"):
        precondition(world, "multi-stage", Refinement(2, swapped))
    with pytest.raises(MsifError, match="at least one sequence"):
        GaussNewton(world.pt, world.specs, [], {n: 0.1 for n in world.specs})


def test_a_model_without_forward_mode_rules_is_refused():
    model = tiny_model("bloom")  # its GeLU is a custom autograd function without a jvp
    specs = msif.find_modules(model)
    operator = GaussNewton(model, specs, random_examples(2, seed=1), {n: 0.1 for n in specs})
    with pytest.raises(MsifError, match="cannot refine through BloomForCausalLM: forward-mode"):
        operator(random_vectors(specs, 2, seed=0))
