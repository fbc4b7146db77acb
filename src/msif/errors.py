"""Errors msif raises for bad input; the CLI prints them as one line and exits non-zero."""


class MsifError(Exception):
    """Base class for every error caused by the user's input, data or environment."""


class MismatchError(MsifError):
    """Artifacts that do not belong together (other model, other factors, other modules)."""


class DataError(MsifError):
    """Input tables or batches that violate the data contract."""
