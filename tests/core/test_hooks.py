"""Module discovery, and the hooked batch loop against autograd's per-example gradients."""

from __future__ import annotations

import pytest
import torch

import msif
from msif.core.hooks import hooked_batches
from msif.core.modules import ModuleSelection, find_modules, matching_specs, resolve
from msif.data.examples import collate
from msif.errors import MismatchError
from tests.support.dense import per_example_gradients
from tests.support.tiny import make_batches, random_examples, tiny_model


def hooked_gradients(model, batches, specs, **kwargs):
    """{module: (N, out, in')} per-sequence Σ_t g_t a_tᵀ from the hooked loop."""
    parts = {k: [] for k in specs}
    for hb in hooked_batches(model, batches, specs, **kwargs):
        for spec, a, g in hb.modules():
            parts[spec.name].append(torch.bmm(g.mT, a))
    return {k: torch.cat(v) for k, v in parts.items()}


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
    got = hooked_gradients(model, make_batches(examples, 3), specs)
    for k in specs:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11)
    with_head = find_modules(model, ModuleSelection(lm_head=True, embeddings=True))
    assert set(with_head) - set(specs)  # head and embeddings only when asked
    heads = find_modules(model, ModuleSelection(lm_head=True, embeddings=True, include=("^$",)))
    got = hooked_gradients(model, make_batches(examples, 3), heads)
    want = per_example_gradients(model, examples, heads)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight:
        # Tied weights: each module sees its own use; autograd sums both uses.
        (h, e) = sorted(heads, key=lambda n: heads[n].kind != "linear")
        torch.testing.assert_close(got[h] + got[e].transpose(1, 2), want[h], rtol=1e-9, atol=1e-11)
        return
    for k in heads:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11)


def test_sampled_label_gradients_match_autograd_whatever_the_batching():
    model = tiny_model("gpt_neox")
    examples = random_examples(5, seed=3)
    specs = find_modules(model)
    want = per_example_gradients(model, examples, specs, sample=True, seed=4)
    for size in (2, 5):
        got = hooked_gradients(model, make_batches(examples, size), specs, sample=True, seed=4)
        for k in specs:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11)


def test_padding_contributes_nothing():
    model = tiny_model("gpt_neox")
    short = msif.Example("q", [5, 6, 7, 8], [-100, -100, 7, 8])
    long = msif.Example("r", [3, 4, 9, 10, 11, 12, 13], [-100, 4, 9, 10, 11, 12, 13])
    specs = find_modules(model)
    alone = hooked_gradients(model, [collate([short], 0)], specs)
    padded = hooked_gradients(model, [collate([short, long], 0)], specs)
    for k in specs:
        torch.testing.assert_close(padded[k][0], alone[k][0], rtol=1e-10, atol=1e-12)


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


def test_resolve_refuses_and_matching_specs_leaves_out_the_same_modules():
    model = tiny_model("gpt_neox")
    specs = find_modules(model)
    first, second = list(specs)[:2]
    wider = {**specs[first].to_dict(), "in_features": specs[first].in_features + 1}
    changed = {
        **specs,
        first: msif.ModuleSpec.from_dict(wider),
        "no.such.module": msif.ModuleSpec("no.such.module", "linear", 2, 2, False, 2),
    }
    kept, left_out = matching_specs(model, changed)
    assert set(kept) == set(specs) - {first}
    assert left_out == {
        first: f"shape {(48, 16)} differs from {(48, 18)}",
        "no.such.module": "absent from the model",
    }
    with pytest.raises(MismatchError, match=r"has shape \(48, 16\) here but \(48, 17\)"):
        resolve(model, [changed[first]])
    with pytest.raises(MismatchError, match="'no.such.module' of the artifact is not in"):
        resolve(model, [changed["no.such.module"]])
    assert list(resolve(model, [specs[second]])) == [second]


def test_hooks_leave_the_model_as_they_found_it():
    model = tiny_model("gpt_neox").train()
    flags = [p.requires_grad for p in model.parameters()]
    batches = make_batches(random_examples(10, seed=7), 5)
    for _ in hooked_batches(model, batches, find_modules(model)):
        break  # an abandoned loop cleans up too
    for hb in hooked_batches(model, batches, find_modules(model), sample=True):
        assert not model.training  # dropout off while hooked
        assert hb.labels.shape == hb.batch["labels"].shape
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert model.training
