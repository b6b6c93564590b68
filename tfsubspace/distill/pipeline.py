"""compress(): teacher latent subspace learning with LASSO, end to end, resumable.

Stages (each writes its result into `work_dir` atomically; a rerun with the same work_dir
skips finished stages and resumes an interrupted training stage from its last epoch):

1. subspace: stream unlabeled data through the teacher, choose each channel group's
   dimension k: by default all groups at once under the parameter/MAC budget, where each
   principal direction is worth what the teacher's output depends on it; or by energy share,
   or a fixed width ratio -> plan_subspace.json, spectra.json, spectra.png
2. student: the teacher sliced to the k channels of most latent energy (or randomly
   initialised), BN statistics re-estimated -> student_init.keras
3. distill: latent subspace learning + output distillation + channel LASSO (proximal),
   no labels -> student_distilled.keras
4. prune: remove the channels LASSO zeroed (and, with a budget, the weakest), fold their
   constants, rebuild and verify, re-estimate BN statistics -> plan_lasso.json,
   student_pruned.keras
5. recover: a short round of step 3 without LASSO; BN statistics measured again if it was too
   short for their moving averages to forget the pruned model -> student.keras
Then the report (report.json, report.md) and the composed plan (plan.json: the kept teacher
channels of every group, from which the student's architecture is rebuilt).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import keras
import numpy as np

from tfsubspace import fileio
from tfsubspace.data import inputs
from tfsubspace.distill import adapt, subspace
from tfsubspace.distill.adapt import ADAPT_MODES
from tfsubspace.distill.augment import AUGMENTATIONS, augmenter, parse
from tfsubspace.distill.batchnorm import (
    batchnorm_layers,
    batchnorm_mismatch,
    reestimate_batchnorm,
    too_short_for_batchnorm,
)
from tfsubspace.distill.budget import BudgetTargets
from tfsubspace.distill.heldout import KEY as HELDOUT_KEY
from tfsubspace.distill.heldout import HeldOutAgreement
from tfsubspace.distill.heldout import top1 as heldout_top1
from tfsubspace.distill.lasso import ChannelLasso, alive, lasso_plan
from tfsubspace.distill.report import evaluate, format_report
from tfsubspace.distill.student import INITS, build_student
from tfsubspace.distill.trainer import StudentTrainer, ends_in_softmax, stage_split, train_student
from tfsubspace.errors import DataMismatchWarning, WorkDirError
from tfsubspace.models import stats
from tfsubspace.prune import cost, ranking, surgery
from tfsubspace.prune.analysis import ChannelAnalysis, analyze
from tfsubspace.prune.plan import PruningPlan
from tfsubspace.train import distribute, fitloop, workdir

SCHEDULES = ("end_to_end", "stage_wise")
DEFAULT_EPOCHS, DEFAULT_STEPS = 5, 2000  # distillation length when neither epochs nor steps is given
# the budget when none is given and no other width rule is chosen: the paper's compression
DEFAULT_TARGET_PARAMS = 0.2
SENSITIVITY_BATCHES = 8  # batches of the output-sensitivity pass that weighs the budget's widths


# the options whose values do not change the student (left out of the work_dir manifest)
_PRESENTATION = ("verbose", "tensorboard_dir", "measure_latency")
MEASURE_LATENCY = ("auto", "always", "none")
SPEEDUP_SLACK = 0.9  # a measured speed-up under this share of the one asked for is warned about
# calibrating the final cut to a latency budget: a timing within this share of the budget is
# kept; at most this many re-plans
CALIBRATION_TOLERANCE = 0.05
CALIBRATION_ROUNDS = 2


def _option(default, help_text: str):
    """A CompressionConfig field with its one-line help (the scripts' --help reads it)."""
    return dataclasses.field(default=default, metadata={"help": help_text})


DEFAULT_MULTIPLE = 8  # widths' multiple without a MAC or latency budget (SIMD lanes, Edge TPU)


@dataclasses.dataclass
class CompressionConfig:
    """Every option of compress(); see compress() for their meaning. Each field's metadata
    carries its help line, from which scripts/compress.py declares its flags."""

    energy: float | None = _option(
        None, "Share of latent energy each group's subspace keeps (instead of widths chosen for the budget)."
    )
    width_ratio: float | None = _option(None, "A fixed share of each group's width (instead of the budget's).")
    headroom: float = _option(
        1.25, "Under a budget, the student starts this many times over it; LASSO chooses the rest of the cut."
    )
    min_ratio: float = _option(0.0, "Lower bound of each width, as a share of the teacher's.")
    multiple: int | None = _option(
        None,
        "Round every width up to a multiple of this (SIMD, Edge TPU; default: 8, or under a MAC or latency budget "
        "the multiple this machine's kernels step at, from the latency table).",
    )
    init: str = _option(
        "teacher", "Student initialisation: 'teacher' (its channels of most latent energy) or 'random'."
    )
    schedule: str = _option(
        "end_to_end", "Latent learning: 'end_to_end' (all taps at once) or 'stage_wise' (tap by tap)."
    )
    epochs: int | None = _option(
        None, "Epochs of latent learning with LASSO (default: 5, or more to reach `steps`' default)."
    )
    steps: int | None = _option(
        None, "Optimizer steps of latent learning instead of epochs (default: at least 2000 steps, 5 epochs)."
    )
    recover_epochs: int = _option(2, "Epochs of recovery after pruning.")
    augment: str = _option(
        "auto", "Views teacher and student share: 'auto', 'none' or a list of crop, flip, mixup, cutmix."
    )
    adapt: str = _option(
        "auto",
        "Add copies of the images moved toward the teacher's BatchNormalization statistics: 'auto' (when the "
        "images are from another domain), 'always' or 'none'.",
    )
    adapt_steps: int = _option(100, "Adam steps on the pixels of each batch of 200 images when adapting them.")
    holdout: float = _option(0.1, "Share of the images kept aside to measure agreement (at most 2048 images).")
    patience: int | None = _option(
        None, "Stop recovery after this many epochs without better held-out agreement (it keeps the best)."
    )
    steps_per_epoch: int | None = _option(
        None, "Batches per epoch (default: the whole data set; needed when it repeats)."
    )
    learning_rate: float = _option(1e-3, "Adam learning rate of latent learning (cosine decay).")
    recover_learning_rate: float = _option(3e-4, "Adam learning rate of recovery (cosine decay).")
    tap_weight: float = _option(1.0, "Weight of each latent matching loss.")
    kd_weight: float = _option(1.0, "Weight of output distillation.")
    temperature: float = _option(4.0, "Distillation temperature.")
    lasso: float = _option(0.25, "Channel LASSO factor (0 disables).")
    lasso_learning_rate: float = _option(0.01, "SGD learning rate of the variables LASSO measures.")
    lasso_max_step: float = _option(
        0.02, "Most one SGD step may move a LASSO'd layer, relative to the norm of its weights."
    )
    zero_tolerance: float = _option(1e-6, "Channel norm under which LASSO counts a channel as zeroed.")
    target_params: float | int | None = _option(
        None, "Parameter budget: a ratio of the teacher's (float in (0, 1]) or a count (integer > 1)."
    )
    target_macs: float | int | None = _option(
        None, "MAC budget per image: a ratio of the teacher's (float in (0, 1]) or a count (integer > 1)."
    )
    target_speedup: float | None = _option(
        None, "Latency budget: the student's float32 .tflite this many times faster than the teacher's, here."
    )
    target_latency_ms: float | None = _option(
        None, "Latency budget in milliseconds of the student's float32 .tflite (batch 1) on this machine."
    )
    measure_latency: str = _option(
        "auto",
        "Time the teacher's and the student's float32 .tflite files here for the report: 'auto' (under a MAC "
        "or latency budget), 'always' or 'none'.",
    )
    calibrate_latency: bool = _option(
        True,
        "Under target_speedup or target_latency_ms, time the final cut's student against the teacher here and "
        "cut again (at most twice) with the budget corrected by what the latency table mispredicted.",
    )
    stats_batches: int = _option(100, "Batches for the latent statistics.")
    bn_batches: int = _option(50, "Batches for each BatchNormalization re-estimation.")
    seed: int = _option(0, "Random seed.")
    tensorboard_dir: str | None = _option(None, "Write TensorBoard logs of the training stages there.")
    verbose: int | str = _option("auto", "Progress output: 'auto', 0, 1 or 2.")

    def validate(self) -> None:
        """Raises a ValueError naming the first option whose type or value is wrong."""

        def fail(name, expected):
            raise ValueError(f"{name} must be {expected}. Received: {name}={getattr(self, name)!r}")

        def number(value):
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

        def integer(value):
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        for field in dataclasses.fields(self):  # NumPy scalars as Python numbers (for JSON)
            if isinstance(getattr(self, field.name), np.generic) and not isinstance(
                getattr(self, field.name), np.bool_
            ):
                setattr(self, field.name, getattr(self, field.name).item())

        for name in ("recover_epochs", "stats_batches", "bn_batches", "seed"):
            if not integer(getattr(self, name)):
                fail(name, "an integer")
        for name in (
            "min_ratio",
            "headroom",
            "learning_rate",
            "recover_learning_rate",
            "tap_weight",
            "kd_weight",
            "temperature",
            "lasso",
            "lasso_learning_rate",
            "lasso_max_step",
            "zero_tolerance",
        ):
            if not number(getattr(self, name)) or not np.isfinite(getattr(self, name)):
                fail(name, "a finite number")
        for name in ("energy", "width_ratio"):
            if getattr(self, name) is not None and not number(getattr(self, name)):
                fail(name, "a number or None")
        if self.width_ratio is not None and self.energy is not None:
            raise ValueError(
                f"Give energy or width_ratio, not both. Received: energy={self.energy}, width_ratio={self.width_ratio}"
            )
        if self.width_ratio is not None and not 0 < self.width_ratio <= 1:
            fail("width_ratio", "in (0, 1]")
        if self.energy is not None and not 0 < self.energy <= 1:
            fail("energy", "in (0, 1]")
        if not self.headroom >= 1:
            fail("headroom", "at least 1")
        if not 0 <= self.min_ratio <= 1:
            fail("min_ratio", "in [0, 1]")
        if self.multiple is not None and not (integer(self.multiple) and self.multiple >= 1):
            fail("multiple", "a positive integer or None")
        if self.init not in INITS:
            fail("init", f"one of {INITS}")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"one of {SCHEDULES}")
        for name in ("epochs", "steps", "patience"):
            value = getattr(self, name)
            if value is not None and (not integer(value) or value < 1):
                fail(name, "a positive integer or None")
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"Give epochs or steps, not both. Received: epochs={self.epochs}, steps={self.steps}")
        if not number(self.holdout) or not 0 <= self.holdout <= 0.5:
            fail("holdout", "a share of the images in [0, 0.5]")
        if not isinstance(self.augment, str):
            fail("augment", f"'auto', 'none' or a comma-separated list of {AUGMENTATIONS}")
        if self.adapt not in ADAPT_MODES:
            fail("adapt", f"one of {ADAPT_MODES}")
        if not isinstance(self.calibrate_latency, bool):
            fail("calibrate_latency", "True or False")
        if self.measure_latency not in MEASURE_LATENCY:
            fail("measure_latency", f"one of {MEASURE_LATENCY}")
        if not integer(self.adapt_steps) or self.adapt_steps < 1:
            fail("adapt_steps", "a positive integer")
        if self.recover_epochs < 0:
            fail("recover_epochs", "a non-negative integer")
        if self.steps_per_epoch is not None and (not integer(self.steps_per_epoch) or self.steps_per_epoch < 1):
            fail("steps_per_epoch", "a positive integer or None")
        for name in ("learning_rate", "recover_learning_rate", "lasso_learning_rate", "lasso_max_step", "temperature"):
            if not getattr(self, name) > 0:
                fail(name, "positive")
        for name in ("tap_weight", "kd_weight", "lasso", "zero_tolerance"):
            if not getattr(self, name) >= 0:
                fail(name, "non-negative")
        if self.tap_weight == 0 and self.kd_weight == 0:
            raise ValueError("tap_weight and kd_weight are both 0: the student would learn nothing.")
        for name in ("target_params", "target_macs"):
            value = getattr(self, name)
            if value is None:
                continue
            if integer(value):
                if value <= 1:
                    fail(
                        name,
                        "a ratio of the teacher's as a float in (0, 1] (e.g. 1.0 or 0.2), or a count as an integer > 1",
                    )
            elif not number(value) or not 0 < value <= 1:
                fail(
                    name,
                    "a ratio of the teacher's as a float in (0, 1], or a count as an integer > 1 "
                    "(a float over 1 is neither)",
                )
        for name in ("target_speedup", "target_latency_ms"):
            value = getattr(self, name)
            if value is not None and (not number(value) or not np.isfinite(value) or value <= 0):
                fail(name, "a positive number or None")
        if self.target_speedup is not None and self.target_latency_ms is not None:
            raise ValueError(
                f"Give target_speedup or target_latency_ms, not both. Received: target_speedup={self.target_speedup}, "
                f"target_latency_ms={self.target_latency_ms}"
            )
        if self.stats_batches < 1:
            fail("stats_batches", "a positive integer")
        if self.bn_batches < 0:
            fail("bn_batches", "a non-negative integer")
        if self.tensorboard_dir is not None and not isinstance(self.tensorboard_dir, (str, os.PathLike)):
            fail("tensorboard_dir", "a path or None")
        if self.verbose not in ("auto", 0, 1, 2) or isinstance(self.verbose, bool):
            fail("verbose", "'auto', 0, 1 or 2")

    @property
    def width_rule(self) -> str:
        """How the subspace stage chooses widths: "width_ratio", "energy" or "budget"."""
        if self.width_ratio is not None:
            return "width_ratio"
        return "energy" if self.energy is not None else "budget"

    def with_default_budget(self) -> CompressionConfig:
        """This config, with DEFAULT_TARGET_PARAMS when widths follow a budget and none is set."""
        budgets = (self.target_params, self.target_macs, self.target_speedup, self.target_latency_ms)
        if self.width_rule == "budget" and all(b is None for b in budgets):
            return dataclasses.replace(self, target_params=DEFAULT_TARGET_PARAMS)
        return self

    def manifest(self) -> dict:
        """The options that shape the student, for the work_dir manifest (calibrate_latency only
        under a latency budget, where alone it acts, so work dirs made before it resume)."""
        options = {k: v for k, v in dataclasses.asdict(self).items() if k not in _PRESENTATION}
        if self.target_speedup is None and self.target_latency_ms is None:
            del options["calibrate_latency"]
        return options


