"""Peer methods, in the same harness as compress(), for comparisons at equal size.

Every method trains with StudentTrainer and train_student, as compress() does, so only the
signal and the choice of channels differ; each returns the trained model, saves it as
work_dir/NAME.keras, and resumes from its epoch checkpoints when run again.

- `train_scratch`: the student architecture, freshly initialised, trained with labels
  (Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019); optionally with the
  channel LASSO, then pruned and recovered like compress().
- `train_kd`: output distillation (Hinton et al., "Distilling the Knowledge in a Neural
  Network", 2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy;
  alpha = 1 uses no labels.
- `fitnets`: hint training of the student's middle layer on the teacher's through a 1x1
  regressor, then distillation with labels (Romero et al., "FitNets", ICLR 2015).
- `l1_filter_pruning`: the teacher's filters of smallest L1 norm removed, one pruning ratio
  for every layer, then fine-tuning with labels (Li et al., "Pruning Filters for Efficient
  ConvNets", ICLR 2017); `l1_filter_kd`: the same cut, then output distillation from the
  teacher on unlabeled images instead of labels.
- `network_slimming`: training with L1 on the BatchNormalization scales, the channels of
  smallest scale removed under one global threshold, then fine-tuning with labels (Liu et
  al., "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017).
The pruning methods take a parameter and/or MAC budget (absolute counts) and meet them with
tfsubspace.prune.ranking.plan_for_budget; like compress(), they measure BatchNormalization
statistics again after the cut and after a fine-tuning too short for BN's moving averages.
Every method takes a tf.distribute `strategy` (tfsubspace.train.distribute): it then trains copies
whose variables live under it (and returns the trained copy).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import keras

from tfsubspace import fileio
from tfsubspace.data.inputs import images_of
from tfsubspace.distill.batchnorm import reestimate_batchnorm, too_short_for_batchnorm
from tfsubspace.distill.lasso import BatchNormL1, ChannelLasso, lasso_plan
from tfsubspace.distill.trainer import StudentTrainer, train_student
from tfsubspace.prune import ranking, surgery
from tfsubspace.prune.analysis import analyze
from tfsubspace.train import distribute


def fresh_copy(model: keras.Model) -> keras.Model:
    """The same architecture with freshly initialised weights."""
    return keras.models.clone_model(model)


def trained_copy(model: keras.Model) -> keras.Model:
    """The same architecture with a copy of the weights (the original stays untouched)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _scope(strategy):
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _placed(model, strategy):
    """`model`, or a copy under `strategy` (same weights)."""
    return distribute.clone_in_scope(model, strategy) if strategy is not None else model


def _finished(work_dir, name):
    """The saved model of a finished run, or None (and the work directory made)."""
    final = Path(work_dir) / f"{name}.keras"
    if final.exists():
        return fileio.load_model(final)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return None


def _first_images(ds):
    batch = next(iter(ds))
    return images_of(batch)


def _pruned(model, plan, labeled_ds, **options):
    """`model` cut by `plan` (checked), with BatchNormalization statistics measured again: a
    cut of live channels shifts what every later BatchNormalization sees, as in compress()."""
    slim = surgery.apply_plan(model, plan, check_batch=_first_images(labeled_ds), **options).model
    reestimate_batchnorm(slim, labeled_ds)
    return slim


def _fine_tune(model, labeled_ds, *, epochs, learning_rate, work_dir, name, verbose, strategy=None):
    if epochs:
        model = _placed(model, strategy)
        with _scope(strategy):
            trainer = StudentTrainer(model, None, label_weight=1.0)
        train_student(
            trainer,
            labeled_ds,
            epochs=epochs,
            learning_rate=learning_rate,
            work_dir=work_dir,
            name=name,
            verbose=verbose,
            strategy=strategy,
        )
        if too_short_for_batchnorm(model, labeled_ds, epochs):
            reestimate_batchnorm(model, labeled_ds)
    return model


