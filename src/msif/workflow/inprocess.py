"""The DAG run in this process: every task's component body called directly, in DAG order.

The same component functions run as in a pod or under kfp.local, without containers or
subprocesses, so a run takes seconds of overhead instead of a minute. Primary outputs go
under `out` (a local directory or gs:// prefix, one sub-directory per task and shard);
outputs that only feed the Kubeflow UI (metrics, report copies) go under a local directory.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msif.storage.uri import join
from msif.workflow.dag import FULL, Task, arguments, pipeline


@dataclass
class LocalArtifact:
    """What a component body sees of an artifact here: its path (or gs:// URI), metadata."""

    path: str
    metadata: dict = field(default_factory=dict)

    def log_metric(self, name: str, value: float) -> None:
        """As kfp's Metrics.log_metric: kept in metadata."""
        self.metadata[name] = value


@dataclass
class TaskRun:
    """The outputs of one task (one dict per shard) and its wall time over all shards."""

    task: Task
    outputs: list[dict[str, LocalArtifact]]
    seconds: float


def run_dag(
    params: dict[str, Any],
    out: str,
    *,
    ui_dir: str | Path | None = None,
    on_task: Callable[[TaskRun], None] | None = None,
    pipeline_name: str = FULL,
) -> dict[str, TaskRun]:
    """Run every task of pipeline_name with pipeline parameters `params`; the runs by task id.

    What the pipeline imports from another run is read from its URI parameters, as the
    KFP pipeline's importers hand it over.
    """
    from msif.components import COMPONENTS

    ui_dir = Path(ui_dir or tempfile.mkdtemp(prefix="msif-ui-"))
    runs: dict[str, TaskRun] = {}
    spec = pipeline(pipeline_name)
    produced: dict[str, Any] = {}
    for imported in spec.imported:
        uris = params[imported.parameter]
        produced[imported.task_id] = (
            [LocalArtifact(str(u)) for u in uris] if imported.sharded else LocalArtifact(str(uris))
        )
    for task in spec.tasks:
        component = COMPONENTS[task.node]
        start, outputs = time.perf_counter(), []
        for shard in range(int(params["num_shards"])) if task.sharded else [None]:
            where = task.id if shard is None else f"{task.id}/{shard}"
            artifacts = _outputs(component, join(out, where), ui_dir / where)
            args = arguments(task, component.component_spec.inputs or {}, params, produced)
            if shard is not None:
                args["shard"] = shard
            component.python_func(**args, **artifacts)
            outputs.append(artifacts)
        runs[task.id] = TaskRun(task, outputs, time.perf_counter() - start)
        produced[task.id] = _published(runs[task.id])
        if on_task is not None:
            on_task(runs[task.id])
    return runs


def _outputs(component, where: str, ui: Path) -> dict[str, LocalArtifact]:
    names = list(component.component_spec.outputs or {})
    # The first output is the node's published directory; the rest only feed the UI.
    return {n: LocalArtifact(where if i == 0 else str(ui / n)) for i, n in enumerate(names)}


def _published(run: TaskRun) -> LocalArtifact | list[LocalArtifact]:
    """What later tasks read of a run: its first output, as a list when sharded (fan-in)."""
    first = [next(iter(o.values())) for o in run.outputs]
    return first if run.task.sharded else first[0]


def primary_output(runs: dict[str, TaskRun], task_id: str) -> str:
    """The published directory of an unsharded task."""
    return next(iter(runs[task_id].outputs[0].values())).path
