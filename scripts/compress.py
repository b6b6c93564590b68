"""Compresses a trained Keras teacher by teacher latent subspace learning with LASSO.

    python scripts/compress.py --teacher=runs/demo/teacher.keras --dataset=mnist \
        --work_dir=runs/demo/compress --epochs=3 --energy=0.95

No labels are read for training: the data set's images alone guide the student; the test
split's labels are used only for the report. Every stage writes into --work_dir; start the
same command again after a crash or a kill and it resumes where it stopped.
"""

from absl import app, flags

from tfsubspace.distill.pipeline import CompressionConfig

_D = CompressionConfig()

_TEACHER = flags.DEFINE_string("teacher", None, "The trained teacher (.keras).", required=True)
_UNSAFE = flags.DEFINE_boolean("unsafe_deserialization", False,
                               "Allow loading Lambda layers and other code from --teacher (only for files you trust).")
_DATASET = flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped"],
                             "Data set whose images (unlabeled) train the student.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: $TFSUBSPACE_DATA_DIR or ~/.cache/tfsubspace/data).")
_EXAMPLES = flags.DEFINE_integer("examples", None, "Use only this many training images.", lower_bound=1)
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", None, "Use only this many test images for the report.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Directory for every stage's results (resumable).", required=True)
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Clear --work_dir's stages and start over (a rerun with another "
                                  "teacher, options or data is refused without it).")

_ENERGY = flags.DEFINE_float("energy", _D.energy, "Share of latent energy each subspace keeps.", lower_bound=0.0, upper_bound=1.0)
_WIDTH_RATIO = flags.DEFINE_float("width_ratio", None, "Fixed share of each group's width (instead of --energy).",
                                  lower_bound=0.0, upper_bound=1.0)
_MIN_RATIO = flags.DEFINE_float("min_ratio", _D.min_ratio, "Lower bound of each width as a share.", lower_bound=0.0, upper_bound=1.0)
_MULTIPLE = flags.DEFINE_integer("multiple", _D.multiple, "Round widths up to a multiple of this.", lower_bound=1)
_INIT = flags.DEFINE_enum("init", _D.init, ["teacher", "random"], "Student initialisation.")
_SCHEDULE = flags.DEFINE_enum("schedule", _D.schedule, ["end_to_end", "stage_wise"], "Latent learning schedule.")
_EPOCHS = flags.DEFINE_integer("epochs", _D.epochs, "Epochs of latent learning with LASSO.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps_per_epoch", None, "Batches per epoch (default: the whole data set).",
                              lower_bound=1)
_RECOVER = flags.DEFINE_integer("recover_epochs", _D.recover_epochs, "Epochs of recovery after pruning.", lower_bound=0)
_LR = flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate (cosine decay).", lower_bound=0.0)
_RECOVER_LR = flags.DEFINE_float("recover_learning_rate", _D.recover_learning_rate, "Recovery learning rate.", lower_bound=0.0)
_TAP_WEIGHT = flags.DEFINE_float("tap_weight", _D.tap_weight, "Weight of each latent matching loss.", lower_bound=0.0)
_KD_WEIGHT = flags.DEFINE_float("kd_weight", _D.kd_weight, "Weight of output distillation.", lower_bound=0.0)
_TEMPERATURE = flags.DEFINE_float("temperature", _D.temperature, "Distillation temperature.", lower_bound=0.0)
_LASSO = flags.DEFINE_float("lasso", _D.lasso, "Channel LASSO factor (0 disables).", lower_bound=0.0)
_LASSO_LR = flags.DEFINE_float("lasso_learning_rate", _D.lasso_learning_rate, "SGD learning rate of LASSO'd variables.",
                               lower_bound=0.0)
_TARGET = flags.DEFINE_float("target_params", None, "Parameter budget: a ratio of the teacher's (<= 1) or a whole "
                             "count (> 1).", lower_bound=0.0)
