"""Held-out agreement: how often the student's top-1 matches the teacher's on images it never
trains on, measured after every epoch.

A student can match its teacher on its own few thousand training images and much less
anywhere else; the gap between the training agreement (the trainer's `agreement` metric) and
this one is that overfitting, made visible in the epoch log. `HeldOutAgreement` writes
`heldout_agreement` into each epoch's logs (the CSV and TensorBoard logs pick it up);
with `keep_best`, the student ends with the weights of its best epoch (kept on disk, so a
resumed run remembers them), and `patience` stops training after that many epochs without
a better one.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from tfsubspace import fileio

KEY = "heldout_agreement"


def top1(model: keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's top-1 class of each image."""
    return np.concatenate(
        [
            np.argmax(keras.ops.convert_to_numpy(model(images[i : i + batch_size], training=False)), axis=-1)
            for i in range(0, len(images), batch_size)
        ]
    )


class HeldOutAgreement(keras.callbacks.Callback):
    """Adds `heldout_agreement` (student vs teacher top-1 on `images`) to every epoch's logs.

    Args:
        student: the model being trained.
        images: the held-out images.
        teacher_top1: the teacher's top-1 class of each image.
        best_path: with keep_best, where the best epoch's weights are kept (a .weights.h5
            path; its .json sibling records the epoch and the agreement).
        keep_best: restore the best epoch's weights when training ends.
        patience: stop after this many epochs without a better agreement (None: never).
    """

    def __init__(
        self, student, images, teacher_top1, *, best_path=None, keep_best: bool = False, patience: int | None = None
    ):
        super().__init__()
        self.student, self.images, self.teacher_top1 = student, images, teacher_top1
        self.best_path = Path(best_path) if best_path is not None else None
        self.keep_best = keep_best and self.best_path is not None
        self.patience = patience
        self.best = self._load_best()
        self.history: list[float] = []

    def _record(self):
        return self.best_path.with_suffix("").with_suffix(".json") if self.best_path else None

    def _load_best(self) -> dict:
        record = self._record()
        if record is not None and record.exists():
            return json.loads(record.read_text())
        return {"epoch": None, "agreement": -1.0}

    def on_epoch_end(self, epoch, logs=None):
        agreement = float(np.mean(top1(self.student, self.images) == self.teacher_top1))
        self.history.append(agreement)
        if logs is not None:
            logs[KEY] = agreement
        if agreement > self.best["agreement"]:
            self.best = {"epoch": epoch + 1, "agreement": agreement}
            if self.keep_best:
                with fileio.atomic_path(self.best_path) as tmp:
                    self.student.save_weights(tmp)
                fileio.write_json(self._record(), self.best)
        elif self.patience is not None and epoch + 1 - self.best["epoch"] >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.keep_best and self.best_path.exists():
            self.student.load_weights(self.best_path)
