"""The corpus gradient index against the exact scan: agreement, recovery after rerank, speed.

python -m benchmarks.index [--quick] [--preset default] [--ranks 1 2 4 8]
python -m benchmarks.index --speed [--lengths 64 128 256 512] [--docs 64]

Agreement (fact world): multi-stage and gradient-dot queries scored by the scan
(msif.score: a forward and backward pass per document) and by the index (msif.index:
matmuls with stored factors) at several ranks; per query the Spearman correlation over all
documents, whether the exact top-10 lies in the index's top 5 % (the candidates an exact
rerank rescores), and the MRR of the reranked ranking against the scan's.

Speed (--speed): on a random-token GPT-NeoX, per document length, one scan of the corpus for
Q queries against one lookup of the same queries in a rank-4 index, interleaved repeats, and
the index build against the scan (both per token).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

import msif
from benchmarks.common import interleaved_best_times, machine, neox, token_batches
from benchmarks.sensitivity import fit, load_world, mrr
from benchmarks.stats import spearman
from msif.data.examples import batches
from msif.ekfac.factors import Damping
from msif.index.factored import build_index, whitening_metrics
from msif.index.lookup import index_scores
from msif.index.projected import build_projected_index

METHODS = ("multi-stage", "gradient-dot")


def recovery(approx: torch.Tensor, exact: torch.Tensor, fraction: float, k: int = 10):
    """Per query: is the exact top-k inside the approx top ⌈fraction·N⌉? And the reranked
    scores (candidates by their exact score, the rest below them)."""
    n = exact.shape[1]
    c = max(k, math.ceil(fraction * n))
    cand = approx.topk(c, dim=1).indices
    top = exact.topk(k, dim=1).indices
    held = [set(top[q].tolist()) <= set(cand[q].tolist()) for q in range(exact.shape[0])]
    reranked = torch.full_like(exact, -math.inf)
    reranked.scatter_(1, cand, exact.gather(1, cand))
    return held, reranked, c


def agreement(args) -> list[dict]:
    """Rows of the agreement table."""
    preset = "small" if args.quick else args.preset
    w, pt, ft, tok, docs, ft_rows, qs, relevant = load_world(preset)
    pad = tok.pad_token_id or 0
    fpt, fft = fit(pt, docs, "pt", pad), fit(ft, ft_rows, "ft", pad)
    qids, dids = [q.id for q in qs], [d.id for d in docs]
    print(f"world {preset}: {len(docs)} documents, {len(qs)} queries; {machine()}")
    print(
        "| method | index | values/doc | Spearman mean | min | exact top-10 in top 5 % | "
        "MRR reranked | MRR scan |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    indexes = {}
    for power in args.powers:
        metrics = whitening_metrics(fpt, power, args.damping_factor)
        for r in args.ranks:
            start = time.perf_counter()
            index = build_index(pt, batches(docs, 16, pad), fpt.specs, r, metrics=metrics)
            index.info["build_s"] = time.perf_counter() - start
            indexes[("factored", power, f"r={r}")] = index
    for power in args.powers:
        damping = {n: fpt.damping_for(n, Damping(args.damping_factor)) for n in fpt.specs}
        for values in args.values:
            for r in args.projected_ranks:
                start = time.perf_counter()
                index = build_projected_index(
                    pt, batches(docs, 16, pad), fpt, values, power, damping, rank=r
                )
                index.info["build_s"] = time.perf_counter() - start
                indexes[("projected", power, f"k={values} r={r}")] = index
    for method in METHODS:
        pre = msif.precondition_queries(
            ft,
            batches(qs, 16, pad),
            qids,
            method=method,
            ft_factors=fft,
            pt_factors=fpt,
            alpha=w["alpha"] or None,
        )
        exact = msif.score(pt, batches(docs, 16, pad), pre).values.double()
        scan_mrr = mrr(exact, qids, dids, relevant)[0]
        for key, index in indexes.items():
            tier, power, size = key
            approx = index_scores(pre, index, factors=fpt)
            rho = [spearman(approx[q], exact[q]) for q in range(len(qids))]
            held, reranked, c = recovery(approx, exact, args.fraction)
            row = {
                "method": method,
                "tier": tier,
                "size": size,
                "power": power,
                "values_per_doc": index.values_per_document(),
                "spearman_mean": sum(rho) / len(rho),
                "spearman_min": min(rho),
                "top10_held": sum(held) / len(held),
                "candidates": c,
                "mrr_reranked": mrr(reranked, qids, dids, relevant)[0],
                "mrr_scan": scan_mrr,
            }
            rows.append(row)
            print(
                f"| {method} | {tier} {size} p={power:g} | "
                f"{row['values_per_doc']} | "
                f"{row['spearman_mean']:.3f} | {row['spearman_min']:.3f} | "
                f"{row['top10_held']:.1%} | {row['mrr_reranked']:.3f} | {scan_mrr:.3f} |"
            )
    print(f"candidates per query: {rows[0]['candidates']} of {len(docs)}")
    return rows


def speed(args) -> list[dict]:
    """Rows of the speed table."""
    torch.set_num_threads(1)
    vocab, hidden = 512, args.hidden
    model = neox(hidden, layers=args.layers, heads=4, vocab=vocab)
    print(f"GPT-NeoX hidden {hidden}, {args.layers} layers; {machine()}")
    print(
        "| tokens/doc | docs | queries | scan s | factored lookup s | scan/lookup | "
        "projected lookup s (4096 values) | scan/lookup | factored build s | "
        "build/scan per token |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    qb = token_batches(args.queries, 32, vocab, seed=1, batch=8, prompt=16)
    basis = msif.eigendecompose(msif.fit_covariance(model, qb, stage="pt"))
    fpt = msif.Factors.build(basis, msif.fit_lambda(model, qb, basis))
    ft = copy.deepcopy(model)  # a "fine-tune": the queries' side, θ_pt plus a little noise
    with torch.no_grad():
        for w in ft.parameters():
            w.add_(0.01 * torch.randn_like(w))
    pre = msif.precondition_queries(
        ft, qb, [f"q{i}" for i in range(args.queries)], method="gradient-dot", pt_factors=fpt
    )
    for length in args.lengths:
        docs = token_batches(args.docs, length, vocab, seed=2, batch=4)
        index = build_index(model, docs, fpt.specs, 4)
        damping = {n: fpt.damping_for(n, Damping(0.1)) for n in fpt.specs}
        projected = build_projected_index(model, docs, fpt, 4096, 0.5, damping, rank=4)
        times = interleaved_best_times(
            [
                ("scan", lambda docs=docs: msif.score(model, docs, pre)),
                ("lookup", lambda index=index: index_scores(pre, index)),
                ("projected", lambda ix=projected: index_scores(pre, ix, factors=fpt)),
                ("build", lambda docs=docs: build_index(model, docs, fpt.specs, 4)),
            ],
            repeat=args.repeat,
        )
        row = {"length": length, "docs": args.docs, "queries": args.queries, **times}
        rows.append(row)
        print(
            f"| {length} | {args.docs} | {args.queries} | {times['scan']:.3f} | "
            f"{times['lookup']:.4f} | {times['scan'] / times['lookup']:.0f}× | "
            f"{times['projected']:.4f} | {times['scan'] / times['projected']:.0f}× | "
            f"{times['build']:.3f} | {times['build'] / times['scan']:.2f} |"
        )
    return rows


def main(argv=None) -> list[dict]:
    """Print the agreement table (or with --speed the speed table); return its rows."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", default="default")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--powers",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 1.0],
        help="metric powers of the truncation (0: plain SVD)",
    )
    p.add_argument("--damping-factor", type=float, default=0.1)
    p.add_argument(
        "--values",
        type=int,
        nargs="+",
        default=[1024, 4096, 16384],
        help="values per document of the projected tier",
    )
    p.add_argument(
        "--projected-ranks",
        type=int,
        nargs="+",
        default=[2, 4],
        help="triplets per module of the projected tier (at most)",
    )
    p.add_argument("--fraction", type=float, default=0.05, help="candidates: share of the corpus")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    if args.speed:
        return speed(args)
    return agreement(args)


if __name__ == "__main__":
    main()
