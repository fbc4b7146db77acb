"""The main job: build (or reuse) the fact world and run the whole pipeline on it locally.

`msif run --runner kfp` (the default) runs the compiled KFP pipeline through kfp.local;
`--runner docker` runs it the same way with every node in the component image (its inputs
served over gs:// from a GCS emulator); `--runner inprocess` walks the same DAG in this
process. Either way the options are those of msif.config, with the fact world's sizes as
defaults, and each node prints one line when it finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from msif.config import (
    DataOptions,
    EigenOptions,
    FitOptions,
    IndexOptions,
    LookupOptions,
    ModelOptions,
    PreconditionOptions,
    RankOptions,
    ScoreOptions,
    add_options,
    from_namespace,
)
from msif.errors import OptionError
from msif.world.config import PRESETS

# The fact world's sequences are short and its model tiny: larger batches, shorter sequences.
WORLD_MODEL_OPTIONS = {"max_length": 64, "batch_size": 16}


@dataclass(frozen=True)
class JobSettings:
    """What the main job runs with: the pipeline's parameters apart from the world's URIs."""

    num_shards: int = 2
    model: ModelOptions = field(default_factory=lambda: ModelOptions(**WORLD_MODEL_OPTIONS))
    eigen: EigenOptions = field(default_factory=EigenOptions)
    precondition: PreconditionOptions = field(default_factory=PreconditionOptions)
    scoring: ScoreOptions = field(default_factory=ScoreOptions)
    ranking: RankOptions = field(default_factory=RankOptions)
    data: DataOptions = field(default_factory=DataOptions)  # the fact world's own columns
    indexing: IndexOptions = field(default_factory=IndexOptions)
    lookup: LookupOptions = field(default_factory=LookupOptions)
    fit: FitOptions = field(default_factory=FitOptions)

    def __post_init__(self) -> None:
        if isinstance(self.num_shards, bool) or self.num_shards < 1:
            raise OptionError(f"--num-shards must be at least 1, not {self.num_shards!r}")

    def index_parameters(self) -> dict:
        """The index and lookup parameters of the two-pipeline path (--via-index)."""
        from msif.workflow.dag import option_parameters

        return option_parameters(self.indexing, self.lookup)

    def parameters(self, world: dict) -> dict:
        """Pipeline parameters: the world's files, these options, CPU placement."""
        from msif.workflow.dag import option_parameters

        return {
            "pt_model_uri": str(world["pt_model"]),
            "ft_model_uri": str(world["ft_model"]),
            "corpus_uri": str(world["corpus"]),
            "finetune_data_uri": str(world["finetune"]),
            "queries_uri": str(world["queries"]),
            "num_shards": self.num_shards,
            **option_parameters(
                self.model,
                self.fit,
                self.eigen,
                self.precondition,
                self.scoring,
                self.ranking,
                self.data,
            ),
            "accelerator_count": 0,
            "gpu_node_selector": {},
        }


def add_parsers(sub) -> None:
    """`msif world` and `msif run`."""
    p = sub.add_parser("world", help="build (or reuse) the synthetic fact world")
    _world_arguments(p)
    p.set_defaults(run=world_command)

    p = sub.add_parser(
        "run",
        help="the main job: fact world + whole pipeline, locally",
        description="Build (or reuse) the fact world, then run every node of the pipeline on "
        "it and print where each method found the evidence. Options are the nodes' own.",
    )
    _world_arguments(p)
    p.add_argument("--out", default="msif-out", help="run directory (default: %(default)s)")
    p.add_argument(
        "--runner",
        default="kfp",
        choices=["kfp", "docker", "inprocess"],
        help="kfp: the compiled pipeline through kfp.local; docker: the same with every node "
        "in the component image (--image), inputs over gs:// from a GCS emulator; inprocess: "
        "the same DAG in this process (default: %(default)s)",
    )
    p.add_argument(
        "--image",
        default="msif:cpu",
        help="component image for --runner docker, in the daemon DOCKER_HOST names (build it "
        "with images/build.sh cpu; default: %(default)s)",
    )
    p.add_argument("--num-shards", type=int, default=2, help="shards (default: %(default)s)")
    p.add_argument(
        "--via-index",
        action="store_true",
        help="run the index pipeline (pre-train factors + corpus index), then the attribute "
        "pipeline on its outputs (fine-tune factors, lookup, exact rerank of the candidates): "
        "multi-stage and gradient-dot only, as single-stage's corpus side is θ_ft",
    )
    add_options(p, PreconditionOptions, skip=("method",))
    add_options(p, ScoreOptions)
    add_options(p, RankOptions, skip=("top_k",))
    add_options(p, EigenOptions)
    add_options(p, ModelOptions)
    add_options(p, FitOptions)
    add_options(p, IndexOptions)
    add_options(p, LookupOptions)
    p.set_defaults(run=run_command, **WORLD_MODEL_OPTIONS)


def _world_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="default",
        choices=list(PRESETS),
        help="default: 24 people, 336 documents; small: the CI-sized world; distractor: the "
        "default world plus 576 documents that name a person and the answer without stating "
        "the fact (nor teaching it), so BM25 stops being an oracle (default: %(default)s)",
    )
    p.add_argument("--world-seed", type=int, default=None, help="seed of the world (preset's)")
    p.add_argument(
        "--cache", default=None, help="cache dir (default: $MSIF_CACHE or ~/.cache/msif)"
    )


