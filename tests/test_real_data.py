"""The real offline data sets, as fetched by `make data` (tfsubspace.data.fetch)."""

import numpy as np
import pytest

from tfsubspace import data

# Published class histograms of the two data sets.
MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize(
    "name, split, histogram",
    [
        ("mnist", "train", MNIST_TRAIN),
        ("mnist", "test", MNIST_TEST),
        ("fashion_mnist", "train", [6000] * 10),
        ("fashion_mnist", "test", [1000] * 10),
    ],
)
def test_counts_and_label_histograms(name, split, histogram):
    images, labels = data.load_arrays(name, split)
    assert images.shape == (sum(histogram), 28, 28, 1)
    assert np.bincount(labels, minlength=10).tolist() == histogram
    assert images.max() == 255 and images.min() == 0


def test_real_pipeline_batches():
    ds = data.load("fashion_mnist", "test", batch_size=1000, shuffle=False)
    sizes = [int(x.shape[0]) for x, _ in ds]
    assert sizes == [1000] * 10
