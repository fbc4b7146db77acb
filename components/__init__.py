"""KFP v2 components of the msif pipeline, one module per node, named as the node.

Every component runs in `IMAGE` (see `msif.components.image`), installs nothing at run time
and passes its arguments, named like the flags of `msif NODE`, to `msif.cli.run_subcommand`,
so a pod, a local `kfp.local` run, the in-process runner and a test execute the same code.
"""

from msif.components.bm25 import bm25
from msif.components.build_factors import build_factors
from msif.components.eigendecompose import eigendecompose
from msif.components.fit_covariance import fit_covariance
from msif.components.fit_lambda import fit_lambda
from msif.components.image import DEFAULT_IMAGE, IMAGE, IMAGE_ENV
from msif.components.index import index
from msif.components.lookup import lookup
from msif.components.precondition_queries import precondition_queries
from msif.components.rank import rank
from msif.components.score_corpus import score_corpus
from msif.components.shard_indices import shard_indices

# Node name → component: the DAG (msif.workflow.dag) names nodes, this finds their code.
COMPONENTS = {
    "fit-covariance": fit_covariance,
    "eigendecompose": eigendecompose,
    "fit-lambda": fit_lambda,
    "build-factors": build_factors,
    "precondition-queries": precondition_queries,
    "index": index,
    "lookup": lookup,
    "score-corpus": score_corpus,
    "bm25": bm25,
    "rank": rank,
    "shard-indices": shard_indices,
}
COMPONENT_MODULES = (
    "msif.components.image",
    *(f"msif.components.{name.replace('-', '_')}" for name in COMPONENTS),
)

__all__ = ["COMPONENTS", "COMPONENT_MODULES", "DEFAULT_IMAGE", "IMAGE", "IMAGE_ENV", *COMPONENTS]
