"""Run the KFP pipeline on this machine with kfp.local, exactly as compiled for a cluster.

`kfp.local.SubprocessRunner(use_venv=False)` executes every component of
`msif.pipelines.multi_stage_influence` in a subprocess of the current interpreter: the same
component bodies, `ParallelFor` fan-out, `dsl.Collected` fan-in, optional inputs, retries and
two-step artifact passing as on Kubeflow. Nothing the pipeline uses is missing locally (kfp
2.17.3, given the pipeline's fix for resource parameters inside ParallelFor, see `_on_gpu`
there). Without local effect are only placement settings (accelerator, CPU and memory
requests, toleration, node selector, pod label; kfp.local warns that it ignores them and
those warnings are silenced here) and the container image: tasks run in this environment.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any

from msif.errors import MsifError

log = logging.getLogger("msif")
RANK_TASK = "rank"
RANK_FILES = {"ranking": "ranking", "report_md": "report", "report_html": "report_html"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LocalRunError(MsifError):
    """The local pipeline run could not start, failed, or left no rank outputs."""


def pipeline_parameters() -> dict[str, bool]:
    """The pipeline's parameter names, each mapped to whether it is required."""
    from msif.pipelines.multi_stage_influence import multi_stage_influence

    inputs = multi_stage_influence.component_spec.inputs or {}
    return {name: not spec.optional for name, spec in inputs.items()}


def check_parameters(params: dict[str, Any]) -> None:
    """Refuse unknown and missing pipeline parameters with one clear line."""
    known = pipeline_parameters()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise LocalRunError(
            f"unknown pipeline parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    missing = sorted(k for k, required in known.items() if required and k not in params)
    if missing:
        raise LocalRunError(f"missing required pipeline parameter(s) {', '.join(missing)}")


def run_pipeline_locally(params: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    """Run the whole pipeline under pipeline_root; return the paths of the rank node's outputs.

    Keys: `run_dir`, `ranking` (the ranking directory of docs/CONTRACTS.md), `metrics_json`,
    `ranking_parquet`, `report_md`, `report_html` (the copies the Kubeflow UI shows), and
    `kfp_metrics`: the values logged on the Metrics artifact (KFP keeps them in the
    artifact's metadata, recorded in the task's executor_output.json, not in a file).
    """
    from kfp import local

    from msif.pipelines.multi_stage_influence import multi_stage_influence

    check_parameters(params)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            multi_stage_influence(**params)
        except RuntimeError as exc:
            raise LocalRunError(f"local pipeline run failed: {_first_line(exc)}") from exc
    return rank_outputs(root, before)


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rank_outputs(root: Path, before: set[str]) -> dict[str, Any]:
    """The rank outputs of the one run directory that appeared under root since `before`."""
    runs = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in before)
    if len(runs) != 1:
        raise LocalRunError(f"expected one new pipeline run under {root}, found {len(runs)}")
    task = runs[0] / RANK_TASK
    paths = {key: task / name for key, name in RANK_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise LocalRunError(f"the rank node left no output at {missing[0]}")
    ranking = paths["ranking"]
    return {
        "run_dir": str(runs[0]),
        "ranking": str(ranking),
        "metrics_json": str(ranking / "metrics.json"),
        "ranking_parquet": str(ranking / "ranking.parquet"),
        "report_md": str(paths["report_md"]),
        "report_html": str(paths["report_html"]),
        "kfp_metrics": logged_metrics(task / "executor_output.json"),
    }


def logged_metrics(executor_output: Path) -> dict[str, float]:
    """The values the rank node logged on its Metrics artifact."""
    try:
        out = json.loads(executor_output.read_text())
        return dict(out["artifacts"]["metrics"]["artifacts"][0]["metadata"])
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise LocalRunError(f"no logged metrics in {executor_output}: {exc}") from None


def main_job_parameters(world: dict, settings: Any) -> dict[str, Any]:
    """Pipeline parameters for the main job: the world's files and the job's settings."""
    return {
        "pt_model_uri": str(world["pt_model"]),
        "ft_model_uri": str(world["ft_model"]),
        "corpus_uri": str(world["corpus"]),
        "finetune_data_uri": str(world["finetune"]),
        "queries_uri": str(world["queries"]),
        "num_shards": settings.num_shards,
        "max_length": settings.max_length,
        "batch_size": settings.batch_size,
        "damping_factor": settings.damping_factor,
        # The pipeline spells "relative α" as alpha <= 0 (a KFP float cannot be None).
        "alpha": settings.alpha if settings.alpha is not None else 0.0,
        "query_rank": settings.rank,
        "top_k": settings.top_k,
        "accelerator_count": 0,
        "gpu_node_selector": {},
        "seed": settings.seed,
    }


def run_main_job_pipeline(world: dict, out: Path, settings: Any) -> dict[str, Any]:
    """The main job through kfp.local: metrics, wall time and the ranking directory."""
    start = time.perf_counter()
    paths = run_pipeline_locally(main_job_parameters(world, settings), Path(out) / "kfp")
    elapsed = time.perf_counter() - start
    log.info("kfp.local run finished in %.0fs: %s", elapsed, paths["run_dir"])
    metrics = json.loads(Path(paths["metrics_json"]).read_text())
    return {
        "metrics": metrics,
        "timings": {"pipeline (kfp.local)": elapsed},
        "ranking": paths["ranking"],
        "outputs": paths,
    }
