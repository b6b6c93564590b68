"""Baselines in the same harness as compress(), to check the paper's claims at equal size.

- `train_scratch`: the student architecture, randomly initialised, trained with labels
  (optionally with the same channel LASSO, then pruned and recovered like compress()).
- `train_kd_only`: the student architecture, randomly initialised, trained by output
  distillation alone (Hinton et al.), no latent matching and no labels.

Each trains with StudentTrainer and fit_resumable, as compress() does, so only the signal
differs; each returns the trained model and its work files resume like compress()'s.
"""

from __future__ import annotations

from pathlib import Path

import keras

from tfsubspace import fileio, surgery
from tfsubspace.analysis import analyze
from tfsubspace.distill import StudentTrainer, fit_resumable
from tfsubspace.pipeline import lasso_plan
from tfsubspace.regularizers import ChannelLasso


def fresh_copy(model: keras.Model) -> keras.Model:
    """The same architecture with freshly initialised weights."""
    return keras.models.clone_model(model)


def train_scratch(student: keras.Model, labeled_ds, *, epochs: int, work_dir, learning_rate: float = 1e-3,
                  lasso: float = 0.0, lasso_learning_rate: float = 0.01, recover_epochs: int = 0,
                  multiple: int = 1, verbose="auto") -> keras.Model:
    """Trains `student` (in place) on (images, labels); with `lasso` > 0, prunes the channels
    LASSO zeroed and trains `recover_epochs` more epochs with labels. Returns the model."""
    work_dir = Path(work_dir)
    final = work_dir / "scratch.keras"
    if final.exists():
        return fileio.load_model(final)
    work_dir.mkdir(parents=True, exist_ok=True)
    channel_lasso = ChannelLasso(analyze(student)) if lasso > 0 else None
    trainer = StudentTrainer(student, None, label_weight=1.0, lasso=channel_lasso, lasso_weight=lasso,
                             lasso_learning_rate=lasso_learning_rate)
    fit_resumable(trainer, labeled_ds, epochs=epochs, learning_rate=learning_rate, work_dir=work_dir,
                  name="scratch", verbose=verbose)
    if lasso > 0:
        batch = next(iter(labeled_ds))[0]
        plan = lasso_plan(analyze(student), multiple=multiple)
        student = surgery.apply_plan(student, plan, check_batch=batch, fold_constants=True).model
        if recover_epochs:
            trainer = StudentTrainer(student, None, label_weight=1.0)
            fit_resumable(trainer, labeled_ds, epochs=recover_epochs, learning_rate=learning_rate * 0.3,
                          work_dir=work_dir, name="scratch_recover", verbose=verbose)
    fileio.save_model(student, final)
    return student


def train_kd_only(student: keras.Model, teacher: keras.Model, ds, *, epochs: int, work_dir,
                  learning_rate: float = 1e-3, temperature: float = 4.0, verbose="auto") -> keras.Model:
    """Trains `student` (in place) to match `teacher`'s softened outputs; returns it."""
    work_dir = Path(work_dir)
    final = work_dir / "kd.keras"
    if final.exists():
        return fileio.load_model(final)
    work_dir.mkdir(parents=True, exist_ok=True)
    trainer = StudentTrainer(student, teacher, kd_weight=1.0, temperature=temperature)
    fit_resumable(trainer, ds, epochs=epochs, learning_rate=learning_rate, work_dir=work_dir, name="kd",
                  verbose=verbose)
    fileio.save_model(student, final)
    return student