@dataclasses.dataclass
class CompressionResult:
    """What compress() produced: the student, the composed plan, the report, and the files
    written into work_dir (empty when compress() ran without one)."""

    student: keras.Model
    plan: PruningPlan
    report: dict
    paths: dict[str, Path]

    def summary(self) -> str:
        """The report as Markdown (the before/after table, the widths and the layers)."""
        return format_report(self.report)


# every file and folder compress() writes into work_dir (what overwrite=True removes)
_ADAPTED = "adapted_images.npz"
_PRODUCED = (
    _ADAPTED,
    "adapted_images.npy",  # the cache's earlier format, without the fingerprint (overwrite removes it)
    "plan_subspace.json",
    "spectra.json",
    "spectra.png",
    "student_init.keras",
    "student_distilled.keras",
    "plan_lasso.json",
    "latency_calibration.json",
    "surgery.json",
    "student_pruned.keras",
    "student.keras",
    "plan.json",
    "report.json",
    "report.md",
    "distill.csv",
    "recover.csv",
    "distill_backup",
    "recover_backup",
    "*_best.weights.h5",
    "*_best.json",
    fileio.TEMPORARY,
)


def compress(
    model: keras.Model, ds, *, work_dir=None, eval_ds=None, strategy=None, overwrite: bool = False, **options
) -> CompressionResult:
    """Compresses `model` (the teacher) into a slimmer student, without labels.

    Args:
        model: a trained Keras Functional or Sequential classifier with one image input and
            one output (logits or probabilities: a final softmax is left out when distilling).
        ds: the unlabeled images: a tf.data.Dataset of images, (images, labels) or (images,
            labels, weights) whose labels are ignored, a NumPy array of images or an (images,
            labels) tuple of arrays; unbatched data is batched (32), integers (uint8) become
            float32 with their values kept. It is read once up front (counted and checked:
            empty or non-finite data is refused) and then once per epoch.
        work_dir: where every stage writes its results; a rerun with the same directory
            resumes, and is refused if the teacher, the options or the data differ from the
            run that made it (see overwrite). One process at a time (a lock file). None: a
            temporary directory, removed at the end (`paths` is then empty).
        eval_ds: (images, labels) or images for the report: accuracy where it has labels
            (class indices or one-hot), top-1 agreement with the teacher always.
        strategy: a tf.distribute strategy for the training stages (tfsubspace.train.distribute;
            `ds` then holds global batches). Under MultiWorkerMirroredStrategy every worker runs
            the same command; only the chief writes to work_dir, the others to a private copy.
        overwrite: clear work_dir's stages and start over.
        energy: share of latent energy each group's subspace keeps, or
        width_ratio: a fixed share of each group's width. With neither (the default), widths
            are chosen for the budget: all groups at once, `multiple` channels at a time, where
            the teacher's output loses most per unit of budget without them (each principal
            direction of a latent is worth its variance times the output's squared gain from
            it, subspace.output_sensitivity); the student starts `headroom` times over the
            budget, and LASSO removes the rest. With no budget given either, target_params is
            DEFAULT_TARGET_PARAMS (0.2: the paper's compression, about 80% of the parameters
            removed).
        min_ratio: lower bound of k as a share of the width; multiple: round k up to it (default 8;
            under a MAC or latency budget, the output-channel step of this machine's kernels that
            the latency table measures, 16 with AVX-512: widths between two steps cost time and
            save only MACs; under a MAC budget, the largest of that step and its halves at which
            the budget can be met, or 8 with a warning if the table cannot be measured; the table
            costs minutes once per model and machine, e.g. 158 s for MobileNetV3Small at 64x64).
        init: "teacher" (slice the teacher's channels of most latent energy) or "random".
        schedule: "end_to_end" (all taps at once) or "stage_wise" (greedy, tap by tap).
        epochs / recover_epochs: epochs of latent learning with LASSO / of recovery.
        steps: the length of latent learning in optimizer steps instead of epochs. With
            neither, it is patient: at least DEFAULT_EPOCHS epochs and DEFAULT_STEPS steps, so a
            few thousand images get more epochs rather than less training.
        augment: the views teacher and student share at every step (tfsubspace.distill.augment):
            "auto" (crop and mixup; a flip as well for colour images), "none", or a list.
        holdout: the share of the images kept out of training, at most 2048 (chosen by their values, the
            same on every run); after each epoch the log records the student's top-1 agreement
            with the teacher on them (`heldout_agreement`), and recovery ends with the weights of
            its best epoch.
        patience: stop recovery after this many epochs without a better held-out agreement.
        steps_per_epoch: batches per epoch (default: all of ds; needed when ds repeats).
        learning_rate / recover_learning_rate: Adam learning rates (cosine decay).
        tap_weight, kd_weight, temperature: latent matching weight, output distillation
            weight and temperature.
        lasso: channel LASSO factor (proximal step after each optimizer step); 0 disables.
        lasso_learning_rate: SGD learning rate of the variables LASSO measures (see
            tfsubspace.distill.trainer): each step soft-thresholds channels by this times `lasso`.
        lasso_max_step: the most one of those SGD steps may move a layer, relative to the norm
            of its weights (a trust ratio: it binds only where gradients are large, e.g. on
            squeeze-and-excitation filters, which plain SGD otherwise sends to infinity).
        zero_tolerance: channel norm under which LASSO counts a channel as zeroed.
        target_params: a parameter budget for the student: a ratio of the teacher's as a
            float in (0, 1], or a count as an integer > 1 (default: 0.2 when no width rule is
            given, see energy). During training, LASSO is aimed at
            it: every 50 steps the channels of lowest normalized norm that the budget would
            remove become the only ones the proximal step shrinks (distill.BudgetTargets), so
            they reach zero while the rest adapts; whatever is still over budget at the end is
            removed by the same ranking. A budget that every group at its narrowest still
            exceeds is warned about, and the report says so.
        target_macs: the same as a budget of multiply-accumulates per image (both may be set;
            LASSO is aimed at the plan that meets both); widths then step as this machine's
            kernels do (see multiple), so MACs removed are time saved.
        target_speedup / target_latency_ms: a latency budget for the student's float32 .tflite
            (batch 1, one thread) on this machine: a speed-up over the teacher's, or
            milliseconds. Latency is priced by a table measured once per model and machine
            (tfsubspace.edge.latency.LatencyTable, cached; it finds the width multiples this
            machine's kernels step at) and planned for like the other budgets.
        measure_latency: "auto" (under a MAC or latency budget), "always" or "none": time the
            teacher's and the student's float32 .tflite files side by side here (LiteRT, batch
            1, one thread), so the report gives the measured speed-up beside the table's
            estimate; a measured speed-up more than 10% short of target_speedup is warned about.
        stats_batches / bn_batches: batches for the latent statistics / each BN re-estimation
            (of the sliced student, of the pruned one and after a short recovery).
        seed: random seed.
        tensorboard_dir: write TensorBoard logs of the training stages there.
        verbose: "auto", 0, 1 or 2; when not 0, progress lines and the final summary.

    Returns:
        CompressionResult(student, plan, report, paths). The student is compiled like the
        teacher when the teacher was compiled (so `student.fit` works at once).
    """
    try:
        config = CompressionConfig(**options)
    except TypeError as e:
        known = ", ".join(f.name for f in dataclasses.fields(CompressionConfig))
        raise TypeError(f"{e}. compress() options: {known}.") from None
    config.validate()
    config = config.with_default_budget()
    inputs.check_model(model)
    teacher_analysis = analyze(model)
    ds = inputs.image_dataset(ds, model, "ds")
    if eval_ds is not None:
        eval_ds = inputs.image_dataset(eval_ds, model, "eval_ds")
        inputs.check_labels(eval_ds, "eval_ds", int(model.outputs[0].shape[-1]))
    views = parse(config.augment, tuple(model.inputs[0].shape[1:]))  # a bad augment spec fails before any work
    ds, scanned = inputs.scan(ds, "ds", steps_per_epoch=config.steps_per_epoch)
    log = (lambda message: print(f"[tfsubspace] {message}", flush=True)) if config.verbose else (lambda message: None)
    log(f"ds: {scanned.describe()} per epoch")
    holdout = config.holdout
    if holdout and strategy is not None and distribute.is_multi_worker(strategy):
        # the workers' shards of a filtered data set fall out of step; every worker trains on all
        log("holdout: nothing is held out under MultiWorkerMirroredStrategy")
        holdout = 0.0
    keras.utils.set_random_seed(config.seed)
    manifest = {
        "tfsubspace": _version(),
        "teacher": workdir.model_fingerprint(model),
        "options": {
            **config.manifest(),
            "augment_views": list(views),
        },
        "data": {
            "element_spec": str(ds.element_spec),
            "batches": scanned.steps,
            "images": scanned.examples,
            "fingerprint": scanned.fingerprint,
        },
    }
    with contextlib.ExitStack() as stack:
        keep_files = work_dir is not None
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tfsubspace-"))
        work_dir = Path(stack.enter_context(distribute.private_work_dir(work_dir, strategy)))
        claimed = stack.enter_context(workdir.WorkDir(work_dir, produced=_PRODUCED))
        resumed = claimed.claim(manifest, overwrite=overwrite)
        ds, heldout = inputs.split_holdout(ds, holdout, examples=scanned.examples)
        ds, heldout, adaptation = adapt.adapt_dataset(
            model,
            ds,
            heldout,
            mode=config.adapt,
            steps=config.adapt_steps,
            seed=config.seed,
            cache=work_dir / _ADAPTED,
            log=log,
        )
        if heldout is not None:
            ds, steps = fitloop.epoch_steps(ds, "ds", log=lambda message: None)
            log(f"{len(heldout)} images held out to measure agreement with the teacher; {steps} batches train")
        pipeline = _Pipeline(model, teacher_analysis, ds, eval_ds, work_dir, config, strategy, heldout, adaptation)
        if resumed:
            pipeline.log(f"resuming the run in {work_dir}")
        result = pipeline.run()
        if not keep_files:
            result.paths = {}
    if config.verbose:
        print(result.summary().split("\n## ")[0], flush=True)
    return result


