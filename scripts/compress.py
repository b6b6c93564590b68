"""Compresses a trained Keras teacher by teacher latent subspace learning with LASSO.

    python scripts/compress.py --teacher=runs/demo/teacher.keras --dataset=mnist \
        --work_dir=runs/demo/compress --epochs=3 --energy=0.95

No labels are read for training: the data set's images alone guide the student; the test
split's labels are used only for the report. Every stage writes into --work_dir; start the
same command again after a crash or a kill and it resumes where it stopped.
"""

from absl import app, flags
from flagdefs import config_from_flags, define_config_flags, define_dataset, define_strategy

from tfsubspace.distill.pipeline import CompressionConfig

_TEACHER = flags.DEFINE_string("teacher", None, "The trained teacher (.keras).", required=True)
_UNSAFE = flags.DEFINE_boolean(
    "unsafe_deserialization",
    False,
    "Allow loading Lambda layers and other code from --teacher (only for files you trust).",
)
_DATASET = define_dataset("Data set whose images (unlabeled) train the student.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Data directory (default: $TFSUBSPACE_DATA_DIR or ~/.cache/tfsubspace/data)."
)
_EXAMPLES = flags.DEFINE_integer("examples", None, "Use only this many training images.", lower_bound=1)
_EVAL_EXAMPLES = flags.DEFINE_integer(
    "eval_examples", None, "Use only this many test images for the report.", lower_bound=1
)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Directory for every stage's results (resumable).", required=True)
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite",
    False,
    "Clear --work_dir's stages and start over (a rerun with another teacher, options or data is refused without it).",
)
_STRATEGY = define_strategy()
# every compress() option, from CompressionConfig's fields (compress() validates the values)
_OPTIONS = define_config_flags(CompressionConfig)


def main(argv):
    del argv
    from tfsubspace import compress, data, load_model
    from tfsubspace.train import distribute

    options = config_from_flags(CompressionConfig, _OPTIONS)
    strategy = distribute.get_strategy(_STRATEGY.value)
    teacher = load_model(_TEACHER.value, safe_mode=not _UNSAFE.value)
    info = data.dataset_info(_DATASET.value)
    ds = data.load(
        info.name,
        "train",
        batch_size=_BATCH.value,
        labels=False,
        limit=_EXAMPLES.value,
        seed=options["seed"],
        data_dir=_DATA_DIR.value,
    )
    eval_ds = data.load(
        info.name, "test", batch_size=512, shuffle=False, limit=_EVAL_EXAMPLES.value, data_dir=_DATA_DIR.value
    )
    result = compress(
        teacher,
        ds,
        work_dir=_WORK_DIR.value,
        eval_ds=eval_ds,
        overwrite=_OVERWRITE.value,
        strategy=None if _STRATEGY.value == "default" else strategy,
        **options,
    )
    if distribute.is_chief(strategy):  # other workers wrote to a private copy, now gone
        print(result.summary())
        print(f"student: {result.paths['student']}")
        print(f"plan:    {result.paths['plan']}")


if __name__ == "__main__":
    app.run(main)
