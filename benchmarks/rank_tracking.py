"""How closely rank-r query compression tracks full-rank multi-stage scores.

python -m benchmarks.rank_tracking [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import msif
from msif.data.examples import Example, batches


def _model(seed: int, hidden: int) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    return GPTNeoXForCausalLM(cfg).eval()


def _examples(n: int, length: int, seed: int, prompt: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        labels = [-100] * prompt + ids[prompt:]
        out.append(Example(f"{seed}-{i}", ids, labels))
    return out


def _factors(model, data, stage):
    basis = msif.eigendecompose(msif.fit_covariance(model, data, stage=stage))
    return msif.Factors.build(basis, msif.fit_lambda(model, data, basis))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main(argv=None) -> list[dict]:
    """Print a table of rank r vs Pearson/Spearman of scores and top-10 overlap; return it."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    hidden, n_docs = (16, 16) if args.quick else (64, 256)
    pt = _model(0, hidden)
    ft = _model(0, hidden)
    with torch.no_grad():
        for prm in ft.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    corpus = list(batches(_examples(n_docs, 32, 1), 16))
    ft_data = list(batches(_examples(64, 24, 2, prompt=12), 16))
    qs = _examples(8, 24, 3, prompt=16)
    fpt, fft = _factors(pt, corpus, "pt"), _factors(ft, ft_data, "ft")
    qb = list(batches(qs, 8))
    ids = [q.id for q in qs]
    full = msif.precondition_queries(ft, qb, ids, ft_factors=fft, pt_factors=fpt)
    t0 = time.perf_counter()
    ref = msif.score(pt, corpus, full).values
    t_full = time.perf_counter() - t0
    print(f"hidden {hidden}, {n_docs} docs, {len(qs)} queries; full-rank scoring {t_full:.2f}s")
    print("| rank | Pearson | Spearman | top-10 overlap | scoring time / full |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for r in (1, 2, 4, 8, 16, 32):
        pre = msif.precondition_queries(ft, qb, ids, ft_factors=fft, pt_factors=fpt, rank=r)
        t0 = time.perf_counter()
        got = msif.score(pt, corpus, pre).values
        t_r = time.perf_counter() - t0
        pearson = float(torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1])
        k = min(10, ref.shape[1])
        overlap = sum(
            len(set(got[q].topk(k).indices.tolist()) & set(ref[q].topk(k).indices.tolist()))
            for q in range(len(qs))
        )
        row = {
            "rank": r,
            "pearson": pearson,
            "spearman": spearman(got.flatten(), ref.flatten()),
            "top10_overlap": overlap / (k * len(qs)),
            "time_ratio": t_r / t_full,
        }
        rows.append(row)
        print(
            f"| {r} | {pearson:.4f} | {row['spearman']:.4f} | "
            f"{row['top10_overlap']:.2f} | {row['time_ratio']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()
