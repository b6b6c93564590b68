"""Trains a reference teacher with labels and saves it as .keras.

    python scripts/train_teacher.py --model=vgg16 --width=0.25 --dataset=fashion_mnist \
        --epochs=10 --output=runs/vgg16_w0.25_fmnist/teacher.keras

A killed run resumes from its last finished epoch when started again with the same
--output (the state lives in OUTPUT.work/). Prints the test accuracy at the end.
"""

from absl import app, flags
from flagdefs import define_dataset, define_strategy

_MODEL = flags.DEFINE_enum("model", "lenet5", ["lenet5", "vgg16", "wrn"], "Reference model to train.")
_WIDTH = flags.DEFINE_float("width", 1.0, "VGG-16 channel multiplier.", lower_bound=1e-3)
_DEPTH = flags.DEFINE_integer("depth", 16, "Wide ResNet depth (6n + 4).", lower_bound=10)
_WIDEN = flags.DEFINE_integer("widen_factor", 4, "Wide ResNet widen factor k.", lower_bound=1)
_DATASET = define_dataset("Training data set.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Data directory (default: $TFSUBSPACE_DATA_DIR or ~/.cache/tfsubspace/data)."
)
_TRAIN_EXAMPLES = flags.DEFINE_integer("train_examples", None, "Use only this many training examples.", lower_bound=1)
_TEST_EXAMPLES = flags.DEFINE_integer("test_examples", None, "Use only this many test examples.", lower_bound=1)
_AUGMENT = flags.DEFINE_boolean("augment", False, "Random shifts (and flips for CIFAR) while training.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Training epochs.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimizer (SGD uses Nesterov momentum 0.9).")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Initial learning rate.", lower_bound=0.0)
_SCHEDULE = flags.DEFINE_enum("lr_schedule", "cosine", ["constant", "cosine"], "Learning-rate schedule.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay.", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed for weights, shuffling and augmentation.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the trained model (.keras).", required=True)
_TENSORBOARD = flags.DEFINE_string("tensorboard_dir", None, "TensorBoard log directory (none if unset).")
_STRATEGY = define_strategy()
_VERBOSE = flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"], "Keras fit() verbosity.")

flags.register_validator("output", lambda v: v is None or v.endswith(".keras"), "--output must end in .keras")
flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be positive")


def main(argv):
    del argv
    import keras

    from tfsubspace import data, models
    from tfsubspace.models import stats
    from tfsubspace.train import classifier, distribute

    strategy = distribute.get_strategy(_STRATEGY.value)
    keras.utils.set_random_seed(_SEED.value)
    info = data.dataset_info(_DATASET.value)
    common = dict(batch_size=_BATCH_SIZE.value, seed=_SEED.value, data_dir=_DATA_DIR.value)
    train_ds = data.load(info.name, "train", augment=_AUGMENT.value, limit=_TRAIN_EXAMPLES.value, **common)
    test_ds = data.load(info.name, "test", shuffle=False, limit=_TEST_EXAMPLES.value, **common)
    with strategy.scope():
        model = models.build(
            _MODEL.value,
            info.image_shape,
            info.num_classes,
            width=_WIDTH.value,
            depth=_DEPTH.value,
            widen_factor=_WIDEN.value,
        )
    print(
        f"{model.name} on {info.name}: {stats.count_params(model):,} params, {stats.count_macs(model):,} MACs per image"
    )
    verbose = _VERBOSE.value if _VERBOSE.value == "auto" else int(_VERBOSE.value)
    result = classifier.train_classifier(
        model,
        train_ds,
        test_ds,
        epochs=_EPOCHS.value,
        optimizer=_OPTIMIZER.value,
        learning_rate=_LR.value,
        lr_schedule=_SCHEDULE.value,
        weight_decay=_WEIGHT_DECAY.value,
        output=_OUTPUT.value,
        tensorboard_dir=_TENSORBOARD.value,
        verbose=verbose,
        strategy=strategy,
    )
    print(f"test accuracy: {result.test_accuracy:.4f} ({result.test_accuracy * 100:.2f}%)")
    if result.model_path is not None and distribute.is_chief(strategy):
        print(f"saved: {result.model_path}")


if __name__ == "__main__":
    app.run(main)
