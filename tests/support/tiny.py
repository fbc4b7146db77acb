"""Tiny Hugging Face causal LMs built from configs (no download) and random batches."""

from __future__ import annotations

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from msif.data.examples import Example, collate

VOCAB = 29


def tiny_model(arch: str = "gpt_neox", seed: int = 0, dtype=torch.float64):
    """A 2-layer model with hidden 16 and 2 heads (head size 8) in eval mode."""
    torch.manual_seed(seed)
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=64,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=24,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "bloom":
        cfg = BloomConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            n_layer=2,
            n_head=2,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        model = BloomForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy of model with every weight nudged: a stand-in for a fine-tuned model."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


def random_examples(
    n: int, seed: int, min_len: int = 3, max_len: int = 9, prompt: bool = False
) -> list[Example]:
    """Random token sequences; with prompt=True the first tokens are masked."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        labels = list(ids)
        if prompt:
            cut = int(torch.randint(1, length - 1, (1,), generator=gen))
            labels[:cut] = [-100] * cut
        out.append(Example(f"ex{seed}-{i}", ids, labels))
    return out


def make_batches(examples: list[Example], batch_size: int) -> list[dict]:
    """Collate into right-padded batches (pad id 0)."""
    return [collate(examples[i : i + batch_size], 0) for i in range(0, len(examples), batch_size)]
