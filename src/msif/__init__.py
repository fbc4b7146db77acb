"""msif: multi-stage influence functions with EK-FAC curvature.

Data flows one way: data → model hooks → sums → factors → preconditioned queries → scores.
"""

from msif.correction import LambdaSums, fit_lambda
from msif.covariance import CovarianceSums, fit_covariance
from msif.data import (
    Example,
    batches,
    collate,
    tokenize_documents,
    tokenize_prompt_completion,
)
from msif.eigen import Eigenbasis, eigendecompose
from msif.errors import DataError, MismatchError, MsifError
from msif.factors import Damping, Factors
from msif.modules import ModuleSelection, ModuleSpec, find_modules
from msif.precondition import PreconditionedQueries, precondition_queries, query_gradients
from msif.score import Scores, iter_scores, score
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
    "fit_lambda",
    "iter_scores",
    "precondition_queries",
    "query_gradients",
    "score",
    "tokenize_documents",
    "tokenize_prompt_completion",
]
