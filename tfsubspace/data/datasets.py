"""Data sets as tf.data pipelines: offline MNIST/Fashion-MNIST from IDX files, others via tfds.

Images come out as float32 in [0, 1] with shape (H, W, C) (or in [0, 255], for models that
rescale their input themselves: `value_range="0-255"`); labels as int32. Every loader can
also give the unlabeled view (images only) that compression uses.

MNIST and Fashion-MNIST are read from local IDX files (raw or gzipped) under the data
directory: `$TFSUBSPACE_DATA_DIR`, else `~/.cache/tfsubspace/data`. `tfsubspace.data.fetch`
(or `make data`) puts them there on a fresh machine. CIFAR-10/100 and SVHN load through
tensorflow-datasets when it is installed and the data is already prepared; nothing is
downloaded unless `download=True` is passed.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from tfsubspace.errors import DataFileError, DatasetNotAvailableError

DATA_DIR_ENV = "TFSUBSPACE_DATA_DIR"

# IDX type codes (the third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What tfsubspace knows of a data set before loading it."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    source: str  # "idx" (local files) or "tfds"
    splits: tuple[str, ...] = ("train", "test")


_IDX_DATASETS = {
    "mnist": DatasetInfo("mnist", (28, 28, 1), 10, "idx"),
    "fashion_mnist": DatasetInfo("fashion_mnist", (28, 28, 1), 10, "idx"),
}
_TFDS_DATASETS = {
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), 10, "tfds"),
    "cifar100": DatasetInfo("cifar100", (32, 32, 3), 100, "tfds"),
    "svhn_cropped": DatasetInfo("svhn_cropped", (32, 32, 3), 10, "tfds", ("train", "test", "extra")),
}
DATASETS: tuple[str, ...] = tuple(_IDX_DATASETS) + tuple(_TFDS_DATASETS)

# Pixel value ranges load() can give, and the divisor of the stored uint8 pixels for each.
VALUE_RANGES: dict[str, float] = {"0-1": 255.0, "0-255": 1.0}

# Local file names, as published with the original data sets.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_data_dir() -> Path:
    """The data directory: `$TFSUBSPACE_DATA_DIR`, else `~/.cache/tfsubspace/data`."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tfsubspace" / "data"


def dataset_info(name: str) -> DatasetInfo:
    """Returns the DatasetInfo of `name`; raises ValueError listing the known names."""
    info = _IDX_DATASETS.get(name) or _TFDS_DATASETS.get(name)
    if info is None:
        raise ValueError(f"Unknown data set {name!r}. Known data sets: {', '.join(DATASETS)}.")
    return info


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (raw or gzip-compressed) into a numpy array.

    The format: two zero bytes, a type code, the number of dimensions n, then n
    big-endian uint32 sizes, then the data. Any deviation (bad magic, unknown type,
    fewer or more data bytes than the header promises, a broken gzip stream) raises
    DataFileError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotAvailableError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataFileError(f"{path}: corrupt or truncated gzip stream ({e}).") from None
    if len(raw) < 4:
        raise DataFileError(f"{path}: too short for an IDX header ({len(raw)} bytes).")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataFileError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()}).")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFileError(f"{path}: truncated IDX header (expected {header_len} bytes, found {len(raw)}).")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_len
    if found != expected:
        kind = "truncated" if found < expected else "has trailing bytes"
        raise DataFileError(f"{path}: {kind}: header shape {shape} needs {expected} data bytes, found {found}.")
    return np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape).astype(dtype.newbyteorder("="))


def idx_file(directory: Path, stem: str) -> Path | None:
    """The IDX file `stem` in `directory`, raw or gzipped (.gz), or None if neither exists."""
    return next((p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()), None)


def _find_idx_file(directory: Path, stem: str) -> Path:
    found = idx_file(directory, stem)
    if found is not None:
        return found
    raise DatasetNotAvailableError(
        f"{directory / stem}[.gz] not found. Fetch the offline data first: `make data` "
        f"or `python scripts/fetch_data.py --data_dir={directory.parent}`."
    )


