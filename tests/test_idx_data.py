import gzip

import numpy as np
import pytest
from conftest import idx_bytes, write_idx_dataset

from tfsubspace import data
from tfsubspace.errors import DataFileError, DatasetNotAvailableError


def test_read_idx_raw_and_gzipped(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), array)


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "i").write_bytes(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + values.tobytes())
    out = data.read_idx(tmp_path / "i")
    assert out.tolist() == [1, -2, 70000]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x42" + b[3:], "not an IDX file"),
        (lambda b: b[:2], "too short"),
        (lambda b: gzip.compress(b)[:-10], "corrupt or truncated gzip"),
    ],
)
def test_read_idx_rejects_bad_files_naming_them(tmp_path, mutate, message):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(np.zeros((3, 2, 2), np.uint8))))
    with pytest.raises(DataFileError, match=message) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="not found"):
        data.read_idx(tmp_path / "nope")


def test_load_arrays_from_hand_made_files(tmp_path):
    arrays = write_idx_dataset(tmp_path, "mnist", gz=True)
    images, labels = data.load_arrays("mnist", "test", data_dir=tmp_path)
    assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], arrays["t10k"][0])
    np.testing.assert_array_equal(labels, arrays["t10k"][1])


def test_load_arrays_mismatched_label_count(tmp_path):
    write_idx_dataset(tmp_path, "mnist")
    label_path = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    label_path.write_bytes(idx_bytes(np.zeros(39, np.uint8)))
    with pytest.raises(DataFileError, match="expected 40 labels") as info:
        data.load_arrays("mnist", "train", data_dir=tmp_path)
    assert str(label_path) in str(info.value)


def test_load_arrays_label_out_of_range(tmp_path):
    write_idx_dataset(tmp_path, "mnist")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(40, 10, np.uint8)))
    with pytest.raises(DataFileError, match=r"labels must lie in \[0, 10\)"):
        data.load_arrays("mnist", "train", data_dir=tmp_path)


def test_missing_data_says_how_to_fetch(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="make data"):
        data.load_arrays("fashion_mnist", "train", data_dir=tmp_path)


def test_unknown_names_list_what_is_known(tmp_path):
    with pytest.raises(ValueError, match="Known data sets: mnist, fashion_mnist"):
        data.dataset_info("imagenet")
    with pytest.raises(ValueError, match="Unknown split"):
        data.load("mnist", "validation", data_dir=tmp_path)


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "d"))
    assert data.default_data_dir() == tmp_path / "d"
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert data.default_data_dir().parts[-3:] == (".cache", "tfsubspace", "data")


def test_pipeline_values_shuffling_and_unlabeled_view(fake_data_dir):
    root, arrays = fake_data_dir
    ds = data.load("mnist", "train", batch_size=8, data_dir=root, shuffle=False)
    x, y = next(iter(ds))
    assert x.shape == (8, 28, 28, 1) and x.dtype.name == "float32" and y.dtype.name == "int32"
    np.testing.assert_allclose(x.numpy()[..., 0], arrays["train"][0][:8] / 255.0, rtol=1e-6)

    def labels_of(seed):
        ds = data.load("mnist", "train", batch_size=None, data_dir=root, seed=seed)
        return [int(y) for _, y in ds]

    assert labels_of(1) == labels_of(1)
    assert sorted(labels_of(1)) == sorted(arrays["train"][1].tolist())
    assert labels_of(1) != labels_of(2)

    images_only = data.load("mnist", "test", batch_size=5, labels=False, limit=10, data_dir=root)
    batches = list(images_only)
    assert [b.shape[0] for b in batches] == [5, 5]
    assert len(list(data.unlabeled(data.load("mnist", "test", batch_size=5, data_dir=root)))) == 4


def test_augmentation_shifts_but_keeps_shape_and_range(fake_data_dir):
    root, _ = fake_data_dir
    plain = data.load("mnist", "train", batch_size=40, data_dir=root, shuffle=False)
    augmented = data.load("mnist", "train", batch_size=40, data_dir=root, shuffle=False, augment=True, seed=3)
    (x0, y0), (x1, y1) = next(iter(plain)), next(iter(augmented))
    assert x1.shape == x0.shape
    np.testing.assert_array_equal(y0, y1)
    assert float(x1.numpy().min()) >= 0.0 and float(x1.numpy().max()) <= 1.0
    assert not np.array_equal(x0.numpy(), x1.numpy())
    again = data.load("mnist", "train", batch_size=40, data_dir=root, shuffle=False, augment=True, seed=3)
    np.testing.assert_array_equal(next(iter(again))[0].numpy(), x1.numpy())
