"""KFP v2 components of the msif pipeline: one thin wrapper around `msif.cli.main` per node.

Every component runs in `IMAGE` (see `msif.components.image`), installs nothing at run time
and maps its KFP artifact paths onto the CLI of docs/CONTRACTS.md, so a pod, a local
`kfp.local` run and a test execute the same code.
"""

from msif.components.bm25_scores import bm25_scores
from msif.components.build_factors import build_factors
from msif.components.eigendecompose import eigendecompose
from msif.components.fit_covariance import fit_covariance
from msif.components.fit_lambda import fit_lambda
from msif.components.image import DEFAULT_IMAGE, IMAGE, IMAGE_ENV
from msif.components.query_gradients import query_gradients
from msif.components.rank import rank
from msif.components.score_shard import score_shard
from msif.components.shard_indices import shard_indices

COMPONENT_MODULES = (
    "msif.components.image",
    "msif.components.shard_indices",
    "msif.components.fit_covariance",
    "msif.components.eigendecompose",
    "msif.components.fit_lambda",
    "msif.components.build_factors",
    "msif.components.query_gradients",
    "msif.components.score_shard",
    "msif.components.bm25_scores",
    "msif.components.rank",
)

__all__ = [
    "DEFAULT_IMAGE",
    "IMAGE",
    "IMAGE_ENV",
    "bm25_scores",
    "build_factors",
    "eigendecompose",
    "fit_covariance",
    "fit_lambda",
    "query_gradients",
    "rank",
    "score_shard",
    "shard_indices",
]