def load_arrays(name: str, split: str = "train", data_dir: str | os.PathLike | None = None):
    """Loads a local IDX data set split as numpy arrays.

    Returns:
        (images, labels): uint8 images of shape (N, H, W, C) and int32 labels of shape (N,).
    """
    info = dataset_info(name)
    if info.source != "idx":
        raise ValueError(f"{name!r} is a tensorflow-datasets data set; use tfsubspace.data.load().")
    if split not in _IDX_FILES:
        raise ValueError(f"Unknown split {split!r} for {name!r}; expected one of {tuple(_IDX_FILES)}.")
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    directory = directory / name
    image_path = _find_idx_file(directory, _IDX_FILES[split][0])
    label_path = _find_idx_file(directory, _IDX_FILES[split][1])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != info.image_shape[:2] or images.dtype != np.uint8:
        raise DataFileError(
            f"{image_path}: expected uint8 images of shape (N, {info.image_shape[0]}, "
            f"{info.image_shape[1]}), found {images.dtype} {images.shape}."
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataFileError(
            f"{label_path}: expected {images.shape[0]} labels to match {image_path.name}, found shape {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataFileError(
            f"{label_path}: labels must lie in [0, {info.num_classes}), found [{labels.min()}, {labels.max()}]."
        )
    return images[..., np.newaxis], labels.astype(np.int32)


# ----------------------------------------------------------------------------- pipelines


def load(
    name: str,
    split: str = "train",
    *,
    batch_size: int | None = 128,
    shuffle: bool | None = None,
    seed: int = 0,
    augment: bool = False,
    labels: bool = True,
    limit: int | None = None,
    drop_remainder: bool = False,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    value_range: str = "0-1",
):
    """Loads a data set split as a tf.data pipeline.

    Args:
        name: one of DATASETS.
        split: "train" or "test" ("extra" too for svhn_cropped).
        batch_size: batch size, or None for single examples.
        shuffle: shuffle with `seed`; defaults to True for the train split.
        seed: seed for shuffling and augmentation, so that runs repeat.
        augment: random shifts by up to 2 pixels (28x28) or 4 pixels plus horizontal
            flips (CIFAR); SVHN digits are shifted but never flipped.
        labels: yield (image, label) pairs if True, images alone (the unlabeled view
            used by compression) if False.
        limit: keep only the first `limit` examples (before shuffling), for quick runs.
        drop_remainder: drop the last partial batch.
        data_dir: the data directory (see default_data_dir); for tfds data sets, the
            tfds data directory (tfds's own default when None).
        download: let tensorflow-datasets download and prepare the data if missing.
        value_range: "0-1" (pixels / 255) or "0-255" (the raw pixel values, as float32),
            for models that start with their own Rescaling(1/255): they must be fed,
            calibrated and checked in the range they take.

    Returns:
        A tf.data.Dataset of float32 images in `value_range` (default [0, 1]), (H, W, C), and
        int32 labels.
    """
    import tensorflow as tf

    info = dataset_info(name)
    if split not in info.splits:
        raise ValueError(f"Unknown split {split!r} for {name!r}; expected one of {info.splits}.")
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer or None. Received: batch_size={batch_size}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive integer or None. Received: limit={limit}")
    if value_range not in VALUE_RANGES:
        raise ValueError(f"value_range must be one of {tuple(VALUE_RANGES)}. Received: value_range={value_range!r}")
    if shuffle is None:
        shuffle = split == "train"

    if info.source == "idx":
        images, ys = load_arrays(name, split, data_dir)
        if limit is not None:
            images, ys = images[:limit], ys[:limit]
        ds = tf.data.Dataset.from_tensor_slices((images, ys))
        size = len(ys)
    else:
        ds = _load_tfds(info, split, data_dir, download)
        if limit is not None:
            ds = ds.take(limit)
        size = int(ds.cardinality())

    if shuffle:
        buffer = size if size > 0 else 10_000
        ds = ds.shuffle(min(buffer, 60_000), seed=seed, reshuffle_each_iteration=True)
    divisor = VALUE_RANGES[value_range]
    ds = ds.map(lambda x, y: _to_float(x, y, divisor), num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        pad = 2 if info.image_shape[0] <= 28 else 4
        flip = name.startswith("cifar")
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed).batch(2))).map(
            lambda pair, s: _augment(pair, s, info.image_shape, pad, flip),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if not labels:
        ds = ds.map(lambda x, y: x)
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def unlabeled(ds):
    """The images-only view of a dataset of (images, labels); an images-only one passes through."""
    spec = ds.element_spec
    if isinstance(spec, tuple):
        return ds.map(lambda x, *rest: x)
    return ds


def _to_float(image, label, divisor=255.0):
    import tensorflow as tf

    return tf.cast(image, tf.float32) / divisor, tf.cast(label, tf.int32)


def _augment(pair, seed, image_shape, pad, flip):
    import tensorflow as tf

    image, label = pair
    seed = tf.cast(seed, tf.int32)
    h, w, _ = image_shape
    image = tf.image.resize_with_crop_or_pad(image, h + 2 * pad, w + 2 * pad)
    image = tf.image.stateless_random_crop(image, image_shape, seed=seed)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
    return image, label


def _load_tfds(info: DatasetInfo, split: str, data_dir, download: bool):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DatasetNotAvailableError(
            f"{info.name!r} loads through tensorflow-datasets, which is not installed. "
            "Install it with `pip install 'tfsubspace[datasets]'`."
        ) from None
    try:
        return tfds.load(
            info.name,
            split=split,
            as_supervised=True,
            data_dir=None if data_dir is None else str(data_dir),
            download=download,
        )
    except AssertionError as e:  # what tfds raises for data that is not prepared
        raise DatasetNotAvailableError(
            f"{info.name!r} is not prepared in the tensorflow-datasets data directory "
            f"({data_dir or 'tfds default'}): {e} On a machine with internet access, run "
            f"`python -c \"import tensorflow_datasets as tfds; tfds.load('{info.name}')\"` "
            "(or pass download=True), then copy the data directory here."
        ) from None
