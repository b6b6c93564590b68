"""Int8 export of a model that takes 0-255 pixels (it starts with Rescaling(1/255)).

Calibrating such a model on [0, 1] images gives an int8 file that clips every real pixel
above 1, while a check on those same images reports full agreement: the export refuses such
data, and scripts/export_tflite.py feeds the range the model takes (--input_range=auto).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, idx_bytes

from tfsubspace import data
from tfsubspace.edge import export, input_range, measure
from tfsubspace.errors import TfSubspaceError


def blobs(n, seed):
    """0-255 uint8 28x28 images of 4 classes: a bright 10x10 square in one quadrant, on noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
    for image, label in zip(images, labels):
        r, c = 2 + 14 * (label // 2), 2 + 14 * (label % 2)
        image[r : r + 10, c : c + 10] = rng.integers(150, 256, (10, 10))
    return images, labels


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A trained Rescaling(1/255) model (saved), and its data as an offline "mnist" IDX set."""
    root = tmp_path_factory.mktemp("range")
    for prefix, n, seed in (("train", 512, 0), ("t10k", 256, 1)):
        images, labels = blobs(n, seed)
        (root / "mnist").mkdir(exist_ok=True)
        (root / "mnist" / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (root / "mnist" / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Rescaling(1 / 255, name="to_unit"),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
        ],
        name="takes255",
    )
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*arrays(root, "train"), batch_size=32, epochs=10, verbose=0)
    model.save(root / "takes255.keras")
    return root, model


def arrays(root, split):
    """(float32 0-255 images (N, 28, 28, 1), labels) of the offline set."""
    images, labels = data.load_arrays("mnist", split, root)
    return images.astype("float32"), labels


def as_ds(images):
    return tf.data.Dataset.from_tensor_slices(images).batch(64)


def load(root, split, value_range):
    return data.load("mnist", split, batch_size=64, labels=False, shuffle=False, data_dir=root, value_range=value_range)


def test_data_load_value_range(setup):
    root, _ = setup
    unit, raw = (next(iter(load(root, "test", r))).numpy() for r in ("0-1", "0-255"))
    np.testing.assert_allclose(raw, unit * 255, rtol=1e-6)
    assert raw.max() > 200 and unit.max() <= 1.0
    with pytest.raises(ValueError, match="value_range must be one of"):
        data.load("mnist", "test", data_dir=root, value_range="0-65535")


def test_int8_is_calibrated_and_checked_in_the_range_the_model_takes(setup, tmp_path):
    root, model = setup
    assert input_range.model_input_range(model) == "0-255"
    test255, labels = arrays(root, "test")
    assert np.mean(model.predict(test255, verbose=0).argmax(-1) == labels) > 0.9  # the model works on 0-255
    # The old path: calibrated and checked on [0, 1]; it looks perfect, and fails on real 0-255 input.
    bad = export.export(
        model,
        tmp_path / "bad",
        modes=("int8",),
        calibration_ds=load(root, "train", "0-1"),
        check_ds=load(root, "test", "0-1"),
        input_range="0-1",
    )[0]
    _, bad_on_255 = export.check(bad.path, model, test255)
    # The fixed path: the model's own range.
    good = export.export(
        model,
        tmp_path / "good",
        modes=("int8",),
        calibration_ds=load(root, "train", "0-255"),
        check_ds=load(root, "test", "0-255"),
    )[0]
    _, good_on_255 = export.check(good.path, model, test255)
    print(
        f"int8 agreement on 0-255 images: calibrated on 0-1 {bad_on_255:.2%} (reported {bad.agreement:.2%}), "
        f"on 0-255 {good_on_255:.2%}"
    )
    assert bad_on_255 < 0.5 and good.passed and good_on_255 >= 0.98


def test_data_in_the_wrong_range_is_refused(setup, tmp_path):
    root, model = setup
    test255, _ = arrays(root, "test")
    error = getattr(input_range, "InputRangeError", TfSubspaceError)
    with pytest.raises(
        error,
        match=r"'takes255' starts with Rescaling 'to_unit' \(scale=0.003922, offset=0.0\): "
        r"it takes 0-255 images, but the calibration images \(calibration_ds\) are all within \[0, 1\]",
    ):
        export.export(
            model,
            tmp_path,
            modes=("int8",),
            calibration_ds=as_ds(arrays(root, "train")[0] / 255),
            check_ds=as_ds(test255),
        )
    with pytest.raises(error, match=r"the check images \(check_ds\) are all within"):
        export.export(model, tmp_path, modes=("float32",), check_ds=as_ds(test255 / 255))
    with pytest.raises(error, match=r"evaluation images \(eval_ds\) are all within"):
        measure.benchmark([], eval_ds=as_ds(test255 / 255), reference=model)
    with pytest.raises(error, match="input_range='0-255' was given .* all within"):
        export.export(model, tmp_path, modes=("float32",), check_ds=as_ds(test255 / 255), input_range="0-255")
    plain = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Rescaling(2.0), keras.layers.Flatten()])
    assert input_range.input_rescaling(plain) is None and input_range.model_input_range(plain) == "0-1"


@pytest.mark.slow
def test_export_script_uses_the_models_range(setup, tmp_path):
    root, model = setup
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "export_tflite.py"),
            f"--model={root / 'takes255.keras'}",
            f"--data_dir={root}",
            f"--out_dir={out}",
            "--modes=int8",
            "--calibration_examples=256",
            "--check_examples=256",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    _, agreement = export.check(out / "takes255_int8.tflite", model, arrays(root, "test")[0])
    assert agreement >= 0.98, run.stdout
    assert run.returncode == 0, run.stderr[-2000:]
    assert "input range: 0-255 (auto: model 'takes255' starts with Rescaling 'to_unit'" in run.stdout


@pytest.mark.slow
def test_benchmark_refuses_a_repeated_label(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark.py"),
            "--models=a=x.keras,b=y.keras,a=z.keras",
            f"--out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert run.returncode != 0
    assert "--models gives the label 'a' twice" in run.stderr, run.stderr[-2000:]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_benchmark_refuses_models_of_different_ranges(setup, tmp_path):
    root, _ = setup
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(4)], name="unit").save(
        tmp_path / "unit.keras"
    )
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark.py"),
            f"--models=a={tmp_path / 'unit.keras'},b={root / 'takes255.keras'}",
            f"--data_dir={root}",
            f"--out_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert run.returncode != 0
    assert "the models take different pixel ranges (a: 0-1" in run.stderr, run.stderr[-2000:]
    assert "b: 0-255, auto: model 'takes255' starts with Rescaling 'to_unit'" in run.stderr
