"""Pipeline node `bm25` (CPU): the BM25 text baseline in the score-corpus format."""

from kfp import dsl
from kfp.dsl import Dataset, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bm25(
    corpus: str,
    queries: str,
    scores: Output[Dataset],
    top_k: int,
    text_column: str,
    id_column: str,
    prompt_column: str,
    completion_column: str,
    messages_column: str,
    split: str,
):
    """BM25 of the corpus text against each query's prompt and completion: `msif bm25`.

    Args:
        corpus: The corpus: id and text (Parquet, datasets folder or JSON Lines).
        queries: The queries: id, prompt + completion or messages.
        top_k: Documents kept per query.
        text_column: Corpus column of the documents' text.
        id_column: Column of row ids; absent (default name): rows are named row-N.
        prompt_column: Column of the queries' prompts.
        completion_column: Column of the queries' completions.
        messages_column: Column of chat queries (lists of {role, content}).
        split: Split of a datasets DatasetDict folder; empty: its only split, else train.

    Returns:
        scores: scores.parquet and scores.json, as one shard of score-corpus.
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    run_subcommand("bm25", out=arguments.pop("scores"), **arguments)
