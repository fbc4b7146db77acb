"""Pipeline node `bm25` (CPU): the BM25 text baseline in the score-corpus format."""

from kfp import dsl
from kfp.dsl import Dataset, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bm25(corpus: str, queries: str, scores: Output[Dataset], top_k: int):
    """BM25 of the corpus text against each query's prompt and completion: `msif bm25`.

    Args:
        corpus: Parquet with id and text.
        queries: Parquet with id, prompt, completion.
        top_k: Documents kept per query.

    Returns:
        scores: scores.parquet and scores.json, as one shard of score-corpus.
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    run_subcommand("bm25", out=arguments.pop("scores"), **arguments)
