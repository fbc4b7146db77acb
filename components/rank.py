"""Pipeline node `rank` (CPU): merge every method's shard scores, evaluate, write the report."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def rank(
    corpus_uri: str,
    queries_uri: str,
    top_k: int,
    multi_stage_scores: Input[list[Artifact]],
    single_stage_scores: Input[list[Artifact]],
    gradient_dot_scores: Input[list[Artifact]],
    bm25_scores: Input[Artifact],
    pt_factors: Input[Artifact],
    ft_factors: Input[Artifact],
    ranking: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
    report_html: Output[HTML],
):
    """`msif rank`, then its metrics and reports as the KFP UI's Metrics/Markdown/HTML."""
    # Only msif.cli and msif.evaluation.metrics here: in a pod, kfp's runtime-only `dsl`
    # cannot define components, so importing msif.components would fail.
    import json
    import shutil
    from pathlib import Path

    from msif.cli import main
    from msif.evaluation.metrics import kfp_metrics

    shards = [*multi_stage_scores, *single_stage_scores, *gradient_dot_scores, bm25_scores]
    argv = ["rank", "--scores", *[s.path for s in shards]]
    argv += ["--corpus", corpus_uri, "--queries", queries_uri, "--top-k", str(top_k)]
    argv += ["--factors", pt_factors.path, ft_factors.path]
    rc = main([*argv, "--out", ranking.path])
    if rc != 0:
        raise RuntimeError(f"msif rank failed with exit code {rc}")
    out = Path(ranking.path)
    for name, value in sorted(kfp_metrics(json.loads((out / "metrics.json").read_text())).items()):
        metrics.log_metric(name, value)
    for source, target in ((out / "report.md", report), (out / "report.html", report_html)):
        Path(target.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target.path)