def train_scratch(
    student: keras.Model,
    labeled_ds,
    *,
    epochs: int,
    work_dir,
    learning_rate: float = 1e-3,
    lasso: float = 0.0,
    lasso_learning_rate: float = 0.01,
    recover_epochs: int = 0,
    multiple: int = 1,
    verbose="auto",
    strategy=None,
) -> keras.Model:
    """Trains `student` (in place) on (images, labels); with `lasso` > 0, prunes the channels
    LASSO zeroed and trains `recover_epochs` more epochs with labels. Returns the model."""
    if (done := _finished(work_dir, "scratch")) is not None:
        return done
    student = _placed(student, strategy)
    with _scope(strategy):
        channel_lasso = ChannelLasso(analyze(student)) if lasso > 0 else None
        trainer = StudentTrainer(
            student,
            None,
            label_weight=1.0,
            lasso=channel_lasso,
            lasso_weight=lasso,
            lasso_learning_rate=lasso_learning_rate,
        )
    train_student(
        trainer,
        labeled_ds,
        epochs=epochs,
        learning_rate=learning_rate,
        work_dir=work_dir,
        name="scratch",
        verbose=verbose,
        strategy=strategy,
    )
    if lasso > 0:
        plan = lasso_plan(analyze(student), multiple=multiple)
        student = _pruned(student, plan, labeled_ds, fold_constants=True)
        student = _fine_tune(
            student,
            labeled_ds,
            epochs=recover_epochs,
            learning_rate=learning_rate * 0.3,
            work_dir=work_dir,
            name="scratch_recover",
            verbose=verbose,
            strategy=strategy,
        )
    fileio.save_model(student, Path(work_dir) / "scratch.keras")
    return student


