"""Supervised training of a teacher with Keras fit(): resumable, logged, saved atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from tfsubspace import fileio
from tfsubspace.errors import UnsupportedModelError
from tfsubspace.models import stats
from tfsubspace.train import distribute
from tfsubspace.train.fitloop import fit_resumable

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class TrainResult:
    model: keras.Model
    test_accuracy: float
    test_loss: float
    epochs: int
    wall_time_s: float
    model_path: Path | None
    metrics_path: Path | None


def make_optimizer(name: str, learning_rate: float, schedule: str, total_steps: int, weight_decay: float = 0.0):
    """An optimizer with a constant or cosine-decayed learning rate."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; expected one of {OPTIMIZERS}.")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"Unknown learning-rate schedule {schedule!r}; expected one of {LR_SCHEDULES}.")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive. Received: learning_rate={learning_rate}")
    lr = learning_rate
    if schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, total_steps))
    if name == "adam":
        if weight_decay:
            return keras.optimizers.AdamW(lr, weight_decay=weight_decay)
        return keras.optimizers.Adam(lr)
    return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=weight_decay or None)


def train_classifier(
    model: keras.Model,
    train_ds,
    test_ds,
    *,
    epochs: int,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    lr_schedule: str = "cosine",
    weight_decay: float = 0.0,
    output: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    verbose: int | str = "auto",
    strategy=None,
) -> TrainResult:
    """Trains `model` on (image, label) batches with sparse cross-entropy on its logits.

    A killed run resumes where it stopped: the state after each epoch (weights, optimizer,
    epoch counter) is kept in `work_dir`/backup by an EpochCheckpoint, and running the same
    call again continues from it. `work_dir`/history.csv logs every epoch. The loop is
    tfsubspace.train.fitloop.fit_resumable: a data set of unknown length is counted once, and a
    NaN loss stops training with the epoch and batch named.
    The trained model is written to `output` (.keras) atomically, with a JSON of its test
    metrics beside it (`output` with the suffix .json).
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be a positive integer. Received: epochs={epochs}")
    output = Path(output) if output is not None else None
    if work_dir is None:
        work_dir = output.with_suffix(".work") if output is not None else None

    def compile(total_steps):
        model.compile(
            optimizer=make_optimizer(optimizer, learning_rate, lr_schedule, total_steps, weight_decay),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

    with contextlib.ExitStack() as stack:
        if work_dir is None:  # checkpoints still need a home: a temporary one
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tfsubspace-train-"))
        work_dir = Path(stack.enter_context(distribute.private_work_dir(work_dir, strategy)))
        return _train(model, train_ds, test_ds, epochs, compile, output, work_dir, tensorboard_dir, verbose, strategy)


def _train(model, train_ds, test_ds, epochs, compile, output, work_dir, tensorboard_dir, verbose, strategy):
    work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    multi_worker = strategy is not None and distribute.is_multi_worker(strategy)
    fit_resumable(
        model,
        train_ds,
        epochs=epochs,
        compile=compile,
        backup_dir=work_dir / "backup",
        csv_path=work_dir / "history.csv",
        name="training",
        verbose=verbose,
        tensorboard_dir=tensorboard_dir,
        strategy=strategy,
        validation_data=test_ds,
    )
    wall = time.perf_counter() - start
    test_loss, test_accuracy = _evaluate(model, test_ds) if multi_worker else model.evaluate(test_ds, verbose=0)

    metrics_path = None
    if output is not None and distribute.is_chief(strategy):
        fileio.save_model(model, output)
        metrics_path = fileio.write_json(
            output.with_suffix(".json"),
            {
                "model": model.name,
                "params": stats.count_params(model),
                "macs": _macs_or_none(model),
                "test_accuracy": float(test_accuracy),
                "test_loss": float(test_loss),
                "epochs": epochs,
                "wall_time_s_last_run": round(wall, 2),
            },
        )
    return TrainResult(model, float(test_accuracy), float(test_loss), epochs, wall, output, metrics_path)


def _evaluate(model, ds) -> tuple[float, float]:
    """Test loss and accuracy with plain calls (model.evaluate does not run multi-worker)."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    total = correct = count = 0
    for x, y in ds:
        logits = model(x, training=False)
        total += float(loss(y, logits))
        correct += int(np.sum(np.argmax(keras.ops.convert_to_numpy(logits), -1) == np.asarray(y)))
        count += len(y)
    return total / max(count, 1), correct / max(count, 1)


def _macs_or_none(model) -> int | None:
    """MACs of a Functional or Sequential model; None for one whose graph cannot be read (a
    subclassed model), rather than failing after the training."""
    try:
        return stats.count_macs(model)
    except UnsupportedModelError:
        return None