def _compile_like(student: keras.Model, teacher: keras.Model, log) -> None:
    """Compiles `student` with the teacher's loss, metrics and optimizer settings (a fresh
    optimizer) when the teacher was compiled, so that `student.fit` works at once."""
    if not getattr(teacher, "compiled", False):
        return
    try:
        config = teacher.get_compile_config()
        if config:
            student.compile_from_config(config)
    except Exception as e:  # a custom loss or metric that does not serialize: leave it to the user
        log(f"the student is not compiled ({type(e).__name__}: {e}); compile it before student.fit")


def _version() -> str:
    from tfsubspace import __version__

    return __version__


def _warn_on_batchnorm_mismatch(model, images):
    """Warns when the teacher's BN statistics do not fit `images`: the student would learn to
    copy latents the teacher was never trained to produce, and its training often diverges."""
    found = batchnorm_mismatch(model, images)
    if found:
        name, ratio = found[0]
        warnings.warn(
            f"teacher {model.name!r}: on a batch of ds, the input of BatchNormalization {name!r} has "
            f"{ratio:.3g}x its moving variance ({len(found)} BatchNormalization layer(s) off by over "
            "100x). The teacher's statistics do not fit these images: are they scaled as in its "
            "training (0-1 against 0-255, mean/std normalization), and is the teacher trained? "
            "The student learns what the teacher computes on ds.",
            DataMismatchWarning,
            stacklevel=2,
        )


