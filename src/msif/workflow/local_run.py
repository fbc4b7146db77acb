"""Run the KFP pipeline on this machine with kfp.local, exactly as compiled for a cluster.

`kfp.local.SubprocessRunner(use_venv=False)` executes every component of a pipeline of
msif.pipelines (`multi_stage_influence` unless another is named) in a subprocess of the
current interpreter: the same component bodies, `ParallelFor` fan-out, `dsl.Collected`
fan-in, optional inputs, importers, retries and two-step artifact passing as on Kubeflow.
Nothing the pipelines use is missing locally (kfp 2.17.3, given msif.pipelines.build's fixes
for resource parameters inside ParallelFor and for a fan-in read twice). Without local
effect are only placement settings (accelerator, CPU and memory requests, toleration, node
selector, pod label; kfp.local warns that it ignores them and those warnings are silenced
here) and the container image: tasks run in this environment.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from msif.errors import MsifError
from msif.storage.publish import MARKER
from msif.workflow.dag import FULL, pipeline

log = logging.getLogger("msif")
RANK_TASK = "rank"
RANK_FILES = {"ranking": "ranking", "report_md": "report", "report_html": "report_html"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LocalRunError(MsifError):
    """The local pipeline run could not start, failed, or left no rank outputs."""


def pipeline_function(name: str = FULL) -> Any:
    """The KFP pipeline called name: `msif.pipelines.<module>.<module>`."""
    module = pipeline(name).module
    return getattr(importlib.import_module(f"msif.pipelines.{module}"), module)


def pipeline_parameters(name: str = FULL) -> dict[str, bool]:
    """The pipeline's parameter names, each mapped to whether it is required."""
    inputs = pipeline_function(name).component_spec.inputs or {}
    return {name: not spec.optional for name, spec in inputs.items()}


