import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes a uint8 array as an IDX file, written by hand from the format's definition."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx_dataset(root: Path, name: str, n_train: int = 40, n_test: int = 20, seed: int = 0, gz: bool = False):
    """Writes a small random IDX data set in the layout tfsubspace.data expects."""
    rng = np.random.default_rng(seed)
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            path = directory / f"{prefix}-{kind}"
            if gz:
                path = path.with_name(path.name + ".gz")
                data = gzip.compress(data)
            path.write_bytes(data)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.fixture
def fake_data_dir(tmp_path):
    arrays = write_idx_dataset(tmp_path, "mnist")
    return tmp_path, arrays


@pytest.fixture(autouse=True)
def _images_in_domain(request, monkeypatch):
    """compress(adapt="auto") adapts images that are far from the teacher's BatchNormalization
    statistics, and the random images these tests give untrained models always are: a minute or
    more of every such call on 2 cores. Tests marked `auto_adapt` keep the real threshold; for the
    others every image counts as in-domain (in this process: not in the scripts tests run)."""
    if request.node.get_closest_marker("auto_adapt") is None:
        from tfsubspace.distill import adapt

        monkeypatch.setattr(adapt, "AUTO_DISTANCE", float("inf"))