class _Pipeline:
    def __init__(
        self,
        teacher,
        analysis: ChannelAnalysis,
        ds,
        eval_ds,
        work_dir: Path,
        config: CompressionConfig,
        strategy=None,
        heldout=None,
        adaptation=None,
    ):
        self.strategy = strategy
        self._teacher_in_scope = None
        self.teacher, self.analysis, self.ds, self.eval_ds = teacher, analysis, ds, eval_ds
        self.dir, self.config = work_dir, config
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.paths: dict[str, Path] = {}
        self.surgery: dict | None = None  # the prune stage's check, from this run or its file
        self.spectra: dict | None = None  # the subspace stage's spectra, from this run or its file
        self._stages_seen = 0
        self._latency_table = self._latency_budget = None
        self._chosen_multiple = None
        # images kept aside (never trained on) and the teacher's top-1 on them
        self.heldout = heldout
        self.adaptation = adaptation  # what adapt.adapt_dataset did, or None
        self.heldout_teacher = heldout_top1(teacher, heldout) if heldout is not None else None
        self.epochs = distill_epochs(config, int(ds.cardinality()))

    def log(self, message: str) -> None:
        if self.config.verbose:
            print(f"[tfsubspace] {message}", flush=True)

    def _stage(self, name: str, path: Path, make, load=None, passes=0):
        """Runs `make` unless `path` exists (then `load`s it, or checks and loads the model file
        it is when `load` is None), timing the stage.

        `passes` (or a function giving it) is how many passes over ds `make` makes. A reused
        stage skips them instead, and every stage starts from its own seed, so that a resumed
        run trains on the same batches with the same random draws as a run never stopped.
        """
        self.paths[name] = path
        self._stages_seen += 1
        if path.exists():
            self.log(f"{name}: reusing {path}")
            distribute.skip_passes(self.ds, passes() if callable(passes) else passes)
            return load(path) if load is not None else workdir.check_model_file(path, name)
        start = time.perf_counter()
        self.log(f"{name}: started")
        keras.utils.set_random_seed(self.config.seed + self._stages_seen)
        result = make(path)
        self.timings[name] = round(time.perf_counter() - start, 2)
        self.log(f"{name}: done in {self.timings[name]:.1f} s")
        return result

    def run(self) -> CompressionResult:
        c = self.config
        # passes over ds per stage: statistics; BN re-estimation; adapter fit + the epochs'; surgery check
        # + BN re-estimation; adapter fit + the epochs' (+ BN re-estimation after a short recovery)
        bn_passes = int(c.bn_batches > 0 and bool(batchnorm_layers(self.teacher)))
        recover_bn = bn_passes > 0 and too_short_for_batchnorm(self.teacher, self.ds, c.recover_epochs)
        adapter_passes = int(c.tap_weight > 0)
        epoch_passes = lambda: distribute.passes_per_epoch(self.strategy)
        plan0 = self._stage(
            "plan_subspace",
            self.dir / "plan_subspace.json",
            self._subspace,
            PruningPlan.load,
            passes=1 + int(c.width_rule == "budget"),  # the statistics (and the sensitivity pass)
        )
        if (self.dir / "spectra.png").exists():
            self.paths["spectra"] = self.dir / "spectra.png"
        student = self._stage(
            "student_init",
            self.dir / "student_init.keras",
            lambda p: self._save(
                build_student(
                    self.teacher, plan0, init=c.init, ds=self.ds, bn_batches=c.bn_batches, analysis=self.analysis
                ),
                p,
            ),
            None,
            passes=bn_passes,
        )
        student = self._stage(
            "student_distilled",
            self.dir / "student_distilled.keras",
            lambda p: self._save(self._train(student, "distill", self.epochs, c.learning_rate, c.lasso), p),
            None,
            passes=lambda: adapter_passes + self.epochs * epoch_passes(),
        )
        plan1 = self._stage(
            "plan_lasso", self.dir / "plan_lasso.json", lambda p: self._lasso_plan(student, p), PruningPlan.load
        )
        student = self._stage(
            "student_pruned",
            self.dir / "student_pruned.keras",
            lambda p: self._prune(student, plan1, p),
            None,
            passes=1 + bn_passes,
        )
        if c.recover_epochs:
            student = self._stage(
                "student",
                self.dir / "student.keras",
                lambda p: self._save(self._recover(student, recover_bn), p),
                None,
                passes=lambda: adapter_passes + c.recover_epochs * epoch_passes() + (bn_passes if recover_bn else 0),
            )
        else:
            self.paths["student"] = self.paths["student_pruned"]
        plan = _compose(plan0, plan1)
        self.paths["plan"] = plan.save(self.dir / "plan.json")
        _compile_like(student, self.teacher, self.log)
        report = self._report(student, plan0, plan1)
        self.paths["report"] = fileio.write_json(self.dir / "report.json", report)
        self.paths["report_md"] = fileio.write_text(self.dir / "report.md", format_report(report))
        return CompressionResult(student, plan, report, dict(self.paths))

    @staticmethod
    def _save(model, path):
        fileio.save_model(model, path)
        return model

    # ------------------------------------------------------------ stages

    def _subspace(self, path):
        c = self.config
        views = self._augmenter("subspace", log=False)  # the views the student will be trained on
        if views is not None:
            shape = tuple(self.teacher.inputs[0].shape[1:])
            self.log(f"subspace: latent statistics of augmented views ({', '.join(parse(c.augment, shape))})")
        latents = subspace.latent_statistics(
            self.teacher,
            self.ds,
            self.analysis,
            max_batches=c.stats_batches,
            progress=bool(c.verbose),
            on_first_batch=lambda images: _warn_on_batchnorm_mismatch(self.teacher, images),
            augment=views,
        )
        values = None
        if c.width_rule == "budget":
            sensitivity = subspace.output_sensitivity(
                self.teacher,
                self.ds,
                self.analysis,
                list(latents),
                max_batches=SENSITIVITY_BATCHES,
                seed=c.seed,
                log_output=ends_in_softmax(self.teacher),
                augment=views,
            )
            values = {g: subspace.direction_values(st, sensitivity[g]) for g, st in latents.items()}
            budgets = self._budgets()
            for name in ("params", "macs", "latency_ms"):
                budgets[name] = None if budgets[name] is None else budgets[name] * c.headroom
            dims = subspace.dimensions_for_budget(
                latents, values, self.analysis, min_ratio=c.min_ratio, multiple=self._multiple, **budgets
            )
        else:
            dims = subspace.choose_dimensions(
                latents, energy=c.energy, width_ratio=c.width_ratio, min_ratio=c.min_ratio, multiple=self._multiple
            )
        keep = subspace.top_channels(latents, dims)
        plan = PruningPlan.from_masks(self.analysis, keep)
        self.spectra = {
            g: {
                "tap": st.tap,
                "width": len(st.total),
                "k": dims[g],
                "samples": st.count,
                "spectrum": [float(v) for v in st.spectrum()],
                "mean_square": _mean_square(st),
                # with a budget: what each principal direction is worth to the output, largest first
                **({"values": [float(v) for v in values[g]]} if values is not None else {}),
                # the width rule wanted fewer channels than min_ratio and multiple allow
                "at_min": dims[g] < len(st.total)
                and dims[g] == subspace.narrowest(len(st.total), c.min_ratio, self._multiple),
            }
            for g, st in latents.items()
        }
        at_min = [g for g, v in self.spectra.items() if v["at_min"]]
        if at_min:
            self.log(f"subspace: {len(at_min)} group(s) at their narrowest width: {', '.join(at_min)}")
        fileio.write_json(self.dir / "spectra.json", self.spectra)
        subspace.plot_spectra(latents, dims, self.dir / "spectra.png", energy=c.energy)
        self.paths["spectra"] = self.dir / "spectra.png"
        plan.save(path)
        return plan

    def _spectra(self) -> dict:
        """The subspace stage's spectra: from this run, or from spectra.json on a resumed one."""
        if self.spectra is None:
            self.spectra = _stage_json(
                self.dir / "spectra.json", "plan_subspace.json and the stages after it", valid=_spectra_valid
            )
        return self.spectra

    def _train(self, student, name, epochs, learning_rate, lasso_weight, keep_best=False):
        """Trains `student` on the teacher (stage `name`). With held-out images, the epoch log
        gets their agreement; with keep_best (recovery: no LASSO whose progress an earlier
        epoch would undo) the student ends at its best epoch, early if patience runs out."""
        c = self.config
        taps = self.analysis.taps()
        trained, teacher = student, self.teacher
        if self.strategy is not None:  # train copies whose variables live under the strategy
            if self._teacher_in_scope is None:
                self._teacher_in_scope = distribute.clone_in_scope(self.teacher, self.strategy)
            trained, teacher = distribute.clone_in_scope(student, self.strategy), self._teacher_in_scope
        scope = self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()
        student_analysis = analyze(trained)
        spectra = self._spectra()
        tap_layers = [taps[g] for g in taps if g in spectra] if c.tap_weight > 0 else []
        scales = {spectra[g]["tap"]: spectra[g]["mean_square"] for g in taps if g in spectra}
        stages = None
        if c.schedule == "stage_wise" and tap_layers:
            stages = stage_split(tap_layers, epochs)
        with scope:
            lasso = ChannelLasso(student_analysis) if lasso_weight > 0 else None
            trainer = StudentTrainer(
                trained,
                teacher,
                taps=tap_layers,
                tap_scales=scales,
                stages=stages,
                tap_weight=c.tap_weight,
                kd_weight=c.kd_weight,
                temperature=c.temperature,
                lasso=lasso,
                lasso_weight=lasso_weight,
                lasso_learning_rate=c.lasso_learning_rate,
                lasso_max_step=c.lasso_max_step,
                augment=self._augmenter(name),
            )
        trainer.fit_adapters(self.ds)  # a resumed run then restores the trained ones
        heldout = None
        if self.heldout is not None:
            heldout = HeldOutAgreement(
                trained,
                self.heldout,
                self.heldout_teacher,
                best_path=self.dir / f"{name}_best.weights.h5",
                keep_best=keep_best,
                patience=c.patience if keep_best else None,
            )
        extra = []
        budgets = self._budgets()
        if lasso is not None and any(budgets[name] is not None for name in ("params", "macs", "latency_ms")):
            extra.append(
                BudgetTargets(
                    lasso,
                    lambda norms: ranking.plan_for_budget(
                        student_analysis, norms, multiple=self._multiple, keep=alive(norms, c.zero_tolerance), **budgets
                    ).masks(),
                    groups_of_taps={tap: g for g, tap in student_analysis.taps().items()},
                )
            )
        train_student(
            trainer,
            self.ds,
            epochs=epochs,
            learning_rate=learning_rate,
            work_dir=self.dir,
            name=name,
            verbose=c.verbose,
            tensorboard_dir=c.tensorboard_dir,
            callbacks=extra,
            log_callbacks=[heldout] if heldout is not None else [],
            strategy=self.strategy,
        )
        if trained is not student:
            student.set_weights(trained.get_weights())
        return student

    def _augmenter(self, name, log=True):
        shape = tuple(self.teacher.inputs[0].shape[1:])
        layer = augmenter(self.config.augment, shape, seed=self.config.seed + self._stages_seen)
        if layer is not None:
            layer.build((None, *shape))
        if layer is not None and log:
            self.log(f"{name}: teacher and student see the same views ({', '.join(parse(self.config.augment, shape))})")
        return layer

    @functools.cached_property
    def _teacher_tflite(self) -> bytes:
        """The teacher's float32 .tflite that every timing here compares a student with, converted once."""
        from tfsubspace.edge.latency import float32_tflite

        return float32_tflite(self.teacher)

    def _measured_latency(self, student) -> dict:
        """{"machine", "measured": teacher's and student's float32 .tflite latency and speed-up},
        timed side by side here; warns when the speed-up is short of target_speedup."""
        from tfsubspace.edge.latency import float32_tflite, machine, measure_files

        self.log("latency: timing the teacher's and the student's float32 .tflite files here")
        try:
            t_ms, s_ms = measure_files([self._teacher_tflite, float32_tflite(student)])
        except Exception as e:  # noqa: BLE001 - a timing for the report must not lose the trained student
            warnings.warn(f"The float32 .tflite files could not be timed for the report: {e}", stacklevel=2)
            return {"measured": None}
        measured = {"teacher_ms": t_ms, "student_ms": s_ms, "speedup": t_ms / s_ms}
        self.log(f"latency: measured {t_ms:.4f} ms -> {s_ms:.4f} ms per image ({t_ms / s_ms:.2f}x faster)")
        asked = self.config.target_speedup
        if asked is not None and measured["speedup"] < SPEEDUP_SLACK * asked:
            warnings.warn(
                f"target_speedup={asked!r}: the student's float32 .tflite measured {measured['speedup']:.2f}x faster "
                f"than the teacher's here, more than {1 - SPEEDUP_SLACK:.0%} short (the latency table estimated "
                "otherwise; load on the machine while timing moves the measurement too). Ask for more, or give "
                "target_latency_ms.",
                stacklevel=2,
            )
        return {"machine": machine(), "measured": measured}

    def _budgets(self) -> dict:
        """The budgets as plan_for_budget / dimensions_for_budget take them: absolute counts of
        parameters and MACs, milliseconds and the latency table (None where not set)."""
        c = self.config
        table, latency_ms = self._latency()
        return {
            "params": _absolute(c.target_params, stats.count_params(self.teacher)),
            "macs": _absolute(c.target_macs, stats.count_macs(self.teacher)),
            "latency_ms": latency_ms,
            "latency": table,
        }

    @property
    def _multiple(self) -> int:
        """The width multiple (chosen once, see _choose_multiple)."""
        if self._chosen_multiple is None:
            self._chosen_multiple = self._choose_multiple()
        return self._chosen_multiple

    def _choose_multiple(self) -> int:
        """`multiple` (default 8), or under a MAC or latency budget the output multiple the
        latency table found this machine's kernels to step at (LatencyTable.step: the multiple
        of the calls that take most of the time): a width between two steps
        takes as long as the next step and saves only MACs. Under a latency budget, the larger
        of the two; under a MAC budget, an explicit `multiple` as given, else the kernels' step,
        or its half, quarter... (down to 8), the largest at which the budgets can be met with
        every group at its narrowest width."""
        c = self.config
        latency_budget = c.target_speedup is not None or c.target_latency_ms is not None
        given = DEFAULT_MULTIPLE if c.multiple is None else c.multiple
        if c.multiple is not None and not latency_budget:
            return given
        if latency_budget:
            table = self._table()
        else:  # a MAC budget does not need the table: without it, widths step at `given`
            try:
                table = self._table()
            except Exception as e:  # noqa: BLE001 - the converter and LiteRT raise many kinds
                warnings.warn(
                    f"target_macs: the teacher's latency table could not be measured ({type(e).__name__}: {e}); "
                    f"widths step at {given} channels. Pass multiple= to choose the step yourself.",
                    stacklevel=2,
                )
                return given
        if table is None:
            return given
        steps = table.step()
        if latency_budget or steps <= given:
            return max(steps, given)
        budgets = self._budgets()

        def fits(multiple):  # the budgets hold with every group at its narrowest width at `multiple`
            narrowest = {
                name: np.arange(group.size) < subspace.narrowest(group.size, c.min_ratio, multiple)
                for name, group in self.analysis.groups.items()
                if group.prunable
            }
            spent = cost.PlanCost(self.analysis)(self.analysis.keep_vector(narrowest))
            return all(budgets[name] is None or getattr(spent, name) <= budgets[name] for name in ("params", "macs"))

        multiple = steps  # the kernels' step, else its halves (still whole SIMD registers) down to `given`
        while multiple > given and not fits(multiple):
            multiple //= 2
        multiple = max(multiple, given)
        self.log(f"widths: in steps of {multiple} channels (this machine's kernels step at {steps})")
        return multiple

    def _table(self):
        """The teacher's latency table under a MAC or latency budget (measured once per model and
        machine, then cached), else None."""
        c = self.config
        if c.target_macs is None and c.target_speedup is None and c.target_latency_ms is None:
            return None
        if self._latency_table is None:
            from tfsubspace.edge.latency import LatencyTable

            self.log("latency: measuring the teacher's layers with LiteRT (cached per model and machine)")
            self._latency_table = LatencyTable.measure(self.teacher, progress=c.verbose == 2)
            steps = self._latency_table.step()
            self.log(
                f"latency: teacher {self._latency_table.estimate():.4f} ms per image here; kernels step at "
                f"{steps} output channels"
            )
        return self._latency_table

    def _latency(self):
        """The teacher's latency table and the latency budget in ms, or (None, None) without a
        latency budget."""
        c = self.config
        if c.target_speedup is None and c.target_latency_ms is None:
            return None, None
        table = self._table()
        if self._latency_budget is None:
            self._latency_budget = (
                c.target_latency_ms if c.target_latency_ms is not None else table.estimate() / c.target_speedup
            )
            self.log(f"latency: budget {self._latency_budget:.4f} ms")
        return table, self._latency_budget

    def _lasso_plan(self, student, path):
        c = self.config
        student_analysis, budgets = analyze(student), self._budgets()

        def plan_at(latency_ms):
            options = {**budgets, "latency_ms": latency_ms}
            return lasso_plan(student_analysis, zero_tolerance=c.zero_tolerance, multiple=self._multiple, **options)

        plan = plan_at(budgets["latency_ms"])
        if budgets["latency_ms"] is not None and c.calibrate_latency:
            plan, calibration = self._calibrated(student, plan, plan_at, budgets["latency"])
            fileio.write_json(self.dir / "latency_calibration.json", calibration)
        plan.save(path)
        return plan

    def _calibrated(self, student, plan, plan_at, table):
        """The final cut calibrated to the latency budget by timing it: the slim student of
        `plan` is timed against the teacher here (float32 .tflite, side by side); where the
        timing misses the budget by more than CALIBRATION_TOLERANCE, the cut is made again
        (`plan_at`) with the table's budget corrected by the miss: the table prices every plan
        alike, so a plan it prices at e * miss ms should time at the budget. At most
        CALIBRATION_ROUNDS times; the plan timed closest to the budget is kept. Returns it and
        {"rounds": [per timing: the table's budget and estimate (ms), the timings, the speed-up
        and the miss (> 1: faster than asked)], "chosen": its index}."""
        from tfsubspace.edge.latency import float32_tflite, measure_files

        asked, budget_ms = self.config.target_speedup, self._latency_budget
        plans, rounds = [], []
        for _ in range(CALIBRATION_ROUNDS + 1):
            slim = surgery.apply_plan(student, plan, verify=False).model
            try:  # both timed every round, for a ratio under the same load
                t_ms, s_ms = measure_files([self._teacher_tflite, float32_tflite(slim)])
            except Exception as e:  # noqa: BLE001 - the converter and LiteRT raise many kinds
                message = f"The final cut could not be timed to calibrate it to the latency budget: {e}"
                warnings.warn(message, stacklevel=2)
                break
            estimated = table.estimate_model(slim)
            miss = (t_ms / s_ms) / asked if asked is not None else self.config.target_latency_ms / s_ms
            rounds.append(
                {
                    "budget_ms": budget_ms,
                    "estimated_ms": estimated,
                    "teacher_ms": t_ms,
                    "student_ms": s_ms,
                    "speedup": t_ms / s_ms,
                    "miss": miss,
                }
            )
            plans.append(plan)
            self.log(
                f"latency: the cut at {budget_ms:.4f} ms by the table ({estimated:.4f} ms estimated) times "
                f"{t_ms:.4f} ms -> {s_ms:.4f} ms here ({t_ms / s_ms:.2f}x faster)"
            )
            if abs(math.log(miss)) <= math.log1p(CALIBRATION_TOLERANCE) or len(rounds) > CALIBRATION_ROUNDS:
                break
            budget_ms = estimated * miss
            plan = plan_at(budget_ms)
            if any(plan.groups == p.groups for p in plans):  # the same cut again: nothing to gain
                break
        if not rounds:
            return plan, {"rounds": [], "chosen": None}
        chosen = min(range(len(rounds)), key=lambda i: abs(math.log(rounds[i]["miss"])))
        if chosen:
            self.log(f"latency: calibrated the cut to {rounds[chosen]['budget_ms']:.4f} ms by the table")
        return plans[chosen], {"rounds": rounds, "chosen": chosen}

    def _prune(self, student, plan1, path):
        batch = next(iter(self.ds))
        x = inputs.images_of(batch)
        result = surgery.apply_plan(student, plan1, check_batch=x, fold_constants=True)
        self.surgery = {
            "max_abs_diff": result.max_abs_diff,
            "check_diff": result.check_diff,
            "folds": result.folds,
            "approximations": result.approximations,
        }
        fileio.write_json(self.dir / "surgery.json", self.surgery)
        self.log(
            f"prune: slim model matches its masked reference within {result.check_diff:.2e}; "
            f"{sum(f['positions'] for f in result.folds)} constant channel inputs folded"
        )
        inexact = [f"{f['layer']} (up to {f['max_abs_diff']:.3g})" for f in result.folds if not f["exact"]]
        if inexact:
            warnings.warn(
                f"constants of removed channels fold only approximately into {', '.join(inexact)} "
                f"('same' padding borders); the pruned student's outputs differ from the trained one's by "
                f"up to {result.max_abs_diff:.3g} before recovery.",
                stacklevel=2,
            )
        if result.approximations:  # channels pruned across a LayerNormalization (opt-in)
            moved = ", ".join(f"{a['layer']} (up to {a['max_abs_diff']:.3g})" for a in result.approximations)
            self.log(
                f"prune: normalization over the kept channels only moves {moved}; the pruned student's outputs "
                f"differ from the trained one's by up to {result.max_abs_diff:.3g} before recovery"
            )
        return self._save(self._reestimate_batchnorm(result.model), path)

    def _recover(self, student, reestimate_batchnorm_after):
        c = self.config
        student = self._train(student, "recover", c.recover_epochs, c.recover_learning_rate, 0.0, keep_best=True)
        return self._reestimate_batchnorm(student) if reestimate_batchnorm_after else student

    def _reestimate_batchnorm(self, student):
        """Moving BN statistics measured on the student as it is. After pruning: removing
        channels LASSO did not zero (a budget cut short of them) shifts what every later
        BatchNormalization sees, and inference mode falls far below training mode while
        training mode looks fine (benchmarks/README.md has the measurements)."""
        used = reestimate_batchnorm(student, self.ds, self.config.bn_batches)
        if used:
            self.log(f"BN statistics re-estimated on {used} batches")
        return student

    # ------------------------------------------------------------ report

    def _report(self, student, plan0, plan1) -> dict:
        teacher_eval = evaluate(self.teacher, self.eval_ds) if self.eval_ds is not None else {}
        student_eval = evaluate(student, self.eval_ds, self.teacher) if self.eval_ds is not None else {}
        surgery_info = self.surgery or _stage_json(self.dir / "surgery.json", "student_pruned.keras")
        t_params, s_params = stats.count_params(self.teacher), stats.count_params(student)
        t_macs, s_macs = stats.count_macs(self.teacher), stats.count_macs(student)
        table, latency_budget = self._latency()
        table = table or self._latency_table  # measured for the widths' step under a MAC budget
        latency = None
        if table is not None:
            t_ms, s_ms = table.estimate(), table.estimate_model(student)
            latency = {"teacher_ms": t_ms, "student_ms": s_ms, "speedup": t_ms / s_ms, "machine": table.machine}
        speed_budget = table is not None or self.config.target_macs is not None
        if self.config.measure_latency == "always" or (self.config.measure_latency == "auto" and speed_budget):
            latency = {**(latency or {}), **self._measured_latency(student)}
        calibration = _stage_json(self.dir / "latency_calibration.json", "plan_lasso.json and the stages after it")
        if latency is not None and calibration is not None and calibration["rounds"]:
            latency["calibration"] = calibration
            # the estimate is held to the budget the cut was calibrated to, the timing to the one asked
            calibrated_budget = calibration["rounds"][calibration["chosen"]]["budget_ms"]
        else:
            calibrated_budget = latency_budget
        budgets = {}
        for name, option, teacher_value, reached in (
            ("params", "target_params", t_params, s_params),
            ("macs", "target_macs", t_macs, s_macs),
            ("latency_ms", "target_speedup" if self.config.target_speedup else "target_latency_ms", None, None),
        ):
            if name == "latency_ms":
                if latency is None or "student_ms" not in latency:
                    continue
                target, reached = calibrated_budget, latency["student_ms"]
            else:
                target = _absolute(getattr(self.config, option), teacher_value)
            if target is None:
                continue
            # folding the constants of removed channels may add a bias or two: 1% of slack
            met = reached <= target * 1.01
            rounded = (lambda v: float(f"{v:.6g}")) if name == "latency_ms" else (lambda v: int(round(v)))
            budgets[name] = {"target": rounded(target), "reached": rounded(reached), "met": met}
            if name == "latency_ms" and calibrated_budget != latency_budget:
                budgets[name] = {"asked": rounded(latency_budget), **budgets[name]}
            if name == "latency_ms" and latency.get("measured"):  # the table's estimate, and the timing
                budgets[name]["measured"] = rounded(latency["measured"]["student_ms"])
            if not met:
                warnings.warn(
                    f"{option}={getattr(self.config, option)!r}: the student has {rounded(reached):,} {name}, over "
                    f"the budget of {rounded(target):,}; its channel groups are at their narrowest (min_ratio="
                    f"{self.config.min_ratio}, multiple={self._multiple}, output units are never removed).",
                    stacklevel=2,
                )
        return {
            "teacher": {"name": self.teacher.name, "params": t_params, "macs": t_macs, **teacher_eval},
            "student": {"params": s_params, "macs": s_macs, **student_eval},
            "params_removed": round(1 - s_params / t_params, 5),
            "macs_removed": round(1 - s_macs / t_macs, 5),
            "widths": {
                g: {
                    "teacher": plan0.groups[g]["size"],
                    "subspace": len(plan0.groups[g]["keep"]),
                    "final": len(plan1.groups[g]["keep"]),
                    "subspace_at_min": bool(self._spectra().get(g, {}).get("at_min", False)),
                }
                for g in plan0.groups
                if g in plan1.groups
            },
            "budgets": budgets,
            # float32 .tflite latency per image: as the teacher's latency table prices it (under a
            # latency budget) and as timed here ("measured")
            **({"latency": latency} if latency is not None else {}),
            "agreement_in_training": {
                name: log for name in ("distill", "recover") if (log := _agreement_log(self.dir / f"{name}.csv"))
            },
            "heldout_images": 0 if self.heldout is None else len(self.heldout),
            "adaptation": self.adaptation,
            "epochs": self.epochs,
            "surgery": surgery_info,
            "config": dataclasses.asdict(self.config),
            "stage_seconds": self.timings,
            "layers": surgery.layer_report(self.teacher, student),
        }


