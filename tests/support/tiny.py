"""Tiny Hugging Face causal LMs built from configs (no download) and random batches."""

from __future__ import annotations

import torch
import transformers as tf

from msif.data.examples import Example, collate

VOCAB = 29
_BLOCK = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2}
_GQA = {**_BLOCK, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24}
_POS = {"max_position_embeddings": 64}
_SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_NO_DROPOUT_HF = {"hidden_dropout": 0.0, "attention_dropout": 0.0}

# Architecture → (config class, model class, config fields). Every model has hidden width 16
# and 2 layers; where an architecture has grouped-query attention it gets 4 query heads over
# 2 key/value heads (head size 4), else 2 heads of size 8.
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {**_BLOCK, **_POS, **_NO_DROPOUT_HF, "num_attention_heads": 2, "intermediate_size": 24},
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "vocab_size": VOCAB,
            "n_embd": 16,
            "n_layer": 2,
            "n_head": 2,
            "n_positions": 64,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            **_BLOCK,
            **_POS,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "intermediate_size": 24,
        },
    ),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", {**_GQA, **_POS, **_SPECIAL}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_GQA, **_POS, **_SPECIAL}),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {**_GQA, **_POS, **_SPECIAL, "sliding_window": 4},
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        {
            **_GQA,
            **_POS,
            **_SPECIAL,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
        },
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # A 4-token window makes the sliding layer differ from the global one on 9 tokens.
        {
            **_GQA,
            **_POS,
            **_SPECIAL,
            "head_dim": 4,
            "sliding_window": 4,
            "query_pre_attn_scalar": 4,
        },
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        {
            **_BLOCK,
            **_POS,
            **_SPECIAL,
            "num_attention_heads": 2,
            "intermediate_size": 24,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attention_dropout": 0.0,
        },
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            **_GQA,
            **_POS,
            **_SPECIAL,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attention_dropout": 0.0,
        },
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {"vocab_size": VOCAB, "hidden_size": 16, "n_layer": 2, "n_head": 2, **_NO_DROPOUT_HF},
    ),
    # Falcon-7B's layout: multi-query attention, attention and MLP in parallel.
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            **_BLOCK,
            **_NO_DROPOUT_HF,
            **_SPECIAL,
            "num_attention_heads": 2,
            "multi_query": True,
            "parallel_attn": True,
            "new_decoder_architecture": False,
            "ffn_hidden_size": 24,
        },
    ),
    # Falcon-40B's: grouped key/value heads fused per group into query_key_value.
    "falcon_new": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            **_BLOCK,
            **_NO_DROPOUT_HF,
            **_SPECIAL,
            "num_attention_heads": 4,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
            "ffn_hidden_size": 24,
        },
    ),
    # OPT flattens the batch to (B·T, d) around fc1 and fc2.
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            **_BLOCK,
            **_POS,
            "num_attention_heads": 2,
            "ffn_dim": 24,
            "word_embed_proj_dim": 16,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
    ),
}


def tiny_config(arch: str):
    """The transformers config of a tiny architecture."""
    if arch not in ARCHITECTURES:
        raise ValueError(arch)
    config_cls, _, fields = ARCHITECTURES[arch]
    return getattr(tf, config_cls)(**fields)


def tiny_model(arch: str = "gpt_neox", seed: int = 0, dtype=torch.float64):
    """A 2-layer model with hidden 16 (see ARCHITECTURES) in eval mode."""
    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = getattr(tf, ARCHITECTURES[arch][1])(config)
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
