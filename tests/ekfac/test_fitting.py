"""Shard additivity, determinism, masking, artifacts and architectures of the core library."""

from __future__ import annotations

import json

import pytest
import torch

import msif
from msif.core.hooks import capture, frozen
from msif.core.loss import sequence_losses
from msif.core.modules import ModuleSelection, find_modules
from msif.core.passes import gradient_pass
from msif.data.examples import collate
from msif.ekfac.covariance import CovarianceSums, gram
from msif.ekfac.lambdas import LambdaSums
from msif.errors import MismatchError, MsifError
from tests.support.dense import per_example_gradients
from tests.support.tiny import make_batches, perturbed, random_examples, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt_neox")


@pytest.fixture(scope="module")
def examples():
    return random_examples(10, seed=7)


def test_covariance_and_lambda_are_additive_over_shards(model, examples):
    whole = msif.fit_covariance(model, make_batches(examples, 4))
    parts = [
        msif.fit_covariance(model, make_batches(examples[:3], 2)),
        msif.fit_covariance(model, make_batches(examples[3:], 5)),
    ]
    total = parts[0] + parts[1]
    assert (total.num_tokens, total.num_sequences) == (whole.num_tokens, whole.num_sequences)
    for k in whole.specs:
        torch.testing.assert_close(total.activation[k], whole.activation[k])
        torch.testing.assert_close(total.gradient[k], whole.gradient[k])
    basis = msif.eigendecompose(whole, dtype=torch.float64)
    lam_whole = msif.fit_lambda(model, make_batches(examples, 4), basis)
    lam_sum = msif.fit_lambda(model, make_batches(examples[:6], 3), basis) + msif.fit_lambda(
        model, make_batches(examples[6:], 4), basis
    )
    for k in whole.specs:
        torch.testing.assert_close(lam_sum.sums[k], lam_whole.sums[k])


def test_same_seed_same_bits_other_seed_other_samples(model, examples):
    data = make_batches(examples, 4)
    a = msif.fit_covariance(model, data, seed=3)
    b = msif.fit_covariance(model, data, seed=3)
    c = msif.fit_covariance(model, data, seed=4)
    name = next(iter(a.specs))
    assert torch.equal(a.gradient[name], b.gradient[name])
    assert not torch.equal(a.gradient[name], c.gradient[name])
    assert torch.equal(a.activation[name], c.activation[name])  # inputs do not depend on labels


def test_factors_applied_twice_give_identical_results(model, examples):
    data = make_batches(examples, 5)
    basis = msif.eigendecompose(msif.fit_covariance(model, data), dtype=torch.float64)
    factors = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    queries = make_batches(random_examples(2, seed=8, prompt=True), 2)
    p1 = msif.precondition_queries(
        model, queries, ["a", "b"], method="single-stage", ft_factors=_as_stage(factors, "ft")
    )
    p2 = msif.precondition_queries(
        model, queries, ["a", "b"], method="single-stage", ft_factors=_as_stage(factors, "ft")
    )
    for k in p1.dense:
        assert torch.equal(p1.dense[k], p2.dense[k])


def _as_stage(factors, stage):
    factors.stage = stage
    return factors


def test_mismatched_partial_sums_are_refused(model, examples):
    data = make_batches(examples, 5)
    a = msif.fit_covariance(model, data)
    other = msif.fit_covariance(perturbed(model), data)
    with pytest.raises(MismatchError, match="different models"):
        a + other
    fewer = msif.fit_covariance(model, data, modules=ModuleSelection(exclude=("mlp",)))
    with pytest.raises(MismatchError, match="different modules"):
        a + fewer


