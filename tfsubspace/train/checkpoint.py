"""Resumable training: the state after each epoch, kept as one atomically written file.

keras.callbacks.BackupAndRestore writes its weights file and its epoch counter as two
files, neither atomically, so a run killed while it saves can leave a backup that no
longer loads, or weights that disagree with the epoch counter. Here each backup is one
file, `epoch-NNNNN.weights.h5` (model and optimizer variables and the random generators'
states, the epoch in its name),
written to a temporary file and renamed into place; the older one is removed only after.
"""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
import warnings
from pathlib import Path

import h5py
import keras

from tfsubspace import fileio
from tfsubspace.errors import TfSubspaceError

_SEEDS = "tfsubspace_seed_generator_states"
_PATTERN = re.compile(r"^epoch-(\d{5,})\.weights\.h5$")


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the training state after each epoch; `restore()` resumes from the latest.

    Usage:
        checkpoint = EpochCheckpoint(work_dir / "backup")
        model.compile(...)
        initial_epoch = checkpoint.restore(model)
        model.fit(ds, epochs=n, initial_epoch=initial_epoch, callbacks=[checkpoint])

    Args:
        directory: where backups live.
        delete_on_success: remove the directory when fit() ends normally.
    """

    def __init__(self, directory, delete_on_success: bool = True):
        super().__init__()
        self.directory = Path(directory)
        self.delete_on_success = delete_on_success

    def _backups(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = ((_PATTERN.match(p.name), p) for p in self.directory.iterdir())
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def restore(self, model: keras.Model) -> int:
        """Loads the latest backup into `model` (compiled) and returns the epochs it holds."""
        backups = self._backups()
        if not backups:
            return 0
        epoch, path = backups[-1]
        if model.optimizer is not None and not model.optimizer.built:
            if hasattr(model, "build_optimizers"):  # a model whose optimizer trains only some variables
                model.build_optimizers()
            else:
                model.optimizer.build(model.trainable_variables)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.load_weights(path)
        except (OSError, ValueError) as e:
            raise TfSubspaceError(f"Cannot resume from {path}: {e}. Delete {self.directory} to start over.") from None
        skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
        if skipped:  # Keras only warns; resuming without the optimizer's state would train differently
            raise TfSubspaceError(
                f"Cannot resume from {path}: {skipped[0].strip()} Delete {self.directory} to start over."
            )
        states = _seed_states(model)
        with h5py.File(path, "r") as f:
            saved = f.get(_SEEDS)
            if saved is not None and len(saved) == len(states):
                for i, v in enumerate(states):
                    v.assign(saved[str(i)][()])
        return epoch

    def on_epoch_end(self, epoch, logs=None):
        # Keras calls on_epoch_end after TerminateOnNaN too: an epoch whose loss or weights
        # are not finite is never saved, so a rerun resumes from the last sound state.
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            return
        if fileio.non_finite_weight(self.model.trainable_variables) is not None:
            return
        done = epoch + 1
        old = self._backups()
        path = self.directory / f"epoch-{done:05d}.weights.h5"
        with fileio.atomic_path(path) as tmp:
            self.model.save_weights(tmp)
            with h5py.File(tmp, "a") as f:  # so that Dropout draws the same masks after a resume
                group = f.create_group(_SEEDS)
                for i, v in enumerate(_seed_states(self.model)):
                    group[str(i)] = keras.ops.convert_to_numpy(v.value)
        for n, p in old:
            if n != done:
                p.unlink(missing_ok=True)

    def on_train_end(self, logs=None):
        if self.delete_on_success and not getattr(self.model, "stop_training", False):
            shutil.rmtree(self.directory, ignore_errors=True)


def _seed_states(model: keras.Model) -> list:
    """The state variables of `model`'s random number generators (Dropout and the like),
    which save_weights leaves out."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def history_logger(path, initial_epoch: int) -> keras.callbacks.CSVLogger:
    """A CSVLogger for a run that starts at `initial_epoch`: a fresh file for a fresh run;
    on resume, the file cut to the epochs before `initial_epoch`.

    Put it before the EpochCheckpoint in the callback list: an epoch is then logged before it
    is saved, and a kill between the two only leaves a row that the resumed run rewrites.
    """
    path = Path(path)
    if initial_epoch == 0 or not path.exists():
        path.unlink(missing_ok=True)
    else:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < initial_epoch]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(kept)
        fileio.write_text(path, buffer.getvalue())
    return keras.callbacks.CSVLogger(str(path), append=True)
