"""The main job: build (or reuse) the fact world and run every pipeline node on it locally."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from msif import nodes
from msif.nodes import RunOptions

log = logging.getLogger("msif")
METHODS = ("multi-stage", "single-stage", "gradient-dot")


@dataclass
class JobSettings:
    """What the main job runs with (the pipeline's parameters)."""

    num_shards: int = 2
    max_length: int = 64
    batch_size: int = 16
    damping_factor: float = 0.1
    alpha: float | None = None
    rank: int = 0
    top_k: int = 100
    seed: int = 0
    progress: bool = True

    def options(self) -> RunOptions:
        """Node options for these settings."""
        return RunOptions(
            max_length=self.max_length,
            batch_size=self.batch_size,
            seed=self.seed,
            device="auto",
            dtype="float32",
            progress=self.progress,
        )


@dataclass
class Timer:
    """Wall time of each node, summed over its shards."""

    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable, *args, **kwargs):
        """Call fn and add its wall time under name."""
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return result


def run_inprocess(world: dict, out: Path, settings: JobSettings) -> dict:
    """Every node, called directly in this process; returns metrics and node timings."""
    opts, n, t = settings.options(), settings.num_shards, Timer()
    factors = {}
    for stage, model, data in (
        ("pt", world["pt_model"], world["corpus"]),
        ("ft", world["ft_model"], world["finetune"]),
    ):
        d = out / stage
        covs = [str(d / f"covariance-{i}") for i in range(n)]
        for i, c in enumerate(covs):
            t.run(
                f"fit-covariance ({stage})",
                nodes.fit_covariance_node,
                model,
                data,
                stage,
                i,
                n,
                c,
                opts,
            )
        t.run(f"eigendecompose ({stage})", nodes.eigendecompose_node, covs, str(d / "eigen"))
        lams = [str(d / f"lambda-{i}") for i in range(n)]
        for i, lam in enumerate(lams):
            t.run(
                f"fit-lambda ({stage})",
                nodes.fit_lambda_node,
                model,
                data,
                stage,
                str(d / "eigen"),
                i,
                n,
                lam,
                opts,
            )
        factors[stage] = str(d / "factors")
        t.run(
            f"build-factors ({stage})",
            nodes.build_factors_node,
            str(d / "eigen"),
            lams,
            factors[stage],
        )
    scores = []
    for method in METHODS:
        pre = str(out / "queries" / method)
        t.run(
            "query-gradients",
            nodes.query_gradients_node,
            world["ft_model"],
            world["queries"],
            method,
            pre,
            opts,
            ft_factors_uri=factors["ft"],
            pt_factors_uri=factors["pt"],
            alpha=settings.alpha,
            damping_factor=settings.damping_factor,
            rank=settings.rank,
        )
        corpus_model = world["ft_model"] if method == "single-stage" else world["pt_model"]
        for i in range(n):
            scores.append(str(out / "scores" / f"{method}-{i}"))
            t.run(
                "score",
                nodes.score_node,
                corpus_model,
                world["corpus"],
                pre,
                i,
                n,
                settings.top_k,
                scores[-1],
                opts,
            )
    scores.append(str(out / "scores" / "bm25"))
    t.run("bm25", nodes.bm25_node, world["corpus"], world["queries"], settings.top_k, scores[-1])
    metrics = t.run(
        "rank",
        nodes.rank_node,
        scores,
        world["corpus"],
        world["queries"],
        settings.top_k,
        str(out / "ranking"),
        factor_uris=[factors["pt"], factors["ft"]],
    )
    return {"metrics": metrics, "timings": t.seconds, "ranking": str(out / "ranking")}


def node_times(run_dir: Path) -> dict[str, float]:
    """Wall time per node (summed over shards) from the manifests the nodes published."""
    times: dict[str, float] = {}
    for marker in sorted(run_dir.rglob("_MSIF_COMPLETE.json")):
        meta = json.loads(marker.read_text()).get("metadata", {})
        if "wall_s" not in meta:
            continue
        name = meta.get("node", "?") + (f" ({meta['stage']})" if "stage" in meta else "")
        times[name] = times.get(name, 0.0) + float(meta["wall_s"])
    return times