def test_prompt_and_padding_contribute_nothing(model):
    # Hand-worked: ids [5, 6, 7, 8] with the prompt [5, 6] masked scores only 7 and 8.
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100, -100, 7, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    logp = torch.log_softmax(logits[0], -1)
    by_hand = -(logp[1, 7] + logp[2, 8])
    torch.testing.assert_close(sequence_losses(logits, labels)[0], by_hand)

    short = msif.Example("q", [5, 6, 7, 8], [-100, -100, 7, 8])
    long = msif.Example("r", [3, 4, 9, 10, 11, 12, 13], [-100, 4, 9, 10, 11, 12, 13])
    specs = find_modules(model)
    alone = msif.query_gradients(model, [collate([short], 0)], specs)
    padded = msif.query_gradients(model, [collate([short, long], 0)], specs)
    for k in specs:
        torch.testing.assert_close(padded[k][0], alone[k][0], rtol=1e-10, atol=1e-12)
    # Token-level: masked and padded positions get no scored-token weight in the covariance.
    cov_pad = msif.fit_covariance(model, [collate([short, long], 0)])
    cov_sep = msif.fit_covariance(model, [collate([short], 0)]) + msif.fit_covariance(
        model, [collate([long], 0)]
    )
    assert cov_pad.num_tokens == 2 + 6  # long: labels at positions 1..6
    for k in specs:
        torch.testing.assert_close(cov_pad.activation[k], cov_sep.activation[k])


@pytest.mark.parametrize(
    "arch,expected",
    [
        (
            "gpt_neox",
            [
                "attention.query_key_value",
                "attention.dense",
                "mlp.dense_h_to_4h",
                "mlp.dense_4h_to_h",
            ],
        ),
        ("gpt2", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        (
            "llama",
            [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ],
        ),
        (
            "bloom",
            [
                "self_attention.query_key_value",
                "self_attention.dense",
                "mlp.dense_h_to_4h",
                "mlp.dense_4h_to_h",
            ],
        ),
    ],
)
def test_tracked_modules_and_hook_gradients_match_autograd(arch, expected):
    model = tiny_model(arch)
    specs = find_modules(model)
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in specs})
    assert suffixes == sorted(expected)
    assert len(specs) == 2 * len(expected)
    examples = random_examples(3, seed=9)
    want = per_example_gradients(model, examples, specs)
    got = msif.query_gradients(model, make_batches(examples, 3), specs)
    for k in specs:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11)
    with_head = find_modules(model, ModuleSelection(lm_head=True, embeddings=True))
    assert set(with_head) - set(specs)  # head and embeddings only when asked
    heads = find_modules(model, ModuleSelection(lm_head=True, embeddings=True, include=("^$",)))
    got = msif.query_gradients(model, make_batches(examples, 3), heads)
    want = per_example_gradients(model, examples, heads)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight:
        # Tied weights: each module sees its own use; autograd sums both uses.
        (h, e) = sorted(heads, key=lambda n: heads[n].kind != "linear")
        torch.testing.assert_close(got[h] + got[e].transpose(1, 2), want[h], rtol=1e-9, atol=1e-11)
        return
    for k in heads:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11)


def test_split_heads_on_fused_projections():
    for arch, name in [
        ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value"),
        ("gpt2", "transformer.h.0.attn.c_attn"),
        ("bloom", "transformer.h.0.self_attention.query_key_value"),
    ]:
        specs = find_modules(tiny_model(arch), ModuleSelection(split_heads=True))
        assert (specs[name].block_size, specs[name].num_blocks) == (8, 6)
        others = [s for n, s in specs.items() if n != name and "layers.0" in n]
        assert all(s.num_blocks == 1 for s in others)


def test_factors_round_trip_and_refuse_wrong_model(tmp_path, model, examples):
    data = make_batches(examples, 5)
    basis = msif.eigendecompose(msif.fit_covariance(model, data))
    factors = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    factors.save(tmp_path / "f")
    loaded = msif.Factors.load(tmp_path / "f", model=model, stage="pt")
    for k in factors.specs:
        assert torch.equal(loaded.lambdas[k], factors.lambdas[k])
        assert torch.equal(loaded.gradient_eigvecs[k], factors.gradient_eigvecs[k])
    meta = json.loads((tmp_path / "f" / "factors.json").read_text())
    assert meta["stage"] == "pt" and meta["fingerprint"] and meta["msif_version"]
    with pytest.raises(MismatchError, match="other model weights"):
        msif.Factors.load(tmp_path / "f", model=perturbed(model))
    with pytest.raises(MismatchError, match="another model architecture|not in this model"):
        msif.Factors.load(tmp_path / "f", model=tiny_model("gpt2"))
    with pytest.raises(MismatchError, match="expected 'ft'"):
        msif.Factors.load(tmp_path / "f", stage="ft")
    blob = tmp_path / "f" / "factors.safetensors"
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(MsifError, match="corrupt"):
        msif.Factors.load(tmp_path / "f")
    with pytest.raises(MsifError, match="not a factors artifact"):
        msif.Factors.load(tmp_path / "nothing")


