"""Fetches the offline data sets (MNIST, Fashion-MNIST) into the data directory.

python scripts/fetch_data.py [--datasets=mnist,fashion_mnist] [--data_dir=DIR]
"""

from absl import app, flags

from tfsubspace.data.fetch import FASHION_MNIST_DEBIAN_DIR, FETCHABLE, fetch

_DATASETS = flags.DEFINE_multi_enum("datasets", list(FETCHABLE), list(FETCHABLE), "Data sets to fetch.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Data directory (default: $TFSUBSPACE_DATA_DIR or ~/.cache/tfsubspace/data)."
)
_FASHION_SOURCE = flags.DEFINE_string(
    "fashion_mnist_source",
    str(FASHION_MNIST_DEBIAN_DIR),
    "Where the Debian package dataset-fashion-mnist put the gzipped IDX files.",
)


def main(argv):
    del argv
    fetch(_DATASETS.value, _DATA_DIR.value, fashion_mnist_source=_FASHION_SOURCE.value)


if __name__ == "__main__":
    app.run(main)
