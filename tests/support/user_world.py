"""A user's own setup, built offline: a tiny Llama base with a chat template, a LoRA adapter
fine-tune of it, a Parquet corpus and chat data (fine-tuning data and queries) in `datasets`
folders."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.support.mini_world import WORDS, tokenizer_for

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
ROLES = ["<system>", "<user>", "<assistant>"]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _chat(rng: random.Random) -> list[dict]:
    return [
        {"role": "user", "content": _sentence(rng, 3)},
        {"role": "assistant", "content": _sentence(rng, 2)},
    ]


def build_user_world(root: Path, seed: int = 0) -> dict[str, str]:
    """Write base/ (Llama + tokenizer with a chat template), adapter/ (LoRA), corpus.parquet,
    finetune/ and queries/ (`datasets` save_to_disk folders with a `messages` column)."""
    import datasets
    from peft import LoraConfig, get_peft_model

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = [_sentence(rng, rng.randint(4, 10)) for _ in range(12)]
    pq.write_table(
        pa.table({"id": [f"d{i}" for i in range(12)], "body": docs}), root / "corpus.parquet"
    )
    tok = tokenizer_for(docs + [" ".join(WORDS + ROLES)])
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=24,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    lora = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora.save_pretrained(root / "adapter")
    for name, n in (("finetune", 8), ("queries", 3)):
        rows = {"messages": [_chat(rng) for _ in range(n)]}
        if name == "queries":
            rows["id"] = [f"q{i}" for i in range(n)]
            rows["relevant_ids"] = [["d1"], ["d2", "d5"], []]
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(root / name)
    return {
        "base": str(root / "base"),
        "adapter": str(root / "adapter"),
        "corpus": str(root / "corpus.parquet"),
        "finetune": str(root / "finetune"),
        "queries": str(root / "queries"),
    }