def check_parameters(params: dict[str, Any], name: str = FULL) -> None:
    """Refuse unknown and missing pipeline parameters with one clear line."""
    known = pipeline_parameters(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise LocalRunError(
            f"unknown pipeline parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    missing = sorted(k for k, required in known.items() if required and k not in params)
    if missing:
        raise LocalRunError(f"missing required pipeline parameter(s) {', '.join(missing)}")


def run_pipeline_locally(
    params: dict[str, Any], pipeline_root: Path, runner: Any = None, pipeline_name: str = FULL
) -> dict[str, Any]:
    """Run a whole pipeline under pipeline_root; return the paths of its outputs.

    runner: a kfp.local runner; None is SubprocessRunner(use_venv=False), this environment.

    Keys: `run_dir`; `outputs`, every published output directory by DAG task id (a list,
    one per shard, in shard order), e.g. `build-factors-pt` and `index` of the index
    pipeline. A pipeline with a rank node adds `ranking` (the ranking directory of
    docs/CONTRACTS.md), `metrics_json`, `ranking_parquet`, `report_md`, `report_html` (the
    copies the Kubeflow UI shows), and `kfp_metrics`: the values logged on the Metrics
    artifact (KFP keeps them in the artifact's metadata, recorded in the task's
    executor_output.json, not in a file).
    """
    from kfp import local

    run = pipeline_function(pipeline_name)
    check_parameters(params, pipeline_name)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    runner = runner or local.SubprocessRunner(use_venv=False)
    local.init(runner=runner, pipeline_root=str(root))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            run(**params)
        except RuntimeError as exc:
            raise LocalRunError(f"local pipeline run failed: {_first_line(exc)}") from exc
    if any(task.node == RANK_TASK for task in pipeline(pipeline_name).tasks):
        paths = rank_outputs(root, before)
    else:
        paths = {"run_dir": str(_new_run(root, before))}
    paths["outputs"] = published_outputs(Path(paths["run_dir"]))
    return paths


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rank_outputs(root: Path, before: set[str]) -> dict[str, Any]:
    """The rank outputs of the one run directory that appeared under root since `before`."""
    run_dir = _new_run(root, before)
    task = run_dir / RANK_TASK
    paths = {key: task / name for key, name in RANK_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise LocalRunError(f"the rank node left no output at {missing[0]}")
    ranking = paths["ranking"]
    return {
        "run_dir": str(run_dir),
        "ranking": str(ranking),
        "metrics_json": str(ranking / "metrics.json"),
        "ranking_parquet": str(ranking / "ranking.parquet"),
        "report_md": str(paths["report_md"]),
        "report_html": str(paths["report_html"]),
        "kfp_metrics": logged_metrics(task / "executor_output.json"),
    }


def _new_run(root: Path, before: set[str]) -> Path:
    runs = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in before)
    if len(runs) != 1:
        raise LocalRunError(f"expected one new pipeline run under {root}, found {len(runs)}")
    return runs[0]


def published_outputs(run_dir: Path) -> dict[str, list[str]]:
    """Every msif output under run_dir, by the DAG task id its manifest names, in shard order."""
    found: dict[str, list[tuple[int, str]]] = {}
    for marker in run_dir.rglob(MARKER):
        meta = json.loads(marker.read_text()).get("metadata", {})
        label = meta.get("stage") or meta.get("method")
        task_id = meta.get("node", "?") + (f"-{label}" if label else "")
        found.setdefault(task_id, []).append((int(meta.get("shard", 0)), str(marker.parent)))
    return {task_id: [d for _, d in sorted(dirs)] for task_id, dirs in sorted(found.items())}


def run_index_then_attribute(
    params: dict[str, Any], indexing: dict[str, Any], root: Path, runner: Any = None
) -> dict[str, Any]:
    """The index pipeline, then the attribute pipeline on its pre-train factors and index
    shards; the attribute run's outputs (as run_pipeline_locally), with `index_run_dir`.

    params: the full pipeline's parameters (each pipeline takes those it has); indexing: the
    index and lookup parameters.
    """
    from msif.workflow.dag import ATTRIBUTE, INDEX

    given = {**params, **indexing}
    indexed = run_pipeline_locally(parameters_of(INDEX, given), root, runner, INDEX)
    (pt_factors,) = indexed["outputs"]["build-factors-pt"]
    attribute = attribute_parameters(given, pt_factors, indexed["outputs"]["index"])
    paths = run_pipeline_locally(attribute, root, runner, ATTRIBUTE)
    return {**paths, "index_run_dir": indexed["run_dir"]}


def parameters_of(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The parameters of given that pipeline name takes."""
    known = pipeline_parameters(name)
    return {k: v for k, v in given.items() if k in known}


def attribute_parameters(
    given: dict[str, Any], pt_factors: str, index_uris: list[str]
) -> dict[str, Any]:
    """The attribute pipeline's parameters: those of given it takes, and an index run's
    pre-train factors and index shards."""
    from msif.workflow.dag import ATTRIBUTE

    return {
        **parameters_of(ATTRIBUTE, given),
        "pt_factors_uri": pt_factors,
        "index_uris": list(index_uris),
    }


def logged_metrics(executor_output: Path) -> dict[str, float]:
    """The values the rank node logged on its Metrics artifact."""
    try:
        out = json.loads(executor_output.read_text())
        return dict(out["artifacts"]["metrics"]["artifacts"][0]["metadata"])
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise LocalRunError(f"no logged metrics in {executor_output}: {exc}") from None


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[TextIO]:
    """Send this process's and its children's stdout and stderr to log_path; yield the
    terminal's stdout, so the caller can still print progress lines there."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(log_path, "ab") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


def node_line(name: str, seconds: float, shards: int = 1) -> str:
    """The line printed when a node (or one shard of it) finishes."""
    times = f" ×{shards}" if shards > 1 else ""
    return f"  done {name:<44}{times:>4} {seconds:7.1f}s"


class NodeWatcher(threading.Thread):
    """Reports each node's output as it is published (its manifest appears), with wall time."""

    def __init__(self, root: Path, report: Callable[[str], None], interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.report, self.interval = root, report, interval
        self.seen: set[Path] = set()
        self.stopped = threading.Event()

    def run(self) -> None:
        """Poll until stopped, then once more."""
        while not self.stopped.wait(self.interval):
            self.poll()
        self.poll()

    def poll(self) -> None:
        """Report manifests that appeared since the last poll."""
        for marker in sorted(self.root.rglob(MARKER)):
            if marker in self.seen:
                continue
            self.seen.add(marker)
            try:
                meta = json.loads(marker.read_text()).get("metadata", {})
            except (OSError, ValueError):
                self.seen.discard(marker)  # still being written: next poll
                continue
            node = meta.get("node", "?")
            label = meta.get("stage") or meta.get("method")
            name = node + (f" ({label})" if label and label != node else "")
            shard = f" shard {meta['shard']}" if meta.get("num_shards", 1) > 1 else ""
            self.report(node_line(name + shard, float(meta.get("wall_s", 0.0))))


def run_main_job_pipeline(
    params: dict[str, Any],
    out: Path,
    *,
    on_node: Callable[[str], None] = print,
    runner: Any = None,
    prepare_root: Callable[[Path], None] | None = None,
    via_index: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The main job through kfp.local: kfp's logs go to out/kfp.log, one line per node to
    on_node; returns metrics, the ranking directory and the run's outputs.

    runner: as for run_pipeline_locally; prepare_root is called on the new pipeline root.
    via_index: instead of the full pipeline, the index pipeline, then the attribute pipeline
    on its outputs; these are the index and lookup parameters (index_rank, top_c, ...).
    """
    start = time.perf_counter()
    root, log_path = Path(out) / "kfp", Path(out) / "kfp.log"
    on_node(f"kfp.local logs: {log_path}")
    root.mkdir(parents=True, exist_ok=True)
    if prepare_root is not None:
        prepare_root(root)
    with output_to(log_path) as terminal:
        watcher = NodeWatcher(root, lambda line: print(line, file=terminal, flush=True))
        watcher.start()
        try:
            if via_index is None:
                paths = run_pipeline_locally(params, root, runner)
            else:
                paths = run_index_then_attribute(params, via_index, root, runner)
        finally:
            watcher.stopped.set()
            watcher.join()
    elapsed = time.perf_counter() - start
    log.info("kfp.local run finished in %.0fs: %s", elapsed, paths["run_dir"])
    metrics = json.loads(Path(paths["metrics_json"]).read_text())
    return {
        "metrics": metrics,
        "timings": {"pipeline (kfp.local)": elapsed},
        "ranking": paths["ranking"],
        "outputs": paths,
        "log": str(log_path),
    }
