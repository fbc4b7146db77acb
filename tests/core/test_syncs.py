"""No pass makes the host wait on the GPU once per batch.

A host synchronisation inside a batch loop (`.item()`, `bool(t)`, `.cpu()`, `.tolist()`, a
boolean-mask index, a blocking copy in either direction) drains the GPU's queue every batch.
There is no GPU here and `torch.cuda.set_sync_debug_mode` needs one, so each pass runs under
tests.support.syncs.SyncCounter, which tags the model's tensors and everything computed from
them as device tensors and records every such operation applied to one. Each pass runs twice,
on 2 and on 5 batches of the same shapes: anything it does once per batch shows up as the
difference, which must be empty (a sync before or after the loop, once, is allowed). A sync
reintroduced into a loop fails the test with its kind and the msif line that made it; the
injection tests below check that the counter does see each kind.
"""

from __future__ import annotations

import pytest
import torch

import msif
import msif.core.device as device_module
from msif.attribution.explain import predicted_token_scores
from msif.core.device import Deferred, to, to_host
from msif.core.modules import find_modules
from msif.ekfac import covariance as covariance_module
from msif.index.factored import build_index, whitening_metrics
from msif.index.projected import build_projected_index
from tests.support.syncs import extra_syncs
from tests.support.tiny import make_batches, perturbed, random_examples, tiny_model

# cuSOLVER checks its status after every eigh and SVD: the index builds factor every
# document's gradient, so they synchronise once per module and batch by nature.
LINALG = ("cuSOLVER status check (eigh)", "cuSOLVER status check (svd)")


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt_neox", dtype=torch.float32)


@pytest.fixture(scope="module")
def docs():
    examples = random_examples(10, seed=1)
    return make_batches(examples[:4], 2), make_batches(examples, 2), examples


@pytest.fixture(scope="module")
def queries():
    q = random_examples(10, seed=2, prompt=True)
    return make_batches(q[:4], 2), make_batches(q, 2), [e.id for e in q]


@pytest.fixture(scope="module")
def factors(model, docs):
    basis = msif.eigendecompose(msif.fit_covariance(model, docs[1]), device="cpu")
    return basis, msif.Factors.build(basis, msif.fit_lambda(model, docs[1], basis))


@pytest.fixture(scope="module")
def fine_tuned(model, queries):
    ft = perturbed(model)
    basis = msif.eigendecompose(msif.fit_covariance(ft, queries[1], stage="ft"), device="cpu")
    return ft, msif.Factors.build(basis, msif.fit_lambda(ft, queries[1], basis))


@pytest.fixture(scope="module")
def pre(fine_tuned, factors, queries):
    ft, ft_factors = fine_tuned
    return msif.precondition_queries(
        ft, queries[1], queries[2], ft_factors=ft_factors, pt_factors=factors[1]
    )


def assert_no_growth(small, large, model, allowed=()):
    grown = extra_syncs(small, large, model, allowed)
    assert not grown, "syncs per batch: " + "; ".join(
        f"{n}× {k} at {w}" for (k, w), n in grown.items()
    )


def test_covariance_and_lambda(model, docs, factors):
    small, large, _ = docs
    assert_no_growth(
        lambda: msif.fit_covariance(model, small), lambda: msif.fit_covariance(model, large), model
    )
    basis = factors[0]
    assert_no_growth(
        lambda: msif.fit_lambda(model, small, basis),
        lambda: msif.fit_lambda(model, large, basis),
        model,
    )


@pytest.mark.parametrize("method", ["multi-stage", "single-stage"])
def test_query_gradients(fine_tuned, factors, queries, method):
    small, large, ids = queries
    ft, ft_factors = fine_tuned
    kwargs = {"ft_factors": ft_factors, "method": method}
    if method == "multi-stage":
        kwargs["pt_factors"] = factors[1]

    def run(batches, n):
        return lambda: msif.precondition_queries(ft, batches, ids[:n], **kwargs)

    assert_no_growth(run(small, 4), run(large, 10), ft)


@pytest.mark.parametrize("path", ["auto", "materialise", "per-token"])
def test_scoring(model, docs, pre, path):
    small, large, _ = docs
    assert_no_growth(
        lambda: msif.score(model, small, pre, path=path),
        lambda: msif.score(model, large, pre, path=path),
        model,
    )


def test_streamed_scores_to_the_host(model, docs, pre):
    small, large, _ = docs

    def consume(batches):
        return lambda: [
            bs.scores.numpy().sum() for bs in msif.iter_scores(model, batches, pre, to_host=True)
        ]

    assert_no_growth(consume(small), consume(large), model)
    streamed = torch.cat([bs.scores for bs in msif.iter_scores(model, large, pre, to_host=True)], 1)
    assert streamed.device.type == "cpu"
    torch.testing.assert_close(streamed, msif.score(model, large, pre).values, rtol=0, atol=0)


