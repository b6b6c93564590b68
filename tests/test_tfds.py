import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfsubspace import data
from tfsubspace.errors import DatasetNotAvailableError


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100), ("svhn_cropped", 10)])
def test_tfds_datasets_through_mock_data(name, classes):
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(name, "train", batch_size=4)
        batches = list(ds)
        unlabeled = list(data.load(name, "test", batch_size=4, labels=False))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (4, 32, 32, 3) and x.dtype.name == "float32" and y.dtype.name == "int32"
    assert float(np.min(x)) >= 0.0 and float(np.max(x)) <= 1.0
    assert all(0 <= int(label) < classes for _, ys in batches for label in ys)
    assert unlabeled[0].shape == (4, 32, 32, 3)


def test_tfds_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="not prepared .*download=True"):
        data.load("cifar10", "train", data_dir=tmp_path)