def settings_from(args: argparse.Namespace, world_alpha: float | None) -> JobSettings:
    """JobSettings from `msif run` flags; α defaults to the world's proximity coefficient."""
    alpha = args.alpha if args.alpha is not None else (world_alpha or None)
    return JobSettings(
        num_shards=args.num_shards,
        model=from_namespace(ModelOptions, args),
        eigen=from_namespace(EigenOptions, args),
        precondition=from_namespace(PreconditionOptions, args, alpha=alpha),
        scoring=from_namespace(ScoreOptions, args),
        ranking=from_namespace(RankOptions, args),
        indexing=from_namespace(IndexOptions, args),
        lookup=from_namespace(LookupOptions, args),
        fit=from_namespace(FitOptions, args),
    )


def say(text: str = "") -> None:
    """Print past kfp.local, which swaps builtins.print for an indenting one while it runs."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_inprocess(
    world: dict, out: Path, settings: JobSettings, *, via_index: bool = False
) -> dict:
    """The DAG in this process; metrics, per-task times and the ranking directory.

    via_index: the index pipeline, then the attribute pipeline on its outputs.
    """
    from msif.workflow.dag import ATTRIBUTE, INDEX
    from msif.workflow.inprocess import primary_output, run_dag
    from msif.workflow.local_run import attribute_parameters, node_line, parameters_of

    timings: dict[str, float] = {}

    def finished(run) -> None:
        timings[run.task.display_name] = run.seconds
        say(node_line(run.task.display_name, run.seconds, len(run.outputs)))

    params = settings.parameters(world)
    if via_index:
        given = {**params, **settings.index_parameters()}
        index = parameters_of(INDEX, given)
        runs = run_dag(index, str(out / "index"), on_task=finished, pipeline_name=INDEX)
        shards = [next(iter(o.values())).path for o in runs["index"].outputs]
        params = attribute_parameters(given, primary_output(runs, "build-factors-pt"), shards)
        runs = run_dag(
            params, str(out / "tasks"), ui_dir=out / "ui", on_task=finished,
            pipeline_name=ATTRIBUTE,
        )  # fmt: skip
    else:
        runs = run_dag(params, str(out / "tasks"), ui_dir=out / "ui", on_task=finished)
    ranking = primary_output(runs, "rank")
    metrics = json.loads((Path(ranking) / "metrics.json").read_text())
    return {"metrics": metrics, "timings": timings, "ranking": ranking}


def run_in_containers(
    world: dict, out: Path, settings: JobSettings, image: str, *, via_index: bool = False
) -> dict:
    """The compiled pipeline through kfp.local's DockerRunner, every node in image
    (via_index: the index pipeline, then the attribute pipeline)."""
    from msif.workflow import containers
    from msif.workflow.cli import components_in
    from msif.workflow.local_run import run_main_job_pipeline

    containers.docker_client(image).close()  # no daemon or no image: say so before uploading
    with containers.world_on_emulator(world) as (served, env):
        say(f"world served at gs://{containers.WORLD_BUCKET}/ on {env['STORAGE_EMULATOR_HOST']}")
        record = out / "containers.jsonl"  # what ran in which image, with its exit status
        record.unlink(missing_ok=True)
        with components_in(image), containers.docker_runner(image, env, record) as runner:
            result = run_main_job_pipeline(
                settings.parameters(served),
                out,
                on_node=say,
                runner=runner,
                prepare_root=containers.prepare_root,
                via_index=settings.index_parameters() if via_index else None,
            )
    return {**result, "inputs": {k: served[k] for k in containers.WORLD_INPUTS}}


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


def print_summary(world: dict, result: dict, out: Path) -> None:
    """The table a user sees at the end of the main job."""
    acc = world.get("accuracy", {})
    if acc:
        say("fine-tuned model accuracy: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    say("\nwhere each method ranked the first document that states the queried fact:")
    say("\n".join(evidence_lines(Path(result["ranking"]))))
    say("\n" + metric_table(result["metrics"]))
    say(f"\nreport: {Path(result['ranking']) / 'report.html'}")
    (out / "summary.json").write_text(json.dumps({**result, "world": world}, indent=1, default=str))


def world_command(args: argparse.Namespace) -> int:
    """`msif world`: build or reuse the fact world and print its paths."""
    world = build_world_paths(args.preset, args.world_seed, args.cache)
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


def run_command(args: argparse.Namespace) -> int:
    """`msif run`: the main job."""
    start = time.perf_counter()
    settings_from(args, None)  # bad options fail now, not after the world is built
    world = build_world_paths(args.preset, args.world_seed, args.cache)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # α defaults to the proximity coefficient the world was fine-tuned with: the design makes
    # it the fine-tune damping (a world fine-tuned without one gets relative damping).
    settings = settings_from(args, world["alpha"])
    say(f"running the pipeline ({args.runner}) under {out}")
    if args.runner == "kfp":
        from msif.workflow.local_run import run_main_job_pipeline

        via = settings.index_parameters() if args.via_index else None
        result = run_main_job_pipeline(settings.parameters(world), out, on_node=say, via_index=via)
    elif args.runner == "docker":
        result = run_in_containers(world, out, settings, args.image, via_index=args.via_index)
    else:
        result = run_inprocess(world, out, settings, via_index=args.via_index)
    print_summary(world, result, out)
    say(f"total wall time {time.perf_counter() - start:.0f}s")
    return 0
