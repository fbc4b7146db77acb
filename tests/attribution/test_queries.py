"""The methods table, and the preconditioned-queries artifact: format, round trip, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import msif
from msif.attribution.precondition import METHOD_INFO, METHODS
from msif.errors import MismatchError, MsifError
from tests.support.tiny import make_batches, perturbed, random_examples, tiny_model


@pytest.fixture(scope="module")
def fitted():
    pt = tiny_model("gpt_neox")
    ft = perturbed(pt, seed=2)
    data = make_batches(random_examples(6, seed=3), 3)
    factors = {
        stage: msif.fit_factors(m, lambda: data, stage=stage, dtype=torch.float64)
        for stage, m in (("pt", pt), ("ft", ft))
    }
    queries = make_batches(random_examples(2, seed=4, prompt=True), 2)
    return pt, ft, factors, queries


def test_methods_are_named_once_with_what_they_apply():
    assert METHODS == ("multi-stage", "single-stage", "gradient-dot") == tuple(METHOD_INFO)
    assert {m: METHOD_INFO[m].stages for m in METHODS} == {
        "multi-stage": ("ft", "pt"),
        "single-stage": ("ft",),
        "gradient-dot": (),
    }
    assert [METHOD_INFO[m].corpus_model for m in METHODS] == ["pt", "ft", "pt"]
    assert all(METHOD_INFO[m].help and "\n" not in METHOD_INFO[m].help for m in METHODS)


def test_methods_refuse_missing_factors(fitted):
    pt, ft, factors, queries = fitted
    with pytest.raises(MsifError, match="multi-stage needs fine-tune and pre-train factors"):
        msif.precondition_queries(ft, queries, ["a", "b"], ft_factors=factors["ft"])
    with pytest.raises(MsifError, match="single-stage needs fine-tune factors"):
        msif.precondition_queries(ft, queries, ["a", "b"], method="single-stage")
    with pytest.raises(MsifError, match="unknown method 'x'; choose one of multi-stage, single"):
        msif.precondition_queries(ft, queries, ["a", "b"], method="x")
    pq = msif.precondition_queries(ft, queries, ["a", "b"], method="gradient-dot")
    assert pq.damping == {"ft": {}, "pt": {}}


def test_every_method_names_the_model_its_corpus_must_be_scored_with(fitted):
    pt, ft, factors, queries = fitted
    other = perturbed(pt, seed=9)  # the same shapes, other weights
    docs = make_batches(random_examples(3, seed=5), 3)
    cases = {
        "multi-stage": dict(ft_factors=factors["ft"], pt_factors=factors["pt"]),
        "single-stage": dict(ft_factors=factors["ft"]),
        "gradient-dot": dict(pt_factors=factors["pt"]),
    }
    for method, given in cases.items():
        q = msif.precondition_queries(ft, queries, ["a", "b"], method=method, **given)
        right = ft if METHOD_INFO[method].corpus_model == "ft" else pt
        assert msif.score(right, docs, q).values.shape == (2, 3)
        with pytest.raises(MismatchError, match="other model weights"):
            msif.score(other, docs, q)
    # Gradient-dot without pre-train factors cannot know θ_pt, but refuses θ_ft itself.
    q = msif.precondition_queries(ft, queries, ["a", "b"], method="gradient-dot")
    assert msif.score(other, docs, q).values.shape == (2, 3)
    with pytest.raises(MismatchError, match="must be the pre-trained model θ_pt, not the fine"):
        msif.score(ft, docs, q)


def test_fine_tune_factors_relabelled_as_pre_train_are_refused(fitted):
    pt, ft, factors, queries = fitted
    forged = dataclasses.replace(factors["ft"], stage="pt")
    with pytest.raises(MismatchError, match=r"fine-tuned model's own weights \(θ_pt = θ_ft"):
        msif.precondition_queries(
            ft, queries, ["a", "b"], ft_factors=factors["ft"], pt_factors=forged
        )


@pytest.mark.parametrize("rank", [None, 2])
def test_queries_round_trip_with_their_tensor_keys(tmp_path, fitted, rank):
    pt, ft, factors, queries = fitted
    pq = msif.precondition_queries(
        ft, queries, ["a", "b"], ft_factors=factors["ft"], pt_factors=factors["pt"], rank=rank
    )
    pq.save(tmp_path)
    suffixes = ("U", "S", "V") if rank else ("W",)
    keys = set(load_file(str(tmp_path / "queries.safetensors")))
    assert keys == {f"{m}.{s}" for m in pq.specs for s in suffixes}
    meta = json.loads((tmp_path / "queries.json").read_text())
    assert set(meta) == {
        "kind",
        "msif_version",
        "sha256",
        "query_ids",
        "method",
        "rank",
        "modules",
        "damping",
        "score_fingerprint",
        "left_out",
        "info",
    }
    back = msif.PreconditionedQueries.load(tmp_path)
    assert (back.query_ids, back.method, back.rank, back.specs) == (
        ["a", "b"],
        "multi-stage",
        rank,
        pq.specs,
    )
    assert back.damping == pq.damping and back.score_fingerprint == pq.score_fingerprint
    for k in pq.specs:
        assert torch.equal(back.weight(k), pq.weight(k))
    data = make_batches(random_examples(3, seed=5), 3)
    # Equal up to rounding: the loaded tensors are contiguous, so BLAS may sum in another order.
    torch.testing.assert_close(
        msif.score(pt, data, back).values, msif.score(pt, data, pq).values, rtol=1e-12, atol=0
    )
