"""Sequence losses: sums over scored positions, with labels shifted exactly once."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from msif.core.device import to

IGNORE = -100
# Label sampling turns this many logits at a time into float64 probabilities.
SAMPLE_CHUNK_ELEMENTS = 1 << 24


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool (B, T) mask of the positions whose output predicts a scored next token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p(x_t | x_<t) of every token t ≥ 1, 0 where unscored; shape (B, T − 1).

    Entry t − 1 is token t's loss, predicted from the logits at position t − 1.
    """
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float()
        if logits.dtype in (torch.float16, torch.bfloat16)
        else logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    return token_loss.view(targets.shape)


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of -log p(x_t | x_<t) over scored tokens; shape (B,)."""
    return token_losses(logits, labels).sum(dim=1)


def sequence_seed(seed: int, input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """A seed fixed by the sequence's content, so sampling ignores batching and sharding."""
    keep = labels != IGNORE
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(input_ids.detach().to("cpu", torch.int64).numpy().tobytes())
    h.update(keep.detach().to("cpu", torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def sample_labels(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution at the scored positions.

    The seeds, positions and uniforms come from input_ids, labels and attention_mask on the
    host (pass the host batch: nothing is then read back from the device); the draws are
    made where the logits are, a chunk of positions at a time. Returned on the logits' device.
    """
    ids, labels_h, mask_h = (x.detach().cpu() for x in (input_ids, labels, attention_mask))
    b, t = labels_h.shape
    sampled = torch.full((b, t), IGNORE, dtype=labels.dtype, device=logits.device)
    scored = scored_positions(labels_h)
    flat, uniforms = [], []
    for n in range(b):
        pos = scored[n].nonzero().squeeze(1)
        if pos.numel() == 0:
            continue
        real = mask_h[n].bool()
        s = sequence_seed(seed, ids[n][real], labels_h[n][real])
        # Uniforms drawn on the CPU: a CUDA generator would give GPU shards other labels.
        gen = torch.Generator().manual_seed(s)
        uniforms.append(torch.rand(pos.numel(), 1, generator=gen, dtype=torch.float64))
        flat.append(n * t + pos)
    if not flat:
        return sampled
    rows = to(torch.cat(flat), logits.device)
    u = to(torch.cat(uniforms), logits.device)
    step = max(1, SAMPLE_CHUNK_ELEMENTS // logits.shape[-1])
    with torch.no_grad():
        table = logits.reshape(b * t, -1)
        for i in range(0, rows.shape[0], step):
            r = rows[i : i + step]
            probs = torch.softmax(table.index_select(0, r).double(), dim=-1)
            draw = _inverse_cdf_draw(probs, u[i : i + step])
            sampled.view(-1).index_copy_(0, r + 1, draw.to(sampled.dtype))
    return sampled


def _inverse_cdf_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One categorical draw per row by inverse CDF, u (rows, 1) uniforms (torch.multinomial is
    slow on wide rows)."""
    cdf = probs.cumsum(-1)
    u = u.to(probs)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=probs.shape[-1] - 1)
