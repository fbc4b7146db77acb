"""Pipeline node `rank` (CPU): merge every method's shard scores, evaluate, write the report."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def rank(
    corpus: str,
    queries: str,
    bm25_scores: Input[Artifact],
    pt_factors: Input[Artifact],
    ft_factors: Input[Artifact],
    ranking: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
    report_html: Output[HTML],
    top_k: int,
    report_k: int,
    text_column: str,
    id_column: str,
    prompt_column: str,
    completion_column: str,
    messages_column: str,
    split: str,
    multi_stage_scores: Input[list[Artifact]] = None,
    single_stage_scores: Input[list[Artifact]] = None,
    gradient_dot_scores: Input[list[Artifact]] = None,
):
    """Merges every shard's top-k per method and evaluates them: `msif rank`.

    Args:
        corpus: The scored corpus (snippets for the report).
        queries: The queries; their relevant_ids give MRR and recall@10.
        bm25_scores: The bm25 output.
        pt_factors: Pre-train factors (their Λ spectrum is plotted).
        ft_factors: Fine-tune factors (likewise).
        top_k: Documents kept per query and method.
        report_k: Documents per query shown in the report.
        text_column: Corpus column of the documents' text (snippets).
        id_column: Column of row ids; absent (default name): rows are named row-N.
        prompt_column: Column of the queries' prompts.
        completion_column: Column of the queries' completions.
        messages_column: Column of chat queries (lists of {role, content}).
        split: Split of a datasets DatasetDict folder; empty: its only split, else train.
        multi_stage_scores: Every score-corpus (multi-stage) shard output.
        single_stage_scores: Every score-corpus (single-stage) shard output; unconnected in
            the attribute pipeline, which leaves the method out.
        gradient_dot_scores: Every score-corpus (gradient-dot) shard output.

    Returns:
        ranking: ranking.parquet, metrics.json, report.md and report.html.
        metrics: MRR and recall@10 per method, for the run's Metrics view.
        report: The Markdown report, for the run's Markdown view.
        report_html: The self-contained HTML report.
    """
    # Only msif.cli, msif.evaluation and msif.storage here: in a pod, kfp's runtime-only `dsl`
    # cannot define components, so importing msif.components would fail.
    import json
    import shutil
    from pathlib import Path

    from msif.cli import run_subcommand
    from msif.evaluation.metrics import kfp_metrics
    from msif.storage.cache import local_input_dir

    methods = (multi_stage_scores, single_stage_scores, gradient_dot_scores)
    shards = [shard for scores in methods for shard in scores or ()] + [bm25_scores]
    run_subcommand(
        "rank",
        scores=shards,
        corpus=corpus,
        queries=queries,
        factors=[pt_factors, ft_factors],
        top_k=top_k,
        report_k=report_k,
        text_column=text_column,
        id_column=id_column,
        prompt_column=prompt_column,
        completion_column=completion_column,
        messages_column=messages_column,
        split=split,
        out=ranking,
    )
    # Read back through its manifest: verified, and local even when published to gs://.
    out = local_input_dir(ranking.path)
    for name, value in sorted(kfp_metrics(json.loads((out / "metrics.json").read_text())).items()):
        metrics.log_metric(name, value)
    for source, target in ((out / "report.md", report), (out / "report.html", report_html)):
        Path(target.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target.path)
