"""The split of a score by predicted token against one autograd backward per token."""

from __future__ import annotations

import logging

import pytest
import torch

import msif
from msif.attribution.explain import predicted_token_scores
from msif.attribution.precondition import PreconditionedQueries
from msif.core.loss import IGNORE
from msif.core.modules import ModuleSelection, find_modules
from msif.errors import MsifError
from msif.nodes.score_corpus import check_token_sum, sum_tolerance
from tests.support.dense import per_example_gradients
from tests.support.tiny import make_batches, random_examples, tiny_model


def random_queries(model, num_queries=2, rank=3, selection=None, seed=0) -> PreconditionedQueries:
    """Random W_q: every other module low-rank U S Vᵀ, the others dense."""
    specs = find_modules(model, selection)
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype

    def randn(*shape):
        return torch.randn(num_queries, *shape, generator=gen, dtype=dtype)

    dense, lowrank = {}, {}
    for i, (name, spec) in enumerate(specs.items()):
        if i % 2:
            dense[name] = randn(*spec.shape)
        else:
            s = torch.rand(num_queries, rank, generator=gen, dtype=dtype)
            lowrank[name] = (randn(spec.out_features, rank), s, randn(spec.in_dim, rank))
    ids = [f"q{i}" for i in range(num_queries)]
    return PreconditionedQueries(ids, "gradient-dot", specs, dense, lowrank)


def per_token_reference(model, example, queries, q: int) -> list[float]:
    """⟨W_q, ∇θ ℓ_i⟩ over the tracked modules, one backward per token i (0 where unscored)."""
    n = len(example.input_ids)
    out = [0.0] * n
    scored = [i for i in range(1, n) if example.labels[i] != IGNORE]
    copies = [
        msif.Example(
            f"t{i}", example.input_ids, [IGNORE] * i + [example.labels[i]] + [IGNORE] * (n - i - 1)
        )
        for i in scored
    ]
    grads = per_example_gradients(model, copies, queries.specs)
    for j, i in enumerate(scored):
        out[i] = sum(float((queries.weight(k)[q] * grads[k][j]).sum()) for k in queries.specs)
    return out


# Biased linears (gpt_neox), none (llama), GPT-2's transposed Conv1D, OPT's flattened (B·T, d)
# inputs, BLOOM (whose custom GELU has no forward derivative: the double-backward fallback).
@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2", "opt", "bloom"])
def test_token_scores_equal_one_backward_per_token(arch, caplog):
    model = tiny_model(arch)
    queries = random_queries(model)
    assert queries.dense and queries.lowrank
    assert any(s.has_bias for s in queries.specs.values()) == (arch != "llama")
    docs = random_examples(4, seed=5, prompt=True)  # 3 to 9 tokens: padded batches
    pairs = [(0, docs[0]), (1, docs[1]), (0, docs[2]), (1, docs[3]), (1, docs[0])]
    with caplog.at_level(logging.INFO, logger="msif"):
        got = predicted_token_scores(model, pairs, queries, batch_size=3)
    assert ("by double backward" in caplog.text) == (arch == "bloom")
    scores = msif.score(model, make_batches(docs, 4), queries).values
    for (q, doc), s in zip(pairs, got, strict=True):
        want = per_token_reference(model, doc, queries, q)
        scale = max(abs(v) for v in want)
        assert len(s) == len(doc.input_ids) and s[0] == 0.0
        # Prompt tokens predict nothing scored: exactly 0.
        assert all(s[i] == 0.0 for i, label in enumerate(doc.labels) if label == IGNORE)
        # Llama-style rotary embeddings are computed in float32 even in a float64 model.
        assert s == pytest.approx(want, rel=1e-6, abs=1e-6 * scale)
        score = float(scores[q, docs.index(doc)])
        assert sum(s) == pytest.approx(score, rel=1e-6, abs=1e-6 * scale)


def test_forward_mode_and_double_backward_agree():
    model = tiny_model("gpt_neox")
    queries = random_queries(model, rank=2, seed=3)
    pairs = [(q, d) for q, d in enumerate(random_examples(2, seed=7, min_len=6))]
    forward = predicted_token_scores(model, pairs, queries)
    backward = predicted_token_scores(model, pairs, queries, mode="double-backward")
    for f, b in zip(forward, backward, strict=True):
        assert f == pytest.approx(b, rel=1e-10, abs=1e-10 * max(map(abs, b)))
    with pytest.raises(ValueError, match="mode must be one of"):
        predicted_token_scores(model, pairs, queries, mode="reverse")


def test_tied_embeddings_are_two_modules_as_in_scoring():
    # GPT-2's wte is also its lm_head: each use is its own module with its own W_q.
    model = tiny_model("gpt2")
    selection = ModuleSelection(embeddings=True, lm_head=True)
    queries = random_queries(model, selection=selection, seed=2)
    assert {"transformer.wte", "lm_head"} <= set(queries.specs)
    docs = random_examples(3, seed=8)
    got = predicted_token_scores(model, [(1, d) for d in docs], queries)
    scores = msif.score(model, make_batches(docs, 3), queries).values[1]
    for s, want in zip(got, scores.tolist(), strict=True):
        assert sum(s) == pytest.approx(want, rel=1e-9, abs=1e-9 * max(map(abs, s)))


def test_a_split_that_misses_the_score_is_refused():
    check_token_sum([0.0, 0.75, -0.25], 0.5, 1e-3, "document 'd' on query 'q'")
    # A score near 0 may be the sum of large terms: the scale is Σ|s_i|.
    check_token_sum([0.0, 1e3, -1e3 + 1e-4], 0.0, 1e-3, "d")
    with pytest.raises(
        MsifError,
        match=r"^per-token scores of document 'd' on query 'q' sum to \+5\.000000e-01, not to "
        r"its score \+7\.500000e-01 \(tolerance 0\.001 of 7\.500e-01\)",
    ):
        check_token_sum([0.0, 0.25, 0.25], 0.75, 1e-3, "document 'd' on query 'q'")
    with pytest.raises(MsifError, match=r"sum to \+nan, not to its score"):
        check_token_sum([0.0, float("nan")], 0.75, 1e-3, "d")
    assert sum_tolerance(torch.float32) == 1e-3 and sum_tolerance(torch.bfloat16) == 5e-2