def train_kd(
    student: keras.Model,
    teacher: keras.Model,
    ds,
    *,
    epochs: int,
    work_dir,
    learning_rate: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 1.0,
    augment=None,
    verbose="auto",
    strategy=None,
) -> keras.Model:
    """Trains `student` (in place) on alpha * distillation + (1 - alpha) * cross-entropy
    (alpha < 1 needs (images, labels) batches); returns it. `augment` (alpha = 1 only): the
    views teacher and student share (tfsubspace.distill.augment.augmenter)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1]. Received: alpha={alpha!r}")
    if (done := _finished(work_dir, "kd")) is not None:
        return done
    student, teacher = _placed(student, strategy), _placed(teacher, strategy)
    with _scope(strategy):
        trainer = StudentTrainer(
            student, teacher, kd_weight=alpha, label_weight=1.0 - alpha, temperature=temperature, augment=augment
        )
    train_student(
        trainer,
        ds,
        epochs=epochs,
        learning_rate=learning_rate,
        work_dir=work_dir,
        name="kd",
        verbose=verbose,
        strategy=strategy,
    )
    fileio.save_model(student, Path(work_dir) / "kd.keras")
    return student


def train_kd_only(student, teacher, ds, **kwargs) -> keras.Model:
    """Output distillation alone, no labels (train_kd with alpha=1)."""
    return train_kd(student, teacher, ds, alpha=1.0, **kwargs)


def fitnets(
    student: keras.Model,
    teacher: keras.Model,
    labeled_ds,
    *,
    epochs: int,
    work_dir,
    hint: str | None = None,
    hint_epochs: int | None = None,
    learning_rate: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 0.9,
    verbose="auto",
    strategy=None,
) -> keras.Model:
    """FitNets: `hint_epochs` (default half) of matching the teacher's `hint` layer (default:
    the middle one of the latents compress() would tap), then distillation with labels."""
    if (done := _finished(work_dir, "fitnets")) is not None:
        return done
    taps = list(analyze(teacher).taps().values())
    hint = hint or taps[len(taps) // 2]
    hint_epochs = max(1, epochs // 2) if hint_epochs is None else hint_epochs
    student, teacher = _placed(student, strategy), _placed(teacher, strategy)
    with _scope(strategy):
        trainer = StudentTrainer(student, teacher, taps=[hint], kd_weight=0.0)
    trainer.fit_adapters(labeled_ds)
    train_student(
        trainer,
        labeled_ds,
        epochs=hint_epochs,
        learning_rate=learning_rate,
        work_dir=work_dir,
        name="fitnets_hint",
        verbose=verbose,
        strategy=strategy,
    )
    if epochs > hint_epochs:
        with _scope(strategy):
            trainer = StudentTrainer(
                student, teacher, kd_weight=alpha, label_weight=1.0 - alpha, temperature=temperature
            )
        train_student(
            trainer,
            labeled_ds,
            epochs=epochs - hint_epochs,
            learning_rate=learning_rate,
            work_dir=work_dir,
            name="fitnets_kd",
            verbose=verbose,
            strategy=strategy,
        )
    fileio.save_model(student, Path(work_dir) / "fitnets.keras")
    return student


def _l1_cut(teacher, ds, params, macs, multiple, work_dir):
    analysis = analyze(teacher)
    plan = ranking.plan_for_budget(
        analysis, ranking.filter_l1_norms(analysis), params=params, macs=macs, compare="rank", multiple=multiple
    )
    plan.save(Path(work_dir) / "plan.json")
    return _pruned(teacher, plan, ds, analysis=analysis)


def l1_filter_pruning(
    teacher: keras.Model,
    labeled_ds,
    *,
    params: int | None,
    epochs: int,
    macs: int | None = None,
    work_dir,
    learning_rate: float = 3e-4,
    multiple: int = 1,
    verbose="auto",
    strategy=None,
) -> keras.Model:
    """Li et al.: removes the filters of smallest L1 norm, the same share of every layer,
    until at most `params` parameters (and `macs` MACs per image) remain; fine-tunes `epochs`
    epochs with labels."""
    if (done := _finished(work_dir, "l1_filter")) is not None:
        return done
    slim = _l1_cut(teacher, labeled_ds, params, macs, multiple, work_dir)
    slim = _fine_tune(
        slim,
        labeled_ds,
        epochs=epochs,
        learning_rate=learning_rate,
        work_dir=work_dir,
        name="l1_filter_tune",
        verbose=verbose,
        strategy=strategy,
    )
    fileio.save_model(slim, Path(work_dir) / "l1_filter.keras")
    return slim


def l1_filter_kd(
    teacher: keras.Model,
    ds,
    *,
    params: int | None,
    epochs: int,
    work_dir,
    macs: int | None = None,
    multiple: int = 1,
    augment=None,
    verbose="auto",
    strategy=None,
) -> keras.Model:
    """Li et al.'s cut (see l1_filter_pruning), then `epochs` epochs of output distillation
    from `teacher` on the images of `ds` (no labels; `augment`: the views both see)."""
    if (done := _finished(work_dir, "kd")) is not None:
        return done
    slim = _l1_cut(teacher, ds, params, macs, multiple, work_dir)
    return train_kd_only(
        slim, teacher, ds, epochs=epochs, work_dir=work_dir, augment=augment, verbose=verbose, strategy=strategy
    )


def network_slimming(
    teacher: keras.Model,
    labeled_ds,
    *,
    params: int | None,
    epochs: int,
    work_dir,
    macs: int | None = None,
    sparsity_epochs: int | None = None,
    l1: float = 1e-4,
    learning_rate: float = 1e-3,
    finetune_learning_rate: float = 3e-4,
    multiple: int = 1,
    verbose="auto",
    strategy=None,
) -> keras.Model:
    """Liu et al.: `sparsity_epochs` (default half) of training a copy of `teacher` with labels
    plus l1 * sum |gamma|, removal of the channels of smallest |gamma| under one global
    threshold until at most `params` parameters (and `macs` MACs per image) remain, then
    fine-tuning for the rest."""
    if (done := _finished(work_dir, "slimming")) is not None:
        return done
    sparsity_epochs = max(1, epochs // 2) if sparsity_epochs is None else sparsity_epochs
    with _scope(strategy):
        model = trained_copy(teacher)
        trainer = StudentTrainer(
            model, None, label_weight=1.0, lasso=BatchNormL1(analyze(model)), lasso_weight=l1, proximal=False
        )
    train_student(
        trainer,
        labeled_ds,
        epochs=sparsity_epochs,
        learning_rate=learning_rate,
        work_dir=work_dir,
        name="slimming_sparsity",
        verbose=verbose,
        strategy=strategy,
    )
    analysis = analyze(model)
    plan = ranking.plan_for_budget(
        analysis, BatchNormL1(analysis).norms(), params=params, macs=macs, compare="raw", multiple=multiple
    )
    plan.save(Path(work_dir) / "plan.json")
    slim = _pruned(model, plan, labeled_ds, analysis=analysis)
    slim = _fine_tune(
        slim,
        labeled_ds,
        epochs=epochs - sparsity_epochs,
        learning_rate=finetune_learning_rate,
        work_dir=work_dir,
        name="slimming_tune",
        verbose=verbose,
        strategy=strategy,
    )
    fileio.save_model(slim, Path(work_dir) / "slimming.keras")
    return slim
