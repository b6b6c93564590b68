"""Corrupted files reach the entry points: each gives its clear error, never a crash deep inside."""

import contextlib
import gzip
import json

import keras
import numpy as np
import pytest
from conftest import idx_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfsubspace import data, fileio, models
from tfsubspace.edge import convert, runtime
from tfsubspace.errors import DataFileError, TfSubspaceError
from tfsubspace.prune import analysis, surgery
from tfsubspace.prune.plan import PlanError, PruningPlan

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def corrupt(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    """`data` truncated to `cut` bytes (if shorter), with some bytes replaced."""
    out = bytearray(data[: max(0, min(cut, len(data)))])
    for position, value in flips:
        if out:
            out[position % len(out)] = value
    return bytes(out)


CORRUPTION = dict(
    cut=st.integers(0, 1 << 20), flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)
)


@FUZZ
@given(gz=st.booleans(), **CORRUPTION)
def test_idx(tmp_path, gz, cut, flips):
    raw = idx_bytes(np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3))
    path = tmp_path / "f-idx3-ubyte"
    path.write_bytes(corrupt(gzip.compress(raw) if gz else raw, cut, flips))
    try:
        array = data.read_idx(path)
    except DataFileError as e:
        assert str(path) in str(e)
    else:
        assert isinstance(array, np.ndarray)


@pytest.fixture(scope="module")
def plan_text():
    a = analysis.analyze(models.lenet5())
    return a, json.dumps(PruningPlan.from_masks(a, {"fc1": np.arange(120) < 60}).to_json())


@FUZZ
@given(**CORRUPTION)
def test_plan(tmp_path, plan_text, cut, flips):
    a, text = plan_text
    path = tmp_path / "plan.json"
    path.write_bytes(corrupt(text.encode(), cut, flips))
    with contextlib.suppress(PlanError):
        PruningPlan.load(path).validate(a)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    inputs = keras.Input((6, 6, 1))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inputs))))
    model.save(d / "m.keras")
    x = np.random.default_rng(0).uniform(size=(16, 6, 6, 1)).astype("float32")
    tflite = convert.convert(convert.with_batch_size(model), "int8", calibration=x)
    return (d / "m.keras").read_bytes(), tflite, x


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**CORRUPTION)
def test_keras_file(tmp_path, files, cut, flips):
    path = tmp_path / "m.keras"
    path.write_bytes(corrupt(files[0], cut, flips))
    try:
        fileio.load_model(path)
    except TfSubspaceError as e:
        assert str(path) in str(e)


@pytest.fixture(scope="module")
def ops_file(tmp_path_factory):
    """A slim model holding keras.ops nodes (with a per-channel constant) and a grouped convolution."""
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", groups=4)(x * np.linspace(0.5, 1.5, 4).astype("float32") + 3.0)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(keras.ops.relu6(x))))
    a = analysis.analyze(model)
    slim = surgery.apply_plan(model, PruningPlan.from_masks(a, {a.group_names[0]: [0, 2]}), analysis=a).model
    path = tmp_path_factory.mktemp("ops") / "slim.keras"
    return fileio.save_model(slim, path).read_bytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**CORRUPTION)
def test_keras_file_with_ops(tmp_path, ops_file, cut, flips):
    path = tmp_path / "slim.keras"
    path.write_bytes(corrupt(ops_file, cut, flips))
    try:
        fileio.load_model(path)
    except TfSubspaceError as e:
        assert str(path) in str(e)


@FUZZ
@given(**CORRUPTION)
def test_tflite_file(tmp_path, files, cut, flips):
    path = tmp_path / "m.tflite"
    path.write_bytes(corrupt(files[1], cut, flips))
    try:
        runtime.TFLiteRunner(path)(files[2][:1])
    except TfSubspaceError as e:
        assert str(path) in str(e)
