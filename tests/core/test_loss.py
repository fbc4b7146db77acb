"""Sequence losses over scored positions and labels sampled from the model."""

from __future__ import annotations

import torch

from msif.core.loss import sample_labels, sequence_losses
from tests.support.tiny import tiny_model


def test_prompt_tokens_are_not_scored():
    # Hand-worked: ids [5, 6, 7, 8] with the prompt [5, 6] masked scores only 7 and 8.
    model = tiny_model("gpt_neox")
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100, -100, 7, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    logp = torch.log_softmax(logits[0], -1)
    by_hand = -(logp[1, 7] + logp[2, 8])
    torch.testing.assert_close(sequence_losses(logits, labels)[0], by_hand)


def test_sampled_labels_follow_the_model_distribution():
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
