"""Shared pieces of the benchmarks: models from configs, random token data, timing."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif.data.examples import Example, batches


def neox(
    hidden: int,
    layers: int = 2,
    heads: int = 4,
    vocab: int = 512,
    seed: int = 0,
    positions: int = 2048,
) -> GPTNeoXForCausalLM:
    """A GPT-NeoX built from a config (no download), eval mode."""
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=positions,
    )
    return GPTNeoXForCausalLM(cfg).eval()


def token_examples(n: int, length: int, vocab: int, seed: int, prompt: int = 0) -> list[Example]:
    """n random sequences of a fixed length; the first `prompt` tokens unscored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g).tolist()
    return [
        Example(f"s{seed}-{i}", row, [-100] * prompt + row[prompt:]) for i, row in enumerate(ids)
    ]


def token_batches(
    n: int, length: int, vocab: int, seed: int, batch: int, prompt: int = 0
) -> list[dict]:
    """Collated batches of token_examples."""
    return list(batches(token_examples(n, length, vocab, seed, prompt), batch))


def _sync() -> None:
    # CUDA kernels run asynchronously: a wall-clock time must wait for them.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_best_times(
    passes: list[tuple[str, Callable[[], object]]], repeat: int = 3
) -> dict[str, float]:
    """Fastest wall-clock time of each pass, the passes taking turns in every round.

    Taking turns puts a busy or quiet moment of a shared machine on all passes alike, so
    ratios between them hold better than with one pass's repeats after another's.
    """
    for _, fn in passes:  # warm-up
        fn()
    _sync()
    best = {name: float("inf") for name, _ in passes}
    for _ in range(repeat):
        for name, fn in passes:
            start = time.perf_counter()
            fn()
            _sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Fastest of `repeat` wall-clock runs (after one warm-up)."""
    return interleaved_best_times([("", fn)], repeat)[""]


def machine() -> str:
    """One line describing where the numbers were taken."""
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