_TARGET_MACS = flags.DEFINE_float("target_macs", None, "MAC budget per image: a ratio of the teacher's (<= 1) or a "
                                  "whole count (> 1).", lower_bound=0.0)
_STATS_BATCHES = flags.DEFINE_integer("stats_batches", _D.stats_batches, "Batches for latent statistics.", lower_bound=1)
_BN_BATCHES = flags.DEFINE_integer("bn_batches", _D.bn_batches, "Batches for BN re-estimation.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", _D.seed, "Random seed.")
_TENSORBOARD = flags.DEFINE_string("tensorboard_dir", None, "TensorBoard log directory (none if unset).")
_STRATEGY = flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                               "tf.distribute strategy: one device, the devices of this host (MirroredStrategy), "
                               "or several hosts (MultiWorkerMirroredStrategy from TF_CONFIG; run the same "
                               "command on every worker). --batch_size is the global batch.")
_VERBOSE = flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"], "Progress output.")

for _name in ("learning_rate", "recover_learning_rate", "temperature", "lasso_learning_rate"):
    flags.register_validator(_name, lambda v: v > 0, f"--{_name} must be positive")
flags.register_validator("energy", lambda v: v > 0, "--energy must be in (0, 1]")
flags.register_validator("width_ratio", lambda v: v is None or v > 0, "--width_ratio must be in (0, 1]")
for _name in ("target_params", "target_macs"):
    flags.register_validator(_name, lambda v: v is None or 0 < v <= 1 or float(v).is_integer(),
                             f"--{_name} must be a ratio in (0, 1] or a whole count")


def _budget(value):
    """A flag's budget as compress() reads it: a ratio stays a float, a count becomes an int."""
    return None if value is None else (float(value) if value <= 1 else int(value))


def main(argv):
    del argv
    from tfsubspace import compress, data, load_model
    from tfsubspace.train import distribute

    strategy = distribute.get_strategy(_STRATEGY.value)
    teacher = load_model(_TEACHER.value, safe_mode=not _UNSAFE.value)
    info = data.dataset_info(_DATASET.value)
    ds = data.load(info.name, "train", batch_size=_BATCH.value, labels=False, limit=_EXAMPLES.value,
                   seed=_SEED.value, data_dir=_DATA_DIR.value)
    eval_ds = data.load(info.name, "test", batch_size=512, shuffle=False, limit=_EVAL_EXAMPLES.value,
                        data_dir=_DATA_DIR.value)
    result = compress(
        teacher, ds, work_dir=_WORK_DIR.value, eval_ds=eval_ds, overwrite=_OVERWRITE.value, strategy=None if _STRATEGY.value == "default" else strategy,
        energy=None if _WIDTH_RATIO.value else _ENERGY.value, width_ratio=_WIDTH_RATIO.value,
        min_ratio=_MIN_RATIO.value, multiple=_MULTIPLE.value, init=_INIT.value, schedule=_SCHEDULE.value,
        epochs=_EPOCHS.value, recover_epochs=_RECOVER.value, steps_per_epoch=_STEPS.value, learning_rate=_LR.value,
        recover_learning_rate=_RECOVER_LR.value, tap_weight=_TAP_WEIGHT.value, kd_weight=_KD_WEIGHT.value,
        temperature=_TEMPERATURE.value, lasso=_LASSO.value, lasso_learning_rate=_LASSO_LR.value,
        target_params=_budget(_TARGET.value), target_macs=_budget(_TARGET_MACS.value), stats_batches=_STATS_BATCHES.value, bn_batches=_BN_BATCHES.value,
        seed=_SEED.value, tensorboard_dir=_TENSORBOARD.value, verbose=_VERBOSE.value if _VERBOSE.value == "auto" else int(_VERBOSE.value),
    )
    if distribute.is_chief(strategy):  # other workers wrote to a private copy, now gone
        print(result.summary())
        print(f"student: {result.paths['student']}")
        print(f"plan:    {result.paths['plan']}")


if __name__ == "__main__":
    app.run(main)
