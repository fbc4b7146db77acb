"""Pipeline node `bm25` (CPU): the text-only BM25 baseline, as shard 0 of 1 scores."""

from kfp import dsl
from kfp.dsl import Dataset, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bm25_scores(corpus_uri: str, queries_uri: str, top_k: int, scores: Output[Dataset]):
    """`msif bm25` over the whole corpus."""
    from msif.cli import main

    argv = ["bm25", "--corpus", corpus_uri, "--queries", queries_uri, "--top-k", str(top_k)]
    rc = main([*argv, "--out", scores.path])
    if rc != 0:
        raise RuntimeError(f"msif bm25 failed with exit code {rc}")
