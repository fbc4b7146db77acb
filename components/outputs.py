"""Turn a ranking directory into the KFP UI's Metrics, Markdown and HTML artifacts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """metrics.json as flat KFP metric names: methods.M.K → `M_K` (`@` → `-at-`), top level K → K.

    Booleans, strings and non-finite numbers are left out: the KFP UI shows numbers only.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "methods" and isinstance(value, dict):
            for method, per_method in value.items():
                for name, number in per_method.items():
                    _put(flat, f"{method}_{name}", number)
        else:
            _put(flat, key, value)
    return flat


def _put(flat: dict[str, float], name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if math.isfinite(value):
        flat[name.replace("@", "-at-")] = float(value)


def kfp_metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat metric values, from `msif.metrics.kfp_metrics` when the library provides it."""
    try:
        from msif.metrics import kfp_metrics
    except ImportError:
        return flatten_metrics(metrics)
    return kfp_metrics(metrics)


def publish_rank_outputs(ranking_dir: str, metrics: Any, report_path: str, html_path: str) -> dict:
    """Log every metric of ranking_dir/metrics.json on `metrics` and copy both reports."""
    root = Path(ranking_dir)
    values = kfp_metric_values(json.loads((root / "metrics.json").read_text()))
    for name, value in sorted(values.items()):
        metrics.log_metric(name, value)
    for source, target in ((root / "report.md", report_path), (root / "report.html", html_path)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return values
