"""EK-FAC pieces and influence scores against dense linear algebra on tiny float64 models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import msif
from benchmarks import architectures as table
from msif.attribution.precondition import rotate_tokens_first, summed_gradients
from msif.core.modules import ModuleSelection, find_modules
from msif.ekfac.factors import DEFAULT_DAMPING_FACTOR, Damping, Factors, change_of_basis
from tests.support.dense import dense_solve, kron_basis, per_example_gradients
from tests.support.tiny import (
    ARCHITECTURES,
    make_batches,
    perturbed,
    random_examples,
    tiny_model,
)


def fit_factors(model, data, stage, selection=None, seed=0):
    return msif.fit_factors(
        model, lambda: data, stage=stage, modules=selection, seed=seed, dtype=torch.float64
    )


class OneLinear(nn.Module):
    """Embedding → one linear layer → logits: the smallest model msif can hook."""

    def __init__(self, vocab=7, width=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([nn.Linear(width, vocab)])

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.layers[0](self.emb(input_ids)))


def test_one_token_ekfac_inverse_equals_exact_damped_fisher_inverse():
    torch.manual_seed(0)
    model = OneLinear().double()
    example = msif.Example("x", [2, 5], [2, 5])  # one scored token
    data = make_batches([example], 1)
    factors = fit_factors(model, data, "pt")
    grads = per_example_gradients(model, [example], factors.specs, sample=True)
    name = "layers.0"
    g = grads[name].reshape(-1)
    fisher = torch.outer(g, g)
    lam = factors.damping_for(name, Damping(0.1))
    assert lam == pytest.approx(0.1 * float(factors.lambdas[name].mean()))
    v = torch.randn(4, 7, 4, dtype=torch.float64)
    exact = torch.linalg.solve(
        fisher + lam * torch.eye(g.numel(), dtype=g.dtype), v.reshape(4, -1).T
    ).T.reshape(v.shape)
    got = factors.inverse_apply(name, v, lam)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-9)


def _random_orthogonal(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q.contiguous()


@pytest.mark.parametrize("blocks", [1, 3])
def test_block_inverse_equals_dense_inverse_and_leaves_factors_untouched(blocks):
    gen = torch.Generator().manual_seed(3)
    bs, n_in = 6 // blocks, 5
    out = bs * blocks
    spec = msif.ModuleSpec("m", "linear", n_in - 1, out, True, bs)
    q_g = torch.stack([_random_orthogonal(bs, gen) for _ in range(blocks)])
    factors = Factors(
        "pt",
        {"m": spec},
        {"m": _random_orthogonal(n_in, gen)},
        {"m": q_g},
        {"m": torch.rand(out, n_in, generator=gen, dtype=torch.float64)},
        1,
        1,
        {},
        0,
    )
    before = {k: v.clone() for k, v in factors.lambdas.items()}
    v = torch.randn(3, out, n_in, generator=gen, dtype=torch.float64)
    got = factors.inverse_apply("m", v, 0.3)
    torch.testing.assert_close(got, dense_solve(factors, "m", v, 0.3), rtol=1e-10, atol=1e-10)
    assert torch.equal(factors.inverse_apply("m", v, 0.3), got)
    assert torch.equal(factors.lambdas["m"], before["m"])


def _random_factors(stage, spec, gen):
    blocks, bs = spec.num_blocks, spec.block_size
    return Factors(
        stage,
        {spec.name: spec},
        {spec.name: _random_orthogonal(spec.in_dim, gen)},
        {spec.name: torch.stack([_random_orthogonal(bs, gen) for _ in range(blocks)])},
        {spec.name: torch.rand(spec.out_features, spec.in_dim, generator=gen, dtype=torch.float64)},
        1,
        1,
        {},
        0,
    )


@pytest.mark.parametrize("blocks", [1, 3])
def test_eigenbasis_routes_and_change_of_basis_equal_dense_rotations(blocks):
    gen = torch.Generator().manual_seed(5)
    spec = msif.ModuleSpec("m", "linear", 4, 2 * blocks, True, 2)
    ft, pt = _random_factors("ft", spec, gen), _random_factors("pt", spec, gen)
    q = kron_basis(ft, "m")  # columns: vec(Q_G e_i e_jᵀ Q_Aᵀ), row-major like reshape
    a = torch.randn(3, 7, spec.in_dim, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 7, spec.out_features, generator=gen, dtype=torch.float64)
    dense = torch.bmm(g.mT, a)
    want = (dense.reshape(3, -1) @ q).reshape(dense.shape)
    for route in ("tokens", "sum", "auto"):
        got = summed_gradients(spec, a, g, ft, route)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ft.from_eigenbasis("m", want), dense, rtol=1e-12, atol=1e-12)
    r = torch.randn(4, spec.out_features, spec.in_dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        change_of_basis(ft, pt, "m", r),
        pt.to_eigenbasis("m", ft.from_eigenbasis("m", r)),
        rtol=1e-12,
        atol=1e-12,
    )


def test_tokens_are_rotated_first_only_when_that_is_cheaper():
    wide = msif.ModuleSpec("m", "linear", 512, 2048, False, 2048)  # out·in'·(bs+in') ≈ 2.7e9
    assert rotate_tokens_first(wide, 64)  # 64·(2048² + 512²) ≈ 2.9e8
    assert not rotate_tokens_first(wide, 1024)  # ≈ 4.6e9
    assert not rotate_tokens_first(msif.ModuleSpec("m", "linear", 4, 4, True, 4), 8)


@pytest.mark.parametrize("split", [False, True])
def test_lambda_equals_diagonal_of_dense_fisher_in_eigenbasis(split):
    model = tiny_model("gpt_neox")
    examples = random_examples(7, seed=4)
    sel = ModuleSelection(split_heads=split)
    factors = fit_factors(model, make_batches(examples, 3), "pt", sel, seed=11)
    grads = per_example_gradients(model, examples, factors.specs, sample=True, seed=11)
    for name in factors.specs:
        flat = grads[name].reshape(len(examples), -1)
        fisher = flat.T @ flat / len(examples)
        q = kron_basis(factors, name)
        expected = torch.diagonal(q.T @ fisher @ q).reshape(factors.lambdas[name].shape)
        torch.testing.assert_close(factors.lambdas[name], expected, rtol=1e-9, atol=1e-12)
    qkv = factors.specs["gpt_neox.layers.0.attention.query_key_value"]
    assert qkv.num_blocks == (6 if split else 1)


@pytest.fixture(scope="module")
def two_stage():
    pt = tiny_model("gpt_neox", seed=0)
    ft = perturbed(pt, seed=5)
    corpus = random_examples(9, seed=20)
    ft_data = random_examples(8, seed=21, prompt=True)
    queries = random_examples(4, seed=22, prompt=True)
    return SimpleNamespace(pt=pt, ft=ft, corpus=corpus, ft_data=ft_data, queries=queries)


def _dense_scores(w, z_grads, specs):
    return sum(torch.einsum("qoi,noi->qn", w[k], z_grads[k]) for k in specs)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("method", ["multi-stage", "single-stage", "gradient-dot"])
def test_scores_equal_dense_computation_on_both_paths(two_stage, method, split):
    s = two_stage
    sel = ModuleSelection(split_heads=split)
    fpt = fit_factors(s.pt, make_batches(s.corpus, 4), "pt", sel)
    fft = fit_factors(s.ft, make_batches(s.ft_data, 4), "ft", sel)
    ids = [e.id for e in s.queries]
    pq = msif.precondition_queries(
        s.ft,
        make_batches(s.queries, 3),
        ids,
        method=method,
        ft_factors=fft,
        pt_factors=fpt,
        alpha=0.02,
        modules=sel,
    )
    specs = pq.specs
    q_grads = per_example_gradients(s.ft, s.queries, specs)
    corpus_model = s.ft if method == "single-stage" else s.pt
    z_grads = per_example_gradients(corpus_model, s.corpus, specs)
    w = {}
    for k in specs:
        v = q_grads[k]
        if method != "gradient-dot":
            assert pq.damping["ft"][k] == 0.02 or method == "single-stage"
            v = dense_solve(fft, k, v, pq.damping["ft"][k])
        if method == "multi-stage":
            lam = pq.damping["pt"][k]
            assert lam == pytest.approx(DEFAULT_DAMPING_FACTOR * float(fpt.lambdas[k].mean()))
            v = dense_solve(fpt, k, v, lam)
        w[k] = v
    expected = _dense_scores(w, z_grads, specs)
    batches = make_batches(s.corpus, 4)
    for path in ("materialise", "per-token"):
        got = msif.score(corpus_model, batches, pq, path=path)
        torch.testing.assert_close(
            got.values, expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max())
        )
    tok = msif.score(corpus_model, batches, pq, per_token=True)
    summed = torch.cat([t.sum(-1) for t in tok.token_scores], dim=1)
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))


def test_multi_stage_differs_from_its_parts(two_stage):
    # Guards against silently dropping (F_pt + λI)⁻¹, the reference code's mistake.
    s = two_stage
    fpt = fit_factors(s.pt, make_batches(s.corpus, 4), "pt")
    fft = fit_factors(s.ft, make_batches(s.ft_data, 4), "ft")
    ids = [e.id for e in s.queries]
    batches = make_batches(s.queries, 4)
    multi = msif.precondition_queries(
        s.ft, batches, ids, ft_factors=fft, pt_factors=fpt, alpha=0.02
    )
    only_ft = msif.precondition_queries(
        s.ft, batches, ids, method="single-stage", ft_factors=fft, alpha=0.02
    )
    name = next(iter(multi.specs))
    assert not torch.allclose(multi.dense[name], only_ft.dense[name])
    again = fpt.inverse_apply(name, only_ft.dense[name], multi.damping["pt"][name])
    torch.testing.assert_close(multi.dense[name], again)


def test_full_rank_queries_reproduce_full_scores(two_stage):
    s = two_stage
    fpt = fit_factors(s.pt, make_batches(s.corpus, 4), "pt")
    fft = fit_factors(s.ft, make_batches(s.ft_data, 4), "ft")
    ids = [e.id for e in s.queries]
    qb = make_batches(s.queries, 4)
    full = msif.precondition_queries(s.ft, qb, ids, ft_factors=fft, pt_factors=fpt, alpha=0.1)
    full_rank = max(min(sp.shape) for sp in full.specs.values())
    lr = msif.precondition_queries(
        s.ft, qb, ids, ft_factors=fft, pt_factors=fpt, alpha=0.1, rank=full_rank
    )
    assert lr.lowrank and not lr.dense
    batches = make_batches(s.corpus, 4)
    expected = msif.score(s.pt, batches, full).values
    for path in ("materialise", "per-token"):
        got = msif.score(s.pt, batches, lr, path=path).values
        torch.testing.assert_close(
            got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max())
        )
    rank1 = msif.precondition_queries(
        s.ft, qb, ids, ft_factors=fft, pt_factors=fpt, alpha=0.1, rank=1
    )
    approx = msif.score(s.pt, batches, rank1).values
    assert not torch.allclose(approx, expected)
    corr = torch.corrcoef(torch.stack([approx.flatten(), expected.flatten()]))[0, 1]
    assert corr > 0.5  # a rank-1 query still tracks the full one


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_is_exact_in_float64(arch):
    # The architecture table's checks (benchmarks/architectures.py) as assertions: hook
    # gradients and covariance sums against autograd and plain hooks, Λ against the dense
    # Fisher, multi-stage scores against dense solves, unsplit and with --split-heads.
    d = table.setup(arch)
    specs = find_modules(d.pt)
    tol = table.TOLERANCE
    assert table.gradient_error(d.pt, d.corpus, specs) <= tol["gradient"]
    assert table.covariance_error(d.pt, d.corpus, specs) <= tol["covariance"]
    split = table.heads_only(find_modules(d.pt, ModuleSelection(split_heads=True)))
    assert any(s.num_blocks > 1 for s in split.values())
    for tracked in (specs, split):
        errors = table.exactness(d, tracked)
        assert errors["lambda"] <= tol["lambda"], errors
        assert errors["scores"] <= tol["scores"], errors
    heads = find_modules(d.pt, ModuleSelection(embeddings=True, lm_head=True, include=("^$",)))
    assert table.gradient_error(d.pt, d.corpus, heads) <= tol["gradient"]
