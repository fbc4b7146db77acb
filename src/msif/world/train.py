"""Pre-training and fine-tuning the fact world's tiny GPT-NeoX, and measuring what it learned.

Sequences are tokenised with msif.data.examples exactly as the pipeline tokenises them, so the
losses the model was trained on are the losses the influence functions differentiate.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif.core.loss import IGNORE, sequence_losses
from msif.data.examples import (
    Example,
    collate,
    pad_id_of,
    tokenize_documents,
    tokenize_prompt_completion,
)
from msif.world.config import WorldConfig, WorldConfigError

log = logging.getLogger("msif")
FT_OBJECTIVE = (
    "mean over examples of the summed completion-token NLL + alpha/2 * ||theta - theta_pt||^2"
)
PT_OBJECTIVE = "mean next-token NLL over all document tokens"


@dataclass(frozen=True)
class TrainStats:
    """What one training stage did."""

    epochs: int
    steps: int
    tokens: int
    seconds: float
    final_loss: float

    @property
    def tokens_per_second(self) -> float:
        """Scored tokens processed per second."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "scored_tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "final_loss": round(self.final_loss, 5),
        }


def make_model(config: WorldConfig, tokenizer) -> GPTNeoXForCausalLM:
    """A freshly initialised GPT-NeoX sized by config, seeded by config.seed."""
    torch.manual_seed(config.seed)
    model_config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_length,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPTNeoXForCausalLM(model_config)


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def run_epochs(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    warmup_fraction: float,
    seed: int,
    desc: str,
    progress: bool,
) -> TrainStats:
    """Shuffled minibatch training (seeded shuffles); logs throughput at the end."""
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(epochs * steps_per_epoch, warmup_fraction)
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start, tokens, steps, last = time.perf_counter(), 0, 0, float("nan")
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(len(examples), generator=generator).tolist()
        total = 0.0
        for i in range(0, len(order), batch_size):
            batch = collate([examples[j] for j in order[i : i + batch_size]], pad_id)
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Clipping keeps the early, large-lr steps of a tiny model from diverging.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item()
            steps += 1
            tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
        last = total / steps_per_epoch
        bar.set_postfix(loss=f"{last:.4f}")
    model.eval()
    stats = TrainStats(epochs, steps, tokens, time.perf_counter() - start, last)
    log.info(
        "%s: %d epochs, %d steps in %.1fs (%.0f tokens/s), final loss %.4f",
        desc,
        epochs,
        steps,
        stats.seconds,
        stats.tokens_per_second,
        last,
    )
    return stats


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def token_mean_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token NLL over the batch's scored tokens."""
    count = (batch["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
    return sequence_losses(_logits(model, batch), batch["labels"]).sum() / count


def pretrain(
    config: WorldConfig, tokenizer, corpus: pa.Table, progress: bool = True
) -> tuple[GPTNeoXForCausalLM, TrainStats]:
    """A new model trained on the corpus documents (causal LM, AdamW, seeded)."""
    model = make_model(config, tokenizer)
    ids, texts = corpus.column("id").to_pylist(), corpus.column("text").to_pylist()
    for doc_id, enc in zip(ids, tokenizer(texts)["input_ids"], strict=True):
        if len(enc) > config.max_length:
            # Truncation would train on half facts the queries' relevant_ids still point to.
            raise WorldConfigError(
                f"document {doc_id} has {len(enc)} tokens, more than max_length {config.max_length}"
            )
    examples = tokenize_documents(tokenizer, ids, texts, config.max_length)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.pt_lr, weight_decay=config.pt_weight_decay
    )
    stats = run_epochs(
        model,
        examples,
        pad_id_of(tokenizer),
        token_mean_loss,
        optimizer,
        config.pt_epochs,
        config.pt_batch_size,
        config.warmup_fraction,
        config.seed,
        "pre-train",
        progress,
    )
    return model, stats


def proximal_loss(
    alpha: float, reference: list[torch.Tensor]
) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """The fine-tuning objective (FT_OBJECTIVE) for parameters anchored at reference."""

    def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        loss = sequence_losses(_logits(model, batch), batch["labels"]).mean()
        if alpha:
            params = zip(model.parameters(), reference, strict=True)
            drift = sum(((p - r) ** 2).sum() for p, r in params)
            loss = loss + 0.5 * alpha * drift
        return loss

    return loss_fn


def finetune(
    pt_model: GPTNeoXForCausalLM,
    tokenizer,
    pairs: pa.Table,
    config: WorldConfig,
    progress: bool = True,
) -> tuple[GPTNeoXForCausalLM, TrainStats]:
    """A copy of pt_model fully fine-tuned on (prompt, completion) pairs; pt_model is untouched.

    Only completion tokens are scored; weight decay is off, because the proximity term
    alpha/2 |theta - theta_pt|^2 is the only regulariser the multi-stage influence assumes.
    """
    model = copy.deepcopy(pt_model)
    reference = [p.detach().clone() for p in pt_model.parameters()]
    prompts = pairs.column("prompt").to_pylist()
    examples = tokenize_prompt_completion(
        tokenizer,
        [f"ft-{i}" for i in range(len(prompts))],
        prompts,
        pairs.column("completion").to_pylist(),
        config.max_length,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.ft_lr, weight_decay=0.0)
    stats = run_epochs(
        model,
        examples,
        pad_id_of(tokenizer),
        proximal_loss(config.alpha, reference),
        optimizer,
        config.ft_epochs,
        config.ft_batch_size,
        config.warmup_fraction,
        config.seed + 1,
        "fine-tune",
        progress,
    )
    return model, stats


@torch.no_grad()
def completion_matches(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 64,
) -> list[bool]:
    """Per row, whether greedy decoding after the prompt reproduces the whole completion.

    Teacher-forced argmax over the completion tokens equals greedy decoding for exact match:
    greedy output diverges exactly at the first position where the argmax is wrong.
    """
    max_length = model.config.max_position_embeddings
    ids = [f"row-{i}" for i in range(len(prompts))]
    examples = tokenize_prompt_completion(tokenizer, ids, prompts, completions, max_length)
    model.eval()
    out: list[bool] = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id_of(tokenizer))
        predicted = _logits(model, batch).argmax(-1)[:, :-1]
        targets = batch["labels"][:, 1:]
        scored = targets != IGNORE
        out += ((predicted == targets) | ~scored).all(dim=1).tolist()
    return out


def evaluate_accuracy(model: torch.nn.Module, tokenizer, queries_table: pa.Table) -> float:
    """Share of rows (prompt, completion) the model answers exactly by greedy decoding."""
    hits = completion_matches(
        model,
        tokenizer,
        queries_table.column("prompt").to_pylist(),
        queries_table.column("completion").to_pylist(),
    )
    return sum(hits) / len(hits) if hits else 0.0
