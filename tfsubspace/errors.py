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


class DataError(TfSubspaceError, ValueError):
    """Data passed in cannot be used as it is (wrong shape, empty, non-finite, unsupported
    structure); the message names the argument and what to change."""


class DatasetNotAvailableError(TfSubspaceError, FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


class UnsupportedModelError(TfSubspaceError, ValueError):
    """A model (or one of its layers) that tfsubspace cannot analyse or rebuild."""


class WorkDirError(TfSubspaceError):
    """A work directory that cannot be used: held by another process, made for other inputs,
    or holding a damaged stage file."""


class DataMismatchWarning(UserWarning):
    """The data a model is given does not look like the data it was trained on."""