def test_per_token_scores_and_explain(model, docs, pre):
    small, large, examples = docs
    assert_no_growth(
        lambda: msif.score(model, small, pre, per_token=True),
        lambda: msif.score(model, large, pre, per_token=True),
        model,
    )
    pairs = [(i % 2, e) for i, e in enumerate(examples)]
    assert_no_growth(
        lambda: predicted_token_scores(model, pairs[:4], pre, batch_size=2),
        lambda: predicted_token_scores(model, pairs, pre, batch_size=2),
        model,
    )


def test_index_builds_sync_only_in_their_factorisations(model, docs, factors, pre):
    small, large, _ = docs
    f = factors[1]
    metrics = whitening_metrics(f, 0.5, 0.01)
    for metric in (None, metrics):
        assert_no_growth(
            lambda m=metric: build_index(model, small, f.specs, 2, metrics=m),
            lambda m=metric: build_index(model, large, f.specs, 2, metrics=m),
            model,
            allowed=LINALG,
        )
    damping = {n: 0.1 for n in f.specs}
    assert_no_growth(
        lambda: build_projected_index(model, small, f, 256, 0.5, damping, rank=2),
        lambda: build_projected_index(model, large, f, 256, 0.5, damping, rank=2),
        model,
        allowed=LINALG,
    )
    # Without the allowance the eigh's status checks are what remains, and nothing else.
    grown = extra_syncs(
        lambda: build_index(model, small, f.specs, 2),
        lambda: build_index(model, large, f.specs, 2),
        model,
    )
    assert grown and {k for k, _ in grown} <= set(LINALG)


# ---------------------------------------------------------------- the counter sees each kind


INJECTIONS = {
    "scalar read": lambda a: float(a.sum()),
    "boolean mask": lambda a: a[a > 0],
    "nonzero": lambda a: (a > 0).nonzero(),
    ".cpu()": lambda a: a.cpu(),
    ".tolist()": lambda a: a[0, 0].tolist(),
    "copy to the host": lambda a: a.to("cpu", torch.float64),
    "blocking copy to the device": lambda a: torch.ones(3).to(a.device),
    "tensor on the device": lambda a: torch.tensor([1, 2], device=a.device),
}


@pytest.mark.parametrize("inject", INJECTIONS.values(), ids=INJECTIONS.keys())
def test_a_sync_put_into_the_loop_is_found(monkeypatch, model, docs, inject):
    small, large, _ = docs
    original = covariance_module._accumulate

    def accumulate(cov, spec, a, g, rows):
        inject(a)
        original(cov, spec, a, g, rows)

    monkeypatch.setattr(covariance_module, "_accumulate", accumulate)
    grown = extra_syncs(
        lambda: msif.fit_covariance(model, small), lambda: msif.fit_covariance(model, large), model
    )
    specs = len(find_modules(model))
    assert sum(grown.values()) >= 3 * specs  # 3 more batches, once per module each
    assert all(where.startswith("msif/ekfac/covariance.py:") for _, where in grown)


# ----------------------------------------------------------------------- the device helpers


def test_to_cuda_goes_through_pinned_memory_without_blocking(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((a, k)) or self)
    x = torch.ones(2)
    to(x, "cuda")
    assert calls == ["pin", ((torch.device("cuda"),), {"non_blocking": True})]
    calls.clear()
    to(x, "cpu")
    assert calls == [((torch.device("cpu"),), {})]


def test_to_host_copies_and_deferred_runs_in_order_a_lag_late():
    x = torch.arange(3.0)
    copy = to_host(x)
    x += 1  # the pass goes on writing its buffer: the host copy must not change
    assert torch.equal(copy.get(), torch.arange(3.0))
    seen = []
    d = Deferred(lag=1)
    for step in range(3):
        d.add(lambda t, step=step: seen.append((step, int(t))), torch.tensor(step))
        d.run()
        assert [s for s, _ in seen] == list(range(step))  # everything a batch old, no more
        d.advance()
    d.flush()
    assert seen == [(0, 0), (1, 1), (2, 2)]
    now = Deferred(lag=0)
    now.add(lambda t: seen.append(("now", int(t))), torch.tensor(7))
    now.run()
    assert seen[-1] == ("now", 7)
    assert device_module.to_host(torch.ones(1)).event is None  # no CUDA event on the CPU
