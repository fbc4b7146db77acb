"""A minute-free mini world for CLI tests: random word documents, a trained word-level
tokenizer and untrained tiny GPT-NeoX models saved with save_pretrained."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(40)]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def tokenizer_for(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer trained on texts, with pad/eos tokens."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"])
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def save_model(
    path: Path,
    tokenizer,
    seed: int,
    vocab: int | None = None,
    base: GPTNeoXForCausalLM | None = None,
) -> GPTNeoXForCausalLM:
    """Save a tiny GPT-NeoX (or a nudged copy of base) with the tokenizer."""
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    model = GPTNeoXForCausalLM(cfg)
    if base is not None:
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def build(root: Path, num_docs: int = 12, seed: int = 0) -> dict[str, str]:
    """Write corpus, fine-tune data, queries and pt/ft models under root."""
    rng = random.Random(seed)
    docs = [_sentence(rng, rng.randint(4, 10)) for _ in range(num_docs)]
    corpus = pa.table({"id": [f"doc-{i:03d}" for i in range(num_docs)], "text": docs})
    pairs = pa.table(
        {
            "prompt": [_sentence(rng, 3) for _ in range(8)],
            "completion": [" " + _sentence(rng, 2) for _ in range(8)],
        }
    )
    queries = pa.table(
        {
            "id": ["q0", "q1", "q2"],
            "prompt": [_sentence(rng, 3) for _ in range(3)],
            "completion": [" " + _sentence(rng, 2) for _ in range(3)],
            "relevant_ids": [["doc-001"], ["doc-002", "doc-005"], []],
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    paths = {k: str(root / f"{k}.parquet") for k in ("corpus", "finetune", "queries")}
    pq.write_table(corpus, paths["corpus"], row_group_size=5)
    pq.write_table(pairs, paths["finetune"])
    pq.write_table(queries, paths["queries"])
    tok = tokenizer_for(docs + [" ".join(WORDS)])
    base = save_model(root / "pt_model", tok, seed)
    save_model(root / "ft_model", tok, seed + 1, base=base)
    paths.update(pt_model=str(root / "pt_model"), ft_model=str(root / "ft_model"))
    return paths
