"""Atomic file output: a file is either absent or complete, never half-written.

Each writer writes to a temporary file in the destination's own directory (so that the
final rename stays on one file system) and renames it over the destination with
os.replace, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMPORARY = ".tmp-*"  # the names of atomic_path's temporary files (a glob pattern)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds.

    The temporary name ends with `path`'s whole name, since some writers choose the format
    from the suffix (Keras wants .keras, .weights.h5). On any exception the temporary file is removed and
    `path` is left as it was. Temporary files of `path` that a killed process left behind are
    removed when it is next written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{TEMPORARY}-{glob.escape(path.name)}"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMPORARY.rstrip("*"), suffix=f"-{path.name}")
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically and returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` atomically and returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes `obj` as indented JSON to `path` atomically and returns the path."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def non_finite_weight(variables) -> str | None:
    """The name of the first variable (Keras 3 or tf_keras) holding NaN or infinite values, or None."""
    import numpy as np

    for v in variables:
        if not np.isfinite(np.asarray(v.numpy() if hasattr(v, "numpy") else v)).all():
            return getattr(v, "path", v.name)
    return None


def save_model(model, path: str | os.PathLike) -> Path:
    """Saves a Keras model as .keras atomically and returns the path; refuses one with a
    non-finite weight."""
    from tfsubspace.errors import TfSubspaceError

    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"A model is saved in the .keras format; expected a path ending in .keras. Received: {path}")
    bad = non_finite_weight(model.weights)  # a file with a NaN weight would be reused as if it were sound
    if bad is not None:
        raise TfSubspaceError(f"Not saving {path}: weight {bad} of model {model.name!r} holds NaN or infinite values.")
    with atomic_path(path) as tmp:
        model.save(tmp)
    return path


def load_model(path: str | os.PathLike, *, safe_mode: bool = True):
    """Loads a .keras model, with a clear error for a missing, truncated or corrupt file.

    Keras's safe mode stays on unless `safe_mode=False`: a file that would deserialize a
    Lambda or other arbitrary code is refused, so a model someone handed you cannot run code.
    """
    import zipfile

    import keras

    from tfsubspace.errors import TfSubspaceError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Model file not found: {path}")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise TfSubspaceError(f"{path} is not a .keras model file (a zip archive); it may be truncated or corrupt.")
    try:
        return keras.models.load_model(path, safe_mode=safe_mode)
    except Exception as e:  # Keras raises many types for a bad archive; name the file in one
        hint = (
            " It holds code (e.g. a Lambda layer); load it with safe_mode=False only if you trust it."
            if ("safe_mode" in str(e))
            else ""
        )
        raise TfSubspaceError(f"Cannot load model {path}: {type(e).__name__}: {e}.{hint}") from None
