"""The work directory of a resumable run: one process at a time, and only for the inputs it
was made for.

A rerun into a work directory reuses its finished stages, which is right only when the
teacher, the options and the data are those that made them. `WorkDir.claim(manifest)`
writes `manifest.json` on the first run and compares it on every later one: a mismatch is a
WorkDirError that lists what differs (`overwrite=True` clears the stages and starts over).
A lock file refuses a second process on the same directory while the first runs; the lock is
an flock, which the kernel releases when its process dies, so a killed run leaves no lock
behind that stops the next one (the file itself stays).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np

from tfsubspace import fileio
from tfsubspace.errors import WorkDirError

MANIFEST = "manifest.json"
LOCK = ".lock"


def model_fingerprint(model: keras.Model) -> dict:
    """Hashes of a model's architecture (its config) and of its weights' values."""
    architecture = json.dumps(model.get_config(), sort_keys=True, default=str)
    weights = hashlib.sha256()
    for w in model.weights:
        weights.update(str(tuple(w.shape)).encode())
        weights.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return {
        "name": model.name,
        "architecture": hashlib.sha256(architecture.encode()).hexdigest()[:16],
        "weights": weights.hexdigest()[:16],
        "params": int(model.count_params()),
    }


class WorkDir:
    """A locked work directory whose stage files belong to one manifest.

    Args:
        path: the directory (created if missing).
        produced: glob patterns of every file and folder the run writes there; `overwrite`
            removes those, and nothing else, so a directory shared with other files is safe.
    """

    def __init__(self, path, produced=("*",)):
        self.path = Path(path)
        self.produced = tuple(produced)
        self._lock = None

    def __enter__(self) -> WorkDir:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise WorkDirError(
                f"{self.path} is in use by {holder}; wait for it to finish or use another work_dir."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()}\n")
        lock.flush()
        self._lock = lock
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()  # the file stays: unlinking it would let two later runs lock two inodes
            self._lock = None

    def claim(self, manifest: dict, *, overwrite: bool = False) -> bool:
        """Makes the directory this manifest's. Returns True when it holds earlier stages of
        the same run (a resume), False for a fresh start."""
        path = self.path / MANIFEST
        if overwrite:
            self.clear()
        elif path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise WorkDirError(
                    f"{path} is damaged ({e}); pass overwrite=True (--overwrite) to start over."
                ) from None
            differences = _differences(old, manifest)
            if differences:
                listed = "\n".join(f"  {d}" for d in differences[:12])
                more = f"\n  ... and {len(differences) - 12} more" if len(differences) > 12 else ""
                raise WorkDirError(
                    f"{self.path} holds a run made with other inputs; reusing its stages would return the other "
                    f"run's student. What differs (earlier -> now):\n{listed}{more}\n"
                    "Pass overwrite=True (--overwrite) to start over there, or use another work_dir."
                )
            return True
        elif any(self._produced_files()):
            raise WorkDirError(
                f"{self.path} holds stage files but no {MANIFEST} (a run of an older tfsubspace, or "
                "files of something else); pass overwrite=True (--overwrite) to start over there."
            )
        fileio.write_json(path, manifest)
        return False

    def _produced_files(self):
        for pattern in self.produced:
            for p in self.path.glob(pattern):
                if p.name not in (LOCK, MANIFEST):
                    yield p

    def clear(self) -> None:
        """Removes every file and folder the run produces (the manifest included)."""
        for p in list(self._produced_files()):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        (self.path / MANIFEST).unlink(missing_ok=True)


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_model_file(path: Path, stage: str) -> keras.Model:
    """Loads a stage's model file with the package's loader and checks that every weight is
    finite, so that a damaged or poisoned file is named instead of reused."""
    model = fileio.load_model(path)  # names the file when it does not load
    bad = fileio.non_finite_weight(model.weights)
    if bad is not None:
        raise WorkDirError(
            f"{stage}: {path} holds non-finite values in {bad}; delete it (and the stages after it) "
            "or pass overwrite=True (--overwrite)."
        )
    return model