def metric_table(metrics: dict) -> str:
    """A fixed-width table of MRR and recall@10 per method."""
    lines = [f"{'method':<14} {'MRR':>7} {'recall@10':>10} {'queries':>8}"]
    for method, m in metrics["methods"].items():
        lines.append(
            f"{method:<14} {m['mrr']:>7.3f} {m['recall@10']:>10.3f} {m['num_queries']:>8d}"
        )
    return "\n".join(lines)


def evidence_lines(ranking_dir: Path, limit: int = 8) -> list[str]:
    """Per query, the rank at which each method first found a document stating the fact."""
    table = pq.read_table(ranking_dir / "ranking.parquet").to_pylist()
    first: dict[str, dict[str, int]] = {}
    for row in table:
        if row["relevant"]:
            best = first.setdefault(row["query_id"], {})
            best[row["method"]] = min(best.get(row["method"], 10**9), row["rank"])
    methods = sorted({r["method"] for r in table})
    lines = [f"{'query':<12} " + " ".join(f"{m:>13}" for m in methods)]
    for q in sorted({r["query_id"] for r in table})[:limit]:
        ranks = first.get(q, {})
        lines.append(f"{q:<12} " + " ".join(f"{ranks.get(m, '-')!s:>13}" for m in methods))
    return lines


def _say(text: str = "") -> None:
    # kfp.local swaps builtins.print for an indenting one while it runs; write directly.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_summary(world: dict, result: dict, out: Path) -> None:
    """The table a user sees at the end of the main job."""
    acc = world.get("accuracy", {})
    if acc:
        _say("fine-tuned model accuracy: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    _say("\nwhere each method ranked the first document that states the queried fact:")
    _say("\n".join(evidence_lines(Path(result["ranking"]))))
    _say("\n" + metric_table(result["metrics"]))
    _say("\nnode wall times: " + ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items()))
    _say(f"\nreport: {Path(result['ranking']) / 'report.html'}")
    (out / "summary.json").write_text(json.dumps({**result, "world": world}, indent=1, default=str))


def world_command(args) -> int:
    """`msif world`: build or reuse the fact world and print its paths."""
    world = build_world_paths(args.preset, args.seed, args.cache)
    print(json.dumps(world, indent=1, default=str))
    return 0


def build_world_paths(preset: str, seed: int | None, cache: str | None) -> dict:
    """The fact world's files as a dict of strings (plus accuracy)."""
    from msif.world import WorldConfig, build_world

    config = WorldConfig.preset(preset)
    if seed is not None:
        config = config.with_seed(seed)
    paths = build_world(config, cache)
    return {
        "corpus": str(paths.corpus),
        "finetune": str(paths.finetune),
        "queries": str(paths.queries),
        "pt_model": str(paths.pt_model),
        "ft_model": str(paths.ft_model),
        "accuracy": dict(paths.accuracy),
        "alpha": float(paths.alpha),
    }


def run_command(args) -> int:
    """`msif run`: the main job."""
    start = time.perf_counter()
    world = build_world_paths(args.preset, args.seed, args.cache)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # α defaults to the proximity coefficient the world was fine-tuned with: DESIGN §1 makes
    # it the fine-tune damping (a world fine-tuned without one gets relative damping).
    alpha = args.alpha if args.alpha is not None else (world["alpha"] or None)
    settings = JobSettings(
        num_shards=args.num_shards,
        damping_factor=args.damping_factor,
        alpha=alpha,
        rank=args.rank,
    )
    if args.runner == "kfp":
        from msif.workflow.local_run import run_main_job_pipeline

        result = run_main_job_pipeline(world, out, settings)
        result["timings"].update(node_times(Path(result["outputs"]["run_dir"])))
    else:
        result = run_inprocess(world, out, settings)
    print_summary(world, result, out)
    _say(f"total wall time {time.perf_counter() - start:.0f}s")
    return 0
