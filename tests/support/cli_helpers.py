"""Running msif's nodes in tests: one subcommand at a time, or the whole DAG in-process."""

from __future__ import annotations

from msif.cli import main
from msif.config import ModelOptions, PreconditionOptions, RankOptions, ScoreOptions
from msif.main_job import JobSettings

COMMON = ["--max-length", "32", "--batch-size", "4", "--no-progress", "--device", "cpu"]
TOP_K = 20  # above the mini world's 12 documents: every document is ranked
ALPHA = 0.05


def cli(*argv) -> None:
    """Run one msif subcommand in-process; it must succeed."""
    args = [str(a) for a in argv]
    assert main(args) == 0, f"msif {' '.join(args)} failed"


def dag_settings(num_shards: int = 2, *, full: bool = False) -> JobSettings:
    """The options every DAG run of the tests uses (the mini world's sizes, CPU)."""
    return JobSettings(
        num_shards,
        ModelOptions(max_length=32, batch_size=4, device="cpu", progress=False),
        precondition=PreconditionOptions(alpha=ALPHA),
        scoring=ScoreOptions(top_k=TOP_K, full=full),
        ranking=RankOptions(top_k=TOP_K),
    )


def run_nodes(w: dict, out: str, num_shards: int = 2, *, full: bool = False) -> dict:
    """The whole DAG (msif.workflow.dag) in-process with outputs under out; their URIs.

    full: score shards also keep every document's score (`score-corpus --full`).
    """
    from msif.workflow.inprocess import primary_output, run_dag

    params = dag_settings(num_shards, full=full).parameters(w)
    runs = run_dag(params, str(out))
    shards = [next(iter(o.values())).path for o in runs["score-corpus-multi-stage"].outputs]
    return {
        "out": str(out),
        "pt_factors": primary_output(runs, "build-factors-pt"),
        "ft_factors": primary_output(runs, "build-factors-ft"),
        "pre": primary_output(runs, "precondition-queries-multi-stage"),
        "shards": shards,
        "scores-0": shards[0],
        "bm25": primary_output(runs, "bm25"),
        "ranking": primary_output(runs, "rank"),
    }
