"""TFMOT magnitude pruning of a teacher, for benchmarks/compare.py (run it in the tfmot environment).

    .venv-tfmot/bin/python benchmarks/tfmot_prune.py --spec=DIR --dataset=mnist --sparsity=0.9 --epochs=4 --out_dir=DIR

DIR holds a layer spec written by tfsubspace.peers.bridge.save_spec. Writes float32.tflite,
int8.tflite and result.json (accuracy, sparsity, raw and gzip-compressed sizes) to --out_dir.
"""

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_SPEC = flags.DEFINE_string("spec", None, "Directory of the model's layer spec.", required=True)
_DATASET = flags.DEFINE_string("dataset", None, "Data set to fine-tune and test on.", required=True)
_SPARSITY = flags.DEFINE_float(
    "sparsity", None, "Final share of zero weights.", lower_bound=0, upper_bound=0.99, required=True
)
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Fine-tuning epochs.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_TRAIN_LIMIT = flags.DEFINE_integer("train_limit", None, "Use only this many training images.")
_OUT = flags.DEFINE_string("out_dir", None, "Output directory.", required=True)


def main(argv):
    del argv
    import tensorflow as tf

    from tfsubspace import data
    from tfsubspace.peers.tfmot_jobs import magnitude_pruning

    tf.keras.utils.set_random_seed(_SEED.value)
    labeled = data.load(_DATASET.value, "train", batch_size=128, seed=_SEED.value, limit=_TRAIN_LIMIT.value)
    test = data.load(_DATASET.value, "test", batch_size=512, shuffle=False)
    result = magnitude_pruning(
        _SPEC.value, labeled, test, _OUT.value, sparsity=_SPARSITY.value, epochs=_EPOCHS.value, verbose=2
    )
    print(f"tfmot: accuracy {100 * result['accuracy']:.2f}% at {100 * result['kernel_sparsity']:.1f}% kernel sparsity")


if __name__ == "__main__":
    app.run(main)
