"""Tokens/s of msif's passes against a plain training step, side by side in one run.

python -m benchmarks.speed [--quick] [--hidden 128 --layers 4 --seq 128 --batch 8]
python -m benchmarks.speed --device cuda --dtype bfloat16 --hidden 768 --layers 12 --heads 12 \
    --vocab 16384 --seq 512 --batch 16 --threads 16     # ~110 M parameters, on a GPU

The training step is forward + backward with weight gradients (no optimiser). Covariance and
Λ fitting add label sampling and per-module statistics; corpus scoring needs no weight
gradients, only the module contractions with the stacked queries.
"""

from __future__ import annotations

import argparse

import torch

import msif
from benchmarks.common import (
    interleaved_best_times,
    machine,
    neox,
    token_batches,
    token_examples,
)
from msif.core.device import model_device, to_device
from msif.core.loss import sequence_losses
from msif.data.examples import batches


def train_step(model, data) -> None:
    """Forward + backward of the summed sequence loss with weight gradients."""
    for p in model.parameters():
        p.requires_grad_(True)
    for b in data:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        sequence_losses(out.logits, b["labels"]).sum().backward()
    model.zero_grad(set_to_none=True)


def run(args) -> list[tuple[str, float]]:
    """(name, tokens/s) of every pass."""
    dtype = getattr(torch, args.dtype)
    model = neox(args.hidden, args.layers, heads=args.heads, vocab=args.vocab)
    model = model.to(args.device, dtype)
    # On the device before timing, for every pass alike.
    data = [
        to_device(b, model_device(model))
        for b in token_batches(args.batch * args.batches, args.seq, args.vocab, 0, args.batch)
    ]
    tokens = args.batch * args.batches * args.seq
    args.params = sum(p.numel() for p in model.parameters())
    cov = msif.fit_covariance(model, data)
    basis = msif.eigendecompose(cov)
    factors = msif.Factors.build(basis, msif.fit_lambda(model, data, basis))
    factors.stage = "ft"
    passes = [
        ("training step (fwd+bwd)", lambda: train_step(model, data)),
        ("covariance fit", lambda: msif.fit_covariance(model, data)),
        ("Λ fit", lambda: msif.fit_lambda(model, data, basis)),
    ]
    for q in args.queries:
        qs = token_examples(q, args.seq // 2, args.vocab, 1, prompt=args.seq // 4)
        for rank in (0, 32):
            pre = msif.precondition_queries(
                model,
                batches(qs, 16),
                [e.id for e in qs],
                method="single-stage",
                ft_factors=factors,
                rank=rank or None,
            )
            name = f"scoring, {q} quer{'y' if q == 1 else 'ies'}" + (
                f", rank {rank}" if rank else ", full"
            )
            passes.append((name, lambda pre=pre: msif.score(model, data, pre)))
    best = interleaved_best_times(passes, args.repeat)
    rows = [(name, tokens / best[name]) for name, _ in passes]
    return rows


def main(argv=None) -> list[tuple[str, float]]:
    """Print a Markdown table of tokens/s and the ratio to the training step; return the rows."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--queries", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the shared 2-core machines are erratic with more)",
    )
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.hidden, args.layers, args.seq, args.batches, args.repeat = 16, 1, 16, 1, 1
        args.queries, args.vocab = [1, 4], 64
    rows = run(args)
    base = rows[0][1]
    print(f"machine: {machine()}")
    print(
        f"model: GPT-NeoX hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{args.params / 1e6:.1f} M parameters, {args.dtype} on {args.device}; "
        f"batch {args.batch} x {args.seq} tokens, {args.batches} batches; "
        f"best of {args.repeat} interleaved rounds"
    )
    print("| pass | tokens/s | ÷ training step |\n|---|---:|---:|")
    for name, tps in rows:
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f} |")
    return rows


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