def _stage_json(path: Path, with_it: str, *, valid=None) -> dict | None:
    """What a stage wrote to the JSON file `path` beside `with_it`: None where it wrote none, unless
    `valid` (a check that raises ValueError) is given, which makes the file required."""
    if valid is None and not path.exists():
        return None
    try:
        content = json.loads(path.read_text())
        if valid is not None:
            valid(content)
        return content
    except (OSError, ValueError) as e:
        raise WorkDirError(
            f"{path} is missing or damaged ({e}); delete it and {with_it}, or pass overwrite=True (--overwrite)."
        ) from None


def _spectra_valid(spectra) -> None:
    if not isinstance(spectra, dict) or not all(
        isinstance(v, dict) and {"tap", "mean_square"} <= set(v) for v in spectra.values()
    ):
        raise ValueError("not a mapping of group -> {tap, mean_square, ...}")


def distill_epochs(config: CompressionConfig, steps_per_epoch: int) -> int:
    """Epochs of latent learning: `epochs`, or enough for `steps`, or by default at least
    DEFAULT_EPOCHS and DEFAULT_STEPS optimizer steps. Patient by default: a small data set gets
    more epochs, so the student trains as long as on a large one."""
    if config.steps is not None:
        return max(1, math.ceil(config.steps / steps_per_epoch))
    if config.epochs is not None:
        return config.epochs
    return max(DEFAULT_EPOCHS, math.ceil(DEFAULT_STEPS / steps_per_epoch))


