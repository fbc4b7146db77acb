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
    """`msif rank`, then the metrics, Markdown and HTML report as KFP UI artifacts."""
    from msif.components.outputs import publish_rank_outputs

    from msif.cli import main

    shards = [*multi_stage_scores, *single_stage_scores, *gradient_dot_scores, bm25_scores]
    argv = ["rank", "--scores", *[s.path for s in shards]]
    argv += ["--corpus", corpus_uri, "--queries", queries_uri, "--top-k", str(top_k)]
    argv += ["--factors", pt_factors.path, ft_factors.path]
    rc = main([*argv, "--out", ranking.path])
    if rc != 0:
        raise RuntimeError(f"msif rank failed with exit code {rc}")
    publish_rank_outputs(ranking.path, metrics, report.path, report_html.path)
