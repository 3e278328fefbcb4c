"""The one error type of :mod:`splitfed.data`."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset or task cannot be loaded or used as configured.

    The message says what was wrong (the file, the column, the dataset name) and how to fix
    it. A ``ValueError`` subclass so callers that validate configs can catch both alike.
    """
