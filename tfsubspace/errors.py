"""The exceptions tfsubspace raises for bad input.

Every error a user can cause by what they pass in (a file, a flag, a model, a data set)
is one of these, with a message that names the offending thing and says what to do.
They subclass the matching builtin (ValueError, FileNotFoundError) so that callers who
catch the builtin keep working.
"""


class TfSubspaceError(Exception):
    """Base class of every error tfsubspace raises on purpose."""


class DataFileError(TfSubspaceError, ValueError):
    """A data file exists but is not what it should be (corrupt, truncated, mismatched)."""


class DatasetNotAvailableError(TfSubspaceError, FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


class UnsupportedModelError(TfSubspaceError, ValueError):
    """A model (or one of its layers) that tfsubspace cannot analyse or rebuild."""


class DataMismatchWarning(UserWarning):
    """The data a model is given does not look like the data it was trained on."""
