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
from tests.support.tiny import ARCHITECTURES, make_batches, random_examples, tiny_model


def hooked_gradients(model, batches, specs, **kwargs):
    """{module: (N, out, in')} per-sequence Σ_t g_t a_tᵀ from the hooked loop."""
    parts = {k: [] for k in specs}
    for hb in hooked_batches(model, batches, specs, **kwargs):
        for spec, a, g in hb.modules():
            parts[spec.name].append(torch.bmm(g.mT, a))
    return {k: torch.cat(v) for k, v in parts.items()}


LLAMA_LIKE = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
MLP_4H = ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
# Per architecture: what one block's tracked modules are called (the last two name parts).
TRACKED = {
    "gpt_neox": ["attention.query_key_value", "attention.dense", *MLP_4H],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "llama": LLAMA_LIKE,
    "llama_gqa": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "phi": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.dense",
        "mlp.fc1",
        "mlp.fc2",
    ],
    "phi3": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "bloom": ["self_attention.query_key_value", "self_attention.dense", *MLP_4H],
    "falcon": ["self_attention.query_key_value", "self_attention.dense", *MLP_4H],
    "falcon_new": ["self_attention.query_key_value", "self_attention.dense", *MLP_4H],
    "opt": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "0.fc1",
        "0.fc2",
    ],
}


def test_every_tiny_architecture_has_its_expected_modules():
    assert set(TRACKED) == set(ARCHITECTURES)


@pytest.mark.parametrize(("arch", "expected"), TRACKED.items())
def test_tracked_modules_and_hook_gradients_match_autograd(arch, expected):
    model = tiny_model(arch)
    specs = find_modules(model)
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in specs if ".0." in n})
    assert suffixes == sorted(expected)
    assert len(specs) == 2 * len(expected)
    # Gemma 2's 4-token window: the padded-mask reference is NaN on rows with 4 or more pads.
    examples = random_examples(3, seed=9, min_len=6 if arch == "gemma2" else 3)
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


# Per architecture: (head size, {module of block 0: head blocks of G}) under split_heads=True.
SPLITS = {
    "gpt_neox": (8, {"attention.query_key_value": 6}),  # 2 heads × (q, k, v)
    "gpt2": (8, {"attn.c_attn": 6}),
    "bloom": (8, {"self_attention.query_key_value": 6}),
    "llama": (8, {"self_attn.q_proj": 2, "self_attn.k_proj": 2, "self_attn.v_proj": 2}),
    # Grouped-query attention: 4 query heads, 2 key/value heads, head size 4.
    "llama_gqa": (4, {"self_attn.q_proj": 4, "self_attn.k_proj": 2, "self_attn.v_proj": 2}),
    "qwen2": (4, {"self_attn.q_proj": 4, "self_attn.k_proj": 2, "self_attn.v_proj": 2}),
    "mistral": (4, {"self_attn.q_proj": 4, "self_attn.k_proj": 2, "self_attn.v_proj": 2}),
    "gemma2": (4, {"self_attn.q_proj": 4, "self_attn.k_proj": 2, "self_attn.v_proj": 2}),
    # Multi-query: one key/value head, so k and v are one block each.
    "gemma": (8, {"self_attn.q_proj": 2, "self_attn.k_proj": 1, "self_attn.v_proj": 1}),
    "phi": (8, {"self_attn.q_proj": 2, "self_attn.k_proj": 2, "self_attn.v_proj": 2}),
    "phi3": (4, {"self_attn.qkv_proj": 8}),  # 4 q + 2 k + 2 v heads, fused
    "falcon": (8, {"self_attention.query_key_value": 4}),  # 2 q heads + 1 k + 1 v
    "falcon_new": (4, {"self_attention.query_key_value": 8}),  # 2 groups × (2 q + k + v)
    "opt": (8, {"self_attn.q_proj": 2, "self_attn.k_proj": 2, "self_attn.v_proj": 2}),
}


@pytest.mark.parametrize(("arch", "split"), SPLITS.items())
def test_split_heads_splits_every_attention_projection_by_its_heads(arch, split):
    head, blocks = split
    model = tiny_model(arch)
    specs = find_modules(model, ModuleSelection(split_heads=True))
    first = {n.split(".0.", 1)[1]: s for n, s in specs.items() if ".0." in n}
    got = {n: s.num_blocks for n, s in first.items() if n in blocks}
    assert got == blocks
    assert all(first[n].block_size == head for n in blocks)
    # Output projections hold heads on their input side; MLPs hold none: neither is split.
    assert all(s.num_blocks == 1 for n, s in first.items() if n not in blocks)
    assert specs.keys() == find_modules(model).keys()


def test_split_heads_covers_every_architecture():
    assert set(SPLITS) == set(ARCHITECTURES)


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