def _absolute(target, teacher_value):
    """A budget as a count: a float is a ratio of the teacher's value, an integer a count."""
    if target is None:
        return None
    return target * teacher_value if isinstance(target, float) else target


def _mean_square(st: subspace.LatentStatistics) -> float:
    return float(max(np.trace(st.cross) / max(st.count, 1) / len(st.total), 1e-12))


def _compose(plan0: PruningPlan, plan1: PruningPlan) -> PruningPlan:
    """The teacher's kept channels of the final student: plan1 (student) after plan0 (teacher)."""
    groups = {}
    for g, first in plan0.groups.items():
        keep = first["keep"]
        if g in plan1.groups and plan1.groups[g]["size"] != len(keep):
            raise WorkDirError(
                f"plan_lasso.json does not fit plan_subspace.json: group {g!r} has "
                f"{plan1.groups[g]['size']} channels in one and {len(keep)} in the other; delete "
                "plan_lasso.json and the stages after it, or pass overwrite=True (--overwrite)."
            )
        if g in plan1.groups:
            keep = [keep[i] for i in plan1.groups[g]["keep"]]
        groups[g] = {"size": first["size"], "keep": keep}
    return PruningPlan(plan0.model, plan0.fingerprint, groups)


def _agreement_log(path: Path) -> dict | None:
    """A training stage's agreement with the teacher, from its epoch log: on its own training
    images at the last epoch, and on the held-out images at the last and the best epoch."""
    if not path.exists():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None

    def value(row, key):
        v = row.get(key)
        return float(v) if v not in (None, "", "NA") else None

    out = {"epochs": len(rows), "train": value(rows[-1], "agreement")}
    heldout = [value(r, HELDOUT_KEY) for r in rows]
    if any(v is not None for v in heldout):
        best = max(range(len(rows)), key=lambda i: -1.0 if heldout[i] is None else heldout[i])
        out.update(heldout=heldout[-1], best_heldout=heldout[best], best_epoch=best + 1)
    return out
