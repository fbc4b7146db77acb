"""Attribution quality on the fact world against damping and α (and per-method baselines).

python -m benchmarks.sensitivity [--quick] [--preset default] [--seed N] [--world-alpha 0]
                                 [--alphas 1e-3 1e-2] [--factors 1e-3 1e-2 0.1] [--json out.json]
                                 [--modules blocks|head|all]

Factors are fitted once per stage; each grid point re-preconditions the queries and rescores
the whole corpus in memory, so MRR here is over the full ranking (no top-k cut).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

import msif
from msif.core.modules import ModuleSelection
from msif.data.examples import batches, tokenize_documents, tokenize_prompt_completion
from msif.data.models import load_model
from msif.ekfac.factors import Damping
from msif.evaluation.metrics import evaluate_rankings
from msif.main_job import build_world_paths


def load_world(
    preset: str, max_length: int = 64, world_alpha: float | None = None, seed: int | None = None
):
    """Models, tokenised corpus / fine-tune pairs / queries and relevant ids of a fact world.

    world_alpha replaces the proximity coefficient the world is fine-tuned with (0: a plain
    fine-tune, as most users have); seed generates and trains another world of the preset.
    """
    w = (
        build_world_paths(preset, seed, None)
        if world_alpha is None
        else _world(preset, world_alpha, seed)
    )
    pt, tok = load_model(w["pt_model"], device="cpu")
    ft, _ = load_model(w["ft_model"], device="cpu")
    corpus = pq.read_table(w["corpus"])
    pairs = pq.read_table(w["finetune"])
    queries = pq.read_table(w["queries"])
    docs = tokenize_documents(
        tok, corpus.column("id").to_pylist(), corpus.column("text").to_pylist(), max_length
    )
    ft_rows = tokenize_prompt_completion(
        tok,
        [f"ft-{i}" for i in range(pairs.num_rows)],
        pairs.column("prompt").to_pylist(),
        pairs.column("completion").to_pylist(),
        max_length,
    )
    qs = tokenize_prompt_completion(
        tok,
        queries.column("id").to_pylist(),
        queries.column("prompt").to_pylist(),
        queries.column("completion").to_pylist(),
        max_length,
    )
    relevant = dict(
        zip(
            queries.column("id").to_pylist(),
            queries.column("relevant_ids").to_pylist(),
            strict=True,
        )
    )
    return w, pt, ft, tok, docs, ft_rows, qs, relevant


def _world(preset: str, alpha: float, seed: int | None = None) -> dict:
    import dataclasses

    from msif.world import WorldConfig, build_world

    config = dataclasses.replace(WorldConfig.preset(preset), alpha=alpha)
    paths = build_world(config if seed is None else config.with_seed(seed))
    w = {k: str(getattr(paths, k)) for k in ("corpus", "finetune", "queries", "pt_model")}
    return {**w, "ft_model": str(paths.ft_model), "alpha": alpha, "accuracy": paths.accuracy}


# Which modules a benchmark tracks (`--modules`): msif's default (the blocks' linears), or
# also the output head, or also the head and the input embeddings.
TRACKING = {
    "blocks": ModuleSelection(),
    "head": ModuleSelection(lm_head=True),
    "all": ModuleSelection(embeddings=True, lm_head=True),
}


def add_modules_option(p: argparse.ArgumentParser) -> None:
    """The `--modules` option of the benchmarks that fit factors (TRACKING)."""
    p.add_argument(
        "--modules",
        choices=tuple(TRACKING),
        default="blocks",
        help="tracked modules: the blocks' linears (msif's default), also lm_head, or also "
        "lm_head and the input embeddings",
    )


def fit(model, examples, stage, pad, modules: str = "blocks"):
    """Factors of one stage, fitted in memory, over the TRACKING[modules] selection."""
    cov = msif.fit_covariance(
        model, batches(examples, 16, pad), stage=stage, modules=TRACKING[modules]
    )
    basis = msif.eigendecompose(cov)
    return msif.Factors.build(basis, msif.fit_lambda(model, batches(examples, 16, pad), basis))


def mrr(values: torch.Tensor, query_ids, doc_ids, relevant) -> tuple[float, float]:
    """MRR and recall@10 over full rankings."""
    order = values.argsort(dim=1, descending=True)
    rankings = {q: [doc_ids[j] for j in order[i].tolist()] for i, q in enumerate(query_ids)}
    m = evaluate_rankings(rankings, relevant, k=10)
    return m["mrr"], m["recall@10"]


def main(argv=None) -> list[dict]:
    """Print MRR / recall@10 for each grid point; return the rows."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", default="default")
    p.add_argument(
        "--world-alpha", type=float, help="fine-tune the world with this α (0: plain fine-tune)"
    )
    p.add_argument("--alphas", type=float, nargs="+", help="α grid (besides unset)")
    p.add_argument("--factors", type=float, nargs="+", help="pre-train damping factor grid")
    p.add_argument("--seed", type=int, help="another world of the preset (its generation seed)")
    p.add_argument("--json", help="write the rows and the world's description here")
    add_modules_option(p)
    args = p.parse_args(argv)
    preset = "small" if args.quick else args.preset
    w, pt, ft, tok, docs, ft_rows, qs, relevant = load_world(
        preset, world_alpha=args.world_alpha, seed=args.seed
    )
    pad = tok.pad_token_id or 0
    fpt, fft = fit(pt, docs, "pt", pad, args.modules), fit(ft, ft_rows, "ft", pad, args.modules)
    qids, dids = [q.id for q in qs], [d.id for d in docs]
    factors_grid = args.factors or ([0.1, 1.0] if args.quick else [0.001, 0.01, 0.1, 1.0, 10.0])
    alphas = [None, w["alpha"] or 0.01] if args.quick else [None, 1e-4, w["alpha"] or 0.01]
    if args.alphas:
        alphas = [None, *args.alphas]
    print(f"world {preset}: {len(docs)} documents, {len(qs)} queries, accuracy {w['accuracy']}")
    print("| method | damping factor | α | MRR | recall@10 |\n|---|---:|---:|---:|---:|")
    start = time.perf_counter()
    rows = []
    for method in ("gradient-dot", "single-stage", "multi-stage"):
        grid = (
            [(None, None)]
            if method == "gradient-dot"
            else [(f, a) for f in factors_grid for a in alphas]
        )
        for factor, alpha in grid:
            pre = msif.precondition_queries(
                ft,
                batches(qs, 16, pad),
                qids,
                method=method,
                ft_factors=fft,
                pt_factors=fpt,
                alpha=alpha,
                damping=Damping(factor or 0.1),
            )
            model = ft if method == "single-stage" else pt
            values = msif.score(model, batches(docs, 16, pad), pre).values
            m, r = mrr(values, qids, dids, relevant)
            rows.append(
                {"method": method, "factor": factor, "alpha": alpha, "mrr": m, "recall@10": r}
            )
            print(
                f"| {method} | {factor if factor is not None else '-'} | "
                f"{alpha if alpha is not None else 'rel.'} | {m:.3f} | {r:.3f} |"
            )
    print(f"grid time {time.perf_counter() - start:.0f}s")
    if args.json:
        world = {"preset": preset, "seed": args.seed, "world_alpha": w["alpha"]}
        world |= {"modules": args.modules}
        world |= {"accuracy": w["accuracy"], "documents": len(docs), "queries": len(qs)}
        Path(args.json).write_text(json.dumps({"world": world, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