def test_partial_sums_round_trip(tmp_path, model, examples):
    cov = msif.fit_covariance(model, make_batches(examples, 5))
    cov.save(tmp_path / "c")
    back = CovarianceSums.load(tmp_path / "c")
    assert back.num_tokens == cov.num_tokens and back.specs == cov.specs
    basis = msif.eigendecompose(back)
    basis.save(tmp_path / "e")
    lam = msif.fit_lambda(model, make_batches(examples, 5), msif.Eigenbasis.load(tmp_path / "e"))
    lam.save(tmp_path / "l")
    assert torch.equal(
        LambdaSums.load(tmp_path / "l").sums[next(iter(cov.specs))], lam.sums[next(iter(cov.specs))]
    )
    with pytest.raises(MismatchError, match="holds a 'covariance' artifact"):
        _rename(tmp_path / "c", "covariance", "lambda")
        LambdaSums.load(tmp_path / "c")


def _rename(directory, old, new):
    for ext in ("safetensors", "json"):
        (directory / f"{old}.{ext}").rename(directory / f"{new}.{ext}")


def test_scoring_refuses_queries_made_for_another_corpus_model(model, examples):
    data = make_batches(examples, 5)
    ft = perturbed(model)
    fits = {}
    for stage, m in (("pt", model), ("ft", ft)):
        basis = msif.eigendecompose(msif.fit_covariance(m, data, stage=stage))
        fits[stage] = msif.Factors.build(basis, msif.fit_lambda(m, data, basis))
    q = make_batches(random_examples(2, seed=1, prompt=True), 2)
    pq = msif.precondition_queries(ft, q, ["a", "b"], ft_factors=fits["ft"], pt_factors=fits["pt"])
    with pytest.raises(MismatchError, match="corpus model"):
        msif.score(ft, data, pq)
    with pytest.raises(MismatchError, match="fine-tune factors"):
        msif.precondition_queries(
            model, q, ["a", "b"], ft_factors=fits["ft"], pt_factors=fits["pt"]
        )


def test_module_left_out_when_missing_from_pre_training_factors(model, examples):
    data = make_batches(examples, 5)
    ft = perturbed(model)
    basis = msif.eigendecompose(
        msif.fit_covariance(
            model, data, stage="pt", modules=ModuleSelection(exclude=(r"layers\.1\.mlp",))
        )
    )
    fpt = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    basis = msif.eigendecompose(msif.fit_covariance(ft, data, stage="ft"))
    fft = msif.Factors.build(basis, msif.fit_lambda(ft, data, basis))
    pq = msif.precondition_queries(
        ft,
        make_batches(random_examples(1, 2, prompt=True), 1),
        ["q"],
        ft_factors=fft,
        pt_factors=fpt,
    )
    assert set(pq.left_out) == {
        "gpt_neox.layers.1.mlp.dense_h_to_4h",
        "gpt_neox.layers.1.mlp.dense_4h_to_h",
    }
    scores = msif.score(model, data, pq)
    assert scores.left_out == pq.left_out and len(scores.modules) == 6


def test_hooks_leave_the_model_as_they_found_it(model, examples):
    flags = [p.requires_grad for p in model.parameters()]
    with frozen(model), capture(model, find_modules(model)) as cap:
        gradient_pass(model, make_batches(examples, 5)[0], cap)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_sampled_labels_follow_the_model_distribution():
    from msif.core.loss import sample_labels

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3]])
    labels = torch.tensor([[1, 2, 3]])
    mask = torch.ones_like(ids)
    counts = torch.zeros(2, 5, dtype=torch.float64)
    for seed in range(4000):
        drawn = sample_labels(logits, ids, labels, mask, seed)
        assert drawn[0, 0] == -100  # the first token is never predicted
        counts[0, drawn[0, 1]] += 1
        counts[1, drawn[0, 2]] += 1
    expected = torch.softmax(logits[0, :2], -1)
    assert (counts / 4000 - expected).abs().max() < 0.03


@pytest.mark.parametrize("shape", [(7, 5), (40, 300), (3, 33, 517)])
def test_gram_equals_the_plain_product(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = gram(x, leaf=64)  # 300 and 517 recurse three levels down
    torch.testing.assert_close(got, x.mT @ x, rtol=1e-12, atol=1e-12)
