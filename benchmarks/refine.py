"""Iterative refinement toward the exact damped influence: MRR on the fact world against K.

python -m benchmarks.refine [--quick] [--preset default] [--steps 0 1 2 5 10 20 50]
                            [--samples 128] [--seed 0] [--json out.json] [--pt-only FT_STEPS]
                            [--damping-factor 0.01] [--alpha 1e-3] [--lds [TRUTH]]
                            [--lanczos M] [--modules blocks|head|all]

Each stage's damped system (G_s + λ_s I) x = b is solved by K steps of conjugate gradients
preconditioned with the EK-FAC inverse (msif.attribution.refine), with exact Gauss–Newton
products on a seeded sample of `--samples` sequences of that stage's data; K = 0 is EK-FAC.
The fine-tune stage's iterates are nested (one solve, snapshots at every K), the pre-train
stage is solved anew for every K from that K's fine-tune solution. Every method scores the
whole corpus in memory, so MRR is over full rankings (no top-k cut), as in
benchmarks/sensitivity.py, whose loader and factor fit this reuses (α = 1e-3, pre-train
λ = 0.01 × mean Λ_pt per module, as `msif run`). `--lds` adds each K's LDS (benchmarks/lds.py)
against that preset's committed truth of retrained losses: no retraining here.

Columns per K: MRR and recall@10 of multi-stage and single-stage; each stage's mean relative
residual ‖r_K‖ / ‖b‖; wall seconds: the fine-tune stage's first K steps (measured per step)
plus the pre-train solve for K, which includes the product for its starting residual even at
K = 0 (multi-stage), the fine-tune part alone (single-stage); multi-stage MRR with the
relevant documents restricted to those in the pre-train sample, and to those outside it (the
exact inverse on a sample shrinks the sampled documents' own directions). After the table,
per method, the mean per-query Spearman correlation of each K's scores with the largest K's.

`--pt-only FT_STEPS` instead fixes the fine-tune stage at FT_STEPS steps and nests the
pre-train stage's iterates (one solve): how far the slower stage is from converging.

For other benchmarks (benchmarks/lds.py):

    refined_scores(preset, method, steps, *, samples=128, seed=0) -> (doc_ids, query_ids, S)

gives the full score matrix S (Q × N, float64, rows in query order, columns in corpus order)
of "multi-stage", "single-stage" or "gradient-dot" (which ignores steps) after K steps, on
the preset's world. The world, factors and query gradients are loaded once per preset and
kept in memory (`world_state`); the scores are recomputed per call.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import msif
from benchmarks.common import machine
from benchmarks.lds import ROOT, Truth, evaluate, load_truth
from benchmarks.sensitivity import add_modules_option, fit, load_world, mrr
from benchmarks.stats import spearman
from msif.attribution.deflation import Deflation, fit_deflation
from msif.attribution.precondition import PreconditionedQueries
from msif.attribution.refine import GaussNewton, StageSample, sample_rows, solve_stage
from msif.data.examples import Example, batches
from msif.ekfac.factors import DEFAULT_ALPHA, DEFAULT_DAMPING_FACTOR, Damping

STEPS = (0, 1, 2, 5, 10, 20, 50)
QUICK_STEPS = (0, 1, 2)
SAMPLES = 128  # the refine_samples default of msif.config
PT_DAMPING_FACTOR = DEFAULT_DAMPING_FACTOR  # what `msif run` uses for the pre-train stage
ROWS = 192  # sequences per forward pass: all 48 queries of the default world × 4 sequences


@dataclass
class WorldState:
    """One preset's world in memory: models, data, factors, query gradients, damping."""

    preset: str
    pt: torch.nn.Module
    ft: torch.nn.Module
    docs: list[Example]
    ft_rows: list[Example]
    query_ids: list[str]
    relevant: dict[str, list[str]]
    pad: int
    alpha: float
    factors: dict[str, msif.Factors]
    specs: dict
    grads: dict[str, torch.Tensor]  # per module (Q, out, in'), weight coordinates
    damping: dict[str, dict[str, float]]  # per stage and module, as precondition_queries uses
    ekfac: dict[str, PreconditionedQueries] = field(default_factory=dict)  # K = 0, by method

    @property
    def doc_ids(self) -> list[str]:
        """Corpus order: the score matrices' columns."""
        return [d.id for d in self.docs]

    def sample(self, stage: str, samples: int, seed: int) -> StageSample:
        """The stage's seeded sample, as the precondition-queries node draws it."""
        data, model = (self.docs, self.pt) if stage == "pt" else (self.ft_rows, self.ft)
        rows = sample_rows(len(data), samples, seed)
        return StageSample(model, [data[i] for i in rows], {"rows": rows, "seed": seed})

    def scores(self, method: str, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """(Q, N) scores of the whole corpus for preconditioned queries of a method."""
        like = self.ekfac[method]
        dense = {k: w.to(like.dense[k].dtype) for k, w in weights.items()}
        pq = PreconditionedQueries(self.query_ids, method, like.specs, dense=dense)
        model = self.ft if method == "single-stage" else self.pt
        return msif.score(model, batches(self.docs, 16, self.pad), pq).values.double()


@functools.cache
def world_state(
    preset: str,
    damping_factor: float = PT_DAMPING_FACTOR,
    alpha: float = DEFAULT_ALPHA,
    modules: str = "blocks",
) -> WorldState:
    """Load the preset's world, fit both stages' factors and take the query gradients, once.

    The damping is `msif run`'s: λ = damping_factor × mean Λ per module in the pre-train
    stage, α for the fine-tune stage; modules names the tracked selection
    (benchmarks.sensitivity.TRACKING).
    """
    w, pt, ft, tok, docs, ft_rows, qs, relevant = load_world(preset)
    pad = tok.pad_token_id or 0
    factors = {"pt": fit(pt, docs, "pt", pad, modules), "ft": fit(ft, ft_rows, "ft", pad, modules)}
    qids = [q.id for q in qs]
    common = {"ft_factors": factors["ft"], "pt_factors": factors["pt"], "alpha": alpha}
    damping = Damping(damping_factor)
    ekfac = {
        m: msif.precondition_queries(
            ft, batches(qs, 16, pad), qids, method=m, damping=damping, **common
        )
        for m in ("multi-stage", "single-stage", "gradient-dot")
    }
    multi = ekfac["multi-stage"]
    grads = {k: w.double() for k, w in ekfac["gradient-dot"].dense.items()}
    return WorldState(
        preset, pt, ft, docs, ft_rows, qids, relevant, pad, alpha, factors, multi.specs,
        grads, multi.damping, ekfac,
    )  # fmt: skip


def refined_weights(
    state: WorldState, method: str, steps: int, samples: int = SAMPLES, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The method's preconditioned queries after K steps per stage (weight coordinates)."""
    if method == "gradient-dot":
        return state.grads
    b = state.grads
    stages = ("ft", "pt") if method == "multi-stage" else ("ft",)
    for stage in stages:
        solve = solve_stage(
            state.factors[stage],
            state.sample(stage, samples, seed),
            state.specs,
            state.damping[stage],
            b,
            steps,
            rows=ROWS,
        )
        b = solve.solution
    return b


def stage_deflation(
    state: WorldState, stage: str, sample: StageSample, lanczos: int, seed: int
) -> Deflation | None:
    """The stage's Lanczos correction of EK-FAC (None for lanczos 0); prints its wall time."""
    if not lanczos:
        return None
    start = time.perf_counter()
    damping = state.damping[stage]
    op = GaussNewton(sample.model, state.specs, sample.examples, damping, rows=ROWS)
    d = fit_deflation(state.factors[stage], op, damping, state.grads, lanczos, seed=seed)
    seconds = time.perf_counter() - start
    span = f"[{float(d.values.min()):.3g}, {float(d.values.max()):.3g}]" if d.rank else "-"
    print(
        f"{stage} Lanczos: {d.steps} steps, {d.rank} eigenvalues {span} moved to 1, {seconds:.0f}s"
    )
    return d


def refined_scores(
    preset: str, method: str, steps: int, *, samples: int = SAMPLES, seed: int = 0
) -> tuple[list[str], list[str], torch.Tensor]:
    """(doc_ids, query_ids, scores Q × N) of a method after K refinement steps per stage."""
    state = world_state(preset)
    weights = refined_weights(state, method, steps, samples, seed)
    return state.doc_ids, state.query_ids, state.scores(method, weights)


@dataclass
class Row:
    """One K: quality of both methods, residuals, wall time."""

    steps: int
    multi_mrr: float
    multi_recall: float
    single_mrr: float
    single_recall: float
    ft_residual: float
    pt_residual: float
    multi_seconds: float
    single_seconds: float
    multi_mrr_sampled: float | None = None  # relevant documents: only those in the pt sample
    multi_mrr_unsampled: float | None = None  # only those outside it
    multi_lds: list[float] | None = None  # mean, 95 % interval over queries (benchmarks/lds.py)
    single_lds: list[float] | None = None


def lds_of(truth: Truth | None, state: WorldState, scores: torch.Tensor) -> list[float] | None:
    """LDS of a (Q × N) score matrix against the truth's retrained losses: mean, low, high."""
    if truth is None:
        return None
    r = evaluate(truth, state.doc_ids, state.query_ids, scores)
    return [r.mean, r.low, r.high]


def _fmt_lds(value: list[float] | None) -> str:
    return "-" if value is None else f"{value[0]:+.3f} [{value[1]:+.3f}, {value[2]:+.3f}]"


def sweep(
    state: WorldState,
    steps: Sequence[int],
    samples: int,
    seed: int,
    truth: Truth | None = None,
    lanczos: int = 0,
) -> list[Row]:
    """Every K: one nested fine-tune solve, a pre-train solve per K, both methods scored.

    lanczos > 0: each stage's preconditioner corrected first (its seconds printed apart)."""
    top = max(steps)
    ft_sample, pt_sample = state.sample("ft", samples, seed), state.sample("pt", samples, seed)
    sampled = {e.id for e in pt_sample.examples}
    ft_deflation = stage_deflation(state, "ft", ft_sample, lanczos, seed)
    pt_deflation = stage_deflation(state, "pt", pt_sample, lanczos, seed)
    stamps = [time.perf_counter()]
    ft = solve_stage(
        state.factors["ft"],
        ft_sample,
        state.specs,
        state.damping["ft"],
        state.grads,
        top,
        rows=ROWS,
        snapshots=steps,
        on_step=lambda k, x: stamps.append(time.perf_counter()),
        deflation=ft_deflation,
    )
    ft_seconds = [t - stamps[0] for t in stamps]  # after step k (index 0: start)
    print(
        "| K | multi-stage MRR | recall@10 | single-stage MRR | recall@10 | ft residual | "
        "pt residual | multi-stage s | single-stage s | multi-stage MRR, relevant in pt sample | "
        "outside it | multi-stage LDS | single-stage LDS |\n" + "|---:" * 13 + "|"
    )
    rows, kept = [], {}
    for k in steps:
        start = time.perf_counter()
        pt = solve_stage(
            state.factors["pt"],
            pt_sample,
            state.specs,
            state.damping["pt"],
            ft.iterates[k],
            k,
            rows=ROWS,
            deflation=pt_deflation,
        )
        pt_seconds = time.perf_counter() - start
        multi_scores = state.scores("multi-stage", pt.solution)
        kept.setdefault("multi-stage", {})[k] = multi_scores
        multi = mrr(multi_scores, state.query_ids, state.doc_ids, state.relevant)
        split = [
            mrr(multi_scores, state.query_ids, state.doc_ids, part)[0]
            for part in _split_relevant(state.relevant, sampled)
        ]
        single_scores = state.scores("single-stage", ft.iterates[k])
        kept.setdefault("single-stage", {})[k] = single_scores
        single = mrr(single_scores, state.query_ids, state.doc_ids, state.relevant)
        ft_time = ft_seconds[k] if k else 0.0
        rows.append(
            Row(k, *multi, *single, float(ft.residuals[k].mean()), float(pt.residuals[-1].mean()),
                ft_time + pt_seconds, ft_time, *split, lds_of(truth, state, multi_scores),
                lds_of(truth, state, single_scores))
        )  # fmt: skip
        r = rows[-1]
        print(
            f"| {k} | {r.multi_mrr:.3f} | {r.multi_recall:.3f} | {r.single_mrr:.3f} | "
            f"{r.single_recall:.3f} | {r.ft_residual:.2e} | {r.pt_residual:.2e} | "
            f"{r.multi_seconds:.0f} | {r.single_seconds:.0f} | {_fmt(r.multi_mrr_sampled)} | "
            f"{_fmt(r.multi_mrr_unsampled)} | {_fmt_lds(r.multi_lds)} | "
            f"{_fmt_lds(r.single_lds)} |",
            flush=True,
        )
    for method, by_k in kept.items():
        _print_agreement(method, by_k)
    return rows


def pt_sweep(
    state: WorldState,
    steps: Sequence[int],
    ft_steps: int,
    samples: int,
    seed: int,
    truth: Truth | None = None,
    lanczos: int = 0,
) -> list[dict]:
    """Multi-stage with the fine-tune stage refined ft_steps times and the pre-train stage's
    iterates nested (one solve, snapshots at every K): how MRR moves as that stage converges.
    lanczos > 0 corrects both stages' preconditioners first (its seconds printed apart)."""
    ft_sample, pt_sample = state.sample("ft", samples, seed), state.sample("pt", samples, seed)
    ft_deflation = stage_deflation(state, "ft", ft_sample, lanczos, seed)
    pt_deflation = stage_deflation(state, "pt", pt_sample, lanczos, seed)
    ft = solve_stage(state.factors["ft"], ft_sample, state.specs, state.damping["ft"],
                     state.grads, ft_steps, rows=ROWS, deflation=ft_deflation)  # fmt: skip
    sampled = {e.id for e in pt_sample.examples}
    stamps = [time.perf_counter()]
    pt = solve_stage(
        state.factors["pt"], pt_sample, state.specs, state.damping["pt"], ft.solution,
        max(steps), rows=ROWS, snapshots=steps,
        on_step=lambda k, r: stamps.append(time.perf_counter()), deflation=pt_deflation,
    )  # fmt: skip
    print(f"fine-tune stage: {ft_steps} steps, residual {float(ft.residuals[-1].mean()):.2e}")
    print(
        "| pt K | multi-stage MRR | recall@10 | pt residual | pt seconds | MRR, relevant in pt "
        "sample | outside it | LDS |\n" + "|---:" * 8 + "|"
    )
    rows, kept = [], {}
    for k in steps:
        scores = kept[k] = state.scores("multi-stage", pt.iterates[k])
        m, r = mrr(scores, state.query_ids, state.doc_ids, state.relevant)
        split = [mrr(scores, state.query_ids, state.doc_ids, part)[0]
                 for part in _split_relevant(state.relevant, sampled)]  # fmt: skip
        row = {"pt_steps": k, "mrr": m, "recall@10": r,
               "pt_residual": float(pt.residuals[k].mean()),
               "pt_seconds": stamps[k] - stamps[0], "mrr_sampled": split[0],
               "mrr_unsampled": split[1], "lds": lds_of(truth, state, scores)}  # fmt: skip
        rows.append(row)
        print(
            f"| {k} | {m:.3f} | {r:.3f} | {row['pt_residual']:.2e} | {row['pt_seconds']:.0f} | "
            f"{_fmt(split[0])} | {_fmt(split[1])} | {_fmt_lds(row['lds'])} |",
            flush=True,
        )
    _print_agreement("multi-stage", kept)
    return rows


def agreement(by_k: dict[int, torch.Tensor]) -> dict[int, float]:
    """Mean over queries of the Spearman correlation of each K's scores with the largest K's:
    how close K steps come to where the refinement is heading."""
    last = by_k[max(by_k)]
    return {
        k: sum(spearman(s[q], last[q]) for q in range(len(s))) / len(s) for k, s in by_k.items()
    }


def _print_agreement(method: str, by_k: dict[int, torch.Tensor]) -> None:
    values = ", ".join(f"K={k} {v:.3f}" for k, v in agreement(by_k).items())
    print(f"{method}: per-query Spearman with K={max(by_k)}'s scores: {values}")


def _split_relevant(relevant: dict, sampled: set[str]) -> tuple[dict, dict]:
    """The relevant sets restricted to documents in the pre-train sample, and to the rest."""
    inside = {q: [d for d in r if d in sampled] for q, r in relevant.items()}
    outside = {q: [d for d in r if d not in sampled] for q, r in relevant.items()}
    return inside, outside


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> list[Row]:
    """Print the MRR-against-K table; return its rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small world, K in 0 1 2")
    p.add_argument("--preset", default="default")
    p.add_argument("--steps", type=int, nargs="+", help=f"K values (default {STEPS})")
    p.add_argument("--samples", type=int, default=SAMPLES, help="sequences per stage sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument(
        "--pt-only",
        type=int,
        metavar="FT_STEPS",
        help="instead: the fine-tune stage refined FT_STEPS times, the pre-train stage's "
        "iterates nested over --steps (multi-stage only)",
    )
    p.add_argument("--damping-factor", type=float, default=PT_DAMPING_FACTOR,
                   help="pre-train λ = factor × mean Λ_pt per module")  # fmt: skip
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="fine-tune damping α")
    p.add_argument("--lanczos", type=int, default=0, metavar="M",
                   help="correct each stage's EK-FAC preconditioner by M Lanczos steps first "
                   "(msif.attribution.deflation; seeded by --seed)")  # fmt: skip
    p.add_argument(
        "--lds",
        nargs="?",
        const="",
        metavar="TRUTH",
        help="also the LDS of every K against a truth file of benchmarks/lds.py (default: "
        "benchmarks/results/lds-truth-<preset>.json)",
    )
    add_modules_option(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    preset = "small" if args.quick else args.preset
    steps = sorted(set(args.steps or (QUICK_STEPS if args.quick else STEPS)))
    truth = None
    if args.lds is not None:
        path = args.lds or ROOT / "benchmarks" / "results" / f"lds-truth-{preset}.json"
        truth = load_truth(path)
    start = time.perf_counter()
    state = world_state(preset, args.damping_factor, args.alpha, args.modules)
    dot_scores = state.scores("gradient-dot", state.grads)
    dot = mrr(dot_scores, state.query_ids, state.doc_ids, state.relevant)
    print(
        f"world {preset}: {len(state.docs)} documents, {len(state.ft_rows)} fine-tune pairs, "
        f"{len(state.query_ids)} queries; samples {args.samples} (seed {args.seed}); damping "
        f"factor {args.damping_factor}, α {args.alpha}; modules {args.modules}; Lanczos "
        f"{args.lanczos}; gradient-dot "
        f"MRR {dot[0]:.3f}, LDS "
        f"{_fmt_lds(lds_of(truth, state, dot_scores))}; setup {time.perf_counter() - start:.0f}s; "
        f"{machine()}"
    )
    if args.pt_only is not None:
        table = pt_sweep(state, steps, args.pt_only, args.samples, args.seed, truth, args.lanczos)
        print(f"total {time.perf_counter() - start:.0f}s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"preset": preset, "samples": args.samples, "seed": args.seed,
                           "ft_steps": args.pt_only, "lanczos": args.lanczos,
                           "modules": args.modules, "rows": table},
                          f, indent=1)  # fmt: skip
        return table
    rows = sweep(state, steps, args.samples, args.seed, truth, args.lanczos)
    print(f"total {time.perf_counter() - start:.0f}s")
    if args.json:
        from dataclasses import asdict

        with open(args.json, "w") as f:
            json.dump({"preset": preset, "samples": args.samples, "seed": args.seed,
                       "lanczos": args.lanczos, "modules": args.modules,
                       "gradient_dot_mrr": dot[0],
                       "rows": [asdict(r) for r in rows]}, f,
                      indent=1)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
