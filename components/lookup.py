"""Pipeline node `lookup` (CPU): preconditioned queries against every index shard, top-C
(or BM25's top-C, or both)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output
from msif.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def lookup(
    index: Input[list[Artifact]],
    preconditioned: Input[Artifact],
    candidates: Output[Dataset],
    top_c: int,
    candidates_from: str,
    pt_factors: Input[Artifact] = None,
    bm25: Input[Dataset] = None,
):
    """Scores the queries against the corpus index and keeps the top-C: `msif lookup`.

    Args:
        index: Every shard's index output (the index pipeline's `index` artifacts).
        preconditioned: The precondition-queries output (multi-stage or gradient-dot).
        top_c: Candidate documents kept per query from each source, for score-corpus's
            exact rerank.
        candidates_from: index (the lookup's top-C), bm25 (BM25's top-C, the paper's
            pre-filter; the index is not read) or both (their union).
        pt_factors: The pre-train factors the index was built with; a projected index
            stores eigenbasis coordinates, which the queries are rotated into.
        bm25: The bm25 output, for candidates_from bm25 or both.

    Returns:
        candidates: candidates.parquet and candidates.json.
    """
    arguments = dict(locals())  # the signature is the CLI's: first, before any other name
    from msif.cli import run_subcommand

    run_subcommand("lookup", out=arguments.pop("candidates"), **arguments)
