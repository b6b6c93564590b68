"""The one resumable training loop: teacher training, distillation, recovery and the peers.

`fit_resumable(model, ds, epochs=..., compile=..., backup_dir=..., csv_path=...)`:
- measures the steps of an epoch once (a data set that does not know its length gets one
  counting pass, said in the log; an infinite one needs `steps_per_epoch`), so that a
  learning-rate schedule spans the whole run;
- compiles the model through `compile(total_steps)` (in the strategy's scope), restores the
  latest epoch checkpoint and continues after it;
- trains around a oneDNN crash in the weight gradient of strided 1x1 convolutions
  (tfsubspace.train.onednn);
- logs every epoch to CSV (and TensorBoard), and stops at the first batch whose loss is NaN
  or infinite with a FloatingPointError that names the stage, the epoch and the batch. No
  checkpoint with a non-finite weight is written (EpochCheckpoint refuses it), so a rerun
  never resumes from poisoned weights.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import keras

from tfsubspace.data import inputs
from tfsubspace.errors import DataError
from tfsubspace.train import distribute, onednn
from tfsubspace.train.checkpoint import EpochCheckpoint, history_logger


def epoch_steps(ds, name: str, *, steps_per_epoch: int | None = None, log=print):
    """(ds, steps): `ds` cut to `steps_per_epoch` batches when given, else as it is, and the
    batches of one epoch (counted in one pass when the data set does not know)."""
    import tensorflow as tf

    ds = inputs.one_epoch(ds, name, steps_per_epoch)
    if steps_per_epoch is not None:
        return ds, int(steps_per_epoch)
    cardinality = int(ds.cardinality())
    if cardinality == tf.data.UNKNOWN_CARDINALITY:
        cardinality = sum(1 for _ in ds)
        log(f"{name}: the data set does not know its length; counted {cardinality} batches per epoch")
        ds = ds.apply(tf.data.experimental.assert_cardinality(cardinality))
    if cardinality == 0:
        raise DataError(f"{name}: the data set is empty; pass at least one batch.")
    return ds, cardinality


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite, and remembers where."""

    def __init__(self):
        super().__init__()
        self.where: tuple[int, int] | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and self.where is None and not math.isfinite(float(loss)):
            self.where = (self._epoch, batch)
            self.model.stop_training = True


def fit_resumable(
    model: keras.Model,
    ds,
    *,
    epochs: int,
    compile,
    backup_dir,
    csv_path,
    name: str = "training",
    steps_per_epoch: int | None = None,
    callbacks=(),
    log_callbacks=(),
    verbose="auto",
    tensorboard_dir=None,
    strategy=None,
    validation_data=None,
    log=None,
) -> keras.callbacks.History:
    """Fits `model` on `ds` for `epochs`, resumably (see the module docstring).

    Args:
        compile: called as compile(total_steps) in the strategy's scope; compiles `model`
            (its optimizer's schedule spans total_steps).
        backup_dir: where EpochCheckpoint keeps the state after each epoch (removed at the end).
        csv_path: the per-epoch metrics log.
        name: the stage's name in messages and under tensorboard_dir.
        steps_per_epoch: batches per epoch (needed for an infinite data set).
        callbacks: more Keras callbacks, after the checkpoint's.
        log_callbacks: callbacks that add values to each epoch's logs; they run first, so the
            CSV log and the checkpoint see what they add.
        log: a function for progress lines (print when verbose, by default).
    """
    if log is None:
        log = (lambda message: print(f"[tfsubspace] {message}", flush=True)) if verbose else (lambda message: None)
    ds, steps = epoch_steps(ds, name, steps_per_epoch=steps_per_epoch, log=log)
    checkpoint = EpochCheckpoint(backup_dir)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        compile(max(1, epochs * steps))
        initial_epoch = checkpoint.restore(model)  # in the scope: the optimizer's slots are mirrored
    if initial_epoch:
        log(f"{name}: resuming after epoch {initial_epoch} of {epochs} from {checkpoint.directory}")
    guard = StopOnNonFinite()
    all_callbacks = [*log_callbacks, history_logger(csv_path, initial_epoch), guard, checkpoint, *callbacks]
    if tensorboard_dir is not None:
        all_callbacks.append(keras.callbacks.TensorBoard(str(Path(tensorboard_dir) / name)))
    multi_worker = strategy is not None and distribute.is_multi_worker(strategy)
    with onednn.strided_pointwise_workaround([model], log=log):  # the train function is traced in here
        history = distribute.fit(
            model,
            ds,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=all_callbacks,
            verbose=verbose,
            strategy=strategy,
            validation_data=None if multi_worker else validation_data,
        )
    losses = history.history.get("loss", [])
    if guard.where is not None or any(not math.isfinite(v) for v in losses):
        epoch, batch = guard.where or (initial_epoch + len(losses) - 1, None)
        at = f"epoch {epoch + 1}" + (f", batch {batch + 1}" if batch is not None else "")
        raise FloatingPointError(
            f"{name}: the loss became NaN or infinite at {at}; nothing of that epoch was saved (a rerun resumes "
            f"after the last finite one). Check that batch's images for NaN or infinite values; if they are "
            "finite, lower the learning rate (or the LASSO factor)."
        )
    return history
