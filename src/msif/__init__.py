"""msif: multi-stage influence functions with EK-FAC curvature.

Data flows one way: data → model hooks → sums → factors → preconditioned queries → scores.
"""

from msif.attribution.precondition import (
    PreconditionedQueries,
    precondition_queries,
    query_gradients,
)
from msif.attribution.scoring import Scores, iter_scores, score
from msif.core.modules import ModuleSelection, ModuleSpec, find_modules
from msif.data.examples import (
    Example,
    batches,
    collate,
    tokenize_documents,
    tokenize_prompt_completion,
)
from msif.ekfac.covariance import CovarianceSums, fit_covariance
from msif.ekfac.eigenbasis import Eigenbasis, eigendecompose
from msif.ekfac.factors import Damping, Factors
from msif.ekfac.fit import fit_factors
from msif.ekfac.lambdas import LambdaSums, fit_lambda
from msif.errors import DataError, MismatchError, MsifError
from msif.version import __version__

__all__ = [
    "CovarianceSums",
    "Damping",
    "DataError",
    "Eigenbasis",
    "Example",
    "Factors",
    "LambdaSums",
    "MismatchError",
    "ModuleSelection",
    "ModuleSpec",
    "MsifError",
    "PreconditionedQueries",
    "Scores",
    "__version__",
    "batches",
    "collate",
    "eigendecompose",
    "find_modules",
    "fit_covariance",
    "fit_factors",
    "fit_lambda",
    "iter_scores",
    "precondition_queries",
    "query_gradients",
    "score",
    "tokenize_documents",
    "tokenize_prompt_completion",
]
