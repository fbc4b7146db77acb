"""The pipeline's nodes, one module each, named as in every other layer (DAG task, KFP
component, `msif` subcommand, manifest `node` field): see docs/design.md §3.

Each node module has `NAME`, `add_parser(subparsers)` and `run(...)`; `runtime` holds what
they share.
"""

from msif.nodes import (
    bm25,
    build_factors,
    eigendecompose,
    fit_covariance,
    fit_lambda,
    index,
    lookup,
    precondition_queries,
    rank,
    score_corpus,
)

# Data-flow order: the order `msif --help` lists them in.
NODES = (
    fit_covariance,
    eigendecompose,
    fit_lambda,
    build_factors,
    precondition_queries,
    index,
    lookup,
    score_corpus,
    bm25,
    rank,
)
BY_NAME = {node.NAME: node for node in NODES}
