"""Property test over what a user may hand compress(): every draw ends in a student or in an
error that tfsubspace raised on purpose (naming the problem); never a raw Keras or TensorFlow
error from deep inside, and never a saved file with a non-finite weight."""

import tempfile
import traceback
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tfsubspace
from tfsubspace.errors import TfSubspaceError

SHAPE = (10, 10, 1)


def teacher():
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, name="c1")(inputs)
    x = keras.layers.ReLU(name="r1")(keras.layers.BatchNormalization(name="b1")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x), name="fuzzed")


TEACHER = teacher()


@st.composite
def calls(draw):
    shape = draw(st.sampled_from([SHAPE] * 5 + [(10, 10, 3), (8, 8, 1), (10, 10)]))
    dtype = draw(st.sampled_from(["float32", "uint8", "float64", "int32"]))
    n = draw(st.sampled_from([0, 1, 7, 24, 24, 24]))
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    images = (rng.random((n, *shape)) * (255 if dtype in ("uint8", "int32") else 1)).astype(dtype)
    nan_at = draw(st.sampled_from([None, None, None, 0, n - 1])) if n and dtype.startswith("float") else None
    if nan_at is not None:
        images[nan_at].flat[0] = np.nan
    form = draw(st.sampled_from(["array", "tuple", "batched", "unbatched", "filtered", "repeated", "repeated+steps"]))
    if form == "array":
        data = images
    elif form == "tuple":
        data = (images, rng.integers(0, 3, n))
    else:
        ds = tf.data.Dataset.from_tensor_slices(images)
        ds = ds if form == "unbatched" else ds.batch(8)
        if form == "filtered":
            ds = ds.filter(lambda x: True)
        if form.startswith("repeated"):
            ds = ds.repeat()
        data = ds
    options = dict(width_ratio=0.5, multiple=2, epochs=1, recover_epochs=0, stats_batches=2, bn_batches=2, verbose=0)
    options.update(
        draw(
            st.just({})
            | st.fixed_dictionaries(
                {},
                optional={
                    "epochs": st.sampled_from([1, 0, 1.5, "1"]),
                    "multiple": st.sampled_from([1, 2, 2.5]),
                    "target_params": st.sampled_from([0.5, 2, 2.0, 400, -1]),
                    "energy": st.sampled_from([0.9, 1.5]),
                    "lasso": st.sampled_from([0.0, 0.5, float("nan")]),
                },
            )
        )
    )
    if "energy" in options:
        options.pop("width_ratio")
    if form == "repeated+steps":
        options["steps_per_epoch"] = 2
    return data, options


def _raised_by_tfsubspace(error: BaseException) -> bool:
    if isinstance(error, TfSubspaceError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/tfsubspace/" in frames[-1].filename


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(calls())
def test_every_call_ends_in_a_student_or_a_named_error(call):
    data, options = call
    with tempfile.TemporaryDirectory() as work_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = tfsubspace.compress(TEACHER, data, work_dir=work_dir, **options)
        except (ValueError, TypeError) as e:
            event(f"refused: {type(e).__name__}")
            assert _raised_by_tfsubspace(e), f"a raw error escaped: {type(e).__name__}: {e}"
            assert str(e), "an error without a message"
        else:
            event("a student")
            assert all(np.isfinite(w).all() for w in result.student.get_weights())
        for path in Path(work_dir).glob("*.keras"):
            model = keras.models.load_model(path)
            assert all(np.isfinite(w).all() for w in model.get_weights()), path
