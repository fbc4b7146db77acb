"""The factored corpus index against dense linear algebra on tiny float64 models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import msif
from msif.core.modules import ModuleSelection
from msif.errors import MismatchError, MsifError
from msif.index.factored import CorpusIndex, build_index, document_factors
from msif.index.lookup import index_scores, top_candidates
from tests.support.dense import per_example_gradients
from tests.support.tiny import make_batches, perturbed, random_examples, tiny_model


@pytest.fixture(scope="module")
def world():
    pt = tiny_model("gpt_neox", seed=0)
    ft = perturbed(pt, seed=5)
    corpus = random_examples(9, seed=20)
    ft_data = random_examples(8, seed=21, prompt=True)
    queries = random_examples(4, seed=22, prompt=True)
    fit = dict(dtype=torch.float64)
    fpt = msif.fit_factors(pt, lambda: make_batches(corpus, 4), stage="pt", **fit)
    fft = msif.fit_factors(ft, lambda: make_batches(ft_data, 4), stage="ft", **fit)
    ids = [e.id for e in queries]

    def precondition(method="multi-stage", **kw):
        return msif.precondition_queries(
            ft,
            make_batches(queries, 4),
            ids,
            method=method,
            ft_factors=fft,
            pt_factors=fpt,
            alpha=0.02,
            # pinned, not the default: the rank-2 agreement bound below was set at this damping
            **{"damping": msif.Damping(0.1), **kw},
        )

    return SimpleNamespace(pt=pt, ft=ft, corpus=corpus, precondition=precondition, fpt=fpt)


@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (2, 9, 4, 5)])  # T below, T above the widths
def test_document_factors_rebuild_the_per_document_gradient(shape):
    b, t, i, o = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(b, t, i, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, o, generator=gen, dtype=torch.float64)
    g[0, -2:] = 0  # padding: zero output gradients
    dw = g.mT @ a
    full = min(t, i, o)
    u, s, v = document_factors(a, g, full)
    torch.testing.assert_close(torch.einsum("bro,br,bri->boi", u, s, v), dw)
    # Rank r: the best rank-r approximation (Eckart–Young), singular values descending.
    u, s, v = document_factors(a, g, 2)
    sv = torch.linalg.svdvals(dw)
    torch.testing.assert_close(s, sv[:, :2])
    err = torch.linalg.matrix_norm(dw - torch.einsum("bro,br,bri->boi", u, s, v))
    torch.testing.assert_close(err, sv[:, 2:].norm(dim=-1))
    # Past the document's rank the triplets are zero, not garbage.
    u, s, v = document_factors(a, g, full + 3)
    assert s.shape == (b, full + 3) and bool((s[:, full:] == 0).all())
    with pytest.raises(MsifError, match="at least 1"):
        document_factors(a, g, 0)


@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("method", ["multi-stage", "gradient-dot"])
def test_full_rank_index_gives_the_exact_scores(world, method, lowrank):
    queries = world.precondition(method, rank=8 if lowrank else None)
    assert bool(queries.lowrank) == lowrank
    index = build_index(
        world.pt, make_batches(world.corpus, 4), queries.specs, 64, dtype=torch.float64
    )
    expected = msif.score(world.pt, make_batches(world.corpus, 4), queries).values
    got = index_scores(queries, index)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    # ... and against per-example gradients formed densely.
    grads = per_example_gradients(world.pt, world.corpus, queries.specs)
    dense = sum(torch.einsum("qoi,noi->qn", queries.weight(k), grads[k]) for k in queries.specs)
    torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-9 * float(dense.abs().max()))


def test_low_rank_index_approximates_and_shards_add_up(world, tmp_path):
    queries = world.precondition()
    exact = msif.score(world.pt, make_batches(world.corpus, 4), queries).values
    rank2 = build_index(world.pt, make_batches(world.corpus, 4), queries.specs, 2)
    approx = index_scores(queries, rank2)
    assert not torch.allclose(approx, exact)
    corr = torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1]
    assert corr > 0.9
    # Shards: the same documents split in two give the same scores and candidates.
    a = build_index(world.pt, make_batches(world.corpus[:5], 4), queries.specs, 2)
    b = build_index(world.pt, make_batches(world.corpus[5:], 4), queries.specs, 2)
    a.save(tmp_path / "a")
    a = CorpusIndex.load(tmp_path / "a")  # through the artifact format
    torch.testing.assert_close(
        torch.cat([index_scores(queries, a), index_scores(queries, b)], 1), approx
    )
    whole = top_candidates(queries, [("whole", rank2)], 4)
    split = top_candidates(queries, [("a", a), ("b", b)], 4)
    assert [[d for d, _ in whole[q]] for q in whole] == [[d for d, _ in split[q]] for q in split]
    for qid, rows in whole.items():
        q = queries.query_ids.index(qid)
        want = torch.topk(approx[q], 4).indices.tolist()
        assert [d for d, _ in rows] == [rank2.doc_ids[j] for j in want]


def test_index_refuses_queries_it_cannot_serve(world):
    queries = world.precondition()
    index = build_index(world.pt, make_batches(world.corpus[:4], 4), queries.specs, 2)
    with pytest.raises(MismatchError, match="single-stage queries pair with corpus gradients"):
        index_scores(world.precondition("single-stage"), index)
    at_ft = build_index(world.ft, make_batches(world.corpus[:4], 4), queries.specs, 2)
    with pytest.raises(MismatchError, match="other model weights"):
        index_scores(queries, at_ft)
    first = next(iter(queries.specs))
    fewer = build_index(
        world.pt,
        make_batches(world.corpus[:4], 4),
        {k: v for k, v in queries.specs.items() if k != first},
        2,
    )
    with pytest.raises(MismatchError, match=f"no factors of module '{first}'"):
        index_scores(queries, fewer)


def test_split_heads_index_is_exact(world):
    queries = world.precondition(modules=ModuleSelection(split_heads=True))
    index = build_index(
        world.pt, make_batches(world.corpus, 4), queries.specs, 64, dtype=torch.float64
    )
    expected = msif.score(world.pt, make_batches(world.corpus, 4), queries).values
    torch.testing.assert_close(
        index_scores(queries, index), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max())
    )


def test_whitened_factors_are_exact_at_full_rank_and_best_in_their_norm():
    from msif.core.linalg import rotate_output
    from msif.index.factored import Metric, whitened_document_factors

    b, t, i, o = 3, 5, 7, 6
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(b, t, i, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, o, generator=gen, dtype=torch.float64)
    q_a = torch.linalg.qr(torch.randn(i, i, generator=gen, dtype=torch.float64))[0]
    q_g = torch.stack([torch.linalg.qr(torch.randn(3, 3, generator=gen).double())[0] for _ in "ab"])
    d_a = torch.rand(i, generator=gen, dtype=torch.float64) + 0.1
    d_g = torch.rand(o, generator=gen, dtype=torch.float64) + 0.1
    metric = Metric(q_a, q_g, d_a, d_g, 1.0)
    dw = g.mT @ a
    u, s, v = whitened_document_factors(a, g, 5, metric)
    torch.testing.assert_close(torch.einsum("bro,br,bri->boi", u, s, v), dw)

    def whitened(x):  # D_G^-1 Q_Gᵀ x Q_A D_A^-1, x (B, out, in')
        rows = rotate_output((x @ q_a).mT, q_g).mT  # Q_Gᵀ on the output axis
        return rows / d_g[:, None] / d_a[None, :]

    u, s, v = whitened_document_factors(a, g, 2, metric)
    err = torch.linalg.matrix_norm(whitened(dw - torch.einsum("bro,br,bri->boi", u, s, v)))
    sv = torch.linalg.svdvals(whitened(dw))
    torch.testing.assert_close(err, sv[:, 2:].norm(dim=-1))  # Eckart–Young in that norm
    plain = document_factors(a, g, 2)
    worse = torch.linalg.matrix_norm(whitened(dw - torch.einsum("bro,br,bri->boi", *plain)))
    assert bool((err <= worse + 1e-12).all()) and bool((err < worse).any())


def test_whitened_index_is_exact_at_full_rank_through_the_node_metric(world):
    from msif.index.factored import pt_metric

    queries = world.precondition()
    fpt = world.fpt
    metrics = {n: pt_metric(fpt, n, 0.01, 0.5) for n in fpt.specs}
    index = build_index(
        world.pt, make_batches(world.corpus, 4), queries.specs, 64, dtype=torch.float64,
        metrics=metrics,
    )  # fmt: skip
    expected = msif.score(world.pt, make_batches(world.corpus, 4), queries).values
    torch.testing.assert_close(
        index_scores(queries, index), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max())
    )


# ----------------------------------------------------------------------------- projected tier


def test_projected_index_with_every_triplet_and_entry_is_exact(world):
    from msif.index.projected import build_projected_index, module_budgets

    queries = world.precondition()
    fpt = world.fpt
    damping = {n: 0.01 for n in fpt.specs}
    rank = 64  # past every document's rank: min(T, out, in')
    cap = {
        n: min(rank, s.out_features, s.in_dim) * (s.out_features + s.in_dim)
        for n, s in fpt.specs.items()
    }
    everything = 2 * sum(cap.values())
    assert module_budgets(fpt.lambdas, damping, 10**9, 0.5, cap, 2) == cap  # capped
    index = build_projected_index(
        world.pt, make_batches(world.corpus, 4), fpt, 10**9, 0.5, damping,
        rank=rank, dtype=torch.float64,
    )  # fmt: skip
    assert index.values_per_document() == everything
    expected = msif.score(world.pt, make_batches(world.corpus, 4), queries).values
    got = index_scores(queries, index, factors=fpt)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def _dense_sparse_factors(x, rank, k_out, k_in):
    """Reference: the top-rank SVD of each x (N, out, in'), each u and v cut to its largest
    k_out / k_in entries, summed back into (N, out, in')."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    total = torch.zeros_like(x)
    for k in range(rank):
        uk, vk = u[:, :, k], vh[:, k, :]
        keep_u = torch.zeros_like(uk).scatter(1, uk.abs().topk(k_out, dim=1).indices, 1.0)
        keep_v = torch.zeros_like(vk).scatter(1, vk.abs().topk(k_in, dim=1).indices, 1.0)
        total += s[:, k, None, None] * (uk * keep_u)[:, :, None] * (vk * keep_v)[:, None, :]
    return total


def test_projected_index_keeps_each_triplets_largest_entries(world, tmp_path):
    from msif.index.factored import pt_metric
    from msif.index.projected import ProjectedIndex, build_projected_index, layouts

    queries = world.precondition()
    fpt = world.fpt
    damping = {n: fpt.damping_for(n, msif.Damping(0.1)) for n in fpt.specs}
    plan = layouts(fpt, 256, 2, 0.5, damping)
    assert sum(2 * lay.pairs for lay in plan.values()) <= 256
    assert all(lay.rank == 2 and lay.k_out < s.out_features for lay, s in
               zip(plan.values(), fpt.specs.values(), strict=True))  # fmt: skip
    index = build_projected_index(
        world.pt, make_batches(world.corpus, 4), fpt, 256, 0.5, damping,
        rank=2, dtype=torch.float64,
    )  # fmt: skip
    assert index.values_per_document() == sum(2 * lay.pairs for lay in plan.values())
    index.save(tmp_path / "p")
    index = ProjectedIndex.load(tmp_path / "p")
    # Against dense per-document gradients: in the eigenbasis, whitened by the rank-1 fit of
    # (Λ + λ)^½, the top-2 SVD with each factor cut to its largest entries, unwhitened, and
    # the rotated query read there.
    grads = per_example_gradients(world.pt, world.corpus, fpt.specs)
    approx = torch.zeros(queries.num_queries, len(world.corpus), dtype=torch.float64)
    for name in fpt.specs:
        m = pt_metric(fpt, name, damping[name], 0.5)
        sg, sa = m.d_g[:, None] ** 0.5, m.d_a[None, :] ** 0.5
        x = fpt.to_eigenbasis(name, grads[name]) / sg / sa
        lay = plan[name]
        want = _dense_sparse_factors(x, 2, lay.k_out, lay.k_in) * sg * sa
        w = fpt.to_eigenbasis(name, queries.weight(name).double())
        approx += torch.einsum("qoi,noi->qn", w, want)
    torch.testing.assert_close(index_scores(queries, index, factors=fpt), approx)
    with pytest.raises(MsifError, match="needs its pre-train factors"):
        index_scores(queries, index)
    other = msif.fit_factors(
        world.pt, lambda: make_batches(world.corpus[:5], 4), stage="pt", dtype=torch.float64
    )
    with pytest.raises(MismatchError, match="another pre-train eigenbasis"):
        index_scores(queries, index, factors=other)
    with pytest.raises(MsifError, match="at least 4 values per module"):
        layouts(fpt, 4 * len(fpt.specs) - 1, 2, 0.5, damping)
