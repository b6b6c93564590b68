"""TFLite export, its checks, the Edge TPU report, TFLite Micro arena, C arrays, benchmarks."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO

from tfsubspace import fileio
from tfsubspace.edge import autoint8, convert, edgetpu, export, measure, micro, runtime
from tfsubspace.errors import TfSubspaceError


def tiny_model(activation="relu"):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    x = keras.layers.Activation(activation)(keras.layers.BatchNormalization()(x))
    x = keras.layers.MaxPooling2D()(x)
    outputs = keras.layers.Dense(5)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs, name="tiny")


def images(n=64, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, size=(n, 12, 12, 1)).astype("float32")


def as_ds(x, labels=None):
    return tf.data.Dataset.from_tensor_slices(x if labels is None else (x, labels)).batch(16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite")
    model = tiny_model()
    return model, export.export(model, out, calibration_ds=as_ds(images(200)), check_ds=as_ds(images(64, 1)))


def test_every_mode_is_written_and_checked(exported):
    model, results = exported
    assert [r.mode for r in results] == list(convert.DEFAULT_MODES)
    by_mode = {r.mode: r for r in results}
    assert by_mode["float32"].max_abs_error < 1e-4 and by_mode["float32"].agreement == 1.0
    assert by_mode["int8"].passed and by_mode["int8"].agreement >= 0.99
    # plain post-training int8 passed, so only the exact fold was tried and nothing needed a diagnosis
    assert [s["step"] for s in by_mode["int8"].steps] == ["plain", "fold"] and by_mode["int8"].diagnosis == []
    assert json.loads(json.dumps(by_mode["int8"].to_json()))["steps"][0]["passed"] is True
    assert by_mode["int8"].size_bytes < by_mode["float16"].size_bytes < by_mode["float32"].size_bytes
    for r in results:
        assert r.path.read_bytes()[4:8] == b"TFL3" and r.examples == 64
    runner = runtime.TFLiteRunner(by_mode["int8"].path)
    assert runner.input["dtype"] == np.int8 and list(runner.input["shape"]) == [1, 12, 12, 1]


def test_a_badly_calibrated_int8_file_fails_loudly(tmp_path):
    model = tiny_model()
    results = export.export(
        model,
        tmp_path,
        modes=("int8",),
        calibration_ds=as_ds(np.zeros((32, 12, 12, 1), "float32")),
        check_ds=as_ds(images(64)),
        min_agreement=0.98,
    )
    assert not results[0].passed
    assert "quantization-aware training" in results[0].message and "calibrate on more" in results[0].message
    # every fix was tried, and says how far it got
    assert [s["step"] for s in results[0].steps] == ["plain", "fold", "equalize", "bias", "output"]
    assert "after fold, equalize, bias, output" in results[0].message and results[0].diagnosis
    assert results[0].path.exists()  # written, but marked failed


def test_agreement_interval_is_a_95_percent_wilson_interval():
    low, high = autoint8.agreement_interval(0.99, 1000)
    assert (low, high) == pytest.approx((0.9817, 0.9946), abs=1e-4)
    for bound in (low, high):  # Wilson's bounds: the agreements whose normal interval just reaches 0.99
        assert (0.99 - bound) ** 2 * 1000 == pytest.approx(1.96**2 * bound * (1 - bound))
    assert autoint8.agreement_interval(1.0, 500) == pytest.approx((500 / (500 + 1.96**2), 1.0))
    assert autoint8.agreement_interval(0.0, 500)[0] == 0.0
    narrower = autoint8.agreement_interval(0.99, 10000)
    assert low < narrower[0] < 0.99 < narrower[1] < high
    # it holds the true agreement about 95% of the time over check sets of 500 images
    rng = np.random.default_rng(0)
    found = [autoint8.agreement_interval(k / 500, 500) for k in rng.binomial(500, 0.99, size=4000)]
    assert 0.93 < np.mean([lo <= 0.99 <= hi for lo, hi in found]) < 0.97
    # a verdict is noted only where the interval includes the threshold
    assert autoint8.verdict_note(0.985, 500, 0.99).endswith("to tell whether it fails.")
    assert autoint8.verdict_note(0.993, 500, 0.99).endswith("to tell whether it passes.")
    assert autoint8.verdict_note(0.95, 500, 0.99) == autoint8.verdict_note(1.0, 1000, 0.99) == ""


def test_a_pass_the_check_images_cannot_tell_says_so(tmp_path):
    model = tiny_model()
    (few,) = export.export(model, tmp_path, modes=("float32",), check_ds=as_ds(images(20)), min_agreement=0.99)
    assert few.passed and few.agreement == 1.0
    assert "20 check images" in few.message and "95% interval" in few.message and "passes." in few.message
    assert few.to_json()["agreement_interval"] == pytest.approx([20 / (20 + 1.96**2), 1.0])
    (many,) = export.export(
        model, tmp_path, modes=("float32",), check_ds=as_ds(images(500)), check_examples=500, min_agreement=0.99
    )
    assert many.passed and many.message == "" and many.agreement_interval[0] > 0.99


def test_uint8_io_and_bad_arguments(tmp_path):
    model = tiny_model()
    result = export.export(model, tmp_path, modes=("int8",), calibration_ds=as_ds(images()), io_dtype="uint8")[0]
    assert runtime.TFLiteRunner(result.path).input["dtype"] == np.uint8 and result.agreement > 0.9
    with pytest.raises(ValueError, match="Unknown export mode 'int4'"):
        export.export(model, tmp_path, modes=("int4",), calibration_ds=as_ds(images()))
    with pytest.raises(ValueError, match="needs check_ds"):
        export.export(model, tmp_path)
    with pytest.raises(ValueError, match="needs calibration images"):
        convert.convert(model, "int8")


def test_edgetpu_report(exported, tmp_path):
    _, results = exported
    by_mode = {r.mode: r for r in results}
    report = edgetpu.edgetpu_check(by_mode["int8"].path)
    assert report["compatible"], report["problems"]
    assert {row["op"] for row in report["operators"]} >= {"CONV_2D", "MAX_POOL_2D", "FULLY_CONNECTED"}
    floats = edgetpu.edgetpu_check(by_mode["float32"].path)
    assert not floats["compatible"] and any("FLOAT32, not 8-bit integer" in p for p in floats["problems"])
    exp_model = tiny_model("exponential")
    path = export.export(exp_model, tmp_path, modes=("int8",), calibration_ds=as_ds(images()), min_agreement=0.0)[
        0
    ].path
    report = edgetpu.edgetpu_check(path)
    assert "operator EXP is not supported by the Edge TPU" in report["problems"]
    assert "EXP                          1          Not supported by the Edge TPU" in edgetpu.format_edgetpu_report(
        report
    )


def test_micro_arena_and_c_array(exported, tmp_path):
    _, results = exported
    by_mode = {r.mode: r for r in results}
    float_arena = micro.micro_arena_bytes(by_mode["float32"].path)
    int8_arena = micro.micro_arena_bytes(by_mode["int8"].path)
    assert 0 < int8_arena < float_arena
    header, source = micro.write_c_array(by_mode["int8"].path, tmp_path, arena_bytes=int8_arena)
    data = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", source.read_text()))
    assert data == by_mode["int8"].path.read_bytes()
    assert f"g_model_len = {len(data)};" in source.read_text()
    assert f"constexpr int g_model_arena_size = {int8_arena};" in header.read_text()


def test_corrupt_files_are_named(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(TfSubspaceError, match="bad.tflite is not a TFLite flatbuffer"):
        runtime.TFLiteRunner(bad)
    keras_file = tmp_path / "m.keras"
    tiny_model().save(keras_file)
    truncated = tmp_path / "t.keras"
    truncated.write_bytes(keras_file.read_bytes()[:500])
    with pytest.raises(TfSubspaceError, match="t.keras is not a .keras model file"):
        fileio.load_model(truncated)
    with pytest.raises(FileNotFoundError, match="nope.keras"):
        fileio.load_model(tmp_path / "nope.keras")


def test_benchmark_side_by_side(exported, tmp_path):
    model, results = exported
    by_mode = {r.mode: r for r in results}
    small = keras.Model(model.inputs, model.outputs, name="same")
    entries = [
        measure.BenchEntry("a", by_mode["float32"].path, "float32", model),
        measure.BenchEntry("a", by_mode["int8"].path, "int8", model),
        measure.BenchEntry("b", by_mode["float32"].path, "float32", small),
        measure.BenchEntry("c", by_mode["dynamic"].path, "dynamic"),
    ]
    x = images(40, 2)
    labels = keras.ops.convert_to_numpy(model(x)).argmax(-1)
    report = measure.benchmark(entries, eval_ds=as_ds(x, labels), reference=model, runs=5, warmup=1)
    rows = report["rows"]
    assert [r["label"] for r in rows] == ["a", "a", "b", "c"]
    assert rows[0]["speedup_vs_first"] == 1.0 and rows[1]["speedup_vs_first"] == 1.0
    assert rows[2]["speedup_vs_first"] == pytest.approx(
        rows[0]["latency"]["median_ms"] / rows[2]["latency"]["median_ms"]
    )
    assert rows[0]["accuracy"] == 1.0 and rows[0]["agreement"] == 1.0 and rows[0]["params"] == model.count_params()
    assert "micro_arena_bytes" in rows[1] and "micro_arena_bytes" not in rows[3]  # TFLM runs no dynamic-range model
    lat = rows[0]["latency"]
    assert lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"] <= lat["max_ms"] and lat["runs"] == 5
    table = measure.format_table(report)
    assert "| a | int8 |" in table and "5 timed invokes" in table
    for path in measure.plot(report, tmp_path):
        assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_scripts_end_to_end(tmp_path):
    model_path = tmp_path / "m.keras"
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x)), name="m").save(model_path)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "export_tflite.py"),
            f"--model={model_path}",
            f"--out_dir={out}",
            "--c_array",
            "--edgetpu",
            "--check_examples=100",
            "--calibration_examples=100",
            "--min_agreement=0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Edge TPU compatible." in result.stdout and (out / "model_data.cc").exists()
    assert "95% interval" in result.stdout
    assert "input range: 0-1 (auto: model 'm' does not start with a Rescaling" in result.stdout
    assert {p.name for p in out.glob("*.tflite")} == {f"m_{mode}.tflite" for mode in convert.DEFAULT_MODES}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark.py"),
            f"--models=one={model_path},two={model_path}",
            f"--out_dir={tmp_path / 'bench'}",
            "--runs=5",
            "--warmup=1",
            "--eval_examples=100",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| two | int8 |" in result.stdout and (tmp_path / "bench" / "benchmark.json").exists()
    assert "input range: 0-1 (one: auto:" in result.stdout


def test_batched_files_are_checked_and_benchmarked_per_batch(tmp_path):
    model = tiny_model()
    results = export.export(
        model,
        tmp_path,
        modes=("float32", "int8"),
        calibration_ds=as_ds(images(200)),
        check_ds=as_ds(images(50, 1)),
        batch_size=8,
    )
    assert [r.path.name for r in results] == ["tiny_float32_b8.tflite", "tiny_int8_b8.tflite"]
    assert all(r.passed and r.examples == 50 for r in results)  # 50 images: six full batches and a padded one
    runner = runtime.TFLiteRunner(results[0].path)
    assert runner.batch_size == 8
    x = images(11, 2)
    np.testing.assert_allclose(runner(x), keras.ops.convert_to_numpy(model(x)), atol=1e-5)
    single = export.export(model, tmp_path, modes=("float32",), check_ds=as_ds(images(16, 1)))[0]
    entries = [
        measure.BenchEntry("b1", single.path, "float32", model),
        measure.BenchEntry("b8", results[0].path, "float32", model),
    ]
    report = measure.benchmark(entries, eval_ds=as_ds(images(20, 3)), runs=3, warmup=1)
    assert [r["batch"] for r in report["rows"]] == [1, 8]
    assert report["rows"][1]["speedup_vs_first"] == 1.0  # compared within its own batch size
    assert report["rows"][1]["latency"]["per_image_ms"] == pytest.approx(report["rows"][1]["latency"]["median_ms"] / 8)
    assert "micro_arena_bytes" not in report["rows"][1]
    with pytest.raises(ValueError, match="batch_size"):
        export.export(model, tmp_path, modes=("float32",), check_ds=as_ds(images(4)), batch_size=0)


def test_an_int8_file_xnnpack_refuses_names_its_dead_tensor():
    """A ReLU that is zero on every calibration image gets an int8 scale near 0, which XNNPACK
    cannot prepare: the error names the tensor instead of only the node number."""
    inputs = keras.Input((4, 4, 1), batch_size=1)
    x = keras.layers.Flatten()(inputs)
    dead = keras.layers.Dense(
        1,
        activation="relu",
        kernel_initializer="ones",
        bias_initializer=keras.initializers.Constant(-100.0),
        name="dead",
    )(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(dead))
    images = np.random.default_rng(0).random((16, 4, 4, 1), "float32")
    content = convert.convert(model, "int8", calibration=images)
    with pytest.raises(TfSubspaceError, match=r"XNNPACK.*dead_1/Relu.*scales under 1e-6.*is dead"):
        runtime.TFLiteRunner(content)


def test_int16x8_is_exported_on_request_and_checked(tmp_path):
    """16-bit activations, int8 weights: float inputs and outputs, int16 tensors inside, checked
    against the Keras model like every file; not among the default modes."""
    model = tiny_model()
    assert "int16x8" in convert.MODES and "int16x8" not in convert.DEFAULT_MODES
    (result,) = export.export(
        model, tmp_path, modes=("int16x8",), calibration_ds=as_ds(images(100)), check_ds=as_ds(images(64, 1))
    )
    assert result.mode == "int16x8" and result.path.name.endswith("_int16x8.tflite")
    assert result.passed and result.agreement >= 0.98
    interpreter = tf.lite.Interpreter(model_content=result.path.read_bytes())
    dtypes = {t["dtype"] for t in interpreter.get_tensor_details()}
    assert np.int16 in dtypes and interpreter.get_input_details()[0]["dtype"] == np.float32
    with pytest.raises(ValueError, match="int16x8 export needs calibration images"):
        convert.convert(model, "int16x8")


def test_arrays_of_images_are_images_not_batches(tmp_path):
    """An array (N, H, W, C) is N images (iterating it would give single images, not batches)."""
    model = tiny_model()
    calibration, check = images(100), images(64, 1)
    from_arrays = export.export(model, tmp_path / "a", modes=("int8",), calibration_ds=calibration, check_ds=check)
    from_ds = export.export(
        model, tmp_path / "d", modes=("int8",), calibration_ds=as_ds(calibration), check_ds=as_ds(check)
    )
    assert from_arrays[0].examples == from_ds[0].examples == 64
    assert from_arrays[0].path.read_bytes() == from_ds[0].path.read_bytes()
    labelled = export.export(model, tmp_path / "l", modes=("float32",), check_ds=(check, np.zeros(64)))
    assert labelled[0].examples == 64 and labelled[0].agreement == 1.0
